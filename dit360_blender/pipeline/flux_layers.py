"""FLUX.1 building blocks: rotary embeddings, attention, the double- and single-stream blocks.

Layout and parameter names follow the black-forest-labs single-file checkpoint
(`flux1-dev.safetensors`), so its keys load unchanged: q/k/v are one fused `qkv` Linear in the
double blocks, and q/k/v + the MLP input are one fused `linear1` in the single blocks.
"""

from __future__ import annotations

import math
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from .fp8 import Fp8Linear

# ---------------------------------------------------------------------------------------------
# Positions and attention


def rope_dtype(device_type: str) -> torch.dtype:
    """float64 for the angles, as the diffusers reference uses; float32 on Apple MPS, which has
    no float64 (diffusers does the same there). At our positions (< 600) float32 angles are off
    by under 1e-4 rad."""
    return torch.float32 if device_type == "mps" else torch.float64


def rope(pos: Tensor, dim: int, theta: int, device_type: str | None = None) -> Tensor:
    """Rotation matrices (…, n, dim/2, 2, 2) in float32 for positions `pos` (…, n) on one axis.

    `device_type` (default: that of `pos`) picks the precision of the angles (`rope_dtype`).
    """
    dtype = rope_dtype(device_type or pos.device.type)
    scale = torch.arange(0, dim, 2, dtype=dtype, device=pos.device) / dim
    omega = 1.0 / (theta**scale)
    angles = torch.einsum("...n,d->...nd", pos.to(dtype), omega)
    cos, sin = torch.cos(angles), torch.sin(angles)
    rot = torch.stack([cos, -sin, sin, cos], dim=-1)
    return rearrange(rot, "... n d (i j) -> ... n d i j", i=2, j=2).float()


class EmbedND(nn.Module):
    """RoPE over several id axes, e.g. (0, row, col) with axes_dim [16, 56, 56] for FLUX."""

    def __init__(self, dim: int, theta: int, axes_dim: list[int]) -> None:
        super().__init__()
        self.dim = dim
        self.theta = theta
        self.axes_dim = list(axes_dim)

    def forward(self, ids: Tensor) -> Tensor:
        n_axes = ids.shape[-1]
        emb = torch.cat([rope(ids[..., i], self.axes_dim[i], self.theta) for i in range(n_axes)], dim=-3)
        return emb.unsqueeze(1)  # (b, 1 head axis, n, dim/2, 2, 2)


def apply_rope(xq: Tensor, xk: Tensor, freqs: Tensor) -> tuple[Tensor, Tensor]:
    """Rotate interleaved pairs (x[2i], x[2i+1]) of q and k in float32."""
    xq_ = xq.float().reshape(*xq.shape[:-1], -1, 1, 2)
    xk_ = xk.float().reshape(*xk.shape[:-1], -1, 1, 2)
    xq_out = freqs[..., 0] * xq_[..., 0] + freqs[..., 1] * xq_[..., 1]
    xk_out = freqs[..., 0] * xk_[..., 0] + freqs[..., 1] * xk_[..., 1]
    return xq_out.reshape(*xq.shape).type_as(xq), xk_out.reshape(*xk.shape).type_as(xk)


_SDPA_BACKENDS: list[SDPBackend] | None = None  # None: PyTorch's own choice


def set_attention_backend(name: str, device: torch.device) -> None:
    """Pick the SDPA kernels: 'auto' prefers cuDNN on Hopper (about 2x the flash backend at our
    shapes on an H100/H200), else PyTorch's default; 'cudnn', 'flash', 'efficient', 'math' force
    an order of preference (PyTorch falls back down the list where a kernel can't run)."""
    global _SDPA_BACKENDS
    order = {
        "cudnn": [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION],
        "flash": [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH],
        "efficient": [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH],
        "math": [SDPBackend.MATH],
    }
    if name == "auto":
        hopper = device.type == "cuda" and torch.cuda.get_device_capability(device)[0] == 9
        name = "cudnn" if hopper else "default"
    if name == "default":
        _SDPA_BACKENDS = None
        return
    if name not in order:
        raise ValueError(f"Unknown attention backend {name!r}; choose auto, default, {', '.join(order)}.")
    _SDPA_BACKENDS = order[name] + ([SDPBackend.MATH] if SDPBackend.MATH not in order[name] else [])


def sdpa_context() -> AbstractContextManager:
    """The chosen SDPA preference, entered around the blocks (outside any compiled region)."""
    return nullcontext() if _SDPA_BACKENDS is None else sdpa_kernel(_SDPA_BACKENDS, set_priority=True)


def attention(q: Tensor, k: Tensor, v: Tensor, pe: Tensor) -> Tensor:
    """Full (non-causal, unmasked) attention with RoPE; q, k, v are (b, heads, n, head_dim)."""
    q, k = apply_rope(q, k, pe)
    # Dense (b, h, n, d) inputs: cuDNN's fastest kernels want them, and it keeps compiled code
    # from handing SDPA a permuted layout.
    x = F.scaled_dot_product_attention(q.contiguous(), k.contiguous(), v.contiguous())
    return rearrange(x, "b h n d -> b n (h d)")


def timestep_embedding(t: Tensor, dim: int, max_period: int = 10000, time_factor: float = 1000.0) -> Tensor:
    """Sinusoidal embedding of t in [0, 1] (scaled by 1000), cosines first then sines."""
    t = time_factor * t
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding.to(t.dtype) if torch.is_floating_point(t) else embedding


# ---------------------------------------------------------------------------------------------
# Small modules


class MLPEmbedder(nn.Module):
    def __init__(self, in_dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden_dim, bias=True)
        self.silu = nn.SiLU()
        self.out_layer = nn.Linear(hidden_dim, hidden_dim, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.out_layer(self.silu(self.in_layer(x)))


class RMSNorm(nn.Module):
    """RMSNorm computed in float32; the learnable weight is called `scale` in BFL checkpoints."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        x_dtype = x.dtype
        x = x.float()
        rrms = torch.rsqrt(torch.mean(x**2, dim=-1, keepdim=True) + 1e-6)
        return (x * rrms).to(dtype=x_dtype) * self.scale.to(x_dtype)


class QKNorm(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.query_norm = RMSNorm(dim)
        self.key_norm = RMSNorm(dim)

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        return self.query_norm(q).to(v), self.key_norm(k).to(v)


class SelfAttention(nn.Module):
    """Holds the fused qkv projection, the per-head q/k norms and the output projection."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.norm = QKNorm(dim // num_heads)
        self.proj = nn.Linear(dim, dim)


@dataclass
class ModulationOut:
    shift: Tensor
    scale: Tensor
    gate: Tensor

    def apply(self, x: Tensor) -> Tensor:
        return (1 + self.scale) * x + self.shift


class Modulation(nn.Module):
    """adaLN parameters (shift, scale, gate) from the conditioning vector, once or twice."""

    def __init__(self, dim: int, double: bool) -> None:
        super().__init__()
        self.multiplier = 6 if double else 3
        self.lin = nn.Linear(dim, self.multiplier * dim, bias=True)

    def forward(self, vec: Tensor) -> tuple[ModulationOut, ModulationOut | None]:
        out = self.lin(F.silu(vec))[:, None, :].chunk(self.multiplier, dim=-1)
        first = ModulationOut(*out[:3])
        second = ModulationOut(*out[3:]) if self.multiplier == 6 else None
        return first, second


def _layer_norm(dim: int) -> nn.LayerNorm:
    return nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)


def _clip_fp16(x: Tensor) -> Tensor:
    """fp16 overflows to inf in the text stream of late blocks; clamp as the reference does."""
    return x.clamp(-65504, 65504) if x.dtype == torch.float16 else x


def _gelu_linear(linear: nn.Module, first: Tensor | None, second: Tensor) -> Tensor:
    """linear(cat(first, gelu_tanh(second))) along the last axis: fp8 layers quantise that input
    in one fused kernel where they can (fp8.py, fp8_fused.py)."""
    if isinstance(linear, Fp8Linear):
        return linear.forward_gelu(first, second)
    x = F.gelu(second, approximate="tanh")
    return linear(x if first is None else torch.cat((first, x), dim=-1))


def _mlp(mlp: nn.Sequential, x: Tensor) -> Tensor:
    """The double blocks' Sequential(Linear, GELU(tanh), Linear), its keys kept for the checkpoint."""
    return _gelu_linear(mlp[2], None, mlp[0](x))


def _split_heads(qkv: Tensor, num_heads: int) -> tuple[Tensor, Tensor, Tensor]:
    q, k, v = rearrange(qkv, "b n (three h d) -> three b h n d", three=3, h=num_heads)
    return q, k, v


# ---------------------------------------------------------------------------------------------
# Transformer blocks


class DoubleStreamBlock(nn.Module):
    """Separate weights for the image and text streams, one joint attention over both."""

    # The joint attention; sequence-parallel sampling sets its own on the instance (sequence_parallel.py)
    attention_fn = staticmethod(attention)

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, qkv_bias: bool) -> None:
        super().__init__()
        mlp_hidden = int(hidden_size * mlp_ratio)
        self.num_heads = num_heads
        self.img_mod = Modulation(hidden_size, double=True)
        self.img_norm1 = _layer_norm(hidden_size)
        self.img_attn = SelfAttention(hidden_size, num_heads, qkv_bias)
        self.img_norm2 = _layer_norm(hidden_size)
        self.img_mlp = nn.Sequential(
            nn.Linear(hidden_size, mlp_hidden),
            nn.GELU(approximate="tanh"),
            nn.Linear(mlp_hidden, hidden_size),
        )
        self.txt_mod = Modulation(hidden_size, double=True)
        self.txt_norm1 = _layer_norm(hidden_size)
        self.txt_attn = SelfAttention(hidden_size, num_heads, qkv_bias)
        self.txt_norm2 = _layer_norm(hidden_size)
        self.txt_mlp = nn.Sequential(
            nn.Linear(hidden_size, mlp_hidden),
            nn.GELU(approximate="tanh"),
            nn.Linear(mlp_hidden, hidden_size),
        )

    def _qkv(self, attn: SelfAttention, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        q, k, v = _split_heads(attn.qkv(x), self.num_heads)
        q, k = attn.norm(q, k, v)
        return q, k, v

    def forward(self, img: Tensor, txt: Tensor, vec: Tensor, pe: Tensor) -> tuple[Tensor, Tensor]:
        img_mod1, img_mod2 = self.img_mod(vec)
        txt_mod1, txt_mod2 = self.txt_mod(vec)

        img_q, img_k, img_v = self._qkv(self.img_attn, img_mod1.apply(self.img_norm1(img)))
        txt_q, txt_k, txt_v = self._qkv(self.txt_attn, txt_mod1.apply(self.txt_norm1(txt)))

        # Text tokens come first in the joint sequence, matching the position ids.
        q = torch.cat((txt_q, img_q), dim=2)
        k = torch.cat((txt_k, img_k), dim=2)
        v = torch.cat((txt_v, img_v), dim=2)
        attn = self.attention_fn(q, k, v, pe=pe)
        txt_attn, img_attn = attn[:, : txt.shape[1]], attn[:, txt.shape[1] :]

        img = img + img_mod1.gate * self.img_attn.proj(img_attn)
        img = img + img_mod2.gate * _mlp(self.img_mlp, img_mod2.apply(self.img_norm2(img)))
        txt = txt + txt_mod1.gate * self.txt_attn.proj(txt_attn)
        txt = txt + txt_mod2.gate * _mlp(self.txt_mlp, txt_mod2.apply(self.txt_norm2(txt)))
        return img, _clip_fp16(txt)


class SingleStreamBlock(nn.Module):
    """One stream over cat(txt, img): attention and MLP in parallel from one fused input GEMM."""

    attention_fn = staticmethod(attention)  # see DoubleStreamBlock

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.mlp_hidden_dim = int(hidden_size * mlp_ratio)
        self.linear1 = nn.Linear(hidden_size, hidden_size * 3 + self.mlp_hidden_dim)
        self.linear2 = nn.Linear(hidden_size + self.mlp_hidden_dim, hidden_size)
        self.norm = QKNorm(hidden_size // num_heads)
        self.pre_norm = _layer_norm(hidden_size)
        self.modulation = Modulation(hidden_size, double=False)

    def forward(self, x: Tensor, vec: Tensor, pe: Tensor) -> Tensor:
        mod, _ = self.modulation(vec)
        qkv, mlp = torch.split(
            self.linear1(mod.apply(self.pre_norm(x))), [3 * self.hidden_size, self.mlp_hidden_dim], dim=-1
        )
        q, k, v = _split_heads(qkv, self.num_heads)
        q, k = self.norm(q, k, v)
        attn = self.attention_fn(q, k, v, pe=pe)
        return _clip_fp16(x + mod.gate * _gelu_linear(self.linear2, attn, mlp))


class LastLayer(nn.Module):
    """Final adaLN (shift, scale — BFL order) and the projection back to patch channels."""

    def __init__(self, hidden_size: int, out_channels: int) -> None:
        super().__init__()
        self.norm_final = _layer_norm(hidden_size)
        self.linear = nn.Linear(hidden_size, out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x: Tensor, vec: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(vec).chunk(2, dim=1)
        x = (1 + scale[:, None, :]) * self.norm_final(x) + shift[:, None, :]
        return self.linear(x)
