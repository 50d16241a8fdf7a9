"""The worker's model cache with user LoRAs: the loaded pipeline is reused for the same files and
strengths, and loaded anew when a strength changes or a LoRA file is saved again under its name."""

from __future__ import annotations

import os

import torch
from lora_files import bfl_style_lora
from safetensors.torch import load_file

from dit360_blender.protocol import check_generate_params
from dit360_blender.worker.jobs import ModelCache


def test_model_cache_key_follows_the_lora_files_and_strengths(tiny_models, tmp_path):
    flux = load_file(str(tiny_models["flux"] / "flux1-dev.safetensors"))
    user = bfl_style_lora(flux, tmp_path / "style.safetensors", "kohya", seed=1)
    base = {
        "prompt": "This is a panorama image. A beach",
        "output_dir": str(tmp_path),
        "device": "cpu",
        "dtype": "fp32",
        "models": {"models_dir": str(tiny_models["root"])},
    }
    cache = ModelCache()
    loads = []

    def get(**over):
        params = check_generate_params({**base, **over})
        return cache.get(params, on_load=lambda: loads.append(1), on_download=None)

    pipe, cached = get(loras=[{"path": str(user), "strength": 0.5}])
    assert not cached and pipe.model_info["loras"] == [{"file": "style.safetensors", "strength": 0.5}]
    key = "double_blocks.0.img_attn.qkv.weight"
    first = pipe.transformer.state_dict()[key].clone()
    assert get(loras=[{"path": str(user), "strength": 0.5}])[1] is True
    assert get(loras=[{"path": str(user), "strength": 0.7}])[1] is False

    # the same name saved again (as a training run does): the new file's weights are loaded
    stat = user.stat()
    bfl_style_lora(flux, user, "kohya", seed=2)
    os.utime(user, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    pipe, cached = get(loras=[{"path": str(user), "strength": 0.5}])
    assert not cached and not torch.equal(pipe.transformer.state_dict()[key], first)
    assert get()[1] is False  # and without it, a plain DiT360 pipeline again
    assert len(loads) == 4
