"""User LoRAs in kohya, BFL/ComfyUI and diffusers/PEFT formats, on every FLUX target, against
diffusers' own LoRA loading where diffusers reads the format, else against float64 merging."""

from __future__ import annotations

import copy

import pytest
import torch
from flux_fixtures import TINY_AXES, save_layouts, tiny_diffusers_transformer, tiny_params
from lora_files import bfl_linears, bfl_style_lora, diffusers_lora
from safetensors.torch import load_file, save_file
from test_parity_transformer import run_both

from dit360_blender.pipeline.errors import LoraMismatchError
from dit360_blender.pipeline.flux_checkpoint import load_flux_transformer
from dit360_blender.pipeline.lora import LoraMerger, load_lora


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture(scope="module")
def base():
    return tiny_diffusers_transformer(seed=31)


@pytest.fixture(scope="module")
def files(base, tmp_path_factory):
    return save_layouts(base, tmp_path_factory.mktemp("flux"))


@pytest.fixture(scope="module")
def bfl(files):
    return load_file(str(files["single"]))


def with_diffusers(model, lora_path):
    from diffusers import FluxPipeline

    ref = copy.deepcopy(model)
    state, alphas = FluxPipeline.lora_state_dict(str(lora_path), return_alphas=True)
    FluxPipeline.load_lora_into_transformer(state, transformer=ref, network_alphas=alphas)
    assert any("lora_A" in k for k in ref.state_dict())  # diffusers really put the adapter on
    return ref.eval()


def ours_with(path, loras, params):
    merger = LoraMerger(None, params, extra=[(load_lora(p), s) for p, s in loras])
    return load_flux_transformer(path, torch.float32, axes_dim=TINY_AXES, merge=merger), merger


def blocks_without_linear1(path):
    """What diffusers' kohya reader applies at this size: it hard-codes FLUX.1-dev's linear1 row
    sizes (3072/12288) and drops the embedders and final layer; those are checked in float64 below."""
    state = {
        k: v
        for k, v in load_file(str(path)).items()
        if "linear1" not in k and ("double_blocks" in k or "single_blocks" in k)
    }
    save_file(state, str(path))
    return path


@pytest.mark.parametrize("fmt", ["diffusers", "kohya", "comfy_down_up"])
def test_lora_format_matches_diffusers(base, files, bfl, tmp_path, fmt):
    if fmt == "diffusers":
        path = diffusers_lora(base, tmp_path / "lora.safetensors", seed=1)
    else:
        style = "kohya" if fmt == "kohya" else "comfy"
        path = blocks_without_linear1(bfl_style_lora(bfl, tmp_path / "lora.safetensors", style, seed=2))
    ours, merger = ours_with(files["single"], [(path, 1.0)], tiny_params(base))
    assert merger.merged == set(load_lora(path).modules)  # every module landed somewhere
    got, expected = run_both(ours, with_diffusers(base, path), 4, 8, wrap=True)
    assert rel_l2(got, expected) <= 1e-5
    plain, _ = run_both(
        load_flux_transformer(files["single"], torch.float32, axes_dim=TINY_AXES), base, 4, 8, True
    )
    assert rel_l2(plain, expected) > 1e-2  # the LoRA changes the output: the check above means something


def _bfl_delta(path, stem, style, down_up, strength):
    """strength * alpha / r * B @ A of one module of a BFL-style file, in float64."""
    file = load_file(str(path))
    key = f"lora_unet_{stem.replace('.', '_')}" if style == "kohya" else f"diffusion_model.{stem}"
    down, up = file[f"{key}.{down_up[0]}.weight"].double(), file[f"{key}.{down_up[1]}.weight"].double()
    return strength * file[f"{key}.alpha"].item() / down.shape[0] * (up @ down)


def test_stacked_bfl_style_loras_on_every_weight_match_float64(base, files, bfl, tmp_path):
    """Every BFL Linear (fused qkv, linear1, modulation, embedders, final layer), two LoRAs with their
    own strengths (kohya, and ComfyUI's lora_A/lora_B): W + sum of s * alpha/r * B @ A in float64."""
    kohya = bfl_style_lora(bfl, tmp_path / "kohya.safetensors", "kohya", seed=3)
    comfy_ab = ("lora_A", "lora_B")
    comfy = bfl_style_lora(bfl, tmp_path / "comfy.safetensors", "comfy", seed=4, down_up=comfy_ab)
    ours, merger = ours_with(files["single"], [(kohya, 0.5), (comfy, -0.8)], tiny_params(base))
    state = ours.state_dict()
    stems = bfl_linears(bfl)
    assert merger.merged == set(load_lora(kohya).modules) | set(load_lora(comfy).modules)
    for stem in stems:
        expected = (
            bfl[f"{stem}.weight"].double()
            + _bfl_delta(kohya, stem, "kohya", ("lora_down", "lora_up"), 0.5)
            + _bfl_delta(comfy, stem, "comfy", comfy_ab, -0.8)
        )
        assert torch.allclose(state[f"{stem}.weight"].double(), expected, atol=1e-5), stem


@pytest.mark.parametrize(
    "keys,family",
    [
        (
            ["lora_unet_down_blocks_1_attentions_0_transformer_blocks_1_attn1_to_q", "lora_te2_text_model_x"],
            "XL",
        ),
        (["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"], "1.x"),
        (["diffusion_model.joint_blocks.0.x_block.attn.qkv"], "Stable Diffusion 3"),
    ],
)
def test_lora_of_another_family_is_refused_by_name(base, tmp_path, keys, family):
    state = {}
    for k in keys:
        state[f"{k}.lora_down.weight"] = torch.randn(4, 32)
        state[f"{k}.lora_up.weight"] = torch.randn(32, 4)
    save_file(state, str(tmp_path / "other.safetensors"))
    with pytest.raises(LoraMismatchError, match=family) as err:
        LoraMerger(None, tiny_params(base), extra=[(load_lora(tmp_path / "other.safetensors"), 1.0)])
    assert keys[0] in str(err.value) and "FLUX" in err.value.hint


def test_lora_on_stored_fp8_runs_beside_the_fp8_weight(base, files, bfl, tmp_path):
    """fp8 file + LoRA against diffusers running the same (dequantised) fp8 weights with the adapter:
    (a) the low-rank side path is exact; (b) merging and re-quantising per row is what it replaced."""
    from flux_fixtures import diffusers_state_from_bfl

    from dit360_blender.pipeline.fp8 import Fp8Linear
    from dit360_blender.pipeline.lora import LowRankPath

    lora = diffusers_lora(base, tmp_path / "lora.safetensors", seed=5)
    fp8_weights = {k: v.float() for k, v in load_file(str(files["fp8"])).items()}
    same_fp8 = copy.deepcopy(base)
    same_fp8.load_state_dict(diffusers_state_from_bfl(fp8_weights, tiny_params(base)), strict=True)
    reference = with_diffusers(same_fp8, lora)

    side, _ = ours_with(files["fp8"], [(lora, 1.0)], tiny_params(base))
    qkv = side.double_blocks[0].img_attn.qkv
    assert isinstance(qkv, Fp8Linear) and isinstance(qkv.lora, LowRankPath)
    dequantised = tmp_path / "dequantised.safetensors"
    save_file(fp8_weights, str(dequantised))
    merger = LoraMerger(None, tiny_params(base), extra=[(load_lora(lora), 1.0)])
    requantised = load_flux_transformer(
        dequantised, torch.float32, axes_dim=TINY_AXES, merge=merger, quantize_fp8=True
    )

    got_a, expected = run_both(side, reference, 4, 8, wrap=True)
    got_b, _ = run_both(requantised, reference, 4, 8, wrap=True)
    err_a, err_b = rel_l2(got_a, expected), rel_l2(got_b, expected)
    print(f"fp8 + LoRA, relative L2 from diffusers: side path {err_a:.2e}, re-quantised per row {err_b:.2e}")
    assert err_a <= 1e-5 < err_b


def test_pipeline_applies_user_loras_on_top_of_dit360(tiny_models, tiny_paths, tmp_path):
    """DiT360Pipeline.load(loras=...): the user's LoRA lands in the weights with its strength,
    on top of the DiT360 adapter, and the image's metadata names it."""
    from dit360_blender.pipeline.dit360 import DiT360Pipeline

    flux = load_file(str(tiny_models["flux"] / "flux1-dev.safetensors"))
    user = bfl_style_lora(flux, tmp_path / "style.safetensors", "kohya", seed=9)
    plain = DiT360Pipeline.load(tiny_paths, device="cpu", dtype="fp32")
    styled = DiT360Pipeline.load(tiny_paths, device="cpu", dtype="fp32", loras=[(user, 0.6)])
    key = "single_blocks.0.linear2.weight"
    expected = plain.transformer.state_dict()[key].double() + _bfl_delta(
        user, "single_blocks.0.linear2", "kohya", ("lora_down", "lora_up"), 0.6
    )
    assert torch.allclose(styled.transformer.state_dict()[key].double(), expected, atol=1e-5)
    assert styled.model_info["loras"] == [{"file": "style.safetensors", "strength": 0.6}]
    assert plain.model_info["loras"] == []
