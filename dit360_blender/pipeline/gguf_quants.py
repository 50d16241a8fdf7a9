"""GGML block quantisation, dequantised in torch on whatever device holds the bytes.

A quantised GGUF tensor is stored row by row as blocks of bytes; each block encodes 32 (legacy
quants) or 256 (K-quants) consecutive weights of a row. Every function here takes the blocks as a
uint8 tensor (n_blocks, block_bytes) and returns float32 (n_blocks, block_weights), vectorised
over all blocks, so the GPU does a whole layer in a few kernels. Layouts follow GGML's block
structs (ggml-common.h): fp16 scales little-endian at the offsets noted per type.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

QK_K = 256  # weights per K-quant super-block


def _f16(b: Tensor) -> Tensor:
    """(n, 2k) little-endian fp16 bytes -> (n, k) float32."""
    return b.contiguous().view(torch.float16).float()


def _shifts(*values: int, device: torch.device) -> Tensor:
    return torch.tensor(values, dtype=torch.uint8, device=device)


def _nibbles(qs: Tensor) -> Tensor:
    """(..., k) bytes -> (..., 2k): the k low nibbles, then the k high nibbles."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=-1)


def _bits(b: Tensor, count: int) -> Tensor:
    """(n, k) bytes -> (n, count, k): bit i of every byte in row i (i < count)."""
    return (b.unsqueeze(1) >> _shifts(*range(count), device=b.device).view(1, count, 1)) & 1


def _q8_0(b: Tensor) -> Tensor:  # d: f16 | qs: int8[32]
    return _f16(b[:, :2]) * b[:, 2:].contiguous().view(torch.int8).float()


def _q4_0(b: Tensor) -> Tensor:  # d | qs[16]: weight j low nibble of qs[j], weight 16+j high nibble
    return _f16(b[:, :2]) * (_nibbles(b[:, 2:]).float() - 8)


def _q4_1(b: Tensor) -> Tensor:  # d | m | qs[16]
    return _f16(b[:, :2]) * _nibbles(b[:, 4:]).float() + _f16(b[:, 2:4])


def _q5_high(qh: Tensor) -> Tensor:
    """qh: 4 bytes = one little-endian uint32 whose bit j is the 5th bit of weight j."""
    return _bits(qh, 8).transpose(1, 2).reshape(qh.shape[0], 32)


def _q5_0(b: Tensor) -> Tensor:  # d | qh[4] | qs[16]
    q = _nibbles(b[:, 6:]) | (_q5_high(b[:, 2:6]) << 4)
    return _f16(b[:, :2]) * (q.float() - 16)


def _q5_1(b: Tensor) -> Tensor:  # d | m | qh[4] | qs[16]
    q = _nibbles(b[:, 8:]) | (_q5_high(b[:, 4:8]) << 4)
    return _f16(b[:, :2]) * q.float() + _f16(b[:, 2:4])


def _k_scales_mins(s: Tensor) -> tuple[Tensor, Tensor]:
    """Q4_K/Q5_K: 12 bytes packing 8 six-bit scales and 8 six-bit mins."""
    a, m, c = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    scales = torch.cat([a & 63, (c & 0x0F) | ((a >> 6) << 4)], dim=1)
    mins = torch.cat([m & 63, (c >> 4) | ((m >> 6) << 4)], dim=1)
    return scales.float(), mins.float()


def _per_sub_block(values: Tensor, factor: Tensor, offset: Tensor | None = None) -> Tensor:
    """Weights (n, 256) times a per-sub-block factor (n, s), minus a per-sub-block offset."""
    n, subs = factor.shape
    out = values.view(n, subs, -1) * factor.unsqueeze(-1)
    if offset is not None:
        out = out - offset.unsqueeze(-1)
    return out.reshape(n, QK_K)


def _k_low_2bit(qs: Tensor) -> Tensor:
    """Q2_K/Q3_K: 64 bytes, two halves of 32; weight h*128 + j*32 + l is bits 2j..2j+1 of qs[h*32 + l]."""
    n = qs.shape[0]
    shifted = qs.view(n, 2, 1, 32) >> _shifts(0, 2, 4, 6, device=qs.device).view(1, 1, 4, 1)
    return (shifted & 3).reshape(n, QK_K)


def _q2_k(b: Tensor) -> Tensor:  # scales[16] (4-bit scale | 4-bit min) | qs[64] | d | dmin
    scales, d, dmin = b[:, :16], _f16(b[:, 80:82]), _f16(b[:, 82:84])
    q = _k_low_2bit(b[:, 16:80]).float()
    return _per_sub_block(q, d * (scales & 0x0F).float(), dmin * (scales >> 4).float())


def _q3_k_scales(s: Tensor) -> Tensor:
    """12 bytes packing 16 six-bit scales (offset 32): low 4 bits in bytes 0-7, high 2 in bytes 8-11."""
    low = _nibbles(s[:, :8])
    high = (s[:, 8:12].unsqueeze(1) >> _shifts(0, 2, 4, 6, device=s.device).view(1, 4, 1)) & 3
    return (low | (high.reshape(-1, 16) << 4)).float() - 32


def _q3_k(b: Tensor) -> Tensor:  # hmask[32] | qs[64] | scales[12] | d
    n = b.shape[0]
    high_clear = 1 - _bits(b[:, :32], 8).reshape(n, QK_K)  # a clear bit subtracts 4
    q = _k_low_2bit(b[:, 32:96]).float() - 4 * high_clear.float()
    return _per_sub_block(q, _f16(b[:, 108:110]) * _q3_k_scales(b[:, 96:108]))


def _q4_k(
    b: Tensor,
) -> Tensor:  # d | dmin | scales[12] | qs[128]: 4 chunks of 32 bytes, low then high nibbles
    n = b.shape[0]
    scales, mins = _k_scales_mins(b[:, 4:16])
    q = _nibbles(b[:, 16:].view(n, 4, 32)).reshape(n, QK_K).float()
    return _per_sub_block(q, _f16(b[:, :2]) * scales, _f16(b[:, 2:4]) * mins)


def _q5_k(
    b: Tensor,
) -> Tensor:  # d | dmin | scales[12] | qh[32] | qs[128]; bit i of qh[l]: 5th bit of sub-block i
    n = b.shape[0]
    scales, mins = _k_scales_mins(b[:, 4:16])
    low = _nibbles(b[:, 48:].view(n, 4, 32)).reshape(n, QK_K)
    q = (low | (_bits(b[:, 16:48], 8).reshape(n, QK_K) << 4)).float()
    return _per_sub_block(q, _f16(b[:, :2]) * scales, _f16(b[:, 2:4]) * mins)


def _q6_k(b: Tensor) -> Tensor:  # ql[128] | qh[64] | scales: int8[16] | d
    n = b.shape[0]
    low = _nibbles(b[:, :128].view(n, 2, 64))  # per half: low nibbles of 64 bytes, then high nibbles
    qh = b[:, 128:192].view(n, 2, 1, 32) >> _shifts(0, 2, 4, 6, device=b.device).view(1, 1, 4, 1)
    q = (low | ((qh & 3).reshape(n, 2, 128) << 4)).reshape(n, QK_K).float() - 32
    scales = b[:, 192:208].contiguous().view(torch.int8).float()
    return _per_sub_block(q, _f16(b[:, 208:210]) * scales)


@dataclass(frozen=True)
class BlockFormat:
    name: str
    weights: int  # per block
    nbytes: int  # per block
    decode: Callable[[Tensor], Tensor]


# Keyed by GGML's type number (GGMLQuantizationType), as stored in the GGUF tensor info.
FORMATS: dict[int, BlockFormat] = {
    2: BlockFormat("Q4_0", 32, 18, _q4_0),
    3: BlockFormat("Q4_1", 32, 20, _q4_1),
    6: BlockFormat("Q5_0", 32, 22, _q5_0),
    7: BlockFormat("Q5_1", 32, 24, _q5_1),
    8: BlockFormat("Q8_0", 32, 34, _q8_0),
    10: BlockFormat("Q2_K", QK_K, 84, _q2_k),
    11: BlockFormat("Q3_K", QK_K, 110, _q3_k),
    12: BlockFormat("Q4_K", QK_K, 144, _q4_k),
    13: BlockFormat("Q5_K", QK_K, 176, _q5_k),
    14: BlockFormat("Q6_K", QK_K, 210, _q6_k),
}


def dequantize(
    data: Tensor, qtype: int, shape: tuple[int, ...], dtype: torch.dtype = torch.float32
) -> Tensor:
    """uint8 rows of blocks (rows, bytes per row) -> the weights of ``shape`` in ``dtype``."""
    fmt = FORMATS[qtype]
    values = fmt.decode(data.reshape(-1, fmt.nbytes))
    return values.reshape(shape).to(dtype)
