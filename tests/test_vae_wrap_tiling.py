"""Wrap-aware and tiled VAE decoding (issues #5 and #6), on the tiny random-weight FLUX-layout VAE.

* ``decode(z, wrap=True)``: horizontally circular convs, so rolling the latent by k columns rolls
  the image by 8k pixels (no seam can appear); ``wrap=False`` is the reference decoder, bit for bit.
* ``decode_tiled``: equal to the untiled decode (wrap on and off) with a lower peak of live
  tensor memory, and it keeps the roll property.
* The mid attention's query chunking is exact.
"""

from __future__ import annotations

import weakref

import pytest
import torch
import torch.nn.functional as F
from test_parity_vae import convert_diffusers_vae_to_bfl, make_tiny_diffusers_vae, rel_err, tiny_params
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from dit360_blender.pipeline.vae_model import AutoEncoder, _conv3x3

ROLL_TOL = 1e-5
TILED_TOL = 1e-3
CHUNK_TOL = 1e-6


@pytest.fixture(scope="module")
def ae() -> AutoEncoder:
    """The tiny VAE with poisoned weights (norm affines and biases too), in BFL layout."""
    model = AutoEncoder(tiny_params())
    model.load_state_dict(convert_diffusers_vae_to_bfl(make_tiny_diffusers_vae(seed=3).state_dict()))
    return model.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def z() -> torch.Tensor:
    return torch.randn(1, 16, 16, 32, generator=torch.Generator().manual_seed(7))


def _roll_err(decode, z: torch.Tensor, k: int) -> float:  # noqa: ANN001 - any decode callable
    """Relative error between decode(roll(z, k)) and roll(decode(z), 8k) along the width."""
    return rel_err(decode(torch.roll(z, k, dims=-1)), torch.roll(decode(z), 8 * k, dims=-1))


def _reference_decode(ae: AutoEncoder, z: torch.Tensor) -> torch.Tensor:
    """The decoder as it was before the wrap option, written out with plain module calls."""
    d = ae.decoder

    def resnet(block: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        h = block.conv1(F.silu(block.norm1(x)))
        h = block.conv2(F.silu(block.norm2(h)))
        return (block.nin_shortcut(x) if block.in_channels != block.out_channels else x) + h

    def attn(a: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        b, c, height, width = x.shape
        h = a.norm(x)
        q, k, v = (p(h).reshape(b, 1, c, height * width).transpose(-1, -2) for p in (a.q, a.k, a.v))
        h = F.scaled_dot_product_attention(q, k, v).transpose(-1, -2).reshape(b, c, height, width)
        return x + a.proj_out(h)

    h = d.conv_in(z.to(ae.dtype) / ae.scale_factor + ae.shift_factor)
    h = resnet(d.mid.block_2, attn(d.mid.attn_1, resnet(d.mid.block_1, h)))
    for level in reversed(d.up):
        for block in level.block:
            h = resnet(block, h)
        if hasattr(level, "upsample"):
            h = level.upsample.conv(F.interpolate(h, scale_factor=2.0, mode="nearest"))
    return d.conv_out(F.silu(d.norm_out(h)))


# --------------------------------------------------------------------------------------------
# Wrap-aware untiled decode
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def test_wrap_off_is_the_reference_decoder(ae: AutoEncoder, z: torch.Tensor) -> None:
    ref = _reference_decode(ae, z)
    assert torch.equal(ae.decode(z), ref)
    assert torch.equal(ae.decode(z, wrap=False), ref)
    # and the wrap really changes something (near the left/right edges)
    assert rel_err(ae.decode(z, wrap=True), ref) > 1e-2


@torch.no_grad()
@pytest.mark.parametrize("width", [1, 2, 3, 4, 9])
def test_wrap_conv_is_a_circular_conv(width: int) -> None:
    """The wrap conv (zero-padded conv + recomputed edge columns) equals a conv on a circularly
    padded input, including maps too narrow for the edge strips."""
    conv = torch.nn.Conv2d(4, 5, kernel_size=3, padding=1)
    x = torch.randn(2, 4, 6, width, generator=torch.Generator().manual_seed(width))
    ref = F.conv2d(F.pad(F.pad(x, (1, 1, 0, 0), mode="circular"), (0, 0, 1, 1)), conv.weight, conv.bias)
    out = _conv3x3(conv, x, wrap=True)
    assert out.shape == ref.shape
    assert rel_err(out, ref) <= 1e-6
    assert torch.equal(_conv3x3(conv, x, wrap=False), conv(x))


@torch.no_grad()
@pytest.mark.parametrize("k", [1, 5, 16, 31])
def test_wrap_decode_commutes_with_horizontal_roll(ae: AutoEncoder, z: torch.Tensor, k: int) -> None:
    err = _roll_err(lambda lat: ae.decode(lat, wrap=True), z, k)
    print(f"wrap decode, roll {k}: rel err {err:.2e}")
    assert err <= ROLL_TOL
    # without the wrap the decoder sees an edge where the rolled latent has none
    assert _roll_err(ae.decode, z, k) > 1e-2


# --------------------------------------------------------------------------------------------
# Tiled decode
# --------------------------------------------------------------------------------------------


@torch.no_grad()
@pytest.mark.parametrize("wrap", [False, True])
@pytest.mark.parametrize(
    ("shape", "tile"),
    [
        ((1, 16, 16, 32), 3),  # divides neither side
        ((1, 16, 16, 32), 7),
        ((1, 16, 16, 32), 16),  # one row of two tiles: the halo crosses the wrap
        ((2, 16, 13, 30), 6),  # odd latent size, batch of two (per-sample statistics)
    ],
)
def test_tiled_equals_untiled(ae: AutoEncoder, wrap: bool, shape: tuple[int, ...], tile: int) -> None:
    lat = torch.randn(shape, generator=torch.Generator().manual_seed(sum(shape) + tile))
    ref = ae.decode(lat, wrap=wrap)
    out = ae.decode_tiled(lat, tile=tile, wrap=wrap)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    err = rel_err(out, ref)
    print(f"tiled {shape} tile {tile} wrap {wrap}: rel err {err:.2e}")
    assert err <= TILED_TOL


@torch.no_grad()
@pytest.mark.parametrize("k", [3, 17])
def test_tiled_wrap_decode_commutes_with_horizontal_roll(ae: AutoEncoder, z: torch.Tensor, k: int) -> None:
    err = _roll_err(lambda lat: ae.decode_tiled(lat, tile=7, wrap=True), z, k)
    print(f"tiled wrap decode, roll {k}: rel err {err:.2e}")
    assert err <= TILED_TOL


@torch.no_grad()
def test_tiled_defaults_and_arguments(ae: AutoEncoder, z: torch.Tensor) -> None:
    # one tile covering the latent is the plain decode; the default is wrap on
    assert torch.equal(ae.decode_tiled(z, tile=32), ae.decode(z, wrap=True))
    assert torch.equal(ae.decode_tiled(z), ae.decode(z, wrap=True))
    with pytest.raises(ValueError, match="tile"):
        ae.decode_tiled(z, tile=0)


@torch.no_grad()
def test_tiled_bf16(ae: AutoEncoder, z: torch.Tensor) -> None:
    """In bf16 the tiled decode is as close to the fp32 decode as the untiled bf16 one is."""
    ref = ae.decode(z, wrap=True)
    half = AutoEncoder(tiny_params())
    half.load_state_dict(ae.state_dict())
    half = half.to(torch.bfloat16).eval()
    untiled, tiled = half.decode(z, wrap=True), half.decode_tiled(z, tile=7, wrap=True)
    assert tiled.dtype == torch.bfloat16
    err_untiled, err_tiled = rel_err(untiled.float(), ref), rel_err(tiled.float(), ref)
    print(f"bf16 vs fp32: untiled {err_untiled:.2e}, tiled {err_tiled:.2e}")
    assert err_tiled <= 2 * err_untiled + 1e-2


class _PeakTensorMemory(TorchDispatchMode):
    """Peak bytes of tensor storages allocated (and still alive) while the mode is active.

    Every storage an op returns is counted once until it is freed (a finalizer on its Python
    object, which torch keeps alive exactly as long as the storage). Kernel-internal scratch
    memory is not seen; feature maps, which are what tiling bounds, are.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key and key not in self.live:
                    self.live[key] = storage.nbytes()
                    self.current += storage.nbytes()
                    self.peak = max(self.peak, self.current)
                    weakref.finalize(storage, self._free, key)
        return out


@torch.no_grad()
def test_tiled_peak_memory_is_lower(ae: AutoEncoder, monkeypatch: pytest.MonkeyPatch) -> None:
    lat = torch.randn(1, 16, 16, 64, generator=torch.Generator().manual_seed(3))  # a 128x512 image
    # The tiny model has 16 channels at 1024 latent positions, so its attention scores (1024^2)
    # would outweigh its feature maps; chunk the queries so the maps decide the peak, as they do
    # at FLUX's size.
    monkeypatch.setattr(ae.decoder.mid.attn_1, "query_chunk_size", 128)
    with _PeakTensorMemory() as untiled_mem:
        ref = ae.decode(lat, wrap=True)
    with _PeakTensorMemory() as tiled_mem:
        out = ae.decode_tiled(lat, tile=8, wrap=True)
    ratio = tiled_mem.peak / untiled_mem.peak
    print(
        f"peak live tensor memory, 128x512 output: untiled {untiled_mem.peak / 2**20:.2f} MiB, "
        f"tiled (tile 8) {tiled_mem.peak / 2**20:.2f} MiB ({ratio:.2f}x)"
    )
    assert rel_err(out, ref) <= TILED_TOL
    assert ratio < 0.5


# --------------------------------------------------------------------------------------------
# Query-chunked mid attention
# --------------------------------------------------------------------------------------------


@torch.no_grad()
@pytest.mark.parametrize("chunk", [1, 7, 100, 511])
def test_chunked_attention_is_exact(
    ae: AutoEncoder, z: torch.Tensor, chunk: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    attn = ae.decoder.mid.attn_1
    x = torch.randn(2, 16, 16, 32, generator=torch.Generator().manual_seed(chunk))  # 512 positions
    ref, ref_decode = attn(x), ae.decode(z, wrap=True)
    monkeypatch.setattr(attn, "query_chunk_size", chunk)
    err = rel_err(attn(x), ref)
    err_decode = rel_err(ae.decode(z, wrap=True), ref_decode)
    print(f"chunk {chunk}: attention rel err {err:.2e}, decode rel err {err_decode:.2e}")
    assert err <= CHUNK_TOL
    # the decoder amplifies the attention's last-bit differences (another SDPA kernel path for
    # one query) through ~20 more layers, so the end-to-end bound is a decade looser
    assert err_decode <= 10 * CHUNK_TOL
