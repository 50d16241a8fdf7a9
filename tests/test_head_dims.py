"""FLUX variants whose head dim is not 128: the RoPE axes come from the diffusers config.json.

A diffusers `transformer/` folder states `axes_dims_rope` in its config.json; the loader reads it
there, so such a model loads through the normal paths (the CLI/worker's model folders) with no
extra argument. A BFL single file has no config: for a non-128 head dim it is refused clearly.
"""

from __future__ import annotations

import json

import pytest
import torch
from flux_fixtures import TINY_AXES, save_layouts, save_tiny_lora, tiny_diffusers_transformer
from test_parity_pipeline import reference_dit360
from test_parity_transformer import rel_err, run_both
from tiny_flux_repo import CLIP_DIM, T5_DIM, build_tiny_text_stack
from tiny_models import tiny_vae

from dit360_blender.pipeline.dit360 import DiT360Pipeline, GenerateRequest
from dit360_blender.pipeline.errors import BadCheckpointError
from dit360_blender.pipeline.flux_checkpoint import load_flux_transformer
from dit360_blender.pipeline.model_files.download import resolve_model_paths
from dit360_blender.pipeline.sampling import get_noise

HEAD64_AXES = (8, 28, 28)


@pytest.fixture(scope="module")
def head16(tmp_path_factory):
    """Head dim 16 with the RoPE axes [4, 6, 6], in every layout."""
    model = tiny_diffusers_transformer(seed=3, axes=TINY_AXES)
    return model, save_layouts(model, tmp_path_factory.mktemp("head16"))


def test_diffusers_folder_loads_with_the_axes_of_its_config(head16):
    reference, layouts = head16
    assert json.loads((layouts["diffusers"] / "config.json").read_text())["axes_dims_rope"] == TINY_AXES
    ours = load_flux_transformer(layouts["diffusers"], dtype=torch.float32)  # no axes_dim given
    assert ours.params.axes_dim == TINY_AXES
    got, expected = run_both(ours, reference, 4, 8, wrap=True)
    assert rel_err(got, expected) <= 1e-5
    weights = layouts["diffusers"] / "diffusion_pytorch_model.safetensors"  # the folder's own file
    assert load_flux_transformer(weights, dtype=torch.float32).params.axes_dim == TINY_AXES


def test_single_file_without_config_is_refused_with_the_fix(head16):
    _, layouts = head16
    with pytest.raises(BadCheckpointError) as exc:
        load_flux_transformer(layouts["single"], dtype=torch.float32)
    assert "Head dim 16" in exc.value.message and "config.json" in exc.value.hint


@pytest.mark.parametrize(
    ("axes", "says"),
    [([4, 6, 8], "must sum to the head dim 16"), ("4,6,6", "not a list"), ([4, 6, -6], "not a list")],
)
def test_bad_axes_in_config_are_refused(head16, tmp_path, axes, says):
    _, layouts = head16
    folder = tmp_path / "transformer"
    folder.mkdir()
    for f in layouts["diffusers"].iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "axes_dims_rope": axes}))
    with pytest.raises(BadCheckpointError, match=says):
        load_flux_transformer(folder, dtype=torch.float32)


@pytest.fixture(scope="module")
def head64_models(tmp_path_factory):
    """A models folder like a diffusers download of FLUX.1-dev, with head dim 64 (axes 8/28/28):
    transformer/ and vae/ folders (no single files), the text stack, and the DiT360 LoRA."""
    root = tmp_path_factory.mktemp("head64")
    flux = root / "FLUX.1-dev"
    build_tiny_text_stack(flux, seed=0)
    transformer = tiny_diffusers_transformer(
        seed=4,
        heads=2,
        head_dim=64,
        axes=HEAD64_AXES,
        depth=1,
        depth_single=1,
        txt_dim=T5_DIM,
        vec_dim=CLIP_DIM,
    )
    transformer.save_pretrained(flux / "transformer", safe_serialization=True)
    tiny_vae(0).save_pretrained(flux / "vae", safe_serialization=True)
    lora = save_tiny_lora(transformer, root / "DiT360", rank=4)
    return root, flux, lora


def test_head_dim_64_generates_through_the_models_folder(head64_models):
    """The normal path (models folder → DiT360Pipeline.load, LoRA merged) against DiT360's pipeline."""
    root, flux, lora = head64_models
    paths = resolve_model_paths(models_dir=root)
    assert paths.transformer == flux / "transformer"
    pipe = DiT360Pipeline.load(paths, device="cpu", dtype="fp32", vae_wrap=False)
    assert pipe.transformer.params.axes_dim == list(HEAD64_AXES)
    prompt, width, height, steps = "This is a panorama image. A canyon at noon", 64, 32, 3
    expected = reference_dit360(
        flux, lora.parent, prompt, get_noise(9, height, width), steps, 2.8, width, height
    )
    got = pipe.generate(GenerateRequest(prompt=prompt, seed=9, steps=steps, width=width, height=height)).image
    assert got.std() > 0.05
    assert rel_err(got, expected) <= 1e-4
