"""float16, DiT360's own precision: 'auto' picks it on GPUs, and ours matches diffusers in fp16.

fp16 keeps 11 significant bits (a rounding step of 2^-11 ≈ 4.9e-4 relative), so one transformer
pass on random tiny weights lands ~1e-3 from diffusers' fp16 pass, and a few sampling steps a few
1e-3; the tolerances below are stated against that, and each test also shows that fp16 really ran
(it differs from fp32 by more than the tolerance of the fp32 parity tests, 1e-5).
"""

from __future__ import annotations

import pytest
import torch
from flux_fixtures import TINY_AXES, save_layouts, tiny_diffusers_transformer
from test_parity_pipeline import HEIGHT, PROMPT, STEPS, WIDTH, reference_dit360
from test_parity_transformer import rel_err

from dit360_blender.pipeline.dit360 import DiT360Pipeline, GenerateRequest, resolve_dtype
from dit360_blender.pipeline.flux_checkpoint import load_flux_transformer
from dit360_blender.pipeline.sampling import get_noise, image_ids, wrap_pad_ids
from dit360_blender.pipeline.text_encoders import TextEncoders

FP16_MAX = torch.finfo(torch.float16).max  # 65504
ONE_PASS_TOL = 5e-3  # max error / max value, one transformer pass (measured ~1.2e-3)


def test_auto_precision_is_fp16_on_gpus_fp32_on_cpu():
    assert resolve_dtype("auto", torch.device("cuda")) == torch.float16
    assert resolve_dtype("auto", torch.device("mps")) == torch.float16
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("bf16", torch.device("cuda")) == torch.bfloat16  # still selectable


def _inputs(seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    ids = wrap_pad_ids(image_ids(4, 8), 4, 8)
    return {
        "img": torch.randn(1, ids.shape[0], 64, generator=gen),
        "txt": torch.randn(1, 7, 32, generator=gen),
        "vec": torch.randn(1, 24, generator=gen),
        "t": torch.rand(1, generator=gen),
        "ids": ids,
    }


def _reference(model, x: dict, dtype: torch.dtype) -> tuple[torch.Tensor, float]:
    """diffusers' output in `dtype`, and the largest value any block handed on."""
    model = model.to(dtype)
    peaks: list[float] = []
    blocks = [*model.transformer_blocks, *model.single_transformer_blocks]
    hooks = [
        b.register_forward_hook(lambda _m, _i, out: peaks.append(max(o.abs().max().item() for o in out)))
        for b in blocks
    ]
    with torch.no_grad():
        out = model(
            hidden_states=x["img"].to(dtype), encoder_hidden_states=x["txt"].to(dtype),
            pooled_projections=x["vec"].to(dtype), timestep=x["t"].to(dtype),
            guidance=torch.tensor([2.8], dtype=dtype), img_ids=x["ids"], txt_ids=torch.zeros(7, 3),
            return_dict=False,
        )[0]  # fmt: skip
    for hook in hooks:
        hook.remove()
    return out, max(peaks)


def _ours(path, x: dict) -> torch.Tensor:
    model = load_flux_transformer(path, dtype=torch.float16, axes_dim=TINY_AXES)
    assert model.double_blocks[0].img_attn.qkv.weight.dtype == torch.float16
    with torch.no_grad():
        return model(
            x["img"].half(), x["ids"][None], x["txt"].half(), torch.zeros(1, 7, 3), x["t"], x["vec"].half(),
            torch.tensor([2.8]),
        )  # fmt: skip


@pytest.mark.parametrize("layout", ["single", "diffusers"])
def test_transformer_fp16_matches_diffusers_fp16(tmp_path, layout):
    layouts = save_layouts(tiny_diffusers_transformer(seed=3), tmp_path)
    x = _inputs()
    expected, _ = _reference(tiny_diffusers_transformer(seed=3), x, torch.float16)
    exact, _ = _reference(tiny_diffusers_transformer(seed=3), x, torch.float32)
    got = _ours(layouts[layout], x)
    assert got.dtype == torch.float16
    assert rel_err(got, expected) <= ONE_PASS_TOL
    assert rel_err(expected, exact) > 1e-4  # diffusers really ran in fp16 (fp32 parity is 1e-5)


def _overflowing(where: str):
    """A tiny model whose first double block's text stream ("double") or first single block
    ("single") leaves fp16's range: four channels get an output bias of 3e4 and a gate of 8, so
    the residual update is ~2.4e5 on every token (inf in fp16, far from the limit, so the two
    implementations can't round to different sides of it)."""
    model = tiny_diffusers_transformer(seed=3)
    if where == "double":
        block = model.transformer_blocks[0]
        out, modulation, gate_chunk = block.ff_context.net[2], block.norm1_context.linear, 5
    else:
        block = model.single_transformer_blocks[0]
        out, modulation, gate_chunk = block.proj_out, block.norm.linear, 2
    dim = out.out_features
    with torch.no_grad():
        out.bias[:4] = 3e4
        rows = slice(gate_chunk * dim, gate_chunk * dim + 4)  # the gate's rows of the adaLN Linear
        modulation.weight[rows] = 0.0
        modulation.bias[rows] = 8.0
    return model


@pytest.mark.parametrize("where", ["double", "single"])
def test_fp16_overflow_is_clamped_as_diffusers_does(tmp_path, where):
    """Without the clamp of the text stream (double blocks) or of the single blocks' output, inf
    reaches the next LayerNorm and the output is NaN: this compares finite numbers only with it."""
    layouts = save_layouts(_overflowing(where), tmp_path)
    x = _inputs()
    _, peak = _reference(_overflowing(where), x, torch.float32)
    assert peak > 2 * FP16_MAX  # the activations really leave fp16's range ...
    expected, _ = _reference(_overflowing(where), x, torch.float16)
    assert torch.isfinite(expected).all()  # ... and diffusers' clamp keeps its output finite
    got = _ours(layouts["single"], x)
    assert torch.isfinite(got).all()
    assert rel_err(got, expected) <= ONE_PASS_TOL


def test_t5_fp16_as_transformers_runs_it(tiny_models):
    """transformers keeps T5's feed-forward output projections (`wo`) in fp32 when it loads T5 in
    fp16 (its `_keep_in_fp32_modules`): the hidden states that would overflow fp16 stay in fp32.
    Our loader goes through from_pretrained, so the same holds, and the output equals the one
    diffusers' FluxPipeline gets with DiT360's torch_dtype=float16."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
    from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

    flux = tiny_models["flux"]
    ours = TextEncoders.load_from_repo(flux, dtype=torch.float16)
    dtypes = {name: p.dtype for name, p in ours.t5.named_parameters()}
    assert {d for n, d in dtypes.items() if ".wo." in n} == {torch.float32}
    assert {d for n, d in dtypes.items() if ".wo." not in n} == {torch.float16}
    reference = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(flux / "scheduler"),
        text_encoder=CLIPTextModel.from_pretrained(flux / "text_encoder", dtype=torch.float16),
        tokenizer=CLIPTokenizer.from_pretrained(flux / "tokenizer"),
        text_encoder_2=T5EncoderModel.from_pretrained(flux / "text_encoder_2", dtype=torch.float16),
        tokenizer_2=T5TokenizerFast.from_pretrained(flux / "tokenizer_2"),
        vae=None,
        transformer=None,
    )
    t5, pooled = ours.encode(PROMPT)
    with torch.inference_mode():
        ref_t5, ref_pooled, _ = reference.encode_prompt(PROMPT, prompt_2=None, max_sequence_length=512)
    assert t5.dtype == pooled.dtype == torch.float16
    assert rel_err(t5, ref_t5) <= 1e-3 and rel_err(pooled, ref_pooled) <= 1e-3
    exact, _ = TextEncoders.load_from_repo(flux, dtype=torch.float32).encode(PROMPT)
    assert rel_err(t5, exact) > 1e-4  # fp16 really ran


def test_pipeline_fp16_matches_dit360_in_fp16(tiny_models, tiny_paths):
    """End to end in fp16 against DiT360's pipeline in fp16. Ours keeps the sampling state in
    fp32 between steps where diffusers keeps it in fp16, so after 5 steps the images differ by
    about 2e-3 (relative L2; 7e-3 at the worst pixel) — fp16 rounding, not a model difference."""
    noise = get_noise(1234, HEIGHT, WIDTH)
    expected = reference_dit360(
        tiny_models["flux"], tiny_models["lora"].parent, PROMPT, noise, STEPS, 2.8, WIDTH, HEIGHT,
        dtype=torch.float16,
    )  # fmt: skip
    pipe = DiT360Pipeline.load(tiny_paths, device="cpu", dtype="fp16", vae_wrap=False)
    assert pipe.dtype == torch.float16 and pipe.model_info["dtype"] == "float16"
    request = GenerateRequest(prompt=PROMPT, seed=1234, steps=STEPS, width=WIDTH, height=HEIGHT)
    got = pipe.generate(request).image.double()
    expected = expected.double()
    assert torch.isfinite(got).all() and got.std() > 0.05
    assert ((got - expected).norm() / expected.norm()).item() <= 5e-3
    assert rel_err(got, expected) <= 2e-2
