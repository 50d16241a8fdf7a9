"""`python -m dit360_blender cubemap IN`: the cube map of any equirectangular image (panorama/cubemap.py).

numpy + Pillow (+ the OpenEXR bindings for EXR), no torch: it runs wherever the CLI does.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

EXIT_BAD_INPUT, EXIT_FAILED = 2, 1


def add_parser(commands) -> None:
    """The `cubemap` sub-command on the CLI's sub-parsers."""
    cube = commands.add_parser(
        "cubemap",
        help="write the 6 cube faces (or a horizontal cross) of an equirectangular image",
        description="Cube map of a 2:1 equirectangular image (PNG/JPEG, .hdr or .exr). Faces follow "
        "the OpenGL/DirectX/Unity cube-map convention, Y up (cube +Y = Blender +Z, cube +Z = Blender "
        "+Y): <stem>_px, _nx, _py, _ny, _pz, _nz; the cross is 4x3 (+Y over +Z; -X +Z +X -Z; -Y under).",
    )
    cube.add_argument("image", type=Path, help="the panorama (PNG, JPEG, .hdr, .exr)")
    cube.add_argument(
        "--format", choices=("png", "exr"), default="png",
        help="png: 8-bit sRGB (an HDR source is clipped at 1); exr: linear half float (default png)",
    )  # fmt: skip
    cube.add_argument(
        "--layout", choices=("faces", "cross"), default="faces",
        help="faces: six files <stem>_px ... _nz; cross: one 4x3 horizontal cross <stem>_cross (default faces)",
    )  # fmt: skip
    cube.add_argument("--size", type=int, metavar="PX", help="face size (default: a quarter of the width)")
    cube.add_argument("--out", type=Path, help="folder for the files (default: the image's folder)")


def run(args: argparse.Namespace) -> int:
    from .panorama.cubemap import read_equirect, write_cubemap

    try:
        image = read_equirect(args.image)
    except ValueError as exc:
        return _bad(str(exc), "give a 2:1 equirectangular panorama (PNG, JPEG, .hdr or .exr)")
    except OSError as exc:  # missing or unreadable .hdr/.exr
        return _bad(f"cannot read {args.image}: {exc.strerror or exc}", "check the path")
    out_dir = args.out or args.image.parent
    try:
        paths = write_cubemap(
            image, out_dir, args.image.stem, fmt=args.format, layout=args.layout, size=args.size
        )
    except ValueError as exc:
        return _bad(str(exc), "use --size between 1 and 32768")
    except OSError as exc:
        print(f"error: could not write the cube map into {out_dir}: {exc}", file=sys.stderr)
        print(
            "  fix: choose a folder you can write to, with free disk space (nothing was left)",
            file=sys.stderr,
        )
        return EXIT_FAILED
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


def _bad(message: str, fix: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    print(f"  fix: {fix}", file=sys.stderr)
    return EXIT_BAD_INPUT
