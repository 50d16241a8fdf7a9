"""The worker process: a loopback socket server in front of the job runner.

Lifecycle (driven by `__main__`): bind 127.0.0.1 on an ephemeral port (`listen`), answer the client's
`hello` with `ready` at once (jobs can be queued from then on), import torch and the pipeline meanwhile
(`start_jobs`, seconds) and send the `device` event when that is done (right after `ready` if it was
done first), then run jobs on the main thread (`run_jobs`) until `shutdown`, the client's disconnect,
or the parent's death. When the import fails, the client hears a fatal `error` and the worker exits.

Threads: the main thread runs jobs; one thread accepts connections; each connection is served on
its own thread (a handshake, then, for the one authenticated client, its reader loop); a watchdog
checks the parent process twice a second. Only the owner (the first connection with the right
token) gets events; any other connection is refused with an `error` and closed.

Any local user can connect to the port, so a connection that has not said hello costs little and
can't keep the real client out: the whole handshake has one deadline (not one per `recv`, which a
sender of a byte a second would renew forever), and when MAX_HANDSHAKES connections are waiting, the
oldest of them is dropped to make room for the new one (the real client sends its hello at once,
so it is never the oldest for long).
"""

from __future__ import annotations

import hmac
import logging
import os
import socket
import threading
import time
from collections import deque
from pathlib import Path

from ..params import JOB_KINDS
from ..protocol import (
    CLIENT_MESSAGES,
    FINAL_TYPES,
    HEARTBEAT_MISSES,
    FrameDecoder,
    ProtocolError,
    check_job_params,
    decode,
    encode,
    error,
    message,
)
from ..redact import redact
from .jobqueue import MAX_QUEUED_JOBS, JobQueue, QueuedJob
from .parent import parent_watch
from .process import base_ready_fields, device_fields, hard_exit, rss_bytes

logger = logging.getLogger("dit360_blender.worker")

HANDSHAKE_TIMEOUT_S = 10.0  # a connection must say hello within this
SEND_TIMEOUT_S = 30.0  # a client that stops reading this long is treated as gone
STOP_GRACE_S = 10.0  # after shutdown, the running job gets this long to stop before a hard exit
WATCH_INTERVAL_S = 0.5  # parent check period (the issue asks for at least once a second)
MAX_HANDSHAKES = 8  # connections waiting to say hello; a new one beyond this drops the oldest
LISTEN_BACKLOG = 64  # room for a burst of connections while the accept thread drops the idle ones


class Connection:
    """A socket with a send lock (the job thread and the reader thread both send) and secret scrubbing."""

    def __init__(self, sock: socket.socket, secrets: list[str]) -> None:
        self.sock = sock
        self.secrets = secrets
        self.closed = False
        self.heartbeat: float | None = None  # the ping interval the client promised in its hello
        self.last_heard: float | None = None  # when a frame last arrived, once its reader runs
        self.ready_sent = False  # `ready` went out: a `device` event may follow
        self._lock = threading.Lock()

    def silent_too_long(self, now: float) -> bool:
        """A client that promised heartbeats and sent nothing for HEARTBEAT_MISSES of them."""
        if self.heartbeat is None or self.last_heard is None:
            return False
        return now - self.last_heard > HEARTBEAT_MISSES * self.heartbeat

    def send(self, msg: dict) -> bool:
        """Send one message; never raises. A job's final event that cannot be encoded (too large,
        a NaN in its metadata) is replaced by an `error` for the job, so the job still ends."""
        try:
            data = encode(msg)
        except Exception as exc:  # one bad message must not end the thread (or the worker) sending it
            logger.warning("not sent: a %s message: %s", msg.get("type"), getattr(exc, "message", exc))
            replacement = _undeliverable(msg, exc)
            if replacement is None:
                return False
            data = encode(replacement)
        data = redact(data.decode("utf-8"), self.secrets).encode("utf-8")
        with self._lock:
            if self.closed:
                return False
            try:
                self.sock.sendall(data)
                return True
            except OSError:
                self._close_locked()
                return False

    def close(self) -> None:
        with self._lock:
            self._close_locked()

    def _close_locked(self) -> None:
        if not self.closed:
            self.closed = True
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self.sock.close()


def _undeliverable(msg: dict, exc: Exception) -> dict | None:
    """What to send instead of a job's final event that could not be encoded; None for other messages."""
    job_id = msg.get("job_id")
    if msg.get("type") not in FINAL_TYPES or not isinstance(job_id, str):
        return None
    reason = exc.message if isinstance(exc, ProtocolError) else type(exc).__name__
    return error(
        "internal",
        f"The job's {msg['type']} message could not be sent ({reason}).",
        "Its files may be in the output folder; the worker log has the details.",
        job_id=job_id,
    )


class Worker:
    """The socket side of the worker: connections, authentication, message dispatch, life cycle."""

    def __init__(
        self,
        token: str,
        secrets: list[str],
        accept_timeout: float,
        handshake_timeout: float = HANDSHAKE_TIMEOUT_S,
    ) -> None:
        self.token = token.encode("utf-8")
        self.handshake_timeout = handshake_timeout
        self.secrets = secrets
        self.accept_timeout = accept_timeout
        self.queue = JobQueue()
        self.runner = None  # a jobs.JobRunner, set by `start_jobs` (it needs torch)
        self.cache = None
        self.owner: Connection | None = None
        self.ready_info: dict = base_ready_fields()  # what `ready` reports before torch is there
        self.device_info: dict | None = None  # the `device` event's fields, set by `start_jobs`
        self._start_failure: tuple[str, str] | None = None  # (message, hint) once `start_jobs` failed
        self._owner_lock = threading.Lock()
        self._device_lock = threading.Lock()  # `ready` and `device` reach each client once, in order
        self._stopping = threading.Event()
        self._waiting: deque[Connection] = deque()  # accepted, no first frame yet (oldest first)
        self._waiting_lock = threading.Lock()
        self._server: socket.socket | None = None
        self._started = time.monotonic()

    # -- sockets ---------------------------------------------------------------------------------

    def listen(self) -> int:
        """Bind 127.0.0.1:0 (loopback only) and return the port."""
        server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if hasattr(socket, "SO_EXCLUSIVEADDRUSE"):  # Windows: no other process may bind our port
            server.setsockopt(socket.SOL_SOCKET, socket.SO_EXCLUSIVEADDRUSE, 1)
        server.bind(("127.0.0.1", 0))
        server.listen(LISTEN_BACKLOG)
        self._server = server
        threading.Thread(target=self._accept_loop, name="accept", daemon=True).start()
        return server.getsockname()[1]

    def _accept_loop(self) -> None:
        assert self._server is not None
        while not self._stopping.is_set():
            try:
                sock, _ = self._server.accept()
            except OSError:
                return  # closed on exit
            conn = Connection(sock, self.secrets)
            with self._waiting_lock:
                if len(self._waiting) >= MAX_HANDSHAKES:
                    oldest = self._waiting.popleft()
                    logger.warning("dropped a connection that did not say hello, to make room")
                    oldest.close()  # its thread's recv returns at once and the thread ends
                self._waiting.append(conn)
            threading.Thread(target=self._serve, args=(conn,), name="connection", daemon=True).start()

    def _serve(self, conn: Connection) -> None:
        decoder = FrameDecoder()
        try:
            conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            first, rest = self._first_item(conn.sock, decoder, time.monotonic() + self.handshake_timeout)
        except OSError:  # the peer vanished mid-handshake
            first, rest = None, []
        with self._waiting_lock:
            if conn not in self._waiting:  # dropped to make room: its frame may be cut short
                return
            self._waiting.remove(conn)  # from here on it can't be dropped
        refusal = self._authenticate(first, conn)
        if refusal is None:
            refusal = self._claim(conn)
        if refusal is not None:
            logger.warning("refused a connection: %s", refusal.code)
            conn.send(refusal.to_message())
            conn.close()
            return
        conn.sock.settimeout(SEND_TIMEOUT_S)
        with self._device_lock:
            conn.send(message("ready", **self.ready_info, **(self.device_info or {})))
            conn.ready_sent = True
        conn.last_heard = time.monotonic()  # its heartbeats count from here: nothing was read before
        logger.info("client connected")
        self._read_loop(conn, decoder, rest)
        logger.info("client disconnected")
        self.client_left(conn)

    def client_left(self, conn: Connection) -> None:
        """The owner's connection ended: a client-started worker ends with it (serve.py's waits)."""
        self.stop("the client disconnected")

    def _first_item(
        self, sock: socket.socket, decoder: FrameDecoder, deadline: float
    ) -> tuple[bytes | ProtocolError | None, list]:
        """The first frame (or None on EOF or at the deadline) and any frames that came with it."""
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return None, []
            try:
                sock.settimeout(left)
                data = sock.recv(65536)
            except OSError:
                return None, []
            if not data:
                return None, []
            items = decoder.feed(data)
            if items:
                return items[0], items[1:]

    def _authenticate(self, first: bytes | ProtocolError | None, conn: Connection) -> ProtocolError | None:
        if first is None:
            return ProtocolError("not_authenticated", "No hello arrived in time.", "Send hello first.")
        if isinstance(first, ProtocolError):
            return first
        try:
            msg = decode(first, CLIENT_MESSAGES)
        except ProtocolError as exc:
            return exc
        if msg["type"] != "hello":
            return ProtocolError(
                "not_authenticated",
                f"The first message must be hello (with the token), not {msg['type']}.",
                "Connect through dit360_blender.client, which sends the token.",
            )
        # surrogatepass: a token with a lone surrogate is merely wrong, not a crash of this thread
        if not hmac.compare_digest(msg["token"].encode("utf-8", "surrogatepass"), self.token):
            return ProtocolError(
                "unauthorized",
                "Wrong token: this worker only serves the client that started it.",
                "Let the add-on start its own worker.",
            )
        if msg.get("heartbeat", 0) > 0:
            conn.heartbeat = float(msg["heartbeat"])
        return None

    def _claim(self, conn: Connection) -> ProtocolError | None:
        with self._owner_lock:
            if self.owner is not None or self._stopping.is_set():
                return ProtocolError("busy", "This worker already has a client.", "Start another worker.")
            self.owner = conn
        return None

    def _read_loop(self, conn: Connection, decoder: FrameDecoder, items: list) -> None:
        while True:
            for item in items:
                self._dispatch(conn, item)
            try:
                data = conn.sock.recv(65536)
            except TimeoutError:
                items = []
                continue
            except OSError:
                return
            if not data:
                return
            conn.last_heard = time.monotonic()
            items = decoder.feed(data)

    # -- messages --------------------------------------------------------------------------------

    def _dispatch(self, conn: Connection, item: bytes | ProtocolError) -> None:
        """Handle one frame; whatever it is, reply or act, never raise."""
        try:
            if isinstance(item, ProtocolError):
                raise item
            msg = decode(item, CLIENT_MESSAGES)
            handler = self._on_job if msg["type"] in JOB_KINDS else getattr(self, f"_on_{msg['type']}", None)
            if handler is None:  # the file transfers of a serving worker (worker/serve.py)
                raise ProtocolError(
                    "unknown_type",
                    f"{msg['type']} is for a remote worker (--serve); this one shares its client's files.",
                    "Read the files from the paths in the result.",
                )
            handler(conn, msg)
        except ProtocolError as exc:
            logger.warning("refused a message: %s: %s", exc.code, exc.message)
            conn.send(exc.to_message())
        except Exception as exc:
            logger.exception("failed to handle a message")
            conn.send(
                error("internal", f"The worker could not handle that message: {exc}", "See the worker log.")
            )

    def _on_hello(self, conn: Connection, msg: dict) -> None:
        raise ProtocolError("bad_message", "Already authenticated: hello is only the first message.")

    def _on_job(self, conn: Connection, msg: dict) -> None:
        """Any job kind (`generate`, `edit`, ...): its params checked for its kind, then queued."""
        job_id, kind = msg["job_id"], msg["type"]
        if self.queue.known(job_id):
            raise ProtocolError(
                "bad_message", f"Job id {job_id} is already queued or running.", "Use a new id."
            )
        try:
            params = check_job_params(kind, msg["params"])
        except ProtocolError as exc:
            conn.send(exc.to_message(job_id))
            return
        if self._start_failure is not None:
            conn.send(error("worker_start_failed", *self._start_failure, job_id=job_id))
            return
        if self._stopping.is_set():
            conn.send(error("cancelled", "The worker is shutting down.", "Submit again.", job_id=job_id))
            return

        def announce(position: int) -> None:
            conn.send(message("queued", job_id=job_id, position=position))

        if not self.queue.put(QueuedJob(job_id, params, kind=kind), announce):
            conn.send(
                error(
                    "busy", f"The worker already has {MAX_QUEUED_JOBS} jobs waiting.",
                    "Submit it again when some have finished (or cancel some).", job_id=job_id,
                )
            )  # fmt: skip

    def _on_cancel(self, conn: Connection, msg: dict) -> None:
        job_id = msg["job_id"]
        found = self.queue.cancel(job_id)
        if found is None:
            conn.send(
                error(
                    "unknown_job", f"No job {job_id} is running or queued.", "It may have just finished.",
                    details={"job_id": job_id},
                )
            )  # fmt: skip
        elif found[0] == "queued":
            details = {"step": 0, "cancel_step": 0}
            conn.send(error("cancelled", "Cancelled before it started.", "", job_id=job_id, details=details))
        # a running job sends its own final `error` (code cancelled) when it stops

    def _on_status(self, conn: Connection, msg: dict) -> None:
        running, queued = self.queue.snapshot()
        conn.send(
            message(
                "status", running=running, queued=queued, loads=self.cache.loads if self.cache else 0,
                model_loaded=self.cache is not None and self.cache.pipe is not None, pid=os.getpid(),
                rss_bytes=rss_bytes(),
            )
        )  # fmt: skip

    def _on_ping(self, conn: Connection, msg: dict) -> None:
        conn.send(message("pong"))  # from this reader thread: a busy job thread doesn't delay it

    def _on_shutdown(self, conn: Connection, msg: dict) -> None:
        self.stop("shutdown requested")

    def send(self, msg: dict) -> None:
        """To the owner, if connected (events produced before it connects or after it left are dropped)."""
        owner = self.owner
        if owner is not None:
            owner.send(msg)

    # -- life cycle ------------------------------------------------------------------------------

    def start_jobs(self, log_path: Path) -> None:
        """Import torch and the pipeline (slow: seconds; the client may be connected already and
        queueing jobs), then tell the client which device they run on (the `device` event)."""
        from .jobs import JobRunner, ModelCache

        device = device_fields()
        self.cache = ModelCache()
        self.runner = JobRunner(self.send, self.cache, log_path)
        with self._device_lock:
            self.device_info = device
            owner = self.owner
            if owner is not None and owner.ready_sent:  # else its `ready` will carry the fields
                owner.send(message("device", **device))

    def fail_start(self, exc: BaseException) -> None:
        """`start_jobs` failed (a broken torch install, no usable device): the client hears why in
        a fatal `error`, and so does every job it queued, before the worker exits."""
        text = f"The worker could not load torch and the pipeline: {type(exc).__name__}: {exc}"
        hint = "Run Install Dependencies in the add-on's preferences again; the worker log has the details."
        self._start_failure = (text, hint)  # a job that arrives from now on is answered with it
        for job in self.queue.stop():
            self.send(error("worker_start_failed", text, hint, job_id=job.job_id))
        self.send(error("worker_start_failed", text, hint, fatal=True))

    def stop(self, reason: str) -> None:
        """Cancel the running job, drop the queue, and make `run_jobs` return; a job that does not
        stop within STOP_GRACE_S is cut short by a hard exit."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        logger.info("stopping: %s", reason)
        for job in self.queue.stop():
            self.send(error("cancelled", "The worker is shutting down.", "Submit again.", job_id=job.job_id))
        timer = threading.Timer(STOP_GRACE_S, hard_exit, args=(0, "the running job did not stop in time"))
        timer.daemon = True
        timer.start()

    def run_jobs(self) -> int:
        while (job := self.queue.take()) is not None:
            ok = self.runner.run(job)
            self.queue.done(job)
            if not ok:
                self.stop("a GPU failure left the device unusable")
        if self.owner is not None:
            self.owner.close()
        if self._server is not None:
            self._server.close()
        return 0

    def watch(self, parent_pid: int | None) -> None:
        """Exit when the parent dies, when no client authenticated in time, or when the client went silent."""
        alive = parent_watch(parent_pid) if parent_pid else (lambda: True)

        def loop() -> None:
            while True:
                time.sleep(WATCH_INTERVAL_S)
                if not alive():
                    hard_exit(0, f"the parent process {parent_pid} is gone")
                now = time.monotonic()
                if self.owner is None and now - self._started > self.accept_timeout:
                    hard_exit(0, "no client connected in time")
                if self.owner is not None and self.owner.silent_too_long(now):
                    self.stop("the client sent no heartbeat in time")

        threading.Thread(target=loop, name="watchdog", daemon=True).start()
