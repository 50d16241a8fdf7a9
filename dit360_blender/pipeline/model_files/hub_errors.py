"""Failures of huggingface_hub calls, turned into our errors: what failed, why, and the fix.

The user's token never appears in a message or a log line: details of the original exception are
scrubbed of it, and the translated error does not chain to the original (whose request object holds
the Authorization header).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...redact import env_secrets, redact
from ..errors import DiT360Error, DownloadError, GatedRepoAccessError
from .catalogue import GATED_HINT, placement

logger = logging.getLogger(__name__)


@dataclass
class HubCall:
    """What a Hub call was for, to word its errors."""

    repo_id: str
    what: str  # "the transformer, vae" / "ae.safetensors (for the vae)"
    todo: list[str]  # components still missing, listed for copying by hand
    models_dir: Path | None
    token: str | None


def hub_call(fn: Callable[[], Any], ctx: HubCall) -> Any:
    """Run a huggingface_hub call, turning its failures into our errors.

    The translated error is raised outside the ``except`` block so that it carries no reference to
    the original exception (whose request object holds the Authorization header).
    """
    error: DiT360Error | None = None
    try:
        return fn()
    except Exception as exc:  # unknown ones (e.g. raised by the progress callback) are re-raised as they are
        error = _translate(exc, ctx)
        if error is None:
            raise
    raise error


def _translate(exc: BaseException, ctx: HubCall) -> DiT360Error | None:
    """Our error for a huggingface_hub failure, or None for an exception that is not the Hub's."""
    from huggingface_hub import errors as hf_errors

    try:
        import httpx2

        transport_errors: tuple[type[BaseException], ...] = (httpx2.TransportError,)
    except ImportError:  # older huggingface_hub versions use requests
        transport_errors = ()

    detail = redact(f"{type(exc).__name__}: {exc}", [ctx.token, *env_secrets()])
    logger.debug("Hub call for %s failed: %s", ctx.repo_id, detail)
    by_hand = placement(ctx.todo, ctx.models_dir)

    if isinstance(exc, hf_errors.HfHubHTTPError):
        response = getattr(exc, "response", None)
        status = getattr(response, "status_code", None)
        if isinstance(exc, hf_errors.GatedRepoError) or status in (401, 403):
            why = {
                401: "no token was sent, or the token is invalid",
                403: "this token has not been granted access",
            }.get(status, "access is restricted")
            return GatedRepoAccessError(
                f"The Hugging Face Hub refused access to {ctx.repo_id} (HTTP {status}: {why}); "
                f"cannot download {ctx.what}.",
                GATED_HINT,
            )
        if isinstance(exc, hf_errors.RepositoryNotFoundError):
            return DownloadError(
                f"The Hugging Face Hub says the repository {ctx.repo_id} does not exist "
                f"(needed for {ctx.what}).",
                "Check that HF_ENDPOINT (if set) points at the Hub, or copy the files by hand:\n" + by_hand,
            )
        if isinstance(exc, (hf_errors.RevisionNotFoundError, hf_errors.RemoteEntryNotFoundError)):
            return DownloadError(
                f"{ctx.what} is not on the Hub in {ctx.repo_id} ({_first_line(detail)}).",
                "The repository layout may have changed; copy the files by hand:\n" + by_hand,
            )
        return DownloadError(
            f"The Hugging Face Hub answered HTTP {status} while downloading {ctx.what} from {ctx.repo_id}.",
            "Retry later (files already downloaded are kept), or copy the files by hand:\n" + by_hand,
        )
    if isinstance(exc, hf_errors.OfflineModeIsEnabled):
        return offline_error(ctx.todo, ctx.models_dir, "offline mode is on (HF_HUB_OFFLINE is set)")
    if isinstance(exc, (hf_errors.LocalEntryNotFoundError, ConnectionError, TimeoutError, *transport_errors)):
        return offline_error(
            ctx.todo, ctx.models_dir, f"{ctx.repo_id} could not be reached: {_first_line(detail)}"
        )
    if isinstance(exc, OSError):
        return DownloadError(
            f"Downloading {ctx.what} from {ctx.repo_id} failed: {_first_line(detail)}",
            "Check free disk space and write permission where the files go, then retry "
            "(files already downloaded are kept).",
        )
    return None


def offline_error(components: list[str], models_dir: Path | None, reason: str) -> DownloadError:
    """The Hub cannot be reached (``reason``): connect, or copy the ``components`` by hand."""
    return DownloadError(
        f"No connection to the Hugging Face Hub: {reason}. Cannot download the {', '.join(components)}.",
        "Connect to the internet and retry (files already downloaded are kept), or copy these files by "
        "hand:\n" + placement(components, models_dir),
    )


def _first_line(text: str, limit: int = 300) -> str:
    line = next((s.strip() for s in text.splitlines() if s.strip()), "")
    return line if len(line) <= limit else line[: limit - 3] + "..."
