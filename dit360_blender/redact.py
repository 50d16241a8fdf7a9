"""Blanking secrets out of text before it is logged, shown or sent: the worker's launch token and the
Hugging Face token. Standard library only, importing nothing of this package, so every layer (the
Blender side, the client, the worker and the pipeline's Hub code) applies this one rule.

Only whole tokens are blanked (not a run of token characters that merely contains one), and only
strings that can be tokens: a one-letter "token" blanked everywhere would wreck every message (a
JSON frame included), so such values are refused where a token enters (`token_problem`) and
never scrubbed.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping

MASK = "***"
HF_TOKEN_ENVS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")  # where huggingface_hub looks for a token
MIN_SECRET_CHARS = 8
_TOKEN_CHARS = "A-Za-z0-9_.~+/=-"
_WORD_CHARS = "A-Za-z0-9_-"  # a secret next to one of these is part of a longer string, not it
_PLAUSIBLE = re.compile(f"[{_TOKEN_CHARS}]{{{MIN_SECRET_CHARS},512}}")
_WORDLIKE = re.compile("[a-z_]+")  # lowercase words are the protocol's names, never tokens


def token_problem(token: str) -> str | None:
    """Why `token` (stripped) can't be a real token, or None when it can (Hugging Face tokens are
    'hf_' and 34 letters and digits; the worker's launch token is 43 URL-safe characters)."""
    token = token.strip()
    if not _PLAUSIBLE.fullmatch(token):
        return (
            f"A token is at least {MIN_SECRET_CHARS} letters, digits or '_-.~+/=' with no spaces "
            f"(this one has {len(token)} characters)."
        )
    if _WORDLIKE.fullmatch(token):
        return (
            "A token is not a lowercase word: copy the whole token (hf_...) from your Hugging Face settings."
        )
    return None


def env_secrets(environ: Mapping[str, str] = os.environ) -> list[str]:
    """The Hugging Face tokens set in `environ`, stripped (unset or blank ones are left out)."""
    return [environ[name].strip() for name in HF_TOKEN_ENVS if environ.get(name, "").strip()]


def redact(text: str, secrets: Iterable[str | None]) -> str:
    """`text` with every whole occurrence of a secret replaced by MASK; None, blank and implausible
    secrets (`token_problem`) are skipped."""
    for secret in secrets:
        secret = (secret or "").strip()
        if secret and secret in text and token_problem(secret) is None:  # `in` first: fast on big frames
            pattern = f"(?<![{_WORD_CHARS}]){re.escape(secret)}(?![{_WORD_CHARS}])"
            text = re.sub(pattern, MASK, text)
    return text
