"""Another user on the machine can't get at the worker through its folder: what they plant in a shared
temporary directory (a symbolic link for the log folder or for worker.log, a torch.py next to an
empty PYTHONPATH entry) is refused or never used. Real folders, links and worker processes."""

from __future__ import annotations

import os
import stat
import sys
import tempfile
from pathlib import Path

import pytest

from dit360_blender.client import WorkerClient, WorkerError
from dit360_blender.launch import UnsafeFolderError, default_work_dir, private_dir

POSIX = pytest.mark.skipif(sys.platform == "win32", reason="POSIX owners, modes and links")
OTHER_UID = 65534  # nobody


@pytest.fixture
def shared_tmp(tmp_path, monkeypatch) -> Path:
    """A world-writable sticky folder standing in for /tmp, as tempfile's directory."""
    shared = tmp_path / "shared-tmp"
    shared.mkdir()
    shared.chmod(0o1777)
    monkeypatch.setattr(tempfile, "tempdir", str(shared))
    return shared


@POSIX
def test_a_planted_link_for_the_default_folder_is_refused(shared_tmp, tmp_path):
    attacker = tmp_path / "attacker"
    attacker.mkdir()
    default = WorkerClient(extra_env={"HF_HUB_OFFLINE": "1"}).log_dir
    assert default.parent == shared_tmp and str(os.getuid()) in default.name  # this user's, not shared
    default.symlink_to(attacker, target_is_directory=True)  # planted before the victim's first start
    client = WorkerClient(extra_env={"HF_HUB_OFFLINE": "1"})
    try:
        with pytest.raises(WorkerError) as info:
            client.start(timeout=60)
    finally:
        client.close()
    assert info.value.code == "worker_start_failed" and "symbolic link" in info.value.message
    assert list(attacker.iterdir()) == []  # no log line, no cache, no working directory there


@POSIX
def test_a_planted_worker_log_link_gets_nothing_written_through_it(tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir(mode=0o700)
    victim = tmp_path / "victims-file"
    victim.write_text("the victim's own text\n")
    (logs / "worker.log").symlink_to(victim)
    client = WorkerClient(log_dir=logs, extra_env={"HF_HUB_OFFLINE": "1"})
    try:
        with pytest.raises(WorkerError) as info:
            client.start(timeout=120)
    finally:
        client.close()
    assert info.value.code == "worker_start_failed" and "worker.log" in info.value.message
    assert victim.read_text() == "the victim's own text\n"


@POSIX
def test_folders_others_control_are_refused_and_ours_made_private(tmp_path):
    fresh = private_dir(tmp_path / "new")
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o700
    assert private_dir(fresh) == fresh  # and accepted again
    loose = tmp_path / "group-writable"  # ours, made under a umask of 002 or looser
    loose.mkdir()
    loose.chmod(0o777)
    assert stat.S_IMODE(private_dir(loose).stat().st_mode) == 0o755  # nobody else can write there now
    (tmp_path / "a-file").write_text("")
    with pytest.raises(UnsafeFolderError, match="not a folder"):
        private_dir(tmp_path / "a-file")
    if os.geteuid() == 0:  # root can make a folder of another user for real
        theirs = tmp_path / "theirs"
        theirs.mkdir(mode=0o700)
        os.chown(theirs, OTHER_UID, OTHER_UID)
        with pytest.raises(UnsafeFolderError, match=f"another user \\(uid {OTHER_UID}\\)"):
            private_dir(theirs)
    assert default_work_dir().name.endswith(str(os.getuid()))


@POSIX
def test_an_empty_pythonpath_entry_does_not_run_a_planted_torch(tmp_path, monkeypatch):
    """Blender started with PYTHONPATH=":/somewhere" (an empty entry: the working directory) and a
    torch.py in the worker's folder: the worker imports the real torch, and its log is 0600."""
    logs = tmp_path / "logs"
    logs.mkdir(mode=0o700)
    marker = tmp_path / "planted-torch-ran"
    (logs / "torch.py").write_text(
        f"open({str(marker)!r}, 'w').close()\nraise ImportError('the planted torch.py ran')\n"
    )
    monkeypatch.setenv("PYTHONPATH", os.pathsep + str(tmp_path / "somewhere") + os.pathsep + "relative")
    client = WorkerClient(log_dir=logs, extra_env={"HF_HUB_OFFLINE": "1"})
    try:
        client.start(timeout=180)
        ready = client.wait_for_device(timeout=180)  # the real torch was imported
        pid = client.worker_pid
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = dict(kv.split("=", 1) for kv in f.read().decode().split("\0") if "=" in kv)
        cwd = Path(os.readlink(f"/proc/{pid}/cwd"))
    finally:
        client.close()
    assert ready["torch_version"] and not marker.exists()
    entries = env["PYTHONPATH"].split(os.pathsep)
    assert "" not in entries and "relative" not in entries and str(tmp_path / "somewhere") in entries
    assert cwd == logs  # its working directory is the private folder
    assert stat.S_IMODE((logs / "worker.log").stat().st_mode) == 0o600
