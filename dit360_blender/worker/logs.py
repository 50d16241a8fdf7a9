"""The worker's logging: `worker.log` (rotated), warnings on stderr, and notable lines forwarded to the
client as `log` events; secrets (the launch token, Hugging Face tokens) are blanked out of all three."""

from __future__ import annotations

import logging
import logging.handlers
import os
import sys
import threading
from collections.abc import Callable
from pathlib import Path

from ..protocol import message
from ..redact import redact

LOG_MAX_BYTES = 5 * 1024 * 1024


class PrivateLogFile(logging.handlers.RotatingFileHandler):
    """worker.log, opened without following a symbolic link (one planted in the folder would get our
    lines appended to its target) and readable by this user only (0600, like the outputs)."""

    def _open(self):
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | getattr(os, "O_NOFOLLOW", 0)
        fd = os.open(self.baseFilename, flags, 0o600)
        try:
            if hasattr(os, "fchmod"):
                os.fchmod(fd, 0o600)  # a log left by an older version may be 0644
            return open(fd, "a", encoding=self.encoding, errors=self.errors)
        except BaseException:
            os.close(fd)
            raise


class ScrubbingFormatter(logging.Formatter):
    """Formats, then blanks out secrets (tokens), tracebacks included."""

    def __init__(self, fmt: str, secrets: list[str]) -> None:
        super().__init__(fmt)
        self.secrets = secrets

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record), self.secrets)


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

    def __init__(self, send: Callable[[dict], None], secrets: list[str]) -> None:
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
    """`<log_dir>/worker.log` (rotated at 5 MB, one backup) plus warnings on stderr. Raises OSError
    (ELOOP) when worker.log is a symbolic link."""
    log_dir.mkdir(parents=True, exist_ok=True)
    path = log_dir / "worker.log"
    fmt = "%(asctime)s pid %(process)d %(threadName)s %(levelname)s %(name)s: %(message)s"
    file_handler = PrivateLogFile(path, maxBytes=LOG_MAX_BYTES, backupCount=1, encoding="utf-8")
    file_handler.setFormatter(ScrubbingFormatter(fmt, secrets))
    err_handler = logging.StreamHandler(sys.stderr)
    err_handler.setLevel(logging.WARNING)
    err_handler.setFormatter(ScrubbingFormatter(fmt, secrets))
    root = logging.getLogger()
    root.handlers[:] = [file_handler, err_handler]
    root.setLevel(logging.INFO)
    logging.captureWarnings(True)
    return path
