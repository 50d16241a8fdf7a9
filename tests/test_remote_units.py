"""The parts of the remote worker (issue 16) that need no process: the serving worker's result and
upload stores (bounded in time and size, checked chunk by chunk), and the client's download (names
that never replace an earlier file, all files or none). Real files in tmp_path."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from dit360_blender.protocol import CHUNK_BYTES, ProtocolError
from dit360_blender.transfer import Download, TransferError, chunk_fields
from dit360_blender.worker.serve import MAX_UPLOADS, ResultStore, UploadStore


def _result(store: ResultStore, job_id: str, size: int) -> dict:
    folder = store.job_dir(job_id)
    (folder / "pano_1.png").write_bytes(os.urandom(size))
    (folder / "pano_1.hdr").write_bytes(os.urandom(size // 2))
    msg = {"v": 1, "type": "result", "job_id": job_id, "path": str(folder / "pano_1.png"),
           "files": {"hdr": str(folder / "pano_1.hdr")}}  # fmt: skip
    return store.record(msg)


def test_results_are_listed_with_checksums_and_dropped_by_age_and_total_size(tmp_path):
    store = ResultStore(tmp_path, keep_s=100.0, keep_bytes=5000)
    first = _result(store, "a", 2000)  # 3000 bytes with its HDR
    entries = {e["key"]: e for e in first["remote_files"]}
    png = tmp_path / "jobs" / "a" / "pano_1.png"
    assert entries["path"] == {"key": "path", "name": "pano_1.png", "size": 2000,
                               "sha256": hashlib.sha256(png.read_bytes()).hexdigest()}  # fmt: skip
    _result(store, "b", 2000)  # 6000 in all: over 5000, so the oldest goes
    assert store.get("a") is None and not (tmp_path / "jobs" / "a").exists()
    assert store.get("b") is not None
    store.evict(now=store.get("b").ended + 101.0)  # too old
    assert store.get("b") is None and not (tmp_path / "jobs" / "b").exists()


def test_a_failed_jobs_folder_is_removed_and_a_file_outside_it_is_not_offered(tmp_path):
    store = ResultStore(tmp_path)
    folder = store.job_dir("x")
    (folder / "half.png").write_bytes(b"partial")
    store.record({"v": 1, "type": "error", "job_id": "x", "code": "cancelled", "message": "", "hint": ""})
    assert not folder.exists()
    outside = tmp_path / "secret.txt"
    outside.write_text("not yours")
    folder = store.job_dir("y")
    (folder / "p.png").write_bytes(b"png")
    msg = store.record(
        {
            "v": 1,
            "type": "result",
            "job_id": "y",
            "path": str(folder / "p.png"),
            "files": {"hdr": str(outside)},
        }
    )
    assert [e["name"] for e in msg["remote_files"]] == ["p.png"]
    assert set(store.get("y").files) == {"p.png"}


def _chunk(upload_id: str, offset: int, data: bytes) -> dict:
    return {"upload_id": upload_id, "offset": offset, **chunk_fields(data)}


def test_uploads_arrive_in_order_with_checksums_or_are_refused_and_forgotten(tmp_path):
    uploads = UploadStore(tmp_path)
    data = os.urandom(CHUNK_BYTES + 100)
    uploads.begin("u", "source.png", len(data), hashlib.sha256(data).hexdigest())
    assert uploads.chunk("u", 0, _chunk("u", 0, data[:CHUNK_BYTES])) is None
    done = uploads.chunk("u", CHUNK_BYTES, _chunk("u", CHUNK_BYTES, data[CHUNK_BYTES:]))
    assert done is not None and uploads.path("u").read_bytes() == data
    # out of order
    uploads.begin("v", "mask.png", len(data), hashlib.sha256(data).hexdigest())
    with pytest.raises(ProtocolError, match="expected 0"):
        uploads.chunk("v", CHUNK_BYTES, _chunk("v", CHUNK_BYTES, data[CHUNK_BYTES:]))
    assert uploads.chunk("v", 0, _chunk("v", 0, data[:CHUNK_BYTES])) is None  # dropped quietly after
    with pytest.raises(ProtocolError, match="expected 0"):
        uploads.path("v")
    # right chunks, wrong whole-file checksum
    uploads.begin("w", "mask.png", 10, "0" * 64)
    with pytest.raises(ProtocolError, match="as a whole"):
        uploads.chunk("w", 0, _chunk("w", 0, b"0123456789"))
    # names with folders, and sizes over the limit
    with pytest.raises(ProtocolError, match="plain file name"):
        uploads.begin("x", "../../etc/passwd", 10, "0" * 64)
    with pytest.raises(ProtocolError, match="at most"):
        uploads.begin("y", "big.png", 1 << 40, "0" * 64)
    assert sorted(p.name for p in (tmp_path / "uploads").iterdir()) == ["u"]
    # and how many: empty uploads can't pile up folders
    for n in range(MAX_UPLOADS - 1):
        uploads.begin(f"e{n}", "empty.png", 0, hashlib.sha256(b"").hexdigest())
    with pytest.raises(ProtocolError, match="its most"):
        uploads.begin("one-more", "empty.png", 0, hashlib.sha256(b"").hexdigest())


def _serve(files: dict[str, bytes], requests: list[dict], corrupt: set | None = None) -> list[dict]:
    """The worker's chunk replies to `requests`."""
    out = []
    for r in requests:
        data = files[r["name"]][r["offset"] : r["offset"] + CHUNK_BYTES]
        msg = {"job_id": r["job_id"], "name": r["name"], "offset": r["offset"], "size": len(files[r["name"]]),
               **chunk_fields(data)}  # fmt: skip
        if corrupt is not None and (r["name"], r["offset"]) in corrupt:
            corrupt.discard((r["name"], r["offset"]))
            msg["data"] = chunk_fields(bytes(len(data)))["data"]
        out.append(msg)
    return out


def _download(
    tmp_path: Path, files: dict[str, bytes], stem: str | None = None, corrupt=None, lie=None
) -> dict:
    entries = [
        {"key": "path" if name.endswith(".png") else "hdr", "name": name, "size": len(data),
         "sha256": hashlib.sha256(lie.get(name, data) if lie else data).hexdigest()}
        for name, data in files.items()
    ]  # fmt: skip
    result = {"v": 1, "type": "result", "job_id": "j", "path": "/worker/jobs/j/pano_1.png",
              "files": {"hdr": "/worker/jobs/j/pano_1.hdr"}, "remote_files": entries}  # fmt: skip
    d = Download("j", result, tmp_path / "out", stem)
    pending = d.requests()
    while pending:
        pending = [req for reply in _serve(files, pending, corrupt) for req in d.feed(reply)]
    assert d.complete
    return d.finish()


def test_a_download_keeps_earlier_files_and_refetches_a_damaged_chunk(tmp_path):
    files = {"pano_1.png": os.urandom(3 * CHUNK_BYTES + 5), "pano_1.hdr": os.urandom(10)}
    first = _download(tmp_path, files)
    assert Path(first["path"]).read_bytes() == files["pano_1.png"] and first["remote_path"].startswith(
        "/worker"
    )
    second = _download(tmp_path, files, corrupt={("pano_1.png", CHUNK_BYTES)})
    assert Path(second["path"]).name == "pano_1-2.png" and Path(second["files"]["hdr"]).name == "pano_1-2.hdr"
    assert Path(second["path"]).read_bytes() == files["pano_1.png"]
    named = _download(tmp_path, files, stem="mine")
    assert Path(named["path"]).name == "mine.png"
    again = _download(tmp_path, {"pano_1.png": b"new", "pano_1.hdr": b"h"}, stem="mine")  # a name replaces
    assert Path(again["path"]).read_bytes() == b"new"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "mine.hdr", "mine.png", "pano_1-2.hdr", "pano_1-2.png", "pano_1.hdr", "pano_1.png"
    ]  # fmt: skip


def test_a_file_that_does_not_match_its_checksum_leaves_nothing(tmp_path):
    files = {"pano_1.png": os.urandom(100), "pano_1.hdr": os.urandom(100)}
    with pytest.raises(TransferError, match="does not match its checksum"):
        _download(tmp_path, files, lie={"pano_1.hdr": b"other"})
    assert list((tmp_path / "out").iterdir()) == []
    with pytest.raises(TransferError, match="damaged 4 times"):
        _download(tmp_path, files, corrupt=_Always())
    assert list((tmp_path / "out").iterdir()) == []


class _Always(set):
    """Every chunk arrives damaged."""

    def __contains__(self, item) -> bool:
        return True

    def discard(self, item) -> None:
        pass


def test_a_worker_file_list_with_folders_in_names_is_refused(tmp_path):
    bad = {"v": 1, "type": "result", "job_id": "j", "path": "x",
           "remote_files": [{"key": "path", "name": "../evil.png", "size": 1, "sha256": "0" * 64}]}  # fmt: skip
    with pytest.raises(TransferError, match="plain file name"):
        Download("j", bad, tmp_path, None)
