"""The FLUX autoencoder (VAE), with the parameter names of BFL's ``ae.safetensors``.

The architecture follows black-forest-labs/flux ``modules/autoencoder.py``: an LDM-style
encoder/decoder with one single-head attention block in the middle, 8x spatial downsampling,
16 latent channels and no quant convs. Keeping BFL's key layout means ``ae.safetensors`` loads
unchanged (``vae_checkpoint.py`` reads it, and converts a diffusers ``vae/`` folder key by key).

The numerics match diffusers' ``AutoencoderKL``: GroupNorm with eps 1e-6, SiLU, attention as
``softmax(q k^T / sqrt(C)) v`` over the H*W positions, and the encoder returns the *mean* of the
latent distribution, so encoding is deterministic.

Two decode options exist for equirectangular panoramas, whose left and right edges are the
same meridian:

* ``decode(z, wrap=True)``: every 3x3 conv of the decoder pads circularly along the width (zeros
  along the height), so the decoder sees the panorama as a cylinder and cannot draw a seam.
  Decoding a latent rolled by k columns gives the image rolled by 8k pixels.
* ``decode_tiled(z, tile, wrap)``: the same result computed tile by tile with bounded memory
  (``vae_tiling.py`` says how), for 8-12 GB cards at 2048x1024.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from .vae_tiling import decode_upsampling_tiled


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

        Everything at the latent resolution (conv_in, the mid block with its global attention,
        the lowest level's resnets) runs whole: it is small (512 x 128 x 256 at 2048x1024, 64 MB
        in fp32) and the attention needs every position anyway. The upsampling path after it
        runs tile by tile, exactly (see ``vae_tiling.py``).
        """
        h = self.mid(_conv3x3(self.conv_in, z, wrap), wrap)
        lowest = self.up[-1]
        for block in lowest.block:
            h = block(h, wrap)
        if not hasattr(lowest, "upsample"):  # a single-level decoder: nothing left to upsample
            return _conv3x3(self.conv_out, F.silu(self.norm_out(h)), wrap)
        return decode_upsampling_tiled(self, h, (z.shape[-2], z.shape[-1]), tile, wrap)


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
        the whole map and tiles read their full receptive field, see ``vae_tiling.py``),
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
