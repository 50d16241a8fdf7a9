"""The client's side of the worker's life: start, death mid-job, restart, close, parent death,
start failures, and running under the package name Blender gives the add-on."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from dit360_blender import client as client_mod
from dit360_blender import worker_process
from dit360_blender.client import Job, WorkerClient, WorkerError
from dit360_blender.protocol import TOKEN_ENV

ROOT = Path(__file__).resolve().parents[1]
POSIX = pytest.mark.skipif(
    sys.platform == "win32", reason="uses POSIX signals / shell scripts to set the scene"
)


def make_job(tiny_models, out: Path, **over) -> Job:
    fields = dict(
        prompt="This is a panorama. A red desert", output_dir=out, steps=2, width=128, height=64,
        device="cpu", dtype="fp32", preview_every=0, models_dir=tiny_models["root"],
    )  # fmt: skip
    fields.update(over)
    return Job(**fields)


def wait_for(client, predicate, timeout=60.0):
    seen = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for ev in client.poll():
            seen.append(ev)
            if predicate(ev):
                return ev, seen
        time.sleep(0.005)
    raise AssertionError(f"no matching event within {timeout} s; saw {[e['type'] for e in seen]}")


def gone(pid: int) -> bool:
    """No such process, or a zombie nobody reaped yet (it holds no memory)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except FileNotFoundError:
        return True
    return stat[stat.rfind(b")") + 2 : stat.rfind(b")") + 3] == b"Z"


# -- death, restart and close ----------------------------------------------------------------------


@POSIX
def test_kill_9_mid_job_then_a_fresh_worker_serves_the_next_job(tiny_models, tmp_path):
    client = WorkerClient(log_dir=tmp_path / "logs")
    try:
        t0 = time.monotonic()
        job_id = client.submit(make_job(tiny_models, tmp_path / "out", steps=400))
        assert time.monotonic() - t0 < 0.5  # the worker starts in the background: submit never blocks
        ready, _ = wait_for(client, lambda e: e["type"] == "ready")
        wait_for(
            client, lambda e: e.get("job_id") == job_id and e.get("stage") == "sampling" and e["step"] >= 1
        )
        first_pid = ready["pid"]
        os.kill(first_pid, signal.SIGKILL)
        t0 = time.monotonic()
        ev, _ = wait_for(client, lambda e: e.get("job_id") == job_id and e["type"] in ("result", "error"))
        latency = time.monotonic() - t0
        print(f"\nkill -9 detected after {latency * 1000:.0f} ms")
        assert ev["type"] == "error" and ev["code"] == "worker_died" and "-9" in ev["message"] and ev["hint"]
        assert latency < 2.0
        assert client.worker_pid is None and client.status() is None

        result = client.run(make_job(tiny_models, tmp_path / "out"), timeout=120)
        assert Path(result["path"]).is_file()
        assert client.worker_pid not in (None, first_pid)
    finally:
        client.close()


def test_close_sends_shutdown_and_ends_unfinished_jobs(tiny_models, tmp_path):
    client = WorkerClient(log_dir=tmp_path / "logs")
    client.start()
    proc = client._worker.proc
    running = client.submit(make_job(tiny_models, tmp_path / "out", steps=400))
    queued = client.submit(make_job(tiny_models, tmp_path / "out"))
    wait_for(client, lambda e: e.get("job_id") == running and e.get("stage") == "sampling")
    t0 = time.monotonic()
    client.close()
    print(f"\nclose() took {time.monotonic() - t0:.2f} s")
    assert proc.returncode == 0  # exited on the protocol message, not terminate()/kill()
    finals = {e["job_id"]: e for e in client.poll() if e["type"] == "error"}
    assert finals[running]["code"] == "cancelled" and finals[queued]["code"] == "cancelled"
    assert "stopping: shutdown requested" in client.log_path.read_text(encoding="utf-8")


def test_cancel_before_the_worker_is_up(tiny_models, tmp_path):
    client = WorkerClient(log_dir=tmp_path / "logs")
    try:
        job_id = client.submit(make_job(tiny_models, tmp_path / "out"))
        assert client.cancel(job_id)  # still in the client's outbox
        ev, _ = wait_for(client, lambda e: e.get("job_id") == job_id)
        assert ev["type"] == "error" and ev["code"] == "cancelled"
    finally:
        client.close()


@POSIX
def test_worker_goes_when_its_parent_is_killed(tmp_path):
    script = textwrap.dedent(
        f"""
        import sys, time
        sys.path.insert(0, {str(ROOT)!r})
        from dit360_blender.client import WorkerClient
        client = WorkerClient(log_dir={str(tmp_path / "logs")!r})
        print(client.start()["pid"], flush=True)
        time.sleep(120)
        """
    )
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        worker_pid = int(parent.stdout.readline())
        assert not gone(worker_pid)
        parent.kill()  # no close(), no atexit: as if Blender crashed
        parent.wait()
        t0 = time.monotonic()
        while not gone(worker_pid) and time.monotonic() - t0 < 5:
            time.sleep(0.02)
        print(f"\nworker gone {time.monotonic() - t0:.2f} s after its parent")
        assert gone(worker_pid)
    finally:
        parent.kill()
        parent.wait()


# -- start failures --------------------------------------------------------------------------------


@POSIX
def test_a_worker_that_dies_during_start_reports_its_stderr(tiny_models, tmp_path):
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\necho 'ModuleNotFoundError: No module named torch' >&2\nexit 7\n")
    fake.chmod(0o755)
    client = WorkerClient(python=fake, log_dir=tmp_path / "logs", handshake_timeout=20)
    job_id = client.submit(make_job(tiny_models, tmp_path / "out"))
    ev, _ = wait_for(client, lambda e: e.get("job_id") == job_id, timeout=20)
    assert ev["code"] == "worker_start_failed"
    assert "exit code 7" in ev["message"] and "No module named torch" in ev["message"]
    assert "Install" in ev["hint"]
    with pytest.raises(WorkerError) as info:
        client.start()
    assert info.value.code == "worker_start_failed"


def test_a_missing_python_is_reported(tmp_path):
    client = WorkerClient(python=tmp_path / "no-such-python", log_dir=tmp_path / "logs")
    with pytest.raises(WorkerError) as info:
        client.start()
    assert info.value.code == "worker_start_failed" and "Python" in info.value.hint


# -- how the worker is started ---------------------------------------------------------------------


def test_environment_carries_the_secrets_and_the_paths(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", "/somewhere/else")
    client = WorkerClient(vendor_dir=tmp_path / "vendor", hf_token="  hf_abc123  ")
    env = client._env("tok-123")
    assert env[TOKEN_ENV] == "tok-123" and env["HF_TOKEN"] == "hf_abc123"
    assert env["PYTHONPATH"].split(os.pathsep) == [str(tmp_path / "vendor"), str(ROOT), "/somewhere/else"]
    assert worker_process.WORKER_MODULE == "dit360_blender.worker"


def test_latest_preview_only():
    events = [
        {"type": "preview", "job_id": "a", "step": 1},
        {"type": "progress", "job_id": "a", "step": 1},
        {"type": "preview", "job_id": "b", "step": 1},
        {"type": "preview", "job_id": "a", "step": 2},
    ]
    kept = client_mod._latest_previews(events)
    assert kept == events[1:]


def test_runs_under_the_name_blender_imports_the_add_on_as(tmp_path):
    """Inside Blender the package is `bl_ext.<repo>.dit360_blender`; the worker must not care."""
    repo = tmp_path / "extensions" / "bl_ext" / "user_default"
    shutil.copytree(
        ROOT / "dit360_blender", repo / "dit360_blender", ignore=shutil.ignore_patterns("__pycache__")
    )
    for pkg in (repo.parent, repo):
        (pkg / "__init__.py").write_text("")
    script = textwrap.dedent(
        f"""
        import json, sys
        sys.path.insert(0, {str(tmp_path / "extensions")!r})
        from bl_ext.user_default.dit360_blender.client import WorkerClient
        client = WorkerClient(log_dir={str(tmp_path / "logs")!r})
        print(json.dumps(client.start()))
        client.close()
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["protocol"] == 1
    log = (tmp_path / "logs" / "worker.log").read_text(encoding="utf-8")
    assert f"package {repo / 'dit360_blender'}" in log  # the copy ran, not the repository's package


def test_compile_caches_persist_in_the_clients_folder_unless_the_user_chose_one(tmp_path, monkeypatch):
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    env = WorkerClient(log_dir=tmp_path / "user")._env("tok")
    assert env["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "user" / "compile_cache")
    assert env["TORCHINDUCTOR_FX_GRAPH_CACHE"] == "1" and env["TORCHINDUCTOR_AUTOGRAD_CACHE"] == "1"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    assert WorkerClient(log_dir=tmp_path / "user")._env("tok")["TORCHINDUCTOR_CACHE_DIR"] == str(
        tmp_path / "mine"
    )


# -- ready before torch ----------------------------------------------------------------------------


def test_ready_comes_before_torch_and_a_torch_that_fails_to_load_fails_the_queued_job(tmp_path, tiny_models):
    """The worker answers `hello` before it imports torch (the slow part of its start), so jobs can
    be queued at once; when the import then fails (here: a torch that cannot find its CUDA
    library, first on the worker's path), the queued job ends with that error, the client hears a
    fatal job-less error, and the worker exits."""
    from dit360_blender.client import JobError

    broken = tmp_path / "vendor" / "torch"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text(
        "import time\ntime.sleep(3.0)\n"
        "raise ImportError('libcudart.so.13: cannot open shared object file: No such file or directory')\n"
    )
    client = WorkerClient(log_dir=tmp_path / "logs", vendor_dir=tmp_path / "vendor")
    try:
        t0 = time.monotonic()
        ready = client.start()
        assert time.monotonic() - t0 < 2.9  # no torch imported (the broken one sleeps 3 s first)
        assert ready["pid"] == client.worker_pid and "device" not in ready and ready["protocol"] == 1
        pid = client.worker_pid
        events: list[dict] = []
        with pytest.raises(JobError) as failed:
            client.run(make_job(tiny_models, tmp_path / "out"), on_event=events.append, timeout=60)
        assert failed.value.code == "worker_start_failed"
        assert "libcudart.so.13" in failed.value.message and "Install Dependencies" in failed.value.hint
        fatal, _ = wait_for(client, lambda e: e["type"] == "error" and e.get("job_id") is None, timeout=30)
        assert fatal["fatal"] is True and "libcudart.so.13" in fatal["message"]
        deadline = time.monotonic() + 10
        while not gone(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert gone(pid)
        assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    finally:
        client.close()
