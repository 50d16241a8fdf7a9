"""The add-on's tunnel with real OpenSSH (issue 16): a real sshd on a loopback port (root, in a private
mount namespace that lends it a `sshd` privilege-separation user and a /run of its own, so the
machine's files are untouched), the real ssh client with a key, the serving worker behind it. The
client starts `ssh -N -L` itself from a host alias (the config given with -F by a one-line wrapper,
as ~/.ssh/config would), runs a job through it and stops it; a key the server doesn't know and a port
where no worker listens fail with ssh's own words.

Needs root, unshare/mount, ssh and ssh-keygen, and an sshd: /usr/sbin/sshd, or the binary named by
DIT360_TEST_SSHD (with DIT360_TEST_SSHD_LIBS for its libraries, e.g. one unpacked from the
openssh-server .deb). Skipped otherwise, with the reason."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_remote_worker import start_remote

from dit360_blender.client import Job, WorkerError
from dit360_blender.remote_client import RemoteSpec, RemoteWorkerClient

SSHD = os.environ.get("DIT360_TEST_SSHD") or shutil.which("sshd") or "/usr/sbin/sshd"
NEEDS = [Path(SSHD).is_file(), shutil.which("ssh"), shutil.which("ssh-keygen"), shutil.which("unshare")]
pytestmark = pytest.mark.skipif(
    sys.platform != "linux" or os.geteuid() != 0 or not all(NEEDS),
    reason="needs root, unshare, ssh, ssh-keygen and an sshd (DIT360_TEST_SSHD)",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def gpu_box(tmp_path_factory, tiny_models):
    """(the worker, the ssh wrapper, the sshd log) with the worker serving behind a real sshd."""
    remote = start_remote(tmp_path_factory.mktemp("ssh-box"), Path(tiny_models["root"]))
    d = tmp_path_factory.mktemp("sshd")
    for key in ("host_key", "user_key", "stranger_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / key)], check=True)
    shutil.copy(d / "user_key.pub", d / "authorized_keys")
    port = free_port()
    (d / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {d / 'host_key'}\nAuthorizedKeysFile {d / 'authorized_keys'}\n"
        "PidFile none\nStrictModes no\nUsePAM no\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
        "PermitRootLogin prohibit-password\nAllowTcpForwarding local\nPermitTTY no\nX11Forwarding no\n"
    )
    users = [line for line in Path("/etc/passwd").read_text().splitlines() if not line.startswith("sshd:")]
    (d / "passwd").write_text("\n".join([*users, "sshd:x:65534:65534::/run/sshd:/usr/sbin/nologin"]) + "\n")
    (d / "shadow").write_text("root::19000:0:99999:7:::\nsshd:*:19000:0:99999:7:::\n")  # key logins only
    (d / "shadow").chmod(0o600)
    script = (
        f"mount --bind {d / 'passwd'} /etc/passwd && mount --bind {d / 'shadow'} /etc/shadow && "
        f"mount -t tmpfs tmpfs /run && mkdir -m 755 /run/sshd && exec {SSHD} -D -e -f {d / 'sshd_config'}"
    )
    env = dict(os.environ)
    if os.environ.get("DIT360_TEST_SSHD_LIBS"):
        env["LD_LIBRARY_PATH"] = os.environ["DIT360_TEST_SSHD_LIBS"]
    log = open(d / "sshd.log", "wb")
    sshd = subprocess.Popen(
        ["unshare", "-m", "--propagation", "private", "sh", "-c", script], stderr=log, env=env
    )
    deadline = time.monotonic() + 20
    while b"Server listening" not in (d / "sshd.log").read_bytes():
        assert sshd.poll() is None and time.monotonic() < deadline, (d / "sshd.log").read_text()
        time.sleep(0.05)
    (d / "ssh_config").write_text(
        "".join(
            f"Host {alias}\n  HostName 127.0.0.1\n  Port {port}\n  User root\n  IdentityFile {d / key}\n"
            f"  IdentitiesOnly yes\n  UserKnownHostsFile {d / 'known_hosts'}\n  StrictHostKeyChecking accept-new\n"
            for alias, key in (("gpu-box", "user_key"), ("stranger-box", "stranger_key"))
        )
    )
    wrapper = d / "ssh"  # what ~/.ssh/config does for the user: the same ssh, told where the config is
    wrapper.write_text(f'#!/bin/sh\nexec {shutil.which("ssh")} -F {d / "ssh_config"} "$@"\n')
    wrapper.chmod(0o755)
    token = d / "gpu-box.token"
    shutil.copy(remote.token_file, token)
    token.chmod(0o600)
    yield remote, wrapper, token, d / "sshd.log"
    sshd.terminate()
    sshd.wait(10)
    log.close()
    remote.proc.terminate()
    remote.proc.wait(10)


def test_a_job_through_a_tunnel_the_client_runs_with_real_ssh(gpu_box, tmp_path):
    remote, wrapper, token, sshd_log = gpu_box
    spec = RemoteSpec(token_file=token, ssh_alias="gpu-box", remote_port=remote.port, ssh=str(wrapper))
    client = RemoteWorkerClient(spec, log_dir=tmp_path / "logs")
    try:
        result = client.run(
            Job(prompt="This is a panorama. A fjord.", output_dir=tmp_path / "renders", steps=1, width=32,
                height=16, device="cpu", dtype="fp32", hdr=True, preview_every=0),
            timeout=240,
        )  # fmt: skip
        ssh = client.tunnel.proc
        assert ssh.poll() is None
    finally:
        client.close()
    assert ssh.poll() is not None  # close() stopped ssh
    assert Path(result["path"]).parent == tmp_path / "renders" and Path(result["files"]["hdr"]).is_file()
    assert b"Accepted publickey for root" in sshd_log.read_bytes()


def test_an_unknown_key_and_a_port_without_worker_fail_with_what_ssh_said(gpu_box, tmp_path):
    remote, wrapper, token, _ = gpu_box
    cases = [
        (RemoteSpec(token_file=token, ssh_alias="stranger-box", remote_port=remote.port, ssh=str(wrapper)),
         "Permission denied (publickey)", "ssh-agent"),
        (RemoteSpec(token_file=token, ssh_alias="gpu-box", remote_port=free_port(), ssh=str(wrapper)),
         "open failed", "--serve"),
    ]  # fmt: skip
    for spec, said, fix in cases:
        client = RemoteWorkerClient(spec, log_dir=tmp_path / "logs", handshake_timeout=20)
        t0 = time.monotonic()
        try:
            with pytest.raises(WorkerError) as caught:
                client.start(timeout=30)
        finally:
            client.close()
        assert caught.value.code == "remote_unreachable"
        assert said in caught.value.message, caught.value.message
        assert fix in caught.value.hint, caught.value.hint
        assert time.monotonic() - t0 < 15  # ssh's answer ends the attempt, not the timeout
