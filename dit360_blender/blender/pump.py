"""The timer pump: what runs the add-on's background work on Blender's main thread.

`PUMP` holds the link to the worker (link.py), the current generation (generation.py) and the
set-up tasks (setup_tasks.py). `Pump.tick()` is a plain method (the timer calls it; tests and
`api.generate_world(wait=True)` call it themselves, because `bpy.app.timers` never fire in
`blender -b` or in the bpy module): it drains the worker's events and the tasks' output with a
bounded amount of work, routes each event to the generation it belongs to, stops an idle worker,
and returns when it wants to run again (None: nothing to do).
"""

from __future__ import annotations

import json
import time
import traceback
from collections import deque

import bpy

from ..params import MODEL_SETTINGS
from ..protocol import FINAL_TYPES
from ..remote_client import RemoteWorkerClient
from . import resolution_ops
from .common import runtime, short, tag_redraw
from .errors import GenerationError
from .generation import Generation, submit, warm_job
from .link import WorkerLink
from .remote_prefs import ready_text
from .setup_tasks import SetupTasks

ACTIVE_INTERVAL_S = 0.1
IDLE_INTERVAL_S = 2.0
MAX_EVENTS_PER_TICK = 64  # bounded work per tick: Blender stays responsive whatever arrives


class Pump:
    def __init__(self) -> None:
        self.link = WorkerLink(wake=ensure_timer)
        self.setup = SetupTasks(self.link, wake=ensure_timer)
        self.job: Generation | None = None  # the last generation submitted (done or not)
        self._backlog: deque[dict] = deque()  # events polled but not handled yet (bounded ticks)
        self.warm_id: str | None = None  # a running `warm` job (preferences: load when the panel opens)
        self._warmed: set[str] = set()  # the settings warmed (or tried) this session: once each

    @property
    def busy(self) -> bool:
        return self.job is not None and not self.job.done

    def start_generation(self, scene: bpy.types.Scene, **overrides: object) -> Generation:
        """Submit a job with the scene's panel settings (`overrides` win); returns at once.

        Raises GenerationError when it cannot even be submitted (busy, no Python, bad values)."""
        if self.busy:
            raise GenerationError(
                "busy", "A world is already being generated.", "Wait for it, or press Cancel."
            )
        # a Resolution above 2K: generate at 2K, then upscale that entry (resolution_ops.chain_upscale)
        size, refine, strength = resolution_ops.requested(scene, overrides)
        self.job = submit(scene, self.link, **{**overrides, "size": "native", "refine": False})
        resolution_ops.chain_upscale(self.job, scene, size, refine, strength)
        self.link.note_busy()
        ensure_timer()
        tag_redraw()
        return self.job

    def warm(self, scene: bpy.types.Scene) -> bool:
        """Load the model for the panel's current settings in the background (a `warm` job), once
        per session for each combination of them; nothing while a job runs or with no worker Python
        set up. True when a warm job was submitted."""
        if self.busy or self.warm_id is not None:
            return False
        try:
            job = warm_job(scene, self.link)
        except GenerationError:  # not set up yet: the panel already says what is missing
            return False
        params = job.to_params()
        # what it loads, and the size its compiled step runs at: the same again warms nothing new
        key = json.dumps({k: params[k] for k in (*MODEL_SETTINGS, "width", "height")}, sort_keys=True)
        if key in self._warmed:
            return False
        self._warmed.add(key)
        try:
            self.warm_id = self.link.ensure_client().submit(job)
        except ValueError:  # a value the worker would refuse: Generate will say so
            return False
        state = runtime()
        if state is not None:
            state.worker_info = "Loading the model in the background…"
        self.link.note_busy()
        ensure_timer()
        return True

    def _on_warm_event(self, event: dict) -> None:
        kind, state = event.get("type"), runtime()
        if kind not in FINAL_TYPES:
            return
        self.warm_id = None
        if state is None:
            return
        if kind == "warmed":
            seconds = float(event["timings"].get("total_s", 0.0))
            state.worker_info = f"Model loaded in the background ({seconds:.0f} s): Generate starts at once"
        else:
            state.worker_info = short(f"Background load: {event.get('message', '')}")

    def cancel(self) -> bool:
        """Ask the worker to stop the job; its final `cancelled` event restores the World."""
        if not self.busy:
            return False
        state = runtime()
        if state is not None:
            state.status = "Cancelling…"
        ensure_timer()
        return self.link.cancel(self.job.job_id)

    def wait(self, job: Generation, timeout: float | None = None) -> None:
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

    def tick(self) -> float | None:
        """Handle what arrived; returns the next interval in seconds, or None when idle."""
        global _cadence
        _cadence = ACTIVE_INTERVAL_S  # a wake-up asked for during the tick: its own answer follows
        _cadence = self._tick()
        return _cadence

    def _tick(self) -> float | None:
        changed = False
        try:
            # poll() hands over everything queued; a bounded number is handled per tick and the
            # rest, in order, on the next one.
            self._backlog.extend(self.link.poll())
            for _ in range(min(len(self._backlog), MAX_EVENTS_PER_TICK)):
                self._on_event(self._backlog.popleft())
                changed = True
            changed |= self.setup.pump()
            if self.busy or self.warm_id is not None:
                self.link.note_busy()
            else:
                self.link.stop_if_idle()
        except Exception:  # a timer that raises is unregistered by Blender: report and keep going
            traceback.print_exc()
        if changed:
            tag_redraw()
        if self.busy or self.setup.active or self._backlog or self.warm_id is not None:
            return ACTIVE_INTERVAL_S
        return IDLE_INTERVAL_S if self.link.needs_watching() else None

    def _on_event(self, event: dict) -> None:
        kind = event.get("type")
        state = runtime()
        if kind in ("ready", "device"):  # `device` follows once the worker has loaded torch
            if state is not None and self.warm_id is None:  # else "Loading the model…" says more
                remote = isinstance(self.link.client, RemoteWorkerClient)
                info = self.link.client.ready_info if self.link.client is not None else None
                state.worker_info = ready_text({**(info or {}), **event}, remote)
            return
        if self.warm_id is not None and event.get("job_id") == self.warm_id:
            self._on_warm_event(event)
            return
        job = self.job
        if job is None or job.done or event.get("job_id") != job.job_id:
            # a worker's fatal job-less error (torch failed to load) says why it is gone
            job_less_error = kind == "error" and event.get("job_id") is None and bool(event.get("fatal"))
            if (
                (job_less_error or kind == "log" and event.get("level") == "error")
                and state is not None
                and not self.busy
            ):
                state.worker_info = short(event.get("message", ""))
            return  # a stale job's events (e.g. one cancelled by a file load)
        job.on_event(event)

    def forget_job(self) -> None:
        """After a file load: the job's scene and Worlds belong to the old file."""
        if self.busy:
            self.link.cancel(self.job.job_id)
        self.job = None
        state = runtime()
        if state is not None:
            state.running = False

    def before_save(self) -> None:
        """A save is about to write the file: it must hold the user's World, not the preview."""
        if self.busy:
            self.job.preview.before_save()

    def after_save(self) -> None:
        if self.busy:
            self.job.preview.after_save()

    def shutdown(self) -> None:
        """unregister(): stop the timer, the tasks and the worker; restore a World a job was using."""
        if bpy.app.timers.is_registered(_timer):
            bpy.app.timers.unregister(_timer)
        self.setup.shutdown()
        if self.busy:
            try:
                self.job.drop_preview(restore_world=True)
            except Exception:
                traceback.print_exc()
        self.job = None
        self.link.shutdown()


_cadence: float | None = None  # the interval the last tick asked for: how soon the timer runs again


def _timer() -> float | None:
    return PUMP.tick()


def ensure_timer() -> None:
    """Have the pump run within ACTIVE_INTERVAL_S: start it, or bring forward a timer that idles at
    IDLE_INTERVAL_S, so Generate and Cancel show their first effect at once whatever the idle
    state. Looked up at call time so a test harness can stand in for `bpy.app.timers`."""
    registered = bpy.app.timers.is_registered(_timer)
    if registered and _cadence is not None and _cadence <= ACTIVE_INTERVAL_S:
        return
    if registered:
        bpy.app.timers.unregister(_timer)
    bpy.app.timers.register(_timer, first_interval=0.0, persistent=True)


PUMP = Pump()
