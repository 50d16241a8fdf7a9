"""Blanking secrets out of text before it is logged, shown or sent: the worker's launch token and the
Hugging Face token. Standard library only, importing nothing of this package, so every layer (the
Blender side, the client, the worker and the pipeline's Hub code) applies this one rule."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping

MASK = "***"
HF_TOKEN_ENVS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")  # where huggingface_hub looks for a token


def env_secrets(environ: Mapping[str, str] = os.environ) -> list[str]:
    """The Hugging Face tokens set in `environ`, stripped (unset or blank ones are left out)."""
    return [environ[name].strip() for name in HF_TOKEN_ENVS if environ.get(name, "").strip()]


def redact(text: str, secrets: Iterable[str | None]) -> str:
    """`text` with every secret replaced by MASK; None or blank secrets are skipped."""
    for secret in secrets:
        if secret and secret.strip():
            text = text.replace(secret.strip(), MASK)
    return text
