"""The worker's `upscale` job kind (params.UPSCALE): the source's header and the asked size are
checked against the model before anything heavy loads, then the super-resolution (and, with refine,
the shared diffusion-model cache and the tiled detail pass), then the usual result.

Progress: stage "upscaling" counts the super-resolution tiles of all passes, stage "refining" the
refine pass's tile-steps (step/total of the progress event); a cancel stops between any two."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from ..params import GENERATE, defaults
from ..pipeline.make_upscale import upscale_job
from ..pipeline.output_files import ensure_writable, plan_output
from ..pipeline.refine import Refiner
from .jobqueue import QueuedJob

if TYPE_CHECKING:
    from .jobs import JobRunner

_STAGE_OF = {"upscale": "upscaling", "refine": "refining"}


def tile_progress(runner: JobRunner, job: QueuedJob) -> Callable[[str, int, int], None]:
    """make_upscale's (stage, done, total) callback as the job's progress events, with an ETA."""
    state = {"stage_start": time.monotonic()}

    def on_progress(stage: str, done: int, total: int) -> None:
        name = _STAGE_OF[stage]
        if job.stage != name:
            job.stage, state["stage_start"] = name, time.monotonic()
        job.step, job.total = done, total
        per = (time.monotonic() - state["stage_start"]) / max(done, 1)
        runner._progress(job, name, eta=per * (total - done))

    return on_progress


def run_upscale(runner: JobRunner, job: QueuedJob) -> None:
    """Run one upscale job and send its `result` (or raise: the runner reports the error)."""
    p = job.params  # checked against the parameter table when the job arrived
    source = Path(p["source"])
    out = plan_output(p["output_dir"], "", 0, p["filename"], default_stem=f"{source.stem}_{p['size']}")
    ensure_writable(out.parent)  # fail before the model loads, not after
    state = {"cached": False, "timings": {}}
    on_progress = tile_progress(runner, job)

    def load_refiner(params: Mapping) -> Refiner:
        model_params = {**defaults(GENERATE), **{k: v for k, v in params.items() if k != "prompt"}}
        pipe, cached, timings = runner.load_pipeline(job, model_params)
        state["cached"], state["timings"] = cached, timings
        return Refiner.for_job(pipe, params)

    made = upscale_job(
        p, out, load_refiner=load_refiner, on_progress=on_progress, should_cancel=job.cancel.is_set,
        on_stage=lambda s: runner.stage(job, s), on_download=runner._download_cb(job),
    )  # fmt: skip
    width = int(made.metadata["upscale"]["width"])
    timings = {"queued_s": job.started - job.submitted, **state["timings"]}
    runner.send_result(job, made, width, width // 2, timings, state["cached"])
