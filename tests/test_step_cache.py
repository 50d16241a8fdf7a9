"""The opt-in step cache (First-Block Cache style, pipeline/step_cache.py) on the tiny model:
off by default, exact at threshold 0, first and last steps always full, previews and cancel intact."""

from __future__ import annotations

import pytest
import torch

from dit360_blender import params
from dit360_blender.pipeline.dit360 import DiT360Pipeline, GenerateRequest
from dit360_blender.pipeline.sampling import (
    Cancelled,
    denoise,
    get_noise,
    get_sigmas,
    image_ids,
    pack,
    wrap_pad,
    wrap_pad_ids,
)
from dit360_blender.pipeline.step_cache import StepCache

PROMPT = "This is a panorama image. A lake under snowy peaks"
W, H, STEPS = 128, 64, 6


@pytest.fixture(scope="module")
def pipe(tiny_paths):
    return DiT360Pipeline.load(tiny_paths, device="cpu", dtype="fp32", vae_wrap=False)


def _sample(pipe, cache, seed=3, on_step=None, should_cancel=None):
    txt, vec = pipe.text_encoders.encode(PROMPT, max_length=512)
    gh, gw = H // 16, W // 16
    img = wrap_pad(pack(get_noise(seed, H, W)), gh, gw)
    ids = wrap_pad_ids(image_ids(gh, gw), gh, gw)[None]
    return denoise(
        pipe.transformer, img, ids, txt, torch.zeros(1, txt.shape[1], 3), vec, get_sigmas(STEPS, img.shape[1]),
        2.8, on_step=on_step, should_cancel=should_cancel, cache=cache,
    )  # fmt: skip


def test_threshold_zero_reproduces_the_uncached_result_exactly(pipe):
    plain = _sample(pipe, None)
    cache = StepCache(0.0)
    cached = _sample(pipe, cache)
    assert torch.equal(plain, cached)
    assert cache.full_evaluations == STEPS and cache.skipped == 0


def test_a_large_threshold_computes_only_the_first_and_last_steps(pipe):
    cache = StepCache(1e9)
    x = _sample(pipe, cache)
    assert (cache.full_evaluations, cache.skipped) == (2, STEPS - 2)
    assert torch.isfinite(x).all()
    assert not torch.equal(x, _sample(pipe, None))  # it is an approximation, not the same image


def test_a_skipped_step_reuses_what_the_other_blocks_added_at_the_last_full_step(pipe):
    """Independent of the cache's bookkeeping: with every middle step skipped, step 2's velocity is
    final_layer(first block's output + (the rest's contribution at step 1)), rebuilt here by hand."""
    model = pipe.transformer
    seen = []
    hook = model.final_layer.register_forward_hook(lambda m, a, out: seen.append((a[0].clone(), out.clone())))
    first_outputs = []
    hook2 = model.double_blocks[0].register_forward_hook(
        lambda m, a, out: first_outputs.append(out[0].clone())
    )
    try:
        _sample(pipe, StepCache(1e9))
    finally:
        hook.remove()
        hook2.remove()
    (full_in, _), (skipped_in, _) = seen[0], seen[1]
    rest_at_step1 = full_in - first_outputs[0]
    assert torch.allclose(skipped_in, first_outputs[1] + rest_at_step1, atol=1e-6)


def test_cancel_and_previews_work_with_the_cache(pipe):
    steps = []
    _sample(pipe, StepCache(1e9), on_step=steps.append)
    assert [s.index for s in steps] == list(range(1, STEPS + 1))
    assert all(torch.isfinite(s.x0).all() for s in steps)
    calls = []
    with pytest.raises(Cancelled):
        _sample(pipe, StepCache(1e9), should_cancel=lambda: calls.append(1) or len(calls) > 3)
    assert len(calls) == 4  # checked before every step, skipped or not


def test_generate_reports_the_transformer_evaluations(pipe):
    plain = pipe.generate(GenerateRequest(PROMPT, seed=1, steps=STEPS, width=W, height=H))
    assert plain.metadata["transformer_evaluations"] == STEPS and plain.metadata["step_cache"] == 0.0
    fast = pipe.generate(GenerateRequest(PROMPT, seed=1, steps=STEPS, width=W, height=H, step_cache=1.0))
    assert 2 <= fast.metadata["transformer_evaluations"] < STEPS


def test_speed_presets_apply_only_where_the_user_kept_the_default():
    base = params.defaults()
    assert params.apply_speed(base) == base  # faithful changes nothing
    fastest = params.apply_speed({**base, "speed": "fastest"})
    assert fastest["memory_mode"] == "fp8" and fastest["step_cache"] == 0.1
    mine = params.apply_speed({**base, "speed": "fastest", "memory_mode": "stream", "step_cache": 0.03})
    assert mine["memory_mode"] == "stream" and mine["step_cache"] == 0.03
