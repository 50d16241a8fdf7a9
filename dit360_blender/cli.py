"""Command line: `generate` a panorama from a prompt, or `doctor` to check the setup.

torch is imported only inside the commands, so `--help` is instant and works anywhere.
"""

from __future__ import annotations

import argparse
import os
import platform
import secrets
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from . import cli_cubemap, cli_edit, cli_upscale, params
from ._version import __version__

if TYPE_CHECKING:
    from .pipeline.sampling import SamplerStep

COMPONENT_FLAGS = ("transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "lora")
EXIT_BAD_INPUT, EXIT_FAILED, EXIT_CANCELLED = 2, 1, 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m dit360_blender",
        description="DiT360 360° panoramas (FLUX.1-dev + the DiT360 LoRA) for Blender worlds.",
    )
    parser.add_argument("--version", action="version", version=f"dit360_blender {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    gen = commands.add_parser("generate", help="generate a 2:1 equirectangular panorama from a prompt")
    _add_param_args(gen)
    gen.add_argument("--out", type=Path, help="PNG to write (default: <prompt-slug>_<seed>.png here)")
    gen.add_argument("--no-lora", action="store_true", help="plain FLUX.1-dev, without the DiT360 LoRA")
    _add_model_args(gen)
    gen.add_argument(
        "--download", action="store_true", help="download missing weights from the Hugging Face Hub (~34 GB)"
    )
    gen.add_argument("--quiet", action="store_true", help="no progress bar")

    doctor = commands.add_parser("doctor", help="show Python/torch/GPU and which model files are found")
    _add_model_args(doctor)

    seam = commands.add_parser("seam", help="score the 0°/360° wrap seam and the pole detail of a panorama")
    seam.add_argument("image", type=Path, help="an equirectangular image (PNG, JPEG, ...)")
    seam.add_argument("--json", action="store_true", help="print the scores as one JSON object")
    seam.add_argument(
        "--period", type=int, default=None, metavar="N",
        help="compare the wrap only with every Nth column boundary (an image upscaled xN: the boundaries "
        "between its source pixels); default: the period its own metadata records, else 1",
    )  # fmt: skip
    cli_cubemap.add_parser(commands)
    cli_edit.add_parser(commands)
    cli_upscale.add_parser(commands)
    return parser


def _add_param_args(
    parser: argparse.ArgumentParser, kind: str = params.GENERATE, flags: dict[str, str] | None = None
) -> None:
    """One option per parameter of job `kind` that has a `cli` flag (names, defaults, choices, help);
    `flags` gives a parameter another flag in this command (a positional one becomes required)."""
    for p in params.for_job(kind):
        if p.cli is None:
            continue
        if p.name in (flags or {}):
            parser.add_argument(flags[p.name], dest=p.name, required=p.cli == "", help=p.help)
        elif p.cli == "":
            nargs = "?" if p.nullable else None  # e.g. an edit's source, which photo mode can do without
            parser.add_argument(p.name, nargs=nargs, help=p.help)
        elif p.kind == "bool":  # a flag that turns the default over, e.g. --no-hdr, --fit
            action = "store_false" if p.default else "store_true"
            parser.add_argument(p.cli, dest=p.name, action=action, help=p.help)
        elif p.kind == "loras":  # repeatable FILE[:STRENGTH]; `lora_items` makes the table's value
            limits = f" (strength {p.minimum:g} to {p.maximum:g}, default 1)"
            parser.add_argument(
                p.cli, dest=p.name, action="append", metavar="FILE[:STRENGTH]", help=p.help + limits
            )
        else:
            kind = {"int": int, "float": float}.get(p.kind, str)
            # --seed: no default on the command line means a random one (printed)
            default = None if p.name == "seed" else p.default
            choices = p.choice_values if p.kind == "choice" and p.pattern is None else None
            shown = f" (default {p.default})" if default is not None else ""
            each = "; ".join(f"{c.value}: {c.help}" for c in p.choices if c.help)
            text = p.help + (f" ({each})" if each else "") + shown
            metavar = p.unit.upper() if p.unit else None
            parser.add_argument(
                p.cli, dest=p.name, type=kind, default=default, choices=choices, metavar=metavar, help=text
            )


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model files (default: --models-dir, then the Hugging Face cache)")
    group.add_argument("--models-dir", type=Path, help="folder holding FLUX.1-dev/ and DiT360/ (see README)")
    for name in COMPONENT_FLAGS:
        flag = "--" + name.replace("_", "-")
        group.add_argument(
            flag, type=Path, dest=f"path_{name}", help=f"explicit path of the {name.replace('_', ' ')}"
        )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "generate":
        return cmd_generate(args)
    if args.command == "seam":
        return cmd_seam(args)
    if args.command == "cubemap":
        return cli_cubemap.run(args)
    if args.command == "edit":
        return cli_edit.run(args)
    if args.command == "upscale":
        return cli_upscale.run(args)
    return cmd_doctor(args)


# ---------------------------------------------------------------------------------------------
# generate


def cmd_generate(args: argparse.Namespace) -> int:
    from .pipeline.errors import BadParametersError

    seed = args.seed if args.seed is not None else secrets.randbelow(2**31)
    try:
        given = {p.name: getattr(args, p.name) for p in _cli_params()}
        values = params.check_values(given | {"seed": seed, "loras": lora_items(args.loras)})
    except params.ParamError as exc:
        _print_error(exc)
        return EXIT_BAD_INPUT

    def work() -> int:
        if args.out is not None and args.out.suffix.lower() != ".png":
            raise BadParametersError(f"--out {args.out} must end in .png.", "Give a .png file name.")
        return _generate(args, values)

    return reporting(work)


def reporting(work: Callable[[], int]) -> int:
    """`work()`'s exit code, or the code of its failure after printing it with its fix (nothing of
    a failed job is left written: the pipeline's writers remove what they began)."""
    from .pipeline.errors import DiT360Error

    try:
        return work()
    except DiT360Error as exc:
        _print_error(exc)
        return EXIT_BAD_INPUT if exc.code == "bad_parameters" else EXIT_FAILED
    except OSError as exc:  # writing the .hdr files next to the PNG
        print(f"error: could not write the image files: {exc}", file=sys.stderr)
        print("  fix: choose an output folder you can write to, with free disk space.", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("\ncancelled; nothing written", file=sys.stderr)
        return EXIT_CANCELLED


def lora_items(options: list[str] | None) -> list[dict]:
    """`--lora-extra FILE[:STRENGTH]` values as the table's {path, strength} items. The strength is
    the text after the last ':' when it is a number, so a Windows drive ('C:\\x.safetensors') is
    part of the path."""
    items = []
    for option in options or []:
        path, sep, tail = option.rpartition(":")
        try:
            strength = float(tail) if sep and path else None
        except ValueError:
            strength = None
        items.append(
            {"path": option, "strength": 1.0} if strength is None else {"path": path, "strength": strength}
        )
    return items


def _cli_params(kind: str = params.GENERATE) -> list[params.Param]:
    return [p for p in params.for_job(kind) if p.cli is not None]


def _generate(args: argparse.Namespace, values: dict) -> int:
    from .pipeline.dit360 import GenerateRequest
    from .pipeline.make_panorama import make_panorama
    from .pipeline.output_files import plan_output

    values = params.apply_speed(values)
    request = GenerateRequest(
        prompt=values["prompt"], seed=values["seed"], steps=values["steps"], guidance=values["guidance"],
        width=values["width"], height=values["height"], step_cache=values["step_cache"],
    )  # fmt: skip
    out = args.out or plan_output(Path.cwd(), values["prompt"], values["seed"])
    progress = None if args.quiet else _Progress()
    models = {"models_dir": str(args.models_dir.resolve()) if args.models_dir else None}
    values["models"] = models | {"allow_download": bool(args.download)}
    if values["size"] != "native":  # a missing upscale model fails now, not after the sampling
        from .pipeline.make_upscale import find_upscale_model

        find_upscale_model(values, progress.download if progress else None)
    pipe = load_pipeline(args, values, progress)
    start = time.perf_counter()
    made = make_panorama(
        pipe, request, out, hdr=values["hdr"], exr=values["exr"], cubemap=values["cubemap"],
        sun_share=values["sun_share"], on_step=progress.step if progress else None,
        on_stage=(lambda s: _status(progress, s)) if progress else None,
    )  # fmt: skip
    print(f"wrote {_written(made)} (seed {values['seed']}, {time.perf_counter() - start:.1f} s{_seam(made)})")
    if values["size"] != "native":
        _upscale_generated(values, made, pipe, quiet=args.quiet)
    return 0


def _upscale_generated(values: dict, made, pipe, quiet: bool) -> None:
    """--size: the generated panorama upscaled beside it (refined with the loaded pipeline with
    --refine); the generated files stay whatever happens."""
    from .cli_upscale import TileProgress
    from .pipeline.make_upscale import upscale_generated

    tiles = None if quiet else TileProgress()
    start = time.perf_counter()
    big = upscale_generated(
        values, made, pipe, on_progress=tiles.tiles if tiles else None,
        on_stage=tiles.stage if tiles else None, on_download=tiles.download if tiles else None,
    )  # fmt: skip
    info = big.metadata["upscale"]
    print(
        f"wrote {_written(big)} ({info['architecture']} x{info['scale']}, {info['width']} px wide, "
        f"{time.perf_counter() - start:.1f} s{_seam(big)})"
    )


def _written(made) -> str:
    return ", ".join(str(f) for f in (made.path, *made.files.values()))


def _seam(made) -> str:
    seam = made.metadata.get("seam", {})
    return f", seam z {seam['seam_z']:.1f}" if "seam_z" in seam else ""


def load_pipeline(args: argparse.Namespace, values: dict, progress: _Progress | None):
    """The models the command's options name, loaded (a `DiT360Pipeline`)."""
    from .pipeline.dit360 import DiT360Pipeline
    from .pipeline.model_files.download import resolve_model_paths

    paths = resolve_model_paths(
        explicit=_explicit_paths(args),
        models_dir=args.models_dir,
        allow_download=args.download,
        progress=progress.download if progress else None,
        use_lora=not args.no_lora,
    )
    _status(progress, f"loading models ({values['device']}, {values['dtype']})")
    from .worker.ranks import parallel_pipeline_class, rank_devices  # cuda:0,1,...: worker/ranks.py

    load = parallel_pipeline_class().load if rank_devices(values["device"]) else DiT360Pipeline.load
    pipe = load(
        paths,
        device=values["device"],
        dtype=values["dtype"],
        lora_strength=0.0 if args.no_lora else values["lora_strength"],
        memory_mode=values["memory_mode"],
        vram_budget_gib=values["vram_budget_gib"],
        compile=values["compile"],
        vae_wrap=values["vae_wrap"],
        loras=[(item["path"], item["strength"]) for item in values["loras"]],
    )
    return pipe


def _explicit_paths(args: argparse.Namespace) -> dict:
    return {name: getattr(args, f"path_{name}") for name in COMPONENT_FLAGS if getattr(args, f"path_{name}")}


def _status(progress: _Progress | None, text: str) -> None:
    if progress:
        progress.message(text)


def _print_error(exc) -> None:
    print(f"error: {exc.message}", file=sys.stderr)
    if exc.hint:
        print(f"  fix: {exc.hint}", file=sys.stderr)


class _Progress:
    """A one-line progress bar on stderr (no dependency on tqdm)."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.sampling_start: float | None = None
        self.tty = sys.stderr.isatty()

    def message(self, text: str) -> None:
        self._write(f"{text}…", final=not self.tty)

    def step(self, step: SamplerStep) -> None:
        i, total = step.index, step.total
        now = time.perf_counter()
        if self.sampling_start is None or i == 1:
            self.sampling_start = now
        per_step = (now - self.sampling_start) / max(i - 1, 1) if i > 1 else 0.0
        bar = "#" * (24 * i // total) + "." * (24 - 24 * i // total)
        eta = f" eta {per_step * (total - i):.0f}s" if i > 1 else ""
        self._write(f"sampling [{bar}] {i}/{total}{eta}", final=i == total or not self.tty)

    def download(self, filename: str, done: int, total: int) -> None:
        size = f"{done / 1e9:.2f}/{total / 1e9:.2f} GB" if total else f"{done / 1e9:.2f} GB"
        self._write(f"downloading {filename} {size}", final=bool(total and done >= total))

    def _write(self, text: str, final: bool) -> None:
        end = "\n" if final else ""
        prefix = "\r\033[K" if self.tty else ""
        print(f"{prefix}{text}", end=end, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# seam


def _recorded_seam_period(image) -> int:
    """The seam period a panorama of ours records in its metadata (an upscale's grid), else 1."""
    from .pipeline.image_io import image_metadata

    seam = image_metadata(image).get("seam")
    period = seam.get("period") if isinstance(seam, dict) else None
    return period if isinstance(period, int) and period >= 1 else 1


def cmd_seam(args: argparse.Namespace) -> int:
    import json

    import numpy as np
    from PIL import Image

    from .panorama.seam import seam_score

    try:
        with Image.open(args.image) as im:
            rgb = np.asarray(im.convert("RGB"))
            recorded = _recorded_seam_period(im)
    except OSError as exc:  # missing, unreadable or not an image (UnidentifiedImageError)
        print(f"error: cannot read {args.image}: {exc}", file=sys.stderr)
        print("  fix: give the path of an image file (PNG, JPEG, ...)", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        report = seam_score(rgb, period=args.period or recorded)
    except ValueError as exc:  # too small to have interior columns to compare with; a bad --period
        print(f"error: {exc}", file=sys.stderr)
        print("  fix: give a full-size equirectangular panorama", file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.json:
        info = {"image": str(args.image), "width": rgb.shape[1], "height": rgb.shape[0]}
        print(json.dumps({**info, **report.to_dict()}))
    else:
        print(f"{args.image} ({rgb.shape[1]}x{rgb.shape[0]})")
        if rgb.shape[1] != 2 * rgb.shape[0]:
            print("  note: not 2:1, so probably not an equirectangular panorama")
        print(report.summary())
    return 0


# ---------------------------------------------------------------------------------------------
# doctor


def cmd_doctor(args: argparse.Namespace) -> int:
    print(f"dit360_blender {__version__}")
    print(f"Python         {platform.python_version()} ({sys.executable})")
    print(f"Platform       {platform.platform()}")
    _doctor_torch()
    print(
        f"HF token       {'set' if os.environ.get('HF_TOKEN') else 'not set (needed to download FLUX.1-dev)'}"
    )
    print(f"HF offline     {'yes' if os.environ.get('HF_HUB_OFFLINE') else 'no'}")
    print("Models:")
    try:
        from .pipeline.model_files.local_search import find_model_paths

        found = find_model_paths(explicit=_explicit_paths(args), models_dir=args.models_dir)
    except Exception as exc:  # doctor must always finish and say what it can
        print(f"  cannot search for models: {exc}")
        return 0
    missing = [name for name, path in found.items() if path is None]
    for name, path in found.items():
        print(f"  {name:<15} {path if path else 'MISSING'}")
    if missing:
        print(
            "  fix: run `python -m dit360_blender generate --download ...` (or the add-on's Download models "
            "button) after accepting the FLUX.1-dev licence and setting HF_TOKEN; or copy the files into "
            "--models-dir as described in the README."
        )
    return 0


def _doctor_torch() -> None:
    try:
        from .pipeline.environment import describe
    except ImportError as exc:  # torch (or another worker package) is missing
        print(f"torch          NOT INSTALLED ({exc})")
        print("  fix: run `python vendor_setup.py --venv .venv` (or Install dependencies in the add-on)")
        return
    for label, value in describe():
        print(f"{label:<16}{value}")
