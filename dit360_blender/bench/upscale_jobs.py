"""`python -m dit360_blender.bench.upscale_jobs`: the time of 2K → 4K / 8K / 16K upscales on this
machine, alone and with the refine pass (issue 15's GPU measurement).

The super-resolution model is Real-ESRGAN x4plus's network (spandrel's RRDBNet: 64 filters, 23
blocks, ×4) with random weights, saved as a .pth and loaded through the same loader as a user's
file; the refine pass runs FLUX.1-dev + DiT360 on the full-size random model set that
bench.synthetic writes (or --models-dir). Each size is one `make_upscale.upscale_job`, the shared
step of the CLI and the worker's upscale job, timed from its call to its return (every file
written: PNG, HDR, EXR), with its own stage timings and the device's memory peak. The JSON is
rewritten after each measurement, so a run stopped by a time limit keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..params import UPSCALE, defaults
from .synthetic import FULL, TINY, write_synthetic_models
from .user_path import PROMPT, WORKER_VARIANTS, VramWatch

GIB = 2**30


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dit360_blender.bench.upscale_jobs", description=__doc__)
    parser.add_argument(
        "--tiny", action="store_true", help="tiny models and a 128x64 source (CPU smoke test)"
    )
    parser.add_argument("--work", type=Path, help="folder for the models and outputs (default: temp)")
    parser.add_argument(
        "--models-dir", type=Path, help="the diffusion model set for refine (default: written)"
    )
    parser.add_argument("--sizes", default="4k,8k,16k")
    parser.add_argument(
        "--refine-sizes", default="4k,8k,16k", help="sizes also timed with refine ('' for none)"
    )
    parser.add_argument("--variant", default="fp8+compile", help="the refine pass's model settings")
    parser.add_argument("--strength", type=float, default=0.3)
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--deadline", type=float, default=0.0, help="seconds; skip what starts after it")
    parser.add_argument("--out", type=Path, default=Path("bench-upscale.json"))
    args = parser.parse_args(argv)
    begun = time.perf_counter()
    cuda = torch.cuda.is_available() and not args.tiny
    work = args.work or Path(tempfile.mkdtemp(prefix="dit360-bench-upscale-"))
    work.mkdir(parents=True, exist_ok=True)
    source = _write_source(work / "source.png", (2048, 1024) if cuda else (128, 64))
    model = _write_rrdb(work / "RealESRGAN_x4plus_random.pth", tiny=not cuda)
    device = "cuda" if cuda else "cpu"
    record: dict = {"source": "2048x1024" if cuda else "128x64", "model": "RRDBNet 64f 23b x4 (random)",
                    "device": torch.cuda.get_device_name() if cuda else "cpu",
                    "torch": torch.__version__, "alone": {}, "refine": {}}  # fmt: skip
    base = {**defaults(UPSCALE), "source": str(source), "upscale_model": str(model), "device": device,
            "steps": args.steps, "seed": 1, "hdr": True, "exr": True}  # fmt: skip
    if not cuda:
        base |= {"dtype": "fp32", "upscale_tile": 64}
    sizes = [s for s in args.sizes.split(",") if s] if cuda else ["4k"]
    for size in sizes:
        if _late(args, begun):
            record["alone"][size] = {"skipped": "deadline"}
            continue
        record["alone"][size] = _timed(base | {"size": size}, work / f"alone_{size}", None, device)
        print(f"[alone {size}] {json.dumps(record['alone'][size])}", flush=True)
        args.out.write_text(json.dumps(record, indent=2))
    refine_sizes = [s for s in args.refine_sizes.split(",") if s] if cuda else ["4k"]
    if refine_sizes:
        pipe = _load_pipe(args, work, cuda, record)
        for size in refine_sizes:
            if _late(args, begun):
                record["refine"][size] = {"skipped": "deadline"}
                continue
            p = base | {"size": size, "refine": True, "refine_strength": args.strength}
            record["refine"][size] = _timed(p, work / f"refine_{size}", pipe, device)
            print(f"[refine {size}] {json.dumps(record['refine'][size])}", flush=True)
            args.out.write_text(json.dumps(record, indent=2))
    record["total_s"] = time.perf_counter() - begun
    args.out.write_text(json.dumps(record, indent=2))
    return 0


def _late(args: argparse.Namespace, begun: float) -> bool:
    return bool(args.deadline) and time.perf_counter() - begun > args.deadline


def _write_source(path: Path, size: tuple[int, int]) -> Path:
    """A smooth panorama with fine noise (periodic in x, so its own wrap has no seam)."""
    width, height = size
    rng = np.random.default_rng(0)
    x = np.linspace(0, 2 * np.pi, width, endpoint=False)[None, :, None]
    y = np.linspace(0, np.pi, height)[:, None, None]
    base = 0.5 + 0.25 * np.sin(3 * x) * np.cos(2 * y) + 0.1 * np.cos(7 * x + 5 * y)
    pano = np.clip(base + rng.normal(0, 0.03, (height, width, 3)), 0, 1)
    Image.fromarray((pano * 255).round().astype(np.uint8)).save(path)
    return path


def _write_rrdb(path: Path, tiny: bool) -> Path:
    from spandrel.architectures.ESRGAN import ESRGAN

    torch.manual_seed(0)
    net = (
        ESRGAN(num_filters=8, num_blocks=1, scale=4)
        if tiny
        else ESRGAN(num_filters=64, num_blocks=23, scale=4)
    )
    torch.save(net.state_dict(), path)
    return path


def _load_pipe(args: argparse.Namespace, work: Path, cuda: bool, record: dict):
    from ..pipeline.dit360 import DiT360Pipeline
    from ..pipeline.model_files.download import resolve_model_paths

    models = args.models_dir
    if models is None:
        t0 = time.perf_counter()
        models = write_synthetic_models(
            work / "models", FULL if cuda else TINY, device="cuda" if cuda else "cpu"
        )
        record["synthetic_write_s"] = time.perf_counter() - t0
    variant = WORKER_VARIANTS[args.variant] if cuda else {"dtype": "fp32"}
    t0 = time.perf_counter()
    pipe = DiT360Pipeline.load(
        resolve_model_paths(models_dir=models), device="cuda" if cuda else "cpu", dtype=variant["dtype"],
        memory_mode=variant.get("memory_mode", "resident"), compile=variant.get("compile", "off"),
    )  # fmt: skip
    record["refine_variant"] = {"name": args.variant if cuda else "cpu", **variant}
    record["refine_load_s"] = time.perf_counter() - t0
    return pipe


def _timed(p: dict, folder: Path, pipe, device: str) -> dict:
    from ..pipeline.make_upscale import upscale_job
    from ..pipeline.refine import Refiner

    folder.mkdir(parents=True, exist_ok=True)
    cuda = device == "cuda"
    tiles: dict[str, int] = {}

    def on_progress(stage: str, done: int, total: int) -> None:
        tiles[stage] = total

    def load_refiner(q):
        return Refiner.for_job(pipe, q, prompt=PROMPT)

    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        watch = VramWatch(torch.device("cuda"))
    t0 = time.perf_counter()
    try:
        made = upscale_job(p, folder / "out.png", load_refiner=load_refiner, on_progress=on_progress)
    except Exception as exc:  # one failing size must not lose the others' numbers
        return {"failed": f"{type(exc).__name__}: {exc}"[:400]}
    finally:
        vram = watch.stop() if cuda else None
    total = time.perf_counter() - t0
    info = made.metadata["upscale"]
    out = {"job_s": round(total, 3), **{k: round(v, 3) for k, v in made.timings.items()},
           "width": info["width"], "passes": info["passes"], "tile": info["tile"], "tiles": tiles,
           "dtype": info.get("dtype"), "seam_z": made.metadata.get("seam", {}).get("seam_z"),
           "png_mb": round(made.path.stat().st_size / 1e6, 1)}  # fmt: skip
    if cuda:
        out["max_allocated_gib"] = round(torch.cuda.max_memory_allocated() / GIB, 2)
        out["device_vram_peak_gib"] = round(vram, 2)
    for f in folder.iterdir():  # 16K files are large: keep the disk for the next size
        f.unlink()
    return out


if __name__ == "__main__":
    raise SystemExit(main())
