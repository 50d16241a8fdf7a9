"""What the user waits for, measured the way Blender drives it, and the honest diffusers baseline.

* `diffusers_compiled`: diffusers' `FluxTransformer2DModel` with `compile_repeated_blocks()` (the
  one-liner a diffusers user adds): the step every figure is compared with.
* `worker_jobs`: a real worker process through the real client (`WorkerClient`), per variant: spawn
  → `ready`, a cold first job (load, compile, sample, decode, files) and a warm second job, each timed
  from submit to the `result` event, with the last sampling step's arrival (so the tail after it is
  known) and the device-level VRAM in use (`torch.cuda.mem_get_info` polled from this process:
  it sees the worker's CUDA context and allocator cache too). A second launch of the same variant
  shows what the persisted compile cache saves.
"""

from __future__ import annotations

import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ..client import Job, WorkerClient

GIB = 2**30
PROMPT = "This is a panorama image. A sunny alpine lake surrounded by pine forest and snowy peaks."


def diffusers_compiled(model: torch.nn.Module, time_step: Callable[[], float]) -> dict:
    """Compile `model` (diffusers) block by block and time a step; the first call's time includes
    the compilation."""
    t0 = time.perf_counter()
    model.compile_repeated_blocks(fullgraph=True)
    step_s = time_step()
    return {"step_s": step_s, "compile_and_first_steps_s": time.perf_counter() - t0}


class VramWatch:
    """Polls the device's free memory every 20 ms from this process; `peak_used_gib` is the most the
    device had in use beyond what was in use when the watch started (the worker's context included)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.base_free = torch.cuda.mem_get_info(device)[0]
        self.min_free = self.base_free
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._stop.wait(0.02):
            self.min_free = min(self.min_free, torch.cuda.mem_get_info(self.device)[0])

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return (self.base_free - self.min_free) / GIB


WORKER_VARIANTS: dict[str, dict] = {
    "fp8+compile": {"dtype": "bf16", "memory_mode": "fp8", "compile": "on"},
    "auto bf16": {"dtype": "bf16", "compile": "auto"},
    "auto fp16": {"dtype": "fp16", "compile": "auto"},
    "fastest": {"dtype": "bf16", "speed": "fastest", "compile": "on"},
    # the 16 GiB layout (T5 streamed, tiled decode) and the 8 GiB stream budget, for device-level VRAM
    "fp8 16GiB": {"dtype": "bf16", "memory_mode": "fp8", "vram_budget_gib": 16.0, "compile": "on"},
    "stream 8GiB": {"dtype": "bf16", "memory_mode": "stream", "vram_budget_gib": 8.0, "compile": "off"},
    # every middle step skipped: the cost of a skipped step (an upper bound of the cache's gain,
    # not an image one would keep; random weights never pass the 0.1 threshold on their own)
    "cache every step": {"dtype": "bf16", "memory_mode": "fp8", "compile": "on", "step_cache": 1.0},
    # the worker's default allocator settings lifted (launch.worker_env sets expandable segments)
    "fp8+compile default-alloc": {
        "dtype": "bf16", "memory_mode": "fp8", "compile": "on", "env": {"PYTORCH_CUDA_ALLOC_CONF": ""},
    },
    "fp8 16GiB default-alloc": {
        "dtype": "bf16", "memory_mode": "fp8", "vram_budget_gib": 16.0, "compile": "on",
        "env": {"PYTORCH_CUDA_ALLOC_CONF": ""},
    },
}  # fmt: skip
WARMED = " warmed"  # a variant's name + this: a `warm` job first (the preference "Load the Model
# When the Panel Opens"), then the cold and warm jobs


def worker_variant(name: str) -> dict:
    """The job settings of a variant name (WORKER_VARIANTS, optionally + WARMED)."""
    variant = dict(WORKER_VARIANTS[name.removesuffix(WARMED)])
    if name.endswith(WARMED):
        variant["warm_first"] = True
    return variant


def worker_jobs(
    models_dir: Path,
    user_dir: Path,
    variant: dict,
    width: int,
    height: int,
    steps: int,
    device: torch.device | None,
) -> dict:
    """One worker launch of `variant` (job parameters): ready time, cold and warm job figures.
    `user_dir` plays the add-on's user folder: its compile cache is shared by every launch."""
    log_dir = user_dir
    out_dir = Path(tempfile.mkdtemp(prefix="out-", dir=user_dir))
    watch = VramWatch(device) if device is not None else None
    t0 = time.perf_counter()
    client = WorkerClient(log_dir=log_dir, extra_env={"HF_HUB_OFFLINE": "1", **variant.get("env", {})})
    record: dict = {"variant": variant}
    settings = {k: v for k, v in variant.items() if k not in ("warm_first", "env")}
    try:
        client.start()
        record["spawn_to_ready_s"] = time.perf_counter() - t0  # `ready`: jobs can be queued
        client.wait_for_device()  # the `device` event: torch and the pipeline are loaded
        record["spawn_to_device_s"] = time.perf_counter() - t0
        runs = (
            (("preload", 0), ("cold", 1), ("warm", 2))
            if variant.get("warm_first")
            else (("cold", 1), ("warm", 2))
        )
        for name, seed in runs:
            job = Job(
                kind="warm" if name == "preload" else "generate", prompt=PROMPT, output_dir=str(out_dir),
                seed=seed, steps=steps, width=width, height=height, models_dir=str(models_dir),
                preview_every=1, **settings,  # as Blender drives it
            )  # fmt: skip
            record[name] = _timed_job(client, job, steps)
    finally:
        client.close()
        if watch is not None:
            record["device_vram_peak_gib"] = watch.stop()
    return record


def _timed_job(client: WorkerClient, job: Job, steps: int) -> dict:
    marks: dict[str, float] = {}
    t0 = time.perf_counter()

    def on_event(event: dict) -> None:
        now = time.perf_counter() - t0
        if event["type"] != "progress":
            return
        if event["stage"] == "sampling" and event["step"] == steps:
            marks["last_step_s"] = now
        marks.setdefault(f"{event['stage']}_at_s", now)  # when each stage began

    result = client.run(job, on_event=on_event, timeout=900)
    total = time.perf_counter() - t0
    out = {"result_s": total, **marks, "worker_timings": result["timings"]}
    if "last_step_s" in marks:
        out["tail_after_last_step_s"] = total - marks["last_step_s"]
    out["transformer_evaluations"] = result.get("metadata", {}).get("transformer_evaluations")
    out["memory"] = result.get("memory")  # the worker's own: GiB per stage, allocated and reserved
    return out
