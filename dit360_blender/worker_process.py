"""One worker process as the client sees it: spawn it, drain its pipes, connect and authenticate
(hello → ready), explain why it did not start, stop it. Standard library only (the Blender side
uses it through `client.py`).
"""

from __future__ import annotations

import os
import re
import select
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ._version import __version__
from .launch import PACKAGE_DIR
from .protocol import (
    HEARTBEAT_MISSES,
    PORT_ANNOUNCE,
    PROTOCOL_VERSION,
    WORKER_MESSAGES,
    FrameDecoder,
    ProtocolError,
    decode,
    encode,
    error,
    message,
)

# `python -m <name>.worker` must name the package as it is on disk; inside Blender the add-on is
# imported as `bl_ext.<repo>.dit360_blender`, a name the worker (outside Blender) knows nothing of.
WORKER_MODULE = f"{PACKAGE_DIR.name}.worker"

HANDSHAKE_TIMEOUT_S = 120.0  # a cold torch import on Windows can take tens of seconds
READ_WAKE_S = 0.25  # readers check the process this often when the socket is quiet
SEND_TIMEOUT_S = 5.0
TAIL_LINES = 40
_PROGRESS_BAR = re.compile(r"\d+%\|")  # tqdm's "Loading weights:  45%|████▌     | 9/20 [...]"


class WorkerError(Exception):
    """A failure with a protocol error code, a message and the fix (`hint`)."""

    def __init__(self, code: str, text: str, hint: str = "", event: dict | None = None) -> None:
        super().__init__(f"{text}\n  fix: {hint}" if hint else text)
        self.code, self.message, self.hint, self.event = code, text, hint, event

    @classmethod
    def from_event(cls, event: Mapping[str, Any]) -> WorkerError:
        return cls(
            event.get("code", "internal"), event.get("message", ""), event.get("hint", ""), dict(event)
        )


class WorkerProcess:
    """One worker process and its connection."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc = proc
        self.sock: socket.socket | None = None
        self.ready: dict = {}
        self.stdout_tail: deque[str] = deque(maxlen=TAIL_LINES)
        self.stderr_tail: deque[str] = deque(maxlen=TAIL_LINES)
        self.port: int | None = None
        self.port_seen = threading.Event()
        self.closing = False
        self.gone = threading.Event()
        self.send_lock = threading.Lock()
        self.drains: list[threading.Thread] = []
        self.reader: threading.Thread | None = None
        self.start_logs: list[str] = []  # `log` messages sent before `ready` (often the failure's cause)
        self.unresponsive = False  # it answered no ping in time and was killed
        self.fatal: dict | None = None  # its fatal job-less error (it exits next), if it sent one

    def send(self, msg: dict) -> None:
        """Raises ProtocolError for a message that cannot be sent, OSError when the worker cannot
        be written to."""
        self.send_frame(encode(msg))

    def send_frame(self, data: bytes) -> None:
        """One encoded message. Raises OSError when the worker cannot be written to."""
        with self.send_lock:
            if self.sock is None:
                raise OSError("not connected")
            self.sock.sendall(data)

    def tail(self) -> str:
        lines = list(self.stderr_tail) or list(self.stdout_tail)
        return "\n".join(lines[-20:])

    def stop(self, timeout: float) -> None:
        """`shutdown` and wait up to `timeout`; then terminate; then kill."""
        self.closing = True
        if self.sock is not None and self.proc.poll() is None:
            try:
                self.send(message("shutdown"))
            except (OSError, ProtocolError):
                pass
        try:
            self.proc.wait(timeout=timeout)
            return
        except subprocess.TimeoutExpired:
            pass
        self.proc.terminate()  # the fallback only: shutdown is a protocol message, not a signal
        try:
            self.proc.wait(timeout=2.0)
        except subprocess.TimeoutExpired:
            self.kill()

    def close_socket(self) -> None:
        if self.sock is not None:
            self.sock.close()

    def kill(self) -> int | None:
        try:
            self.proc.kill()
            return self.proc.wait(timeout=2.0)
        except (OSError, subprocess.TimeoutExpired):
            return self.proc.poll()


def spawn(python: str, log_dir: Path, env: dict[str, str]) -> WorkerProcess:
    """Start `python -s -m <package>.worker` (no console window on Windows, its own session
    elsewhere) with `env`, which carries the token: no secrets in argv, visible to every user in
    process lists. `-s` leaves the user's site-packages out (their packages, .pth files and
    usercustomize could shadow the vendored ones); PYTHONPATH, which brings the vendor folder and
    this package, still applies."""
    cmd = [python, "-s", "-m", WORKER_MODULE, "--log-dir", str(log_dir), "--parent-pid", str(os.getpid())]
    kwargs: dict[str, Any] = {}
    if sys.platform == "win32":
        kwargs["creationflags"] = getattr(subprocess, "CREATE_NO_WINDOW", 0)
    else:
        kwargs["start_new_session"] = True  # a Ctrl-C in the terminal is for Blender, not the worker
    try:
        proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env=env, cwd=str(log_dir), **kwargs,
        )  # fmt: skip
    except OSError as exc:
        raise WorkerError(
            "worker_start_failed",
            f"Could not run the worker's Python {python}: {exc.strerror or exc}.",
            "Check the Python path in the add-on Preferences (empty = Blender's own Python).",
        ) from None
    w = WorkerProcess(proc)
    for stream, name in ((proc.stdout, "stdout"), (proc.stderr, "stderr")):
        t = threading.Thread(target=_drain, args=(w, stream, name), name=f"dit360-{name}", daemon=True)
        w.drains.append(t)
        t.start()
    return w


def handshake(w: WorkerProcess, token: str, deadline: float, heartbeat: float) -> tuple[FrameDecoder, list]:
    """Wait for the port, connect, hello → ready; `w.ready` holds the reply. Returns the decoder and
    the frames that came after `ready`. `heartbeat`: the ping interval the client promises.
    Raises WorkerError, TimeoutError or WorkerExited."""
    _wait_port(w, deadline)
    w.sock = socket.create_connection(("127.0.0.1", w.port), timeout=_left(deadline))
    w.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    w.send(message("hello", token=token, client=f"dit360_blender {__version__}", heartbeat=heartbeat))
    decoder = FrameDecoder()
    first, rest = _first_reply(w, decoder, deadline)
    w.sock.settimeout(SEND_TIMEOUT_S)
    if first["type"] == "error":
        raise WorkerError(first["code"], first["message"], first["hint"])
    if first["type"] != "ready" or first.get("protocol") != PROTOCOL_VERSION:
        raise WorkerError("worker_start_failed", f"The worker answered {first['type']} instead of ready.")
    w.ready = {k: v for k, v in first.items() if k not in ("v", "type")}
    return decoder, rest


def start_failure(
    w: WorkerProcess,
    exc: BaseException,
    handshake_timeout: float,
    log_path: Path,
    scrub: Callable[[str], str],
) -> WorkerError:
    """What to tell the user when `handshake` (or the connection) failed with `exc`."""
    if isinstance(exc, WorkerError):
        return exc
    for t in w.drains:  # let the drains collect the last of stderr
        t.join(1.0)
    code = w.proc.poll()
    if isinstance(exc, TimeoutError):
        what = f"The worker did not answer within {handshake_timeout:.0f} s."
    elif isinstance(exc, WorkerExited):
        what = f"The worker process exited during start (exit code {code})."
    else:
        what = f"Could not connect to the worker: {type(exc).__name__}: {exc}."
    tail = w.tail()
    said = f"\nIt reported: {w.start_logs[-1]}" if w.start_logs else ""
    text = what + said + (f"\nLast lines of its output:\n{tail}" if tail else "")
    return WorkerError(
        "worker_start_failed",
        scrub(text),
        "Install or repair the worker's packages (add-on Preferences → Install dependencies), or set "
        f"the worker's Python there. Details are in {log_path}.",
    )


def lost_job_error(
    w: WorkerProcess,
    job_id: str,
    code: int | None,
    log_path: Path,
    scrub: Callable[[str], str],
    silence_s: float,
) -> dict:
    """The final `error` of a job whose worker went away (closed, died, or killed as unresponsive
    after `silence_s` without a word)."""
    if w.closing:
        return error("cancelled", "The worker was closed before the job finished.", "", job_id=job_id)
    again = "Submit the job again: a new worker starts automatically."
    if w.unresponsive:
        return error(
            "worker_unresponsive",
            f"The worker answered nothing for {silence_s:.0f} s although its process was still there "
            "(suspended, out of memory and swapping, or stuck), so it was stopped.",
            f"{again} If it keeps happening, see {log_path}.",
            job_id=job_id,
        )
    for t in w.drains:
        t.join(0.2)
    tail = w.tail()
    text = f"The worker process stopped unexpectedly (exit code {code})." + (
        f"\nLast lines of its output:\n{tail}" if tail else ""
    )
    hint = f"{again} If it keeps happening, the computer may be running out of memory; see {log_path}."
    return error("worker_died", scrub(text), hint, job_id=job_id)


class Heartbeat:
    """The client's side of the heartbeats (protocol.py): when to ping, when to give up."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.interval = timeout / HEARTBEAT_MISSES
        self.heard = self.pinged = time.monotonic()

    def ping_due(self, now: float) -> bool:
        if now - self.pinged < self.interval:
            return False
        self.pinged = now
        return True

    def expired(self, now: float) -> bool:
        return now - self.heard > self.timeout


class WorkerExited(Exception):
    """The worker process ended (or closed the connection) during start."""


def _left(deadline: float) -> float:
    return max(0.0, deadline - time.monotonic())


def _wait_port(w: WorkerProcess, deadline: float) -> None:
    while not w.port_seen.wait(0.05):
        if w.proc.poll() is not None:
            raise WorkerExited()
        if time.monotonic() > deadline:
            raise TimeoutError()


def _first_reply(w: WorkerProcess, decoder: FrameDecoder, deadline: float) -> tuple[dict, list]:
    assert w.sock is not None
    while True:
        ready, _, _ = select.select([w.sock], [], [], min(READ_WAKE_S, _left(deadline)))
        if not ready:
            if w.proc.poll() is not None:
                raise WorkerExited()
            if time.monotonic() > deadline:
                raise TimeoutError()
            continue
        data = w.sock.recv(65536)
        if not data:
            raise WorkerExited()
        items = decoder.feed(data)
        while items:
            if isinstance(items[0], ProtocolError):
                raise items[0]
            first, items = decode(items[0], WORKER_MESSAGES), items[1:]
            if first["type"] != "log":
                return first, items
            w.start_logs.append(str(first.get("message", "")))


def _drain(w: WorkerProcess, stream, name: str) -> None:
    """Read a pipe to its end (so the worker never blocks on a full pipe), keeping the last lines."""
    tail = w.stdout_tail if name == "stdout" else w.stderr_tail
    for raw in iter(stream.readline, b""):
        # A progress bar redraws itself with carriage returns: only its last state is a line, and
        # a bar is progress, never the cause of a failure: it stays out of the tail we show.
        line = raw.decode("utf-8", "replace").rstrip().rsplit("\r", 1)[-1]
        if _PROGRESS_BAR.search(line):
            continue
        if name == "stdout" and not w.port_seen.is_set() and line.startswith(PORT_ANNOUNCE + " "):
            try:
                w.port = int(line.split()[1])
                w.port_seen.set()
                continue
            except (IndexError, ValueError):
                pass
        if line:
            tail.append(line)
    stream.close()
