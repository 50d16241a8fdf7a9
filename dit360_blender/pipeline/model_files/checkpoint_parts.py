"""Which FLUX parts a single checkpoint file holds, read from its safetensors header alone.

ComfyUI's all-in-one checkpoints keep the transformer under ``model.diffusion_model.``, the VAE
(BFL keys) under ``vae.`` (older files: ``first_stage_model.``) and the text encoders under
``text_encoders.clip_l.`` / ``text_encoders.t5xxl.`` (older files: ``cond_stage_model.…``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .safetensors_header import safetensors_keys

_TRANSFORMER = ("model.diffusion_model.", "diffusion_model.", "double_blocks.", "transformer_blocks.")
_VAE = ("vae.encoder.", "vae.decoder.", "first_stage_model.encoder.", "first_stage_model.decoder.")
_TEXT_ROOTS = ("text_encoders.", "cond_stage_model.")


@dataclass(frozen=True)
class CheckpointParts:
    """What one file holds; `all_in_one` when it is more than a transformer."""

    transformer: bool
    vae: bool
    clip_l: bool
    t5xxl: bool

    @property
    def all_in_one(self) -> bool:
        return self.transformer and (self.vae or self.clip_l or self.t5xxl)

    def described(self) -> str:
        """The parts held, in words: "the transformer, the VAE and CLIP-L"."""
        names = [
            name
            for name, held in (
                ("the transformer", self.transformer),
                ("the VAE", self.vae),
                ("CLIP-L", self.clip_l),
                ("T5-XXL", self.t5xxl),
            )
            if held
        ]
        return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def checkpoint_parts(path: Path) -> CheckpointParts | None:
    """The parts of a complete safetensors file; None for a folder or an unusable file."""
    path = Path(path)
    keys = safetensors_keys(path) if path.is_file() else None
    if keys is None:
        return None

    def has(prefixes: tuple[str, ...]) -> bool:
        return any(k.startswith(prefixes) for k in keys)

    return CheckpointParts(
        transformer=has(_TRANSFORMER),
        vae=has(_VAE),
        clip_l=has(tuple(f"{root}clip_l." for root in _TEXT_ROOTS)),
        t5xxl=has(tuple(f"{root}t5xxl." for root in _TEXT_ROOTS)),
    )
