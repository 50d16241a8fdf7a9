"""The wire protocol on its own: framing, limits, message checks, generate parameters; and that the
Blender-side modules (protocol, client) import only the standard library."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from dit360_blender import params
from dit360_blender import protocol as P
from dit360_blender.protocol import FrameDecoder, ProtocolError

ROOT = Path(__file__).resolve().parents[1]


def _params(**over):
    return {"prompt": "This is a panorama. A beach", "output_dir": str(ROOT / "out"), **over}


# -- encode / decode -------------------------------------------------------------------------------


def test_roundtrip_is_one_compact_line():
    msg = P.message("generate", job_id="abc_1", params=_params(prompt="Nächt\nüber dem Meer 🌊"))
    data = P.encode(msg)
    assert data.endswith(b"\n") and data.count(b"\n") == 1  # newlines inside strings are escaped
    assert P.decode(data[:-1]) == msg


@pytest.mark.parametrize(
    "line, code",
    [
        (b"{not json", "bad_message"),
        (b"\xff\xfe{}", "bad_message"),
        (b"[1, 2]", "bad_message"),
        (b'"hello"', "bad_message"),
        (b'{"type": "status"}', "version_mismatch"),
        (b'{"v": 2, "type": "status"}', "version_mismatch"),
        (b'{"v": true, "type": "status"}', "version_mismatch"),
        (b'{"v": 1, "type": "reboot"}', "unknown_type"),
        (b'{"v": 1}', "unknown_type"),
        (b'{"v": 1, "type": "cancel"}', "bad_message"),
        (b'{"v": 1, "type": "cancel", "job_id": 5}', "bad_message"),
        (b'{"v": 1, "type": "cancel", "job_id": "../etc"}', "bad_message"),
        (b'{"v": 1, "type": "hello", "token": null}', "bad_message"),
        (b"[" * 100_000, "bad_message"),  # deep nesting: RecursionError is caught too
    ],
)
def test_decode_refuses_with_a_code(line, code):
    with pytest.raises(ProtocolError) as info:
        P.decode(line)
    assert info.value.code == code
    reply = info.value.to_message()
    assert reply["type"] == "error" and reply["code"] == code and reply["v"] == P.PROTOCOL_VERSION
    P.decode(P.encode(reply)[:-1], P.WORKER_MESSAGES)  # the refusal itself is a valid message


def test_worker_side_schemas():
    P.decode(
        P.encode(
            P.message("status", running=None, queued=[], loads=1, model_loaded=True, pid=1, rss_bytes=None)
        ),
        P.WORKER_MESSAGES,
    )
    with pytest.raises(ProtocolError):  # ints are not bools
        P.decode(P.encode(P.message("queued", job_id="a", position=True)), P.WORKER_MESSAGES)
    with pytest.raises(ProtocolError):  # a worker message is not a client message
        P.decode(P.encode(P.message("ready")), P.CLIENT_MESSAGES)


def test_unknown_extra_fields_are_ignored():
    assert P.decode(b'{"v": 1, "type": "status", "later": [1]}')["type"] == "status"


def test_encode_enforces_the_limit():
    with pytest.raises(ProtocolError) as info:
        P.encode(P.message("log", level="info", message="x" * P.MAX_MESSAGE_BYTES))
    assert info.value.code == "message_too_large"
    with pytest.raises(ProtocolError):
        P.encode({"type": "status"})  # no version
    with pytest.raises(ProtocolError):
        P.encode(P.message("log", level="info", message=float("nan")))


# -- framing ---------------------------------------------------------------------------------------


def test_frames_split_and_joined_arbitrarily():
    stream = b"".join(P.encode(P.message("cancel", job_id=f"j{i}")) for i in range(5)) + b"\r\n\n"
    for chunk in (1, 3, 7, len(stream)):
        dec = FrameDecoder()
        lines = []
        for i in range(0, len(stream), chunk):
            lines += dec.feed(stream[i : i + chunk])
        assert [P.decode(x)["job_id"] for x in lines] == [f"j{i}" for i in range(5)]


def test_oversized_frame_is_refused_once_and_skipped():
    dec = FrameDecoder(limit=1000)
    good = P.encode(P.message("status"))
    out = dec.feed(good + b"x" * 600)
    out += dec.feed(b"x" * 600)  # over the limit without a newline: refused now, buffer dropped
    assert len(dec._buf) <= 1000
    out += dec.feed(b"x" * 5000)  # still the same frame: no second error
    out += dec.feed(b"tail\n" + good)
    kinds = [x.code if isinstance(x, ProtocolError) else P.decode(x)["type"] for x in out]
    assert kinds == ["status", "message_too_large", "status"]


def test_oversized_complete_line_in_one_chunk():
    dec = FrameDecoder(limit=100)
    out = dec.feed(b"y" * 150 + b"\n" + P.encode(P.message("shutdown")))
    assert isinstance(out[0], ProtocolError) and out[0].code == "message_too_large"
    assert P.decode(out[1])["type"] == "shutdown"


# -- generate parameters ---------------------------------------------------------------------------


def test_params_defaults_and_normalisation():
    p = P.check_generate_params(_params(filename="my pano.png"))
    assert p["steps"] == 28 and p["guidance"] == 2.8 and p["width"] == 2048 and p["dtype"] == "auto"
    assert p["filename"] == "my pano"
    assert p["models"] == {"models_dir": None, "paths": {}, "allow_download": False}
    assert p["memory_mode"] == "auto" and p["preview_every"] == 1


@pytest.mark.parametrize(
    "over",
    [
        {"prompt": None},
        {"output_dir": None},
        {"output_dir": "relative/out"},
        {"steps": 2.5},
        {"steps": True},
        {"seed": "1"},
        {"guidance": float("inf")},
        {"device": "tpu"},
        {"dtype": "int8"},
        {"memory_mode": "swap"},
        {"preview_every": -1},
        {"lora_strength": 100.0},
        {"filename": "../escape"},
        {"filename": "sub/dir"},
        {"filename": "sub\\dir"},
        {"filename": ".hidden"},
        {"filename": "/abs"},
        {"filename": "CON"},
        {"filename": "a..b"},
        {"models": {"models_dir": 3}},
        {"models": {"paths": {"transformer": 1}}},
        {"models": {"allow_download": "yes"}},
        {"models": {"token": "x"}},
        {"hf_token": "x"},
        {"prompt": "x" * (params.MAX_PROMPT_CHARS + 1)},
    ],
)
def test_params_refused(over):
    with pytest.raises(ProtocolError) as info:
        P.check_generate_params(_params(**over))
    assert info.value.code == "bad_parameters" and info.value.hint


def test_params_not_a_mapping():
    with pytest.raises(ProtocolError):
        P.check_generate_params(["prompt"])


# -- the Blender side stays standard-library only ----------------------------------------------------


@pytest.mark.parametrize("module", ["protocol.py", "client.py", "worker_process.py", "params.py"])
def test_blender_side_modules_import_only_the_standard_library(module):
    tree = ast.parse((ROOT / "dit360_blender" / module).read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: only these standard-library-only modules of the package
                stdlib_only = ("_version", "launch", "params", "protocol", "redact", "worker_process")
                assert node.module in stdlib_only, node.module
                continue
            names = [node.module]
        else:
            continue
        for name in names:
            assert name.split(".")[0] in sys.stdlib_module_names or name == "__future__", name


def test_importing_the_client_loads_neither_torch_nor_bpy():
    code = (
        "import sys; import dit360_blender.client, dit360_blender.protocol; "
        "bad = [m for m in ('torch', 'bpy', 'numpy', 'dit360_blender.pipeline') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_protocol_doc_lists_every_message_type():
    doc = P.__doc__
    for name in [*P.CLIENT_MESSAGES, *P.WORKER_MESSAGES]:
        assert f"\n{name} " in doc, name
    assert json.loads(json.dumps(params.defaults()))  # defaults are plain JSON
