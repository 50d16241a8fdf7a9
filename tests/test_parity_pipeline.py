"""End to end: our pipeline against DiT360's published pipeline assembled from diffusers parts.

The reference follows Insta360-Research-Team/DiT360 `src/pipeline.py`: FluxPipeline components
loaded from the diffusers folders, the LoRA through diffusers' `load_lora_weights`, the prompt
through `encode_prompt` (T5 512 tokens), packed latents padded with one wrapped column per side
(ids likewise), mu from the padded length, FlowMatchEulerDiscreteScheduler steps, crop, unpack,
un-scale and VAE decode. Ours loads the BFL single file, ae.safetensors and the PEFT LoRA.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dit360_blender.pipeline.dit360 import DiT360Pipeline, GenerateRequest
from dit360_blender.pipeline.sampling import get_noise

PROMPT = "This is a panorama. A quiet harbour at dawn, boats, mist over the water."
WIDTH, HEIGHT, STEPS = 128, 64, 5


def reference_dit360(flux_dir, lora_dir, prompt, noise, steps, guidance, width, height, dtype=torch.float32):
    """DiT360's pipeline in `dtype` (DiT360 itself runs float16: every component loaded in it,
    the latents kept in it between steps as diffusers' FluxPipeline does)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps
    from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(flux_dir / "scheduler"),
        vae=AutoencoderKL.from_pretrained(flux_dir / "vae", torch_dtype=dtype),
        text_encoder=CLIPTextModel.from_pretrained(flux_dir / "text_encoder", dtype=dtype),
        tokenizer=CLIPTokenizer.from_pretrained(flux_dir / "tokenizer"),
        text_encoder_2=T5EncoderModel.from_pretrained(flux_dir / "text_encoder_2", dtype=dtype),
        tokenizer_2=T5TokenizerFast.from_pretrained(flux_dir / "tokenizer_2"),
        transformer=FluxTransformer2DModel.from_pretrained(flux_dir / "transformer", torch_dtype=dtype),
    )
    if lora_dir is not None:  # None: plain FLUX.1-dev with DiT360's sampling
        pipe.load_lora_weights(str(lora_dir), weight_name="adapter_model.safetensors")
    with torch.no_grad():
        prompt_embeds, pooled, text_ids = pipe.encode_prompt(
            prompt=prompt, prompt_2=None, max_sequence_length=512
        )
        n_h, n_w = height // 16, width // 16
        latents = pipe._pack_latents(noise.to(dtype), 1, 16, height // 8, width // 8)
        ids = pipe._prepare_latent_image_ids(1, n_h, n_w, "cpu", torch.float32)
        # DiT360: one wrapped column per side, for the latents and for their position ids
        grid = latents.reshape(1, n_h, n_w, -1)
        latents = torch.cat([grid[:, :, -1:], grid, grid[:, :, :1]], dim=2).reshape(1, n_h * (n_w + 2), -1)
        id_grid = ids.reshape(n_h, n_w, 3)
        ids = torch.cat([id_grid[:, -1:], id_grid, id_grid[:, :1]], dim=1).reshape(-1, 3)

        sigmas = np.linspace(1.0, 1 / steps, steps)
        sched = pipe.scheduler.config
        mu = calculate_shift(
            latents.shape[1],
            sched.base_image_seq_len,
            sched.max_image_seq_len,
            sched.base_shift,
            sched.max_shift,
        )
        timesteps, _ = retrieve_timesteps(pipe.scheduler, steps, "cpu", sigmas=sigmas, mu=mu)
        guidance_vec = torch.full([1], guidance, dtype=torch.float32)
        for t in timesteps:
            timestep = t.expand(1).to(latents.dtype)
            pred = pipe.transformer(
                hidden_states=latents,
                timestep=timestep / 1000,
                guidance=guidance_vec,
                pooled_projections=pooled,
                encoder_hidden_states=prompt_embeds,
                txt_ids=text_ids,
                img_ids=ids,
                return_dict=False,
            )[0]
            latents = pipe.scheduler.step(pred, t, latents, return_dict=False)[0]

        latents = latents.reshape(1, n_h, n_w + 2, -1)[:, :, 1:-1].reshape(1, n_h * n_w, -1)
        latents = pipe._unpack_latents(latents, height, width + 1, pipe.vae_scale_factor)
        latents = latents / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
        image = pipe.vae.decode(latents, return_dict=False)[0]
    return (image[0].float() / 2 + 0.5).clamp(0, 1)


@pytest.fixture(scope="module")
def ours(tiny_paths):
    # vae_wrap off: the reference decodes with zero padding at the left/right edges
    return DiT360Pipeline.load(tiny_paths, device="cpu", dtype="fp32", vae_wrap=False)


def test_parity_pipeline_end_to_end(tiny_models, ours):
    noise = get_noise(1234, HEIGHT, WIDTH)
    expected = reference_dit360(
        tiny_models["flux"], tiny_models["lora"].parent, PROMPT, noise, STEPS, 2.8, WIDTH, HEIGHT
    )
    request = GenerateRequest(prompt=PROMPT, seed=1234, steps=STEPS, width=WIDTH, height=HEIGHT)
    steps_seen = []
    result = ours.generate(request, on_step=lambda s: steps_seen.append((s.index, s.total)))
    assert result.image.shape == (3, HEIGHT, WIDTH)
    err = ((result.image.double() - expected.double()).abs().max() / expected.double().abs().max()).item()
    assert err <= 1e-4, err
    assert steps_seen == [(i, STEPS) for i in range(1, STEPS + 1)]
    # the image is not trivially flat (a broken decode to a constant would make parity meaningless)
    assert result.image.std() > 0.05


def test_seed_reproducible_and_seed_sensitive(ours):
    request = GenerateRequest(prompt=PROMPT, seed=7, steps=2, width=WIDTH, height=HEIGHT)
    a = ours.generate(request).image
    b = ours.generate(request).image
    c = ours.generate(GenerateRequest(prompt=PROMPT, seed=8, steps=2, width=WIDTH, height=HEIGHT)).image
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 1e-2


def test_lora_strength_zero_differs_from_full(tiny_models, tiny_paths, ours):
    plain = DiT360Pipeline.load(tiny_paths, device="cpu", dtype="fp32", lora_strength=0.0, vae_wrap=False)
    assert plain.model_info["lora"] is None
    noise = get_noise(77, HEIGHT, WIDTH)
    request = GenerateRequest(prompt=PROMPT, seed=77, steps=STEPS, width=WIDTH, height=HEIGHT)
    without = plain.generate(request, latents=noise).image.double()
    with_lora = ours.generate(request, latents=noise).image.double()
    moved = ((with_lora - without).norm() / without.norm()).item()
    assert moved > 1e-3, moved  # the LoRA changes the image ...
    # ... and strength 0 is exactly the plain FLUX.1-dev run (diffusers without the adapter)
    expected = reference_dit360(tiny_models["flux"], None, PROMPT, noise, STEPS, 2.8, WIDTH, HEIGHT).double()
    err = ((without - expected).abs().max() / expected.abs().max()).item()
    assert err <= 1e-4, err


def test_wrap_decode_is_the_default_and_only_changes_the_edges(tiny_paths, ours):
    """With wrap on, the change is concentrated at the 0°/360° columns (GroupNorm and the mid
    attention are global, so the interior moves a little too)."""
    wrapped = DiT360Pipeline.load(tiny_paths, device="cpu", dtype="fp32")
    assert wrapped.vae_wrap and wrapped.model_info["vae_wrap"]
    request = GenerateRequest(prompt=PROMPT, seed=5, steps=2, width=WIDTH, height=HEIGHT)
    a = wrapped.generate(request).image
    b = ours.generate(request).image
    diff = (a - b).abs()
    edges = torch.cat([diff[..., :8], diff[..., -8:]], dim=-1).mean()
    assert edges > 1e-3
    assert edges > 5 * diff[..., 48:-48].mean()
