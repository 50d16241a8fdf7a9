"""Reading safetensors files lazily (memory-mapped) with errors that say what is wrong."""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open

from .errors import BadCheckpointError, WeightsMissingError


def check_safetensors_file(path: Path) -> None:
    """Fail early, with a fix, on a missing, truncated or foreign file.

    safetensors' own message for a truncated file ("incomplete metadata") does not say that
    the download stopped half-way, which is by far the most common cause.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsMissingError(
            f"Weights file not found: {path}",
            "Check the path, or let the add-on download the models (Preferences > Models).",
        )
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise _truncated(path, size)
        (header_len,) = struct.unpack("<Q", head)
        if header_len > 100_000_000 or 8 + header_len > size:
            raise _truncated(path, size)
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise BadCheckpointError(
                f"{path} is not a safetensors file (its header is not valid JSON: {exc}).",
                "Point the add-on at the .safetensors file itself, not a renamed .ckpt/.bin.",
            ) from exc
    data_end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + header_len + data_end > size:
        raise _truncated(path, size)


def _truncated(path: Path, size: int) -> BadCheckpointError:
    return BadCheckpointError(
        f"{path} is truncated or damaged ({size} bytes; its header describes more data).",
        "The download probably stopped part-way: delete the file and download it again.",
    )


@contextmanager
def open_safetensors(path: Path, device: str = "cpu") -> Iterator:
    """Open a checked safetensors file; tensors are read only when asked for (mmap)."""
    check_safetensors_file(path)
    try:
        with safe_open(str(path), framework="pt", device=device) as f:
            yield f
    except BadCheckpointError:
        raise
    except Exception as exc:  # safetensors raises its own SafetensorError type
        if type(exc).__name__ == "SafetensorError":
            raise BadCheckpointError(f"Cannot read {path}: {exc}", "Download the file again.") from exc
        raise


def load_state_dict(paths: list[Path] | Path) -> dict[str, torch.Tensor]:
    """All tensors of one or more (sharded) files, memory-mapped: no copy is made until used."""
    if isinstance(paths, (str, Path)):
        paths = [Path(paths)]
    state: dict[str, torch.Tensor] = {}
    for path in paths:
        with open_safetensors(path) as f:
            for key in f.keys():
                state[key] = f.get_tensor(key)
    return state


def safetensors_files_in(folder: Path) -> list[Path]:
    """The weight files of a transformers/diffusers folder (single file or shards)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise WeightsMissingError(
            f"Model folder not found: {folder}",
            "Check the path, or let the add-on download the models (Preferences > Models).",
        )
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise WeightsMissingError(
            f"No .safetensors files in {folder}",
            "The folder must hold the model's .safetensors weights (download them again).",
        )
    return files
