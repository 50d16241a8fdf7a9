"""Background processes (install dependencies, check them, find or download models) that never block
Blender: a reader thread turns the process's output into a queue and a log file; the add-on's timer
drains the queue on the main thread. No bpy here: threads must not touch Blender data.
"""

from __future__ import annotations

import queue
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from ..redact import redact

LOG_TAIL = 200


class BackgroundTask:
    """One child process whose output lines arrive through `lines()`; `done` once it has exited."""

    def __init__(
        self,
        name: str,
        cmd: Sequence[str],
        log_path: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        secrets: Sequence[str] = (),
    ) -> None:
        self.name = name
        self.cmd = [str(c) for c in cmd]
        self.log_path = log_path
        self.started = time.monotonic()
        self.returncode: int | None = None
        self.tail: list[str] = []
        self._secrets = [s for s in secrets if s]
        self._queue: queue.Queue[str] = queue.Queue()
        self._finished = threading.Event()
        log_path.parent.mkdir(parents=True, exist_ok=True)
        kwargs: dict = {}
        if sys.platform == "win32":
            kwargs["creationflags"] = getattr(subprocess, "CREATE_NO_WINDOW", 0)
        else:
            kwargs["start_new_session"] = True  # Ctrl-C in Blender's terminal is not for it
        self._log = open(log_path, "w", encoding="utf-8")  # noqa: SIM115 - closed by the reader thread
        self._log.write(f"$ {' '.join(self.cmd)}\n")
        self._log.flush()
        try:
            self.proc = subprocess.Popen(
                self.cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                env=dict(env) if env is not None else None, cwd=str(cwd) if cwd else None, **kwargs,
            )  # fmt: skip
        except OSError:
            self._log.close()
            raise
        self._reader = threading.Thread(target=self._read, name=f"dit360-{name}", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        try:
            for raw in iter(self.proc.stdout.readline, b""):
                line = redact(raw.decode("utf-8", "replace").rstrip("\r\n"), self._secrets)
                self._log.write(line + "\n")
                self._log.flush()
                self._queue.put(line)
        finally:
            self.proc.stdout.close()
            self.returncode = self.proc.wait()
            self._log.write(f"[exit code {self.returncode}]\n")
            self._log.close()
            self._finished.set()

    @property
    def done(self) -> bool:
        """True once the process has exited and every line is in the queue."""
        return self._finished.is_set()

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def lines(self) -> list[str]:
        out = []
        while True:
            try:
                out.append(self._queue.get_nowait())
            except queue.Empty:
                break
        self.tail = (self.tail + out)[-LOG_TAIL:]
        return out

    def cancel(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.terminate()
                self.proc.wait(timeout=3.0)
            except (OSError, subprocess.TimeoutExpired):
                try:
                    self.proc.kill()
                except OSError:
                    pass

    def wait(self, timeout: float | None = None) -> bool:
        return self._finished.wait(timeout)
