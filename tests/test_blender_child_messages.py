"""The add-on's children speak the protocol's framing: the model download child's stdout is nothing
but `CHILD_MESSAGES` frames, and the Blender side's reader (blender/tasks.py) hands over each good
frame as a message, every other line as text, and only logs what it refuses (a malformed message, an
oversized line) without losing its place in the stream. (`vendor_setup.py --check --json` is checked
in test_vendor_setup.py.)

The reader runs in a child Python that has bpy, as the Blender side's package needs it: bpy is never
imported into the pytest process.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dit360_blender.pipeline.model_files.catalogue import COMPONENTS
from dit360_blender.protocol import CHILD_MESSAGES, MAX_MESSAGE_BYTES, decode

ROOT = Path(__file__).resolve().parents[1]


def run_download(*args: str, models: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")}
    env.update(HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "dit360_blender.worker.download", *args, "--models-dir", str(models)]
    return subprocess.run(cmd, env=env, capture_output=True, timeout=120)


def test_download_check_reports_found_in_the_protocols_framing(tmp_path):
    proc = run_download("--check", models=tmp_path)
    assert proc.returncode == 0, proc.stderr.decode()
    [found] = [decode(line, CHILD_MESSAGES) for line in proc.stdout.splitlines()]
    assert found["v"] == 1 and found["type"] == "found"
    assert set(found["components"]) == set(COMPONENTS) and not any(found["components"].values())


def test_download_failure_is_an_error_message_after_found(tmp_path):
    proc = run_download(models=tmp_path)  # offline, nothing there: the download must fail
    assert proc.returncode == 1
    messages = [decode(line, CHILD_MESSAGES) for line in proc.stdout.splitlines()]
    assert [m["type"] for m in messages] == ["found", "error"]
    assert messages[1]["code"] == "download_failed" and messages[1]["message"] and messages[1]["hint"]


CHILD = r"""
import sys
from dit360_blender.protocol import MAX_MESSAGE_BYTES, encode, message
out = sys.stdout.buffer
out.write(b"plain text from a library\n")
out.write(encode(message("found", components={"vae": None})))
out.write(b'{"v": 1, "type": "found"}\n')
out.write(b'{"event": "found", "components": {}}\n')
out.write(b'{"v": 99, "type": "found", "components": {}}\n')
out.write(b"x" * (MAX_MESSAGE_BYTES + 100) + b"\n")
out.write(b"{not json\n")
out.write(encode(message("download_progress", file="ae.safetensors", done=5, total=10)))
out.write(b"a traceback quoting hf_SECRETtoken\n")
out.write(encode(message("downloaded", components={"vae": "/m/ae.safetensors"})))
out.write(b"a last line without its newline")
"""

READER = r"""
import json, sys
from pathlib import Path
import bpy  # noqa: F401  (the Blender side's package imports it)
from dit360_blender.blender.tasks import BackgroundTask

child, log = sys.argv[1], Path(sys.argv[2])
task = BackgroundTask("fake", [sys.executable, child], log, secrets=["hf_SECRETtoken"])
assert task.wait(60)
first = task.take(3)
done_before = task.done
rest = task.take(1000)
print("RESULT " + json.dumps({"first": first, "rest": rest, "done_before": done_before, "done": task.done,
                              "rc": task.returncode, "last": sorted(task.last), "tail": task.tail}))
"""


@pytest.mark.skipif(importlib.util.find_spec("bpy") is None, reason="needs the bpy module")
def test_reader_hands_over_messages_and_text_and_logs_what_it_refuses(tmp_path):
    (tmp_path / "child.py").write_text(CHILD, encoding="utf-8")
    log = tmp_path / "logs" / "fake.log"
    env = dict(os.environ, PYTHONPATH=str(ROOT), BLENDER_USER_RESOURCES=str(tmp_path / "bpy-user"))
    proc = subprocess.run(
        [sys.executable, "-c", READER, str(tmp_path / "child.py"), str(log)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(next(line[7:] for line in proc.stdout.splitlines() if line.startswith("RESULT ")))
    assert len(result["first"]) == 3 and not result["done_before"]  # the rest waited in the queue
    assert result["first"] + result["rest"] == [
        "plain text from a library",
        {"v": 1, "type": "found", "components": {"vae": None}},
        '{"v": 1, "type": "found"}',  # refused messages arrive as text, in their place
        '{"event": "found", "components": {}}',
        '{"v": 99, "type": "found", "components": {}}',
        "{not json",  # the oversized line before it is gone
        {"v": 1, "type": "download_progress", "file": "ae.safetensors", "done": 5, "total": 10},
        "a traceback quoting ***",
        {"v": 1, "type": "downloaded", "components": {"vae": "/m/ae.safetensors"}},
        "a last line without its newline",
    ]
    assert result["done"] and result["rc"] == 0
    assert result["last"] == ["download_progress", "downloaded", "found"]
    assert all(isinstance(t, str) for t in result["tail"]) and "plain text from a library" in result["tail"]
    text = log.read_text(encoding="utf-8")
    assert "not a message: bad_message: found: field 'components' is missing" in text
    assert text.count("not a message: version_mismatch") == 2
    assert f"exceeded the {MAX_MESSAGE_BYTES}-byte limit and was discarded" in text
    assert "x" * 100 not in text and "hf_SECRETtoken" not in text
    assert "{not json" in text and "a last line without its newline" in text and "[exit code 0]" in text
