"""One generation, from its submission to its last event: the panel's settings become a job for the
worker, its events become the WindowManager's progress state, its previews are shown, and its end
applies the result (results.py) or gives everything back.

The World during a job: previews are shown in a *preview World* (preview.py: a copy of the scene's
World, or a new one) that the scene uses while the job runs. The user's World is not touched until
the result is in: then the image (the float HDR the worker wrote beside the PNG) goes into its
DiT360 chain, the scene gets its World back and, when the environment has a sun, its Sun lamp
(lighting.py). A failed or cancelled job gives the scene its World back and deletes the preview
World, so the World is exactly as it was. Scene and Worlds are found by session_uid, never by name
or Python reference: renames change names, undo and file loads free the Python objects.
"""

from __future__ import annotations

import base64
import random
import re
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import bpy

from ..client import Job
from . import output
from .common import prefs, runtime, short, user_dir
from .errors import GenerationError
from .link import WorkerLink
from .param_props import prefs_job_values, scene_job_values
from .preview import PreviewWorld
from .props import MAX_SEED
from .results import apply_result, undo_push
from .thumbnails import THUMBNAILS

# Share of the progress bar per stage (sampling takes the bulk of it).
_STAGE_SPAN = {
    "starting": (0.0, 0.02),
    "loading": (0.02, 0.08),
    "encoding": (0.08, 0.12),
    "sampling": (0.12, 0.92),
    "decoding": (0.92, 0.97),
    "saving": (0.97, 1.0),
}
_STAGE_LABELS = {"loading": "Loading models", "encoding": "Reading the prompt", "sampling": "Sampling",
                 "decoding": "Decoding", "saving": "Saving"}  # fmt: skip


def submit(scene: bpy.types.Scene, link: WorkerLink, **overrides: object) -> Generation:
    """Submit a job with the scene's panel settings (`overrides` win); returns at once.

    Raises GenerationError when it cannot even be submitted (no Python, bad values)."""
    job = _job_from_settings(scene, link, overrides)
    client = link.ensure_client()
    try:
        job_id = client.submit(job)
    except ValueError as exc:  # ProtocolError: a value the worker would refuse
        raise GenerationError(
            getattr(exc, "code", "bad_parameters"),
            getattr(exc, "message", str(exc)),
            getattr(exc, "hint", ""),
        ) from None
    gen = Generation(job_id, PreviewWorld.of(scene), job.to_params(), client.log_path)
    _reset_state(job_id, job.steps, starting=client.worker_pid is None)
    return gen


def warm_job(scene: bpy.types.Scene, link: WorkerLink) -> Job:
    """The `warm` job for the generate the panel's settings would submit now (its model and device
    settings, its size): nothing in the scene is changed, the seed included. Raises GenerationError
    as submit does when no worker Python is set up."""
    settings = scene.dit360
    overrides = {"seed": settings.seed, "prompt": settings.prompt.strip() or WARM_PROMPT}
    job = _job_from_settings(scene, link, overrides, record_seed=False)
    job.kind = "warm"
    return job


WARM_PROMPT = "This is a panorama image."  # a warm job's prompt when the panel has none yet


def _job_from_settings(
    scene: bpy.types.Scene, link: WorkerLink, overrides: dict, *, record_seed: bool = True
) -> Job:
    settings = scene.dit360
    seed = overrides.get("seed")
    if seed is None or (isinstance(seed, int) and seed < 0):
        seed = random.randint(0, MAX_SEED) if settings.randomize_seed else settings.seed
    if record_seed and (settings.randomize_seed or overrides.get("seed") is not None):
        settings.seed = int(seed)  # the panel shows the seed this world was made with
    link.check_python()
    out_dir = overrides.get("output_dir") or output.output_dir(settings)
    models_dir, model_paths = link.model_settings()
    values = scene_job_values(settings, overrides, skip=("seed", "output_dir"))
    values["prompt"] = str(values["prompt"]).strip()
    return Job(
        **values,
        **prefs_job_values(prefs()),
        seed=int(seed),
        output_dir=str(out_dir),
        models_dir=models_dir,
        model_paths=model_paths,
        loras=scene_loras(settings),
    )


def scene_loras(settings: bpy.types.PropertyGroup) -> list[dict]:
    """The panel's extra LoRAs as the table's `loras` items; rows without a file are skipped and
    '//' paths are made absolute from the .blend, since the worker does not know where it is."""
    return [
        {"path": bpy.path.abspath(item.path), "strength": float(item.strength)}
        for item in settings.loras
        if item.path.strip()
    ]


def _reset_state(job_id: str, steps: int, starting: bool) -> None:
    state = runtime()
    if state is None:
        return
    state.running = True
    state.job_id = job_id
    state.stage = "starting"
    state.step, state.total = 0, steps
    state.progress, state.elapsed, state.eta = 0.0, 0.0, -1.0
    state.status = "Starting the worker…" if starting else "Queued…"
    state.detail = ""
    state.error_code = state.error_message = state.error_hint = ""
    state.preview_icon = 0


@dataclass
class Generation:
    job_id: str
    preview: PreviewWorld  # the scene, the user's World and the preview World
    params: dict
    worker_log: Path | None  # where a worker that fails to start says why
    started: float = field(default_factory=time.monotonic)
    preview_key: str | None = None
    done: bool = False
    image_name: str | None = None
    error: GenerationError | None = None
    events: list[str] = field(default_factory=list)
    progress_log: list[tuple[str, int]] = field(default_factory=list)  # (stage, step) as the WM saw them
    previews_shown: int = 0
    push_undo: bool = True  # False when an operator that waits makes the undo step itself
    undo_message: str = "DiT360: Generate World"  # edits say which (edit_ops.start_edit)
    then: object = None  # called once the result is applied: the next job of a chain (resolution_ops)

    def on_event(self, event: dict) -> None:
        """One of this job's events (the pump routes them by job_id)."""
        kind = event.get("type")
        self.events.append(kind)
        state = runtime()
        if kind == "queued" and state is not None:
            state.status = "Queued" if event.get("position", 0) else "Starting…"
        elif kind == "progress":
            self._on_progress(event)
        elif kind == "preview":
            try:
                self._show_preview(event)
            except Exception:  # a preview must never break the job
                traceback.print_exc()
        elif kind == "result":
            self._finish_success(event)
        elif kind == "error":
            err = GenerationError(
                event.get("code", "internal"), event.get("message", ""), event.get("hint", "")
            )
            self.finish_error(err)

    def _on_progress(self, event: dict) -> None:
        stage, step, total = event["stage"], int(event["step"]), int(event["total"])
        self.progress_log.append((stage, step))
        state = runtime()
        if state is None:
            return
        state.stage, state.step, state.total = stage, step, total
        state.elapsed = float(event.get("elapsed") or 0.0)
        eta = event.get("eta")
        state.eta = -1.0 if eta is None else float(eta)
        lo, hi = _STAGE_SPAN.get(stage, (0.0, 1.0))
        frac = step / total if stage == "sampling" and total else 0.0
        state.progress = max(state.progress, lo + (hi - lo) * frac)
        label = _STAGE_LABELS.get(stage, stage.title())
        state.status = f"{label} {step}/{total}" if stage == "sampling" else f"{label}…"
        state.detail = short(event.get("detail") or "")

    # -- previews and the World ------------------------------------------------------------------

    def scene(self) -> bpy.types.Scene:
        return self.preview.scene()

    def _show_preview(self, event: dict) -> None:
        path = user_dir("previews") / f"preview-{self.job_id}-{event['step']}.png"
        path.write_bytes(base64.b64decode(event["data"]))
        self.preview.show(path)
        self.previews_shown += 1
        self._preview_icon(path)

    def _preview_icon(self, path: Path) -> None:
        """The panel's live preview (a thumbnail from the preview file)."""
        key = f"preview:{path.name}"
        icon_id = THUMBNAILS.load(key, path)
        if self.preview_key != key:
            THUMBNAILS.drop(self.preview_key)
        self.preview_key = key
        state = runtime()
        if state is not None:
            state.preview_icon = icon_id

    def drop_preview(self, restore_world: bool) -> None:
        """Give the scene its World back and delete the preview World, image, file and thumbnail."""
        self.preview.drop(restore_world)
        THUMBNAILS.drop(self.preview_key)
        self.preview_key = None
        state = runtime()
        if state is not None:
            state.preview_icon = 0

    # -- the end ---------------------------------------------------------------------------------

    def _finish_success(self, event: dict) -> None:
        scene = self.scene()
        seconds = float((event.get("timings") or {}).get("total_s", time.monotonic() - self.started))
        try:
            target = self.preview.user_world()
            preview = self.preview.world()
            if target is None:
                target = bpy.data.worlds.new("World")
            uses_ours = scene.world is None or scene.world == preview or scene.world == target
            image = apply_result(
                scene,
                event,
                self.params,
                world=target,
                take_world=uses_ours,
                seconds=seconds,
                before_assign=lambda: self.drop_preview(restore_world=False),
            )
        except Exception as exc:
            traceback.print_exc()
            self.finish_error(
                GenerationError(
                    "apply_failed",
                    f"The image was written to {event.get('path')} but could not be applied: {exc}",
                    "Load it by hand (World ▸ Environment Texture), and report this.",
                )
            )
            return
        self.done = True
        self.image_name = image.name
        state = runtime()
        if state is not None:
            state.running = False
            state.stage, state.progress = "done", 1.0
            state.eta = 0.0
            state.status = f"Done in {seconds:.1f} s: {Path(event['path']).name}"
            state.detail = ""
        if self.push_undo:
            undo_push(self.undo_message)
        if callable(self.then):
            self.then()

    def finish_error(self, err: GenerationError) -> None:
        """End the job with `err`: the scene gets its World back, the panel shows what and the fix."""
        if err.code == "worker_start_failed":
            err = explain_start_failure(err, self.worker_log)
        try:
            self.drop_preview(restore_world=True)
        except Exception:
            traceback.print_exc()
        self.done = True
        self.error = err
        state = runtime()
        if state is None:
            return
        cancelled = err.code == "cancelled"
        state.running = False
        state.stage = "cancelled" if cancelled else "failed"
        state.status = "Cancelled: the World is unchanged." if cancelled else "Failed."
        state.detail = ""
        state.error_code = "" if cancelled else err.code
        state.error_message = "" if cancelled else err.message
        state.error_hint = "" if cancelled else err.hint


def explain_start_failure(err: GenerationError, log: Path | None) -> GenerationError:
    """What the panel shows when the worker could not start: what happened and its cause (e.g.
    "ModuleNotFoundError: No module named 'torch'"), the last exception line of its output or, when
    that has none, of its log; the traceback stays in the log (the panel's Open Worker Log). The fix
    is always the same two buttons."""
    lines = err.message.splitlines()
    cause = _exception_line(lines) or (_exception_line(_log_tail(log)) if log is not None else None)
    message = lines[0] if lines else err.message
    if cause and cause not in message:
        message = f"{message}\n{cause}"
    hint = err.hint or (
        "Install dependencies (add-on Preferences ▸ Install Dependencies), or set the Python of an "
        "environment that has them" + (f". Details: {log}" if log is not None else ".")
    )
    return GenerationError(err.code, message, hint)


def _log_tail(log: Path, lines: int = 80) -> list[str]:
    """The last lines of the worker's log (its tail only: logs grow), [] when it cannot be read."""
    try:
        with open(log, "rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - 16384))
            return f.read().decode("utf-8", "replace").splitlines()[-lines:]
    except OSError:
        return []


def _exception_line(lines: list[str]) -> str | None:
    """The last "SomeError: text" line, or None."""
    for line in reversed(lines):
        if re.match(r"^([A-Za-z_][\w.]*(?:Error|Exception)): (.+)$", line.strip()):
            return short(line.strip(), 300)
    return None
