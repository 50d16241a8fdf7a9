"""The worker's model cache keys on everything that changes the loaded model: the `compile` setting
and each model file's identity (size, times, inode), so a DiT360 LoRA saved again in place, even
with its old modification time, gives the new weights instead of the cached ones."""

from __future__ import annotations

import os
import shutil

import torch
from flux_fixtures import save_tiny_lora

from dit360_blender.pipeline.dit360 import DiT360Pipeline
from dit360_blender.pipeline.model_files.download import resolve_model_paths
from dit360_blender.protocol import check_generate_params
from dit360_blender.worker.jobs import ModelCache

KEY = "double_blocks.0.img_attn.qkv.weight"  # where the DiT360 LoRA is merged


def _getter(models, tmp_path):
    cache = ModelCache()
    base = {
        "prompt": "This is a panorama image. A quarry", "output_dir": str(tmp_path), "device": "cpu",
        "dtype": "fp32", "models": {"models_dir": str(models)},
    }  # fmt: skip

    def get(**over):
        return cache.get(check_generate_params({**base, **over}), on_load=lambda: None, on_download=None)

    return get


def test_a_compile_change_loads_anew(tiny_models, tmp_path):
    get = _getter(tiny_models["root"], tmp_path)
    assert get(compile="off")[1] is False
    assert get(compile="off")[1] is True
    assert get(compile="auto")[1] is False  # it used to be served from the cache, uncompiled


def test_a_lora_saved_again_in_place_with_its_old_mtime_loads_anew(tiny_models, tmp_path):
    models = tmp_path / "models"
    shutil.copytree(tiny_models["root"], models, ignore=shutil.ignore_patterns("transformer", "vae"))
    get = _getter(models, tmp_path)
    pipe, cached = get()
    old = pipe.transformer.state_dict()[KEY].clone()
    lora = models / "DiT360" / "adapter_model.safetensors"
    before = lora.stat()
    save_tiny_lora(tiny_models["transformer_module"], lora.parent, rank=4, seed=6)  # what a re-export does
    os.utime(lora, ns=(before.st_atime_ns, before.st_mtime_ns))  # as `cp -p` or an unpacker leaves it
    assert lora.stat().st_size == before.st_size and lora.stat().st_mtime_ns == before.st_mtime_ns
    pipe, cached = get()
    assert cached is False  # it used to say True and keep the old weights
    reference = DiT360Pipeline.load(
        resolve_model_paths(models_dir=models), device=torch.device("cpu"), dtype="fp32"
    )
    new = pipe.transformer.state_dict()[KEY]
    assert not torch.equal(new, old) and torch.equal(new, reference.transformer.state_dict()[KEY])
    assert get()[1] is True  # unchanged since: cached again
