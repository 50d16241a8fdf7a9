"""The saving stage of a job on the machine's own CPU: analysis + PNG + HDRs + EXRs of one panorama.

What a job does after the decode, at the sizes artists ask for (2K native, 8K and 16K upscales):
`write_panorama` on a synthetic sunny panorama, timed end to end, and its two halves alone
(`analyze`, and the files from its result). No GPU and no model: the CPU of the GPU machine is what
the user waits on here.

    python -m dit360_blender.bench.files --widths 2048,8192 --repeats 3 --json out.json

Absolute imports only, so the file also runs as a script against another checkout of the package
(`PYTHONPATH=/old/checkout python dit360_blender/bench/files.py`): one run times both versions.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from dit360_blender.panorama.analyze import analyze, write_lighting_files
from dit360_blender.pipeline.make_panorama import write_panorama


class _Picture:
    """What write_panorama takes from a generation: the 8-bit image, metadata, timings, memory."""

    def __init__(self, rgb: np.ndarray) -> None:
        self.rgb, self.metadata, self.timings = rgb, {"prompt": "bench", "seed": 0}, {}
        self.memory: dict = {}

    def to_uint8(self) -> torch.Tensor:
        return torch.from_numpy(self.rgb)


def sunny_panorama(width: int, seed: int = 0) -> np.ndarray:
    """A sky gradient over a textured ground, a small bright sun and pixel noise (periodic in x)."""
    height = width // 2
    rng = np.random.default_rng(seed)
    lat = (0.5 - (np.arange(height, dtype=np.float32) + 0.5) / height)[:, None] * np.pi
    lon = (np.arange(width, dtype=np.float32) + 0.5)[None, :] / width * 2 * np.pi
    sky = np.stack([0.35 + 0.3 * lat, 0.5 + 0.25 * lat, 0.8 + 0.1 * lat], -1).clip(0, 1)
    ground = 0.3 + 0.08 * np.sin(9 * lon + 4 * lat)[..., None] * np.array([1.0, 0.9, 0.7])
    img = np.where((lat > 0)[..., None], sky, ground).astype(np.float32)
    d = np.arccos(np.clip(np.sin(lat) * np.sin(0.6) + np.cos(lat) * np.cos(0.6) * np.cos(lon - 1.0), -1, 1))
    img[d < 0.02] = 1.0  # a sun of ~2.3° across, 35° up
    img += rng.normal(0.0, 0.015, img.shape).astype(np.float32)
    return (np.clip(img, 0, 1) * 255).round().astype(np.uint8)


def time_width(width: int, repeats: int, folder: Path) -> dict:
    rgb = sunny_panorama(width)
    record: dict = {"width": width, "height": width // 2}
    totals, analyses, files = [], [], []
    for i in range(repeats):
        t0 = time.perf_counter()
        write_panorama(_Picture(rgb), folder / f"w{width}_{i}.png", hdr=True, exr=True)
        totals.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        _, hdr = analyze(rgb)
        analyses.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        write_lighting_files(folder / f"l{width}_{i}.png", hdr, exr=True)
        files.append(time.perf_counter() - t0)
        del hdr
        for p in folder.iterdir():
            p.unlink()
    _, hdr = analyze(rgb)
    record["one_file_s"] = _one_file_each(rgb, hdr, folder)  # what bounds the files written side by side
    del hdr
    record["save_s"] = statistics.median(totals)
    record["analyze_s"] = statistics.median(analyses)
    record["hdr_exr_files_s"] = statistics.median(files)
    record["runs_save_s"] = totals
    return record


def _one_file_each(rgb: np.ndarray, hdr, folder: Path) -> dict[str, float]:
    """Seconds of each writer alone, once: the PNG (with a metadata chunk), one .hdr, one .exr."""
    from dit360_blender.panorama.exr import write_exr
    from dit360_blender.panorama.rgbe import write_hdr
    from dit360_blender.pipeline.image_io import save_png

    out = {}
    for name, write in (
        ("png", lambda: save_png(folder / "one.png", rgb, {"prompt": "bench"})),
        ("hdr", lambda: write_hdr(folder / "one.hdr", hdr.hdr)),
        ("exr", lambda: write_exr(folder / "one.exr", hdr.hdr)),
    ):
        t0 = time.perf_counter()
        write()
        out[name] = time.perf_counter() - t0
    for p in folder.iterdir():
        p.unlink()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", default="2048,8192", help="comma-separated panorama widths")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--label", default="", help="a name for this checkout in the output")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    import dit360_blender

    out = {
        "label": args.label,
        "package": str(Path(dit360_blender.__file__).parent),
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
        "numpy": np.__version__,
        "sizes": [],
    }
    with tempfile.TemporaryDirectory(prefix="dit360-bench-files-") as tmp:
        for width in (int(w) for w in args.widths.split(",") if w.strip()):
            record = time_width(width, args.repeats, Path(tmp))
            out["sizes"].append(record)
            print(
                f"{args.label or 'files'} {width}x{width // 2}: save {record['save_s']:.3f} s "
                f"(analyze {record['analyze_s']:.3f} s, HDR+EXR files {record['hdr_exr_files_s']:.3f} s; alone: "
                + ", ".join(f"{k} {v:.3f} s" for k, v in record["one_file_s"].items())
                + ")",
                flush=True,
            )
    if args.json:
        args.json.write_text(json.dumps(out, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
