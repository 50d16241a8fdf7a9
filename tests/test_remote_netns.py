"""The remote worker on another address (issue 16, optional part): a network namespace of its own
(`ip netns`, a veth pair: this side 10.<a>.<b>.1, the "GPU machine" .2) runs the serving worker on
its default port. It binds its own loopback, so from here its address answers nothing; a job gets
through only the way SSH would carry it: a forwarder on the remote side (sshd's end, from its
address to its loopback) and one here (ssh's -L end, from our loopback). Needs root and iproute2."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from tcp_forwarder import Forwarder

from dit360_blender.client import Job
from dit360_blender.protocol import SERVE_PORT
from dit360_blender.remote_client import RemoteSpec, RemoteWorkerClient
from dit360_blender.worker.serve_main import SERVING_LINE

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent


def _can_make_namespaces() -> bool:
    if sys.platform != "linux" or os.geteuid() != 0 or shutil.which("ip") is None:
        return False
    name = f"d3probe{os.getpid()}"
    ok = subprocess.run(["ip", "netns", "add", name], capture_output=True).returncode == 0
    if ok:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)
    return ok


pytestmark = pytest.mark.skipif(not _can_make_namespaces(), reason="needs root and ip netns")


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@pytest.fixture(scope="module")
def gpu_box(tmp_path_factory, tiny_models):
    """(the remote address, the worker process, its token file) in a namespace of its own."""
    pid = os.getpid()
    ns, host_end, box_end = f"d3box{pid}", f"d3h{pid % 100000}", f"d3r{pid % 100000}"
    net = f"10.{200 + pid % 50}.{pid % 250}"
    here_ip, box_ip = f"{net}.1", f"{net}.2"
    tree = tmp_path_factory.mktemp("netns-box")
    procs: list[subprocess.Popen] = []
    ip("netns", "add", ns)
    try:
        ip("link", "add", host_end, "type", "veth", "peer", "name", box_end)
        ip("link", "set", box_end, "netns", ns)
        ip("addr", "add", f"{here_ip}/30", "dev", host_end)
        ip("link", "set", host_end, "up")
        for args in (
            ("addr", "add", f"{box_ip}/30", "dev", box_end),
            ("link", "set", box_end, "up"),
            ("link", "set", "lo", "up"),
        ):
            ip("netns", "exec", ns, "ip", *args)
        env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
        worker = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, "-m", "dit360_blender.worker", "--serve",
             "--log-dir", str(tree / "root"), "--token-file", str(tree / "worker.token"),
             "--models-dir", str(tiny_models["root"])],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=tree,
        )  # fmt: skip
        procs.append(worker)
        while not (line := worker.stdout.readline().decode()).startswith(SERVING_LINE):
            assert line, "the worker in the namespace ended"
        assert line.strip().endswith(f"127.0.0.1:{SERVE_PORT}")  # the default port: a fresh machine
        sshd_end = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, str(HERE / "tcp_forwarder.py"), "2222", str(SERVE_PORT), box_ip],
            stdout=subprocess.PIPE,
        )  # fmt: skip
        procs.append(sshd_end)
        assert sshd_end.stdout.readline().strip() == b"forwarding"
        yield box_ip, worker, tree / "worker.token"
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(10)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)  # the veth pair goes with it
        subprocess.run(["ip", "link", "del", host_end], capture_output=True)


def test_the_worker_on_another_address_is_reached_only_through_the_tunnel(gpu_box, tmp_path):
    box_ip, worker, token_file = gpu_box
    with pytest.raises(ConnectionRefusedError):  # its port is on its own loopback, not the network
        socket.create_connection((box_ip, SERVE_PORT), timeout=5)
    local_token = tmp_path / "box.token"
    shutil.copy(token_file, local_token)
    local_token.chmod(0o600)
    ssh_end = Forwarder(2222, target_host=box_ip)  # ssh -L: our loopback -> the box's sshd
    client = RemoteWorkerClient(RemoteSpec(token_file=local_token, address=f"127.0.0.1:{ssh_end.port}"))
    try:
        result = client.run(
            Job(prompt="This is a panorama. A dune sea.", output_dir=tmp_path / "renders", steps=1, width=32,
                height=16, device="cpu", dtype="fp32", hdr=True, preview_every=0),
            timeout=240,
        )  # fmt: skip
        assert client.ready_info["pid"] == worker.pid
    finally:
        client.close()
        ssh_end.close()
    assert Path(result["path"]).parent == tmp_path / "renders"
    with Image.open(result["path"]) as im:
        assert im.size == (32, 16)
    assert Path(result["files"]["lighting"]).is_file()
