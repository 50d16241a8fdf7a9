"""The DiT360 LoRA (a PEFT/diffusers file) merged into the fused BFL weights.

DiT360 trains `attn.to_q/to_k/to_v/to_out.0`; in BFL's layout those are row blocks of the
double blocks' `img_attn.qkv` and of the single blocks' `linear1`, and the whole of
`img_attn.proj`. Any other diffusers Linear of the transformer maps through the same table, so
other FLUX LoRAs in the diffusers format merge too. Merging happens in fp32, per tensor, while
the checkpoint is read (see `flux_checkpoint.load_flux_transformer(merge=...)`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from .errors import LoraMismatchError, WeightsMissingError
from .flux_checkpoint import diffusers_stem_to_bfl
from .flux_model import FluxParams
from .safetensors_io import load_state_dict

_LORA_KEY = re.compile(
    r"^(?P<stem>.+?)\.(?P<kind>lora_A|lora_B|lora_down|lora_up|alpha)(?:\.default)?(?:\.weight)?$"
)
_PREFIXES = ("base_model.model.", "transformer.", "diffusion_model.")


@dataclass
class LoraModule:
    down: Tensor | None = None  # A: (r, in)
    up: Tensor | None = None  # B: (out, r)
    alpha: float | None = None


@dataclass
class Lora:
    """Low-rank updates keyed by diffusers module stem, e.g. `transformer_blocks.0.attn.to_q`."""

    modules: dict[str, LoraModule]
    config_alpha: float | None = None
    config_rank: int | None = None
    path: Path | None = None

    def scale_of(self, module: LoraModule) -> float:
        """alpha / r: per-module alpha if stored, else adapter_config.json's, else 1.0 (diffusers)."""
        rank = module.down.shape[0]
        if module.alpha is not None:
            return module.alpha / rank
        if self.config_alpha is not None:
            return self.config_alpha / (self.config_rank or rank)
        return 1.0


def _strip(stem: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in _PREFIXES:
            if stem.startswith(prefix):
                stem, changed = stem[len(prefix) :], True
    return stem


def load_lora(path: Path) -> Lora:
    """Read a LoRA .safetensors (and the adapter_config.json beside it, if any)."""
    path = Path(path)
    if path.is_dir():
        candidates = sorted(path.glob("*.safetensors"))
        if len(candidates) != 1:
            raise WeightsMissingError(
                f"Expected exactly one LoRA .safetensors in {path}, found {len(candidates)}.",
                "Point the LoRA setting at the DiT360 adapter .safetensors file itself.",
            )
        path = candidates[0]
    state = load_state_dict(path)
    modules: dict[str, LoraModule] = {}
    foreign = []
    for key, tensor in state.items():
        match = _LORA_KEY.match(key)
        if not match:
            foreign.append(key)
            continue
        module = modules.setdefault(_strip(match["stem"]), LoraModule())
        kind = match["kind"]
        if kind in ("lora_A", "lora_down"):
            module.down = tensor
        elif kind in ("lora_B", "lora_up"):
            module.up = tensor
        else:
            module.alpha = float(tensor)
    incomplete = [stem for stem, m in modules.items() if m.down is None or m.up is None]
    if foreign or incomplete:
        raise LoraMismatchError(
            f"{path} is not a LoRA in the PEFT/diffusers format: unrecognised keys {foreign[:5]}, "
            f"modules missing lora_A or lora_B {incomplete[:5]}.",
            "Use the DiT360 adapter (adapter_model.safetensors from "
            "Insta360-Research/DiT360-Panorama-Image-Generation).",
        )
    alpha, rank = _read_adapter_config(path.parent / "adapter_config.json")
    return Lora(modules=modules, config_alpha=alpha, config_rank=rank, path=path)


def _read_adapter_config(path: Path) -> tuple[float | None, int | None]:
    if not path.is_file():
        return None, None
    config = json.loads(path.read_text())
    alpha = config.get("lora_alpha")
    rank = config.get("r")
    return (float(alpha) if alpha is not None else None), (int(rank) if rank is not None else None)


class LoraMerger:
    """A `merge(key, fp32_weight)` hook adding strength * scale * B @ A into the right rows."""

    def __init__(self, lora: Lora, params: FluxParams, strength: float = 1.0) -> None:
        self.lora = lora
        self.strength = strength
        table = diffusers_stem_to_bfl(params)
        unmatched = sorted(stem for stem in lora.modules if stem not in table)
        if unmatched:
            raise LoraMismatchError(
                f"{len(unmatched)} LoRA modules of {lora.path} have no place in this FLUX transformer, "
                f"e.g. {unmatched[:6]}.",
                "This LoRA was made for another model (or another FLUX size); use the DiT360 LoRA for FLUX.1-dev.",
            )
        self.targets: dict[str, list[tuple[int, int, str]]] = {}
        for stem in lora.modules:
            bfl, row, rows = table[stem]
            self.targets.setdefault(f"{bfl}.weight", []).append((row, rows, stem))
        self.merged: set[str] = set()

    def __call__(self, key: str, weight: Tensor) -> Tensor:
        if key not in self.targets or self.strength == 0.0:
            return weight
        weight = weight.clone() if weight.dtype == torch.float32 else weight.float()
        for row, rows, stem in self.targets[key]:
            module = self.lora.modules[stem]
            delta = module.up.to(weight.device).float() @ module.down.to(weight.device).float()
            expected_rows = weight.shape[0] if rows < 0 else rows
            if delta.shape != (expected_rows, weight.shape[1]):
                raise LoraMismatchError(
                    f"LoRA module {stem} has shape {tuple(delta.shape)}, but its target {key} rows need "
                    f"{(expected_rows, weight.shape[1])}.",
                    "This LoRA was trained for a different FLUX size; use the DiT360 LoRA for FLUX.1-dev.",
                )
            target = weight if rows < 0 else weight[row : row + rows]
            target += (self.strength * self.lora.scale_of(module)) * delta
            self.merged.add(stem)
        return weight
