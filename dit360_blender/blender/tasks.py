"""Background processes (install dependencies, check them, find or download models) that never block
Blender: a reader thread splits the process's output with the protocol's framing (size-limited
lines), logs every line, and queues each as a child message (`protocol.CHILD_MESSAGES`, decoded and
checked) or, when it is none, as plain text; the add-on's timer drains the queue on the main
thread. No bpy here: threads must not touch Blender data.
"""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from ..protocol import CHILD_MESSAGES, FrameDecoder, ProtocolError, decode
from ..redact import redact

LOG_TAIL = 200
READ_CHUNK = 1 << 16


class BackgroundTask:
    """One child process whose output arrives through `take()`: child messages as dicts, other lines
    as text; `done` once it has exited and everything it wrote has been taken."""

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
        self.tail: list[str] = []  # the last text lines (what a failure is explained with)
        self.last: dict[str, dict] = {}  # the last message of each type that arrived
        self._secrets = [s for s in secrets if s]
        self._queue: queue.Queue[str | dict] = queue.Queue()
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
        decoder = FrameDecoder()
        try:
            while chunk := self.proc.stdout.read1(READ_CHUNK):
                self._take_frames(decoder.feed(chunk))
            self._take_frames(decoder.feed(b"\n"))  # a last line without its newline
        finally:
            self.proc.stdout.close()
            self.returncode = self.proc.wait()
            self._log.write(f"[exit code {self.returncode}]\n")
            self._log.close()
            self._finished.set()

    def _take_frames(self, frames: list[bytes | ProtocolError]) -> None:
        for frame in frames:
            if isinstance(frame, ProtocolError):  # a line over the size limit, already discarded
                self._log.write(f"[dit360: {frame.message}]\n")
                continue
            line = redact(frame.decode("utf-8", "replace"), self._secrets)
            self._log.write(line + "\n")
            self._queue.put(self._message(line))
        self._log.flush()

    def _message(self, line: str) -> str | dict:
        """The line's child message, or the line itself when it is none."""
        try:
            return decode(line, CHILD_MESSAGES)
        except ProtocolError as exc:
            if _is_json_object(line):  # meant as a message but refused: say why in the log
                self._log.write(f"[dit360: not a message: {exc.code}: {exc.message}]\n")
            return line

    @property
    def done(self) -> bool:
        """True once the process has exited and everything it wrote has been taken."""
        return self._finished.is_set() and self._queue.empty()

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def take(self, limit: int) -> list[str | dict]:
        """Up to `limit` items in the order they arrived (the rest wait for the next call)."""
        out: list[str | dict] = []
        while len(out) < limit:
            try:
                out.append(self._queue.get_nowait())
            except queue.Empty:
                break
        for item in out:
            if isinstance(item, dict):
                self.last[item["type"]] = item
        self.tail = (self.tail + [t for t in out if isinstance(t, str)])[-LOG_TAIL:]
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
        """Wait for the process to exit and its output to be queued (not taken)."""
        return self._finished.wait(timeout)


def _is_json_object(line: str) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except (ValueError, RecursionError):
        return False
