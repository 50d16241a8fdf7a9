"""Would fp8 attention be faithful enough? The accuracy gate of issue #13, emulated on the CPU.

    python -m dit360_blender.bench.fp8_attention_error [--tokens 4096] [--json out.json]

An fp8 attention kernel (Triton, FlashAttention-3 style) rounds Q and K (and maybe P and V) to
e4m3, which keeps 3 mantissa bits whatever the scaling; the issue adopts one only if its output is
within 1 % (relative L2) of fp32 attention on realistic activations, K's per-channel offsets
included. This computes that error without any kernel: the same roundings (per-token scales, K
smoothed by its mean over tokens as SageAttention does, P rounded as the kernel would store it),
then the attention in float32, against a float64 reference. A kernel can only add error to these
figures, so where the emulation misses the gate, no kernel can meet it. No timings; prints numbers.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0


def round_fp8(x: torch.Tensor, dim: int) -> torch.Tensor:
    """e4m3 round trip with one scale per slice along `dim` (its abs-max maps to 448)."""
    scale = x.abs().amax(dim=dim, keepdim=True).clamp(min=1e-12) / FP8_MAX
    return (x / scale).to(FP8).float() * scale


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p_dtype: str | None = None) -> torch.Tensor:
    """Softmax attention; `p_dtype` rounds the unnormalised probabilities as a flash kernel
    stores them before the P @ V product ('bf16', or 'fp8' scaled to e4m3's range)."""
    logits = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    e = torch.exp(logits - logits.amax(-1, keepdim=True))
    denominator = e.sum(-1, keepdim=True)
    if p_dtype == "bf16":
        e = e.bfloat16().to(q.dtype)
    elif p_dtype == "fp8":
        e = (e * FP8_MAX).to(FP8).to(q.dtype) / FP8_MAX
    return (e @ v) / denominator


def activations(tokens: int, heads: int, head_dim: int, logit_scale: float, seed: int) -> tuple:
    """bf16 q, k, v like a FLUX block's after its q/k RMSNorm: per-channel scales (log-normal),
    K with per-channel offsets (what smoothing removes), V with per-channel means."""
    gen = torch.Generator().manual_seed(seed)
    channel = torch.exp(0.5 * torch.randn(head_dim, generator=gen))
    q = torch.randn(heads, tokens, head_dim, generator=gen) * channel * logit_scale
    k_offset = 3.0 * torch.randn(head_dim, generator=gen)
    k = (torch.randn(heads, tokens, head_dim, generator=gen) * channel + k_offset) * logit_scale
    v = torch.randn(heads, tokens, head_dim, generator=gen) * channel + torch.randn(head_dim, generator=gen)
    return tuple(x.bfloat16().float() for x in (q, k, v))


def variants(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> dict[str, torch.Tensor]:
    k_smooth = k - k.mean(dim=1, keepdim=True)  # shifts each query's logits by a constant
    return {
        "bf16 (what cuDNN runs now)": attention(q, k, v, "bf16"),
        "fp8 Q,K per token, K smoothed, P bf16": attention(
            round_fp8(q, -1), round_fp8(k_smooth, -1), v, "bf16"
        ),
        "fp8 Q,K per token, K not smoothed, P bf16": attention(round_fp8(q, -1), round_fp8(k, -1), v, "bf16"),
        "fp8 Q,K,P,V (V per channel), K smoothed": attention(
            round_fp8(q, -1), round_fp8(k_smooth, -1), round_fp8(v, 1), "fp8"
        ),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    rows = []
    for logit_scale in (0.5, 1.0, 2.0):
        q, k, v = activations(args.tokens, args.heads, 128, logit_scale, seed=0)
        reference = attention(q.double(), k.double(), v.double())
        logit_std = ((q[:1] @ k[:1].transpose(-1, -2)) / math.sqrt(128)).std().item()
        row = {"logit_std": logit_std}
        for name, out in variants(q, k, v).items():
            out = out.bfloat16().double()  # the kernel's output dtype
            row[name] = ((out - reference).norm() / reference.norm()).item()
        rows.append(row)
        print(json.dumps({key: round(value, 5) for key, value in row.items()}), flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
