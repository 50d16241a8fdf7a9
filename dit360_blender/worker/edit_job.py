"""The worker's `edit` job kind (params.EDIT): the inputs read and checked first (a bad file fails
before any model loads), then the shared model cache, the edit loop and the usual result."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..params import apply_speed
from ..pipeline.edit_inputs import read_edit_inputs
from ..pipeline.img2img import strength_start
from ..pipeline.make_edit import make_edit
from ..pipeline.output_files import ensure_writable, plan_output
from .jobqueue import QueuedJob

if TYPE_CHECKING:
    from .jobs import JobRunner


def run_edit(runner: JobRunner, job: QueuedJob) -> None:
    """Run one edit job and send its `result` (or raise: the runner reports the error)."""
    p = apply_speed(job.params)  # checked against the parameter table when the job arrived
    inputs = read_edit_inputs(p)
    out = plan_output(p["output_dir"], p["prompt"], p["seed"], p["filename"], default_stem=inputs.stem)
    ensure_writable(out.parent)  # fail before minutes of loading and sampling, not after
    job.total = p["steps"] - strength_start(p["steps"], p["strength"])  # the steps it runs, for progress
    pipe, cached, timings = runner.load_pipeline(job, p)
    previews = runner.previews(job, *inputs.work_size)  # the previews show the latents the model works on
    if previews is not None:
        previews.unroll = inputs.unroll  # a seam repair's previews show the panorama the right way round
    made = make_edit(
        pipe, p, inputs, out, on_step=runner.step_callback(job, previews), should_cancel=job.cancel.is_set,
        on_stage=lambda s: runner.stage(job, s),
    )  # fmt: skip
    runner.send_result(job, made, inputs.width, inputs.height, timings, cached)
