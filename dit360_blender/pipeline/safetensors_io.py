"""Reading safetensors files lazily (memory-mapped) with errors that say what is wrong."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open

from .errors import BadCheckpointError, WeightsMissingError
from .model_files.safetensors_header import safetensors_problem

_FIXES = {
    "cut_short": "The download probably stopped part-way: delete the file and download it again.",
    "foreign": "Point the add-on at the .safetensors file itself, not a renamed .ckpt/.bin.",
    "unreadable": "Check that the file can be read (permissions, disk), or download it again.",
}


def check_safetensors_file(path: Path) -> None:
    """Fail early, with a fix, on a missing, truncated or foreign file.

    safetensors' own message for a truncated file ("incomplete metadata") does not say that
    the download stopped half-way, which is by far the most common cause.
    """
    path = Path(path)
    if path.is_file():
        problem = safetensors_problem(path)
        if problem is None:
            return
        if problem.kind != "missing":  # "missing": deleted since is_file() looked
            raise BadCheckpointError(f"{path} {problem.text}.", _FIXES[problem.kind])
    raise WeightsMissingError(
        f"Weights file not found: {path}",
        "Check the path, or let the add-on download the models (Preferences > Models).",
    )


@contextmanager
def open_safetensors(path: Path) -> Iterator:
    """Open a checked safetensors file; tensors are read into CPU memory only when asked for (mmap)."""
    check_safetensors_file(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
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
