"""The refine pass (pipeline/refine.py): FLUX img2img in overlapping tiles whose latents are averaged
every step, circular in the horizontal direction, on the tiny random FLUX/VAE/DiT360 models (CPU).

References: plain img2img written out from the pipeline's parts (VAE encode of the whole picture,
the strength's noise levels, Euler steps of the transformer over the whole latent grid, decode): what
one tile covering the picture must give; and the same pass on the picture and noise rolled by the
tile stride: the output rolled by it (the 0°/360° wrap is refined like any other place).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dit360_blender.pipeline.dit360 import T5_MAX_LENGTH, DiT360Pipeline
from dit360_blender.pipeline.img2img import encode_image, noise_to, strength_sigmas
from dit360_blender.pipeline.refine import Refiner, refine, tile_starts
from dit360_blender.pipeline.sampling import Cancelled, denoise, image_ids, pack, unpack

PROMPT = "This is a panorama image. A harbour"


@pytest.fixture(scope="module")
def pipe(tiny_paths):
    return DiT360Pipeline.load(tiny_paths, device="cpu", dtype="fp32", vae_wrap=True)


def picture(height: int, width: int, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.uniform(0.0, 1.0, (3, height, width))).float()


def noise_for(height: int, width: int, seed: int = 1) -> torch.Tensor:
    return torch.randn((1, 16, height // 8, width // 8), generator=torch.Generator().manual_seed(seed))


def plain_img2img(pipe, image, noise, steps, strength, guidance):
    _, height, width = image.shape
    gh, gw = height // 16, width // 16
    txt, vec = pipe.text_encoders.encode(PROMPT, max_length=T5_MAX_LENGTH)
    clean = encode_image(pipe.vae, image, pipe.device, pipe.dtype)
    sigmas = strength_sigmas(steps, strength, gh * gw)
    x = pack(noise_to(clean, noise, sigmas[0].item()))
    ids = image_ids(gh, gw)[None]
    x = denoise(pipe.transformer, x, ids, txt, torch.zeros(1, txt.shape[1], 3), vec, sigmas, guidance)
    with torch.inference_mode():
        out = pipe.vae.decode(unpack(x, gh, gw), wrap=pipe.vae_wrap)
    return (out[0].float() / 2 + 0.5).clamp(0, 1)


def test_one_tile_covering_the_picture_is_plain_img2img(pipe):
    image, noise = picture(64, 128), noise_for(64, 128)
    expected = plain_img2img(pipe, image, noise, steps=8, strength=0.5, guidance=2.8)
    got = refine(
        pipe, image, prompt=PROMPT, seed=0, steps=8, guidance=2.8, strength=0.5, tile=128, noise=noise
    )
    assert got.shape == image.shape and (got - expected).abs().max() < 1e-5
    assert (got - image).abs().mean() > 0.01  # the pass did change the picture


def test_tiles_are_circular_rolling_by_the_stride_rolls_the_output(pipe):
    image, noise = picture(128, 256, 2), noise_for(128, 256, 3)
    # 64 px tiles overlapping by 32: columns every 32 px around the whole width, rows at 0/32/64
    assert tile_starts(32, 8, 4, circular=True) == [0, 4, 8, 12, 16, 20, 24, 28]
    assert tile_starts(16, 8, 4, circular=False) == [0, 4, 8]
    seen = []
    kwargs = dict(prompt=PROMPT, seed=0, steps=4, guidance=2.8, strength=0.5, tile=64, overlap=32)
    plain = refine(pipe, image, noise=noise, on_progress=lambda *e: seen.append(e), **kwargs)
    assert seen[-1] == ("refine", 24 * 2, 24 * 2) and len(seen) == 48  # 24 tiles x 2 steps
    for shift in (32, 96):  # one and three strides, across the wrap
        rolled = refine(
            pipe, torch.roll(image, shift, dims=-1), noise=torch.roll(noise, shift // 8, dims=-1), **kwargs
        )
        assert (rolled - torch.roll(plain, shift, dims=-1)).abs().max() < 1e-5, shift
    # the overlaps are blended: the tiled pass is not one tile's img2img
    whole = refine(pipe, image, noise=noise, **{**kwargs, "tile": 256})
    assert (whole - plain).abs().max() > 1e-3


def test_seeded_refine_is_deterministic_and_cancel_stops_between_tile_steps(pipe):
    image = picture(64, 128, 4)
    refiner = Refiner(pipe, prompt=None, seed=7, steps=4, guidance=2.8, strength=0.3, tile=64, overlap=32)
    assert refiner.prompt == "This is a panorama image."
    first, second = refiner(image), refiner(image)
    assert torch.equal(first, second)
    calls = []

    def cancel_after_three() -> bool:
        calls.append(1)
        return len(calls) > 3

    with pytest.raises(Cancelled):
        refiner(image, should_cancel=cancel_after_three)


def test_make_upscale_refines_the_upscaled_picture_with_the_sources_prompt(pipe, tmp_path):
    from PIL import Image

    from dit360_blender.pipeline.image_io import read_png_metadata, save_png
    from dit360_blender.pipeline.make_upscale import UpscaleSettings, make_upscale, read_source
    from dit360_blender.pipeline.sr_models import LoadedSR
    from dit360_blender.pipeline.upscale import SuperResolution

    rgb = (picture(64, 128, 5).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    source = save_png(tmp_path / "src.png", rgb, {"prompt": PROMPT, "seed": 3})
    identity = torch.nn.Identity()  # "native": no super-resolution pass; the refine runs alone
    model = LoadedSR(
        SuperResolution(identity, 1, 0), source, "none", torch.float32, torch.device("cpu"), False, 0.0
    )
    refiner = Refiner(
        pipe,
        prompt=None,
        seed=9,
        steps=4,
        guidance=2.8,
        strength=0.5,
        source=str(source),
        tile=64,
        overlap=32,
    )
    seen = []
    made = make_upscale(
        source, model, tmp_path / "out.png", UpscaleSettings(size="native", tile=64, metadata={"refine": True}),
        refiner=refiner, hdr=False, exr=False, on_progress=lambda *e: seen.append(e),
    )  # fmt: skip
    assert refiner.prompt == PROMPT  # from the source PNG's metadata
    expected = refine(
        pipe,
        read_source(source)[0],
        prompt=PROMPT,
        seed=9,
        steps=4,
        guidance=2.8,
        strength=0.5,
        tile=64,
        overlap=32,
    )
    with Image.open(made.path) as im:
        got = np.asarray(im.convert("RGB")).astype(np.float64)
    assert np.abs(got - (expected.permute(1, 2, 0).numpy() * 255).round()).max() <= 1.0
    meta = read_png_metadata(made.path)
    assert meta["upscale"]["refine"] is True and meta["prompt"] == PROMPT and "refine_s" in made.timings
    assert seen[-1] == ("refine", 8, 8)  # 4 tiles around the width x 2 steps
