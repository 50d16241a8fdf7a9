"""The add-on's link to its worker: one WorkerClient made from the preferences, replaced when the
Python, the vendor folder or the token change, and stopped in the background (never blocking the
UI) on request, before an install, or after the idle time the preferences allow.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import bpy

from ..client import WorkerClient
from ..redact import token_problem
from ..remote_client import RemoteWorkerClient
from .common import prefs, runtime, user_dir
from .errors import GenerationError
from .remote_prefs import remote_spec

COMPONENTS = ("transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "lora")


class WorkerLink:
    def __init__(self, wake: Callable[[], None]) -> None:
        self.client: WorkerClient | None = None
        self._key: tuple | None = None  # the settings `client` was made with
        self._wake = wake  # starts the timer pump, which watches the idle time and the closers
        self._closers: list[threading.Thread] = []
        self._last_busy = time.monotonic()

    # -- preferences -> worker settings ---------------------------------------------------------

    def worker_python(self) -> tuple[str, Path | None]:
        """(interpreter, vendor folder or None) the worker runs with."""
        p = prefs()
        if p is not None and p.python_source == "CUSTOM":
            return bpy.path.abspath(p.python_path.strip()), None
        return sys.executable, user_dir("vendor")

    def check_python(self) -> None:
        if remote_spec(prefs()) is not None:
            return  # the remote machine has its own Python
        python, _vendor = self.worker_python()
        if not python or not Path(python).is_file():
            raise GenerationError(
                "worker_start_failed",
                f"The worker's Python {python or '(not set)'} does not exist.",
                "Set the Python interpreter in the add-on Preferences (Dependencies), or choose "
                "Blender's own Python and press Install Dependencies.",
            )

    def hf_token(self) -> str:
        """The token of the preferences; "" when there is none or it can't be real (the
        preferences say why): scrubbing a one-letter "token" out of every message would wreck them."""
        p = prefs()
        token = p.hf_token.strip() if p is not None else ""
        return "" if token_problem(token) else token

    def model_settings(self) -> tuple[str | None, dict[str, str]]:
        """(models folder or None, explicit component paths) from the preferences."""
        p = prefs()
        if p is None or p.models_source == "CACHE" or remote_spec(p) is not None:
            return None, {}  # a remote worker uses its own machine's models
        models_dir = bpy.path.abspath(p.models_dir).strip() or None
        paths: dict[str, str] = {}
        if p.models_source == "FILES":
            for component in COMPONENTS:
                value = getattr(p, f"{component}_path").strip()
                if value:
                    paths[component] = bpy.path.abspath(value)
        return models_dir, paths

    # -- the client -----------------------------------------------------------------------------

    def ensure_client(self) -> WorkerClient:
        """The client for the current preferences; a changed Python, vendor folder or token gets a
        new client (the old worker is stopped in the background)."""
        python, vendor = self.worker_python()
        token = self.hf_token()
        remote = remote_spec(prefs())
        key = (python, str(vendor) if vendor else None, token, remote)
        if self.client is not None and key != self._key:
            self._close_in_background(self.client)
            self.client = None
        if self.client is None and remote is not None:
            self.client = RemoteWorkerClient(remote, log_dir=user_dir("logs"))
            self._key = key
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
            self._key = key
        return self.client

    @property
    def worker_running(self) -> bool:
        return self.client is not None and self.client.worker_pid is not None

    def poll(self) -> list[dict]:
        return self.client.poll() if self.client is not None else []

    def cancel(self, job_id: str) -> bool:
        return self.client is not None and self.client.cancel(job_id)

    def stop(self) -> None:
        """Stop the worker process (frees its memory and VRAM). A running job ends as cancelled."""
        if self.client is not None:
            self._close_in_background(self.client)
        self._wake()

    def release(self) -> None:
        """Stop a running worker and forget its client (its files are about to be replaced)."""
        if self.worker_running:
            self._close_in_background(self.client)
            self.client = None

    def _close_in_background(self, client: WorkerClient) -> None:
        t = threading.Thread(target=client.close, name="dit360-close", daemon=True)
        t.start()
        self._closers.append(t)

    # -- what the pump asks ---------------------------------------------------------------------

    def note_busy(self) -> None:
        """A job is running: the idle time starts again from now."""
        self._last_busy = time.monotonic()

    def stop_if_idle(self) -> None:
        minutes = self._idle_minutes()
        if minutes > 0 and self.worker_running and time.monotonic() - self._last_busy > minutes * 60:
            state = runtime()
            if state is not None:
                state.worker_info = "Worker stopped after being idle (memory freed)."
            self._close_in_background(self.client)
            self._last_busy = time.monotonic()

    @property
    def closing(self) -> bool:
        """True while a worker stopped in the background has not exited yet."""
        self._closers = [t for t in self._closers if t.is_alive()]
        return bool(self._closers)

    def needs_watching(self) -> bool:
        """Whether the pump must keep running while idle: for the idle timeout or a closing worker."""
        return (self._idle_minutes() > 0 and self.worker_running) or self.closing

    def _idle_minutes(self) -> int:
        p = prefs()
        return p.idle_minutes if p is not None else 10

    def shutdown(self) -> None:
        """unregister(): stop the worker now and wait for the ones stopping in the background."""
        if self.client is not None:
            self.client.close(timeout=3.0)
            self.client = None
        for t in self._closers:
            t.join(5.0)
        self._closers = []
