"""A worker that serves on its own machine: ``python -m dit360_blender.worker --serve``.

The same socket server as a client-started worker (loopback only, the token checked in constant
time, framed JSON with size limits, heartbeats), with what a remote GPU box needs on top:

- it keeps running between clients (no parent to watch, no accept timeout) and serves one client
  at a time: another one is refused with ``busy`` while the first is connected;
- it shares no file system with its client: each job writes into a folder of the worker's own
  (``<root>/jobs/<job_id>``), whatever ``output_dir`` the client named, and its files go back as
  checksummed chunks (``fetch_chunk``); input files (an edit's source and mask) arrive as uploads
  (``<root>/uploads/<upload_id>``), and a job names them by upload id;
- the models are this machine's (``--models-dir`` or its Hugging Face cache), never a client path;
- a client that drops mid-job loses nothing: the job runs on, its final event and files are kept
  (``RESULT_KEEP_S`` / ``RESULT_KEEP_BYTES``), and a client that comes back asks for it by id.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import socket
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from ..params import BY_NAME
from ..protocol import (
    CHUNK_BYTES,
    FINAL_TYPES,
    MAX_UPLOAD_BYTES,
    MAX_UPLOADS_BYTES,
    RESULT_KEEP_BYTES,
    RESULT_KEEP_S,
    SERVE_PORT,
    ProtocolError,
    error,
    message,
)
from ..transfer import TransferError, checksum_problem, chunk_bytes, chunk_fields, name_problem, sha256_file
from .process import device_fields
from .server import LISTEN_BACKLOG, WATCH_INTERVAL_S, Connection, Worker

logger = logging.getLogger("dit360_blender.worker")

DEFAULT_PORT = SERVE_PORT
UPLOAD_KEEP_S = 3600.0  # an upload no job used is removed after this
MAX_UPLOADS = 64  # uploads held at once (an edit sends two or three)
REFUSED_UPLOADS_KEPT = 256  # refused upload ids remembered (their later chunks are dropped quietly)


@dataclass
class Finished:
    final: dict  # the job's final event as first sent (a result with remote_files)
    files: dict[str, Path]  # name -> file in the job's folder
    size: int
    ended: float = field(default_factory=time.monotonic)


class ResultStore:
    """Finished jobs' final events and files, kept for a bounded time and size."""

    def __init__(
        self, root: Path, keep_s: float = RESULT_KEEP_S, keep_bytes: int = RESULT_KEEP_BYTES
    ) -> None:
        self.root = root / "jobs"
        self.keep_s, self.keep_bytes = keep_s, keep_bytes
        self._done: OrderedDict[str, Finished] = OrderedDict()  # oldest first
        self._lock = threading.Lock()
        shutil.rmtree(self.root, ignore_errors=True)  # an earlier run's: no client can name them now
        self.root.mkdir(mode=0o700, parents=True)

    def job_dir(self, job_id: str) -> Path:
        folder = self.root / job_id
        folder.mkdir(mode=0o700, exist_ok=True)
        return folder

    def record(self, msg: dict) -> dict:
        """Keep a job's final event; a result gets `remote_files` (name, size, sha256 of each file
        of the job's folder). Returns the message to send."""
        job_id = msg["job_id"]
        files: dict[str, Path] = {}
        if msg["type"] == "result":
            listed = [("path", msg["path"])] + [(k, v) for k, v in (msg.get("files") or {}).items()]
            native = msg.get("native") or {}  # a generate that also upscaled: its generated size too
            if native.get("path"):
                listed += [("native.path", native["path"])]
                listed += [(f"native.{k}", v) for k, v in (native.get("files") or {}).items()]
            entries = []
            for key, value in listed:
                path = Path(value)
                if path.parent != self.root / job_id or not path.is_file():
                    logger.warning("job %s: %s is not in its folder; not offered", job_id, path)
                    continue
                files[path.name] = path
                entries.append(
                    {"key": key, "name": path.name, "size": path.stat().st_size, "sha256": sha256_file(path)}
                )
            msg = {**msg, "remote_files": entries}
        else:
            shutil.rmtree(self.root / job_id, ignore_errors=True)  # a failed job leaves nothing
        with self._lock:
            self._done[job_id] = Finished(msg, files, sum(p.stat().st_size for p in files.values()))
        self.evict()
        return msg

    def get(self, job_id: str) -> Finished | None:
        with self._lock:
            return self._done.get(job_id)

    def release(self, job_id: str) -> bool:
        with self._lock:
            gone = self._done.pop(job_id, None)
        shutil.rmtree(self.root / job_id, ignore_errors=True)
        return gone is not None

    def evict(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        with self._lock:
            doomed = [j for j, f in self._done.items() if now - f.ended > self.keep_s]
            total = sum(f.size for j, f in self._done.items() if j not in doomed)
            for job_id, f in self._done.items():
                if total <= self.keep_bytes:
                    break
                if job_id not in doomed:
                    doomed.append(job_id)
                    total -= f.size
            for job_id in doomed:
                del self._done[job_id]
        for job_id in doomed:
            logger.info("dropped the kept result of job %s (time or size bound)", job_id)
            shutil.rmtree(self.root / job_id, ignore_errors=True)


@dataclass
class Upload:
    name: str
    size: int
    sha256: str
    path: Path
    received: int = 0
    digest: object = field(default_factory=hashlib.sha256)
    complete: bool = False
    started: float = field(default_factory=time.monotonic)


class UploadStore:
    """Input files arriving in chunks; each checked chunk by chunk and whole, bounded in size."""

    def __init__(self, root: Path) -> None:
        self.root = root / "uploads"
        self._uploads: dict[str, Upload] = {}
        self._refused: OrderedDict[str, str] = OrderedDict()  # upload id -> why
        self._lock = threading.Lock()
        shutil.rmtree(self.root, ignore_errors=True)
        self.root.mkdir(mode=0o700, parents=True)

    def begin(self, upload_id: str, name: str, size: int, sha256: str) -> None:
        problem = name_problem(name) or checksum_problem(sha256)
        if problem is None and upload_id in self._uploads:
            problem = f"upload id {upload_id} is taken"
        if problem is None and not 0 <= size <= MAX_UPLOAD_BYTES:
            problem = f"{name} is {size} bytes; an upload is at most {MAX_UPLOAD_BYTES} bytes ({MAX_UPLOAD_BYTES >> 20} MiB)"
        with self._lock:
            held, count = sum(u.size for u in self._uploads.values()), len(self._uploads)
        if problem is None and count >= MAX_UPLOADS:
            problem = f"the worker holds {count} uploads already, its most"
        if problem is None and held + size > MAX_UPLOADS_BYTES:
            problem = f"the worker holds {held >> 20} MiB of uploads; {size >> 20} MiB more is over its {MAX_UPLOADS_BYTES >> 20} MiB"
        if problem:
            self._refuse(upload_id, problem)
        folder = self.root / upload_id
        folder.mkdir(mode=0o700)
        upload = Upload(name, size, sha256, folder / name)
        upload.path.touch(mode=0o600)
        with self._lock:
            self._uploads[upload_id] = upload

    def chunk(self, upload_id: str, offset: int, msg: dict) -> Upload | None:
        """Write one chunk; returns the upload when it is complete (checksum right), else None.
        Raises ProtocolError bad_upload (the upload is dropped); chunks of a refused upload: None."""
        upload = self._uploads.get(upload_id)
        if upload is None:
            if upload_id in self._refused:
                return None
            self._refuse(upload_id, f"no upload {upload_id} was begun (send upload_begin first)")
        if upload.complete or offset != upload.received:
            self._refuse(upload_id, f"a chunk at offset {offset}, expected {upload.received}")
        try:
            data = chunk_bytes(msg, min(CHUNK_BYTES, upload.size - offset))
        except TransferError as exc:
            self._refuse(upload_id, exc.message)
        with open(upload.path, "ab") as f:
            f.write(data)
        upload.digest.update(data)
        upload.received += len(data)
        if upload.received < upload.size:
            return None
        if upload.digest.hexdigest() != upload.sha256:
            self._refuse(upload_id, f"{upload.name} does not match its sha256 as a whole")
        upload.complete = True
        return upload

    def path(self, upload_id: str) -> Path:
        """The file of a complete upload; raises ProtocolError bad_parameters (with why) if there is none."""
        upload = self._uploads.get(upload_id)
        if upload is not None and upload.complete:
            return upload.path
        why = self._refused.get(upload_id, "it has not arrived completely")
        raise ProtocolError(
            "bad_parameters",
            f"The input file of upload {upload_id} can't be used: {why}.",
            "Submit the job again.",
        )

    def discard(self, upload_ids: list[str]) -> None:
        with self._lock:
            for upload_id in upload_ids:
                self._uploads.pop(upload_id, None)
        for upload_id in upload_ids:
            shutil.rmtree(self.root / upload_id, ignore_errors=True)

    def discard_incomplete(self) -> None:
        """Uploads cut short (their client left mid-file): a client that comes back sends them anew."""
        self.discard([u for u, up in list(self._uploads.items()) if not up.complete])

    def expire(self, now: float) -> None:
        self.discard([u for u, up in list(self._uploads.items()) if now - up.started > UPLOAD_KEEP_S])

    def _refuse(self, upload_id: str, why: str) -> None:
        self.discard([upload_id])
        self._refused[upload_id] = why
        while len(self._refused) > REFUSED_UPLOADS_KEPT:
            self._refused.popitem(last=False)
        raise ProtocolError(
            "bad_upload",
            f"Upload {upload_id} refused: {why}.",
            "Send the file again (the client checks sizes first).",
        )


class ServeWorker(Worker):
    """The socket server in serve mode (see the module docstring)."""

    def __init__(
        self, token: str, secrets: list[str], root: Path, models_dir: Path | None, port: int
    ) -> None:
        super().__init__(token, secrets, accept_timeout=float("inf"))
        self.root, self.models_dir, self.port = root, models_dir, port
        self.results = ResultStore(root)
        self.uploads = UploadStore(root)
        self._job_uploads: dict[str, list[str]] = {}  # job id -> its uploads, removed when it ends

    # -- sockets ---------------------------------------------------------------------------------

    def listen(self) -> int:
        """Bind 127.0.0.1:port (loopback only: the network reaches it through SSH)."""
        server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if hasattr(socket, "SO_EXCLUSIVEADDRUSE"):
            server.setsockopt(socket.SOL_SOCKET, socket.SO_EXCLUSIVEADDRUSE, 1)
        else:  # a restart may bind the port while the last run's connections linger in TIME_WAIT
            server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", self.port))
        server.listen(LISTEN_BACKLOG)
        self._server = server
        threading.Thread(target=self._accept_loop, name="accept", daemon=True).start()
        return server.getsockname()[1]

    def _claim(self, conn: Connection) -> ProtocolError | None:
        with self._owner_lock:
            if self._stopping.is_set():
                return ProtocolError("busy", "The worker is shutting down.", "Start it again on its machine.")
            if self.owner is not None:
                return ProtocolError(
                    "busy",
                    "This remote worker is serving another client (one at a time).",
                    "Wait until the other Blender disconnects, or start a second worker on another port.",
                )
            self.owner = conn
        if self.device_info is not None:  # free VRAM now, not at start
            try:
                self.device_info = device_fields()
            except Exception:
                logger.warning("could not refresh the device report", exc_info=True)
        return None

    def client_left(self, conn: Connection) -> None:
        """The client is gone: free the seat; its jobs run on and keep their results."""
        with self._owner_lock:
            if self.owner is conn:
                self.owner = None
        conn.close()
        self.uploads.discard_incomplete()

    def watch(self, parent_pid: int | None = None) -> None:
        """No parent and no accept timeout: a silent client is disconnected; old results expire."""

        def loop() -> None:
            while not self._stopping.is_set():
                time.sleep(WATCH_INTERVAL_S)
                now = time.monotonic()
                owner = self.owner
                if owner is not None and owner.silent_too_long(now):
                    logger.warning("the client sent no heartbeat in time: disconnecting it")
                    self.client_left(owner)
                self.results.evict(now)
                self.uploads.expire(now)

        threading.Thread(target=loop, name="watchdog", daemon=True).start()

    # -- messages --------------------------------------------------------------------------------

    def send(self, msg: dict) -> None:
        """To the client if one is connected; a job's final event is kept first (with its files)."""
        if msg.get("type") in FINAL_TYPES and isinstance(msg.get("job_id"), str):
            try:
                msg = self.results.record(msg)
            except OSError:
                logger.exception("could not keep the result of job %s", msg["job_id"])
            self.uploads.discard(self._job_uploads.pop(msg["job_id"], []))
        super().send(msg)

    def _on_job(self, conn: Connection, msg: dict) -> None:
        """A job for this machine: its folder, this machine's models, its inputs from uploads."""
        job_id, params = msg["job_id"], dict(msg["params"])
        uploads = msg.get("uploads") or {}
        try:
            if self.queue.known(job_id) or self.results.get(job_id) is not None:
                raise ProtocolError(
                    "bad_message", f"Job id {job_id} is already known.", "Use a new id (or fetch it)."
                )
            if params.get("loras"):
                raise ProtocolError(
                    "bad_parameters",
                    "Your own LoRA files are not sent to a remote worker.",
                    "Run without extra LoRAs, or use the local worker for them.",
                )
            for name, value in list(params.items()):
                if name in BY_NAME and BY_NAME[name].kind == "path" and value is not None:
                    upload_id = uploads.get(name)
                    if not isinstance(upload_id, str):
                        raise ProtocolError(
                            "bad_parameters",
                            f"The remote worker can't read {name} {value!r} from your computer.",
                            "Send it as an upload (dit360_blender's remote client does).",
                        )
                    params[name] = str(self.uploads.path(upload_id))
        except ProtocolError as exc:
            self.uploads.discard([u for u in uploads.values() if isinstance(u, str)])
            conn.send(exc.to_message(job_id))
            return
        params["output_dir"] = str(self.results.job_dir(job_id))
        params["models"] = {"models_dir": None if self.models_dir is None else str(self.models_dir)}
        self._job_uploads[job_id] = [u for u in uploads.values() if isinstance(u, str)]
        super()._on_job(conn, {**msg, "params": params})
        if not self.queue.known(job_id) and self.results.get(job_id) is None:  # refused: nothing kept
            self.uploads.discard(self._job_uploads.pop(job_id, []))
            shutil.rmtree(self.results.root / job_id, ignore_errors=True)

    def _on_fetch(self, conn: Connection, msg: dict) -> None:
        job_id = msg["job_id"]
        for _attempt in range(
            2
        ):  # a job ends between the two looks: it is recorded before it leaves the queue
            finished = self.results.get(job_id)
            if finished is not None:
                conn.send(finished.final)
                return
            running, queued = self.queue.snapshot()
            if job_id == running or job_id in queued:
                position = 0 if job_id == running else queued.index(job_id) + (running is not None)
                conn.send(message("queued", job_id=job_id, position=position))
                return
        conn.send(
            error(
                "unknown_job", f"The worker has no job {job_id} (never received, or its result expired).",
                "Submit the job again.", details={"job_id": job_id},
            )
        )  # fmt: skip

    def _on_fetch_chunk(self, conn: Connection, msg: dict) -> None:
        job_id, name, offset = msg["job_id"], msg["name"], msg["offset"]
        finished = self.results.get(job_id)
        path = finished.files.get(name) if finished is not None else None
        if path is None:
            raise ProtocolError(
                "unknown_job", f"Job {job_id} has no file {name!r} here.", "Fetch the job first."
            )
        size = path.stat().st_size
        if not 0 <= offset < max(size, 1):
            raise ProtocolError("bad_message", f"Offset {offset} is outside {name} ({size} bytes).")
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read(CHUNK_BYTES)
        conn.send(message("chunk", job_id=job_id, name=name, offset=offset, size=size, **chunk_fields(data)))

    def _on_release(self, conn: Connection, msg: dict) -> None:
        self.results.release(msg["job_id"])

    def _on_upload_begin(self, conn: Connection, msg: dict) -> None:
        try:
            self.uploads.begin(msg["upload_id"], msg["name"], msg["size"], msg["sha256"])
        except ProtocolError as exc:
            self._refuse_upload(conn, exc, msg["upload_id"])

    def _on_upload_chunk(self, conn: Connection, msg: dict) -> None:
        try:
            done = self.uploads.chunk(msg["upload_id"], msg["offset"], msg)
        except ProtocolError as exc:
            self._refuse_upload(conn, exc, msg["upload_id"])
            return
        if done is not None:
            conn.send(message("uploaded", upload_id=msg["upload_id"], size=done.size))

    def _refuse_upload(self, conn: Connection, exc: ProtocolError, upload_id: str) -> None:
        logger.warning("refused an upload: %s", exc.message)
        conn.send(error(exc.code, exc.message, exc.hint, details={"upload_id": upload_id}))

    def _on_shutdown(self, conn: Connection, msg: dict) -> None:
        """A serving worker is stopped on its own machine: a client's shutdown ends its session
        (its jobs are cancelled, the connection closed) and the worker waits for the next client."""
        running, queued = self.queue.snapshot()
        for job_id in [*queued, *([running] if running else [])]:
            found = self.queue.cancel(job_id)
            if found is not None and found[0] == "queued":
                self.send(error("cancelled", "Cancelled: the client ended its session.", "", job_id=job_id))
        logger.info("the client ended its session")
        self.client_left(conn)


def default_root() -> Path:
    """Where a serving worker keeps its log, jobs and uploads: this user's own folder."""
    from ..launch import default_work_dir

    return default_work_dir() / "serve"


def default_token_file() -> Path:
    return Path.home() / ".config" / "dit360_blender" / "worker.token"


def write_token(path: Path, token: str) -> Path:
    """Write the token to `path`, readable by this user only (0600, never through a link)."""
    path = Path(path).expanduser().absolute()
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    if path.is_symlink():
        raise PermissionError(f"{path} is a symbolic link; refusing to write the token through it.")
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(path, flags, 0o600)
    try:
        if hasattr(os, "fchmod"):
            os.fchmod(fd, 0o600)  # an older file may have had other bits
        os.write(fd, (token + "\n").encode("ascii"))
    finally:
        os.close(fd)
    return path
