"""Our FLUX transformer against diffusers' FluxTransformer2DModel on the same random weights."""

from __future__ import annotations

import pytest
import torch
from flux_fixtures import TINY_AXES, save_layouts, tiny_diffusers_transformer

from dit360_blender.pipeline.flux_checkpoint import load_flux_transformer
from dit360_blender.pipeline.sampling import image_ids, wrap_pad_ids


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


@pytest.fixture(scope="module")
def reference():
    return tiny_diffusers_transformer(seed=3)


@pytest.fixture(scope="module")
def layouts(reference, tmp_path_factory):
    return save_layouts(reference, tmp_path_factory.mktemp("flux"))


def run_both(ours, ref, grid_h, grid_w, wrap, seed=0, txt_len=7):
    gen = torch.Generator().manual_seed(seed)
    ids = image_ids(grid_h, grid_w)
    if wrap:
        ids = wrap_pad_ids(ids, grid_h, grid_w)
    n = ids.shape[0]
    img = torch.randn(1, n, 64, generator=gen)
    txt = torch.randn(1, txt_len, ref.config.joint_attention_dim, generator=gen)
    vec = torch.randn(1, ref.config.pooled_projection_dim, generator=gen)
    t = torch.rand(1, generator=gen)
    guidance = torch.tensor([2.8])
    txt_ids = torch.zeros(txt_len, 3)
    with torch.no_grad():
        expected = ref(
            hidden_states=img,
            encoder_hidden_states=txt,
            pooled_projections=vec,
            timestep=t,
            guidance=guidance,
            img_ids=ids,
            txt_ids=txt_ids,
            return_dict=False,
        )[0]
        got = ours(img, ids[None], txt, txt_ids[None], t, vec, guidance)
    return got, expected


@pytest.mark.parametrize("layout", ["diffusers", "single", "prefixed"])
@pytest.mark.parametrize("grid,wrap", [((4, 8), True), ((3, 5), False), ((2, 6), True)])
def test_parity_transformer_layouts(reference, layouts, layout, grid, wrap):
    ours = load_flux_transformer(layouts[layout], dtype=torch.float32, axes_dim=TINY_AXES)
    got, expected = run_both(ours, reference, *grid, wrap=wrap)
    assert got.shape == expected.shape
    assert rel_err(got, expected) <= 1e-5


def test_fp8_checkpoint_within_fp8_tolerance(reference, layouts):
    ours = load_flux_transformer(layouts["fp8"], dtype=torch.float32, axes_dim=TINY_AXES)
    assert ours.double_blocks[0].img_attn.qkv.weight.dtype == torch.float8_e4m3fn
    got, expected = run_both(ours, reference, 4, 8, wrap=True)
    err = rel_err(got, expected)
    # e4m3 keeps 3 mantissa bits (~6% per weight); through 4 blocks the output drifts a few percent.
    assert 1e-4 < err < 0.15, err


def test_wrap_ids_really_change_the_output(reference, layouts):
    """Guards the test itself: ids matter, so a wrong id layout could not pass the parity check."""
    ours = load_flux_transformer(layouts["single"], dtype=torch.float32, axes_dim=TINY_AXES)
    gen = torch.Generator().manual_seed(0)
    ids = wrap_pad_ids(image_ids(4, 8), 4, 8)
    img = torch.randn(1, ids.shape[0], 64, generator=gen)
    txt, vec = torch.randn(1, 7, 32, generator=gen), torch.randn(1, 24, generator=gen)
    args = (txt, torch.zeros(1, 7, 3), torch.tensor([0.5]), vec, torch.tensor([2.8]))
    with torch.no_grad():
        a = ours(img, ids[None], *args)
        b = ours(img, image_ids(4, 10)[None], *args)
    assert rel_err(a, b) > 1e-3
