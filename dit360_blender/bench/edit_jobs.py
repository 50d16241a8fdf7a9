"""`python -m dit360_blender.bench.edit_jobs`: edit jobs (issue 14) on random full-size weights, through
the real worker and client, as Blender drives them.

For each worker variant (user_path.WORKER_VARIANTS names): one generate job makes the source, then
edits of it: a mask at strength 1.0 and 0.6, a camera view, a seam repair and a photo. Each is timed
from submit to `result` (with when sampling began and ended), with the steps it ran, and checked:
the PNG is finite, the source's pixels outside the mask are exact and something inside changed.
The device-level VRAM peak of the whole launch is recorded (VramWatch). Writes JSON.

`--tiny` runs the same on a tiny model set (a CPU smoke test).
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

from ..client import Job, WorkerClient
from .synthetic import FULL, TINY, write_synthetic_models
from .user_path import PROMPT, WORKER_VARIANTS, VramWatch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dit360_blender.bench.edit_jobs", description=__doc__)
    parser.add_argument("--tiny", action="store_true", help="tiny random models (CPU smoke test)")
    parser.add_argument(
        "--work", type=Path, help="folder for the synthetic models and outputs (default: temp)"
    )
    parser.add_argument(
        "--models-dir", type=Path, help="use this model set instead of writing a synthetic one"
    )
    parser.add_argument(
        "--variants", default="auto fp16,fp8+compile", help="worker variants, comma-separated"
    )
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--out", type=Path, default=Path("bench-edit.json"))
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.tiny
    width, height = (2048, 1024) if cuda else (128, 64)
    work = args.work or Path(tempfile.mkdtemp(prefix="dit360-bench-edit-"))
    models = args.models_dir
    record: dict = {"width": width, "height": height, "steps": args.steps, "variants": []}
    if models is None:
        t0 = time.perf_counter()
        models = write_synthetic_models(
            work / "models", FULL if cuda else TINY, device="cuda" if cuda else "cpu"
        )
        record["synthetic_write_s"] = time.perf_counter() - t0
    for name in filter(None, (v.strip() for v in args.variants.split(","))):
        variant = WORKER_VARIANTS[name] if cuda else {"dtype": "fp32", "device": "cpu"}
        try:
            result = _variant(work / name.replace(" ", "_"), models, variant, width, height, args.steps, cuda)
        except Exception as exc:  # one failing variant must not lose the others' numbers
            result = {"skipped": f"failed: {type(exc).__name__}: {exc}"[:300]}
        record["variants"].append({"name": name, **result})
        print(f"[{name}] {json.dumps(result, default=float)}", flush=True)
        args.out.write_text(json.dumps(record, indent=2, default=float))
    return 0


def _variant(
    folder: Path, models: Path, variant: dict, width: int, height: int, steps: int, cuda: bool
) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / "out"
    watch = VramWatch(torch.device("cuda")) if cuda else None
    client = WorkerClient(log_dir=folder, extra_env={"HF_HUB_OFFLINE": "1"})
    common = dict(output_dir=str(out), steps=steps, models_dir=str(models), preview_every=1, **variant)
    record: dict = {"variant": variant}
    try:
        made = client.run(Job(prompt=PROMPT, seed=1, width=width, height=height, **common), timeout=1800)
        source = made["path"]
        photo = folder / "photo.png"
        _png(source).crop(
            (width // 3, height // 3, width // 3 + width // 8, height // 3 + height // 12)
        ).save(photo)
        mask = np.zeros((height, width), np.uint8)
        mask[height // 4 : height // 2, width // 5 : width // 2] = 255
        Image.fromarray(mask).save(folder / "mask.png")
        edits = {
            "mask_s1.0": dict(mask_kind="mask", mask=str(folder / "mask.png"), strength=1.0),
            "mask_s0.6": dict(mask_kind="mask", mask=str(folder / "mask.png"), strength=0.6),
            "view": dict(mask_kind="view", yaw=60.0, pitch=10.0, hfov=70.0, aspect=16 / 9),
            "seam": dict(mask_kind="seam", band=12.0),
            "photo": dict(
                mask_kind="photo",
                photo=str(photo),
                hfov=45.0,
                fit=True,
                source=None,
                width=width,
                height=height,
            ),
        }
        for label, over in edits.items():
            params = {"prompt": PROMPT, "seed": 2, "source": source, **common, **over}
            record[label] = _timed_edit(client, Job(kind="edit", **params), source)
    finally:
        client.close()
        if watch is not None:
            record["device_vram_peak_gib"] = watch.stop()
    return record


def _timed_edit(client: WorkerClient, job: Job, source: str) -> dict:
    marks: dict[str, float] = {}
    t0 = time.perf_counter()

    def on_event(event: dict) -> None:
        if event["type"] == "progress":
            marks.setdefault(f"{event['stage']}_at_s", time.perf_counter() - t0)

    result = client.run(job, on_event=on_event, timeout=1800)
    edit = result["metadata"]["edit"]
    out = {"result_s": time.perf_counter() - t0, **marks, "steps_run": edit["steps_run"]}
    out["worker_timings"] = result["timings"]
    pixels = np.asarray(_png(result["path"]).convert("RGB"))
    out["finite_and_varied"] = bool(pixels.std() > 1)
    if edit["mask_kind"] != "photo":  # a photo edit's canvas is the photo on the sphere, not the source
        before = np.asarray(_png(source).convert("RGB"))
        changed = np.any(pixels != before, axis=-1)
        out["changed_share"] = float(changed.mean())
    return out


def _png(path) -> Image.Image:
    with Image.open(path) as image:
        image.load()
        return image


if __name__ == "__main__":
    raise SystemExit(main())
