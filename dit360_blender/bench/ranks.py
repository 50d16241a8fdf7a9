"""One panorama over N GPUs (issue 17): `python -m dit360_blender.bench.ranks --ranks 1,2,4`.

For each N: the sequence-parallel pipeline in this process (rank 0, ranks 1..N-1 spawned as the
worker spawns them; N=1 is a one-rank NCCL group, so one GPU checks the whole path) - step time,
sampling time, peak memory of every GPU, the share of GPU time in NCCL kernels (profiled steps), and
the image against the one-process pipeline's (relative difference); then the whole job through the
real worker and client (`device: "cuda:0,...,N-1"`, plain "cuda:0" for N=1): submit -> `result`.
Random full-size weights (bench/synthetic.py), 2048x1024; `--tiny` runs tiny models on CPU ranks
(gloo) as a smoke test. Results go to OUT/ranks.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from ..pipeline.dit360 import DiT360Pipeline, GenerateRequest
from ..pipeline.model_files.download import resolve_model_paths
from ..worker.ranks import parallel_pipeline_class
from .synthetic import FULL, TINY, write_synthetic_models

PROMPT = "This is a panorama image. A quiet harbour at dawn, boats, mist over the water."


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dit360_blender.bench.ranks", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--ranks", default="1,2,4", help="group sizes to measure, e.g. 1,2,4,8")
    parser.add_argument("--tiny", action="store_true", help="tiny models on CPU ranks (gloo): a smoke test")
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument(
        "--memory-mode", default="resident", help="resident or fp8 (each rank holds the weights)"
    )
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--compile", default="off", choices=("off", "on", "auto"))
    parser.add_argument(
        "--sp-modes",
        default="auto",
        help="attention modes per group size: auto,ulysses,ring (forced modes run "
        "their all-to-all / ring code even on one rank, so one GPU checks them)",
    )
    parser.add_argument("--no-worker", action="store_true", help="skip the whole-job runs through the worker")
    parser.add_argument("--work", type=Path, default=None, help="reuse/keep the synthetic model set here")
    parser.add_argument("--out", type=Path, default=Path("bench-out"))
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.tiny
    spec = FULL if cuda else TINY
    width, height = (2048, 1024) if cuda else (64, 32)
    work = args.work or Path(tempfile.mkdtemp(prefix="dit360-bench-ranks-"))
    if not (work / "FLUX.1-dev" / "flux1-dev.safetensors").is_file():
        write_synthetic_models(work, spec, device="cuda" if cuda else "cpu")
    paths = resolve_model_paths(models_dir=work)
    args.out.mkdir(parents=True, exist_ok=True)
    load = {"dtype": args.dtype, "memory_mode": args.memory_mode, "compile": args.compile}
    request = GenerateRequest(PROMPT, seed=1, steps=args.steps, width=width, height=height)
    results: dict = {
        "env": _env(),
        "settings": {**load, "steps": args.steps, "size": [width, height]},
        "ranks": {},
    }

    reference = DiT360Pipeline.load(paths, device="cuda:0" if cuda else "cpu", **load)
    reference.generate(GenerateRequest(PROMPT, seed=1, steps=2, width=width, height=height))  # warm-up
    one = _timed(reference, request, cuda)
    results["one_process"] = {k: v for k, v in one.items() if k != "image"}
    del reference
    _free(cuda)
    for n in [int(x) for x in args.ranks.split(",") if x.strip()]:
        devices = [f"cuda:{i}" for i in range(n)] if cuda else ["cpu"] * n
        for mode in [m.strip() for m in args.sp_modes.split(",") if m.strip()]:
            name = str(n) if mode == "auto" else f"{n}-{mode}"
            try:
                entry = _in_process(
                    paths, devices, {**load, "sequence_parallel": mode}, request, cuda, one["image"]
                )
            except Exception as exc:  # one failing variant must not lose the others' numbers
                entry = {"failed": f"{type(exc).__name__}: {exc}"[:500]}
            results["ranks"][name] = entry
            print(f"[{name} ranks] {json.dumps(entry)}", flush=True)
            _save(args.out, results)
    if not args.no_worker:
        for n in [int(x) for x in args.ranks.split(",") if x.strip()]:
            device = ("cuda:0" if n == 1 else "cuda:" + ",".join(map(str, range(n)))) if cuda else f"cpu:{n}"
            entry = results["ranks"].setdefault(str(n), {})
            try:
                entry["worker_job"] = _worker_job(work, device, load, request, args.out)
            except Exception as exc:
                entry["worker_job"] = {"failed": f"{type(exc).__name__}: {exc}"[:500]}
            print(f"[{n} ranks, worker] {json.dumps(entry['worker_job'])}", flush=True)
            _save(args.out, results)
    print(json.dumps(results, indent=1))
    return 0


def _timed(pipe, request: GenerateRequest, cuda: bool) -> dict:
    """One generation: step times (between on_step calls), sampling and total time, the image."""
    marks: list[float] = []

    def on_step(step) -> None:
        marks.append(time.perf_counter())

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    generation = pipe.generate(request, on_step=on_step)
    gaps = [b - a for a, b in zip(marks, marks[1:])]
    return {
        "step_s_median": statistics.median(gaps) if gaps else None,
        "sample_s": generation.timings["sample_s"],
        "total_s": time.perf_counter() - start,
        "peak_gib_rank0": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "image": generation.image,
    }


def _in_process(paths, devices: list[str], load: dict, request, cuda: bool, reference: torch.Tensor) -> dict:
    pipe = parallel_pipeline_class().load(paths, device=devices, **load)
    try:
        warm = GenerateRequest(request.prompt, seed=1, steps=2, width=request.width, height=request.height)
        pipe.generate(warm, on_step=lambda s: None)
        timed = _timed(pipe, request, cuda)
        peaks = [timed.pop("peak_gib_rank0")] + [
            None if r.get("peak_bytes") is None else r["peak_bytes"] / 2**30 for r in pipe.group.last_reports
        ]
        image = timed.pop("image")
        diff = (image - reference).float()
        timed.update(
            peak_gib_per_rank=peaks,
            image_max_abs_diff=diff.abs().max().item(),
            image_rel_diff=(diff.norm() / reference.float().norm()).item(),
            mode=pipe.model_info["sequence_parallel"],
            collective_share=_collective_share(pipe, warm, cuda),
        )
        return timed
    finally:
        pipe.close()
        del pipe
        _free(cuda)


def _collective_share(pipe, request, cuda: bool) -> dict:
    """The share of rank 0's device time (CPU time on CPU ranks) spent in collectives, from a
    profile of a 2-step generation."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        pipe.generate(request, on_step=lambda s: None)
    total = comm = 0.0
    for event in prof.key_averages():
        t = event.self_device_time_total if cuda else event.self_cpu_time_total
        total += t
        name = event.key.lower()
        if any(
            word in name for word in ("nccl", "all_to_all", "alltoall", "allgather", "broadcast", "sendrecv")
        ):
            comm += t
    return {"share": comm / total if total else None, "collective_ms": comm / 1e3, "total_ms": total / 1e3}


def _worker_job(work: Path, device: str, load: dict, request, out: Path) -> dict:
    from ..client import Job, WorkerClient

    client = WorkerClient(log_dir=out / "worker-logs", extra_env={"HF_HUB_OFFLINE": "1"})
    try:
        fields = dict(
            prompt=request.prompt, output_dir=out / "images", width=request.width, height=request.height,
            device=device, models_dir=work, preview_every=0, **load,
        )  # fmt: skip
        t0 = time.perf_counter()
        client.run(Job(**fields, steps=2, seed=0), timeout=3600)  # start, load, (compile), warm
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        result = client.run(Job(**fields, steps=request.steps, seed=1), timeout=3600)
        return {"first_job_s": first, "warm_job_s": time.perf_counter() - t0, "timings": result["timings"]}
    finally:
        client.close()


def _env() -> dict:
    env = {"torch": torch.__version__, "gpus": []}
    if torch.cuda.is_available():
        env["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return env


def _free(cuda: bool) -> None:
    import gc

    gc.collect()
    if cuda:
        torch.cuda.empty_cache()


def _save(out: Path, results: dict) -> None:
    (out / "ranks.json").write_text(json.dumps(results, indent=1), encoding="utf-8")


if __name__ == "__main__":
    raise SystemExit(main())
