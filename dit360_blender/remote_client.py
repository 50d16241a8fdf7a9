"""The client of a remote worker (``python -m dit360_blender.worker --serve`` on a GPU machine),
reached through an SSH tunnel. Standard library only, like `client.py`, whose API it keeps:

    client = RemoteWorkerClient(RemoteSpec(token_file="~/gpu-box.token", ssh_alias="gpu-box"))
    result = client.run(Job(prompt=..., output_dir="/renders"))   # the files land in /renders

What differs from a worker the client starts itself:

- no process: it connects to ``host:port`` (loopback: the local end of a tunnel the user runs), or
  starts ``ssh -N -L`` itself from an SSH host alias (`tunnel.py`) and stops it on `close()`;
- no shared files: an edit's input files are uploaded before its job (chunks, checksummed), a
  result's files are fetched chunk by chunk into the job's local ``output_dir`` (`transfer.py`)
  and the `result` event names the local files; the worker is told to delete its copies after;
- a dropped connection with jobs unfinished is made again (for `reconnect_window` seconds, a dead
  tunnel restarted), and each job is asked for by id: a finished one's result is fetched, a
  running one goes on, nothing is computed twice;
- `close()` ends the session (the worker cancels this client's jobs) but leaves the worker serving.
"""

from __future__ import annotations

import json
import os
import select
import socket
import stat
import sys
import threading
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._version import __version__
from .client import WorkerClient
from .params import BY_NAME
from .protocol import (
    FINAL_TYPES,
    HEARTBEAT_MISSES,
    HEARTBEAT_TIMEOUT_S,
    PROTOCOL_VERSION,
    SERVE_PORT,
    WORKER_MESSAGES,
    FrameDecoder,
    ProtocolError,
    decode,
    encode,
    error,
    message,
)
from .redact import token_problem
from .transfer import Download, TransferError, upload_frames
from .tunnel import SSHTunnel, TunnelError
from .worker_process import READ_WAKE_S, Heartbeat, WorkerError

LOOPBACK = ("127.0.0.1", "localhost", "::1")
CONNECT_TIMEOUT_S = 30.0  # the tunnel's ssh login included
RECONNECT_WINDOW_S = 60.0  # a lost connection with jobs unfinished is retried this long
_FIX_SETTINGS = "Check Worker: Remote in the add-on Preferences (host alias or host:port, token file)."


@dataclass(frozen=True)
class RemoteSpec:
    """Where the remote worker is: `token_file` (a copy of the file the worker printed) and either
    `address` ("127.0.0.1:7860": a tunnel the user runs) or `ssh_alias` (the add-on runs
    ``ssh -N -L local:127.0.0.1:remote_port alias``; `local_port` 0: any free one)."""

    token_file: str | Path
    address: str | None = None
    ssh_alias: str | None = None
    remote_port: int = SERVE_PORT
    local_port: int = 0
    ssh: str | None = None  # the ssh program (default: the one on PATH)

    def endpoint(self) -> tuple[str, int]:
        """(host, port) of `address`; raises WorkerError for one that is not a loopback host:port."""
        text = (self.address or "").strip()
        host, _, port = text.rpartition(":")
        host = host.strip("[]") or "127.0.0.1"
        if not port.isdigit() or not 0 < int(port) < 65536:
            raise WorkerError(
                "remote_unreachable", f"{text!r} is not host:port (e.g. 127.0.0.1:7860).", _FIX_SETTINGS
            )
        if host not in LOOPBACK:
            raise WorkerError(
                "remote_unreachable",
                f"{host} is not this computer: the token and the images would cross the network unencrypted.",
                "Reach the worker through an SSH tunnel (ssh -N -L 7860:127.0.0.1:7860 gpu-box) and connect "
                "to 127.0.0.1:7860, or give the SSH host alias and let the add-on run the tunnel.",
            )
        return host, int(port)


def read_token(path: str | Path) -> str:
    """The token in `path`: a small file of this user's, not readable by others. Raises WorkerError."""
    path = Path(os.path.expanduser(str(path)))
    fix = "Copy the token file the worker printed (scp gpu-box:.config/dit360_blender/worker.token ...) and chmod 600 it."
    try:
        info = path.stat()
        if not stat.S_ISREG(info.st_mode) or info.st_size > 4096:
            raise WorkerError("remote_unreachable", f"The token file {path} is not a small file.", fix)
        if sys.platform != "win32" and info.st_mode & 0o077:
            raise WorkerError(
                "remote_unreachable",
                f"The token file {path} can be read by other users (mode {stat.S_IMODE(info.st_mode):o}).",
                f"chmod 600 {path}",
            )
        token = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise WorkerError(
            "remote_unreachable", f"Can't read the token file {path}: {exc.strerror or exc}.", fix
        ) from None
    if token_problem(token):
        raise WorkerError("remote_unreachable", f"The token file {path} holds no token.", fix)
    return token


class RemoteConnection:
    """The connection to a remote worker, in the shape `WorkerClient` keeps its worker."""

    def __init__(self, sock: socket.socket, address: tuple[str, int]) -> None:
        self.sock: socket.socket | None = sock
        self.address = address
        self.ready: dict = {}
        self.send_lock = threading.Lock()
        self.reader: threading.Thread | None = None
        self.gone = threading.Event()
        self.closing = False
        self.unresponsive = False

    def send(self, msg: dict) -> None:
        self.send_frame(encode(msg))

    def send_frame(self, data: bytes) -> None:
        with self.send_lock:
            if self.sock is None:
                raise OSError("not connected")
            self.sock.sendall(data)

    def stop(self, timeout: float) -> None:
        """End the session: the worker cancels this client's jobs and closes; it keeps serving."""
        self.closing = True
        try:
            self.send(message("shutdown"))
        except (OSError, ProtocolError):
            pass
        if not self.gone.wait(timeout):
            self.kill()

    def kill(self) -> None:
        """Cut the connection (the reader thread sees it end)."""
        try:
            if self.sock is not None:
                self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def close_socket(self) -> None:
        if self.sock is not None:
            self.sock.close()


class _Retry(Exception):
    """Not there yet (refused, cut off, busy while reconnecting): try again until the deadline."""


class RemoteWorkerClient(WorkerClient):
    """`WorkerClient` for a remote worker; see the module docstring. `log_dir`: this computer's
    folder of the client (nothing of the worker's is there); `reconnect_window`: how long a lost
    connection with unfinished jobs is tried again."""

    def __init__(
        self,
        remote: RemoteSpec,
        log_dir: str | Path | None = None,
        handshake_timeout: float = CONNECT_TIMEOUT_S,
        heartbeat_timeout: float = HEARTBEAT_TIMEOUT_S,
        reconnect_window: float = RECONNECT_WINDOW_S,
    ) -> None:
        super().__init__(
            log_dir=log_dir, handshake_timeout=handshake_timeout, heartbeat_timeout=heartbeat_timeout
        )
        if remote.address is None and remote.ssh_alias is None:
            raise ValueError("RemoteSpec needs an address (host:port) or an ssh_alias")
        self.remote = remote
        self.reconnect_window = reconnect_window
        self._tunnel: SSHTunnel | None = None
        self._jobs: dict[str, dict] = {}  # job id -> its message (local paths), until it ends
        self._acked: set[str] = set()  # jobs the worker said it has (queued)
        self._fetching: set[str] = set()  # jobs asked for after a reconnect, no answer yet
        self._uploading: set[str] = set()
        self._cancelled: set[str] = set()  # cancelled while their inputs were uploading
        self._downloads: dict[str, Download] = {}
        self._progress_sent: dict[str, float] = {}  # job id -> when its last download progress went out
        self._lost_cause = ""
        self.reconnects = 0  # connections made again (for the panel and the tests)

    @property
    def worker_pid(self) -> int | None:
        w = self._worker
        return w.ready.get("pid") if w is not None else None

    @property
    def tunnel(self) -> SSHTunnel | None:
        return self._tunnel

    def cancel(self, job_id: str) -> bool:
        with self._lock:
            if job_id in self._uploading:  # its job message is not sent yet: the uploader ends it
                self._cancelled.add(job_id)
                return True
        return super().cancel(job_id)

    def close(self, timeout: float = 5.0) -> None:
        super().close(timeout)
        for d in list(self._downloads.values()):
            d.abort()
        self._downloads.clear()
        if self._tunnel is not None:
            self._tunnel.stop()
            self._tunnel = None

    # -- connecting ------------------------------------------------------------------------------

    def _endpoint(self) -> tuple[str, int]:
        """(host, port) to connect to; with an SSH alias, the tunnel is (re)started first."""
        if self.remote.ssh_alias is None:
            return self.remote.endpoint()
        try:
            if self._tunnel is None:
                self._tunnel = SSHTunnel(
                    self.remote.ssh_alias, self.remote.remote_port, self.remote.local_port, self.remote.ssh
                )
            if not self._tunnel.alive():
                self._tunnel.start()
        except TunnelError as exc:
            raise WorkerError("remote_unreachable", exc.message, exc.hint) from None
        return "127.0.0.1", self._tunnel.local_port

    def _launch(self, generation: int) -> tuple[RemoteConnection, FrameDecoder, list]:
        deadline = time.monotonic() + self.handshake_timeout
        token = read_token(self.remote.token_file)
        w, decoder, rest = self._connect_until(token, deadline, retry_busy=False)
        with self._lock:
            if generation != self._generation:
                w.kill()
                w.close_socket()
                raise WorkerError("worker_start_failed", "The client was closed while it connected.")
        return w, decoder, rest

    def _connect_until(
        self, token: str, deadline: float, retry_busy: bool
    ) -> tuple[RemoteConnection, FrameDecoder, list]:
        cause = ""
        host, port = self._endpoint()  # a tunnel is started once: its death ends the attempt
        tunnel = self._tunnel
        said_before = tunnel.lines if tunnel is not None else 0  # what ssh says from here on is about us
        while True:
            try:
                return self._connect(host, port, token, deadline, retry_busy)
            except _Retry as exc:
                cause = str(exc)
            if tunnel is not None and (
                not tunnel.alive() or (not retry_busy and tunnel.refused_remotely(said_before))
            ):
                time.sleep(0.2)  # let ssh's last words arrive
                failure = tunnel.failure()
                raise WorkerError("remote_unreachable", failure.message, failure.hint)
            if time.monotonic() > deadline:
                said = f"\nssh said:\n{tunnel.said()}" if tunnel is not None and tunnel.said() else ""
                where = (
                    f"{self.remote.ssh_alias} (through the tunnel)"
                    if tunnel is not None
                    else f"{host}:{port}"
                )
                raise WorkerError(
                    "remote_unreachable",
                    f"No remote worker answered at {where}: {cause}.{said}",
                    "Start it on the GPU machine: python -m dit360_blender.worker --serve"
                    + (
                        ""
                        if tunnel is not None
                        else ", and the tunnel: ssh -N -L 7860:127.0.0.1:7860 gpu-box"
                    ),
                )
            time.sleep(0.2)

    def _connect(
        self, host: str, port: int, token: str, deadline: float, retry_busy: bool
    ) -> tuple[RemoteConnection, FrameDecoder, list]:
        try:
            sock = socket.create_connection((host, port), timeout=max(0.5, deadline - time.monotonic()))
        except OSError as exc:
            raise _Retry(f"{type(exc).__name__}: {exc.strerror or exc}") from None
        w = RemoteConnection(sock, (host, port))
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            beat = self.heartbeat_timeout / HEARTBEAT_MISSES
            w.send(
                message("hello", token=token, client=f"dit360_blender {__version__} (remote)", heartbeat=beat)
            )
            decoder = FrameDecoder()
            first, rest = self._first_reply(w, decoder, deadline)
        except (OSError, ProtocolError) as exc:
            w.close_socket()
            raise _Retry(f"the connection failed ({exc})") from None
        except BaseException:
            w.close_socket()
            raise
        if first["type"] == "error":
            w.close_socket()
            if first["code"] == "busy" and retry_busy:
                raise _Retry(first["message"])
            hint = first["hint"]
            if first["code"] == "unauthorized":
                hint = "The token file does not match the running worker (it makes a new one at each start): copy it again."
            raise WorkerError(
                first["code"], f"The remote worker refused the connection: {first['message']}", hint
            )
        if first["type"] != "ready" or first.get("protocol") != PROTOCOL_VERSION:
            w.close_socket()
            raise WorkerError(
                "worker_start_failed", f"The remote worker answered {first['type']} instead of ready."
            )
        sock.settimeout(5.0)
        w.ready = {k: v for k, v in first.items() if k not in ("v", "type")}
        return w, decoder, rest

    def _first_reply(self, w: RemoteConnection, decoder: FrameDecoder, deadline: float) -> tuple[dict, list]:
        assert w.sock is not None
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise _Retry("no answer to hello in time")
            ready, _, _ = select.select([w.sock], [], [], min(READ_WAKE_S, left))
            if not ready:
                continue
            data = w.sock.recv(65536)
            if not data:  # a tunnel whose far end has no worker closes at once
                raise _Retry("the connection was closed before the worker answered")
            items = decoder.feed(data)
            while items:
                if isinstance(items[0], ProtocolError):
                    raise items[0]
                first, items = decode(items[0], WORKER_MESSAGES), items[1:]
                if first["type"] != "log":
                    return first, items

    # -- reading, and connecting again -----------------------------------------------------------

    def _read(self, w: RemoteConnection, decoder: FrameDecoder, items: list) -> None:
        while True:
            self._read_until_lost(w, decoder, items)
            if w.closing or not self._unfinished(w):
                break
            again = self._reconnect(w)
            if again is None:
                break
            w, decoder, items = again
        self._on_gone(w)

    def _read_until_lost(self, w: RemoteConnection, decoder: FrameDecoder, items: list) -> None:
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
                    if beat.expired(now):
                        w.unresponsive = True
                        self._lost_cause = f"the worker answered nothing for {self.heartbeat_timeout:.0f} s"
                        return
                    continue
                data = w.sock.recv(65536)
            except (OSError, ValueError) as exc:
                self._lost_cause = f"{type(exc).__name__}: {exc}"
                return
            if not data:
                self._lost_cause = "the connection was closed"
                return
            beat.heard = time.monotonic()
            items = decoder.feed(data)

    def _unfinished(self, w: RemoteConnection) -> bool:
        with self._lock:
            return any(owner is w for owner in self._pending.values())

    def _reconnect(self, old: RemoteConnection) -> tuple[RemoteConnection, FrameDecoder, list] | None:
        """Connect again and ask for every unfinished job by id; None when it can't be done."""
        old.close_socket()
        for job_id in list(self._downloads):
            self._downloads.pop(job_id).abort()
        self._emit(
            message(
                "log",
                level="warning",
                message=f"Lost the remote worker ({self._lost_cause}); connecting again…",
            )
        )
        deadline = time.monotonic() + self.reconnect_window
        try:
            token = read_token(self.remote.token_file)
            while True:
                try:
                    w, decoder, rest = self._connect_until(token, deadline, retry_busy=True)
                    break
                except WorkerError as exc:  # a dead tunnel is started again until the deadline
                    if exc.code != "remote_unreachable" or time.monotonic() > deadline or old.closing:
                        raise
                    self._lost_cause = exc.message
                    time.sleep(0.5)
        except WorkerError as exc:
            self._lost_cause = exc.message
            return None
        with self._lock:
            if old.closing or self._worker is not old:
                w.kill()
                w.close_socket()
                return None
            self._worker = w
            w.reader = threading.current_thread()
            jobs = [job_id for job_id, owner in self._pending.items() if owner is old]
            for job_id in jobs:
                self._pending[job_id] = w
            self._fetching.update(jobs)
        self.reconnects += 1
        self._emit(message("ready", **w.ready))
        for job_id in jobs:
            try:
                w.send(message("fetch", job_id=job_id))
            except (OSError, ProtocolError):
                break  # the next loss is handled as this one was
        return w, decoder, rest

    def _on_gone(self, w: RemoteConnection) -> None:
        with self._lock:
            if self._worker is w:
                self._worker = None
            lost = [job_id for job_id, owner in self._pending.items() if owner is w]
            for job_id in lost:
                del self._pending[job_id]
        w.close_socket()
        w.gone.set()
        for job_id in lost:
            self._forget(job_id)
            if w.closing:
                self._emit(
                    error("cancelled", "The connection to the remote worker was closed.", "", job_id=job_id)
                )
            else:
                self._emit(
                    error(
                        "remote_unreachable",
                        f"The connection to the remote worker was lost and could not be made again within "
                        f"{self.reconnect_window:.0f} s: {self._lost_cause}",
                        "Check the tunnel and the worker, then run the job again.",
                        job_id=job_id,
                    )
                )
        if not lost and not w.closing:
            self._emit(
                message(
                    "log",
                    level="warning",
                    message=f"The remote worker's connection ended: {self._lost_cause}.",
                )
            )

    def _broken(self, w: Any) -> None:
        w.kill()  # the reader sees the connection end and connects again

    # -- jobs: inputs up, files down -------------------------------------------------------------

    def _send_job(self, w: Any, job_id: str, frame: bytes) -> None:
        msg = json.loads(frame)
        inputs = {
            name: Path(value)
            for name, value in msg["params"].items()
            if name in BY_NAME and BY_NAME[name].kind == "path" and value is not None
        }
        with self._lock:
            self._pending[job_id] = w
            self._jobs[job_id] = msg
            if inputs:
                self._uploading.add(job_id)
        if not inputs:
            self._send(w, frame)
            return
        threading.Thread(
            target=self._upload_then_send, args=(w, job_id, msg, inputs), name="dit360-upload", daemon=True
        ).start()

    def _send(self, w: Any, frame: bytes) -> None:
        try:
            w.send_frame(frame)
        except OSError:
            self._broken(w)

    def _upload_then_send(self, w: Any, job_id: str, msg: dict, inputs: Mapping[str, Path]) -> None:
        """Upload the job's input files, then send the job naming them (on this thread: a large
        image must not hold up the caller)."""
        uploads = {}
        try:
            for name, path in inputs.items():
                upload_id = uuid.uuid4().hex[:16]
                for frame in upload_frames(path, upload_id):
                    if job_id in self._cancelled:
                        break
                    w.send_frame(frame)
                uploads[name] = upload_id
            with self._lock:
                self._uploading.discard(job_id)
                cancelled = job_id in self._cancelled
                self._cancelled.discard(job_id)
            if cancelled:
                self._end_job(
                    job_id, error("cancelled", "Cancelled before its inputs were sent.", "", job_id=job_id)
                )
                return
            w.send({**msg, "uploads": uploads})
        except TransferError as exc:
            with self._lock:
                self._uploading.discard(job_id)
            self._end_job(job_id, error(exc.code, exc.message, exc.hint, job_id=job_id))
        except (OSError, ProtocolError):
            with self._lock:
                self._uploading.discard(job_id)
            self._broken(w)  # after the reconnect the worker doesn't know the job: it is sent again

    def _on_frame(self, item: bytes | ProtocolError, w: RemoteConnection) -> None:
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
        kind, job_id = msg["type"], msg.get("job_id")
        if kind == "device":
            self._note_device(msg, w)
        if kind == "chunk":
            self._on_chunk(msg)
        elif kind == "uploaded" or kind == "pong":
            pass
        elif kind == "status":
            self._statuses.put(msg)
        elif kind == "error" and msg["code"] == "bad_upload":
            self._emit(message("log", level="warning", message=msg["message"]))  # its job is refused next
        elif kind == "error" and job_id is None and msg["code"] == "unknown_job":
            self._on_unknown((msg.get("details") or {}).get("job_id"), msg)
        elif job_id is not None and job_id not in self._jobs:
            pass  # a job of an earlier session of this worker, or already ended here
        elif kind == "result" and "remote_files" in msg:
            self._fetching.discard(job_id)
            self._start_download(msg)
        elif kind in FINAL_TYPES and job_id is not None:
            self._end_job(job_id, msg)
        else:
            if kind == "queued":
                self._acked.add(job_id)
                self._fetching.discard(job_id)
            self._emit(msg)

    def _on_unknown(self, job_id: Any, msg: dict) -> None:
        if job_id not in self._fetching:
            self._emit(msg)  # e.g. the reply to a cancel of a job that had just ended
            return
        self._fetching.discard(job_id)
        w = self._worker
        if job_id not in self._acked and w is not None:  # it never arrived: send it now
            self._send_job(w, job_id, encode(self._jobs[job_id]))
            return
        self._end_job(
            job_id,
            error(
                "worker_died",
                f"The remote worker no longer has job {job_id} (it was restarted, or kept the result too long).",
                "Run the job again.",
                job_id=job_id,
            ),
        )

    def _start_download(self, result: dict) -> None:
        job_id = result["job_id"]
        params = self._jobs[job_id]["params"]
        try:
            d = Download(job_id, result, Path(params["output_dir"]), params.get("filename"))
        except TransferError as exc:
            self._end_job(job_id, error(exc.code, exc.message, exc.hint, job_id=job_id))
            return
        self._downloads[job_id] = d
        self._request(d.requests())
        if d.complete:
            self._finish_download(d)

    def _on_chunk(self, msg: dict) -> None:
        d = self._downloads.get(msg["job_id"])
        if d is None:
            return  # a reply that was in flight when its download was given up
        try:
            self._request(d.feed(msg))
        except TransferError as exc:
            self._downloads.pop(d.job_id, None)
            d.abort()
            self._end_job(d.job_id, error(exc.code, exc.message, exc.hint, job_id=d.job_id))
            return
        if d.complete:
            self._finish_download(d)
        else:
            self._download_progress(d)

    def _download_progress(self, d: Download) -> None:
        """A `progress` event (stage saving) now and then while the files come: a large HDR over a
        slow tunnel takes a while, and the panel should say why."""
        now = time.monotonic()
        if now - self._progress_sent.get(d.job_id, 0.0) < 0.25:
            return
        self._progress_sent[d.job_id] = now
        steps = int(
            d.result.get("metadata", {}).get("steps") or self._jobs[d.job_id]["params"].get("steps", 0)
        )
        self._emit(
            message(
                "progress", job_id=d.job_id, stage="saving", step=steps, total=steps,
                elapsed=round(float(d.result.get("timings", {}).get("total_s", 0.0)), 4), eta=None,
                detail=f"receiving files {d.received_bytes / 1e6:.1f}/{d.total_bytes / 1e6:.1f} MB",
            )
        )  # fmt: skip

    def _finish_download(self, d: Download) -> None:
        self._downloads.pop(d.job_id, None)
        try:
            result = d.finish()
        except TransferError as exc:
            self._end_job(d.job_id, error(exc.code, exc.message, exc.hint, job_id=d.job_id))
            return
        self._request([message("release", job_id=d.job_id)])
        self._end_job(d.job_id, result)

    def _request(self, msgs: list[dict]) -> None:
        w = self._worker
        for msg in msgs:
            if w is None:
                return
            try:
                w.send(msg)
            except (OSError, ProtocolError):
                self._broken(w)
                return

    def _end_job(self, job_id: str, event: dict) -> None:
        with self._lock:
            self._pending.pop(job_id, None)
        self._forget(job_id)
        self._emit(event)

    def _forget(self, job_id: str) -> None:
        self._jobs.pop(job_id, None)
        self._acked.discard(job_id)
        self._fetching.discard(job_id)
        self._progress_sent.pop(job_id, None)
        d = self._downloads.pop(job_id, None)
        if d is not None:
            d.abort()
