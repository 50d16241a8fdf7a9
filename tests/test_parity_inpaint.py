"""The edit loop (pipeline/inpaint.py) against diffusers' FluxInpaintPipeline algorithm with DiT360's
wrap padding, on the tiny FLUX.1-dev + DiT360 models.

The reference is assembled from diffusers' parts the way `FluxInpaintPipeline.__call__` uses them:
its image and mask processors (the mask binarised), `get_timesteps` for the strength, the
scheduler's `scale_noise` for the initial latents and for the source put back after every step,
`(1 - mask) * proper + mask * latents`, and the scheduler's Euler step; plus DiT360's one wrapped
column per side on the latents, the noise, the source latents, the ids and the mask, and mu from
the padded length (as tests/test_parity_pipeline.py's DiT360 reference). Two documented choices
of ours are used on the reference side too: the VAE posterior's mean (diffusers samples it by
default; `retrieve_latents(..., sample_mode="argmax")`) and the same CPU noise. The mask is
constant on 8x8 pixel blocks, where diffusers' nearest resize and our block max agree
(test_latent_mask_covers_every_marked_pixel shows where they would not).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from dit360_blender.pipeline.dit360 import DiT360Pipeline
from dit360_blender.pipeline.img2img import strength_sigmas, strength_start
from dit360_blender.pipeline.inpaint import EditRequest, inpaint, latent_mask
from dit360_blender.pipeline.sampling import get_noise, get_sigmas

PROMPT = "This is a panorama. A quiet harbour at dawn, boats, mist over the water."
WIDTH, HEIGHT, STEPS, SEED = 128, 64, 5, 4321


def _wrap(tokens: torch.Tensor, n_h: int, n_w: int) -> torch.Tensor:
    grid = tokens.reshape(tokens.shape[0], n_h, n_w, -1)
    return torch.cat([grid[:, :, -1:], grid, grid[:, :, :1]], dim=2).reshape(
        tokens.shape[0], n_h * (n_w + 2), -1
    )


def diffusers_inpaint_pipeline(flux_dir, lora_dir):
    """diffusers' FluxInpaintPipeline of the tiny FLUX.1-dev folders in float32, DiT360's LoRA loaded."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        FluxInpaintPipeline,
        FluxTransformer2DModel,
    )
    from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

    f32 = torch.float32
    pipe = FluxInpaintPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(flux_dir / "scheduler"),
        vae=AutoencoderKL.from_pretrained(flux_dir / "vae", torch_dtype=f32),
        text_encoder=CLIPTextModel.from_pretrained(flux_dir / "text_encoder", dtype=f32),
        tokenizer=CLIPTokenizer.from_pretrained(flux_dir / "tokenizer"),
        text_encoder_2=T5EncoderModel.from_pretrained(flux_dir / "text_encoder_2", dtype=f32),
        tokenizer_2=T5TokenizerFast.from_pretrained(flux_dir / "tokenizer_2"),
        transformer=FluxTransformer2DModel.from_pretrained(flux_dir / "transformer", torch_dtype=f32),
    )
    pipe.load_lora_weights(str(lora_dir), weight_name="adapter_model.safetensors")
    return pipe


def reference_inpaint(pipe, prompt, source_u8, mask_u8, noise, strength, steps, guidance=2.8, wrap_mask=True):
    """FluxInpaintPipeline's algorithm with DiT360's wrap padding; the decoded image (3, H, W) and
    the number of steps run. `wrap_mask=False`: the mask's pad columns keep the source instead (a
    plausible mistake, to show the mask's padding matters)."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps
    from diffusers.pipelines.flux.pipeline_flux_inpaint import retrieve_latents

    height, width = source_u8.shape[:2]
    n_h, n_w = height // 16, width // 16
    with torch.no_grad():
        prompt_embeds, pooled, text_ids = pipe.encode_prompt(
            prompt=prompt, prompt_2=None, max_sequence_length=512
        )
        image = pipe.image_processor.preprocess(Image.fromarray(source_u8), height=height, width=width)
        mask_condition = pipe.mask_processor.preprocess(Image.fromarray(mask_u8), height=height, width=width)

        sched = pipe.scheduler.config
        seq_len = n_h * (n_w + 2)  # DiT360: mu from the padded sequence
        mu = calculate_shift(
            seq_len, sched.base_image_seq_len, sched.max_image_seq_len, sched.base_shift, sched.max_shift
        )
        sigmas = np.linspace(1.0, 1 / steps, steps)
        retrieve_timesteps(pipe.scheduler, steps, "cpu", sigmas=sigmas, mu=mu)
        timesteps, _ = pipe.get_timesteps(steps, strength, "cpu")
        latent_timestep = timesteps[:1]

        image_latents = retrieve_latents(pipe.vae.encode(image), sample_mode="argmax")
        image_latents = (image_latents - pipe.vae.config.shift_factor) * pipe.vae.config.scaling_factor
        latents = pipe.scheduler.scale_noise(image_latents, latent_timestep, noise)
        pack = lambda x: _wrap(pipe._pack_latents(x, 1, 16, height // 8, width // 8), n_h, n_w)  # noqa: E731
        latents, noise_p, image_latents_p = pack(latents), pack(noise), pack(image_latents)
        mask, _ = pipe.prepare_mask_latents(
            mask_condition,
            image * (mask_condition < 0.5),
            1,
            16,
            1,
            height,
            width,
            torch.float32,
            "cpu",
            None,
        )
        mask = _wrap(mask, n_h, n_w)
        if not wrap_mask:
            mask = mask.reshape(1, n_h, n_w + 2, -1)
            mask[:, :, [0, -1]] = 0.0
            mask = mask.reshape(1, n_h * (n_w + 2), -1)
        ids = pipe._prepare_latent_image_ids(1, n_h, n_w, "cpu", torch.float32).reshape(n_h, n_w, 3)
        ids = torch.cat([ids[:, -1:], ids, ids[:, :1]], dim=1).reshape(-1, 3)

        guidance_vec = torch.full([1], guidance, dtype=torch.float32)
        for i, t in enumerate(timesteps):
            pred = pipe.transformer(
                hidden_states=latents, timestep=t.expand(1) / 1000, guidance=guidance_vec,
                pooled_projections=pooled, encoder_hidden_states=prompt_embeds, txt_ids=text_ids,
                img_ids=ids, return_dict=False,
            )[0]  # fmt: skip
            latents = pipe.scheduler.step(pred, t, latents, return_dict=False)[0]
            proper = image_latents_p
            if i < len(timesteps) - 1:
                proper = pipe.scheduler.scale_noise(proper, torch.tensor([timesteps[i + 1]]), noise_p)
            latents = (1 - mask) * proper + mask * latents

        latents = latents.reshape(1, n_h, n_w + 2, -1)[:, :, 1:-1].reshape(1, n_h * n_w, -1)
        latents = pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor)
        latents = latents / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
        decoded = pipe.vae.decode(latents, return_dict=False)[0]
    return (decoded[0].float() / 2 + 0.5).clamp(0, 1), len(timesteps)


def _source(seed: int = 3) -> np.ndarray:
    """A random but structured RGB panorama (smooth colour fields plus noise), uint8."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH] / np.array([HEIGHT, WIDTH])[:, None, None]
    base = np.stack([np.sin(6 * x + 1), np.cos(4 * y + 3 * x), np.sin(9 * y)], axis=-1) * 0.35 + 0.5
    return np.clip((base + rng.normal(0, 0.08, base.shape)) * 255, 0, 255).round().astype(np.uint8)


def _block_mask(seed: int = 5) -> np.ndarray:
    """A mask constant on 8x8 blocks, soft values on both sides of 0.5, marked across the wrap
    (column 0's blocks) but not symmetrically, uint8."""
    rng = np.random.default_rng(seed)
    blocks = rng.choice([0.0, 0.3, 0.7, 1.0], size=(HEIGHT // 8, WIDTH // 8), p=[0.45, 0.15, 0.15, 0.25])
    blocks[2:5, 0] = 1.0
    blocks[:, -1] = 0.0
    blocks[6, 5:9] = 1.0
    return (np.kron(blocks, np.ones((8, 8))) * 255).round().astype(np.uint8)


@pytest.fixture(scope="module")
def reference_pipe(tiny_models):
    return diffusers_inpaint_pipeline(tiny_models["flux"], tiny_models["lora"].parent)


@pytest.fixture(scope="module")
def ours(tiny_paths):
    # vae_wrap off: the reference decodes with zero padding at the left/right edges
    return DiT360Pipeline.load(tiny_paths, device="cpu", dtype="fp32", vae_wrap=False)


def _tensors(source_u8: np.ndarray, mask_u8: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    source = torch.from_numpy(source_u8).permute(2, 0, 1).float() / 255
    return source, torch.from_numpy(mask_u8).float() / 255


@pytest.mark.parametrize("strength", [1.0, 0.6])
def test_parity_inpaint_with_diffusers_algorithm(reference_pipe, ours, strength):
    source_u8, mask_u8 = _source(), _block_mask()
    noise = get_noise(SEED, HEIGHT, WIDTH)
    expected, n_steps = reference_inpaint(reference_pipe, PROMPT, source_u8, mask_u8, noise, strength, STEPS)
    source, mask = _tensors(source_u8, mask_u8)
    request = EditRequest(prompt=PROMPT, seed=SEED, steps=STEPS, strength=strength)
    seen = []
    result = inpaint(
        ours, request, source, mask, noise=noise, composite=False, on_step=lambda s: seen.append(s.index)
    )
    assert n_steps == STEPS - strength_start(STEPS, strength) == result.metadata["steps_run"]
    assert seen == list(range(1, n_steps + 1)) and n_steps == (5 if strength == 1.0 else 3)
    err = ((result.image.double() - expected.double()).abs().max() / expected.double().abs().max()).item()
    print(f"strength {strength}: relative error {err:.2e}")
    assert err <= 1e-4, err
    assert result.image.std() > 0.05  # not a flat decode that would make parity meaningless


def test_outside_the_mask_is_the_source_exactly_and_inside_differs(ours):
    source_u8, mask_u8 = _source(7), _block_mask(8)
    source, mask = _tensors(source_u8, mask_u8)
    request = EditRequest(prompt=PROMPT, seed=11, steps=3, strength=0.8)
    result = inpaint(ours, request, source, mask)
    out_u8 = (result.image.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    outside = mask_u8 == 0
    assert outside.any() and (~outside).any()
    assert np.array_equal(out_u8[outside], source_u8[outside])
    inside = mask_u8 == 255
    assert np.abs(out_u8[inside].astype(int) - source_u8[inside]).mean() > 5


def test_all_zero_mask_returns_the_source(ours):
    source_u8 = _source(9)
    source, _ = _tensors(source_u8, _block_mask())
    calls = []
    result = inpaint(
        ours, EditRequest(prompt=PROMPT, steps=3), source, torch.zeros(HEIGHT, WIDTH), on_step=calls.append
    )
    assert torch.equal(result.image, source) and calls == [] and result.metadata["steps_run"] == 0


def test_strength_selects_the_tail_of_the_schedule():
    full = get_sigmas(28, 8320)
    for strength, run in ((1.0, 28), (0.6, 17), (0.3, 9), (0.01, 1)):  # diffusers rounds the start down
        sigmas = strength_sigmas(28, strength, 8320)
        assert len(sigmas) - 1 == run and torch.equal(sigmas, full[28 - run :]) and sigmas[-1] == 0


def test_latent_mask_covers_every_marked_pixel():
    mask = torch.zeros(HEIGHT, WIDTH)
    mask[13, 37] = 1.0  # one pixel, not a block's top-left: diffusers' nearest resize would drop it
    mask[40:42, 90:100] = 0.6
    mask[50, 10] = 0.4  # below 0.5: binarised away, as diffusers' mask processor does
    lat = latent_mask(mask)[0, 0]
    assert lat.shape == (HEIGHT // 8, WIDTH // 8)
    assert lat[13 // 8, 37 // 8] == 1 and lat[5, 11:13].eq(1).all() and lat[50 // 8, 10 // 8] == 0
    assert lat.sum() == 1 + 2


def test_the_masks_wrap_padding_matters(reference_pipe, ours):
    """The mask marks column 0 but not the last one: its wrapped pad columns differ from a mask padded
    with 'keep', and only the wrapped one is what ours does."""
    source_u8, mask_u8 = _source(), _block_mask()
    noise = get_noise(SEED, HEIGHT, WIDTH)
    kept, _ = reference_inpaint(reference_pipe, PROMPT, source_u8, mask_u8, noise, 1.0, 2, wrap_mask=False)
    source, mask = _tensors(source_u8, mask_u8)
    result = inpaint(
        ours, EditRequest(prompt=PROMPT, seed=SEED, steps=2), source, mask, noise=noise, composite=False
    )
    err = ((result.image.double() - kept.double()).abs().max() / kept.double().abs().max()).item()
    print(f"mask padded with keep instead of the wrap: relative error {err:.2e}")
    assert err > 1e-3, err
