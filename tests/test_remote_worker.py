"""A remote worker (issue 16) on loopback, with real processes and sockets.

The "remote" worker is a separate process, ``python -m dit360_blender.worker --serve``, with a folder
tree of its own (its log, job and upload folders, its token file; its models are the tiny set);
the client reaches it through a TCP forwarder standing in for the SSH tunnel (tcp_forwarder.py),
or through the add-on's own tunnel runner with a fake ``ssh`` on PATH that runs that forwarder.

The client shares no file with the worker: an audit hook (sys.addaudithook) records every path
this test process opens, lists, creates, renames or removes while the client works, and each test
asserts that none lies in the worker's tree or its models (the test itself looks there only with
the hook paused, as the worker's own machine would). The token file is copied over first, as a user
copies it with scp.

One worker serves the module; tests run in file order.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tcp_forwarder import Forwarder

from dit360_blender.client import Job, JobError, WorkerError
from dit360_blender.protocol import FINAL_TYPES, MAX_UPLOAD_BYTES, WORKER_MESSAGES, decode, encode, message
from dit360_blender.remote_client import RemoteSpec, RemoteWorkerClient, read_token
from dit360_blender.transfer import chunk_fields, sha256_file
from dit360_blender.worker.serve_main import SERVING_LINE, TOKEN_LINE

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "This is a panorama. A harbour at dawn, fishing boats."

# -- the audit: no path of the worker's side is touched by this process while the client works ------

_AUDIT = {"on": False, "forbidden": (), "hits": []}
_PATH_EVENTS = {
    "open", "os.listdir", "os.scandir", "os.remove", "os.rename", "os.mkdir", "os.rmdir", "shutil.rmtree",
    "os.chmod", "os.truncate", "os.utime", "shutil.copyfile", "os.link", "os.symlink",
}  # fmt: skip


def _audit(event: str, args: tuple) -> None:
    if not _AUDIT["on"] or event not in _PATH_EVENTS:
        return
    for arg in args[:2]:
        if isinstance(arg, (str, bytes, os.PathLike)):
            path = os.path.abspath(os.fsdecode(arg))
            if any(path == f or path.startswith(f + os.sep) for f in _AUDIT["forbidden"]):
                _AUDIT["hits"].append((event, path))


sys.addaudithook(_audit)  # can't be removed: it does nothing unless _AUDIT["on"]


@contextlib.contextmanager
def unaudited():
    """The test looking at the worker's machine (never the client)."""
    was, _AUDIT["on"] = _AUDIT["on"], False
    try:
        yield
    finally:
        _AUDIT["on"] = was


@pytest.fixture(autouse=True)
def no_worker_paths(remote):
    _AUDIT["hits"].clear()
    _AUDIT["on"] = True
    yield
    _AUDIT["on"] = False
    assert _AUDIT["hits"] == [], f"the client touched the worker's files: {_AUDIT['hits'][:5]}"


# -- the remote machine and the tunnel --------------------------------------------------------------


class Remote:
    def __init__(self, tree: Path, proc: subprocess.Popen, port: int, token_file: Path, models: Path) -> None:
        self.tree, self.proc, self.port, self.token_file, self.models = tree, proc, port, token_file, models

    @property
    def log(self) -> str:
        with unaudited():
            return (self.tree / "root" / "worker.log").read_text(encoding="utf-8", errors="replace")

    def runs(self, job_id: str) -> int:
        """How often the worker ran the job to its end (its log says so once per run)."""
        return self.log.count(f"job {job_id} done in")

    def job_folders(self) -> list[str]:
        with unaudited():
            return sorted(p.name for p in (self.tree / "root" / "jobs").iterdir())


def start_remote(tree: Path, models: Path, python: Path | str = sys.executable) -> Remote:
    """`python -m dit360_blender.worker --serve` with its own folder tree under `tree`."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    cmd = [
        str(python), "-m", "dit360_blender.worker", "--serve", "--port", "0", "--log-dir", str(tree / "root"),
        "--token-file", str(tree / "home" / "worker.token"), "--models-dir", str(models),
    ]  # fmt: skip
    with open(tree / "stderr.txt", "wb") as err:
        proc = subprocess.Popen(cmd, env=env, cwd=tree, stdout=subprocess.PIPE, stderr=err)
    lines = []
    while True:
        line = proc.stdout.readline().decode()
        assert line, f"the worker ended: {lines} {(tree / 'stderr.txt').read_text()}"
        lines.append(line)
        if line.startswith(SERVING_LINE):
            break
    port = int(line.split(":")[-1])
    token_file = Path(next(x for x in lines if x.startswith(TOKEN_LINE)).split(" ", 1)[1].strip())
    assert token_file == tree / "home" / "worker.token"
    assert token_file.stat().st_mode & 0o777 == 0o600
    token = token_file.read_text().strip()
    assert any(token in x for x in lines)  # printed for the user
    return Remote(tree, proc, port, token_file, models)


@pytest.fixture(scope="module")
def remote(tmp_path_factory, tiny_models):
    models = Path(tiny_models["root"]).absolute()
    r = start_remote(tmp_path_factory.mktemp("remote-machine"), models)
    _AUDIT["forbidden"] = (str(r.tree), str(models))
    yield r
    r.proc.terminate()
    r.proc.wait(10)


@pytest.fixture(scope="module")
def local(tmp_path_factory, remote):
    """The artist's machine: its own folder, the token file copied over (scp)."""
    home = tmp_path_factory.mktemp("artist-machine")
    shutil.copy(remote.token_file, home / "gpu-box.token")
    (home / "gpu-box.token").chmod(0o600)
    return home


@pytest.fixture(scope="module")
def tunnel(remote):
    fwd = Forwarder(remote.port)
    yield fwd
    fwd.close()


@pytest.fixture(scope="module")
def client(local, tunnel):
    spec = RemoteSpec(token_file=local / "gpu-box.token", address=f"127.0.0.1:{tunnel.port}")
    c = RemoteWorkerClient(spec, log_dir=local / "logs", heartbeat_timeout=10.0, reconnect_window=30.0)
    yield c
    c.close()


def job(local: Path, **over) -> Job:
    fields = dict(
        prompt=PROMPT, output_dir=local / "renders", seed=5, steps=1, width=32, height=16, device="cpu",
        dtype="fp32", hdr=False, preview_every=0,
    )  # fmt: skip
    fields.update(over)
    return Job(**fields)


def frames_of(tunnel: Forwarder) -> list[dict]:
    """Start recording the worker's messages through the tunnel; returns the list they go into."""
    seen: list[dict] = []

    def tap(line: bytes) -> None:
        if line.strip():
            seen.append(decode(line, WORKER_MESSAGES))

    tunnel.taps.append(tap)
    return seen


# -- tests --------------------------------------------------------------------------------------------


def test_a_whole_job_comes_back_into_the_clients_own_folder(client, local, remote, tunnel):
    seen = frames_of(tunnel)
    events = []
    try:
        result = client.run(
            job(local, steps=2, hdr=True, preview_every=1), on_event=events.append, timeout=240
        )
    finally:
        tunnel.taps.clear()
    ready = client.ready_info
    assert ready["device_name"] and ready["pid"] == remote.proc.pid  # what the preferences show
    out = local / "renders"
    assert Path(result["path"]).parent == out and Path(result["files"]["hdr"]).parent == out
    with Image.open(result["path"]) as im:
        assert im.size == (32, 16)
    # The bytes are the worker's: each local file has the size and SHA-256 the worker computed of its own.
    worker_result = next(m for m in seen if m["type"] == "result")
    declared = {f["key"]: f for f in worker_result["remote_files"]}
    assert set(declared) == {"path", *result["files"]}
    for key, local_path in [("path", result["path"]), *result["files"].items()]:
        assert sha256_file(Path(local_path)) == declared[key]["sha256"]
        assert Path(local_path).stat().st_size == declared[key]["size"]
    assert Path(worker_result["path"]).parent.parent == remote.tree / "root" / "jobs"  # its own folder
    assert result["remote_path"] == worker_result["path"] and result["metadata"]["prompt"] == PROMPT
    assert [e["step"] for e in events if e["type"] == "preview"] == [1, 2]  # previews travel as before
    receiving = [
        e for e in events if e["type"] == "progress" and (e.get("detail") or "").startswith("receiving files")
    ]
    assert receiving and all(e["stage"] == "saving" for e in receiving)
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary file left
    # The worker deleted its copies once they arrived (release)
    deadline = time.monotonic() + 5
    while result["job_id"] in remote.job_folders() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert result["job_id"] not in remote.job_folders()


def test_a_second_run_keeps_the_first_runs_files(client, local):
    first = sorted(p.name for p in (local / "renders").iterdir())
    result = client.run(job(local), timeout=240)
    assert Path(result["path"]).name not in first
    assert set(first) <= {p.name for p in (local / "renders").iterdir()}


def test_a_warm_job_ends_in_warmed_and_leaves_no_job_folder(client, local, remote):
    before = sorted(p.name for p in (local / "renders").iterdir())
    warmed = client.run(job(local, kind="warm"), timeout=240)
    assert warmed["type"] == "warmed" and warmed["model_cached"] is True  # the module's worker is loaded
    assert sorted(p.name for p in (local / "renders").iterdir()) == before  # nothing came back
    deadline = time.monotonic() + 5
    while warmed["job_id"] in remote.job_folders() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert warmed["job_id"] not in remote.job_folders()


def test_an_edit_uploads_its_source_and_mask_and_keeps_the_source_outside_the_mask(
    client, local, remote, tunnel
):
    """The edit's input files exist only on the client: they travel as checksummed uploads, and the
    worker's result keeps every source pixel far from the mask bit for bit (the edit's promise),
    which only holds if the upload arrived intact."""
    rng = np.random.default_rng(3)
    source = local / "inputs" / "harbour.png"
    source.parent.mkdir(exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (16, 32, 3), dtype=np.uint8)).save(source)
    mask = np.zeros((16, 32), np.uint8)
    mask[:, 20:28] = 255  # regenerate a band on the right
    Image.fromarray(mask).save(local / "inputs" / "mask.png")
    seen = frames_of(tunnel)
    try:
        result = client.run(
            job(local, kind="edit", source=source, mask=local / "inputs" / "mask.png", mask_kind="mask",
                strength=1.0, feather=0.0, steps=2, seed=9),
            timeout=240,
        )  # fmt: skip
    finally:
        tunnel.taps.clear()
    uploaded = [m for m in seen if m["type"] == "uploaded"]
    assert sorted(m["size"] for m in uploaded) == sorted(
        [source.stat().st_size, (local / "inputs" / "mask.png").stat().st_size]
    )
    assert Path(result["path"]).parent == local / "renders"
    worker_source = result["metadata"]["edit"]["source"]
    assert worker_source.startswith(str(remote.tree)) and worker_source != str(source)  # the worker's copy
    with Image.open(result["path"]) as im, Image.open(source) as src:
        out, before = np.asarray(im.convert("RGB")), np.asarray(src.convert("RGB"))
    assert out.shape == before.shape
    assert np.array_equal(out[:, :16], before[:, :16])  # kept bit for bit far from the mask
    assert not np.array_equal(out[:, 20:28], before[:, 20:28])  # made anew inside it
    with unaudited():  # the worker dropped the uploads when the job ended
        assert list((remote.tree / "root" / "uploads").iterdir()) == []


def test_a_dropped_tunnel_mid_job_is_reconnected_and_the_result_fetched_not_recomputed(
    client, local, remote, tunnel
):
    """The tunnel dies at the first sampling step and stays down until the worker has finished the
    job alone; the client connects again, asks for the job by id and downloads its files."""
    dropped = threading.Event()

    def drop_at_sampling(line: bytes) -> None:
        if not dropped.is_set() and b'"stage":"sampling"' in line:
            tunnel.refusing = True
            dropped.set()
            tunnel.drop()

    tunnel.taps.append(drop_at_sampling)
    try:
        job_id = client.submit(job(local, steps=3, hdr=True, seed=11))
        assert dropped.wait(120)
        deadline = time.monotonic() + 120
        while remote.runs(job_id) == 0:  # finished on the worker while nobody listened
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert client.reconnects == 0
    finally:
        tunnel.taps.clear()
        tunnel.refusing = False
    ended = wait_final(client, job_id)
    assert ended["type"] == "result", ended
    assert client.reconnects == 1
    assert remote.runs(job_id) == 1  # the model ran once
    with Image.open(ended["path"]) as im:
        assert im.size == (32, 16)
    assert Path(ended["files"]["lighting"]).is_file()


STILL_RUNNING_STEPS = 60


def test_a_job_still_running_after_a_reconnect_goes_on_live(client, local, remote, tunnel):
    """Dropped at the first step and back at once: the job was still running, its later progress
    arrives on the new connection, and it ran once."""
    dropped, after = threading.Event(), []

    def drop_once(line: bytes) -> None:
        if dropped.is_set():
            after.append(decode(line, WORKER_MESSAGES))  # what came over the new connection
        elif b'"stage":"sampling"' in line and b'"step":1,' in line:
            dropped.set()
            tunnel.drop()

    tunnel.taps.append(drop_once)
    try:
        # long enough that it is still running when the client is back (6 tiny steps could end first
        # on a loaded machine, and the fetch then rightly finds the result instead)
        job_id = client.submit(job(local, steps=STILL_RUNNING_STEPS, seed=12, preview_every=1))
        ended = wait_final(client, job_id)
    finally:
        tunnel.taps.clear()
    assert dropped.is_set() and ended["type"] == "result", ended
    assert client.reconnects == 2
    queued = [m for m in after if m["type"] == "queued" and m["job_id"] == job_id]
    assert queued, "the fetch after the reconnect found the job waiting or running"
    live = [
        m["step"]
        for m in after
        if m["type"] == "progress" and m["job_id"] == job_id and m["stage"] == "sampling"
    ]
    assert live and max(live) == STILL_RUNNING_STEPS and min(live) >= 2  # sampling went on where it was
    assert remote.runs(job_id) == 1


def test_a_damaged_chunk_is_fetched_again(client, local, tunnel):
    damaged = []

    def damage_first_chunk(line: bytes) -> bytes:
        if not damaged and line.startswith(b'{"v":1,"type":"chunk"'):
            msg = json.loads(line)
            data = msg["data"]
            msg["data"] = ("B" if data[10] != "B" else "C").join([data[:10], data[11:]])
            damaged.append(msg["name"])
            return json.dumps(msg).encode()
        return line

    seen = frames_of(tunnel)
    tunnel.mutate = damage_first_chunk
    try:
        result = client.run(job(local, seed=13, hdr=True), timeout=240)
    finally:
        tunnel.mutate = None
        tunnel.taps.clear()
    assert damaged
    declared = {f["key"]: f["sha256"] for f in next(m for m in seen if m["type"] == "result")["remote_files"]}
    assert sha256_file(Path(result["path"])) == declared["path"]
    name = damaged[0]
    assert sum(1 for m in seen if m["type"] == "chunk" and m["name"] == name and m["offset"] == 0) == 2


class Raw:
    """Another program on the artist's machine, speaking the protocol through the tunnel."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=20)
        self.buf = b""

    def send(self, msg: dict) -> None:
        self.sock.sendall(encode(msg))

    def recv(self) -> dict | None:
        while b"\n" not in self.buf:
            data = self.sock.recv(65536)
            if not data:
                return None
            self.buf += data
        line, self.buf = self.buf.split(b"\n", 1)
        return decode(line, WORKER_MESSAGES)


def test_intruders_and_bad_uploads_are_refused_while_the_first_client_works(client, local, remote, tunnel):
    job_id = client.submit(job(local, steps=4, seed=14, preview_every=1))
    # a wrong token and a second client, both through the tunnel: refused at once, clearly
    wrong = Raw(tunnel.port)
    wrong.send(message("hello", token="x" * 43))
    refusal = wrong.recv()
    assert refusal["code"] == "unauthorized" and wrong.recv() is None
    second = Raw(tunnel.port)
    second.send(message("hello", token=(local / "gpu-box.token").read_text().strip()))
    refusal = second.recv()
    assert refusal["code"] == "busy" and "another client" in refusal["message"] and second.recv() is None
    # on the first client's own connection: an upload too large, and one with a damaged chunk
    w = client._worker
    w.send(
        message("upload_begin", upload_id="big", name="huge.png", size=MAX_UPLOAD_BYTES + 1, sha256="0" * 64)
    )
    data = os.urandom(1000)
    w.send(message("upload_begin", upload_id="bad", name="mask.png", size=1000, sha256="0" * 64))
    w.send(message("upload_chunk", upload_id="bad", offset=0, **{**chunk_fields(data), "sha256": "1" * 64}))
    # a job naming the refused upload is refused with the upload's reason; an edit whose source
    # arrived but whose mask is the refused one keeps nothing of either
    seen = frames_of(tunnel)
    good = os.urandom(500)
    w.send(
        message(
            "upload_begin",
            upload_id="good",
            name="source.png",
            size=500,
            sha256=hashlib.sha256(good).hexdigest(),
        )
    )
    w.send(message("upload_chunk", upload_id="good", offset=0, **chunk_fields(good)))
    params = {
        "prompt": PROMPT,
        "output_dir": "/elsewhere",
        "source": "/client/source.png",
        "mask": "/client/mask.png",
    }
    w.send(message("edit", job_id="naming-bad", params=params, uploads={"source": "good", "mask": "bad"}))
    events = []
    ended = wait_final(client, job_id, on_event=events.append)
    assert ended["type"] == "result"
    logs = [e["message"] for e in events if e["type"] == "log"]
    assert any("Upload big refused" in m and "at most" in m for m in logs), logs
    assert any("Upload bad refused" in m and "checksum" in m for m in logs), logs
    tunnel.taps.clear()
    assert [m["type"] for m in seen if m.get("upload_id") == "good"] == ["uploaded"]
    [refused] = [m for m in seen if m.get("job_id") == "naming-bad"]
    assert refused["code"] == "bad_parameters" and "checksum" in refused["message"], refused
    assert "naming-bad" not in remote.job_folders()
    with unaudited():
        assert list((remote.tree / "root" / "uploads").iterdir()) == []
    assert client.run(job(local, seed=15), timeout=240)["type"] == "result"  # and it serves on


def wait_final(client, job_id: str, on_event=None, timeout: float = 240.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for ev in client.poll():
            if on_event is not None:
                on_event(ev)
            if ev["type"] in FINAL_TYPES and ev.get("job_id") == job_id:
                return ev
        time.sleep(0.02)
    raise AssertionError(f"job {job_id} never ended")


def test_run_raises_job_errors_as_before(client, local):
    (local / "style.safetensors").write_bytes(b"not sent")
    with pytest.raises(JobError) as caught:
        client.run(
            job(local, loras=[{"path": str(local / "style.safetensors"), "strength": 1.0}]), timeout=60
        )
    assert caught.value.code == "bad_parameters" and "LoRA" in caught.value.message


# -- the tunnel the add-on runs itself (a fake `ssh` on PATH: no SSH server can exist here) -----------

FAKE_SSH = r"""#!{python}
# Stands in for OpenSSH's client: records its arguments, then behaves as the host alias says.
import json, os, sys
args = sys.argv[1:]
with open(os.environ["FAKE_SSH_LOG"], "a") as log:
    log.write(json.dumps(args) + "\n")
alias = args[-1]
if "BatchMode=yes" not in args or "ExitOnForwardFailure=yes" not in args or args[-2] != "--":
    sys.exit("fake ssh: called without BatchMode/ExitOnForwardFailure/--")
if alias == "nowhere":
    sys.stderr.write("ssh: Could not resolve hostname nowhere: Name or service not known\n")
    sys.exit(255)
if alias == "locked":
    sys.stderr.write("artist@locked: Permission denied (publickey).\n")
    sys.exit(255)
_, local, _, remote = args[args.index("-L") + 1].split(":")
sys.path.insert(0, {tests!r})
os.execv(sys.executable, [sys.executable, {forwarder!r}, local, remote])
"""


@pytest.fixture
def fake_ssh(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    ssh = bin_dir / "ssh"
    here = Path(__file__).resolve().parent
    ssh.write_text(
        FAKE_SSH.format(python=sys.executable, tests=str(here), forwarder=str(here / "tcp_forwarder.py"))
    )
    ssh.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_SSH_LOG", str(tmp_path / "ssh-calls.jsonl"))
    return tmp_path / "ssh-calls.jsonl"


def calls(log: Path) -> list[list[str]]:
    return [json.loads(x) for x in log.read_text().splitlines()] if log.exists() else []


def test_the_client_runs_and_stops_the_ssh_tunnel_itself(client, local, remote, fake_ssh):
    client.close()  # the module's client gives up its seat (one client at a time)
    spec = RemoteSpec(token_file=local / "gpu-box.token", ssh_alias="gpu-box", remote_port=remote.port)
    c = RemoteWorkerClient(spec, log_dir=local / "logs-ssh", heartbeat_timeout=10.0)
    try:
        result = c.run(job(local, seed=21), timeout=240)
        assert Path(result["path"]).parent == local / "renders"
        tunnel = c.tunnel
        [argv] = calls(fake_ssh)
        assert argv == [
            "-N", "-T", "-o", "BatchMode=yes", "-o", "ExitOnForwardFailure=yes", "-o", "ConnectTimeout=15",
            "-o", "ServerAliveInterval=15", "-o", "ServerAliveCountMax=3",
            "-L", f"127.0.0.1:{tunnel.local_port}:127.0.0.1:{remote.port}", "--", "gpu-box",
        ]  # fmt: skip
        # the tunnel dies between jobs: the next job starts it again
        first = tunnel.proc
        first.kill()
        first.wait(5)
        result = c.run(job(local, seed=22), timeout=240)
        assert result["type"] == "result" and len(calls(fake_ssh)) == 2 and c.tunnel.proc is not first
        last = c.tunnel.proc
    finally:
        c.close()
    assert last.poll() is not None  # close() stopped the tunnel


@pytest.mark.parametrize(
    ("alias", "said", "fix"),
    [
        ("nowhere", "Could not resolve hostname nowhere", "~/.ssh/config"),
        ("locked", "Permission denied (publickey)", "ssh-agent"),
    ],
)
def test_a_failing_tunnel_says_what_ssh_said(local, remote, fake_ssh, alias, said, fix):
    spec = RemoteSpec(token_file=local / "gpu-box.token", ssh_alias=alias, remote_port=remote.port)
    c = RemoteWorkerClient(spec, log_dir=local / "logs-ssh")
    try:
        with pytest.raises(WorkerError) as caught:
            c.start(timeout=60)
    finally:
        c.close()
    assert caught.value.code == "remote_unreachable"
    assert said in caught.value.message and "exited with code 255" in caught.value.message
    assert fix in caught.value.hint and "assword" not in caught.value.hint.replace("Passwords are never", "")


def test_an_alias_that_is_an_ssh_option_is_refused_before_ssh_runs(local, fake_ssh):
    spec = RemoteSpec(token_file=local / "gpu-box.token", ssh_alias="-oProxyCommand=touch /tmp/owned")
    c = RemoteWorkerClient(spec, log_dir=local / "logs-ssh")
    try:
        with pytest.raises(WorkerError) as caught:
            c.start(timeout=10)
    finally:
        c.close()
    assert "not an SSH host" in caught.value.message and calls(fake_ssh) == []


def test_a_network_address_and_a_readable_token_file_are_refused(local, tmp_path):
    with pytest.raises(WorkerError, match="unencrypted"):
        RemoteSpec(token_file=local / "gpu-box.token", address="192.168.1.20:7860").endpoint()
    loose = tmp_path / "token"
    shutil.copy(local / "gpu-box.token", loose)
    loose.chmod(0o644)
    with pytest.raises(WorkerError, match="chmod 600"):
        read_token(loose)
    assert read_token(local / "gpu-box.token") == (local / "gpu-box.token").read_text().strip()


# -- a generate with a size: both sizes come back -----------------------------------------------------


def test_a_sized_generate_brings_back_the_upscale_and_its_native_files(tmp_path_factory, tiny_models):
    """A remote worker in the super-resolution venv (spandrel) generates 64x32 and upscales it to 4K
    with a tiny Compact x4 the client uploads: the upscale and the generated panorama both arrive,
    under one local stem (the upscale is <stem>_4k), with the worker's bytes."""
    from test_upscale_models import build_sr_model, sr_python

    tree = tmp_path_factory.mktemp("sr-remote-machine")
    model = build_sr_model(tmp_path_factory.mktemp("sr-model") / "compact_x4.pth", seed=2)
    sr_remote = start_remote(tree, Path(tiny_models["root"]).absolute(), python=sr_python())
    home = tmp_path_factory.mktemp("sr-artist-machine")
    shutil.copy(sr_remote.token_file, home / "gpu-box.token")
    (home / "gpu-box.token").chmod(0o600)
    _AUDIT["forbidden"] = (*_AUDIT["forbidden"], str(tree))
    fwd = Forwarder(sr_remote.port)
    spec = RemoteSpec(token_file=home / "gpu-box.token", address=f"127.0.0.1:{fwd.port}")
    try:
        with RemoteWorkerClient(spec, log_dir=home / "logs", heartbeat_timeout=10.0) as remote_client:
            seen = frames_of(fwd)
            sized = job(home, width=64, height=32, steps=1, size="4k", upscale_model=model)
            result = remote_client.run(sized, timeout=300)
    finally:
        fwd.close()
        sr_remote.proc.terminate()
        sr_remote.proc.wait(10)
    worker_result = next(m for m in seen if m["type"] == "result")
    declared = {f["key"]: f for f in worker_result["remote_files"]}
    assert set(declared) == {"path", "native.path"}  # no HDR asked for: the two PNGs
    native = result["native"]
    renders = home / "renders"
    assert Path(native["path"]).parent == renders and Path(result["path"]).parent == renders
    assert Path(result["path"]).name == Path(native["path"]).stem + "_4k.png"
    assert (native["width"], native["height"]) == (64, 32)
    for key, local_path in (("path", result["path"]), ("native.path", native["path"])):
        assert sha256_file(Path(local_path)) == declared[key]["sha256"]
    with Image.open(result["path"]) as big, Image.open(native["path"]) as small:
        assert big.size == (4096, 2048) and small.size == (64, 32)
    assert result["metadata"]["upscale"]["passes"] == 3 and result["metadata"]["upscale"]["width"] == 4096
