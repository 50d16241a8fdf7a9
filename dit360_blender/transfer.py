"""Files over the worker's socket, for a worker that shares no file system with its client
(protocol.py, "Remote workers"): checksums, chunk fields, safe names, the client's download of a
job's files into its own output folder. Standard library only: the Blender side uses it too.

A download writes each file to a hidden temporary name in the output folder and renames them all
into place only when every file arrived with its declared size and SHA-256: a job leaves all its
files or none, and a file the user already has is never overwritten by an unnamed job.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import re
import secrets
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from .protocol import CHUNK_BYTES, MAX_FILE_NAME, MAX_UPLOAD_BYTES, encode, message

WINDOW = 4  # chunk requests in flight: a tunnel's round trip is not paid per chunk
RETRIES = 3  # a chunk that arrives damaged is asked for again this often
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


class TransferError(Exception):
    """A file that could not be moved intact, with its protocol error code and the fix."""

    def __init__(self, code: str, message_: str, hint: str = "") -> None:
        super().__init__(message_)
        self.code, self.message, self.hint = code, message_, hint


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def chunk_fields(data: bytes) -> dict[str, str]:
    """The `data` and `sha256` fields of a chunk carrying `data`."""
    return {"data": base64.b64encode(data).decode("ascii"), "sha256": hashlib.sha256(data).hexdigest()}


def chunk_bytes(msg: Mapping[str, Any], expected_len: int) -> bytes:
    """The bytes of a chunk message, checked: valid base64, `expected_len` long, matching `sha256`.
    Raises TransferError (code transfer_failed; the worker reports it as bad_upload)."""
    try:
        data = base64.b64decode(msg["data"], validate=True)
    except (binascii.Error, ValueError):
        raise TransferError("transfer_failed", "A chunk's data is not base64.") from None
    if len(data) != expected_len:
        raise TransferError(
            "transfer_failed",
            f"A chunk at offset {msg.get('offset')} has {len(data)} bytes, not {expected_len}.",
        )
    if hashlib.sha256(data).hexdigest() != msg["sha256"]:
        raise TransferError(
            "transfer_failed", f"The chunk at offset {msg.get('offset')} has a wrong checksum."
        )
    return data


def name_problem(name: str) -> str | None:
    """Why `name` can't be a transferred file's name (a plain name in one folder), or None."""
    if not name or len(name) > MAX_FILE_NAME:
        return f"a file name is 1-{MAX_FILE_NAME} characters"
    if name.startswith(".") or any(c in name for c in "/\\\0:") or name != name.strip():
        return f"{name!r} is not a plain file name (no folders, no leading dot)"
    if any(ord(c) < 32 for c in name):
        return f"{name!r} holds control characters"
    return None


def checksum_problem(value: str) -> str | None:
    return None if _HEX64.match(value) else "a sha256 is 64 lowercase hex digits"


def upload_frames(path: Path, upload_id: str) -> Iterator[bytes]:
    """The encoded `upload_begin` and `upload_chunk` frames that send the file at `path`.
    Raises TransferError (code bad_parameters) for a file that is missing or too large."""
    try:
        size = path.stat().st_size
        if not path.is_file():
            raise FileNotFoundError(path)
    except OSError as exc:
        raise TransferError(
            "bad_parameters",
            f"The input file {path} can't be read: {exc.strerror or exc}.",
            "Choose an existing file.",
        ) from None
    if size > MAX_UPLOAD_BYTES:
        raise TransferError(
            "bad_parameters",
            f"The input file {path.name} is {size / 2**20:.0f} MiB; a remote worker takes at most "
            f"{MAX_UPLOAD_BYTES / 2**20:.0f} MiB per file.",
            "Use a smaller image (or a PNG instead of an uncompressed format).",
        )
    name = path.name if name_problem(path.name) is None else "input" + "".join(path.suffixes[-1:])[:16]
    yield encode(message("upload_begin", upload_id=upload_id, name=name, size=size, sha256=sha256_file(path)))
    with open(path, "rb") as f:
        offset = 0
        while offset < size:
            data = f.read(min(CHUNK_BYTES, size - offset))
            if not data:  # shrank while we read: the worker will see the upload end short
                break
            yield encode(message("upload_chunk", upload_id=upload_id, offset=offset, **chunk_fields(data)))
            offset += len(data)


class Download:
    """One job's files, fetched chunk by chunk into `out_dir` (the client's own folder).

    `result`: the worker's `result` (with `remote_files`); `stem`: the user's file name for the job
    (files named so are replaced, as a local job does), or None to keep every earlier file."""

    def __init__(self, job_id: str, result: Mapping[str, Any], out_dir: Path, stem: str | None) -> None:
        self.job_id, self.result, self.out_dir = job_id, dict(result), Path(out_dir)
        self.files = self._check(result.get("remote_files") or [])
        self.local = self._plan_names(stem)
        self._temps: dict[str, Path] = {}
        self._todo = [
            (f["name"], off) for f in self.files for off in range(0, max(f["size"], 1), CHUNK_BYTES)
        ]
        self._todo = [(n, o) for n, o in self._todo if o < self._size(n)]
        self._asked: set[tuple[str, int]] = set()
        self._got: set[tuple[str, int]] = set()
        self._tries: dict[tuple[str, int], int] = {}

    def _check(self, entries: list) -> list[dict]:
        files = []
        for entry in entries:
            ok = (
                isinstance(entry, dict)
                and isinstance(entry.get("name"), str)
                and isinstance(entry.get("key"), str)
            )
            ok = ok and isinstance(entry.get("size"), int) and isinstance(entry.get("sha256"), str)
            problem = None if ok else "an entry of remote_files is malformed"
            problem = problem or name_problem(entry["name"]) or checksum_problem(entry["sha256"])
            if problem is None and entry["size"] < 0:
                problem = "a negative file size"
            if problem:
                raise TransferError("transfer_failed", f"The worker's file list can't be used: {problem}.")
            files.append(dict(entry))
        if not any(f["key"] == "path" for f in files):
            raise TransferError("transfer_failed", "The worker's file list has no image.")
        return files

    def _size(self, name: str) -> int:
        return next(f["size"] for f in self.files if f["name"] == name)

    def _plan_names(self, stem: str | None) -> dict[str, Path]:
        """Remote name -> local path. Every name starts with the image's stem; locally the stem is
        the user's file name, or the worker's with -2, -3 ... added until no file would be replaced."""
        # the generated size's image when a generate also upscaled: the upscale is <its stem>_<size>
        keys = {f["key"]: f["name"] for f in self.files}
        image = keys.get("native.path") or keys["path"]
        remote_stem = image.rsplit(".", 1)[0]
        tails = [
            f["name"][len(remote_stem) :] if f["name"].startswith(remote_stem) else "_" + f["name"]
            for f in self.files
        ]
        candidates = [stem] if stem else [remote_stem] + [f"{remote_stem}-{n}" for n in range(2, 10000)]
        for local_stem in candidates:
            paths = [self.out_dir / (local_stem + tail) for tail in tails]
            if stem or not any(p.exists() for p in paths):
                for p in paths:
                    if p.parent != self.out_dir or name_problem(p.name):
                        raise TransferError("bad_parameters", f"The file name {p.name!r} is not allowed.")
                return {f["name"]: p for f, p in zip(self.files, paths)}
        raise TransferError("disk_write_failed", f"No free file name for {remote_stem} in {self.out_dir}.")

    # -- the exchange ----------------------------------------------------------------------------

    def requests(self) -> list[dict]:
        """The `fetch_chunk` messages to send now (up to WINDOW in flight)."""
        out = []
        while self._todo and len(self._asked) < WINDOW:
            name, offset = self._todo.pop(0)
            self._asked.add((name, offset))
            out.append(message("fetch_chunk", job_id=self.job_id, name=name, offset=offset))
        return out

    def feed(self, msg: Mapping[str, Any]) -> list[dict]:
        """Take one `chunk`; returns the requests to send next. A damaged chunk is asked for again
        (RETRIES times); raises TransferError when a file can't be had intact or written."""
        key = (msg["name"], msg["offset"])
        if key not in self._asked:
            return []  # a late reply to a request of an earlier attempt
        self._asked.discard(key)
        size = self._size(msg["name"])
        try:
            if msg["size"] != size:
                raise TransferError("transfer_failed", f"{msg['name']} changed size on the worker.")
            data = chunk_bytes(msg, min(CHUNK_BYTES, size - msg["offset"]))
        except TransferError as exc:
            self._tries[key] = self._tries.get(key, 0) + 1
            if self._tries[key] > RETRIES:
                raise TransferError(
                    "transfer_failed",
                    f"{msg['name']} of job {self.job_id} arrived damaged {self._tries[key]} times ({exc.message}).",
                    "The connection corrupts data: check the network or the tunnel, then run the job again.",
                ) from None
            self._todo.insert(0, key)
            return self.requests()
        self._write(msg["name"], msg["offset"], data)
        self._got.add(key)
        return self.requests()

    @property
    def total_bytes(self) -> int:
        return sum(f["size"] for f in self.files)

    @property
    def received_bytes(self) -> int:
        return sum(min(CHUNK_BYTES, self._size(name) - offset) for name, offset in self._got)

    @property
    def complete(self) -> bool:
        return not self._todo and not self._asked

    def _write(self, name: str, offset: int, data: bytes) -> None:
        try:
            temp = self._temps.get(name)
            if temp is None:
                self.out_dir.mkdir(parents=True, exist_ok=True)
                temp = self.out_dir / f".{self.local[name].name}.{secrets.token_hex(4)}.part"
                fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o644)
                os.close(fd)
                self._temps[name] = temp
            with open(temp, "r+b") as f:
                f.seek(offset)
                f.write(data)
        except OSError as exc:
            raise TransferError(
                "disk_write_failed",
                f"Could not write {self.local[name]}: {exc.strerror or exc}.",
                "Choose an output folder you can write to, with free disk space.",
            ) from None

    def finish(self) -> dict:
        """Check every file's size and SHA-256, rename them into place, and return the `result`
        with local paths (``remote_path`` keeps the worker's). All or none: on a failure the
        files renamed so far and the temporary ones are removed, and TransferError is raised."""
        for f in self.files:
            if f["size"] == 0 and f["name"] not in self._temps:
                self._write(f["name"], 0, b"")
            temp = self._temps[f["name"]]
            if temp.stat().st_size != f["size"] or sha256_file(temp) != f["sha256"]:
                self.abort()
                raise TransferError(
                    "transfer_failed",
                    f"{f['name']} of job {self.job_id} does not match its checksum after the transfer.",
                    "Run the job again; if it keeps happening, check the connection.",
                )
        placed: list[Path] = []
        try:
            for f in self.files:
                os.replace(self._temps[f["name"]], self.local[f["name"]])
                placed.append(self.local[f["name"]])
        except OSError as exc:
            for p in placed:
                p.unlink(missing_ok=True)
            self.abort()
            raise TransferError(
                "disk_write_failed", f"Could not place the files in {self.out_dir}: {exc.strerror or exc}."
            ) from None
        self._temps.clear()
        out = dict(self.result)
        out.pop("remote_files", None)
        out["remote_path"] = out.get("path")
        by_key = {f["key"]: str(self.local[f["name"]]) for f in self.files}
        out["path"] = by_key["path"]
        if isinstance(out.get("files"), dict):
            out["files"] = {k: by_key.get(k, v) for k, v in out["files"].items()}
        native = out.get("native")
        if isinstance(native, dict) and "native.path" in by_key:
            files = native.get("files") if isinstance(native.get("files"), dict) else {}
            out["native"] = {
                **native,
                "path": by_key["native.path"],
                "files": {k: by_key.get(f"native.{k}", v) for k, v in files.items()},
            }
        return out

    def abort(self) -> None:
        """Remove the temporary files (a dropped connection or a failure): nothing half-written stays."""
        for temp in self._temps.values():
            try:
                temp.unlink(missing_ok=True)
            except OSError:
                pass
        self._temps.clear()
