"""Tiny random LoRAs for a tiny FLUX, in the file formats people have.

* diffusers/PEFT: `transformer.<diffusers Linear>.lora_A/lora_B.weight` + `.alpha`;
* kohya: `lora_unet_<BFL Linear, dots as _>.lora_down/lora_up.weight` + `.alpha`;
* BFL/ComfyUI: `diffusion_model.<BFL Linear>.lora_down/lora_up.weight` (or lora_A/lora_B) + `.alpha`.

Every Linear of the transformer is a target (attention, MLPs, modulation, text stream, embedders,
final layer), with a random rank-4 update and a random alpha.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from dit360_blender.pipeline.flux_checkpoint import FINAL_ADALN_BFL, linear_map

RANK = 4


def _pair(gen: torch.Generator, out_features: int, in_features: int) -> tuple[torch.Tensor, torch.Tensor]:
    down = torch.randn(RANK, in_features, generator=gen) * 0.3
    up = torch.randn(out_features, RANK, generator=gen) * 0.3
    return down, up


def diffusers_lora(model, path: Path, seed: int = 0) -> Path:
    gen = torch.Generator().manual_seed(seed)
    # One alpha for the file: PEFT matches alphas by module-name suffix, so `proj_out` and
    # `single_transformer_blocks.N.proj_out` with different alphas would test PEFT, not us.
    alpha = torch.tensor(float(torch.randint(1, 9, (1,), generator=gen)))
    state = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            down, up = _pair(gen, module.out_features, module.in_features)
            state[f"transformer.{name}.lora_A.weight"] = down
            state[f"transformer.{name}.lora_B.weight"] = up
            state[f"transformer.{name}.alpha"] = alpha.clone()
    return _save(state, path)


def bfl_linears(bfl_state: dict[str, torch.Tensor]) -> dict[str, tuple[int, int]]:
    """BFL Linear stem -> (out, in), from a BFL checkpoint's weights."""
    depth = 1 + max(int(k.split(".")[1]) for k in bfl_state if k.startswith("double_blocks."))
    single = 1 + max(int(k.split(".")[1]) for k in bfl_state if k.startswith("single_blocks."))
    stems = [*linear_map(depth, single), FINAL_ADALN_BFL]
    return {stem: tuple(bfl_state[f"{stem}.weight"].shape) for stem in stems if f"{stem}.weight" in bfl_state}


def bfl_style_lora(
    bfl_state: dict[str, torch.Tensor],
    path: Path,
    style: str,
    seed: int = 0,
    down_up=("lora_down", "lora_up"),
) -> Path:
    """`style` "kohya" (lora_unet_ + underscores) or "comfy" (diffusion_model. + dots)."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for stem, (out_features, in_features) in bfl_linears(bfl_state).items():
        name = f"lora_unet_{stem.replace('.', '_')}" if style == "kohya" else f"diffusion_model.{stem}"
        down, up = _pair(gen, out_features, in_features)
        state[f"{name}.{down_up[0]}.weight"] = down
        state[f"{name}.{down_up[1]}.weight"] = up
        state[f"{name}.alpha"] = torch.tensor(float(torch.randint(1, 9, (1,), generator=gen)))
    return _save(state, path)


def _save(state: dict[str, torch.Tensor], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path
