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
SIZE_WIDTHS = {"4k": 4096, "8k": 8192, "16k": 16384}  # the `size` choices' widths (native: as generated)


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
    """One parameter. `kind`: str | int | float | bool | choice | object | loras | path.

    `loras` is a list of {path, strength}; `minimum`/`maximum` bound each strength. `path`: an input
    file of the job (absolute; the client's Job makes it so; the worker reads every one of them in
    one place, pipeline/edit_inputs.py)."""

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
EDIT = "edit"
UPSCALE = "upscale"
WARM = "warm"
# Every job kind: each is a message type of its own on the wire (protocol.py), with its own runner in
# the worker (worker/jobs.py: JOB_KINDS_RUN); a parameter says in `jobs` which kinds take it.
JOB_KINDS: tuple[str, ...] = (GENERATE, EDIT, UPSCALE, WARM)
# a warm job loads (and compiles) what the generate with the same parameters will use, and writes
# nothing (issue 13: the first Generate after the panel opens does not wait for the load): it takes
# exactly a generate's parameters, so both reach the same loaded model
PARAMETERS_OF = {WARM: GENERATE}
# the parameters that decide what a worker loads (worker/jobs.py ModelCache keys on these, derived:
# the files' identity, the normalised device, the speed preset applied); a job differing only in the
# others (prompt, seed, size, files) reuses the loaded model
MODEL_SETTINGS = (
    "models", "device", "gpus", "dtype", "lora_strength", "loras", "memory_mode", "vram_budget_gib",
    "compile", "speed",
)  # fmt: skip
SAMPLING_JOBS = frozenset({GENERATE, EDIT})  # the kinds that run the diffusion model
EDIT_JOB = frozenset({EDIT})
# upscale (issue 15): the super-resolution of a panorama (and an optional refine pass with the
# diffusion model); generate takes the same size/refine settings to upscale what it made
UPSCALE_SHARED = SAMPLING_JOBS | {UPSCALE}
RESOLUTION_JOBS = frozenset({GENERATE, UPSCALE})
MASK_KINDS = ("mask", "view", "photo", "seam")

PARAMS: tuple[Param, ...] = (
    Param(
        "prompt", "str", None, "Prompt",
        "What the 360° world shows. DiT360 was trained on prompts starting with 'This is a panorama image.'",
        required=True, cli="", blender="scene", jobs=SAMPLING_JOBS,
    ),
    Param(
        "output_dir", "str", None, "Output Folder",
        "Where the images are written (an absolute folder path)",
        required=True, blender="scene", jobs=UPSCALE_SHARED,
    ),
    Param(
        "seed", "int", 0, "Seed", "The same seed and settings give the same world on any device",
        minimum=0, maximum=2**63 - 1, cli="--seed", blender="scene", jobs=UPSCALE_SHARED,
    ),
    Param(
        "steps", "int", 28, "Steps", "Sampling steps (DiT360: 28)",
        minimum=1, maximum=1000, soft_max=60, cli="--steps", blender="scene", jobs=UPSCALE_SHARED,
    ),
    Param(
        "guidance", "float", 2.8, "Guidance", "Embedded guidance (DiT360: 2.8)",
        minimum=0.0, maximum=20.0, soft_max=10.0, cli="--guidance", blender="scene", jobs=UPSCALE_SHARED,
    ),
    Param(
        "width", "int", 2048, "Width", "Twice the height, a multiple of 16 (DiT360: 2048)",
        minimum=2 * SIZE_MULTIPLE, maximum=8192, multiple_of=SIZE_MULTIPLE, unit="px",
        cli="--width", blender="scene", jobs=SAMPLING_JOBS,
    ),
    Param(
        "height", "int", 1024, "Height", "Half the width, a multiple of 16 (DiT360: 1024)",
        minimum=SIZE_MULTIPLE, maximum=4096, multiple_of=SIZE_MULTIPLE, unit="px",
        cli="--height", blender="scene", jobs=SAMPLING_JOBS,
    ),
    Param(
        "lora_strength", "float", 1.0, "LoRA Strength",
        "How strongly the DiT360 panorama LoRA applies (1.0 as trained, 0 = plain FLUX.1-dev)",
        minimum=-4.0, maximum=4.0, soft_min=0.0, soft_max=2.0, cli="--lora-strength", blender="scene",
        jobs=SAMPLING_JOBS,
    ),
    Param(
        "loras", "loras", (), "Extra LoRAs",
        "Your own FLUX LoRAs on top of DiT360 (kohya, BFL/ComfyUI or diffusers .safetensors), "
        "each with a strength; on the command line FILE[:STRENGTH], repeatable",
        minimum=-4.0, maximum=4.0, cli="--lora-extra", jobs=SAMPLING_JOBS,
    ),
    Param(
        "sun_share", "float", 0.6, "Sun Share",
        "The share of the HDR environment's light that a detected sun gets (it is brightened to it, "
        "never darkened); 0: the sun as bright as the image shows it",
        minimum=0.0, maximum=0.95, cli="--sun-share", blender="scene", jobs=UPSCALE_SHARED,
    ),
    Param(
        "step_cache", "float", 0.0, "Step Cache",
        "Skip the transformer's later blocks on steps where its first block changes less than this "
        "(relative; First-Block Cache): faster, slightly different images; 0 = off, 0.05-0.15 typical",
        minimum=0.0, maximum=1.0, cli="--step-cache", jobs=SAMPLING_JOBS,
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
        cli="--speed", blender="scene", jobs=SAMPLING_JOBS,
    ),
    Param(
        "hdr", "bool", True, "HDR Files",
        "Also write <name>.hdr and <name>_lighting.hdr (the sun clamped) beside the PNG",
        cli="--no-hdr", jobs=UPSCALE_SHARED,
    ),
    Param(
        "exr", "bool", True, "EXR Files",
        "Also write the HDR environments as half-float OpenEXR (<name>.exr, <name>_lighting.exr, ZIP) "
        "beside the .hdr files; Blender's World uses them when present",
        cli="--no-exr", jobs=UPSCALE_SHARED,
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
        cli="--cubemap", jobs=UPSCALE_SHARED,
    ),
    Param(
        "size", "choice", "native", "Resolution",
        "Width of the finished panorama: as generated, or upscaled (learned super-resolution, "
        "seamless across the wrap) to 4096, 8192 or 16384 pixels",
        choices=_choices(
            ("native", "2K (native)", "as generated (DiT360: 2048x1024)"),
            ("4k", "4K", "upscaled to 4096x2048"),
            ("8k", "8K", "upscaled to 8192x4096"),
            ("16k", "16K", "upscaled to 16384x8192"),
        ),
        cli="--size", blender="scene", jobs=RESOLUTION_JOBS,
    ),
    Param(
        "refine", "bool", False, "Refine",
        "After upscaling, a FLUX.1-dev detail pass over the upscaled panorama in overlapping tiles "
        "(real detail instead of smooth super-resolution; slower)",
        cli="--refine", blender="scene", jobs=RESOLUTION_JOBS,
    ),
    Param(
        "refine_strength", "float", 0.3, "Refine Strength",
        "How much the detail pass may change the upscaled image (img2img strength)",
        minimum=0.0, maximum=1.0, soft_min=0.2, soft_max=0.4, cli="--strength", blender="scene",
        jobs=RESOLUTION_JOBS,
    ),
    Param(
        "upscale_model", "path", None, "Upscale Model",
        "The super-resolution model file (any spandrel-supported .pth/.safetensors: ESRGAN, Real-ESRGAN, "
        "SwinIR, HAT, DAT, ...); none: Real-ESRGAN x4plus (BSD-3-Clause), found in the models folder or "
        "the Hugging Face cache, downloaded once when downloads are allowed",
        nullable=True, cli="--model", jobs=RESOLUTION_JOBS,
    ),
    Param(
        "upscale_tile", "int", None, "Upscale Tile",
        "Input pixels per side of one super-resolution tile (none: the largest the device's free memory "
        "holds on CUDA, 256 elsewhere); smaller tiles need less memory, the result is the same",
        minimum=32, maximum=4096, unit="px", nullable=True, cli="--tile", jobs=RESOLUTION_JOBS,
    ),
    Param(
        "filename", "str", None, "File Name",
        "A plain file stem (letters, digits, spaces, '.', '-', '_'); default <prompt-slug>_<seed>",
        nullable=True, jobs=UPSCALE_SHARED,
    ),
    Param(
        "device", "choice", "auto", "Device", "Where the model runs",
        choices=_choices(
            ("auto", "Auto", "CUDA, else Apple MPS, else CPU"),
            ("cuda", "CUDA", "NVIDIA GPU"),
            ("mps", "MPS", "Apple Silicon GPU"),
            ("cpu", "CPU", "Very slow at full size"),
        ),
        # cuda:N one GPU; cuda:0,1,2,3 one panorama over several GPUs; cpu:N N processes on the
        # CPU (gloo; for tests) - worker/ranks.py
        pattern=r"cuda:\d{1,2}(,\d{1,2}){0,15}|cpu:\d{1,2}", cli="--device", blender="prefs", jobs=UPSCALE_SHARED,
    ),
    Param(
        "gpus", "str", "", "GPUs",
        "Spread one panorama over these CUDA GPUs, e.g. 0,1,2,3 (each holds the whole model; FLUX's "
        "24 heads divide over 2, 3, 4, 6 or 8); empty: the Device setting alone",
        pattern=r"(\d{1,2}(,\d{1,2}){0,15})?", blender="prefs", jobs=SAMPLING_JOBS,
    ),
    Param(
        "dtype", "choice", "auto", "Precision", "Number format of the model",
        choices=_choices(
            ("auto", "Auto", "fp16 on CUDA and Apple MPS (as DiT360 runs), fp32 on the CPU"),
            ("bf16", "bf16", "Half the memory of fp32, wider range but coarser than fp16"),
            ("fp16", "fp16", "DiT360's own precision, with the reference's overflow clamps"),
            ("fp32", "fp32", "Most memory; for CPU"),
        ),
        cli="--dtype", blender="prefs", jobs=UPSCALE_SHARED,
    ),
    Param(
        "memory_mode", "choice", "auto", "Memory Mode", "How the 12B transformer is held in VRAM",
        choices=_choices(
            ("auto", "Auto", "Pick by free VRAM"),
            ("resident", "Resident", "Everything on the GPU (fastest, ~36 GB for the whole job)"),
            ("fp8", "fp8", "Transformer weights in fp8 (about half the VRAM, <= 16 GB)"),
            ("stream", "Stream", "Stream transformer blocks from RAM (fits a VRAM budget, slower)"),
        ),
        cli="--memory-mode", blender="prefs", jobs=SAMPLING_JOBS,
    ),
    Param(
        "vram_budget_gib", "float", None, "VRAM Budget",
        "The most VRAM the worker may use, as the card counts it (Stream keeps only what fits; other modes stop with an out-of-memory error beyond it). None: what is free",
        minimum=0.5, maximum=4096.0, unit="GiB", nullable=True, cli="--vram-budget", blender="prefs",
        jobs=UPSCALE_SHARED,
    ),
    Param(
        "compile", "choice", "auto", "Compile",
        "torch.compile the transformer blocks (~20 s once, then faster steps; auto: CUDA with Triton, "
        "not in the stream mode)",
        choices=_choices(("auto", "Auto", ""), ("on", "On", ""), ("off", "Off", "")),
        cli="--compile", jobs=SAMPLING_JOBS,
    ),
    Param(
        "vae_wrap", "bool", True, "Wrap-Around Decode",
        "Decode with the image's left and right edges joined, so the 0°/360° seam can't show "
        "(off: DiT360's own decode, its exact output)",
        cli="--no-vae-wrap", blender="prefs", jobs=SAMPLING_JOBS,
    ),
    Param(
        "preview_every", "int", 1, "Preview Every N Steps",
        "Show the world while it is generated (0: no previews)",
        minimum=0, maximum=100, blender="prefs", jobs=SAMPLING_JOBS,
    ),
    Param(
        "models", "object", None, "Models",
        "Where the model files are: {models_dir, paths {component: path}, allow_download}",
        nullable=True, jobs=UPSCALE_SHARED,
    ),
    # -- edit (issue 14): a source panorama, a mask that says where to regenerate, how strongly --
    Param(
        "source", "path", None, "Source",
        "The equirectangular panorama to edit: an 8-bit 2:1 PNG or JPEG (a size that is not a multiple "
        "of 16 is worked at the nearest one and composited back; photo mode: optional, the panorama the "
        "photo is placed in, else one of width x height); "
        "for an upscale: the 2:1 PNG or JPEG to upscale",
        nullable=True, cli="", jobs=EDIT_JOB | {UPSCALE},
    ),
    Param(
        "mask_kind", "choice", "mask", "Mask",
        "What says where the edit regenerates",
        choices=_choices(
            ("mask", "Mask Image", "a mask image (white: regenerate; grey: soft), e.g. one painted in Blender"),
            ("view", "View", "what a camera sees: yaw, pitch, hfov, aspect, roll"),
            ("photo", "Photo", "a perspective photo placed on the sphere; everything else is outpainted"),
            ("seam", "Seam", "a band over the 0°/360° seam, repaired in place"),
        ),
        jobs=EDIT_JOB,
    ),
    Param(
        "mask", "path", None, "Mask Image",
        "The mask image: white regenerates, black keeps the source, grey is in between; any 2:1 size "
        "(resized to the source's)",
        nullable=True, cli="--mask", jobs=EDIT_JOB,
    ),
    Param(
        "strength", "float", 1.0, "Strength",
        "How much of the sampling is run again inside the mask: 1 new content, lower keeps more of "
        "the source's shapes and colours",
        minimum=0.01, maximum=1.0, cli="--strength", jobs=EDIT_JOB,
    ),
    Param(
        "feather", "float", 2.0, "Feather",
        "The mask's edge is softened over this angle on the sphere",
        minimum=0.0, maximum=45.0, unit="deg", cli="--feather", jobs=EDIT_JOB,
    ),
    Param(
        "yaw", "float", 0.0, "Yaw", "View or photo direction: degrees around the vertical axis",
        minimum=-360.0, maximum=360.0, unit="deg", cli="--yaw", jobs=EDIT_JOB,
    ),
    Param(
        "pitch", "float", 0.0, "Pitch", "View or photo direction: degrees above the horizon",
        minimum=-90.0, maximum=90.0, unit="deg", cli="--pitch", jobs=EDIT_JOB,
    ),
    Param(
        "roll", "float", 0.0, "Roll", "View or photo: the camera's roll about its viewing axis",
        minimum=-180.0, maximum=180.0, unit="deg", jobs=EDIT_JOB,
    ),
    Param(
        "hfov", "float", None, "Horizontal FOV",
        "The camera's or photo's horizontal field of view (photo: none = from its EXIF focal length)",
        minimum=0.1, maximum=179.9, unit="deg", nullable=True, cli="--hfov", jobs=EDIT_JOB,
    ),
    Param(
        "aspect", "float", 16 / 9, "Aspect", "View: the camera frame's width over its height",
        minimum=0.1, maximum=10.0, jobs=EDIT_JOB,
    ),
    Param(
        "photo", "path", None, "Photo", "Photo mode: the perspective photo to extend into a 360° world",
        nullable=True, cli="--photo", jobs=EDIT_JOB,
    ),
    Param(
        "fit", "bool", False, "Fit Photo",
        "Photo mode: scale a photo down to the detail the panorama can hold, instead of refusing it",
        cli="--fit", jobs=EDIT_JOB,
    ),
    Param(
        "band", "float", 10.0, "Seam Band", "Seam mode: the width of the band repaired over the seam",
        minimum=0.5, maximum=90.0, unit="deg", cli="--band", jobs=EDIT_JOB,
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
    job = PARAMETERS_OF.get(job, job)
    return tuple(p for p in PARAMS if job in p.jobs)


def defaults(job: str = GENERATE) -> dict[str, Any]:
    return {p.name: p.default for p in for_job(job)}


def check_params(values: Mapping[str, Any], job: str = GENERATE) -> dict:
    """All of a job's parameters: unknown names refused, defaults filled, every value checked;
    returns a new dict (file names normalised, `models` completed). Raises ParamError."""
    if job not in JOB_KINDS:
        raise ValueError(f"unknown job kind {job!r}: add it to params.JOB_KINDS")
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
    out = check_values(out)
    rules = _KIND_RULES.get(PARAMETERS_OF.get(job, job))
    return rules(out) if rules is not None else out


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
    if p.kind == "path":
        return _absolute(p.name, value)
    if p.kind == "str" and p.pattern is not None and not re.fullmatch(p.pattern, value.strip()):
        raise ParamError(f"{p.label} {value!r:.80} is not understood.", f"{p.help}.")
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
    if p.kind in ("str", "choice", "path"):
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
        "path": "an absolute file path",
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


def _check_edit_rules(values: dict) -> dict:
    """What an edit of each mask kind needs besides the single values (checked by check_params)."""
    kind = values["mask_kind"]
    needs = {"mask": ("source", "mask"), "view": ("source", "hfov"), "seam": ("source",), "photo": ("photo",)}
    for name in needs[kind]:
        if values[name] is None:
            raise ParamError(f"A {kind!r} edit needs the parameter {name!r}.", _EDIT_HINTS[name])
    if kind == "photo" and values["strength"] != 1.0:
        raise ParamError(
            f"A photo edit outpaints everything but the photo, at strength 1 (got {values['strength']}).",
            "Leave the strength at 1.0 for photo edits.",
        )
    return values


_EDIT_HINTS = {
    "source": "Give the panorama to edit (an absolute path of a 2:1 image).",
    "mask": "Give a mask image (white = regenerate), or choose another mask kind.",
    "hfov": "Give the camera's horizontal field of view in degrees (more than 0, less than 180).",
    "photo": "Give the photo to extend (an absolute path).",
}


def _check_upscale_rules(values: dict) -> dict:
    """An upscale needs its source panorama and a size above native."""
    if values["source"] is None:
        raise ParamError(
            "An upscale needs the parameter 'source'.",
            "Give the panorama to upscale (an absolute path of a 2:1 PNG or JPEG).",
        )
    if values["size"] == "native":
        raise ParamError(
            "An upscale to size 'native' would change nothing.",
            f"Choose one of {', '.join(SIZE_WIDTHS)}.",
        )
    return values


_KIND_RULES = {EDIT: _check_edit_rules, UPSCALE: _check_upscale_rules}
