"""Tiny random FLUX transformers in the real checkpoint layouts, built with diffusers."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from dit360_blender.pipeline.flux_checkpoint import convert_bfl_to_diffusers, iter_bfl_tensors
from dit360_blender.pipeline.flux_model import FluxParams

TINY_AXES = [4, 6, 6]


def tiny_diffusers_transformer(
    seed: int = 0,
    heads: int = 2,
    head_dim: int = 16,
    axes=TINY_AXES,
    depth=2,
    depth_single=2,
    txt_dim=32,
    vec_dim=24,
):
    """A diffusers FluxTransformer2DModel with every weight poisoned by random values."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    model = FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,
        num_layers=depth,
        num_single_layers=depth_single,
        attention_head_dim=head_dim,
        num_attention_heads=heads,
        joint_attention_dim=txt_dim,
        pooled_projection_dim=vec_dim,
        guidance_embeds=True,
        axes_dims_rope=tuple(axes),
    )
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and ("norm" in name):
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=gen))
            else:
                fan_in = p.shape[1] if p.ndim == 2 else 1
                p.copy_(torch.randn(p.shape, generator=gen) / fan_in**0.5)
    return model.eval()


def tiny_params(model) -> FluxParams:
    c = model.config
    return FluxParams(
        in_channels=64,
        out_channels=64,
        vec_in_dim=c.pooled_projection_dim,
        context_in_dim=c.joint_attention_dim,
        hidden_size=c.num_attention_heads * c.attention_head_dim,
        mlp_ratio=4.0,
        num_heads=c.num_attention_heads,
        depth=c.num_layers,
        depth_single_blocks=c.num_single_layers,
        axes_dim=list(c.axes_dims_rope),
    )


def save_layouts(model, root: Path) -> dict[str, Path]:
    """The same weights as a diffusers folder, a BFL single file (prefixed) and an fp8 BFL file."""
    root.mkdir(parents=True, exist_ok=True)
    folder = root / "transformer"
    model.save_pretrained(folder, safe_serialization=True)
    bfl = dict(iter_bfl_tensors(folder))
    single = root / "flux1-dev.safetensors"
    save_file({k: v.contiguous() for k, v in bfl.items()}, str(single))
    prefixed = root / "flux1-dev-aio.safetensors"
    save_file({f"model.diffusion_model.{k}": v.contiguous() for k, v in bfl.items()}, str(prefixed))
    fp8 = root / "flux1-dev-fp8.safetensors"
    save_file(
        {k: (v.to(torch.float8_e4m3fn) if v.ndim == 2 else v).contiguous() for k, v in bfl.items()}, str(fp8)
    )
    return {"diffusers": folder, "single": single, "prefixed": prefixed, "fp8": fp8}


def diffusers_state_from_bfl(bfl: dict, params: FluxParams) -> dict:
    return convert_bfl_to_diffusers(bfl, params)


def dit360_lora_stems(depth: int, depth_single: int) -> list[str]:
    """The modules DiT360's LoRA trains: attn.to_q/k/v/to_out.0 (single blocks have no to_out)."""
    stems = [
        f"transformer_blocks.{i}.attn.{m}" for i in range(depth) for m in ("to_q", "to_k", "to_v", "to_out.0")
    ]
    stems += [
        f"single_transformer_blocks.{i}.attn.{m}"
        for i in range(depth_single)
        for m in ("to_q", "to_k", "to_v")
    ]
    return stems


def save_tiny_lora(model, folder: Path, rank: int = 4, alpha: int | None = None, seed: int = 5) -> Path:
    """A LoRA in DiT360's export format: `transformer.<module>.lora_A/lora_B.weight` + adapter_config.json."""
    import json

    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    state = {}
    modules = dict(model.named_modules())
    for stem in dit360_lora_stems(model.config.num_layers, model.config.num_single_layers):
        linear = modules[stem]
        state[f"transformer.{stem}.lora_A.weight"] = (
            torch.randn(rank, linear.in_features, generator=gen) * 0.3
        )
        state[f"transformer.{stem}.lora_B.weight"] = (
            torch.randn(linear.out_features, rank, generator=gen) * 0.3
        )
    path = folder / "adapter_model.safetensors"
    save_file(state, str(path))
    config = {
        "r": rank,
        "lora_alpha": alpha if alpha is not None else rank,
        "target_modules": ["attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0"],
        "peft_type": "LORA",
        "bias": "none",
    }
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return path
