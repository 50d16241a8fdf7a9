"""Tiny checkpoints in ComfyUI's layouts, written from a diffusers transformer and VAE.

* scaled fp8: block Linear weights in float8_e4m3fn divided by a per-tensor `.scale_weight`
  (absmax / 448) that multiplies them back, a `.scale_input` beside some, and the empty
  `scaled_fp8` marker tensor; everything under `model.diffusion_model.` when `prefix` is given;
* all-in-one: the transformer under `model.diffusion_model.`, the VAE (BFL keys) under `vae.`,
  and the text encoders under `text_encoders.clip_l.transformer.` / `text_encoders.t5xxl.transformer.`
  (or `cond_stage_model.…`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

FP8 = torch.float8_e4m3fn


def scaled_fp8_state(bfl: dict[str, torch.Tensor], prefix: str = "") -> tuple[dict, dict]:
    """(file tensors, the dequantised BFL weights a reader must see)."""
    out: dict[str, torch.Tensor] = {f"{prefix}scaled_fp8": torch.empty(0, dtype=FP8)}
    dequantised: dict[str, torch.Tensor] = {}
    for key, weight in bfl.items():
        if weight.ndim == 2 and key.startswith(("double_blocks.", "single_blocks.")):
            scale = weight.abs().amax().float() / 448.0
            q = (weight / scale).to(FP8)
            out[f"{prefix}{key}"] = q
            out[f"{prefix}{key[: -len('weight')]}scale_weight"] = scale.reshape(())
            if "attn" in key:
                out[f"{prefix}{key[: -len('weight')]}scale_input"] = torch.ones(())
            dequantised[key] = q.double() * scale.double()
        else:
            out[f"{prefix}{key}"] = weight.contiguous()
            dequantised[key] = weight.double()
    return out, dequantised


def write_all_in_one(
    path: Path,
    transformer: dict[str, torch.Tensor],
    vae: dict[str, torch.Tensor] | None,
    clip: dict[str, torch.Tensor] | None = None,
    t5: dict[str, torch.Tensor] | None = None,
    text_root: str = "text_encoders.",
) -> Path:
    state = {f"model.diffusion_model.{k}": v.contiguous() for k, v in transformer.items()}
    for prefix, part in (
        ("vae.", vae),
        (f"{text_root}clip_l.transformer.", clip),
        (f"{text_root}t5xxl.transformer.", t5),
    ):
        state.update({f"{prefix}{k}": v.contiguous() for k, v in (part or {}).items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path))
    return path
