"""Starts the model worker and talks to it. Standard library only: no bpy, no torch, not even lazily.

The panel, the scripting API and the tests all use `WorkerClient`:

    client = WorkerClient(log_dir=..., vendor_dir=..., hf_token=...)
    job_id = client.submit(Job(prompt="This is a panorama. ...", output_dir="/renders"))
    events = client.poll()            # non-blocking: the Blender timer calls this
    result = client.run(job)          # blocking, for scripts and `blender -b`
    client.cancel(job_id)
    client.close()                    # frees the worker (and its GPU memory)

Nothing blocks the caller for long: `submit` starts the worker on a background thread when there is
none (jobs wait in an outbox meanwhile) and returns at once; a reader thread turns the socket into an
event queue. Events are protocol message dicts (see `protocol.py`), plus two the client makes itself:
`error` with code ``worker_start_failed`` (the worker could not start: the message holds its stderr
tail) and ``worker_died`` (it exited mid-job: EOF or exit code, reported within ~0.5 s). Every job
ends with one `result` or `error` event carrying its job_id. After a death the next `submit` starts a
fresh worker.
"""

from __future__ import annotations

import atexit
import os
import queue
import secrets
import select
import subprocess
import sys
import threading
import time
import uuid
import weakref
from collections import deque
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from .launch import default_work_dir, private_dir, worker_env
from .params import BY_NAME, GENERATE, JOB_KINDS, defaults
from .protocol import (
    FINAL_TYPES,
    HEARTBEAT_MISSES,
    HEARTBEAT_TIMEOUT_S,
    SUCCESS_TYPES,
    TOKEN_ENV,
    WORKER_MESSAGES,
    FrameDecoder,
    ProtocolError,
    check_job_params,
    decode,
    encode,
    error,
    message,
)
from .redact import redact, token_problem
from .worker_process import (
    HANDSHAKE_TIMEOUT_S,
    READ_WAKE_S,
    Heartbeat,
    WorkerError,
    WorkerProcess,
    handshake,
    lost_job_error,
    spawn,
    start_failure,
)

GENERATE_DEFAULTS = defaults()
KIND_DEFAULTS = {kind: defaults(kind) for kind in JOB_KINDS}

__all__ = ["Job", "JobError", "WorkerClient", "WorkerError"]


class JobError(WorkerError):
    """`run()` raises this when its job ends with an `error` event (code ``cancelled`` included)."""


class Job:
    """The parameters of one job of `kind` (a `params.JOB_KINDS` name: "generate", "edit", ...):
    any parameter of the table in `params.py` that the kind takes, by name (defaults from the
    table), plus where the models are (`models_dir`, `model_paths`, `allow_download`). Read them as
    attributes (`job.steps`) or `params`. Input files (the table's `path` parameters, e.g. an edit's
    source and mask) are made absolute here, like the model paths."""

    def __init__(
        self,
        *,
        kind: str = GENERATE,
        models_dir: str | Path | None = None,
        model_paths: Mapping[str, str | Path] | None = None,
        allow_download: bool = False,
        **params: Any,
    ) -> None:
        if kind not in KIND_DEFAULTS:
            raise TypeError(f"Job() got unknown kind {kind!r}; known: {', '.join(JOB_KINDS)}")
        known = KIND_DEFAULTS[kind]
        # `models` is built from the three keywords above, not passed whole
        unknown = sorted(name for name in params if name not in known or name == "models")
        if unknown:
            raise TypeError(f"Job() got unknown parameter(s) for a {kind} job: {', '.join(unknown)}")
        self.kind = kind
        self.params: dict[str, Any] = {**known, **params}
        for name, value in params.items():
            if BY_NAME[name].kind == "path" and value is not None:
                self.params[name] = _absolute(value)
        # Absolute here, against this process's working directory: the worker runs in its own.
        self.params["models"] = {
            "models_dir": None if models_dir is None else _absolute(models_dir),
            "paths": {k: _absolute(v) for k, v in (model_paths or {}).items()},
            "allow_download": allow_download,
        }

    def __getattr__(self, name: str) -> Any:
        try:
            return self.__dict__["params"][name]
        except KeyError:
            raise AttributeError(name) from None

    def to_params(self) -> dict:
        out = dict(self.params)
        out["output_dir"] = None if out["output_dir"] is None else str(out["output_dir"])
        return out


def _absolute(path: str | Path) -> str:
    text = os.path.expanduser(str(path))
    return os.path.abspath(text) if text.strip() else text  # blank: "not set", as the table has it


class WorkerClient:
    """Owns at most one worker process; see the module docstring. Thread-safe.

    `python`: the interpreter that runs the worker (default: this one, i.e. Blender's own Python);
    `vendor_dir`: the folder of the worker's packages (torch, ...), put first on its PYTHONPATH;
    `log_dir`: where the worker writes worker.log and runs (a folder only this user can write to);
    `hf_token`: passed as HF_TOKEN in the worker's environment only; `extra_env`: more environment variables for the worker (e.g. HF_HUB_OFFLINE);
    `heartbeat_timeout`: a worker that answers no ping this long is reported and killed.
    """

    def __init__(
        self,
        python: str | Path | None = None,
        vendor_dir: str | Path | None = None,
        log_dir: str | Path | None = None,
        hf_token: str | None = None,
        handshake_timeout: float = HANDSHAKE_TIMEOUT_S,
        extra_env: Mapping[str, str] | None = None,
        heartbeat_timeout: float = HEARTBEAT_TIMEOUT_S,
    ) -> None:
        self.python = str(python) if python else sys.executable
        self.vendor_dir = Path(vendor_dir) if vendor_dir else None
        self.log_dir = Path(log_dir) if log_dir else default_work_dir()  # the add-on passes its user folder
        self.handshake_timeout = handshake_timeout
        self.heartbeat_timeout = heartbeat_timeout
        self.extra_env = dict(extra_env or {})
        self._hf_token = (hf_token or "").strip() or None
        if self._hf_token is not None and token_problem(self._hf_token):
            raise ValueError(f"The Hugging Face token can't be a real one: {token_problem(self._hf_token)}")
        self._lock = threading.RLock()
        self._events: queue.Queue[dict] = queue.Queue()
        self._held: deque[dict] = deque()  # events `run()` set aside for `poll()`
        self._statuses: queue.Queue[dict] = queue.Queue()
        self._last_fatal: dict | None = None  # the fatal error of the worker that ended last, if any
        self._worker: WorkerProcess | None = None
        self._starter: threading.Thread | None = None
        self._start_error: WorkerError | None = None
        self._outbox: list[tuple[str, bytes]] = []  # jobs (encoded) waiting for a worker to start
        self._pending: dict[str, WorkerProcess] = {}  # jobs sent, not finished
        self._generation = 0  # bumped by close(): a worker that finishes starting after it is stopped
        self._launching: WorkerProcess | None = None  # the process being started, so close() can kill it
        _LIVE_CLIENTS.add(self)

    # -- public API ------------------------------------------------------------------------------

    @property
    def log_path(self) -> Path:
        return self.log_dir / "worker.log"

    @property
    def worker_pid(self) -> int | None:
        w = self._worker
        return w.proc.pid if w is not None else None

    @property
    def ready_info(self) -> dict | None:
        """The worker's `ready` message (versions, pid) merged with its `device` event (torch version,
        device, free VRAM) once that came; None without a worker."""
        w = self._worker
        return dict(w.ready) if w is not None else None

    def start(self, timeout: float | None = None) -> dict:
        """Block until a worker is up (starting one if needed); returns its `ready` message.

        Raises WorkerError (code worker_start_failed) with the worker's stderr tail."""
        with self._lock:
            if self._worker is not None:
                return dict(self._worker.ready)
            starter = self._ensure_starting()
        starter.join(timeout if timeout is not None else self.handshake_timeout + 5)
        with self._lock:
            if self._worker is not None:
                return dict(self._worker.ready)
            raise self._start_error or WorkerError("worker_start_failed", "The worker did not start in time.")

    def wait_for_device(self, timeout: float = 300.0) -> dict:
        """Block until the running worker has loaded torch (its `device` event); returns `ready_info`
        with the device fields. Raises WorkerError when no worker runs, it exits first, or time runs out."""
        deadline = time.monotonic() + timeout
        while True:
            info = self.ready_info
            if info is None:
                fatal = self._last_fatal
                if fatal is not None:  # it said why it ended (torch failed to load, ...)
                    raise WorkerError(fatal["code"], fatal["message"], fatal["hint"])
                raise WorkerError(
                    "worker_start_failed", "The worker is not running.", f"See the worker log in {self.log_dir}."
                )  # fmt: skip
            if "device" in info:
                return info
            if time.monotonic() > deadline:
                raise WorkerError(
                    "worker_start_failed", f"The worker did not load torch within {timeout:.0f} s.",
                    f"See the worker log in {self.log_dir}.",
                )  # fmt: skip
            time.sleep(0.005)

    def submit(self, job: Job | Mapping[str, Any], kind: str | None = None) -> str:
        """Queue a job and return its id at once: a `Job` (of its kind), or a dict of parameters
        of `kind` (default "generate"). Raises ProtocolError (a ValueError, code bad_parameters)
        for parameters of the wrong type or unknown names, or message_too_large."""
        if isinstance(job, Job):
            if kind is not None and kind != job.kind:
                raise ValueError(f"submit(kind={kind!r}) of a {job.kind} Job")
            kind, params = job.kind, job.to_params()
        else:
            kind, params = kind or GENERATE, dict(job)
        if kind not in JOB_KINDS:
            raise ValueError(f"unknown job kind {kind!r}; known: {', '.join(JOB_KINDS)}")
        params = check_job_params(kind, params)
        job_id = uuid.uuid4().hex[:16]
        # Encoded now: a job that cannot be sent is refused here, and the outbox holds only frames
        # that can be, so no job can stop the starter thread and the jobs queued behind it.
        frame = encode(message(kind, job_id=job_id, params=params))
        with self._lock:
            w = self._worker
            if w is None:
                self._outbox.append((job_id, frame))
                self._ensure_starting()
            else:
                self._send_job(w, job_id, frame)
        return job_id

    def poll(self) -> list[dict]:
        """The events that arrived since the last call, without blocking. Of several previews of a
        job in one batch only the newest is kept (a UI shows one image anyway)."""
        events = list(self._held)
        self._held.clear()
        while True:
            try:
                events.append(self._events.get_nowait())
            except queue.Empty:
                break
        return _latest_previews(events)

    def run(
        self,
        job: Job | Mapping[str, Any],
        on_event: Callable[[dict], None] | None = None,
        timeout: float | None = None,
        kind: str | None = None,
    ) -> dict:
        """Submit and block until the job's `result` (returned). Raises JobError for its `error`.

        `on_event` sees this job's events and job-less ones (ready, log); events of other jobs are
        kept for `poll()`. On timeout or KeyboardInterrupt the job is cancelled before re-raising.
        """
        job_id = self.submit(job, kind)
        deadline = None if timeout is None else time.monotonic() + timeout
        others: list[dict] = []
        try:
            while True:
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(f"job {job_id} did not finish within {timeout} s")
                try:
                    event = self._events.get(timeout=0.1)
                except queue.Empty:
                    continue
                if event.get("job_id") not in (job_id, None):
                    others.append(event)
                    continue
                if on_event is not None:
                    on_event(event)
                if event.get("job_id") == job_id and event["type"] in SUCCESS_TYPES:
                    return event
                if event.get("job_id") == job_id and event["type"] == "error":
                    raise JobError.from_event(event)
        except (KeyboardInterrupt, TimeoutError):
            self.cancel(job_id)
            raise
        finally:
            self._held.extend(others)

    def cancel(self, job_id: str) -> bool:
        """Cancel a queued or running job; its final event is `error` with code ``cancelled``.
        False when the job is unknown (e.g. already finished)."""
        with self._lock:
            for i, (queued_id, _frame) in enumerate(self._outbox):
                if queued_id == job_id:
                    del self._outbox[i]
                    self._emit(error("cancelled", "Cancelled before it started.", "", job_id=job_id))
                    return True
            w = self._pending.get(job_id)
            if w is None:
                return False
        try:
            w.send(message("cancel", job_id=job_id))
        except (OSError, ProtocolError):
            self._broken(w)
        return True

    def status(self, timeout: float = 5.0) -> dict | None:
        """The worker's `status` reply (running job, queue, model loads, pid, RSS); None without a worker."""
        w = self._worker
        if w is None:
            return None
        while not self._statuses.empty():
            self._statuses.get_nowait()
        try:
            w.send(message("status"))
            return self._statuses.get(timeout=timeout)
        except (OSError, ProtocolError, queue.Empty):
            return None

    def close(self, timeout: float = 5.0) -> None:
        """Stop the worker: `shutdown`, then terminate/kill if it does not exit within `timeout`.
        Unfinished jobs end with `error` code ``cancelled``. The client stays usable: the next
        `submit` starts a new worker."""
        with self._lock:
            self._generation += 1  # a worker still starting will stop itself (see _start_worker)
            self._starter = None
            outbox, self._outbox = self._outbox, []
            w, self._worker = self._worker, None
            launching, self._launching = self._launching, None
        if launching is not None:  # half-started: nothing to say goodbye to; its starter gives up
            launching.kill()
        for job_id, _ in outbox:
            self._emit(error("cancelled", "The worker was closed before the job started.", "", job_id=job_id))
        if w is not None:
            w.stop(timeout)
            if w.reader is not None:
                w.reader.join(3.0)  # it ends the worker's unfinished jobs: then close() is final

    def __enter__(self) -> WorkerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- starting --------------------------------------------------------------------------------

    def _ensure_starting(self) -> threading.Thread:
        if self._starter is None:
            self._start_error = None
            self._starter = threading.Thread(
                target=self._start_worker, args=(self._generation,), name="dit360-worker-start", daemon=True
            )
            self._starter.start()
        return self._starter

    def _start_worker(self, generation: int) -> None:
        try:
            w, decoder, rest = self._launch(generation)
        except Exception as failure:  # whatever it was, the waiting jobs must hear of it
            exc = failure if isinstance(failure, WorkerError) else _start_error(failure, self.log_dir)
            with self._lock:
                if generation != self._generation:
                    return
                self._start_error, self._starter = exc, None
                jobs, self._outbox = self._outbox, []
            for job_id, _ in jobs:
                self._emit(error(exc.code, exc.message, exc.hint, job_id=job_id))
            if not jobs:
                self._emit(message("log", level="error", message=exc.message))
            return
        with self._lock:
            if generation != self._generation:  # close() was called while it started
                w.stop(1.0)
                return
            self._worker, self._starter, self._last_fatal = w, None, None
            self._emit(message("ready", **w.ready))
            w.reader = threading.Thread(
                target=self._read, args=(w, decoder, rest), name="dit360-reader", daemon=True
            )
            w.reader.start()
            jobs, self._outbox = self._outbox, []
            for job_id, frame in jobs:
                self._send_job(w, job_id, frame)

    def _launch(self, generation: int) -> tuple[WorkerProcess, FrameDecoder, list]:
        """Spawn, wait for the port, connect, hello → ready. Raises WorkerError with the stderr tail."""
        deadline = time.monotonic() + self.handshake_timeout
        token = secrets.token_urlsafe(32)
        private_dir(self.log_dir)  # the worker runs in it and logs there: no one else may write in it
        w = spawn(self.python, self.log_dir, self._env(token))
        with self._lock:
            self._launching = w
            if generation != self._generation:  # close() came first: do not even finish starting
                w.kill()
                raise WorkerError("worker_start_failed", "The client was closed while the worker started.")
        try:
            decoder, rest = handshake(w, token, deadline, self.heartbeat_timeout / HEARTBEAT_MISSES)
            return w, decoder, rest
        except BaseException as exc:
            w.kill()
            w.close_socket()  # a worker that fails after connecting leaves no open socket behind
            raise start_failure(w, exc, self.handshake_timeout, self.log_path, self._scrub) from None
        finally:
            with self._lock:
                if self._launching is w:
                    self._launching = None

    def _env(self, token: str) -> dict[str, str]:
        """The worker's environment, with the launch token: the secrets live only here."""
        env = worker_env(
            self.vendor_dir, self._hf_token, self.extra_env, compile_cache=self.log_dir / "compile_cache"
        )
        env[TOKEN_ENV] = token
        return env

    # -- running ---------------------------------------------------------------------------------

    def _send_job(self, w: WorkerProcess, job_id: str, frame: bytes) -> None:
        with self._lock:
            self._pending[job_id] = w
        try:
            w.send_frame(frame)
        except OSError:
            self._broken(w)  # the reader reports the death, and this job with it

    def _read(self, w: WorkerProcess, decoder: FrameDecoder, items: list) -> None:
        """The reader thread: frames → events, and the pings; on EOF, a dead process or a worker
        silent for the heartbeat timeout (which is then killed), end the worker's jobs."""
        assert w.sock is not None
        beat = Heartbeat(self.heartbeat_timeout)
        while True:
            for item in items:
                self._on_frame(item, w)
            items = []
            try:
                ready, _, _ = select.select([w.sock], [], [], min(READ_WAKE_S, beat.interval))
                now = time.monotonic()
                if beat.ping_due(now):
                    w.send(message("ping"))
                if not ready:
                    if w.proc.poll() is not None:
                        break
                    w.unresponsive = beat.expired(now)
                    if w.unresponsive:
                        break
                    continue
                data = w.sock.recv(65536)
            except (OSError, ValueError):
                break
            if not data:
                break
            beat.heard = time.monotonic()
            items = decoder.feed(data)
        self._on_gone(w)

    def _on_frame(self, item: bytes | ProtocolError, w: WorkerProcess) -> None:
        try:
            if isinstance(item, ProtocolError):
                raise item
            msg = decode(item, WORKER_MESSAGES)
        except ProtocolError as exc:
            self._emit(
                message(
                    "log", level="warning", message=f"Ignored a bad message from the worker: {exc.message}"
                )
            )
            return
        if msg["type"] == "device":
            self._note_device(msg, w)
        if msg["type"] == "error" and msg.get("job_id") is None and msg.get("fatal"):
            w.fatal = msg  # the worker exits next: its unfinished jobs end with this cause
        if msg["type"] == "status":
            self._statuses.put(msg)
            return
        if msg["type"] == "pong":  # the reader loop noted that the worker spoke
            return
        if msg["type"] in FINAL_TYPES and msg.get("job_id") is not None:
            with self._lock:
                self._pending.pop(msg["job_id"], None)
        self._emit(msg)

    def _on_gone(self, w: WorkerProcess) -> None:
        """The worker's socket closed or its process ended: reap it and end its unfinished jobs."""
        try:
            code = w.proc.wait(timeout=1.0)
        except subprocess.TimeoutExpired:  # the socket died but the process lives: not usable
            code = w.kill()
        with self._lock:
            if self._worker is w:
                self._worker = None
            lost = [job_id for job_id, owner in self._pending.items() if owner is w]
            for job_id in lost:
                del self._pending[job_id]
        if w.sock is not None:
            w.sock.close()
        w.gone.set()
        fatal = w.fatal
        self._last_fatal = fatal
        for job_id in lost:
            if fatal is not None:  # it said why before it went (torch failed to load, ...)
                self._emit(error(fatal["code"], fatal["message"], fatal["hint"], job_id=job_id))
            else:
                self._emit(
                    lost_job_error(w, job_id, code, self.log_path, self._scrub, self.heartbeat_timeout)
                )
        if not lost and not w.closing:
            what = "stopped responding and was stopped" if w.unresponsive else f"exited (exit code {code})"
            self._emit(message("log", level="warning", message=f"The worker {what}."))

    def _note_device(self, msg: dict, w: WorkerProcess) -> None:
        """The `device` event of worker `w` (torch loaded, seconds after `ready`): its `ready_info`
        has these fields from now on."""
        with self._lock:
            w.ready.update({k: v for k, v in msg.items() if k not in ("v", "type")})

    def _broken(self, w: WorkerProcess) -> None:
        """A send failed: the stream may be half-written, so this worker is finished. Killing it is
        enough: the reader thread sees it die and ends its jobs (never wait here: we may hold the lock)."""
        try:
            w.proc.kill()
        except OSError:
            pass

    def _emit(self, event: dict) -> None:
        self._events.put(event)

    def _scrub(self, text: str) -> str:
        return redact(text, [self._hf_token])


def _start_error(exc: Exception, log_dir: Path) -> WorkerError:
    return WorkerError(
        "worker_start_failed",
        f"Could not start the worker: {type(exc).__name__}: {exc}.",
        f"Check that the log folder {log_dir} can be created and written, then try again.",
    )


def _latest_previews(events: list[dict]) -> list[dict]:
    last: dict[str, int] = {}
    for i, ev in enumerate(events):
        if ev.get("type") == "preview":
            last[ev.get("job_id")] = i
    return [ev for i, ev in enumerate(events) if ev.get("type") != "preview" or last[ev.get("job_id")] == i]


_LIVE_CLIENTS: weakref.WeakSet[WorkerClient] = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    """A last resort when the host exits without closing (the worker also watches our PID)."""
    for client in list(_LIVE_CLIENTS):
        try:
            client.close(timeout=2.0)
        except Exception:
            pass
