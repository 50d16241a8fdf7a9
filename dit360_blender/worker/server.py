"""The worker process: a loopback socket server in front of the job runner.

Lifecycle: bind 127.0.0.1 on an ephemeral port, print ``DIT360_WORKER_PORT <port>`` on stdout,
import torch and the pipeline (while the client connects), answer the client's `hello` with `ready`,
then run jobs on the main thread until `shutdown`, the client's disconnect, or the parent's death.

Threads: the main thread runs jobs; one thread accepts connections; each connection is served on
its own thread (a handshake, then, for the one authenticated client, its reader loop); a watchdog
checks the parent process twice a second. Only the owner (the first connection with the right
token) gets events; any other connection is refused with an `error` and closed.
"""

from __future__ import annotations

import argparse
import hmac
import logging
import logging.handlers
import os
import platform
import socket
import sys
import threading
import time
from pathlib import Path

from ..protocol import (
    CLIENT_MESSAGES,
    PORT_ANNOUNCE,
    PROTOCOL_VERSION,
    TOKEN_ENV,
    FrameDecoder,
    ProtocolError,
    check_generate_params,
    decode,
    encode,
    error,
    message,
)
from .jobqueue import Job, JobQueue
from .parent import parent_watch

logger = logging.getLogger("dit360_blender.worker")

HANDSHAKE_TIMEOUT_S = 10.0  # a connection must say hello within this
SEND_TIMEOUT_S = 30.0  # a client that stops reading this long is treated as gone
STOP_GRACE_S = 10.0  # after shutdown, the running job gets this long to stop before a hard exit
WATCH_INTERVAL_S = 0.5  # parent check period (the issue asks for at least once a second)
MAX_HANDSHAKES = 8  # concurrent unauthenticated connections; more are dropped at once
LOG_MAX_BYTES = 5 * 1024 * 1024
SECRET_ENVS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")


class Connection:
    """A socket with a send lock (the job thread and the reader thread both send) and secret scrubbing."""

    def __init__(self, sock: socket.socket, secrets: list[bytes]) -> None:
        self.sock = sock
        self.secrets = secrets
        self.closed = False
        self._lock = threading.Lock()

    def send(self, msg: dict) -> bool:
        try:
            data = encode(msg)
        except ProtocolError as exc:
            logger.warning("not sent: %s", exc.message)
            return False
        for secret in self.secrets:
            data = data.replace(secret, b"***")
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


class Worker:
    """The socket side of the worker: connections, authentication, message dispatch, life cycle."""

    def __init__(
        self,
        token: str,
        secrets: list[bytes],
        accept_timeout: float,
        handshake_timeout: float = HANDSHAKE_TIMEOUT_S,
    ) -> None:
        self.token = token.encode("utf-8")
        self.handshake_timeout = handshake_timeout
        self.secrets = secrets
        self.accept_timeout = accept_timeout
        self.queue = JobQueue()
        self.runner = None  # a jobs.JobRunner, set by `start_runtime` (it needs torch)
        self.cache = None
        self.owner: Connection | None = None
        self.runtime: dict | None = None
        self._owner_lock = threading.Lock()
        self._ready = threading.Event()
        self._stopping = threading.Event()
        self._handshakes = threading.BoundedSemaphore(MAX_HANDSHAKES)
        self._server: socket.socket | None = None
        self._started = time.monotonic()

    # -- sockets ---------------------------------------------------------------------------------

    def listen(self) -> int:
        """Bind 127.0.0.1:0 (loopback only) and return the port."""
        server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if hasattr(socket, "SO_EXCLUSIVEADDRUSE"):  # Windows: no other process may bind our port
            server.setsockopt(socket.SOL_SOCKET, socket.SO_EXCLUSIVEADDRUSE, 1)
        server.bind(("127.0.0.1", 0))
        server.listen(MAX_HANDSHAKES)
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
            if not self._handshakes.acquire(blocking=False):
                sock.close()
                continue
            threading.Thread(target=self._serve, args=(sock,), name="connection", daemon=True).start()

    def _serve(self, sock: socket.socket) -> None:
        conn = Connection(sock, self.secrets)
        decoder = FrameDecoder()
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.settimeout(self.handshake_timeout)
            first, rest = self._first_item(sock, decoder)
            refusal = self._authenticate(first)
            if refusal is None:
                refusal = self._claim(conn)
        except OSError:  # the peer vanished mid-handshake
            conn.close()
            return
        finally:
            self._handshakes.release()
        if refusal is not None:
            logger.warning("refused a connection: %s", refusal.code)
            conn.send(refusal.to_message())
            conn.close()
            return
        sock.settimeout(SEND_TIMEOUT_S)
        self._ready.wait()
        conn.send(message("ready", **(self.runtime or {})))
        logger.info("client connected")
        self._read_loop(conn, decoder, rest)
        logger.info("client disconnected")
        self.stop("the client disconnected")

    def _first_item(
        self, sock: socket.socket, decoder: FrameDecoder
    ) -> tuple[bytes | ProtocolError | None, list]:
        """The first frame (or None on EOF / timeout) and any frames that came with it."""
        while True:
            try:
                data = sock.recv(65536)
            except OSError:
                return None, []
            if not data:
                return None, []
            items = decoder.feed(data)
            if items:
                return items[0], items[1:]

    def _authenticate(self, first: bytes | ProtocolError | None) -> ProtocolError | None:
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
        if not hmac.compare_digest(msg["token"].encode("utf-8"), self.token):
            return ProtocolError(
                "unauthorized",
                "Wrong token: this worker only serves the client that started it.",
                "Let the add-on start its own worker.",
            )
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
            items = decoder.feed(data)

    # -- messages --------------------------------------------------------------------------------

    def _dispatch(self, conn: Connection, item: bytes | ProtocolError) -> None:
        """Handle one frame; whatever it is, reply or act, never raise."""
        try:
            if isinstance(item, ProtocolError):
                raise item
            msg = decode(item, CLIENT_MESSAGES)
            handler = getattr(self, f"_on_{msg['type']}")
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

    def _on_generate(self, conn: Connection, msg: dict) -> None:
        job_id = msg["job_id"]
        if self.queue.known(job_id):
            raise ProtocolError(
                "bad_message", f"Job id {job_id} is already queued or running.", "Use a new id."
            )
        try:
            params = check_generate_params(msg["params"])
        except ProtocolError as exc:
            conn.send(exc.to_message(job_id))
            return
        if self._stopping.is_set():
            conn.send(error("cancelled", "The worker is shutting down.", "Submit again.", job_id=job_id))
            return
        self.queue.put(
            Job(job_id, params), lambda pos: conn.send(message("queued", job_id=job_id, position=pos))
        )

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
                "status", running=running, queued=queued, loads=self.cache.loads,
                model_loaded=self.cache.pipe is not None, pid=os.getpid(), rss_bytes=rss_bytes(),
            )
        )  # fmt: skip

    def _on_shutdown(self, conn: Connection, msg: dict) -> None:
        self.stop("shutdown requested")

    def send(self, msg: dict) -> None:
        """To the owner, if connected (events produced before it connects or after it left are dropped)."""
        owner = self.owner
        if owner is not None:
            owner.send(msg)

    # -- life cycle ------------------------------------------------------------------------------

    def start_runtime(self, log_path: Path) -> None:
        """Import torch and the pipeline (slow: seconds), then let the waiting client in."""
        from .jobs import JobRunner, ModelCache

        self.runtime = runtime_info()
        self.cache = ModelCache()
        self.runner = JobRunner(self.send, self.cache, log_path)
        self._ready.set()

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
        """Exit when the parent dies, or when no client authenticated in time."""
        alive = parent_watch(parent_pid) if parent_pid else (lambda: True)

        def loop() -> None:
            while True:
                time.sleep(WATCH_INTERVAL_S)
                if not alive():
                    hard_exit(0, f"the parent process {parent_pid} is gone")
                if self.owner is None and time.monotonic() - self._started > self.accept_timeout:
                    hard_exit(0, "no client connected in time")

        threading.Thread(target=loop, name="watchdog", daemon=True).start()


# ----------------------------------------------------------------------------------------------
# Process-level helpers


def hard_exit(code: int, reason: str) -> None:
    """Leave now, whatever the job is doing: the process's memory (and VRAM) goes with it."""
    logger.warning("exiting: %s", reason)
    for handler in logging.getLogger().handlers:
        try:
            handler.flush()
        except Exception:
            pass
    os._exit(code)


def rss_bytes() -> int | None:
    """Resident memory of this process (Linux and Windows; None elsewhere)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        pass
    if sys.platform == "win32":
        return _windows_rss()
    return None


def _windows_rss() -> int | None:
    import ctypes
    from ctypes import wintypes

    class Counters(ctypes.Structure):
        _fields_ = [("cb", wintypes.DWORD), ("PageFaultCount", wintypes.DWORD)] + [
            (name, ctypes.c_size_t)
            for name in (
                "PeakWorkingSetSize", "WorkingSetSize", "QuotaPeakPagedPoolUsage", "QuotaPagedPoolUsage",
                "QuotaPeakNonPagedPoolUsage", "QuotaNonPagedPoolUsage", "PagefileUsage", "PeakPagefileUsage",
            )
        ]  # fmt: skip

    counters = Counters()
    counters.cb = ctypes.sizeof(Counters)
    kernel32 = ctypes.WinDLL("kernel32")
    kernel32.GetCurrentProcess.restype = wintypes.HANDLE
    kernel32.K32GetProcessMemoryInfo.argtypes = [wintypes.HANDLE, ctypes.c_void_p, wintypes.DWORD]
    kernel32.K32GetProcessMemoryInfo.restype = wintypes.BOOL
    ok = kernel32.K32GetProcessMemoryInfo(kernel32.GetCurrentProcess(), ctypes.byref(counters), counters.cb)
    return int(counters.WorkingSetSize) if ok else None


class ScrubbingFormatter(logging.Formatter):
    """Formats, then blanks out secrets (tokens), tracebacks included."""

    def __init__(self, fmt: str, secrets: list[str]) -> None:
        super().__init__(fmt)
        self.secrets = [s for s in secrets if s]

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        for secret in self.secrets:
            text = text.replace(secret, "***")
        return text


class _MessageOnly(ScrubbingFormatter):
    """The message alone: tracebacks stay in the log file, not in events."""

    def __init__(self, secrets: list[str]) -> None:
        super().__init__("%(message)s", secrets)

    def formatException(self, ei) -> str:
        return ""

    def format(self, record: logging.LogRecord) -> str:
        record = logging.makeLogRecord({**record.__dict__, "exc_info": None, "exc_text": None})
        return super().format(record)


class ClientLogHandler(logging.Handler):
    """Forwards notable log lines to the client as `log` events: warnings from anywhere, info from us."""

    def __init__(self, send, secrets: list[str]) -> None:
        super().__init__(logging.INFO)
        self.send = send
        self.setFormatter(_MessageOnly(secrets))
        self._local = threading.local()

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno < logging.WARNING and not record.name.startswith("dit360_blender"):
            return
        if getattr(self._local, "busy", False):  # a failing send must not log itself in a loop
            return
        self._local.busy = True
        try:
            text = self.format(record)
            self.send(message("log", level=record.levelname.lower(), message=text[:4000]))
        except Exception:
            pass
        finally:
            self._local.busy = False


def setup_logging(log_dir: Path, secrets: list[str]) -> Path:
    """`<log_dir>/worker.log` (rotated at 5 MB, one backup) plus warnings on stderr."""
    log_dir.mkdir(parents=True, exist_ok=True)
    path = log_dir / "worker.log"
    fmt = "%(asctime)s pid %(process)d %(threadName)s %(levelname)s %(name)s: %(message)s"
    file_handler = logging.handlers.RotatingFileHandler(
        path, maxBytes=LOG_MAX_BYTES, backupCount=1, encoding="utf-8"
    )
    file_handler.setFormatter(ScrubbingFormatter(fmt, secrets))
    err_handler = logging.StreamHandler(sys.stderr)
    err_handler.setLevel(logging.WARNING)
    err_handler.setFormatter(ScrubbingFormatter(fmt, secrets))
    root = logging.getLogger()
    root.handlers[:] = [file_handler, err_handler]
    root.setLevel(logging.INFO)
    logging.captureWarnings(True)
    return path


def runtime_info() -> dict:
    """What `ready` reports. Imports torch and the pipeline, so a broken install fails here, at start."""
    import torch

    from .._version import __version__
    from ..pipeline.dit360 import pick_device

    device = pick_device("auto")
    name, free = _describe(torch, device)
    return {
        "protocol": PROTOCOL_VERSION,
        "package_version": __version__,
        "torch_version": str(torch.__version__),
        "python_version": platform.python_version(),
        "device": device.type,
        "device_name": name,
        "free_vram": free,
        "pid": os.getpid(),
    }


def _describe(torch, device) -> tuple[str, int | None]:
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return torch.cuda.get_device_name(device), int(free)
    if device.type == "mps":
        return "Apple GPU (MPS)", None
    return platform.processor() or platform.machine() or "CPU", None


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m dit360_blender.worker", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--log-dir", required=True, type=Path, help="folder for worker.log")
    parser.add_argument("--parent-pid", type=int, default=None, help="exit when this process dies")
    parser.add_argument(
        "--handshake-timeout",
        type=float,
        default=HANDSHAKE_TIMEOUT_S,
        help="a connection must say hello within this (s)",
    )
    parser.add_argument(
        "--accept-timeout", type=float, default=300.0, help="exit if no client authenticates within this (s)"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    token = os.environ.pop(TOKEN_ENV, "")  # not inherited by anything this process starts
    if len(token) < 16:
        print(f"{TOKEN_ENV} is not set: the worker is started by dit360_blender.client.", file=sys.stderr)
        return 2
    secrets = [token] + [os.environ[k].strip() for k in SECRET_ENVS if os.environ.get(k, "").strip()]
    log_path = setup_logging(args.log_dir, secrets)
    logger.info(
        "worker starting (pid %d, parent %s, python %s, package %s)",
        os.getpid(), args.parent_pid, sys.executable, Path(__file__).resolve().parents[1],
    )  # fmt: skip
    try:
        worker = Worker(
            token, [s.encode("utf-8") for s in secrets], args.accept_timeout, args.handshake_timeout
        )
        port = worker.listen()
    except BaseException:
        logger.exception("the worker could not start")
        return _finish(3)
    worker.watch(args.parent_pid)
    print(f"{PORT_ANNOUNCE} {port}", flush=True)  # the client connects while torch is imported
    logging.getLogger().addHandler(ClientLogHandler(worker.send, secrets))
    try:
        worker.start_runtime(log_path)
        code = worker.run_jobs()
    except BaseException:
        logger.exception("the worker failed")
        code = 3
    return _finish(code)


def _finish(code: int) -> int:
    """Skip interpreter teardown (daemon threads blocked in sockets, CUDA finalisers): flush and go."""
    logger.info("worker exiting (code %d)", code)
    logging.shutdown()
    os._exit(code)
