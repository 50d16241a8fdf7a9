"""Tiny GGUF files written by the `gguf` package's own writer, laid out like city96's FLUX GGUFs:
architecture "flux", BFL key names, the blocks' Linear weights quantised, everything else F32."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as Q

# Where each format keeps its fp16 scale(s) inside a block: random bytes there would give
# NaN/inf or absurd magnitudes, so tests put real fp16 values at these offsets (ggml-common.h).
SCALE_OFFSETS = {
    Q.Q4_0: (0,), Q.Q4_1: (0, 2), Q.Q5_0: (0,), Q.Q5_1: (0, 2), Q.Q8_0: (0,),
    Q.Q2_K: (80, 82), Q.Q3_K: (108,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,),
}  # fmt: skip
QUANTISABLE = (Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1)  # gguf.quants.quantize supports these


def random_blocks(rows: int, cols: int, qtype: Q, seed: int, magnitude: float) -> np.ndarray:
    """Random quantised rows (for the K-quants, which gguf cannot quantise), scales of `magnitude`."""
    weights, nbytes = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(rows, cols // weights, nbytes), dtype=np.uint8)
    for offset in SCALE_OFFSETS[qtype]:
        scale = rng.uniform(-magnitude, magnitude, size=blocks.shape[:2]).astype(np.float16)
        blocks[..., offset : offset + 2] = scale.view(np.uint8).reshape(*blocks.shape[:2], 2)
    return blocks.reshape(rows, -1)


def write_flux_gguf(
    path: Path, bfl: dict[str, torch.Tensor], qtype: Q, prefix: str = "", random_k_seed: int | None = None
) -> dict[str, torch.Tensor]:
    """Write `bfl` as a city96-style GGUF; returns the weights the file holds, dequantised by gguf.

    For the quants gguf can write, the block weights are quantised from `bfl`; otherwise (or with
    `random_k_seed`) they are random blocks of the same shape, scaled to `bfl`'s magnitude.
    """
    writer = gguf.GGUFWriter(str(path), arch="flux")
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    held: dict[str, torch.Tensor] = {}
    for i, (key, tensor) in enumerate(sorted(bfl.items())):
        data = tensor.float().numpy()
        block_linear = data.ndim == 2 and key.startswith(("double_blocks.", "single_blocks."))
        if not block_linear:
            writer.add_tensor(prefix + key, data)
            held[key] = tensor.float()
            continue
        if qtype in QUANTISABLE and random_k_seed is None:
            raw = gguf.quants.quantize(data, qtype)
        else:
            weights = gguf.GGML_QUANT_SIZES[qtype][0]
            magnitude = float(np.abs(data).max()) / (32 if weights == 32 else 1000)
            raw = random_blocks(*data.shape, qtype, (random_k_seed or 0) + i, magnitude)
        writer.add_tensor(prefix + key, raw, raw_dtype=qtype)
        held[key] = torch.from_numpy(gguf.quants.dequantize(raw, qtype).copy()).reshape(data.shape)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return held
