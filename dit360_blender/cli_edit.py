"""`python -m dit360_blender edit SOURCE --prompt ...`: regenerate part of a panorama (issue 14).

One of --mask, --view, --photo or --repair-seam says where; the options are the parameter table's
`edit` parameters (params.py) plus the generate command's model options. torch loads only when the
command runs, so `edit --help` is instant.
"""

from __future__ import annotations

import argparse
import os
import secrets
import time
from pathlib import Path

from . import params

_VIEW_HELP = (
    "regenerate what a camera sees: YAW,PITCH,HFOV[,ASPECT] in degrees (yaw 0 = the panorama's centre, "
    "+90 a quarter to the left; pitch + up; aspect width/height, default 16:9; a negative yaw: --view=-30,0,60)"
)


def add_parser(commands) -> None:
    """The `edit` sub-command on the CLI's sub-parsers."""
    from . import cli

    edit = commands.add_parser(
        "edit",
        help="regenerate part of a panorama: a mask, a camera's view, a photo's surroundings or the seam",
        description="Edit an equirectangular panorama with FLUX.1-dev + DiT360: inside the mask the "
        "picture is generated anew (strength 1) or reworked (lower strength); outside it every pixel "
        "stays the source's. Writes a PNG (+ HDR/EXR) like generate.",
    )
    cli._add_param_args(edit, params.EDIT, flags={"prompt": "--prompt"})
    edit.add_argument("--view", metavar="YAW,PITCH,HFOV[,ASPECT]", help=_VIEW_HELP)
    edit.add_argument(
        "--repair-seam", action="store_true", help="inpaint a band (--band degrees) over the 0°/360° seam"
    )
    edit.add_argument("--out", type=Path, help="PNG to write (default: <source>-<kind>_<seed>.png here)")
    edit.add_argument("--no-lora", action="store_true", help="plain FLUX.1-dev, without the DiT360 LoRA")
    cli._add_model_args(edit)
    edit.add_argument(
        "--download", action="store_true", help="download missing weights from the Hugging Face Hub"
    )
    edit.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from . import cli

    seed = args.seed if args.seed is not None else secrets.randbelow(2**31)
    try:
        values = _values(args, seed)
    except params.ParamError as exc:
        cli._print_error(exc)
        return cli.EXIT_BAD_INPUT
    return cli.reporting(lambda: _edit(args, values))


def _values(args: argparse.Namespace, seed: int) -> dict:
    """The edit job's params from the options, checked by the parameter table (ParamError)."""
    from .cli import lora_items

    given = {p.name: getattr(args, p.name) for p in params.for_job(params.EDIT) if p.cli is not None}
    values = given | {"seed": seed, "loras": lora_items(args.loras), "mask_kind": _mask_kind(args)}
    if args.view is not None:
        values.update(_view(args))
    for name in ("source", "mask", "photo"):  # the table wants absolute paths
        if values[name] is not None:
            values[name] = os.path.abspath(os.path.expanduser(values[name]))
    out_dir = (args.out.parent if args.out is not None else Path.cwd()).resolve()
    return params.check_params({**values, "output_dir": str(out_dir)}, params.EDIT)


def _mask_kind(args: argparse.Namespace) -> str:
    chosen = [
        kind
        for kind, given in (
            ("mask", args.mask is not None),
            ("view", args.view is not None),
            ("photo", args.photo is not None),
            ("seam", args.repair_seam),
        )
        if given
    ]
    if len(chosen) != 1:
        what = "more than one of" if chosen else "one of"
        raise params.ParamError(
            f"An edit needs {what} --mask, --view, --photo, --repair-seam (got {len(chosen)}).",
            "Say where to regenerate: a mask image, a camera view, a photo to extend, or the seam.",
        )
    return chosen[0]


def _view(args: argparse.Namespace) -> dict:
    parts = args.view.split(",")
    try:
        numbers = [float(x) for x in parts]
    except ValueError:
        numbers = []
    if len(numbers) not in (3, 4):
        raise params.ParamError(
            f"--view {args.view!r} is not YAW,PITCH,HFOV[,ASPECT].",
            "Give degrees, e.g. --view 30,10,60 or 30,10,60,1.5.",
        )
    if (
        args.yaw != params.BY_NAME["yaw"].default
        or args.pitch != params.BY_NAME["pitch"].default
        or args.hfov
    ):
        raise params.ParamError(
            "--view already gives yaw, pitch and hfov.", "Leave out --yaw, --pitch and --hfov."
        )
    return dict(zip(("yaw", "pitch", "hfov", "aspect"), numbers, strict=False))


def _edit(args: argparse.Namespace, values: dict) -> int:
    from . import cli
    from .pipeline.edit_inputs import read_edit_inputs
    from .pipeline.errors import BadParametersError
    from .pipeline.make_edit import make_edit
    from .pipeline.output_files import plan_output

    if args.out is not None and args.out.suffix.lower() != ".png":
        raise BadParametersError(f"--out {args.out} must end in .png.", "Give a .png file name.")
    values = params.apply_speed(values)
    inputs = read_edit_inputs(values)  # every input file checked before the models load
    out = args.out or plan_output(Path.cwd(), values["prompt"], values["seed"], default_stem=inputs.stem)
    progress = None if args.quiet else cli._Progress()
    pipe = cli.load_pipeline(args, values, progress)
    start = time.perf_counter()
    made = make_edit(
        pipe, values, inputs, out, on_step=progress.step if progress else None,
        on_stage=(lambda s: cli._status(progress, s)) if progress else None,
    )  # fmt: skip
    steps = made.metadata["edit"]["steps_run"]
    print(
        f"wrote {cli._written(made)} ({inputs.mask_kind} edit, strength {values['strength']:g}, {steps} steps, "
        f"seed {values['seed']}, {time.perf_counter() - start:.1f} s{cli._seam(made)})"
    )
    return 0
