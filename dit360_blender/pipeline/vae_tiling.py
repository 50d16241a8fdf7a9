"""Exact tiled decoding of the VAE's upsampling path, with bounded memory (``Decoder.forward_tiled``).

A plain tiled decode is not exact: every GroupNorm uses statistics of the whole feature map, and
the mid attention is global. The decoder runs everything at the latent resolution whole (the
attention among it) and hands the rest to ``decode_upsampling_tiled``:

* the upsampling path is split into segments at the resnet outputs whose resolution is below the
  output's, which are stored whole; nothing at the output resolution is, so at 2048x1024 the
  largest stored maps are 256 x 512 x 1024 (512 MB fp32, 256 MB bf16), at most two at a time,
  next to one tile's working set;
* inside a segment, each GroupNorm's per-group mean and variance are gathered in a pass over all
  tiles that recomputes the segment up to that norm (the earlier norms of the segment applying
  their already-gathered statistics), then a last pass writes the segment's output. A tile reads
  a halo of the stored input equal to the receptive field of what it computes, runs its 3x3 convs
  "valid" inside the map and zero-padded only at the map's true borders, so every tile is exact
  and no blending is needed. With ``wrap`` the halo of the left/right tiles comes from the
  opposite edge and no column is a border.

The price is recomputation, about 3.4x the untiled FLOPs at FLUX's shape (estimated; the last
segment, the upsample into the output resolution plus its 7 norms, is recomputed for each norm).
Measured on CPU in fp32: 2.4x the time at 512x1024 with 8 tiles.

The decoder is read through its BFL module names (``up[i].block[j].norm1/conv1/norm2/conv2/
nin_shortcut``, ``up[i].upsample.conv``, ``norm_out``, ``conv_out``), so this module does not
import the model and the model can import it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def decode_upsampling_tiled(
    decoder: nn.Module, h: Tensor, latent_hw: tuple[int, int], tile: int, wrap: bool
) -> Tensor:
    """The image from ``h``, the output of the decoder's lowest level's resnets, tile by tile.

    ``latent_hw`` is the latent's (height, width) and ``tile`` the tile side in latent pixels.
    """
    scale = 1  # resolution of h relative to the latent
    for segment in _tiled_segments(decoder):
        h = _run_segment(segment, h, scale, latent_hw, tile, wrap)
        scale = segment.out_scale
    return h


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


def _resnet_ops(block: nn.Module) -> list[_Op]:
    shortcut = block.nin_shortcut if block.in_channels != block.out_channels else None
    return [
        _Op("push"),
        _Op("norm", block.norm1),
        _Op("conv", block.conv1),
        _Op("norm", block.norm2),
        _Op("conv", block.conv2),
        _Op("add", shortcut),
    ]


def _tiled_segments(decoder: nn.Module) -> list[_Segment]:
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
