"""LoRAs for the FLUX transformer: the DiT360 adapter and the user's own, merged into BFL's weights.

Three file formats are read, each as diffusers' `load_lora_weights` reads it:

* diffusers / PEFT (DiT360's export): `transformer.<diffusers module>.lora_A/lora_B.weight`, alpha from
  an `.alpha` tensor or the `adapter_config.json` beside the file, else 1;
* kohya (sd-scripts, ai-toolkit's kohya export): `lora_unet_<BFL module with _>.lora_down/lora_up.weight`
  and `.alpha`, e.g. `lora_unet_double_blocks_0_img_attn_qkv`;
* BFL / ComfyUI: `diffusion_model.<BFL module>.lora_A/lora_B` (or `lora_down/lora_up`, `.alpha`).

Any Linear of the transformer may be a target: attention, MLPs, modulation, the text stream, the
embedders. A diffusers module is a row block of a fused BFL weight (`to_q` of `img_attn.qkv`); a
BFL or kohya module is the whole fused weight. Each LoRA has one strength. The update
`strength * alpha / r * B @ A` is merged in fp32 while the checkpoint is read
(`flux_checkpoint.load_flux_transformer(merge=...)`); beside weights that the file stores
quantised (fp8, GGUF) it runs as a low-rank side path instead (`LoraMerger.attach`).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import LoraMismatchError, WeightsMissingError
from .flux_checkpoint import FINAL_ADALN_BFL, FINAL_ADALN_DIFFUSERS, diffusers_stem_to_bfl, linear_map
from .flux_model import FluxParams
from .safetensors_io import load_state_dict

logger = logging.getLogger(__name__)

_LORA_KEY = re.compile(
    r"^(?P<stem>.+?)\.(?P<kind>lora_A|lora_B|lora_down|lora_up|alpha)(?:\.default)?(?:\.weight)?$"
)
_PREFIXES = ("base_model.model.", "transformer.", "model.diffusion_model.", "diffusion_model.", "lora_unet_")
_TEXT_ENCODER = ("lora_te", "text_encoder", "text_encoders.", "te1.", "te2.")
_UNSUPPORTED = ("dora_scale", ".diff", ".diff_b", ".lora_mid", ".hada_", ".lokr_")


@dataclass
class LoraModule:
    down: Tensor | None = None  # A: (r, in)
    up: Tensor | None = None  # B: (out, r)
    alpha: float | None = None


@dataclass
class Lora:
    """Low-rank updates keyed by module stem as the file names it, prefixes removed
    (`transformer_blocks.0.attn.to_q`, `double_blocks_0_img_attn_qkv`, `double_blocks.0.img_attn.qkv`)."""

    modules: dict[str, LoraModule]
    config_alpha: float | None = None
    config_rank: int | None = None
    path: Path | None = None
    skipped: list[str] = field(default_factory=list)  # text-encoder modules, not applied
    names: dict[str, str] = field(default_factory=dict)  # stem -> the module's name in the file

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
    path = _lora_file(Path(path))
    state = load_state_dict(path)
    unsupported = sorted(k for k in state if any(part in k for part in _UNSUPPORTED))
    if unsupported:
        raise LoraMismatchError(
            f"{path} is a DoRA/LyCORIS-style adapter ({unsupported[:3]}), not a plain LoRA.",
            "Use a plain LoRA (lora_A/lora_B or lora_down/lora_up weights), e.g. one saved by kohya's "
            "sd-scripts, ai-toolkit, diffusers or PEFT.",
        )
    modules: dict[str, LoraModule] = {}
    names: dict[str, str] = {}
    foreign, skipped = [], set()
    for key, tensor in state.items():
        match = _LORA_KEY.match(key)
        if not match:
            foreign.append(key)
            continue
        if match["stem"].startswith(_TEXT_ENCODER):
            skipped.add(match["stem"])
            continue
        stem = _strip(match["stem"])
        names[stem] = match["stem"]
        module = modules.setdefault(stem, LoraModule())
        kind = match["kind"]
        if kind in ("lora_A", "lora_down"):
            module.down = tensor
        elif kind in ("lora_B", "lora_up"):
            module.up = tensor
        else:
            module.alpha = float(tensor)
    incomplete = [stem for stem, m in modules.items() if m.down is None or m.up is None]
    if foreign or incomplete or not modules:
        raise LoraMismatchError(
            f"{path} is not a LoRA in a format read here: unrecognised keys {foreign[:5]}, "
            f"modules missing their down/up weights {incomplete[:5]}.",
            "Use a FLUX LoRA in the diffusers/PEFT, kohya or BFL/ComfyUI format "
            "(lora_A/lora_B or lora_down/lora_up weights).",
        )
    if skipped:
        logger.warning(
            "%s also trains the text encoder (%d modules, e.g. %s); only its transformer part is applied.",
            path.name,
            len(skipped),
            sorted(skipped)[0],
        )
    alpha, rank = _read_adapter_config(path.parent / "adapter_config.json")
    return Lora(modules, alpha, rank, path, sorted(skipped), names)


def _lora_file(path: Path) -> Path:
    if not path.is_dir():
        return path
    candidates = sorted(path.glob("*.safetensors"))
    if len(candidates) != 1:
        raise WeightsMissingError(
            f"Expected exactly one LoRA .safetensors in {path}, found {len(candidates)}.",
            "Point the LoRA setting at the .safetensors file itself.",
        )
    return candidates[0]


def _read_adapter_config(path: Path) -> tuple[float | None, int | None]:
    if not path.is_file():
        return None, None
    config = json.loads(path.read_text())
    alpha = config.get("lora_alpha")
    rank = config.get("r")
    return (float(alpha) if alpha is not None else None), (int(rank) if rank is not None else None)


# ---------------------------------------------------------------------------------------------
# Where each module lands in BFL's weights


@dataclass(frozen=True)
class _Target:
    key: str  # BFL weight key
    row: int  # first row of the block inside the weight
    rows: int  # rows of the block; -1: the whole weight
    swap_halves: bool = False  # diffusers' final adaLN keeps (scale, shift), BFL (shift, scale)


def target_table(params: FluxParams) -> dict[str, _Target]:
    """Every module name a LoRA may use (diffusers, BFL with dots, kohya with underscores) -> its place."""
    table: dict[str, _Target] = {}
    bfl_stems = [*linear_map(params.depth, params.depth_single_blocks), FINAL_ADALN_BFL]
    for stem in bfl_stems:
        whole = _Target(f"{stem}.weight", 0, -1)
        table[stem] = whole
        table[stem.replace(".", "_")] = whole
    for stem, (bfl, row, rows) in diffusers_stem_to_bfl(params).items():
        table[stem] = _Target(f"{bfl}.weight", row, rows)
    table[FINAL_ADALN_DIFFUSERS] = _Target(f"{FINAL_ADALN_BFL}.weight", 0, -1, swap_halves=True)
    return table


_FAMILIES = (  # (family, a pattern its module names have and FLUX's never do)
    (
        "Stable Diffusion XL",
        re.compile(r"^(lora_te2_|text_encoder_2\.)|(down|up)_?blocks.*transformer_blocks[._][1-9]"),
    ),
    ("Stable Diffusion 1.x/2.x", re.compile(r"(down|up|input|output)_?blocks|mid_?block|middle_block")),
    ("Stable Diffusion 3", re.compile(r"joint_blocks|context_block|x_block")),
    ("Wan / video DiT", re.compile(r"(^|\.)blocks[._]\d+[._](self|cross)_attn")),
)


def lora_family(stems: Sequence[str]) -> str | None:
    """The model family that unmatched module names belong to, when it can be told."""
    for family, pattern in _FAMILIES:
        if any(pattern.search(stem) for stem in stems):
            return family
    return None


# ---------------------------------------------------------------------------------------------
# Merging


@dataclass(frozen=True)
class _Update:
    row: int
    rows: int
    down: Tensor  # (r, in)
    up: Tensor  # (rows, r), halves already swapped where needed
    factor: float  # strength * alpha / r
    name: str


class LoraMerger:
    """The updates of one or more LoRAs (the DiT360 adapter, then the user's, each with its strength)."""

    def __init__(
        self,
        lora: Lora | None,
        params: FluxParams,
        strength: float = 1.0,
        extra: Sequence[tuple[Lora, float]] = (),
    ) -> None:
        self.loras = [(lora, strength)] if lora is not None else []
        self.loras += list(extra)
        table = target_table(params)
        self.updates: dict[str, list[_Update]] = {}
        self.merged: set[str] = set()
        for item, item_strength in self.loras:
            _refuse_unmatched(item, table)
            if item_strength == 0.0:
                continue
            for stem, module in item.modules.items():
                target = table[stem]
                up = _swap_halves(module.up) if target.swap_halves else module.up
                update = _Update(
                    target.row, target.rows, module.down, up, item_strength * item.scale_of(module), stem
                )
                self.updates.setdefault(target.key, []).append(update)

    def __call__(self, key: str, weight: Tensor) -> Tensor:
        """`weight` (fp32) with every update of `key` added, strength * alpha / r * B @ A."""
        if key not in self.updates:
            return weight
        weight = weight.clone() if weight.dtype == torch.float32 else weight.float()
        for update in self.updates[key]:
            delta = update.up.to(weight.device).float() @ update.down.to(weight.device).float()
            target = weight if update.rows < 0 else weight[update.row : update.row + update.rows]
            _check_shape(update, key, delta, target)
            target += update.factor * delta
            self.merged.add(update.name)
        return weight

    def attach(self, linear: nn.Module, key: str, dtype: torch.dtype) -> None:
        """Run the updates of `key` beside `linear` (whose weight stays quantised): out += up @ (down @ x)."""
        if key not in self.updates:
            return
        out_features, in_features = linear.out_features, linear.in_features
        downs, ups = [], []
        for update in self.updates[key]:
            rows = out_features if update.rows < 0 else update.rows
            delta_shape = (update.up.shape[0], update.down.shape[1])
            if delta_shape != (rows, in_features) or update.row + rows > out_features:
                raise _shape_error(update, key, delta_shape, (rows, in_features))
            up = torch.zeros(out_features, update.up.shape[1])
            up[update.row : update.row + rows] = update.up.float() * update.factor
            downs.append(update.down.float())
            ups.append(up)
            self.merged.add(update.name)
        device = linear.weight.device
        linear.lora = LowRankPath(torch.cat(downs).to(device, dtype), torch.cat(ups, dim=1).to(device, dtype))
        linear.register_forward_hook(_add_low_rank)


class LowRankPath(nn.Module):
    """x -> up @ (down @ x): a LoRA kept apart from a quantised weight (rank = all LoRAs' ranks)."""

    def __init__(self, down: Tensor, up: Tensor) -> None:
        super().__init__()
        self.register_buffer("down", down)
        self.register_buffer("up", up)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(F.linear(x, self.down.to(x.dtype)), self.up.to(x.dtype))


def _add_low_rank(module: nn.Module, args: tuple, output: Tensor) -> Tensor:
    return output + module.lora(args[0])


def _swap_halves(t: Tensor) -> Tensor:
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def _refuse_unmatched(lora: Lora, table: dict[str, _Target]) -> None:
    unmatched = sorted(lora.names.get(stem, stem) for stem in lora.modules if stem not in table)
    if not unmatched:
        return
    family = lora_family([*unmatched, *lora.skipped])
    what = f"a {family} LoRA, not a FLUX.1 one" if family else "not a LoRA for this FLUX transformer"
    raise LoraMismatchError(
        f"{lora.path} is {what}: {len(unmatched)} of its modules have no place in FLUX, e.g. {unmatched[:6]}.",
        "Use LoRAs trained for FLUX.1-dev (kohya, BFL/ComfyUI or diffusers format)."
        if family
        else "This LoRA was made for another model (or another FLUX size); use a FLUX.1-dev LoRA.",
    )


def _check_shape(update: _Update, key: str, delta: Tensor, target: Tensor) -> None:
    if delta.shape != target.shape:
        raise _shape_error(update, key, tuple(delta.shape), tuple(target.shape))


def _shape_error(update: _Update, key: str, got: tuple, want: tuple) -> LoraMismatchError:
    return LoraMismatchError(
        f"LoRA module {update.name} has shape {got}, but its target {key} rows need {want}.",
        "This LoRA was trained for a different FLUX size; use a LoRA for FLUX.1-dev.",
    )
