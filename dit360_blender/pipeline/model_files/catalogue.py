"""What the model files are: the FLUX.1-dev components and the DiT360 LoRA, their repos and layout.

What is needed (about 34 GB), and nothing more:

* from ``black-forest-labs/FLUX.1-dev`` (gated: an account, an accepted licence and a token):
  ``flux1-dev.safetensors`` (transformer, BFL single-file layout), ``ae.safetensors`` (VAE),
  ``text_encoder/`` (CLIP-L), ``tokenizer/``, ``text_encoder_2/`` (T5-XXL encoder, 2 shards) and
  ``tokenizer_2/``. The diffusers ``transformer/`` and ``vae/`` folders of that repo hold the same
  weights again and are never downloaded.
* from ``Insta360-Research/DiT360-Panorama-Image-Generation`` (public): the LoRA ``.safetensors``
  and its ``adapter_config.json`` when the repo has one.

A models folder is laid out like the two repos::

    models_dir/
      FLUX.1-dev/                        files of black-forest-labs/FLUX.1-dev, same relative paths
        flux1-dev.safetensors            transformer                  23.8 GB
        ae.safetensors                   VAE                           0.34 GB
        text_encoder/                    config.json, model.safetensors            (CLIP-L, 0.25 GB)
        tokenizer/                       vocab.json, merges.txt, tokenizer_config.json, ...
        text_encoder_2/                  config.json, model.safetensors.index.json,
                                         model-00001-of-00002.safetensors, model-00002-of-00002.safetensors
                                                                                   (T5-XXL encoder, 9.5 GB)
        tokenizer_2/                     spiece.model, tokenizer.json, tokenizer_config.json, ...
      DiT360/                            files of Insta360-Research/DiT360-Panorama-Image-Generation
        adapter_model.safetensors        the LoRA (whatever .safetensors name the repo uses)
        adapter_config.json              when the repo has one
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

FLUX_REPO = "black-forest-labs/FLUX.1-dev"
LORA_REPO = "Insta360-Research/DiT360-Panorama-Image-Generation"
FLUX_DIR = "FLUX.1-dev"
LORA_DIR = "DiT360"

COMPONENTS = ("transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "lora")

FLUX_LICENSE_URL = "https://huggingface.co/black-forest-labs/FLUX.1-dev"
TOKENS_URL = "https://huggingface.co/settings/tokens"

# Repo files downloaded for each component (fnmatch patterns on the repo's file names).
PATTERNS: dict[str, tuple[str, ...]] = {
    "transformer": ("flux1-dev.safetensors",),
    "vae": ("ae.safetensors",),
    "text_encoder": (
        "text_encoder/config.json",
        "text_encoder/model.safetensors",
        "text_encoder/model.safetensors.index.json",
        "text_encoder/model-*-of-*.safetensors",
    ),
    "tokenizer": ("tokenizer/*",),
    "text_encoder_2": (
        "text_encoder_2/config.json",
        "text_encoder_2/model.safetensors",
        "text_encoder_2/model.safetensors.index.json",
        "text_encoder_2/model-*-of-*.safetensors",
    ),
    "tokenizer_2": ("tokenizer_2/*",),
    "lora": ("*.safetensors", "adapter_config.json"),
}

# The files as they are in the repos (for messages telling what to copy where).
KNOWN_FILES: dict[str, tuple[str, ...]] = {
    "transformer": ("flux1-dev.safetensors",),
    "vae": ("ae.safetensors",),
    "text_encoder": ("text_encoder/config.json", "text_encoder/model.safetensors"),
    "tokenizer": (
        "tokenizer/merges.txt",
        "tokenizer/special_tokens_map.json",
        "tokenizer/tokenizer_config.json",
        "tokenizer/vocab.json",
    ),
    "text_encoder_2": (
        "text_encoder_2/config.json",
        "text_encoder_2/model-00001-of-00002.safetensors",
        "text_encoder_2/model-00002-of-00002.safetensors",
        "text_encoder_2/model.safetensors.index.json",
    ),
    "tokenizer_2": (
        "tokenizer_2/special_tokens_map.json",
        "tokenizer_2/spiece.model",
        "tokenizer_2/tokenizer.json",
        "tokenizer_2/tokenizer_config.json",
    ),
    "lora": ("adapter_model.safetensors", "adapter_config.json"),
}

APPROX_GB = {
    "transformer": 23.8,
    "vae": 0.34,
    "text_encoder": 0.25,
    "tokenizer": 0.01,
    "text_encoder_2": 9.52,
    "tokenizer_2": 0.01,
    "lora": 0.3,
}

DOWNLOAD_HOW = (
    "run the worker with the `--download` flag, or press the download button in the add-on "
    "Preferences (Models)"
)
GATED_HINT = (
    f"Log in at huggingface.co, open {FLUX_LICENSE_URL} and accept the FLUX.1 [dev] licence; "
    f"create a read token at {TOKENS_URL}; set it as the HF_TOKEN environment variable or in the "
    "add-on Preferences (Hugging Face token), then retry."
)


@dataclass
class ModelPaths:
    """Where each component was found (or downloaded to)."""

    transformer: Path  # flux1-dev.safetensors file (or a diffusers transformer/ folder when given explicitly)
    vae: Path  # ae.safetensors file (or a diffusers vae/ folder)
    text_encoder: Path  # folder (or an all-in-one checkpoint holding CLIP-L)
    tokenizer: Path  # folder
    text_encoder_2: Path  # folder (or an all-in-one checkpoint holding T5-XXL)
    tokenizer_2: Path  # folder
    lora: Path | None  # the LoRA .safetensors file (adapter_config.json beside it when the repo has one)

    def as_dict(self) -> dict[str, Path | None]:
        return {c: getattr(self, c) for c in COMPONENTS}


def repo_of(component: str) -> str:
    """The Hub repository a component comes from."""
    return LORA_REPO if component == "lora" else FLUX_REPO


def folder_of(component: str) -> str:
    """The sub-folder of a models folder that holds a component (the repo's files)."""
    return LORA_DIR if component == "lora" else FLUX_DIR


def pick_lora(names: Iterable[str]) -> str | None:
    """The LoRA among a repo's / folder's files: top level first, then the usual adapter names."""

    def rank(name: str) -> tuple[int, int, str]:
        base = name.rsplit("/", 1)[-1].lower()
        if base == "adapter_model.safetensors":
            kind = 0
        elif base == "pytorch_lora_weights.safetensors":
            kind = 1
        elif "lora" in base or "dit360" in base:
            kind = 2
        else:
            kind = 3
        return (name.count("/"), kind, name)

    candidates = [n for n in names if n.lower().endswith(".safetensors")]
    return min(candidates, key=rank) if candidates else None


def placement(components: Iterable[str], models_dir: Path | None) -> str:
    """Which file goes where, for copying by hand."""
    base = str(models_dir) if models_dir is not None else "<models folder>"
    lines = []
    for c in components:
        if c == "upscale model":  # the default super-resolution model (sr_catalogue.py)
            from .sr_catalogue import SR_DIR, SR_FILE, SR_URL

            lines.append(f"    {os.path.join(base, SR_DIR, SR_FILE)}  <- {SR_URL}")
            continue
        if c == "lora":
            lines.append(
                f"    {os.path.join(base, LORA_DIR, 'adapter_model.safetensors')}  <- the LoRA .safetensors of "
                f"https://huggingface.co/{LORA_REPO} (keep its name; adapter_config.json beside it if the repo "
                "has one)"
            )
            continue
        for f in KNOWN_FILES[c]:
            lines.append(
                f"    {os.path.join(base, FLUX_DIR, *f.split('/'))}  <- {FLUX_LICENSE_URL}/resolve/main/{f}"
            )
    if models_dir is None:
        lines.append("    and set that folder as the models folder (add-on Preferences, or `--models-dir`).")
    return "\n".join(lines)
