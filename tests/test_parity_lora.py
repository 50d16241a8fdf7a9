"""The DiT360 LoRA merged into our fused weights against diffusers' own LoRA loading."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from flux_fixtures import TINY_AXES, save_layouts, save_tiny_lora, tiny_diffusers_transformer, tiny_params
from safetensors.torch import save_file
from test_parity_transformer import rel_err, run_both

from dit360_blender.pipeline.errors import LoraMismatchError
from dit360_blender.pipeline.flux_checkpoint import load_flux_transformer
from dit360_blender.pipeline.lora import LoraMerger, load_lora


@pytest.fixture(scope="module")
def base():
    return tiny_diffusers_transformer(seed=11)


@pytest.fixture(scope="module")
def files(base, tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    return {**save_layouts(base, root / "model"), "lora": save_tiny_lora(base, root / "dit360")}


def diffusers_with_lora(base, lora_path):
    from diffusers import FluxPipeline

    ref = copy.deepcopy(base)
    state = FluxPipeline.lora_state_dict(str(lora_path))
    if isinstance(state, tuple):
        state = state[0]
    FluxPipeline.load_lora_into_transformer(state, transformer=ref, network_alphas=None)
    return ref.eval()


def load_ours(path, lora_path, strength=1.0, dtype=torch.float32):
    merger = LoraMerger(load_lora(lora_path), tiny_params_from(path), strength)
    model = load_flux_transformer(path, dtype=dtype, axes_dim=TINY_AXES, merge=merger)
    return model, merger


def tiny_params_from(path):
    from dit360_blender.pipeline.flux_checkpoint import infer_params, read_shapes

    return infer_params(read_shapes(path), TINY_AXES)


@pytest.mark.parametrize("layout", ["single", "diffusers"])
def test_parity_lora_merge_matches_diffusers(base, files, layout):
    ref = diffusers_with_lora(base, files["lora"])
    ours, merger = load_ours(files[layout], files["lora"])
    assert len(merger.merged) == 2 * 4 + 2 * 3  # every module of the file landed somewhere
    got, expected = run_both(ours, ref, 4, 8, wrap=True)
    assert rel_err(got, expected) <= 1e-5
    # and the LoRA matters: without it the output is far from the LoRA reference
    plain, _ = run_both(
        load_flux_transformer(files[layout], torch.float32, axes_dim=TINY_AXES), ref, 4, 8, True
    )
    assert rel_err(plain, expected) > 1e-2


def test_lora_strength_is_linear_in_the_weights(base, files):
    """strength s merges s*alpha/r*B@A: checked against a float64 computation on one fused row block."""
    lora = load_lora(files["lora"])
    ours, _ = load_ours(files["single"], files["lora"], strength=0.5)
    plain = load_flux_transformer(files["single"], torch.float32, axes_dim=TINY_AXES)
    m = lora.modules["single_transformer_blocks.1.attn.to_k"]
    hidden = tiny_params(base).hidden_size
    k_rows = slice(hidden, 2 * hidden)  # to_k is the second row block of linear1
    expected = plain.single_blocks[1].linear1.weight[k_rows].double() + 0.5 * (
        m.up.double() @ m.down.double()
    )
    assert torch.allclose(ours.single_blocks[1].linear1.weight[k_rows].double(), expected, atol=1e-6)
    # MLP rows of linear1 are untouched
    assert torch.equal(
        ours.single_blocks[1].linear1.weight[3 * hidden :],
        plain.single_blocks[1].linear1.weight[3 * hidden :],
    )


def test_alpha_from_adapter_config_scales_the_update(base, tmp_path, files):
    path = save_tiny_lora(base, tmp_path / "a8", rank=4, alpha=8)
    lora = load_lora(path)
    assert lora.scale_of(lora.modules["transformer_blocks.0.attn.to_q"]) == 2.0
    ours, _ = load_ours(files["single"], path)
    plain = load_flux_transformer(files["single"], torch.float32, axes_dim=TINY_AXES)
    m = lora.modules["transformer_blocks.0.attn.to_out.0"]
    expected = plain.double_blocks[0].img_attn.proj.weight.double() + 2.0 * (m.up.double() @ m.down.double())
    assert torch.allclose(ours.double_blocks[0].img_attn.proj.weight.double(), expected, atol=1e-6)


def test_lora_merges_before_the_cast(base, files):
    """Merged in fp32 then rounded once: equal to rounding the fp32-merged weight to bf16."""
    ours32, _ = load_ours(files["single"], files["lora"])
    ours16, _ = load_ours(files["single"], files["lora"], dtype=torch.bfloat16)
    w32 = ours32.double_blocks[1].img_attn.qkv.weight
    assert torch.equal(ours16.double_blocks[1].img_attn.qkv.weight, w32.to(torch.bfloat16))


def test_lora_on_fp8_checkpoint_stays_close(base, files):
    ref = diffusers_with_lora(base, files["lora"])
    ours, _ = load_ours(files["fp8"], files["lora"])
    got, expected = run_both(ours, ref, 4, 8, wrap=True)
    assert rel_err(got, expected) < 0.15


def test_foreign_lora_keys_are_listed(base, files, tmp_path):
    state = {
        "transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.randn(4, 32),
        "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.randn(32, 4),
        "lora_unet_down_blocks_0_attentions_0.lora_down.weight": torch.randn(4, 32),
        "lora_unet_down_blocks_0_attentions_0.lora_up.weight": torch.randn(32, 4),
    }
    save_file(state, str(tmp_path / "sdxl.safetensors"))
    with pytest.raises(LoraMismatchError) as err:
        LoraMerger(load_lora(tmp_path / "sdxl.safetensors"), tiny_params(base))
    assert "lora_unet_down_blocks_0_attentions_0" in str(err.value)
    assert err.value.hint


def test_unrecognised_lora_file_is_refused(tmp_path):
    save_file({"model.weight": torch.randn(3, 3)}, str(tmp_path / "x.safetensors"))
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 4}))
    with pytest.raises(LoraMismatchError, match="model.weight"):
        load_lora(tmp_path / "x.safetensors")


def test_lora_for_a_bigger_model_is_refused(base, files, tmp_path):
    big = tiny_diffusers_transformer(seed=2, heads=3)
    path = save_tiny_lora(big, tmp_path / "big")
    with pytest.raises(LoraMismatchError, match="shape"):
        load_ours(files["single"], path)
