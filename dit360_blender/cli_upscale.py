"""`python -m dit360_blender upscale IN.png --size 8k`: a panorama upscaled to 4K/8K/16K (issue 15).

Learned super-resolution (any spandrel-supported model; default Real-ESRGAN x4plus) that is
seamless across the 0°/360° wrap, optionally refined by FLUX.1-dev + DiT360 in overlapping tiles
(--refine --strength 0.3), written as generate writes a panorama: the PNG with its metadata and seam
score, the HDR and EXR environments, cube maps. The options are the parameter table's `upscale`
parameters (params.py); torch loads only when the command runs, so `upscale --help` is instant.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from . import params


def add_parser(commands) -> None:
    """The `upscale` sub-command on the CLI's sub-parsers."""
    from . import cli

    up = commands.add_parser(
        "upscale",
        help="upscale a panorama to 4K/8K/16K without a seam (learned super-resolution, optional refine)",
        description="Upscale an equirectangular panorama (8-bit PNG/JPEG, 2:1) with a super-resolution "
        "model, seamless across the 0°/360° wrap, optionally refined with FLUX.1-dev + DiT360; writes a "
        "PNG (+ HDR/EXR, cube maps) like generate.",
    )
    cli._add_param_args(up, params.UPSCALE)
    up.add_argument("--out", type=Path, help="PNG to write (default: <source>_<size>.png beside the source)")
    up.add_argument(
        "--prompt", help="refine only: the prompt of the detail pass (default: the source PNG's own prompt)"
    )
    cli._add_model_args(up)
    up.add_argument(
        "--download", action="store_true", help="download missing weights (the default upscale model too)"
    )
    up.add_argument("--quiet", action="store_true", help="no progress output")


def run(args: argparse.Namespace) -> int:
    from . import cli

    try:
        values = _values(args)
    except params.ParamError as exc:
        cli._print_error(exc)
        return cli.EXIT_BAD_INPUT
    return cli.reporting(lambda: _upscale(args, values))


def _values(args: argparse.Namespace) -> dict:
    """The upscale job's params from the options, checked by the parameter table (ParamError)."""
    given = {p.name: getattr(args, p.name) for p in params.for_job(params.UPSCALE) if p.cli is not None}
    if given.get("seed") is None:
        given.pop("seed", None)
    for name in ("source", "upscale_model"):  # the table wants absolute paths
        if given.get(name) is not None:
            given[name] = os.path.abspath(os.path.expanduser(given[name]))
    source = Path(given["source"]) if given.get("source") else Path.cwd() / "x"
    out_dir = (args.out.parent if args.out is not None else source.parent).resolve()
    models = {"models_dir": str(args.models_dir.resolve()) if args.models_dir else None}
    models |= {"allow_download": bool(args.download)}
    return params.check_params({**given, "output_dir": str(out_dir), "models": models}, params.UPSCALE)


def _upscale(args: argparse.Namespace, values: dict) -> int:
    from . import cli
    from .pipeline.errors import BadParametersError
    from .pipeline.make_upscale import upscale_job
    from .pipeline.output_files import ensure_writable, plan_output

    if args.out is not None and args.out.suffix.lower() != ".png":
        raise BadParametersError(f"--out {args.out} must end in .png.", "Give a .png file name.")
    source = Path(values["source"])
    out = args.out.resolve() if args.out is not None else None
    if out is None:
        out = plan_output(values["output_dir"], "", 0, default_stem=f"{source.stem}_{values['size']}")
    ensure_writable(out.parent)
    progress = None if args.quiet else TileProgress()
    start = time.perf_counter()
    made = upscale_job(
        values,
        out,
        load_refiner=lambda p: _load_refiner(args, p, progress),
        on_progress=progress.tiles if progress else None,
        on_stage=progress.stage if progress else None,
        on_download=progress.download if progress else None,
    )
    info = made.metadata["upscale"]
    print(
        f"wrote {cli._written(made)} ({info['architecture']} x{info['scale']}, {info['passes']} pass(es), "
        f"{info['width']} px wide, {time.perf_counter() - start:.1f} s{cli._seam(made)})"
    )
    return 0


def _load_refiner(args: argparse.Namespace, p: dict, progress):
    """The FLUX.1-dev + DiT360 detail pass, with the command's model options (refine.py)."""
    from . import cli
    from .pipeline.refine import Refiner

    values = {**params.defaults(params.GENERATE), **{k: v for k, v in p.items() if k in params.BY_NAME}}
    values["prompt"] = args.prompt or "This is a panorama image."
    args.no_lora = False
    pipe = cli.load_pipeline(args, values, progress)
    return Refiner.for_job(pipe, p, prompt=args.prompt)


class TileProgress:
    """One status line per stage and a running tile count on stderr."""

    def __init__(self) -> None:
        self.tty = sys.stderr.isatty()
        self.last = 0.0

    def stage(self, text: str) -> None:
        print(f"{text}…", file=sys.stderr, flush=True)

    def message(self, text: str) -> None:  # what cli.load_pipeline reports
        self.stage(text)

    def step(self, step) -> None:  # the refine pass's sampler steps (cli.load_pipeline's callbacks)
        pass

    def tiles(self, stage: str, done: int, total: int) -> None:
        now = time.perf_counter()
        if done == total or now - self.last > 0.5:
            self.last = now
            end = "\n" if done == total or not self.tty else ""
            prefix = "\r\033[K" if self.tty else ""
            print(f"{prefix}{stage} {done}/{total}", end=end, file=sys.stderr, flush=True)

    def download(self, filename: str, done: int, total: int) -> None:
        if total and done >= total:
            print(f"downloaded {filename} ({total / 1e6:.0f} MB)", file=sys.stderr, flush=True)
