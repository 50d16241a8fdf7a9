"""An SSH tunnel to a remote worker, run with the user's own ``ssh`` and keys. Standard library only.

``ssh -N -L 127.0.0.1:LOCAL:127.0.0.1:REMOTE -- ALIAS`` with ``BatchMode=yes`` (never a password
prompt: keys or an agent only, and nothing of the user's is stored by us) and
``ExitOnForwardFailure=yes`` (a port that can't be forwarded ends ssh instead of leaving a useless
tunnel). Its stderr is kept: when the tunnel fails, what ssh said is the cause the user sees.
"""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import sys
import threading
from collections import deque
from typing import Any

_ALIAS = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.@%:\[\]-]{0,252}$")  # never an option ("-oProxyCommand=...")
CONNECT_TIMEOUT_S = 15


class TunnelError(Exception):
    """The tunnel could not be started or died, with ssh's own words in the message and the fix."""

    def __init__(self, message_: str, hint: str) -> None:
        super().__init__(f"{message_}\n  fix: {hint}")
        self.message, self.hint = message_, hint


def alias_problem(alias: str) -> str | None:
    """Why `alias` can't be an SSH host alias (a Host of ~/.ssh/config, or [user@]host), or None."""
    if not _ALIAS.match(alias or ""):
        return (
            f"{alias!r} is not an SSH host name or alias (letters, digits, . _ - @ only; not starting with -)"
        )
    return None


def free_port() -> int:
    """A loopback port free right now (the OS's pick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SSHTunnel:
    """One ``ssh -N -L`` process: `start()`, `alive()`, `failure()` (the message when it died), `stop()`."""

    def __init__(self, alias: str, remote_port: int, local_port: int = 0, ssh: str | None = None) -> None:
        problem = alias_problem(alias)
        if problem:
            raise TunnelError(
                f"Can't open a tunnel: {problem}.", "Enter the Host name of your ~/.ssh/config."
            )
        if not 0 < remote_port < 65536:
            raise TunnelError(
                f"Remote port {remote_port} is not a port.", "Use the port the worker prints (7860)."
            )
        self.alias, self.remote_port = alias, remote_port
        self.local_port = local_port or free_port()
        self.ssh = ssh
        self.proc: subprocess.Popen | None = None
        self._stderr: deque[str] = deque(maxlen=20)
        self.lines = 0  # lines ssh wrote so far (said_since(n): only the newer ones)
        self._drain: threading.Thread | None = None

    def command(self, ssh: str) -> list[str]:
        return [
            ssh, "-N", "-T",
            "-o", "BatchMode=yes", "-o", "ExitOnForwardFailure=yes", "-o", f"ConnectTimeout={CONNECT_TIMEOUT_S}",
            "-o", "ServerAliveInterval=15", "-o", "ServerAliveCountMax=3",
            "-L", f"127.0.0.1:{self.local_port}:127.0.0.1:{self.remote_port}",
            "--", self.alias,
        ]  # fmt: skip

    def start(self) -> int:
        """Start ssh; returns the local port. The caller connects (retrying while `alive()`)."""
        ssh = self.ssh or shutil.which("ssh")
        if not ssh:
            raise TunnelError(
                "No ssh program was found on this computer's PATH.",
                "Install OpenSSH (on Windows: Settings > Optional features > OpenSSH Client), or run the "
                "tunnel yourself and choose 'host:port' in the preferences.",
            )
        kwargs: dict[str, Any] = {}
        if sys.platform == "win32":
            kwargs["creationflags"] = getattr(subprocess, "CREATE_NO_WINDOW", 0)
        else:
            kwargs["start_new_session"] = True  # Blender's Ctrl-C is not for the tunnel
        try:
            self.proc = subprocess.Popen(
                self.command(ssh),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                **kwargs,
            )
        except OSError as exc:
            raise TunnelError(
                f"Could not run {ssh}: {exc.strerror or exc}.", "Check the ssh installation."
            ) from None
        self._drain = threading.Thread(target=self._read_stderr, name="dit360-ssh-stderr", daemon=True)
        self._drain.start()
        return self.local_port

    def _read_stderr(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        for raw in iter(self.proc.stderr.readline, b""):
            line = raw.decode("utf-8", "replace").strip()
            if line:
                self._stderr.append(line)
                self.lines += 1
        self.proc.stderr.close()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def said(self) -> str:
        """What ssh wrote to stderr so far (its last lines)."""
        return "\n".join(self._stderr)

    def said_since(self, count: int) -> str:
        """What ssh wrote after its first `count` lines."""
        new = self.lines - count
        return "\n".join(list(self._stderr)[-new:]) if new > 0 else ""

    def refused_remotely(self, count: int) -> bool:
        """ssh reported, after line `count`, that the far end refused the forwarded connection
        (nothing listens on the worker's port there)."""
        return "open failed" in self.said_since(count)

    def failure(self) -> TunnelError:
        """Why the tunnel is not there, in ssh's words."""
        code = self.proc.poll() if self.proc is not None else None
        if self._drain is not None and code is not None:
            self._drain.join(1.0)
        said = self.said() or "(ssh printed nothing)"
        what = (
            f"exited with code {code}"
            if code is not None
            else "is running but the worker did not answer through it"
        )
        return TunnelError(
            f"The SSH tunnel to {self.alias} {what}. ssh said:\n{said}",
            _hint(said, self.alias, self.remote_port),
        )

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=3.0)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=3.0)


def _hint(said: str, alias: str, port: int) -> str:
    text = said.lower()
    if "could not resolve" in text or "name or service not known" in text:
        return f"Check the host alias {alias!r}: is it a Host in ~/.ssh/config (or a reachable host name)?"
    if "permission denied" in text or "host key verification failed" in text:
        return (
            f"ssh needs a key it can use without asking: run 'ssh {alias}' once in a terminal (accept the "
            "host key; load your key into ssh-agent), then try again. Passwords are never asked for here."
        )
    if "connect failed" in text or "open failed" in text or "connection refused" in text:
        return f"Start the worker on {alias}: python -m dit360_blender.worker --serve --port {port}"
    if "address already in use" in text or "cannot listen" in text:
        return "The local port is taken: leave the local port at 0 (any free one) or choose another."
    return f"Try 'ssh -N -L {port}:127.0.0.1:{port} {alias}' in a terminal to see the problem."
