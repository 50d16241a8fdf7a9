"""What `doctor` reports about the worker's environment: torch, the GPU and the other packages."""

from __future__ import annotations

import importlib

import torch

PACKAGES = ("transformers", "safetensors", "huggingface_hub", "einops", "PIL", "numpy")


def describe() -> list[tuple[str, str]]:
    """(label, value) rows: torch's version, each GPU with its free memory, the package versions."""
    rows = [("torch", torch.__version__)]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(i)
            rows.append(
                (
                    f"CUDA:{i}",
                    f"{torch.cuda.get_device_name(i)}, {free / 2**30:.1f} of {total / 2**30:.1f} GiB free",
                )
            )
    elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        rows.append(("GPU", "Apple MPS"))
    else:
        rows.append(("GPU", "none found: generation would run on the CPU (very slow at full size)"))
    for name in PACKAGES:
        try:
            rows.append((name, getattr(importlib.import_module(name), "__version__", "?")))
        except ImportError:
            rows.append((name, "NOT INSTALLED"))
    return rows
