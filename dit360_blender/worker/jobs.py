"""The job side of the worker: the queue, the model cache, running one job, classifying failures.

Jobs run one at a time on the worker's main thread; the socket reader thread only queues, cancels
and answers `status`, so a `cancel` is seen while the pipeline is busy sampling.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ..params import apply_speed
from ..pipeline.dit360 import Cancelled, DiT360Pipeline, GenerateRequest, pick_device
from ..pipeline.errors import DiT360Error
from ..pipeline.make_panorama import Panorama, make_panorama
from ..pipeline.mapped_weights import copy_mapped_weights
from ..pipeline.model_files.download import resolve_model_paths
from ..pipeline.model_files.identity import models_identity
from ..pipeline.output_files import ensure_writable, plan_output
from ..pipeline.sampling import SamplerStep
from ..protocol import error, message
from .jobqueue import QueuedJob
from .preview import PreviewRenderer, encode_preview, fit_latent_rgb
from .ranks import device_spec, parallel_pipeline_class, rank_devices

logger = logging.getLogger(__name__)

Send = Callable[[dict], None]


class ModelCache:
    """Keeps one loaded pipeline; a job with the same model files and load settings (device, dtype,
    LoRA strength, memory mode, VRAM budget, compile, the user LoRAs' strengths) reuses it. The files
    count by identity (model_files/identity.py: size, times, inode of every file, user LoRAs
    included), so one changed on disk loads anew. Only one is kept: a 12B model twice would not
    fit, so a change unloads first."""

    def __init__(self) -> None:
        self.key: tuple | None = None
        self.pipe: DiT360Pipeline | None = None
        self.loads = 0
        self._projection: tuple[torch.Tensor, torch.Tensor] | None = None

    def get(
        self,
        params: dict,
        on_load: Callable[[], None],
        on_download: Callable,
        on_search: Callable[[], None] | None = None,
    ) -> tuple[DiT360Pipeline, bool]:
        """(pipeline, was_cached). Weights are resolved every time (cheap file checks), so a key
        names the exact files in use; `on_search()` runs before each component is looked for (it
        may raise Cancelled)."""
        models = params["models"]
        paths = resolve_model_paths(
            explicit=models["paths"] or None,
            models_dir=models["models_dir"],
            allow_download=models["allow_download"],
            token=None,  # huggingface_hub reads HF_TOKEN from the environment the client set
            progress=on_download,
            checkpoint=on_search,
        )
        spec = device_spec(params["device"], params.get("gpus", ""))
        ranks = rank_devices(spec)  # several devices: a rank group (worker/ranks.py)
        device = spec if ranks else _normalise(pick_device(spec))
        key = (  # from params.MODEL_SETTINGS only (derived), as the Blender side's warm-up assumes
            models_identity(paths.as_dict(), [item["path"] for item in params["loras"]]),
            str(device),
            params["dtype"],
            float(params["lora_strength"]),
            params["memory_mode"],
            params["vram_budget_gib"],
            params["compile"],
            tuple(float(item["strength"]) for item in params["loras"]),
        )
        if key == self.key and self.pipe is not None and not getattr(self.pipe, "broken", False):
            return self.pipe, True
        self.release()
        on_load()
        logger.info(
            "loading models (%s, %s, LoRA strength %s)", device, params["dtype"], params["lora_strength"]
        )
        load = parallel_pipeline_class().load if ranks else DiT360Pipeline.load
        self.pipe = load(
            paths,
            device=device,
            dtype=params["dtype"],
            lora_strength=float(params["lora_strength"]),
            memory_mode=params["memory_mode"],
            vram_budget_gib=params["vram_budget_gib"],
            compile=params.get("compile", "auto"),
            loras=[(item["path"], item["strength"]) for item in params["loras"]],
        )
        copied = copy_mapped_weights(self.pipe)  # a model file changed on disk can't SIGBUS a job
        if copied:
            logger.info("kept %.1f MB of memory-mapped weights in RAM", copied / 1e6)
        self.key, self.loads = key, self.loads + 1
        return self.pipe, False

    def projection(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The preview projection of the loaded VAE, fitted on first use."""
        if self._projection is None:
            assert self.pipe is not None
            weights, bias = fit_latent_rgb(self.pipe.vae)
            device = getattr(self.pipe, "device", None)  # where x0 is: no copy from the CPU per preview
            if isinstance(device, torch.device):
                weights, bias = weights.to(device), bias.to(device)
            self._projection = (weights, bias)
        return self._projection

    def release(self) -> None:
        if self.pipe is not None:
            logger.info("unloading models")
            getattr(self.pipe, "close", lambda: None)()  # a rank group's other processes stop
        self.pipe, self.key, self._projection = None, None, None
        free_memory()


def _total_steps(job: QueuedJob) -> int:
    """The sampling steps the job runs: known once it samples (an edit runs fewer than `steps`)."""
    return job.total if job.total is not None else int(job.params.get("steps", 0))


def _stop_if_cancelled(job: QueuedJob) -> None:
    if job.cancel.is_set():
        raise Cancelled()


def free_memory() -> None:
    """Drop garbage (a cancelled job's tensors) and give cached GPU blocks back to the driver."""
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
    mps = getattr(torch, "mps", None)
    if mps is not None and torch.backends.mps.is_available():
        mps.empty_cache()


def _normalise(device: torch.device) -> torch.device:
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


class JobRunner:
    """Runs one job at a time and sends its events; every job ends with `result` or `error`."""

    def __init__(self, send: Send, cache: ModelCache, log_path: Path | None = None) -> None:
        self.send = send
        self.cache = cache
        self.log_path = log_path
        self._tail_s = 0.0  # decode + save time of the last job, for the ETA
        self._previews: PreviewRenderer | None = None  # the running job's, while previews are in flight

    def run(self, job: QueuedJob) -> bool:
        """Run `job`; False when the worker must exit afterwards (a failure that breaks the GPU)."""
        job.started = time.monotonic()
        try:
            self._execute(job)
            return True
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # every other failure becomes the job's error event
            self._drain_previews()
            report, fatal = self._report(job, exc)
        # Out of the except block the traceback (and the tensors its frames hold) is gone.
        free_memory()
        self.send(report)
        return not fatal

    def _execute(self, job: QueuedJob) -> None:
        """Run the job by its kind (`params.JOB_KINDS`; the server only queues known kinds)."""
        JOB_KINDS_RUN[job.kind](self, job)

    def _generate(self, job: QueuedJob) -> None:
        p = apply_speed(job.params)  # checked against the parameter table when the job arrived
        request = GenerateRequest(
            prompt=p["prompt"], seed=p["seed"], steps=p["steps"], guidance=float(p["guidance"]),
            width=p["width"], height=p["height"], step_cache=float(p["step_cache"]),
        )  # fmt: skip
        out = plan_output(p["output_dir"], p["prompt"], p["seed"], p["filename"])
        ensure_writable(out.parent)  # fail before minutes of loading and sampling, not after
        if p["size"] != "native":  # so is a missing upscale model
            from ..pipeline.make_upscale import find_upscale_model

            find_upscale_model(p, self._download_cb(job))
        pipe, cached, timings = self.load_pipeline(job, p)
        made = make_panorama(
            pipe, request, out, hdr=p["hdr"], exr=p["exr"], cubemap=p["cubemap"], sun_share=float(p["sun_share"]),
            on_step=self.step_callback(job, self.previews(job)), should_cancel=job.cancel.is_set,
            on_stage=lambda s: self.stage(job, s),
        )  # fmt: skip
        if p["size"] == "native":
            self.send_result(job, made, request.width, request.height, timings, cached)
            return
        # generate's size: upscale what it made (the native files stay, named in the result)
        from ..pipeline.make_upscale import upscale_generated
        from .upscale_job import tile_progress

        native = {
            "path": str(made.path),
            "width": request.width,
            "height": request.height,
            "files": made.files,
        }
        big = upscale_generated(
            p, made, pipe, on_progress=tile_progress(self, job), should_cancel=job.cancel.is_set,
            on_stage=lambda s: self.stage(job, s), on_download=self._download_cb(job),
        )  # fmt: skip
        width = int(big.metadata["upscale"]["width"])
        big.timings = {**made.timings, **{f"upscale_{k}": v for k, v in big.timings.items()}}
        big.memory = {**made.memory, **big.memory}
        self.send_result(job, big, width, width // 2, timings, cached, native=native)

    def _warm(self, job: QueuedJob) -> None:
        """Load what a generate with these parameters uses; where its blocks are compiled, also run
        one step at its size (the compile, or the load of the compile cache, happens there), so the
        generate that follows starts sampling at full speed. Writes nothing."""
        p = apply_speed(job.params)
        pipe, cached, timings = self.load_pipeline(job, p)
        if pipe.model_info.get("compiled"):
            self.stage(job, "compiling")
            t0 = time.monotonic()
            request = GenerateRequest(
                prompt=p["prompt"], seed=0, steps=1, guidance=float(p["guidance"]), width=p["width"],
                height=p["height"],
            )  # fmt: skip
            pipe.generate(request, should_cancel=job.cancel.is_set)
            timings["compile_s"] = time.monotonic() - t0
        timings["total_s"] = time.monotonic() - job.started
        self.send(message("warmed", job_id=job.job_id, timings=timings, model_cached=cached))

    # -- what every job kind shares ----------------------------------------------------------------

    def load_pipeline(self, job: QueuedJob, p: dict) -> tuple[DiT360Pipeline, bool, dict]:
        """The loaded pipeline for the job's model settings (from the cache when they are the same),
        whether it was cached, and the timings so far; raises Cancelled when the job was cancelled."""
        timings = {"queued_s": job.started - job.submitted}
        t0 = time.monotonic()
        pipe, cached = self.cache.get(
            p,
            lambda: self.stage(job, "loading"),
            self._download_cb(job),
            on_search=lambda: _stop_if_cancelled(job),
        )
        timings["load_s"] = time.monotonic() - t0
        if not cached:  # what the first job of a worker waits for, part by part
            timings.update({f"load_{part}": s for part, s in pipe.load_timings.items()})
            job.memory.update(pipe.load_memory)
        _stop_if_cancelled(job)
        pipe.use_vae_wrap(bool(p["vae_wrap"]))  # a decode setting: no reload when it changes
        return pipe, cached, timings

    def send_result(
        self,
        job: QueuedJob,
        made: Panorama,
        width: int,
        height: int,
        timings: dict,
        cached: bool,
        native: dict | None = None,
    ) -> None:
        """The job's `result` event for the files `made` wrote (`native`: the generated size's files
        when a generate job also upscaled)."""
        self._drain_previews()
        timings.update(made.timings, total_s=time.monotonic() - job.started)
        self._tail_s = timings.get("decode_s", 0.0) + timings["save_s"]
        logger.info("job %s done in %.2f s: %s", job.job_id, timings["total_s"], made.path.name)
        memory = {**job.memory, **made.memory}
        self.send(
            message(
                "result", job_id=job.job_id, path=str(made.path), width=width, height=height,
                metadata=made.metadata, timings=timings, model_cached=cached, files=made.files,
                **({"native": native} if native else {}), **({"memory": memory} if memory else {}),
            )
        )  # fmt: skip

    # -- events ----------------------------------------------------------------------------------

    def stage(self, job: QueuedJob, stage: str) -> None:
        """Enter a progress stage (sends its `progress` event)."""
        job.stage = stage
        if stage == "sampling":
            job.sampling_started = time.monotonic()
        else:
            self._drain_previews()
        self._progress(job, stage, eta=None)

    def _progress(self, job: QueuedJob, stage: str, eta: float | None, detail: str | None = None) -> None:
        elapsed = time.monotonic() - job.started
        msg = message(
            "progress", job_id=job.job_id, stage=stage, step=job.step, total=_total_steps(job),
            elapsed=round(elapsed, 4), eta=None if eta is None else round(eta, 3),
        )  # fmt: skip
        if detail is not None:
            msg["detail"] = detail
        self.send(msg)

    def step_callback(self, job: QueuedJob, previews: PreviewRenderer | None) -> Callable:
        """The sampler's on_step: progress (with the ETA) and a preview every `preview_every` steps."""
        every = job.params["preview_every"]

        def on_step(step: SamplerStep) -> None:
            job.step, job.total = step.index, step.total
            if step.index == step.total and step.x0.is_cuda:
                # The GPU runs a step behind the loop: the last step's event waits for the GPU to
                # finish it, so "sampling done" means done (the decode is queued right after anyway).
                torch.cuda.synchronize(step.x0.device)
            per_step = (time.monotonic() - job.sampling_started) / step.index
            self._progress(job, "sampling", eta=per_step * (step.total - step.index) + self._tail_s)
            if previews is not None and (step.index % every == 0 or step.index == step.total):
                self._send_preview(job, previews, step)

        return on_step

    def previews(
        self, job: QueuedJob, width: int | None = None, height: int | None = None
    ) -> PreviewRenderer | None:
        """The preview renderer of a `width` x `height` job (default: its params'), None when off."""
        p = job.params
        if p["preview_every"] <= 0:
            return None
        try:
            return PreviewRenderer(self.cache.projection(), width or p["width"], height or p["height"])
        except Exception:  # a preview must never fail the job
            logger.warning(
                "previews are off for job %s: the projection could not be set up", job.job_id, exc_info=True
            )
            return None

    def _send_preview(self, job: QueuedJob, previews: PreviewRenderer, step: SamplerStep) -> None:
        """Rendered and sent from the renderer's thread (the sampling loop goes on at once); the
        job's later events wait for it (`_drain_previews`)."""
        index, total = step.index, step.total

        def deliver(png: bytes, width: int, height: int) -> None:
            self.send(
                message(
                    "preview", job_id=job.job_id, step=index, total=total, width=width, height=height,
                    mime="image/png", data=encode_preview(png),
                )
            )  # fmt: skip

        self._previews = previews
        try:
            previews.submit(step.x0, deliver)
        except Exception:
            logger.warning("preview at step %d failed", index, exc_info=True)

    def _drain_previews(self) -> None:
        """Every preview of the running job is sent before its next stage, result or error."""
        previews, self._previews = self._previews, None
        if previews is not None:
            previews.drain()

    def _download_cb(self, job: QueuedJob) -> Callable[[str, int, int], None]:
        last = [0.0]

        def on_download(filename: str, done: int, total: int) -> None:
            if job.cancel.is_set():
                raise Cancelled()  # hub.py lets exceptions from the callback through unchanged
            now = time.monotonic()
            if now - last[0] >= 0.25 or (total and done >= total):
                last[0] = now
                size = f"{done / 1e9:.2f}/{total / 1e9:.2f} GB" if total else f"{done / 1e9:.2f} GB"
                self._progress(job, "loading", eta=None, detail=f"downloading {filename} {size}")

        return on_download

    def _report(self, job: QueuedJob, exc: BaseException) -> tuple[dict, bool]:
        """The job's final `error` message and whether the worker must exit."""
        code, text, hint, fatal = classify(exc, self.log_path, job.stage)
        details: dict = {}
        if code == "cancelled":
            text = f"Cancelled after {job.step} of {_total_steps(job)} sampling steps."
            details = {"step": job.step, "cancel_step": job.cancel_step}
        if code == "out_of_memory":
            text, hint, details = self._out_of_memory(job, text, hint)
        if code in ("internal", "cuda_error"):
            logger.error("job %s failed", job.job_id, exc_info=(type(exc), exc, exc.__traceback__))
        else:
            logger.warning("job %s ended: %s: %s", job.job_id, code, text.splitlines()[0] if text else "")
        extra = {"details": details} if details else {}
        return error(code, text, hint, job_id=job.job_id, fatal=fatal, **extra), fatal

    def _out_of_memory(self, job: QueuedJob, text: str, hint: str) -> tuple[str, str, dict]:
        """An out-of-memory error's text, hint and details: the memory each stage held so far, and
        when a VRAM budget capped the allocator, that the budget is what ran out."""
        pipe = self.cache.pipe if job.stage != "loading" else None  # a load's peaks are in job.memory
        memory = {**job.memory, **(pipe.peaks.report() if pipe is not None else {})}
        cap = memory.get("cap_gib")
        if cap:
            text = f"{text} (the VRAM budget caps this worker at {cap:.1f} GiB, the CUDA context aside)"
            hint = (
                "Raise the VRAM budget, or choose the 'stream' memory mode with your budget (it keeps "
                "only what fits on the GPU). " + hint
            )
        return text, hint, {"memory": memory, "stage": job.stage} if memory else {"stage": job.stage}


_OOM_HINT = (
    "Close other programs that use the GPU, choose bf16 or fp16 precision, or a smaller size "
    "(1024x512). The worker freed the job's memory and is ready for the next job."
)
_CUDA_HINT = (
    "The worker has exited so the GPU is clean; the next job starts a fresh worker. If it happens "
    "again, update the GPU driver, try a smaller size, or choose device 'cpu'."
)


def classify(
    exc: BaseException, log_path: Path | None = None, stage: str = "saving"
) -> tuple[str, str, str, bool]:
    """(code, message, hint, fatal) for a job failure. Fatal: the GPU context may be broken.
    `stage`: the job's stage when it failed; an OSError before "saving" came from reading."""
    if isinstance(exc, Cancelled):
        return "cancelled", "The job was cancelled.", "", False
    if isinstance(exc, DiT360Error):
        return exc.code, exc.message, exc.hint, False
    text = f"{type(exc).__name__}: {exc}".strip()
    first = text.splitlines()[0][:500] if text else type(exc).__name__
    if _is_oom(exc):
        return "out_of_memory", f"Out of memory: {first}", _OOM_HINT, False
    if isinstance(exc, OSError) and stage != "saving":  # the loaders word most read errors themselves
        hint = "The disk reported an error reading the model files: check the drive, or copy them again."
        return "bad_checkpoint", f"Could not read the model files: {first}", hint, False
    if isinstance(exc, OSError):  # writing the image files
        hint = "Choose an output folder you can write to, with free disk space."
        return "disk_write_failed", f"Could not write the image files: {first}", hint, False
    if _is_gpu_failure(exc):
        return "cuda_error", f"The GPU failed: {first}", _CUDA_HINT, True
    where = f" ({log_path})" if log_path is not None else ""
    return (
        "internal",
        f"Unexpected failure: {first}",
        f"The worker keeps running. The full traceback is in the worker log{where}; please report it.",
        False,
    )


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, (torch.cuda.OutOfMemoryError, MemoryError)):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def _is_gpu_failure(exc: BaseException) -> bool:
    accelerator_error = getattr(torch, "AcceleratorError", None)
    if accelerator_error is not None and isinstance(exc, accelerator_error):
        return True
    text = str(exc)
    markers = (
        "CUDA error",
        "CUBLAS_STATUS",
        "CUDNN_STATUS",
        "cuDNN error",
        "device-side assert",
        "NCCL error",
    )
    return isinstance(exc, RuntimeError) and any(m in text for m in markers)


def _run_edit(runner: JobRunner, job: QueuedJob) -> None:
    from .edit_job import run_edit  # the edit's inputs and mask geometry load only for edits

    run_edit(runner, job)


def _run_upscale(runner: JobRunner, job: QueuedJob) -> None:
    from .upscale_job import run_upscale  # spandrel and the upscale path load only for upscales

    run_upscale(runner, job)


# How each job kind (params.JOB_KINDS) runs: a function (runner, job) that sends the job's `result`
# (through runner.send_result) or raises; a new kind adds its entry here (see /tmp/brief/job_kinds.md).
JOB_KINDS_RUN: dict[str, Callable[[JobRunner, QueuedJob], None]] = {
    "generate": JobRunner._generate,
    "edit": _run_edit,
    "upscale": _run_upscale,
    "warm": JobRunner._warm,
}
