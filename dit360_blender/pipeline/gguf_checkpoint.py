"""FLUX transformers in GGUF files (city96's quantised FLUX.1-dev: Q8_0, Q5_K_S, Q4_K_S, ...).

city96's files keep BFL's key names (``double_blocks.0.img_attn.qkv.weight``, sometimes under
``model.diffusion_model.``), the architecture ``flux`` in ``general.architecture``, the blocks'
Linear weights quantised and the rest (biases, norms, the embedders and the final layer) in F32 or
F16. The file is read with the ``gguf`` package's reader (llama.cpp's own), memory-mapped; the
quantised blocks are kept as they are and dequantised per layer on the device during forward
(``GGUFLinear``), like the fp8 path, so the transformer takes the file's size in any memory mode.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import BadCheckpointError
from .gguf_quants import FORMATS, dequantize
from .model_files.safetensors_header import GGUF_MAGIC

_FLOAT_TYPES = {0: torch.float32, 1: torch.float16, 30: torch.bfloat16}  # GGML F32, F16, BF16
_ARCHITECTURES = ("flux", None)  # None: files written without the field (stable-diffusion.cpp)


def is_gguf(path: Path) -> bool:
    """A GGUF file (by its magic bytes), whatever its name."""
    path = Path(path)
    if not path.is_file():
        return False
    with path.open("rb") as f:
        return f.read(4) == GGUF_MAGIC


@dataclass
class GGUFWeight:
    """A quantised weight as the file stores it: uint8 rows of blocks (rows, bytes per row)."""

    data: Tensor
    qtype: int
    shape: tuple[int, ...]

    def dequantize(
        self, dtype: torch.dtype = torch.float32, device: str | torch.device | None = None
    ) -> Tensor:
        return dequantize(self.data.to(device or self.data.device), self.qtype, self.shape, dtype)


@dataclass(frozen=True)
class _Entry:
    shape: tuple[int, ...]  # torch order (GGUF lists dimensions innermost first)
    qtype: int
    raw: np.ndarray  # a view into the memory-mapped file

    def load(self) -> Tensor | GGUFWeight:
        with warnings.catch_warnings():  # the map is read-only; torch only warns about writing to it
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            data = torch.from_numpy(self.raw).clone()
        if self.qtype in _FLOAT_TYPES:
            return data.view(_FLOAT_TYPES[self.qtype]).reshape(self.shape)
        return GGUFWeight(data, self.qtype, self.shape)


def read_gguf(path: Path) -> dict[str, _Entry]:
    """The tensors of a complete FLUX GGUF file, by their names in the file (nothing read yet)."""
    import gguf

    path = Path(path)
    try:
        reader = gguf.GGUFReader(str(path))
    except (ValueError, IndexError, OSError) as exc:  # what the reader raises on a cut-short header
        raise BadCheckpointError(
            f"{path} is incomplete or damaged: the GGUF reader stopped ({type(exc).__name__}: {exc}).",
            "The download probably stopped part-way: delete the file and download it again.",
        ) from exc
    _check_architecture(reader, path)
    size = path.stat().st_size
    end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
    if end > size:
        raise BadCheckpointError(
            f"{path} is incomplete: truncated at {size} of {end} bytes.",
            "The download stopped part-way: delete the file and download it again.",
        )
    entries = {}
    for tensor in reader.tensors:
        qtype = int(tensor.tensor_type)
        if qtype not in _FLOAT_TYPES and qtype not in FORMATS:
            raise BadCheckpointError(
                f"{path} stores {tensor.name} as {tensor.tensor_type.name}, a GGUF type this add-on "
                "does not dequantise.",
                f"Use a FLUX GGUF in one of {', '.join(supported_types())}.",
            )
        shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
        entries[tensor.name] = _Entry(shape, qtype, tensor.data)
    return entries


def supported_types() -> list[str]:
    """The GGUF tensor types read here, by GGML's names."""
    return ["F32", "F16", "BF16", *(fmt.name for fmt in FORMATS.values())]


def _check_architecture(reader, path: Path) -> None:
    field = reader.get_field("general.architecture")
    arch = field.contents() if field is not None else None
    if arch not in _ARCHITECTURES:
        raise BadCheckpointError(
            f"{path} is a GGUF file of a {arch!r} model, not of the FLUX transformer.",
            "Use a FLUX.1-dev GGUF (for example city96's FLUX.1-dev-gguf files) as the transformer.",
        )


def iter_gguf(entries: dict[str, _Entry], names: dict[str, str]) -> Iterator[tuple[str, Tensor | GGUFWeight]]:
    """(BFL key, tensor or quantised weight) for each file name -> BFL key of ``names``, read when yielded."""
    for name, key in sorted(names.items(), key=lambda item: item[1]):
        yield key, entries[name].load()


class GGUFLinear(nn.Module):
    """A Linear whose weight stays in its GGUF blocks and is dequantised on the device per call."""

    def __init__(self, in_features: int, out_features: int, bias: bool, qtype: int) -> None:
        super().__init__()
        fmt = FORMATS[qtype]
        self.in_features, self.out_features, self.qtype = in_features, out_features, qtype
        row_bytes = in_features // fmt.weights * fmt.nbytes
        # Named `weight` so the file's tensor loads into it by its own key.
        self.register_buffer("weight", torch.empty(out_features, row_bytes, dtype=torch.uint8))
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None

    def dequantized(self, dtype: torch.dtype) -> Tensor:
        return dequantize(self.weight, self.qtype, (self.out_features, self.in_features), dtype)

    def forward(self, x: Tensor) -> Tensor:
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return F.linear(x, self.dequantized(x.dtype), bias)


def use_gguf_linears(model: nn.Module, qtypes: dict[str, int]) -> None:
    """Swap the Linear of each ``<module>.weight`` key for a GGUFLinear of that quantisation."""
    for key, qtype in qtypes.items():
        parent_name, _, child = key.rsplit(".", 1)[0].rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        old = getattr(parent, child)
        with torch.device("meta"):
            setattr(parent, child, GGUFLinear(old.in_features, old.out_features, old.bias is not None, qtype))
