"""Shared fixtures: the tiny model set is built once per test session."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    from tiny_models import build_tiny_models

    return build_tiny_models(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def tiny_paths(tiny_models):
    from dit360_blender.pipeline.model_files.download import resolve_model_paths

    return resolve_model_paths(models_dir=tiny_models["root"])
