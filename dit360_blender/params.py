"""Every job parameter, declared once. Standard library only (a leaf: it imports nothing of ours).

Who reads this table: the protocol validates `generate` params with `check_params`; the client's
`Job` takes its names and defaults; the CLI makes its options from it (`cli` flags); the Blender
property groups and preferences make their properties from it (`blender` says where); the
pipeline's `GenerateRequest` checks its values with `check_values`; the worker reads the validated
values by these names. Adding a parameter is one `Param(...)` here plus its use.

Blender's IntProperty is 32-bit, so an int whose range is wider is capped at ``INT32_MAX`` there, and
a nullable number is shown as 0 meaning "none" (both are stated by `blender_range`).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

INT32_MAX = 2**31 - 1
MAX_LORAS = 16  # more is a mistake: each one adds its update to the weights
MAX_PROMPT_CHARS = 4000  # T5 reads 512 tokens; anything much longer is a mistake, not a prompt
SIZE_MULTIPLE = 16  # one transformer token covers 16x16 pixels


class ParamError(ValueError):
    """A parameter value that is refused: `message` says what, `hint` the fix."""

    code = "bad_parameters"

    def __init__(self, message: str, hint: str) -> None:
        super().__init__(f"{message}\n  fix: {hint}")
        self.message, self.hint = message, hint


@dataclass(frozen=True)
class Choice:
    value: str
    label: str
    help: str = ""


@dataclass(frozen=True)
class Param:
    """One parameter. `kind`: str | int | float | bool | choice | object | loras.

    `loras` is a list of {path, strength}; `minimum`/`maximum` bound each strength."""

    name: str
    kind: str
    default: Any
    label: str
    help: str
    minimum: float | None = None
    maximum: float | None = None
    soft_min: float | None = None  # Blender slider range; defaults to the hard range
    soft_max: float | None = None
    unit: str = ""
    choices: tuple[Choice, ...] = ()
    pattern: str | None = None  # a str/choice value that matches this is accepted too
    nullable: bool = False
    required: bool = False
    multiple_of: int | None = None
    jobs: frozenset[str] = frozenset({"generate"})
    cli: str | None = None  # "--steps"; "" = positional; None = not on the command line
    blender: str | None = None  # "scene" (panel, saved in the .blend) | "prefs" | None

    @property
    def choice_values(self) -> tuple[str, ...]:
        return tuple(c.value for c in self.choices)

    def blender_range(self) -> tuple[float | None, float | None]:
        """(min, max) as a Blender property can hold them (see the module doc)."""
        low = 0 if self.nullable else self.minimum
        high = self.maximum
        if self.kind == "int" and high is not None:
            high = min(high, INT32_MAX)
        return low, high


def _choices(*items: tuple[str, str, str]) -> tuple[Choice, ...]:
    return tuple(Choice(*item) for item in items)


GENERATE = "generate"

PARAMS: tuple[Param, ...] = (
    Param(
        "prompt", "str", None, "Prompt",
        "What the 360° world shows. DiT360 was trained on prompts starting with 'This is a panorama image.'",
        required=True, cli="", blender="scene",
    ),
    Param(
        "output_dir", "str", None, "Output Folder",
        "Where the images are written (an absolute folder path)",
        required=True, blender="scene",
    ),
    Param(
        "seed", "int", 0, "Seed", "The same seed and settings give the same world on any device",
        minimum=0, maximum=2**63 - 1, cli="--seed", blender="scene",
    ),
    Param(
        "steps", "int", 28, "Steps", "Sampling steps (DiT360: 28)",
        minimum=1, maximum=1000, soft_max=60, cli="--steps", blender="scene",
    ),
    Param(
        "guidance", "float", 2.8, "Guidance", "Embedded guidance (DiT360: 2.8)",
        minimum=0.0, maximum=20.0, soft_max=10.0, cli="--guidance", blender="scene",
    ),
    Param(
        "width", "int", 2048, "Width", "Twice the height, a multiple of 16 (DiT360: 2048)",
        minimum=2 * SIZE_MULTIPLE, maximum=8192, multiple_of=SIZE_MULTIPLE, unit="px",
        cli="--width", blender="scene",
    ),
    Param(
        "height", "int", 1024, "Height", "Half the width, a multiple of 16 (DiT360: 1024)",
        minimum=SIZE_MULTIPLE, maximum=4096, multiple_of=SIZE_MULTIPLE, unit="px",
        cli="--height", blender="scene",
    ),
    Param(
        "lora_strength", "float", 1.0, "LoRA Strength",
        "How strongly the DiT360 panorama LoRA applies (1.0 as trained, 0 = plain FLUX.1-dev)",
        minimum=-4.0, maximum=4.0, soft_min=0.0, soft_max=2.0, cli="--lora-strength", blender="scene",
    ),
    Param(
        "loras", "loras", (), "Extra LoRAs",
        "Your own FLUX LoRAs on top of DiT360 (kohya, BFL/ComfyUI or diffusers .safetensors), "
        "each with a strength; on the command line FILE[:STRENGTH], repeatable",
        minimum=-4.0, maximum=4.0, cli="--lora-extra",
    ),
    Param(
        "sun_share", "float", 0.6, "Sun Share",
        "The share of the HDR environment's light that a detected sun gets (it is brightened to it, "
        "never darkened); 0: the sun as bright as the image shows it",
        minimum=0.0, maximum=0.95, cli="--sun-share", blender="scene",
    ),
    Param(
        "step_cache", "float", 0.0, "Step Cache",
        "Skip the transformer's later blocks on steps where its first block changes less than this "
        "(relative; First-Block Cache): faster, slightly different images; 0 = off, 0.05-0.15 typical",
        minimum=0.0, maximum=1.0, cli="--step-cache",
    ),
    Param(
        "speed", "choice", "faithful", "Speed",
        "Faithful: DiT360 as published; Fast: fp8 transformer (where the memory mode is Auto); "
        "Fastest: Fast plus the step cache (threshold 0.1 unless set)",
        choices=_choices(
            ("faithful", "Faithful", "DiT360 as published (bf16/fp16 when the card has room)"),
            ("fast", "Fast", "fp8 transformer weights and matmuls; the image differs slightly"),
            ("fastest", "Fastest", "Fast plus the step cache: about half the transformer evaluations"),
        ),
        cli="--speed", blender="scene",
    ),
    Param(
        "hdr", "bool", True, "HDR Files",
        "Also write <name>.hdr and <name>_lighting.hdr (the sun clamped) beside the PNG",
        cli="--no-hdr",
    ),
    Param(
        "exr", "bool", True, "EXR Files",
        "Also write the HDR environments as half-float OpenEXR (<name>.exr, <name>_lighting.exr, ZIP) "
        "beside the .hdr files; Blender's World uses them when present",
        cli="--no-exr",
    ),
    Param(
        "cubemap", "choice", "none", "Cube Map",
        "Also write the panorama as a cube map beside it, as PNG and (with the EXR files) the HDR "
        "environment as EXR; OpenGL/DirectX/Unity faces, Y up (README: Cube maps)",
        choices=_choices(
            ("none", "None", "no cube map"),
            ("faces", "Faces", "six files <name>_cube_px, _nx, _py, _ny, _pz, _nz"),
            ("cross", "Cross", "one 4x3 horizontal cross <name>_cube_cross"),
        ),
        cli="--cubemap",
    ),
    Param(
        "filename", "str", None, "File Name",
        "A plain file stem (letters, digits, spaces, '.', '-', '_'); default <prompt-slug>_<seed>",
        nullable=True,
    ),
    Param(
        "device", "choice", "auto", "Device", "Where the model runs",
        choices=_choices(
            ("auto", "Auto", "CUDA, else Apple MPS, else CPU"),
            ("cuda", "CUDA", "NVIDIA GPU"),
            ("mps", "MPS", "Apple Silicon GPU"),
            ("cpu", "CPU", "Very slow at full size"),
        ),
        pattern=r"cuda:\d{1,2}", cli="--device", blender="prefs",
    ),
    Param(
        "dtype", "choice", "auto", "Precision", "Number format of the model",
        choices=_choices(
            ("auto", "Auto", "fp16 on CUDA and Apple MPS (as DiT360 runs), fp32 on the CPU"),
            ("bf16", "bf16", "Half the memory of fp32, wider range but coarser than fp16"),
            ("fp16", "fp16", "DiT360's own precision, with the reference's overflow clamps"),
            ("fp32", "fp32", "Most memory; for CPU"),
        ),
        cli="--dtype", blender="prefs",
    ),
    Param(
        "memory_mode", "choice", "auto", "Memory Mode", "How the 12B transformer is held in VRAM",
        choices=_choices(
            ("auto", "Auto", "Pick by free VRAM"),
            ("resident", "Resident", "Everything on the GPU (fastest, ~36 GB for the whole job)"),
            ("fp8", "fp8", "Transformer weights in fp8 (about half the VRAM, <= 16 GB)"),
            ("stream", "Stream", "Stream transformer blocks from RAM (fits a VRAM budget, slower)"),
        ),
        cli="--memory-mode", blender="prefs",
    ),
    Param(
        "vram_budget_gib", "float", None, "VRAM Budget",
        "For Stream: how much VRAM to use (none / 0: what is free)",
        minimum=0.5, maximum=4096.0, unit="GiB", nullable=True, cli="--vram-budget", blender="prefs",
    ),
    Param(
        "compile", "choice", "auto", "Compile",
        "torch.compile the transformer blocks (~20 s once, then faster steps; auto: CUDA with Triton, "
        "not in the stream mode)",
        choices=_choices(("auto", "Auto", ""), ("on", "On", ""), ("off", "Off", "")),
        cli="--compile",
    ),
    Param(
        "vae_wrap", "bool", True, "Wrap-Around Decode",
        "Decode with the image's left and right edges joined, so the 0°/360° seam can't show "
        "(off: DiT360's own decode, its exact output)",
        cli="--no-vae-wrap", blender="prefs",
    ),
    Param(
        "preview_every", "int", 1, "Preview Every N Steps",
        "Show the world while it is generated (0: no previews)",
        minimum=0, maximum=100, blender="prefs",
    ),
    Param(
        "models", "object", None, "Models",
        "Where the model files are: {models_dir, paths {component: path}, allow_download}",
        nullable=True,
    ),
)  # fmt: skip

BY_NAME: dict[str, Param] = {p.name: p for p in PARAMS}
MODELS_DEFAULTS: dict[str, Any] = {"models_dir": None, "paths": {}, "allow_download": False}
_STEM_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._ -]{0,99}$")
_WINDOWS_RESERVED = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(1, 10)), *(f"lpt{i}" for i in range(1, 10))}  # fmt: skip


SPEED_PRESETS: dict[str, dict[str, Any]] = {
    "faithful": {},
    "fast": {"memory_mode": "fp8"},
    "fastest": {"memory_mode": "fp8", "step_cache": 0.1},
}


def apply_speed(values: Mapping[str, Any]) -> dict:
    """The values with the `speed` preset applied where the user kept the default (memory mode
    'auto', step cache 0): an explicit memory mode or threshold always wins."""
    out = dict(values)
    for name, value in SPEED_PRESETS[out.get("speed", "faithful")].items():
        if out.get(name) == BY_NAME[name].default:
            out[name] = value
    return out


def for_job(job: str = GENERATE) -> tuple[Param, ...]:
    return tuple(p for p in PARAMS if job in p.jobs)


def defaults(job: str = GENERATE) -> dict[str, Any]:
    return {p.name: p.default for p in for_job(job)}


def check_params(values: Mapping[str, Any], job: str = GENERATE) -> dict:
    """All of a job's parameters: unknown names refused, defaults filled, every value checked;
    returns a new dict (file names normalised, `models` completed). Raises ParamError."""
    if not isinstance(values, Mapping):
        raise ParamError("The job parameters must be an object.", "Pass a dict of parameters.")
    known = for_job(job)
    unknown = sorted(map(str, set(values) - {p.name for p in known}))
    if unknown:
        raise ParamError(
            f"Unknown parameter(s): {', '.join(unknown)}.", f"Known: {', '.join(p.name for p in known)}."
        )
    out = {**defaults(job), **values}
    for p in known:
        if p.required and out[p.name] is None:
            raise ParamError(f"The parameter {p.name!r} is required.", _REQUIRED_HINTS[p.name])
    return check_values(out)


def check_values(values: Mapping[str, Any]) -> dict:
    """Check the given values (any subset of the table) and the rules between them; returns them
    normalised. Raises ParamError."""
    out = dict(values)
    for name, value in values.items():
        out[name] = _check_one(BY_NAME[name], value)
    if "width" in out and "height" in out and out["width"] != 2 * out["height"]:
        w, h = out["width"], out["height"]
        raise ParamError(
            f"{w}x{h} is not 2:1; an equirectangular panorama is twice as wide as tall.",
            f"Use width = 2 x height, e.g. {2 * h}x{h} or 2048x1024.",
        )
    return out


_REQUIRED_HINTS = {
    "prompt": 'Describe the scene, e.g. "This is a panorama image. A beach at dusk".',
    "output_dir": "Choose an output folder (an absolute path).",
}


def _check_one(p: Param, value: Any) -> Any:
    if p.name == "models":  # null: the defaults
        return _check_models({} if value is None else value)
    if value is None and (p.nullable or p.required):
        return value  # a missing required value is check_params' error
    if not _type_ok(p, value):
        raise ParamError(f"{p.name} must be {_kind_text(p)}, got {value!r:.80}.", f"Use e.g. {p.default!r}.")
    special = _SPECIAL.get(p.name)
    if special is not None:
        return special(value)
    if p.kind == "choice" and value not in p.choice_values:
        if p.pattern is None or not re.fullmatch(p.pattern, value):
            raise ParamError(
                f"Unknown {p.label.lower()} {value!r}.", f"Choose one of {', '.join(p.choice_values)}."
            )
    if p.kind in ("int", "float"):
        _check_range(p, value)
    return value


def _type_ok(p: Param, value: Any) -> bool:
    if p.kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if p.kind == "float":
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if p.kind in ("str", "choice"):
        return isinstance(value, str)
    if p.kind == "bool":
        return isinstance(value, bool)
    if p.kind == "loras":
        return isinstance(value, (list, tuple))
    return isinstance(value, dict)


def _kind_text(p: Param) -> str:
    text = {
        "int": "a whole number",
        "float": "a number",
        "bool": "true or false",
        "object": "an object",
        "loras": "a list of {path, strength}",
    }
    return text.get(p.kind, "a string") + (" or null" if p.nullable else "")


def _check_range(p: Param, value: float) -> None:
    unit = f" {p.unit}" if p.unit else ""
    hint = f"Use {p.minimum:g} to {p.maximum:g}{unit} (default {p.default})."
    if p.minimum is not None and value < p.minimum:
        if p.kind == "int" and p.minimum == 1:
            raise ParamError(f"{p.name} must be a positive whole number, got {value}.", hint)
        raise ParamError(f"{p.name} must be at least {p.minimum:g}{unit}, got {value}.", hint)
    if p.maximum is not None and value > p.maximum:
        raise ParamError(f"{p.name} must be at most {p.maximum:g}{unit}, got {value}.", hint)
    if p.multiple_of and value % p.multiple_of:
        raise ParamError(
            f"{p.name}={value} must be a multiple of {p.multiple_of} pixels.",
            "Use 2048x1024, DiT360's training size (or 1024x512 for quick previews).",
        )


def _check_prompt(prompt: str) -> str:
    if not prompt.strip():
        raise ParamError("The prompt is empty.", _REQUIRED_HINTS["prompt"])
    if len(prompt) > MAX_PROMPT_CHARS:
        raise ParamError(f"The prompt has {len(prompt)} characters.", f"Keep it under {MAX_PROMPT_CHARS}.")
    return prompt


def _check_output_dir(folder: str) -> str:
    folder = os.path.expanduser(folder)
    if "\0" in folder or not os.path.isabs(folder):
        raise ParamError(
            f"The output folder {folder!r} is not an absolute path.", "Choose a full folder path."
        )
    return folder


def _check_stem(stem: str) -> str:
    """A user-given file name must be a plain name: no folders, no '..', nothing that escapes."""
    if stem.lower().endswith(".png"):
        stem = stem[:-4]
    if not _STEM_RE.match(stem) or ".." in stem or stem.split(".")[0].strip().lower() in _WINDOWS_RESERVED:
        raise ParamError(
            f"The file name {stem!r} is not allowed.",
            "Use a plain name of letters, digits, spaces, '.', '-' or '_' (no folders); "
            "the image always goes into the output folder.",
        )
    return stem


def _check_models(models: Any) -> dict:
    if not isinstance(models, Mapping):
        raise ParamError("models must be an object or null.", "Pass a dict of model settings.")
    unknown = sorted(map(str, set(models) - set(MODELS_DEFAULTS)))
    if unknown:
        raise ParamError(
            f"Unknown models setting(s): {', '.join(unknown)}.", "Use models_dir, paths, allow_download."
        )
    models = {**MODELS_DEFAULTS, **models}
    if models["models_dir"] is not None and not isinstance(models["models_dir"], str):
        raise ParamError("models.models_dir must be a folder path or null.", "Pass a string.")
    if models["models_dir"] is not None and models["models_dir"].strip():
        models["models_dir"] = _absolute("models.models_dir", models["models_dir"])
    paths = models["paths"]
    if not isinstance(paths, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in paths.items()
    ):
        raise ParamError(
            "models.paths must map component names to path strings.", 'e.g. {"transformer": "/x.safetensors"}'
        )
    if not isinstance(models["allow_download"], bool):
        raise ParamError("models.allow_download must be true or false.", "Pass a boolean.")
    return {
        "models_dir": models["models_dir"],
        "paths": {k: _absolute(f"models.paths.{k}", v) if v.strip() else v for k, v in paths.items()},
        "allow_download": models["allow_download"],
    }


def _absolute(name: str, path: str) -> str:
    """`path` with ~ expanded; refused unless absolute: the worker runs in a folder of its own, so a
    relative path would be looked for there (the client's Job makes its paths absolute)."""
    path = os.path.expanduser(path)
    if "\0" in path or not os.path.isabs(path):
        raise ParamError(
            f"{name} {path!r:.200} is not an absolute path.", "Give the full path of the folder or file."
        )
    return path


def _check_loras(items: list | tuple) -> tuple[dict, ...]:
    """Each LoRA: an existing-looking file path and a strength within the table's limits."""
    p = BY_NAME["loras"]
    if len(items) > MAX_LORAS:
        raise ParamError(f"{len(items)} extra LoRAs were given.", f"Use at most {MAX_LORAS}.")
    out = []
    for item in items:
        if not isinstance(item, Mapping) or set(item) - {"path", "strength"} or "path" not in item:
            raise ParamError(
                f"An extra LoRA must be {{path, strength}}, got {item!r:.80}.",
                'e.g. {"path": "/loras/style.safetensors", "strength": 0.8}',
            )
        path, strength = item["path"], item.get("strength", 1.0)
        if not isinstance(path, str) or not path.strip() or "\0" in path:
            raise ParamError(
                f"The LoRA path {path!r:.80} is not a file path.", "Give the .safetensors file's path."
            )
        if (
            isinstance(strength, bool)
            or not isinstance(strength, (int, float))
            or not math.isfinite(strength)
        ):
            raise ParamError(
                f"The strength of {path} must be a number, got {strength!r:.40}.", "Use e.g. 0.8."
            )
        if not p.minimum <= strength <= p.maximum:
            raise ParamError(
                f"The strength of {path} is {strength}, outside {p.minimum:g} to {p.maximum:g}.",
                "Use a strength such as 0.5-1.0 (negative values invert a LoRA).",
            )
        out.append({"path": os.path.expanduser(path), "strength": float(strength)})
    return tuple(out)


_SPECIAL = {
    "prompt": _check_prompt,
    "output_dir": _check_output_dir,
    "filename": _check_stem,
    "loras": _check_loras,
}
