"""The add-on's engine room: one worker client, the running job, background tasks, and `tick()`.

`tick()` is a plain function (the timer calls it; tests and `api.generate_world(wait=True)` call it
themselves, because `bpy.app.timers` never fire in `blender -b` or in the bpy module). It drains the
client's and the tasks' queues with a bounded amount of work, updates the WindowManager state,
shows previews, applies the result, and returns when it wants to run again (None: nothing to do).

The World during a job: previews are shown in a *preview World* (a copy of the scene's World, or a
new one) that the scene uses while the job runs. The user's World is not touched until the result
is in: then the image (the float HDR the worker wrote beside the PNG) goes into its DiT360 chain,
the scene gets its World back and, when the environment has a sun, its Sun lamp (lighting.py). A failed or
cancelled job gives the scene its World back and deletes the preview World, so the World is
exactly as it was. World and scene are remembered by name, never by Python reference: undo and
file loads free the Python objects.
"""

from __future__ import annotations

import base64
import json
import random
import re
import sys
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import bpy

from ..client import PACKAGE_DIR, Job, WorkerClient
from . import history, lighting, output, world
from .common import prefs, runtime, short, tag_redraw, user_dir, vendor_setup_script
from .props import MAX_SEED
from .tasks import BackgroundTask, worker_env

ACTIVE_INTERVAL_S = 0.1
IDLE_INTERVAL_S = 2.0
MAX_EVENTS_PER_TICK = 64  # bounded work per tick: Blender stays responsive whatever arrives
MAX_LINES_PER_TICK = 200
PREVIEW_IMAGE = "DiT360 Preview"
PREVIEW_WORLD = "DiT360 Preview World"
COMPONENTS = ("transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "lora")

# Share of the progress bar per stage (sampling takes the bulk of it).
_STAGE_SPAN = {
    "starting": (0.0, 0.02),
    "loading": (0.02, 0.08),
    "encoding": (0.08, 0.12),
    "sampling": (0.12, 0.92),
    "decoding": (0.92, 0.97),
    "saving": (0.97, 1.0),
}


class GenerationError(Exception):
    """A generation that could not start or did not finish: the protocol error code, what happened
    and the fix. `api.generate_world` raises it; the panel shows `message` and `hint`."""

    def __init__(self, code: str, message: str, hint: str = "") -> None:
        super().__init__(f"{message}\n  fix: {hint}" if hint else message)
        self.code, self.message, self.hint = code, message, hint


@dataclass
class ActiveJob:
    job_id: str
    scene_name: str
    world_name: str | None  # the scene's World when the job started (None: it had none)
    params: dict
    started: float = field(default_factory=time.monotonic)
    preview_world: str | None = None
    preview_image: str | None = None
    preview_file: Path | None = None
    preview_key: str | None = None
    done: bool = False
    image_name: str | None = None
    error: GenerationError | None = None
    events: list[str] = field(default_factory=list)
    previews_shown: int = 0
    push_undo: bool = True  # False when an operator that waits makes the undo step itself


class Controller:
    def __init__(self) -> None:
        self.client: WorkerClient | None = None
        self._client_key: tuple | None = None
        self.job: ActiveJob | None = None
        self.tasks: dict[str, BackgroundTask] = {}
        self.progress_log: list[tuple[str, int]] = []  # (stage, step) as the WindowManager saw them
        self.previews = None  # a bpy.utils.previews collection (panel thumbnails)
        self._last_busy = time.monotonic()
        self._closers: list[threading.Thread] = []
        self._backlog: deque[dict] = deque()  # events polled but not handled yet (bounded ticks)

    # -- settings -> worker ----------------------------------------------------------------------

    def worker_python(self) -> tuple[str, Path | None]:
        """(interpreter, vendor folder or None) the worker runs with."""
        p = prefs()
        if p is not None and p.python_source == "CUSTOM":
            return bpy.path.abspath(p.python_path.strip()), None
        return sys.executable, user_dir("vendor")

    def _check_python(self) -> None:
        python, _vendor = self.worker_python()
        if not python or not Path(python).is_file():
            raise GenerationError(
                "worker_start_failed",
                f"The worker's Python {python or '(not set)'} does not exist.",
                "Set the Python interpreter in the add-on Preferences (Dependencies), or choose "
                "Blender's own Python and press Install Dependencies.",
            )

    def ensure_client(self) -> WorkerClient:
        """The client for the current preferences; a changed Python, vendor folder or token gets a
        new client (the old worker is stopped in the background)."""
        p = prefs()
        python, vendor = self.worker_python()
        token = p.hf_token.strip() if p is not None else ""
        key = (python, str(vendor) if vendor else None, token)
        if self.client is not None and key != self._client_key:
            self._close_in_background(self.client)
            self.client = None
        if self.client is None:
            self.client = WorkerClient(
                python=python,
                vendor_dir=vendor,
                log_dir=user_dir("logs"),
                hf_token=token or None,
                # Generation never downloads (that is the Download Models button's job, after the
                # online-access check), so the worker is told to stay offline.
                extra_env={"HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"},
            )
            self._client_key = key
        return self.client

    def _close_in_background(self, client: WorkerClient) -> None:
        t = threading.Thread(target=client.close, name="dit360-close", daemon=True)
        t.start()
        self._closers.append(t)

    def model_settings(self) -> tuple[str | None, dict[str, str]]:
        """(models folder or None, explicit component paths) from the preferences."""
        p = prefs()
        if p is None or p.models_source == "CACHE":
            return None, {}
        models_dir = bpy.path.abspath(p.models_dir).strip() or None
        paths: dict[str, str] = {}
        if p.models_source == "FILES":
            for component in COMPONENTS:
                value = getattr(p, f"{component}_path").strip()
                if value:
                    paths[component] = bpy.path.abspath(value)
        return models_dir, paths

    # -- jobs ------------------------------------------------------------------------------------

    @property
    def busy(self) -> bool:
        return self.job is not None and not self.job.done

    def start_generation(self, scene: bpy.types.Scene, **overrides: object) -> ActiveJob:
        """Submit a job with the scene's panel settings (`overrides` win); returns at once.

        Raises GenerationError when it cannot even be submitted (busy, no Python, bad values)."""
        if self.busy:
            raise GenerationError(
                "busy", "A world is already being generated.", "Wait for it, or press Cancel."
            )
        settings = scene.dit360
        p = prefs()

        def pick(name: str) -> object:
            value = overrides.get(name)
            return getattr(settings, name) if value is None else value

        seed = overrides.get("seed")
        if seed is None or (isinstance(seed, int) and seed < 0):
            seed = random.randint(0, MAX_SEED) if settings.randomize_seed else settings.seed
        if settings.randomize_seed or overrides.get("seed") is not None:
            settings.seed = int(seed)  # the panel shows the seed this world was made with
        prompt = str(pick("prompt")).strip()
        if not prompt:
            raise GenerationError(
                "bad_parameters",
                "The prompt is empty.",
                'Describe the world, e.g. "This is a panorama image. A beach at dusk".',
            )
        self._check_python()
        out_dir = overrides.get("output_dir") or output.output_dir(settings)
        models_dir, model_paths = self.model_settings()
        vram = float(p.vram_budget_gib) if p is not None and p.vram_budget_gib > 0 else None
        job = Job(
            prompt=prompt,
            output_dir=str(out_dir),
            seed=int(seed),
            steps=int(pick("steps")),
            guidance=float(pick("guidance")),
            width=int(pick("width")),
            height=int(pick("height")),
            lora_strength=float(pick("lora_strength")),
            sun_share=float(pick("sun_share")),
            device=p.device.lower() if p is not None else "auto",
            dtype=p.dtype.lower() if p is not None else "bf16",
            memory_mode=p.memory_mode.lower() if p is not None else "auto",
            vram_budget_gib=vram if p is not None and p.memory_mode == "STREAM" else None,
            preview_every=int(p.preview_every) if p is not None else 1,
            models_dir=models_dir,
            model_paths=model_paths,
        )
        try:
            job_id = self.ensure_client().submit(job)
        except ValueError as exc:  # ProtocolError: a value the worker would refuse
            raise GenerationError(
                getattr(exc, "code", "bad_parameters"),
                getattr(exc, "message", str(exc)),
                getattr(exc, "hint", ""),
            ) from None
        params = job.to_params()
        self.job = ActiveJob(job_id, scene.name, scene.world.name if scene.world else None, params)
        self.progress_log = []
        state = runtime()
        if state is not None:
            state.running = True
            state.job_id = job_id
            state.stage = "starting"
            state.step, state.total = 0, job.steps
            state.progress, state.elapsed, state.eta = 0.0, 0.0, -1.0
            state.status = "Starting the worker…" if self.client.worker_pid is None else "Queued…"
            state.detail = ""
            state.error_code = state.error_message = state.error_hint = ""
            state.preview_icon = 0
        self._last_busy = time.monotonic()
        ensure_timer()
        tag_redraw()
        return self.job

    def cancel(self) -> bool:
        """Ask the worker to stop the job; its final `cancelled` event restores the World."""
        if not self.busy or self.client is None:
            return False
        state = runtime()
        if state is not None:
            state.status = "Cancelling…"
        return self.client.cancel(self.job.job_id)

    def stop_worker(self) -> None:
        """Stop the worker process (frees its memory and VRAM). A running job ends as cancelled."""
        if self.client is not None:
            self._close_in_background(self.client)
        ensure_timer()

    def wait(self, job: ActiveJob, timeout: float | None = None) -> None:
        """Pump until `job` is done: the blocking path for scripts and `blender -b`."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not job.done:
            self.tick()
            if job.done:
                break
            if deadline is not None and time.monotonic() > deadline:
                self.cancel()
                cancel_deadline = time.monotonic() + 30.0
                while not job.done and time.monotonic() < cancel_deadline:
                    self.tick()
                    time.sleep(0.05)
                raise TimeoutError(f"the world was not generated within {timeout} s")
            time.sleep(0.02)

    # -- the pump --------------------------------------------------------------------------------

    def tick(self) -> float | None:
        """Handle what arrived; returns the next interval in seconds, or None when idle."""
        changed = False
        try:
            if self.client is not None:
                # poll() hands over everything queued; a bounded number is handled per tick and the
                # rest, in order, on the next one.
                self._backlog.extend(self.client.poll())
            for _ in range(min(len(self._backlog), MAX_EVENTS_PER_TICK)):
                self._on_event(self._backlog.popleft())
                changed = True
            for name in list(self.tasks):
                changed |= self._pump_task(name, self.tasks[name])
            self._stop_idle_worker()
        except Exception:  # a timer that raises is unregistered by Blender: report and keep going
            traceback.print_exc()
        if changed:
            tag_redraw()
        if self.busy or self.tasks or self._backlog:
            return ACTIVE_INTERVAL_S
        p = prefs()
        idle_limit = p.idle_minutes if p is not None else 10
        if idle_limit > 0 and self.client is not None and self.client.worker_pid is not None:
            return IDLE_INTERVAL_S  # watch the idle timeout
        self._closers = [t for t in self._closers if t.is_alive()]
        if self._closers:
            return IDLE_INTERVAL_S
        return None

    def _stop_idle_worker(self) -> None:
        if self.busy:
            self._last_busy = time.monotonic()
            return
        p = prefs()
        minutes = p.idle_minutes if p is not None else 10
        if (
            minutes > 0
            and self.client is not None
            and self.client.worker_pid is not None
            and time.monotonic() - self._last_busy > minutes * 60
        ):
            state = runtime()
            if state is not None:
                state.worker_info = "Worker stopped after being idle (memory freed)."
            self._close_in_background(self.client)
            self._last_busy = time.monotonic()

    def _on_event(self, event: dict) -> None:
        kind = event.get("type")
        state = runtime()
        if kind == "ready":
            if state is not None:
                state.worker_info = (
                    f"Worker ready: torch {event.get('torch_version')} on {event.get('device_name')} "
                    f"({event.get('device')})"
                )
            return
        job = self.job
        if job is None or job.done or event.get("job_id") != job.job_id:
            if kind == "log" and event.get("level") == "error" and state is not None and not self.busy:
                state.worker_info = short(event.get("message", ""))
            return  # a stale job's events (e.g. one cancelled by a file load)
        job.events.append(kind)
        if kind == "queued" and state is not None:
            state.status = "Queued" if event.get("position", 0) else "Starting…"
        elif kind == "progress":
            self._on_progress(event)
        elif kind == "preview":
            try:
                self._show_preview(job, event)
            except Exception:  # a preview must never break the job
                traceback.print_exc()
        elif kind == "result":
            self._finish_success(job, event)
        elif kind == "error":
            self._finish_error(
                job,
                GenerationError(
                    event.get("code", "internal"), event.get("message", ""), event.get("hint", "")
                ),
            )

    def _on_progress(self, event: dict) -> None:
        state = runtime()
        stage, step, total = event["stage"], int(event["step"]), int(event["total"])
        self.progress_log.append((stage, step))
        if state is None:
            return
        state.stage, state.step, state.total = stage, step, total
        state.elapsed = float(event.get("elapsed") or 0.0)
        eta = event.get("eta")
        state.eta = -1.0 if eta is None else float(eta)
        lo, hi = _STAGE_SPAN.get(stage, (0.0, 1.0))
        frac = step / total if stage == "sampling" and total else 0.0
        state.progress = max(state.progress, lo + (hi - lo) * frac)
        label = {"loading": "Loading models", "encoding": "Reading the prompt", "sampling": "Sampling",
                 "decoding": "Decoding", "saving": "Saving"}.get(stage, stage.title())  # fmt: skip
        state.status = f"{label} {step}/{total}" if stage == "sampling" else f"{label}…"
        state.detail = short(event.get("detail") or "")

    # -- previews and the World ------------------------------------------------------------------

    def _scene(self, job: ActiveJob) -> bpy.types.Scene:
        return bpy.data.scenes.get(job.scene_name) or bpy.context.scene

    def _show_preview(self, job: ActiveJob, event: dict) -> None:
        data = base64.b64decode(event["data"])
        folder = user_dir("previews")
        path = folder / f"preview-{job.job_id}-{event['step']}.png"
        path.write_bytes(data)
        if job.preview_file is not None and job.preview_file != path:
            job.preview_file.unlink(missing_ok=True)
        job.preview_file = path
        image = bpy.data.images.get(job.preview_image) if job.preview_image else None
        if image is None:
            image = bpy.data.images.load(str(path), check_existing=False)
            image.name = PREVIEW_IMAGE
            job.preview_image = image.name
        else:
            image.filepath = str(path)
            image.reload()
        scene = self._scene(job)
        preview = bpy.data.worlds.get(job.preview_world) if job.preview_world else None
        if preview is None:
            original = bpy.data.worlds.get(job.world_name) if job.world_name else None
            preview = original.copy() if original is not None else bpy.data.worlds.new(PREVIEW_WORLD)
            preview.name = PREVIEW_WORLD
            job.preview_world = preview.name
        if scene.world != preview:
            scene.world = preview
        world.set_image(preview, image)
        job.previews_shown += 1
        self._preview_icon(job, path)

    def _preview_icon(self, job: ActiveJob, path: Path) -> None:
        """The panel's live preview (a thumbnail from the preview file)."""
        if self.previews is None:
            return
        key = f"preview:{path.name}"
        icon = self.previews.load(key, str(path), "IMAGE")
        if job.preview_key and job.preview_key in self.previews and job.preview_key != key:
            del self.previews[job.preview_key]
        job.preview_key = key
        state = runtime()
        if state is not None:
            state.preview_icon = icon.icon_id

    def _drop_preview(self, job: ActiveJob, restore_world: bool) -> None:
        """Give the scene its World back and delete the preview World, image and file."""
        scene = self._scene(job)
        preview = bpy.data.worlds.get(job.preview_world) if job.preview_world else None
        if preview is not None:
            if restore_world and scene.world == preview:
                scene.world = bpy.data.worlds.get(job.world_name) if job.world_name else None
            bpy.data.worlds.remove(preview)
        image = bpy.data.images.get(job.preview_image) if job.preview_image else None
        if image is not None:
            bpy.data.images.remove(image)
        if job.preview_file is not None:
            job.preview_file.unlink(missing_ok=True)
        if self.previews is not None and job.preview_key and job.preview_key in self.previews:
            del self.previews[job.preview_key]
        job.preview_world = job.preview_image = job.preview_file = job.preview_key = None
        state = runtime()
        if state is not None:
            state.preview_icon = 0

    def apply_result(
        self,
        scene: bpy.types.Scene,
        event: dict,
        params: dict,
        *,
        world_name: str | None = None,
        take_world: bool | None = None,
        pack: bool | None = None,
        seconds: float = 0.0,
        before_assign=None,
    ) -> bpy.types.Image:
        """Apply a worker `result` event to `scene`: the HDR (or PNG) into the DiT360 chain of the World
        `world_name` (default: the scene's; a new one if there is none), the scene uses that World
        (unless `take_world` is False), its Sun lamp is set up, and the history gets an entry.

        This is the path every generated world takes (`_finish_success` calls it; tests and scripts
        that have a result of their own may too). `before_assign()` runs after the World is set up and
        before the scene takes it (the job uses it to drop its preview World). Returns the image the
        World shows. Raises on failure (nothing is recorded then)."""
        settings = scene.dit360
        target = bpy.data.worlds.get(world_name) if world_name else scene.world
        if target is None:
            target = bpy.data.worlds.new("World")
        if take_world is None:
            take_world = scene.world is None or scene.world == target
        image = lighting.apply_result(target, event, pack=settings.pack_image if pack is None else pack)
        target["dit360_prompt"] = params["prompt"]
        target["dit360_seed"] = int(params["seed"])
        target["dit360_image"] = image.name
        if before_assign is not None:
            before_assign()
        if take_world:
            scene.world = target
        if scene.world == target:
            lighting.sync_sun(scene, target)
        history.record(scene, params, event, image, seconds)
        if self.previews is not None:
            key = f"history:{event['path']}"
            if key not in self.previews and Path(event["path"]).is_file():
                self.previews.load(key, str(event["path"]), "IMAGE")
        return image

    def _finish_success(self, job: ActiveJob, event: dict) -> None:
        scene = self._scene(job)
        seconds = float((event.get("timings") or {}).get("total_s", time.monotonic() - job.started))
        try:
            target = bpy.data.worlds.get(job.world_name) if job.world_name else None
            preview = bpy.data.worlds.get(job.preview_world) if job.preview_world else None
            if target is None:
                target = bpy.data.worlds.new("World")
            uses_ours = scene.world is None or scene.world == preview or scene.world == target
            image = self.apply_result(
                scene,
                event,
                job.params,
                world_name=target.name,
                take_world=uses_ours,
                seconds=seconds,
                before_assign=lambda: self._drop_preview(job, restore_world=False),
            )
        except Exception as exc:
            traceback.print_exc()
            self._finish_error(
                job,
                GenerationError(
                    "apply_failed",
                    f"The image was written to {event.get('path')} but could not be applied: {exc}",
                    "Load it by hand (World ▸ Environment Texture), and report this.",
                ),
            )
            return
        job.done = True
        job.image_name = image.name
        state = runtime()
        if state is not None:
            state.running = False
            state.stage, state.progress = "done", 1.0
            state.eta = 0.0
            state.status = f"Done in {seconds:.1f} s: {Path(event['path']).name}"
            state.detail = ""
        if job.push_undo:
            _undo_push("DiT360: Generate World")

    def _finish_error(self, job: ActiveJob, err: GenerationError) -> None:
        if err.code == "worker_start_failed":
            err = self._explain_start_failure(err)
        try:
            self._drop_preview(job, restore_world=True)
        except Exception:
            traceback.print_exc()
        job.done = True
        job.error = err
        state = runtime()
        if state is not None:
            state.running = False
            state.stage = "cancelled" if err.code == "cancelled" else "failed"
            state.status = "Cancelled: the World is unchanged." if err.code == "cancelled" else "Failed."
            state.detail = ""
            state.error_code = err.code if err.code != "cancelled" else ""
            state.error_message = err.message if err.code != "cancelled" else ""
            state.error_hint = err.hint if err.code != "cancelled" else ""

    def _explain_start_failure(self, err: GenerationError) -> GenerationError:
        """A worker that could not start says why in its log (e.g. "No module named 'torch'") even
        when its message to us does not; and the fix is always the same two buttons."""
        message, hint = err.message, err.hint
        log = self.client.log_path if self.client is not None else None
        cause = _last_exception_line(log) if log is not None else None
        if cause and cause not in message:
            message = f"{message}\nWorker log: {cause}"
        if not hint:
            hint = (
                "Install dependencies (add-on Preferences ▸ Install Dependencies), or set the Python of an "
                "environment that has them" + (f". Details: {log}" if log is not None else ".")
            )
        return GenerationError(err.code, message, hint)

    # -- background tasks: dependencies and models -------------------------------------------------

    def task_running(self, name: str) -> bool:
        return name in self.tasks

    def start_task(
        self, name: str, cmd: list[str], env: dict | None = None, secrets: tuple = ()
    ) -> BackgroundTask:
        old = self.tasks.pop(name, None)
        if old is not None:
            old.cancel()
        logs = user_dir("logs")
        task = BackgroundTask(name, cmd, logs / f"{name}.log", env=env, cwd=logs, secrets=secrets)
        self.tasks[name] = task
        ensure_timer()
        return task

    def start_deps_check(self) -> None:
        script = vendor_setup_script()
        state = runtime()
        if script is None:
            if state is not None:
                state.deps_state, state.deps_summary = "FAILED", "vendor_setup.py is missing from the add-on."
            return
        python, vendor = self.worker_python()
        cmd = [python, str(script), "--check", "--json"]
        if vendor is not None and vendor.is_dir() and any(vendor.iterdir()):
            cmd += ["--target", str(vendor)]
        try:
            self.start_task("deps_check", cmd)
        except OSError as exc:
            if state is not None:
                state.deps_state = "MISSING"
                state.deps_summary = f"Cannot run {python}: {exc.strerror or exc}"
            return
        if state is not None:
            state.deps_state, state.deps_summary, state.deps_detail = "CHECKING", "Checking…", ""

    def start_install(self, packages: str = "") -> None:
        """vendor_setup.py --target <vendor> with Blender's own Python, in the background."""
        script = vendor_setup_script()
        if script is None:
            raise GenerationError(
                "internal", "vendor_setup.py is missing from the add-on.", "Reinstall the add-on."
            )
        if self.client is not None and self.client.worker_pid is not None:
            self._close_in_background(self.client)  # its files are about to be replaced
            self.client = None
        vendor = user_dir("vendor")
        cmd = [sys.executable, str(script), "--target", str(vendor)]
        if packages:
            cmd += ["--packages", packages]
        task = self.start_task("install", cmd, env=None)
        state = runtime()
        if state is not None:
            state.deps_state = "INSTALLING"
            state.install_status = "Starting pip…"
            state.install_log = str(task.log_path)
            state.install_elapsed = 0.0

    def _model_args(self) -> list[str]:
        models_dir, paths = self.model_settings()
        args = ["--models-dir", models_dir] if models_dir else []
        for component, path in paths.items():
            args += ["--path", f"{component}={path}"]
        return args

    def _download_cmd(self, check: bool) -> tuple[list[str], dict]:
        python, vendor = self.worker_python()
        p = prefs()
        token = p.hf_token.strip() if p is not None else ""
        cmd = [python, "-m", f"{PACKAGE_DIR.name}.worker.download"] + (["--check"] if check else [])
        extra = {"HF_HUB_OFFLINE": "1"} if check else {}
        return cmd + self._model_args(), worker_env(vendor, token or None, extra)

    def start_models_check(self) -> None:
        cmd, env = self._download_cmd(check=True)
        state = runtime()
        try:
            self.start_task("models_check", cmd, env=env)
        except OSError as exc:
            if state is not None:
                state.models_state, state.models_summary = (
                    "FAILED",
                    f"Cannot run {cmd[0]}: {exc.strerror or exc}",
                )
            return
        if state is not None:
            state.models_state, state.models_summary = "CHECKING", "Checking…"

    def start_download(self) -> bool:
        """Download the missing model files; False (and the reason in the state) when not allowed."""
        state = runtime()
        if not bpy.app.online_access:
            if state is not None:
                state.download_code = "offline"
                state.download_error = "Blender is set to work offline, so nothing is downloaded."
                state.download_hint = (
                    "Allow online access in Preferences ▸ System ▸ Network, or copy the model files "
                    "into a models folder by hand (see the add-on's README)."
                )
            return False
        cmd, env = self._download_cmd(check=False)
        p = prefs()
        token = p.hf_token.strip() if p is not None else ""
        task = self.start_task("download", cmd, env=env, secrets=(token,) if token else ())
        if state is not None:
            state.models_state = "DOWNLOADING"
            state.download_status = "Looking for the files…"
            state.download_code = state.download_error = state.download_hint = ""
            state.download_files.clear()
            state.download_log = str(task.log_path)
        return True

    def cancel_task(self, name: str) -> None:
        task = self.tasks.get(name)
        if task is not None:
            task.cancel()

    def _pump_task(self, name: str, task: BackgroundTask) -> bool:
        lines = task.lines()[:MAX_LINES_PER_TICK]
        handler = getattr(self, f"_task_{name}")
        for line in lines:
            handler(task, line, None)
        if task.done and not task.lines():
            self.tasks.pop(name, None)
            handler(task, None, task.returncode)
            return True
        if name == "install":
            state = runtime()
            if state is not None:
                state.install_elapsed = task.elapsed
        return bool(lines)

    def _task_install(self, task: BackgroundTask, line: str | None, code: int | None) -> None:
        state = runtime()
        if state is None:
            return
        if line is not None:
            if line.strip():
                state.install_status = short(line)
            return
        if code == 0:
            state.install_status = f"Installed in {task.elapsed:.0f} s."
            self.start_deps_check()
        else:
            errors = [t for t in task.tail if "error" in t.lower()]
            state.deps_state = "FAILED"
            state.install_status = short(
                errors[-1] if errors else (task.tail[-1] if task.tail else f"exit {code}")
            )

    def _task_deps_check(self, task: BackgroundTask, line: str | None, code: int | None) -> None:
        state = runtime()
        if state is None:
            return
        if line is not None:
            if line.startswith("{"):
                try:
                    task.report = json.loads(line)
                except ValueError:
                    pass
            return
        report = getattr(task, "report", None)
        if report is None:
            state.deps_state = "MISSING"
            tail = [t for t in task.tail if t.strip()]
            state.deps_summary = short(
                f"The worker's Python did not run the check: {tail[-1] if tail else code}"
            )
            return
        torch = report["packages"].get("torch", {})
        where = report.get("device_name") or report.get("device") or "?"
        if report.get("ok"):
            state.deps_state = "OK"
            state.deps_summary = (
                f"torch {torch.get('version')} · {where} · Python {report.get('python_version')}"
            )
            state.deps_detail = ""
        else:
            state.deps_state = "MISSING"
            state.deps_summary = f"Missing: {', '.join(report.get('missing', []))}"
            state.deps_detail = short(
                "; ".join(f"{d}: {e['error']}" for d, e in report["packages"].items() if e.get("error")), 400
            )

    def _found(self, components: dict) -> None:
        state = runtime()
        missing = [c for c in COMPONENTS if not components.get(c)]
        if state is None:
            return
        state.models_missing = ", ".join(missing)
        if missing:
            state.models_state = "MISSING"
            state.models_summary = f"Missing: {', '.join(missing)}"
        else:
            state.models_state = "OK"
            state.models_summary = "All model files found."

    def _task_models_check(self, task: BackgroundTask, line: str | None, code: int | None) -> None:
        state = runtime()
        event = _json_event(line) if line is not None else None
        if event is not None and event.get("event") == "found":
            self._found(event["components"])
            task.found = True
        elif event is not None and event.get("event") == "error" and state is not None:
            state.models_state, state.models_summary = "FAILED", short(event.get("message", ""))
        elif line is None and not getattr(task, "found", False) and state is not None:
            if state.models_state == "CHECKING":
                tail = [t for t in task.tail if t.strip()]
                state.models_state = "FAILED"
                state.models_summary = short(
                    "Could not check (install the dependencies first): "
                    + (tail[-1] if tail else f"exit {code}")
                )

    def _task_download(self, task: BackgroundTask, line: str | None, code: int | None) -> None:
        state = runtime()
        if state is None:
            return
        event = _json_event(line) if line is not None else None
        if line is not None:
            if event is None:
                return
            kind = event.get("event")
            if kind == "found":
                missing = [c for c in COMPONENTS if not event["components"].get(c)]
                state.download_status = (
                    f"Downloading: {', '.join(missing)}" if missing else "All files are already there."
                )
            elif kind == "file":
                entry = next((f for f in state.download_files if f.name == event["file"]), None)
                if entry is None:
                    entry = state.download_files.add()
                    entry.name = event["file"]
                entry.done, entry.total = float(event["done"]), float(event["total"])
                entry.progress = min(1.0, entry.done / entry.total) if entry.total else 0.0
                state.download_status = f"Downloading {event['file']}"
            elif kind == "done":
                self._found(event["components"])
                state.download_status = "Download complete: all model files are there."
            elif kind == "error":
                state.models_state = "FAILED"
                state.download_code = event.get("code", "")
                state.download_error = event.get("message", "")
                state.download_hint = event.get("hint", "")
                state.download_status = "Download failed."
            return
        if code != 0 and state.models_state == "DOWNLOADING":
            state.models_state = "FAILED"
            state.download_status = (
                "Download stopped." if code in (-15, 1) else f"Download failed (exit {code})."
            )

    # -- teardown ---------------------------------------------------------------------------------

    def forget_job(self) -> None:
        """After a file load: the job's scene and Worlds belong to the old file."""
        if self.busy and self.client is not None:
            self.client.cancel(self.job.job_id)
        self.job = None
        state = runtime()
        if state is not None:
            state.running = False

    def shutdown(self) -> None:
        """unregister(): stop the timer, the tasks and the worker; restore a World a job was using."""
        if bpy.app.timers.is_registered(_timer):
            bpy.app.timers.unregister(_timer)
        for task in self.tasks.values():
            task.cancel()
        self.tasks.clear()
        if self.busy:
            try:
                self._drop_preview(self.job, restore_world=True)
            except Exception:
                traceback.print_exc()
        self.job = None
        if self.client is not None:
            self.client.close(timeout=3.0)
            self.client = None
        for t in self._closers:
            t.join(5.0)
        self._closers = []


def _last_exception_line(log: Path, lines: int = 80) -> str | None:
    """The last "SomeError: text" line of the worker's log (its tail only), or None."""
    try:
        with open(log, "rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - 16384))
            tail = f.read().decode("utf-8", "replace").splitlines()[-lines:]
    except OSError:
        return None
    for line in reversed(tail):
        m = re.match(r"^([A-Za-z_][\w.]*(?:Error|Exception)): (.+)$", line.strip())
        if m:
            return short(line.strip(), 300)
    return None


def _json_event(line: str) -> dict | None:
    if not line.startswith("{"):
        return None
    try:
        event = json.loads(line)
    except ValueError:
        return None
    return event if isinstance(event, dict) else None


def _undo_push(message: str) -> None:
    """Make the applied World one undo step (Ctrl+Z gives back the World as it was). A timer runs
    without a window in its context, so one is lent for the push."""
    wm = bpy.context.window_manager
    try:
        if bpy.context.window is None and wm is not None and wm.windows:
            with bpy.context.temp_override(window=wm.windows[0]):
                bpy.ops.ed.undo_push(message=message)
        else:
            bpy.ops.ed.undo_push(message=message)
    except (RuntimeError, AttributeError):
        pass  # no undo system (some background sessions): the World change simply has no step


CONTROLLER = Controller()


def _timer() -> float | None:
    return CONTROLLER.tick()


def ensure_timer() -> None:
    """Start the pump if it is not running (it stops itself when idle). Looked up at call time so a
    test harness can stand in for `bpy.app.timers`."""
    if not bpy.app.timers.is_registered(_timer):
        bpy.app.timers.register(_timer, first_interval=ACTIVE_INTERVAL_S, persistent=True)
