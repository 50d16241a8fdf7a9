"""The FLUX autoencoder (VAE), with the parameter names of BFL's ``ae.safetensors``.

The architecture follows black-forest-labs/flux ``modules/autoencoder.py``: an LDM-style
encoder/decoder with one single-head attention block in the middle, 8x spatial downsampling,
16 latent channels and no quant convs. Keeping BFL's key layout means ``ae.safetensors`` loads
unchanged; a diffusers ``vae/`` folder is converted key by key (``convert_diffusers_vae_to_bfl``).

The numerics match diffusers' ``AutoencoderKL``: GroupNorm with eps 1e-6, SiLU, attention as
``softmax(q k^T / sqrt(C)) v`` over the H*W positions, and the encoder returns the *mean* of the
latent distribution, so encoding is deterministic.

Two decode options exist for equirectangular panoramas, whose left and right edges are the
same meridian:

* ``decode(z, wrap=True)``: every 3x3 conv of the decoder pads circularly along the width (zeros
  along the height), so the decoder sees the panorama as a cylinder and cannot draw a seam.
  Decoding a latent rolled by k columns gives the image rolled by 8k pixels.
* ``decode_tiled(z, tile, wrap)``: the same result computed tile by tile with bounded memory
  (see ``Decoder.forward_tiled``), for 8-12 GB cards at 2048x1024.
"""

from __future__ import annotations

import json
import re
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from .errors import BadCheckpointError, WeightsMissingError
from .safetensors_io import open_safetensors


@dataclass
class AutoEncoderParams:
    """Shape of the autoencoder; the defaults are those of FLUX.1 (dev and schnell)."""

    resolution: int = 256  # informative only (BFL keeps it); the network is fully convolutional
    in_channels: int = 3
    ch: int = 128
    out_ch: int = 3
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 16
    scale_factor: float = 0.3611
    shift_factor: float = 0.1159
    norm_groups: int = 32


FLUX_DEV_AE = AutoEncoderParams(
    resolution=256,
    in_channels=3,
    ch=128,
    out_ch=3,
    ch_mult=(1, 2, 4, 4),
    num_res_blocks=2,
    z_channels=16,
    scale_factor=0.3611,
    shift_factor=0.1159,
    norm_groups=32,
)

_EXPECTED_LAYOUT = (
    "a FLUX autoencoder: either BFL's ae.safetensors (keys like 'encoder.conv_in.weight', "
    "'decoder.up.0.block.0.conv1.weight', 'decoder.mid.attn_1.q.weight') or a diffusers vae/ folder "
    "(config.json + diffusion_pytorch_model.safetensors)"
)


# --------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=groups, num_channels=channels, eps=1e-6, affine=True)


def _conv3x3(conv: nn.Conv2d, x: Tensor, wrap: bool) -> Tensor:
    """A 3x3 / padding-1 conv, padded circularly along the width when ``wrap`` is on.

    With ``wrap`` off this is exactly ``conv(x)`` (the checkpoint's zero padding, bit for bit).
    With it on, the height is still zero-padded but the width wraps around. The conv's module
    and parameter names stay untouched, so ``ae.safetensors`` loads the same either way.
    """
    if not wrap:
        return conv(x)
    if x.shape[-1] < 3:  # too narrow for the edge strips below; tiny maps only
        x = torch.cat((x[..., -1:], x, x[..., :1]), dim=-1)
        return F.conv2d(x, conv.weight, conv.bias, stride=conv.stride, padding=(1, 0))
    # Gluing wrap columns onto the whole map would copy it (an extra full-resolution map at
    # the decoder's peak). Zero padding already gives every column but the first and the last,
    # so only those two are recomputed, from a 6-column strip: (last, 0, 1 | -2, last, 0).
    out = conv(x)
    strip = torch.cat((x[..., -1:], x[..., :2], x[..., -2:], x[..., :1]), dim=-1)
    edges = F.conv2d(strip, conv.weight, conv.bias, stride=conv.stride, padding=(1, 0))
    out[..., :1] = edges[..., :1]
    out[..., -1:] = edges[..., -1:]  # the two middle outputs straddle the strips: unused
    return out


class ResnetBlock(nn.Module):
    """Two (GroupNorm, SiLU, 3x3 conv) stages plus a skip; a 1x1 conv on the skip when C changes."""

    def __init__(self, in_channels: int, out_channels: int, groups: int) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.norm1 = _norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.norm2 = _norm(out_channels, groups)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=1, padding=0)

    def forward(self, x: torch.Tensor, wrap: bool = False) -> torch.Tensor:
        h = _conv3x3(self.conv1, F.silu(self.norm1(x)), wrap)
        h = _conv3x3(self.conv2, F.silu(self.norm2(h)), wrap)
        if self.in_channels != self.out_channels:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all H*W positions; q/k/v/out are 1x1 convs (BFL layout).

    Above ``query_chunk_size`` positions the queries are processed in chunks against all keys.
    That is exact (each query's softmax runs over every key) and bounds the score matrix of
    SDPA's math fallback: at 2048x1024 the latent has 32,768 positions and the head dimension
    is 512, above the flash/cuDNN limit, so an unchunked math path would materialise a
    32768^2 matrix (2.1 GB in bf16); 4096 queries at a time hold an eighth of it.
    """

    query_chunk_size: int = 4096

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.norm = _norm(channels, groups)
        self.q = nn.Conv2d(channels, channels, kernel_size=1)
        self.k = nn.Conv2d(channels, channels, kernel_size=1)
        self.v = nn.Conv2d(channels, channels, kernel_size=1)
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, _, height, width = x.shape
        h = self.norm(x)
        # One head of dimension C: (b, 1, h*w, c). SDPA's default scale is 1/sqrt(C).
        q, k, v = (rearrange(proj(h), "b c h w -> b 1 (h w) c") for proj in (self.q, self.k, self.v))
        chunk = max(1, int(self.query_chunk_size))
        if q.shape[2] <= chunk:
            h = F.scaled_dot_product_attention(q, k, v)
        else:
            h = torch.empty_like(q)
            for start in range(0, q.shape[2], chunk):
                h[:, :, start : start + chunk] = F.scaled_dot_product_attention(
                    q[:, :, start : start + chunk], k, v
                )
        h = rearrange(h, "b 1 (h w) c -> b c h w", h=height, w=width)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    """Stride-2 3x3 conv after padding one zero row/column at the bottom/right only.

    The asymmetric pad is what the checkpoint was trained with; a symmetric padding=1 would
    shift every latent by half a pixel.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling followed by a 3x3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: torch.Tensor, wrap: bool = False) -> torch.Tensor:
        # Nearest 2x upsampling commutes with rolling the width by whole pixels, so only the
        # conv needs to know about the wrap.
        return _conv3x3(self.conv, F.interpolate(x, scale_factor=2.0, mode="nearest"), wrap)


class _MidBlock(nn.Module):
    """ResnetBlock, attention, ResnetBlock at the lowest resolution (keys ``mid.*``)."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, groups)
        self.attn_1 = AttnBlock(channels, groups)
        self.block_2 = ResnetBlock(channels, channels, groups)

    def forward(self, x: torch.Tensor, wrap: bool = False) -> torch.Tensor:
        # The attention is global (a set operation over all positions), so it is wrap-agnostic.
        return self.block_2(self.attn_1(self.block_1(x, wrap)), wrap)


class Encoder(nn.Module):
    """Image (in_channels) -> 2*z_channels moments (mean, logvar) at 1/2^(levels-1) resolution."""

    def __init__(self, p: AutoEncoderParams) -> None:
        super().__init__()
        g = p.norm_groups
        levels = len(p.ch_mult)
        self.conv_in = nn.Conv2d(p.in_channels, p.ch, kernel_size=3, stride=1, padding=1)

        self.down = nn.ModuleList()
        block_in = p.ch
        for i, mult in enumerate(p.ch_mult):
            level = nn.Module()
            level.block = nn.ModuleList()
            block_out = p.ch * mult
            for _ in range(p.num_res_blocks):
                level.block.append(ResnetBlock(block_in, block_out, g))
                block_in = block_out
            if i != levels - 1:
                level.downsample = Downsample(block_in)
            self.down.append(level)

        self.mid = _MidBlock(block_in, g)
        self.norm_out = _norm(block_in, g)
        self.conv_out = nn.Conv2d(block_in, 2 * p.z_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            for block in level.block:
                h = block(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """z_channels latent -> image; num_res_blocks+1 blocks per level.

    ``up`` is indexed by level like the encoder's ``down`` (``up.0`` is the full-resolution
    level, run last), which is why diffusers' ``up_blocks`` appear in reverse order.
    """

    def __init__(self, p: AutoEncoderParams) -> None:
        super().__init__()
        g = p.norm_groups
        block_in = p.ch * p.ch_mult[-1]
        self.conv_in = nn.Conv2d(p.z_channels, block_in, kernel_size=3, stride=1, padding=1)
        self.mid = _MidBlock(block_in, g)

        levels: list[nn.Module] = []
        for i in reversed(range(len(p.ch_mult))):
            level = nn.Module()
            level.block = nn.ModuleList()
            block_out = p.ch * p.ch_mult[i]
            for _ in range(p.num_res_blocks + 1):
                level.block.append(ResnetBlock(block_in, block_out, g))
                block_in = block_out
            if i != 0:
                level.upsample = Upsample(block_in)
            levels.insert(0, level)
        self.up = nn.ModuleList(levels)

        self.norm_out = _norm(block_in, g)
        self.conv_out = nn.Conv2d(block_in, p.out_ch, kernel_size=3, stride=1, padding=1)

    def forward(self, z: torch.Tensor, wrap: bool = False) -> torch.Tensor:
        h = self.mid(_conv3x3(self.conv_in, z, wrap), wrap)
        for level in reversed(self.up):
            for block in level.block:
                h = block(h, wrap)
            if hasattr(level, "upsample"):
                h = level.upsample(h, wrap)
        return _conv3x3(self.conv_out, F.silu(self.norm_out(h)), wrap)

    def forward_tiled(self, z: Tensor, tile: int, wrap: bool) -> Tensor:
        """``forward(z, wrap)`` computed over tiles of ``tile`` x ``tile`` latent pixels, with bounded memory.

        A plain tiled decode is not exact: every GroupNorm uses statistics of the whole feature
        map, and the mid attention is global. Here:

        * everything at the latent resolution (conv_in, the mid block with its attention, the
          first level's resnets) runs whole: it is small (512 x 128 x 256 at 2048x1024, 64 MB in
          fp32) and the attention needs every position anyway;
        * the upsampling path is split into segments at the resnet outputs whose resolution is
          below the output's, which are stored whole; nothing at the output resolution is, so at
          2048x1024 the largest stored maps are 256 x 512 x 1024 (512 MB fp32, 256 MB bf16), at
          most two at a time, next to one tile's working set;
        * inside a segment, each GroupNorm's per-group mean and variance are gathered in a pass
          over all tiles that recomputes the segment up to that norm (the earlier norms of the
          segment applying their already-gathered statistics), then a last pass writes the
          segment's output. A tile reads a halo of the stored input equal to the receptive
          field of what it computes, runs its 3x3 convs "valid" inside the map and zero-padded
          only at the map's true borders, so every tile is exact and no blending is needed.
          With ``wrap`` the halo of the left/right tiles comes from the opposite edge and no
          column is a border.

        The price is recomputation, about 3.4x the untiled FLOPs at FLUX's shape (estimated; the
        last segment, the upsample into the output resolution plus its 7 norms, is recomputed for
        each norm). Measured on CPU in fp32: 2.4x the time at 512x1024 with 8 tiles.
        """
        h = self.mid(_conv3x3(self.conv_in, z, wrap), wrap)
        lowest = self.up[-1]
        for block in lowest.block:
            h = block(h, wrap)
        if not hasattr(lowest, "upsample"):  # a single-level decoder: nothing left to upsample
            return _conv3x3(self.conv_out, F.silu(self.norm_out(h)), wrap)

        latent_hw = (z.shape[-2], z.shape[-1])
        scale = 1  # resolution of h relative to the latent
        for segment in _tiled_segments(self):
            h = _run_segment(segment, h, scale, latent_hw, tile, wrap)
            scale = segment.out_scale
        return h


# --------------------------------------------------------------------------------------------
# Exact tiled decoding (Decoder.forward_tiled)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Op:
    """One step of the decoder's upsampling path, flattened so a tile can stop before any norm.

    kind: "conv" (3x3, padding 1), "norm" (GroupNorm then SiLU), "up" (nearest 2x),
    "push" (remember the input of a resnet block) or "add" (the block's skip, through
    ``module``, a 1x1 nin_shortcut, when there is one).
    """

    kind: str
    module: nn.Module | None = None


@dataclass
class _Segment:
    """Ops from one stored feature map to the next; ``out_scale`` is the output's resolution / latent's."""

    ops: list[_Op] = field(default_factory=list)
    out_scale: int = 1


def _resnet_ops(block: ResnetBlock) -> list[_Op]:
    shortcut = block.nin_shortcut if block.in_channels != block.out_channels else None
    return [
        _Op("push"),
        _Op("norm", block.norm1),
        _Op("conv", block.conv1),
        _Op("norm", block.norm2),
        _Op("conv", block.conv2),
        _Op("add", shortcut),
    ]


def _tiled_segments(decoder: Decoder) -> list[_Segment]:
    """The decoder after its lowest level's resnets, cut where a feature map is cheap to store.

    A cut follows each resnet block whose resolution is below the output's: those maps are at
    most a quarter of the output's pixels (256 x 512 x 1024 for FLUX at 2048x1024). Maps at the
    output resolution are never stored; the last segment recomputes into them instead.
    """
    levels = list(reversed(decoder.up))  # lowest resolution first, the order they run in
    final_scale = 2 ** (len(levels) - 1)
    segments = [_Segment()]
    scale = 1
    for index, level in enumerate(levels):
        if index > 0:
            for block in level.block:
                segments[-1].ops += _resnet_ops(block)
                if scale < final_scale:
                    segments[-1].out_scale = scale
                    segments.append(_Segment())
        if hasattr(level, "upsample"):
            segments[-1].ops += [_Op("up"), _Op("conv", level.upsample.conv)]
            scale *= 2
    segments[-1].ops += [_Op("norm", decoder.norm_out), _Op("conv", decoder.conv_out)]
    segments[-1].out_scale = scale
    return [s for s in segments if s.ops]


@dataclass
class _Window:
    """The part of a full feature map that a tile tensor holds, in that map's pixels.

    Rows are always inside the map. Columns are too without wrap; with wrap they may run past
    either edge, column c meaning map column c mod width.
    """

    top: int
    bottom: int
    left: int
    right: int
    height: int
    width: int


def _input_margin(ops: list[_Op]) -> int:
    """Halo (in pixels of the segment's input) that ``ops`` need for exact output pixels."""
    margin = 0
    for op in reversed(ops):
        if op.kind == "conv":
            margin += 1
        elif op.kind == "up":
            margin = -(-margin // 2)  # an input pixel covers two output pixels
    return margin


def _conv_window(conv: nn.Module, t: Tensor, win: _Window, wrap: bool) -> tuple[Tensor, _Window]:
    """A 3x3 conv on a tile: zero padding only where the tile touches the map's true border.

    Elsewhere the conv runs "valid" and the tile loses one pixel on that side; the halo read
    by ``_run_segment`` pays for it. With wrap there is no left/right border at all.
    """
    assert isinstance(conv, nn.Conv2d) and conv.kernel_size == (3, 3) and conv.padding == (1, 1)
    pad_top, pad_bottom = int(win.top == 0), int(win.bottom == win.height)
    pad_left = pad_right = 0
    if not wrap:
        pad_left, pad_right = int(win.left == 0), int(win.right == win.width)
    if pad_top or pad_bottom or pad_left or pad_right:
        t = F.pad(t, (pad_left, pad_right, pad_top, pad_bottom))
    t = F.conv2d(t, conv.weight, conv.bias)
    return t, _Window(
        win.top + 1 - pad_top,
        win.bottom - 1 + pad_bottom,
        win.left + 1 - pad_left,
        win.right - 1 + pad_right,
        win.height,
        win.width,
    )


@dataclass
class _NormStats:
    """A GroupNorm's global statistics folded with its affine, per (batch, channel), in float32.

    ``(x - mean) * scale + bias`` is the norm: mean is the group's mean, scale the group's
    1/sqrt(var + eps) times the channel's weight. The mean is subtracted first (not folded into
    the bias) so a large mean costs no precision.
    """

    mean: Tensor  # (B, C, 1, 1)
    scale: Tensor  # (B, C, 1, 1)
    bias: Tensor  # (C, 1, 1)

    @classmethod
    def from_groups(cls, norm: nn.GroupNorm, mean: Tensor, var: Tensor) -> _NormStats:
        per_group = norm.num_channels // norm.num_groups
        mean_c = mean.float().repeat_interleave(per_group, dim=1)[:, :, None, None]
        rstd_c = torch.rsqrt(var.float() + norm.eps).repeat_interleave(per_group, dim=1)[:, :, None, None]
        return cls(mean_c, rstd_c * norm.weight.float()[:, None, None], norm.bias.float()[:, None, None])

    def apply_silu(self, t: Tensor) -> Tensor:
        """The norm then SiLU, computed in float32 (like the fused GroupNorm kernel) and cast back."""
        # one temporary of the tile's size (two in bf16), updated in place
        y = (t.float() - self.mean).mul_(self.scale).add_(self.bias)
        return F.silu(y.to(t.dtype), inplace=True)


def _run_ops(
    ops: list[_Op], t: Tensor, win: _Window, stats: dict[int, _NormStats], wrap: bool
) -> tuple[Tensor, _Window]:
    """Run ``ops`` on one tile; every norm among them must already have its statistics."""
    stack: list[tuple[Tensor, _Window]] = []
    for op in ops:
        if op.kind == "conv":
            assert op.module is not None
            t, win = _conv_window(op.module, t, win, wrap)
        elif op.kind == "norm":
            t = stats[id(op)].apply_silu(t)
        elif op.kind == "up":
            t = F.interpolate(t, scale_factor=2.0, mode="nearest")
            win = _Window(*(2 * v for v in (win.top, win.bottom, win.left, win.right, win.height, win.width)))
        elif op.kind == "push":
            stack.append((t, win))
        elif op.kind == "add":
            skip, skip_win = stack.pop()
            # the skip covers more than the conv branch (which lost its halo): crop it first,
            # so the 1x1 shortcut only runs where it is needed
            rows = slice(win.top - skip_win.top, win.bottom - skip_win.top)
            cols = slice(win.left - skip_win.left, win.right - skip_win.left)
            skip = skip[:, :, rows, cols]
            if op.module is not None:
                skip = op.module(skip)
            t = skip + t
        else:  # pragma: no cover - the op list is built in this module
            raise ValueError(f"unknown op {op.kind!r}")
    return t, win


def _tiles(height: int, width: int, tile: int) -> list[tuple[int, int, int, int]]:
    """Disjoint (top, bottom, left, right) latent rectangles covering the latent; edge tiles may be smaller."""
    return [
        (y, min(y + tile, height), x, min(x + tile, width))
        for y in range(0, height, tile)
        for x in range(0, width, tile)
    ]


def _run_segment(
    segment: _Segment, x: Tensor, in_scale: int, latent_hw: tuple[int, int], tile: int, wrap: bool
) -> Tensor:
    """The segment's output map from its (whole, stored) input map ``x``, tile by tile.

    First one pass over all tiles per GroupNorm to gather its global statistics (recomputing the
    segment up to that norm), then one pass that writes each tile's exact core into the output.
    """
    ops = segment.ops
    batch, _, height, width = x.shape
    tiles = _tiles(*latent_hw, tile)
    stats: dict[int, _NormStats] = {}

    def core(stop: int, box: tuple[int, int, int, int]) -> Tensor:
        """ops[:stop] on one tile, cropped to the tile's own pixels (no halo) at the result's resolution."""
        top, bottom, left, right = (in_scale * v for v in box)
        margin = _input_margin(ops[:stop])
        r0, r1 = max(top - margin, 0), min(bottom + margin, height)
        if wrap:
            c0, c1 = left - margin, right + margin
            columns = torch.arange(c0, c1, device=x.device) % width
            t = x[:, :, r0:r1].index_select(3, columns)
        else:
            c0, c1 = max(left - margin, 0), min(right + margin, width)
            t = x[:, :, r0:r1, c0:c1]
        t, win = _run_ops(ops[:stop], t, _Window(r0, r1, c0, c1, height, width), stats, wrap)
        s = win.height // height
        return t[:, :, s * top - win.top : s * bottom - win.top, s * left - win.left : s * right - win.left]

    for stop, op in enumerate(ops):
        if op.kind != "norm":
            continue
        norm = op.module
        assert isinstance(norm, nn.GroupNorm)
        groups = norm.num_groups
        # Per tile: count, mean and (biased) variance per (batch, group), merged with Chan's
        # formula (no E[x^2] - E[x]^2 cancellation) in float64 on the CPU: the numbers are tiny,
        # and MPS has no float64.
        counts, means, variances = [], [], []
        for box in tiles:
            t = core(stop, box)
            var, mean = torch.var_mean(t.float().reshape(batch, groups, -1), dim=-1, correction=0)
            counts.append(t[0, 0].numel() * (t.shape[1] // groups))
            means.append(mean)
            variances.append(var)
        n = torch.tensor(counts, dtype=torch.float64)[:, None, None]
        m, v = torch.stack(means).cpu().double(), torch.stack(variances).cpu().double()
        total = n.sum(0)
        mean = (n * m).sum(0) / total
        var = (n * (v + (m - mean) ** 2)).sum(0) / total
        mean, var = mean.to(x.device, torch.float32), var.to(x.device, torch.float32)
        stats[id(op)] = _NormStats.from_groups(norm, mean, var)

    out: Tensor | None = None
    s = segment.out_scale // in_scale
    for box in tiles:
        t = core(len(ops), box)
        if out is None:
            out = t.new_empty(batch, t.shape[1], s * height, s * width)
        top, bottom, left, right = (segment.out_scale * v for v in box)
        out[:, :, top:bottom, left:right] = t
    assert out is not None
    return out


class AutoEncoder(nn.Module):
    """FLUX VAE: images in [-1, 1] (NCHW) <-> scaled/shifted latents the transformer works on."""

    def __init__(self, params: AutoEncoderParams = FLUX_DEV_AE) -> None:
        super().__init__()
        self.params = params
        self.encoder = Encoder(params)
        self.decoder = Decoder(params)
        self.scale_factor = params.scale_factor
        self.shift_factor = params.shift_factor

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder.conv_in.weight.dtype

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Deterministic encode: the distribution's mean, then ``scale * (z - shift)``."""
        moments = self.encoder(x.to(self.dtype))
        mean = moments[:, : self.params.z_channels]
        return self.scale_factor * (mean - self.shift_factor)

    def decode(self, z: torch.Tensor, wrap: bool = False) -> torch.Tensor:
        """Undo the latent scaling (``z / scale + shift``) and decode to an image in about [-1, 1].

        ``wrap``: pad the decoder's convs circularly along the width, for 360-degree panoramas
        (the left and right image edges then join without a seam). Off, the decoder is exactly
        the reference one.
        """
        return self.decoder(z.to(self.dtype) / self.scale_factor + self.shift_factor, wrap)

    @torch.no_grad()
    def decode_tiled(self, z: torch.Tensor, tile: int = 64, wrap: bool = True) -> torch.Tensor:
        """``decode(z, wrap)`` with bounded memory, computed over ``tile`` x ``tile`` latent tiles.

        Equal to the untiled decode up to float rounding (GroupNorm statistics are gathered over
        the whole map and tiles read their full receptive field, see ``Decoder.forward_tiled``),
        so there is no overlap to choose and no blending. ``tile`` trades memory for speed: at
        2048x1024 (latent 128x256) the default makes 8 tiles of 512x512 output pixels. When one
        tile covers the whole latent this is simply ``decode``.
        """
        if tile < 1:
            raise ValueError(f"tile must be at least 1 latent pixel, got {tile}")
        if tile >= z.shape[-2] and tile >= z.shape[-1]:
            return self.decode(z, wrap)
        return self.decoder.forward_tiled(
            z.to(self.dtype) / self.scale_factor + self.shift_factor, tile, wrap
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))


# --------------------------------------------------------------------------------------------
# diffusers -> BFL key conversion
# --------------------------------------------------------------------------------------------

_ATTN_RENAMES = {
    "group_norm": "norm",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out.0": "proj_out",
    # names of diffusers' deprecated attention block, still found in old saved checkpoints
    "query": "q",
    "key": "k",
    "value": "v",
    "proj_attn": "proj_out",
}
_RE_DOWN = re.compile(r"^encoder\.down_blocks\.(\d+)\.(resnets|downsamplers)\.(\d+)\.(.+)$")
_RE_UP = re.compile(r"^decoder\.up_blocks\.(\d+)\.(resnets|upsamplers)\.(\d+)\.(.+)$")
_RE_MID_RESNET = re.compile(r"^(encoder|decoder)\.mid_block\.resnets\.([01])\.(.+)$")
_RE_MID_ATTN = re.compile(r"^(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)$")


def _resnet_param(rest: str) -> str:
    return rest.replace("conv_shortcut.", "nin_shortcut.", 1) if rest.startswith("conv_shortcut.") else rest


def convert_diffusers_vae_to_bfl(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a diffusers ``AutoencoderKL`` state dict to BFL's ``ae.safetensors`` layout.

    diffusers numbers the decoder's ``up_blocks`` from the lowest resolution up, BFL's ``up``
    from the highest down, so the index is reversed; the mid attention's Linear weights become
    1x1 conv weights. Keys it does not recognise are passed through unchanged, so the loader
    can report them (e.g. ``quant_conv``, which the FLUX VAE does not have).
    """
    up_indices = [int(m.group(1)) for k in state_dict if (m := _RE_UP.match(k))]
    num_up = max(up_indices) + 1 if up_indices else 0

    out: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        new_key = key
        if m := _RE_DOWN.match(key):
            level, kind, j, rest = m.groups()
            if kind == "resnets":
                new_key = f"encoder.down.{level}.block.{j}.{_resnet_param(rest)}"
            else:
                new_key = f"encoder.down.{level}.downsample.{rest}"
        elif m := _RE_UP.match(key):
            k, kind, j, rest = m.groups()
            level = num_up - 1 - int(k)
            if kind == "resnets":
                new_key = f"decoder.up.{level}.block.{j}.{_resnet_param(rest)}"
            else:
                new_key = f"decoder.up.{level}.upsample.{rest}"
        elif m := _RE_MID_RESNET.match(key):
            side, j, rest = m.groups()
            new_key = f"{side}.mid.block_{int(j) + 1}.{_resnet_param(rest)}"
        elif (m := _RE_MID_ATTN.match(key)) and m.group(2) in _ATTN_RENAMES:
            side, name, kind = m.groups()
            new_key = f"{side}.mid.attn_1.{_ATTN_RENAMES[name]}.{kind}"
            if kind == "weight" and name != "group_norm" and tensor.ndim == 2:
                tensor = tensor.reshape(*tensor.shape, 1, 1)  # Linear (out, in) -> 1x1 conv
        elif key.startswith(("encoder.conv_norm_out.", "decoder.conv_norm_out.")):
            new_key = key.replace(".conv_norm_out.", ".norm_out.", 1)
        out[new_key] = tensor
    return out


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------

_BFL_PREFIXES = ("vae.", "first_stage_model.")
_DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"


def _is_diffusers_layout(keys: list[str]) -> bool:
    return any(
        k.startswith(("encoder.down_blocks.", "decoder.up_blocks.", "decoder.mid_block.")) for k in keys
    )


def _read_vae_tensors(files: list[Path]) -> tuple[dict[str, torch.Tensor], str]:
    """The VAE tensors of one or more safetensors files (memory-mapped), and the prefix stripped.

    In an all-in-one checkpoint (VAE under ``vae.`` or ``first_stage_model.``) only the VAE
    tensors are read, so the transformer and text encoders stored beside it cost nothing.
    """
    with ExitStack() as stack:
        handles = [stack.enter_context(open_safetensors(path)) for path in files]
        keys_per_file = [list(f.keys()) for f in handles]
        names = [key for keys in keys_per_file for key in keys]
        prefix = ""
        if not any(k.startswith(("encoder.", "decoder.")) for k in names):
            prefix = next((p for p in _BFL_PREFIXES if any(k.startswith(p + "encoder.") for k in names)), "")
        state: dict[str, torch.Tensor] = {}
        for f, keys in zip(handles, keys_per_file, strict=True):
            for key in keys:
                if key.startswith(prefix):
                    state[key[len(prefix) :]] = f.get_tensor(key)
    return state, prefix


def _params_from_diffusers_config(config_path: Path) -> AutoEncoderParams:
    """AutoEncoderParams from a diffusers ``AutoencoderKL`` config.json (checked for FLUX-compatibility)."""
    try:
        cfg = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadCheckpointError(
            f"Cannot read the VAE config {config_path}: {exc}",
            "Download the vae/ folder again (config.json is damaged).",
        ) from exc

    problems = []
    if cfg.get("use_quant_conv", True) or cfg.get("use_post_quant_conv", True):
        problems.append("it uses quant_conv/post_quant_conv (an SD-style VAE)")
    if cfg.get("act_fn", "silu") != "silu":
        problems.append(f"act_fn is {cfg.get('act_fn')!r}, not 'silu'")
    if not cfg.get("mid_block_add_attention", True):
        problems.append("its mid block has no attention")
    if any(t != "DownEncoderBlock2D" for t in cfg.get("down_block_types", [])) or any(
        t != "UpDecoderBlock2D" for t in cfg.get("up_block_types", [])
    ):
        problems.append("its block types are not DownEncoderBlock2D/UpDecoderBlock2D")
    block_out = list(cfg.get("block_out_channels", [128, 256, 512, 512]))
    ch = block_out[0]
    if any(c % ch for c in block_out):
        problems.append(f"block_out_channels {block_out} are not multiples of the first")
    if problems:
        raise BadCheckpointError(
            f"{config_path.parent} is not a FLUX-style autoencoder: " + "; ".join(problems) + ".",
            "Use the vae/ folder of black-forest-labs/FLUX.1-dev, or BFL's ae.safetensors. "
            f"Expected {_EXPECTED_LAYOUT}.",
        )
    shift = cfg.get("shift_factor")
    return AutoEncoderParams(
        resolution=int(cfg.get("sample_size", 256) or 256),
        in_channels=int(cfg.get("in_channels", 3)),
        ch=ch,
        out_ch=int(cfg.get("out_channels", 3)),
        ch_mult=tuple(c // ch for c in block_out),
        num_res_blocks=int(cfg.get("layers_per_block", 2)),
        z_channels=int(cfg.get("latent_channels", 16)),
        scale_factor=float(cfg.get("scaling_factor", FLUX_DEV_AE.scale_factor)),
        shift_factor=float(shift) if shift is not None else 0.0,
        norm_groups=int(cfg.get("norm_num_groups", 32)),
    )


def _diffusers_weight_files(folder: Path) -> list[Path]:
    single = folder / _DIFFUSERS_WEIGHTS
    if single.is_file():
        return [single]
    index = folder / (_DIFFUSERS_WEIGHTS + ".index.json")
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (OSError, ValueError, KeyError) as exc:
            raise BadCheckpointError(
                f"Cannot read the shard index {index}: {exc}", "Download the vae/ folder again."
            ) from exc
        return [folder / n for n in names]
    candidates = sorted(folder.glob("*.safetensors"))
    if len(candidates) == 1:
        return candidates
    raise WeightsMissingError(
        f"No {_DIFFUSERS_WEIGHTS} in {folder}"
        + (f" (found several candidates: {', '.join(c.name for c in candidates)})" if candidates else ""),
        "The vae/ folder must hold config.json and diffusion_pytorch_model.safetensors; download it again.",
    )


def _resolve_source(path: Path) -> tuple[list[Path], Path | None]:
    """(weight files, diffusers config.json or None) for a file, a vae/ folder or a model root."""
    if path.is_file():
        return [path], None
    if not path.exists():
        raise WeightsMissingError(
            f"VAE weights not found: {path}",
            "Point the add-on at BFL's ae.safetensors or at FLUX.1-dev's vae/ folder, "
            "or let it download the models (Preferences > Models).",
        )
    if (path / "ae.safetensors").is_file():
        return [path / "ae.safetensors"], None
    folder = path / "vae" if (path / "vae").is_dir() and not (path / "config.json").is_file() else path
    config = folder / "config.json"
    if not config.is_file():
        raise WeightsMissingError(
            f"{folder} has no config.json, so it is not a diffusers vae/ folder "
            "(and it holds no ae.safetensors).",
            "Point the add-on at BFL's ae.safetensors, or at a complete diffusers vae/ folder.",
        )
    return _diffusers_weight_files(folder), config


def _check_keys(
    state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], source: str, layout: str
) -> None:
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(
        f"{k} {tuple(state[k].shape)} (expected {tuple(expected[k].shape)})"
        for k in set(state) & set(expected)
        if state[k].shape != expected[k].shape
    )
    if not (missing or unexpected or wrong):
        return

    def few(items: list[str]) -> str:
        shown = ", ".join(items[:5])
        return shown + (f", ... ({len(items)} in all)" if len(items) > 5 else "")

    parts = []
    if unexpected:
        parts.append(f"unexpected keys: {few(unexpected)}")
    if missing:
        parts.append(f"missing keys: {few(missing)}")
    if wrong:
        parts.append(f"wrong shapes: {few(wrong)}")
    raise BadCheckpointError(
        f"{source} (read as {layout}) does not fit the FLUX autoencoder: " + "; ".join(parts) + ".",
        f"Expected {_EXPECTED_LAYOUT}. A FLUX transformer, a LoRA or an SD-style VAE will not work here.",
    )


def load_autoencoder(
    path: str | Path,
    params: AutoEncoderParams | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> AutoEncoder:
    """Load the FLUX VAE from ``ae.safetensors`` (BFL layout) or a diffusers ``vae/`` folder.

    The module is built on the meta device and the (memory-mapped) tensors are assigned into
    it, so the weights are never held twice in RAM. For a diffusers folder the shape comes from
    its config.json and ``params`` is ignored; for ``ae.safetensors`` the channel layout is read
    from the tensor shapes unless ``params`` is given (FLUX's scale/shift and 32 norm groups).
    """
    path = Path(path)
    files, config = _resolve_source(path)
    if config is not None:
        params = _params_from_diffusers_config(config)

    state, prefix = _read_vae_tensors(files)
    layout = "BFL ae.safetensors layout" + (f" with prefix '{prefix}'" if prefix else "")
    if config is not None or _is_diffusers_layout(list(state)):
        state = convert_diffusers_vae_to_bfl(state)
        layout = "diffusers AutoencoderKL layout"

    if params is None:
        params = infer_ae_params(state)
    with torch.device("meta"):
        model = AutoEncoder(params)
    _check_keys(state, model.state_dict(), str(path), layout)

    state = {k: v.to(device=device, dtype=dtype) for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    return model.requires_grad_(False).eval()


def infer_ae_params(state: dict[str, Tensor]) -> AutoEncoderParams:
    """The channel layout of a BFL-keyed VAE state dict; scale, shift and groups are FLUX's."""
    try:
        ch, in_channels = state["encoder.conv_in.weight"].shape[:2]
        levels = sorted({int(k.split(".")[2]) for k in state if k.startswith("encoder.down.")})
        ch_mult = tuple(state[f"encoder.down.{i}.block.0.conv2.weight"].shape[0] // ch for i in levels)
        blocks = {int(k.split(".")[4]) for k in state if k.startswith("encoder.down.0.block.")}
        return AutoEncoderParams(
            in_channels=in_channels,
            ch=ch,
            out_ch=state["decoder.conv_out.weight"].shape[0],
            ch_mult=ch_mult,
            num_res_blocks=len(blocks),
            z_channels=state["decoder.conv_in.weight"].shape[1],
        )
    except (KeyError, IndexError) as exc:
        raise BadCheckpointError(
            f"This file is not a FLUX VAE (no {exc}).",
            "Point the VAE setting at FLUX.1-dev's ae.safetensors or its diffusers vae/ folder.",
        ) from exc
