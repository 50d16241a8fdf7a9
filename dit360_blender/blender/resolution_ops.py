"""Upscale a history entry to the panel's Resolution (issue 15): a job of kind "upscale" for the
worker, whose source is the entry's native (2K) PNG. It runs as a generation does (progress, cancel,
a failure leaves the World as it was); its result joins the entry as one more size
(blender/resolution.py) and the World shows it, the largest. The panel's Refine and its strength
go with it, and the entry's own prompt and seed (the Refine pass is FLUX.1-dev img2img)."""

from __future__ import annotations

from pathlib import Path

import bpy
from bpy.props import IntProperty

from ..client import Job
from ..params import UPSCALE, for_job
from . import output, paths, resolution
from .common import prefs, runtime, tag_redraw
from .errors import GenerationError
from .generation import Generation, _reset_state, scene_loras
from .param_props import enum_value, prefs_job_values, scene_job_values
from .preview import PreviewWorld

_UPSCALE_NAMES = {p.name for p in for_job(UPSCALE)}


def native_file(entry: bpy.types.PropertyGroup) -> Path:
    """The entry's smallest size: the panorama the generation made (what an upscale starts from)."""
    return Path(paths.resolve(resolution.smallest_file(entry)))


def start_upscale(scene: bpy.types.Scene, entry: bpy.types.PropertyGroup, **overrides: object) -> Generation:
    """Submit an upscale of history `entry` with the panel's Resolution/Refine (`overrides` win);
    returns at once. Raises GenerationError when it can't be submitted."""
    from .pump import PUMP, ensure_timer  # (the pump imports this module to chain its jobs)

    if PUMP.busy:
        raise GenerationError("busy", "A world is already being generated.", "Wait for it, or press Cancel.")
    settings = scene.dit360
    size = str(overrides.get("size") or enum_value(settings.size))
    if size == "native":
        raise GenerationError(
            "bad_parameters", "The Resolution is 2K (native): there is nothing to upscale to.",
            "Choose 4K, 8K or 16K under Resolution.",
        )  # fmt: skip
    source = native_file(entry)
    if not source.is_file():
        raise GenerationError(
            "bad_parameters", f"The entry's panorama {source} is missing.",
            "Generate it again (Copy Settings, then Generate World), or restore the file.",
        )  # fmt: skip
    link = PUMP.link
    link.check_python()
    models_dir, model_paths = link.model_settings()
    values = scene_job_values(settings, overrides, skip=("output_dir",), job=UPSCALE)
    # the Refine pass redraws the entry's own picture: its prompt and seed, not the panel's
    values.update(prompt=entry.prompt, seed=int(entry.seed), size=size)
    values = {k: v for k, v in values.items() if k in _UPSCALE_NAMES}  # what the upscale kind takes
    prefs_values = {k: v for k, v in prefs_job_values(prefs()).items() if k in _UPSCALE_NAMES}
    extra = {"loras": scene_loras(settings)} if "loras" in _UPSCALE_NAMES else {}
    try:
        job = Job(
            kind=UPSCALE, **values, **prefs_values, source=str(source),
            output_dir=str(overrides.get("output_dir") or output.output_dir(settings)),
            models_dir=models_dir, model_paths=model_paths, **extra,
        )  # fmt: skip
        client = link.ensure_client()
        job_id = client.submit(job)
    except (ValueError, TypeError) as exc:  # ProtocolError: a value the worker would refuse
        raise GenerationError(
            getattr(exc, "code", "bad_parameters"),
            getattr(exc, "message", str(exc)),
            getattr(exc, "hint", ""),
        ) from None
    gen = Generation(job_id, PreviewWorld.of(scene), job.to_params(), client.log_path)
    gen.undo_message = f"DiT360: Upscale World ({size.upper()})"
    _reset_state(job_id, int(job.params.get("steps") or 1), starting=client.worker_pid is None)
    PUMP.job = gen
    link.note_busy()
    ensure_timer()
    tag_redraw()
    return gen


def requested(scene: bpy.types.Scene, overrides: dict) -> tuple[str, bool, float]:
    """The Resolution, Refine and its strength a Generate asks for (the call's, else the panel's)."""
    settings = scene.dit360
    size = overrides.get("size")
    size = enum_value(settings.size) if size is None else enum_value(str(size))
    refine = overrides.get("refine")
    strength = overrides.get("refine_strength")
    return (
        size,
        bool(settings.refine if refine is None else refine),
        float(settings.refine_strength if strength is None else strength),
    )


def chain_upscale(gen: Generation, scene: bpy.types.Scene, size: str, refine: bool, strength: float) -> None:
    """Generate at 2K, then upscale: once `gen`'s result is applied (its history entry recorded),
    an upscale job of that entry starts, so the World shows the 2K world at once and the larger one
    when it is done, and the entry keeps both. A failure to start it shows in the panel."""
    if size == "native":
        return

    def start() -> None:
        settings = scene.dit360
        if not len(settings.history):
            return
        entry = settings.history[settings.history_index]
        try:
            # beside the 2K world it starts from (the generate's folder, maybe the operator's own)
            folder = gen.params.get("output_dir") or None
            nxt = start_upscale(
                scene, entry, size=size, refine=refine, refine_strength=strength, output_dir=folder
            )
        except GenerationError as err:
            state = runtime()
            if state is not None:
                state.error_code, state.error_message, state.error_hint = err.code, err.message, err.hint
                state.status = "The 2K world is applied; its upscale could not start."
            tag_redraw()
            return
        nxt.push_undo = gen.push_undo

    gen.then = start


def wait_chain(first: Generation, timeout: float | None = None) -> Generation:
    """Pump until `first` and the jobs it chained are done (the blocking path of scripts and
    `blender -b`); returns the last job, whose `error` is the chain's."""
    from .pump import PUMP

    job = first
    PUMP.wait(job, timeout=timeout)
    while PUMP.job is not None and PUMP.job is not job and job.error is None:
        job = PUMP.job
        PUMP.wait(job, timeout=timeout)
    return job


class DIT360_OT_upscale_history(bpy.types.Operator):
    """Upscale this world to the panel's Resolution (with Refine if it is on); the result joins the
    entry as one more size and the World shows it"""

    bl_idname = "dit360.upscale_history"
    bl_label = "Upscale"
    bl_options = {"REGISTER"}

    index: IntProperty(options={"SKIP_SAVE"})

    @classmethod
    def poll(cls, context: bpy.types.Context) -> bool:
        from .pump import PUMP

        if PUMP.busy:
            cls.poll_message_set("A world is being generated")
            return False
        return context.scene is not None and enum_value(context.scene.dit360.size) != "native"

    def execute(self, context: bpy.types.Context) -> set[str]:
        history = context.scene.dit360.history
        if not 0 <= self.index < len(history):
            self.report({"ERROR"}, "No such history entry.")
            return {"CANCELLED"}
        try:
            job = start_upscale(context.scene, history[self.index])
        except GenerationError as err:
            self.report({"ERROR"}, f"{err.message} — {err.hint}" if err.hint else err.message)
            return {"CANCELLED"}
        if bpy.app.background:  # timers never run there: wait for the result as dit360.generate does
            from .pump import PUMP

            job.push_undo = False
            PUMP.wait(job)
            if job.error is not None:
                self.report({"ERROR"}, job.error.message)
                return {"CANCELLED"}
        return {"FINISHED"}


CLASSES = (DIT360_OT_upscale_history,)
