"""The default upscale model: Real-ESRGAN x4plus, found locally or downloaded from the Hugging Face Hub
with the same hub code, progress and errors as the main model (download.py, hub_errors.py).

* What: ``RealESRGAN_x4plus.pth`` (67 MB; RRDBNet, 23 blocks, ×4), the general-purpose model of
  Real-ESRGAN (Xintao Wang, Liangbin Xie, Chao Dong, Ying Shan; Tencent ARC Lab, ICCVW 2021).
* Licence: BSD 3-Clause ("Copyright (c) 2021, Xintao Wang"), the licence of the Real-ESRGAN release
  these weights come from; usable commercially with the notice kept.
* From: the public Hub repository ``nateraw/real-esrgan`` (no account or token needed), file
  ``RealESRGAN_x4plus.pth`` on ``main``. A .pth is a pickle: spandrel reads it with an unpickler that
  admits tensors and nothing else (sr_models.py), so a tampered file cannot run code.
* Where it goes: ``<models folder>/Real-ESRGAN/RealESRGAN_x4plus.pth``, or the Hugging Face cache.

Any other spandrel-supported file the user picks replaces it (``--model FILE``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ..errors import DownloadError, WeightsMissingError
from .catalogue import DOWNLOAD_HOW

SR_COMPONENT = "upscale model"
SR_REPO = "nateraw/real-esrgan"
SR_FILE = "RealESRGAN_x4plus.pth"
SR_DIR = "Real-ESRGAN"
SR_LICENSE = "BSD-3-Clause (Real-ESRGAN, Copyright (c) 2021 Xintao Wang)"
SR_URL = f"https://huggingface.co/{SR_REPO}/resolve/main/{SR_FILE}"
SR_APPROX_MB = 67

ProgressCallback = Callable[[str, int, int], None]


def sr_placement(models_dir: Path | None) -> str:
    """Where the default model goes when copied by hand."""
    base = Path(models_dir) if models_dir is not None else Path("<models folder>")
    line = f"    {base / SR_DIR / SR_FILE}  <- {SR_URL}"
    if models_dir is None:
        line += "\n    and set that folder as the models folder (add-on Preferences, or `--models-dir`)."
    return line


def find_sr_model(models_dir: Path | str | None = None) -> Path | None:
    """The default model in ``models_dir`` or the Hugging Face cache (no network); None if nowhere."""
    if models_dir is not None and str(models_dir).strip():
        local = Path(models_dir).expanduser() / SR_DIR / SR_FILE
        if local.is_file() and local.stat().st_size > 0:
            return local
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    cached = try_to_load_from_cache(SR_REPO, SR_FILE, revision="main")
    return Path(cached) if isinstance(cached, str) and Path(cached).is_file() else None


def resolve_sr_model(
    model: Path | str | None = None,
    models_dir: Path | str | None = None,
    allow_download: bool = False,
    token: str | None = None,
    progress: ProgressCallback | None = None,
    endpoint: str | None = None,
) -> Path:
    """The upscale model file: ``model`` when given (it must exist), else the default one from the
    models folder or the cache, else (with ``allow_download``) downloaded into the models folder
    (or the cache).

    Raises WeightsMissingError (a given file is missing, or the default is nowhere and may not be
    downloaded), DownloadError (no connection, offline mode, the Hub's refusal; the message says how
    to copy the file by hand)."""
    if model is not None and str(model).strip():
        path = Path(model).expanduser()
        if not path.is_file():
            raise WeightsMissingError(
                f"The upscale model file {path} does not exist.",
                "Pick an existing .pth or .safetensors super-resolution model, or leave the model empty "
                f"to use the default ({SR_FILE}).",
            )
        return path
    found = find_sr_model(models_dir)
    if found is not None:
        return found
    folder = Path(models_dir).expanduser() if models_dir is not None and str(models_dir).strip() else None
    if not allow_download:
        raise WeightsMissingError(
            f"The default upscale model {SR_FILE} ({SR_APPROX_MB} MB, {SR_LICENSE}) is not in "
            f"{folder / SR_DIR if folder else 'the models folder'} nor in the Hugging Face cache.",
            f"To download it, {DOWNLOAD_HOW}; or pick your own model file (--model); or copy it by hand:\n"
            + sr_placement(folder),
        )
    return _download(folder, token, progress, endpoint)


def _download(
    folder: Path | None, token: str | None, progress: ProgressCallback | None, endpoint: str | None
) -> Path:
    try:
        from huggingface_hub import constants
    except ImportError:
        raise DownloadError(
            "Cannot download the upscale model: the huggingface_hub package is not installed.",
            "Reinstall the worker environment, or copy the file by hand:\n" + sr_placement(folder),
        ) from None
    from .download import _clean_token, _download_file
    from .hub_errors import HubCall, offline_error

    if constants.is_offline_mode():
        raise offline_error([SR_COMPONENT], folder, "offline mode is on (HF_HUB_OFFLINE is set)")
    local_dir = folder / SR_DIR if folder is not None else None
    ctx = HubCall(SR_REPO, f"{SR_FILE} (the {SR_COMPONENT})", [SR_COMPONENT], folder, _clean_token(token))
    path = _download_file(SR_REPO, SR_FILE, local_dir, progress, ctx, endpoint)
    if path.stat().st_size == 0:
        path.unlink(missing_ok=True)
        raise DownloadError(
            f"The downloaded {SR_FILE} is empty.", "Retry, or copy the file by hand:\n" + sr_placement(folder)
        )
    return path
