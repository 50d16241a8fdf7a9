"""Errors the pipeline raises: each names its cause and the fix.

Every error carries a stable ``code`` (the worker forwards it to Blender unchanged), a
``message`` saying what went wrong and a ``hint`` saying what the user should do about it.
"""

from __future__ import annotations


class DiT360Error(Exception):
    """Base class: a failure with a machine-readable code, a message and a fix."""

    code = "internal"

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message}\n  fix: {self.hint}" if self.hint else self.message

    def to_dict(self) -> dict:
        return {"code": self.code, "message": self.message, "hint": self.hint}


class BadParametersError(DiT360Error, ValueError):
    """The request itself is invalid (empty prompt, bad size, steps <= 0, ...)."""

    code = "bad_parameters"


class WeightsMissingError(DiT360Error, FileNotFoundError):
    """A model file or folder is not where it should be."""

    code = "weights_missing"


class BadCheckpointError(DiT360Error):
    """A weights file exists but cannot be used (truncated, wrong layout, wrong shapes)."""

    code = "bad_checkpoint"


class LoraMismatchError(BadCheckpointError):
    """A LoRA file whose keys do not match the FLUX transformer."""

    code = "lora_mismatch"


class DownloadError(DiT360Error):
    """The Hub refused or could not be reached (offline, gated, no token)."""

    code = "download_failed"


class GatedRepoAccessError(DownloadError):
    """The repository is gated and this token has not accepted its licence."""

    code = "download_gated"


class DeviceError(DiT360Error):
    """The requested device or dtype is not available here."""

    code = "device_unavailable"


class OutputWriteError(DiT360Error):
    """The image could not be written (no permission, disk full, bad folder)."""

    code = "disk_write_failed"
