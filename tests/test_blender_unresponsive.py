"""A hung worker in real Blender (the bpy module): the panel shows worker_unresponsive with its fix
and a Stop Worker button, the World is the user's again and the next job runs on a fresh worker; a
token in the preferences that can't be real is not used. One Blender process runs
tests/blender/scenario_unresponsive.py."""

from __future__ import annotations

import importlib.util
import sys

import pytest
from test_blender_extension import build_zip, run_scenario

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("bpy") is None, reason="needs the bpy module"),
    pytest.mark.skipif(sys.platform == "win32", reason="SIGSTOP"),
]


@pytest.fixture(scope="module")
def unresponsive(tiny_models, tmp_path_factory) -> dict:
    work = tmp_path_factory.mktemp("blender-unresponsive")
    cfg = {"zip": str(build_zip(work / "dist")), "models": str(tiny_models["root"]), "work": str(work)}
    return run_scenario("scenario_unresponsive.py", cfg, "unresponsive", timeout=900)


def test_a_hung_worker_is_shown_with_stop_worker_and_the_next_job_runs(unresponsive):
    record = unresponsive["hung_worker"]
    assert record["ok"], record["error"]
    d = record["data"]
    assert d["error"]["code"] == "worker_unresponsive" and "answered nothing for 4 s" in d["error"]["message"]
    assert "again" in d["error"]["hint"] and d["stage"] == "failed"
    assert 4.0 - 0.5 <= d["waited_s"] <= 4.0 + 15, d["waited_s"]
    assert "dit360.stop_worker" in d["operators"] and d["stop_worker"] == ["FINISHED"]
    assert d["world_unchanged"]
    assert d["old_worker_state"] in ("gone", "Z"), d["old_worker_state"]  # not "T" (stopped)
    assert d["next_error"] is None and d["next_pid_differs"]


def test_a_token_that_cannot_be_real_is_not_used_and_the_preferences_say_why(unresponsive):
    record = unresponsive["implausible_token"]
    assert record["ok"], record["error"]
    d = record["data"]
    assert d["link_token"] == "" and d["real_token"] == "hf_AbCdEfGhIjKlMnOpQrStUvWxYz01234567"
    assert any(label.startswith("label: Not used: A token is at least 8") for label in d["labels"]), d[
        "labels"
    ]
