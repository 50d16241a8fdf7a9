"""A complete tiny FLUX.1-dev + DiT360 model set on disk, in the layouts users have.

`build_tiny_models(root)` writes, under `root`:

    FLUX.1-dev/  flux1-dev.safetensors (BFL single file), ae.safetensors (BFL VAE),
                 text_encoder/, tokenizer/, text_encoder_2/ (sharded), tokenizer_2/,
                 transformer/ and vae/ (diffusers folders: the reference pipeline loads these),
                 scheduler/, model_index.json
    DiT360/      adapter_model.safetensors + adapter_config.json (DiT360's PEFT export format)

The head dim is FLUX's 128 and the VAE uses FLUX's 32 norm groups, so our loaders need no
special arguments: the same code paths as the real 12B model, only smaller.
"""

from __future__ import annotations

from pathlib import Path

import torch
from flux_fixtures import save_tiny_lora, tiny_diffusers_transformer
from safetensors.torch import save_file
from test_parity_vae import _poison
from tiny_flux_repo import CLIP_DIM, T5_DIM, build_tiny_text_stack

from dit360_blender.pipeline.flux_checkpoint import iter_bfl_tensors
from dit360_blender.pipeline.vae_checkpoint import convert_diffusers_vae_to_bfl

TINY_VAE_CONFIG = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [32, 32, 64, 64],
    "layers_per_block": 1,
    "act_fn": "silu",
    "latent_channels": 16,
    "norm_num_groups": 32,
    "sample_size": 64,
    "scaling_factor": 0.3611,
    "shift_factor": 0.1159,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
    "mid_block_add_attention": True,
}


def tiny_vae(seed: int = 0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(**TINY_VAE_CONFIG)
    _poison(vae, seed)
    return vae.float().eval()


def tiny_transformer(seed: int = 0):
    """Head dim 128 with FLUX's RoPE axes [16, 56, 56]; 2 heads, one block of each kind."""
    return tiny_diffusers_transformer(
        seed=seed,
        heads=2,
        head_dim=128,
        axes=(16, 56, 56),
        depth=1,
        depth_single=1,
        txt_dim=T5_DIM,
        vec_dim=CLIP_DIM,
    )


def build_tiny_models(root: Path, seed: int = 0) -> dict:
    root = Path(root)
    flux = root / "FLUX.1-dev"
    build_tiny_text_stack(flux, seed=seed)
    transformer, vae = tiny_transformer(seed), tiny_vae(seed)
    transformer.save_pretrained(flux / "transformer", safe_serialization=True)
    vae.save_pretrained(flux / "vae", safe_serialization=True)
    bfl = dict(iter_bfl_tensors(flux / "transformer"))
    save_file({k: v.contiguous() for k, v in bfl.items()}, str(flux / "flux1-dev.safetensors"))
    ae = convert_diffusers_vae_to_bfl({k: v.contiguous() for k, v in vae.state_dict().items()})
    save_file(ae, str(flux / "ae.safetensors"))
    lora = save_tiny_lora(transformer, root / "DiT360", rank=4)
    return {
        "root": root,
        "flux": flux,
        "lora": lora,
        "transformer_module": transformer,
        "vae_module": vae,
    }
