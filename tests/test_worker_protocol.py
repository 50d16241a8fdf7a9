"""The worker's socket, spoken to raw: bad frames and intruders are refused with an `error`, and the
authenticated client keeps being served; the worker exits when its parent or its client goes."""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dit360_blender.protocol import (
    MAX_MESSAGE_BYTES,
    PORT_ANNOUNCE,
    TOKEN_ENV,
    FrameDecoder,
    decode,
    encode,
    message,
)
from dit360_blender.protocol import WORKER_MESSAGES as WM

ROOT = Path(__file__).resolve().parents[1]
HANDSHAKE_S = 1.5  # the worker's --handshake-timeout in these tests (default 10 s)


class Raw:
    """A bare connection: send bytes, read decoded messages."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.decoder = FrameDecoder()
        self.pending: list = []

    def send(self, data: bytes | dict) -> None:
        self.sock.sendall(encode(data) if isinstance(data, dict) else data)

    def recv(self, timeout: float = 30.0) -> dict | None:
        """The next message, None on EOF."""
        deadline = time.monotonic() + timeout
        while not self.pending:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            data = self.sock.recv(65536)
            if not data:
                return None
            self.pending += self.decoder.feed(data)
        return decode(self.pending.pop(0), WM)

    def recv_type(self, type_: str | tuple[str, ...]) -> dict:
        """The next message, which must be of `type_` (or one of them); skips `log` lines (the
        worker forwards notable log records)."""
        wanted = (type_,) if isinstance(type_, str) else type_
        while True:
            msg = self.recv()
            assert msg is not None, "connection closed"
            if msg["type"] != "log":
                assert msg["type"] in wanted, msg
                return msg

    def close(self) -> None:
        self.sock.close()


def spawn_worker(
    log_dir: Path, parent_pid: int | None, token: str | None
) -> tuple[subprocess.Popen, int | None]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop(TOKEN_ENV, None)
    if token is not None:
        env[TOKEN_ENV] = token
    cmd = [
        sys.executable,
        "-m",
        "dit360_blender.worker",
        "--log-dir",
        str(log_dir),
        "--handshake-timeout",
        str(HANDSHAKE_S),
    ]
    if parent_pid is not None:
        cmd += ["--parent-pid", str(parent_pid)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=log_dir)
    line = proc.stdout.readline().decode()
    port = int(line.split()[1]) if line.startswith(PORT_ANNOUNCE) else None
    return proc, port


def authenticate(port: int, token: str) -> Raw:
    conn = Raw(port)
    conn.send(message("hello", token=token))
    ready = conn.recv_type("ready")
    assert ready["protocol"] == 1
    if "device" not in ready:  # torch was still loading: its `device` event comes next, once
        assert conn.recv_type("device")["device"] == "cpu"
    return conn


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    token = secrets.token_urlsafe(32)
    proc, port = spawn_worker(tmp_path_factory.mktemp("raw-logs"), os.getpid(), token)
    conn = authenticate(port, token)
    yield proc, port, token, conn
    conn.close()
    try:
        proc.wait(timeout=10)
    finally:
        proc.kill()


def still_served(conn: Raw) -> None:
    conn.send(message("status"))
    assert conn.recv_type("status")["pid"] > 0


@pytest.mark.parametrize(
    "frame, code",
    [
        (b"{this is not json\n", "bad_message"),
        (b"\xff\xfe\xfd\n", "bad_message"),
        (b"[1, 2, 3]\n", "bad_message"),
        (b'{"v": 1, "type": "format_disk"}\n', "unknown_type"),
        (b'{"v": 99, "type": "status"}\n', "version_mismatch"),
        (b'{"type": "status"}\n', "version_mismatch"),
        (b'{"v": 1, "type": "cancel"}\n', "bad_message"),
        (b'{"v": 1, "type": "generate", "job_id": "x/../y", "params": {}}\n', "bad_message"),
        (b'{"v": 1, "type": "hello", "token": "again"}\n', "bad_message"),
    ],
)
def test_bad_frames_get_an_error_and_the_client_is_still_served(worker, frame, code):
    _, _, _, conn = worker
    conn.send(frame)
    reply = conn.recv_type("error")
    assert reply["code"] == code and reply["job_id"] is None and reply["message"]
    still_served(conn)


def test_an_oversized_frame_is_refused_once(worker):
    _, _, _, conn = worker
    conn.send(b'{"v": 1, "type": "status", "pad": "' + b"x" * (2 * MAX_MESSAGE_BYTES) + b'"}\n')
    reply = conn.recv_type("error")
    assert reply["code"] == "message_too_large"
    still_served(conn)  # the next message after the oversized one is read normally


def test_bad_generate_params_name_the_job(worker):
    _, _, _, conn = worker
    conn.send(message("generate", job_id="job-7", params={"prompt": "p", "output_dir": "rel/out"}))
    reply = conn.recv_type("error")
    assert reply["code"] == "bad_parameters" and reply["job_id"] == "job-7" and reply["hint"]
    conn.send(message("cancel", job_id="nope"))
    assert conn.recv_type("error")["code"] == "unknown_job"
    still_served(conn)


@pytest.mark.parametrize(
    "first, code",
    [
        (lambda tok: encode(message("hello", token=tok + "x")), "unauthorized"),
        (lambda tok: encode(message("hello", token="")), "unauthorized"),
        (lambda tok: encode(message("status")), "not_authenticated"),
        (lambda tok: encode({"v": 0, "type": "hello", "token": tok}), "version_mismatch"),
        (lambda tok: b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", "bad_message"),
        (lambda tok: b"x" * (MAX_MESSAGE_BYTES + 10), "message_too_large"),
        (lambda tok: encode(message("hello", token=tok)), "busy"),  # right token, but not the first client
    ],
)
def test_intruders_are_refused_and_disconnected(worker, first, code):
    _, port, token, conn = worker
    other = Raw(port)
    try:
        other.send(first(token))
        reply = other.recv()
        assert reply is not None and reply["type"] == "error" and reply["code"] == code
        assert other.recv(timeout=10) is None  # closed by the worker
    finally:
        other.close()
    still_served(conn)


def test_silent_connection_is_dropped_after_the_handshake_timeout(worker):
    _, port, _, conn = worker
    other = Raw(port)
    t0 = time.monotonic()
    reply = other.recv(timeout=HANDSHAKE_S + 10)
    assert reply is not None and reply["code"] == "not_authenticated"
    assert time.monotonic() - t0 >= HANDSHAKE_S - 0.5
    assert other.recv(timeout=5) is None
    other.close()
    still_served(conn)


def test_token_is_not_in_argv(worker):
    proc, _, token, _ = worker
    with open(f"/proc/{proc.pid}/cmdline", "rb") as f:
        assert token.encode() not in f.read()


def test_log_has_no_token(worker):
    proc, _, token, _ = worker
    log = Path(f"/proc/{proc.pid}/cwd").resolve() / "worker.log"
    text = log.read_text(encoding="utf-8")
    assert "refused a connection: unauthorized" in text and token not in text


def test_client_disconnect_stops_the_worker(worker):
    proc, _, _, conn = worker
    conn.close()
    t0 = time.monotonic()
    assert proc.wait(timeout=10) == 0
    print(f"\nexit after client disconnect: {time.monotonic() - t0:.2f} s")


# -- process life ----------------------------------------------------------------------------------


def test_no_token_no_worker(tmp_path):
    proc, port = spawn_worker(tmp_path, None, None)
    assert port is None and proc.wait(timeout=30) == 2
    assert TOKEN_ENV in proc.stderr.read().decode()


def test_worker_exits_when_its_parent_dies_even_with_a_client_connected(tmp_path):
    """The parent-PID watch alone (the client socket stays open here)."""
    parent = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    token = secrets.token_urlsafe(32)
    proc, port = spawn_worker(tmp_path, parent.pid, token)
    try:
        conn = authenticate(port, token)
        still_served(conn)
        parent.kill()
        parent.wait()
        t0 = time.monotonic()
        proc.wait(timeout=5)
        print(f"\nworker exit after parent death: {time.monotonic() - t0:.2f} s")
        assert "parent process" in (tmp_path / "worker.log").read_text(encoding="utf-8")
        conn.close()
    finally:
        parent.kill()
        proc.kill()
        proc.wait()
