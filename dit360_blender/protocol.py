"""The wire protocol between the Blender-side client and the model worker. Standard library only.

Both sides import this module, so it holds everything they must agree on: framing, size limits,
message types and their fields, the error codes, and the `generate` parameters.

Framing
-------
One message per line: a UTF-8 JSON object followed by ``\\n`` (JSON escapes newlines inside strings,
so a raw newline only ever ends a message). A line longer than ``MAX_MESSAGE_BYTES`` is refused with
``message_too_large`` and skipped up to its end, so one bad frame never desynchronises the stream.
Blank lines are ignored. Nothing is ever pickled or evaluated: ``json.loads`` and field type checks.
Any string can be sent: a lone surrogate (how Python holds a non-UTF-8 byte of a file name, or what a
JSON ``"\\ud800"`` escape gives) has no UTF-8 form, so ``encode`` writes it as the text ``\\xNN`` (the
byte) or ``\\uXXXX``: readable, and never a reason to fail.

Every message has ``"v"`` (``PROTOCOL_VERSION``) and ``"type"``. Fields not listed below are ignored
(room for additions within a version); a missing or mistyped listed field is ``bad_message``.

Client → worker
~~~~~~~~~~~~~~~
========== ================================ =====================================================
type       fields                           meaning
========== ================================ =====================================================
hello      token, [client], [heartbeat]     must be the first message; a wrong token (or anything
                                            else first) gets an ``error`` and the connection closes;
                                            ``heartbeat``: the client pings at least every so many
                                            seconds (see Heartbeats)
generate   job_id, params                   queue a job (``params``: the table in ``params.py``);
edit                                        every job kind of ``params.JOB_KINDS`` is a message type
                                            of its own with these two fields, its params checked
                                            by ``check_job_params(kind, params)``; each kind has the
                                            same events (queued … result / error)
upscale                                     (the third kind: issue 15)
warm                                        a generate's params: load (and compile) for them,
                                            write nothing; ends in ``warmed`` (issue 13)
cancel     job_id                           stop the running job between two sampling steps, or
                                            drop it from the queue
status     –                                ask for a ``status`` reply
ping       –                                ask for a ``pong`` (see Heartbeats)
shutdown   –                                cancel everything and exit
========== ================================ =====================================================

Worker → client
~~~~~~~~~~~~~~~
========== ================================ =====================================================
ready      protocol, package_version,       reply to a good ``hello``, sent at once: jobs may be
           python_version, pid, [the        queued from here on. It carries the ``device``
           ``device`` fields]               fields when the worker has loaded torch already
device     torch_version, device,           torch and the pipeline are loaded (seconds after
           device_name, free_vram           ``ready``; not sent when ``ready`` had these fields);
           (bytes, null off CUDA)           a worker that fails to load them sends a fatal
                                            ``error`` (code worker_start_failed) instead
queued     job_id, position                 the job was accepted (position 0: runs next/now)
progress   job_id, stage, step, total,      stage is one of ``STAGES``; step/total count sampling
           elapsed, eta, [detail]           steps (0 before sampling, total after); elapsed since
                                            the job started running, eta in seconds or null
preview    job_id, step, total, width,      a small PNG (≤ ``MAX_PREVIEW_WIDTH`` × ``MAX_PREVIEW_HEIGHT``),
           height, mime, data (base64)      base64, from a linear latent→RGB projection (no VAE)
result     job_id, path, width, height,     the image was written to ``path`` (inside the job's
           metadata, timings, model_cached, output_dir); timings in seconds; memory: GPU memory
           [files], [native], [memory]      per stage in GiB (CUDA)
warmed     job_id, timings, model_cached    a ``warm`` job's end: its model is loaded (and compiled)
error      job_id (or null), code, message, a job failed (the job's final event) or a message was
           hint, [fatal], [details]         refused (job_id null); ``hint`` says the fix; ``fatal``:
                                            the worker exits after sending it
log        level, message, [job_id]         a notable worker log line (warnings, model loads)
status     running, queued, loads,          reply to ``status``; ``loads`` counts model loads in
           model_loaded, pid, rss_bytes     this worker (rss_bytes null where unknown)
pong       –                                reply to ``ping``, from the connection's reader thread
========== ================================ =====================================================

Heartbeats
~~~~~~~~~~
A worker can hang while its process lives (suspended, swapping to death, stuck holding the GIL), and
a client can hang too. So the client sends ``ping`` every ``PING_INTERVAL_S`` (it says how often in
its hello) and the worker answers ``pong`` from the thread that reads the socket, never the job's, so
a long job doesn't delay it. A side that hears nothing at all from the other for
``HEARTBEAT_MISSES`` intervals (``HEARTBEAT_TIMEOUT_S`` = 30 s by default) gives up on it: the client
ends the worker's unfinished jobs with ``worker_unresponsive`` and kills it (the next job starts a
fresh one); the worker treats a client that promised heartbeats and went silent as gone and exits.

Remote workers (``python -m dit360_blender.worker --serve``)
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
A serving worker is reached through an SSH tunnel; it shares no file system with its client, so
files travel in these messages, as chunks of at most ``CHUNK_BYTES`` (base64 in ``data``, each with
the ``sha256`` of its bytes; a whole file's ``sha256`` is declared up front). It keeps each job's
files in a folder of its own and its final event for ``RESULT_KEEP_S`` / ``RESULT_KEEP_BYTES``, so a
client whose connection dropped asks for the job again instead of running it again.

============ ======================================= ============================================
type         fields                                  meaning
============ ======================================= ============================================
upload_begin upload_id, name, size, sha256           client → worker: an input file follows
                                                     (at most ``MAX_UPLOAD_BYTES``)
upload_chunk upload_id, offset, data, sha256         client → worker: the next bytes, in order
uploaded     upload_id, size                         worker → client: complete, checksum right
(job kinds)  + [uploads]                             ``{param: upload_id}``: the worker reads that
                                                     input parameter (a ``path``) from the upload
fetch        job_id                                  client → worker: the job's final event again
                                                     (a result lists ``remote_files``), or
                                                     ``queued`` while it waits or runs (its later
                                                     events follow); ``unknown_job`` if gone
fetch_chunk  job_id, name, offset                    client → worker: bytes of a result file
chunk        job_id, name, offset, size, data,       worker → client: the reply (``size``: the
             sha256                                  whole file's)
release      job_id                                  client → worker: the files arrived; delete them
============ ======================================= ============================================

To a serving worker ``shutdown`` ends the client's session (its jobs are cancelled and the connection
closed); the worker serves on until it is stopped on its own machine.
A serving worker's ``result`` carries ``remote_files``: ``[{name, size, sha256}]``, the job's files
(``path`` and ``files`` name them in the worker's folder). A bad upload is refused with ``bad_upload``
(``details.upload_id``); the connection and the other jobs go on.

A job ends with exactly one ``result`` or ``error`` carrying its ``job_id``. A cancelled job ends
with ``error`` code ``cancelled`` (no separate event type: one "job ended badly" path for clients);
its ``details`` hold ``step`` (steps completed) and ``cancel_step`` (steps completed when the worker
received the cancel), so "stopped within one step" can be checked.

Child process → add-on
~~~~~~~~~~~~~~~~~~~~~~
The add-on's other children speak the same framing on stdout (``CHILD_MESSAGES``); any other line
(pip's output, a traceback) is only logged. The model download child (``worker/download.py``):

================== ======================== =================================================
found              components               what is present: {component: path or null}
download_progress  file, done, total        bytes of one repo file so far (total 0: unknown)
downloaded         components               everything is present (exit code 0)
error              code, message, hint      it failed (exit code 1)
================== ======================== =================================================

``vendor_setup.py --check --json``: one ``deps`` message (python, python_version, packages, device,
device_name, missing, ok, target): what imports in the worker's Python and which device torch sees.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from typing import Any

from .params import GENERATE, JOB_KINDS, ParamError, check_params

PROTOCOL_VERSION = 1
MAX_MESSAGE_BYTES = 1 << 20  # 1 MiB per line: a 512x256 preview PNG in base64 is at most ~530 KB
MAX_PREVIEW_WIDTH, MAX_PREVIEW_HEIGHT = 512, 256

TOKEN_ENV = "DIT360_WORKER_TOKEN"  # the per-launch secret travels in the environment, never in argv
PORT_ANNOUNCE = "DIT360_WORKER_PORT"  # the worker's first stdout line: "DIT360_WORKER_PORT <port>"

# "upscaling"/"refining": an upscale job; its step/total count tiles (refine: tile-steps)
STAGES = ("loading", "encoding", "sampling", "decoding", "saving", "upscaling", "refining", "compiling")

PING_INTERVAL_S = 2.0  # the client's ping period (see Heartbeats)
HEARTBEAT_MISSES = 15  # silent intervals before a side gives up on the other
HEARTBEAT_TIMEOUT_S = PING_INTERVAL_S * HEARTBEAT_MISSES

# Error codes: every code an `error` message or a client-side failure carries is declared here, and
# `error()` refuses any other (tests/test_error_codes.py checks these lists against every code the
# package produces). Job errors mirror the pipeline's DiT360Error codes plus the worker's own.
PROTOCOL_ERRORS = (
    "bad_message",  # not JSON, not an object, a field missing or of the wrong type
    "message_too_large",  # a line over MAX_MESSAGE_BYTES
    "unknown_type",  # a "type" this version does not know
    "version_mismatch",  # "v" is not PROTOCOL_VERSION
    "unauthorized",  # wrong token in hello
    "not_authenticated",  # something other than hello first
    "busy",  # another client owns this worker, or MAX_QUEUED_JOBS jobs wait already (job_id set)
    "unknown_job",  # cancel for a job the worker does not have (it may have just finished)
    "bad_upload",  # an upload too large, out of order, with a wrong checksum, or unknown (details.upload_id)
)
JOB_ERRORS = (
    "bad_parameters",
    "weights_missing",
    "bad_checkpoint",
    "lora_mismatch",
    "download_failed",
    "download_gated",
    "out_of_memory",
    "cuda_error",
    "device_unavailable",
    "rank_failed",  # a process of a multi-GPU group died or failed (worker/ranks.py); the next job restarts it
    "disk_write_failed",
    "cancelled",
    "internal",
)
CLIENT_ERRORS = (
    "worker_died",  # the worker process exited while a job was unfinished
    "worker_start_failed",  # no worker: its Python is missing or broken, or it did not answer
    "worker_unresponsive",  # the worker's process lives but answered no ping for HEARTBEAT_TIMEOUT_S
    "apply_failed",  # Blender could not apply a finished result (the image is gone)
    "remote_unreachable",  # the remote worker or its SSH tunnel could not be reached (the cause said)
    "transfer_failed",  # a file could not be moved over the connection intact (checksum, disk)
)
ERROR_CODES = PROTOCOL_ERRORS + JOB_ERRORS + CLIENT_ERRORS

_JOB_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_ID_FIELDS = ("job_id", "upload_id")  # both follow _JOB_ID_RE

# Remote workers: files over the socket (see "Remote workers" above)
SERVE_PORT = 7860  # a serving worker's loopback port unless --port says otherwise
CHUNK_BYTES = 256 * 1024  # raw bytes a chunk carries: ~350 KB of base64, a third of a frame
MAX_UPLOAD_BYTES = 512 << 20  # one input file (a 16K x 8K PNG is ~400 MB at worst)
MAX_UPLOADS_BYTES = 2 << 30  # all uploads a serving worker holds at once
MAX_FILE_NAME = 200  # characters of a transferred file's name (no folders in it)
RESULT_KEEP_S = 6 * 3600.0  # a finished job's files wait this long for their client
RESULT_KEEP_BYTES = 8 << 30  # and the finished jobs' files together stay under this


class ProtocolError(ValueError):
    """A message or parameter that cannot be accepted, with its protocol error code and the fix."""

    def __init__(self, code: str, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.hint = hint

    def to_message(self, job_id: str | None = None) -> dict:
        """The `error` message that refuses it."""
        return error(self.code, self.message, self.hint, job_id=job_id)


# ----------------------------------------------------------------------------------------------
# Message schemas: field -> (accepted kinds, required). Kinds are checked by `_kind_ok`.

_S, _I, _N, _B, _D, _L, _0 = "str", "int", "num", "bool", "dict", "list", "null"

CLIENT_MESSAGES: dict[str, dict[str, tuple[tuple[str, ...], bool]]] = {
    "hello": {"token": ((_S,), True), "client": ((_S,), False), "heartbeat": ((_N,), False)},
    **{
        kind: {"job_id": ((_S,), True), "params": ((_D,), True), "uploads": ((_D,), False)}
        for kind in JOB_KINDS
    },
    "cancel": {"job_id": ((_S,), True)},
    "status": {},
    "ping": {},
    "shutdown": {},
    "upload_begin": {
        "upload_id": ((_S,), True),
        "name": ((_S,), True),
        "size": ((_I,), True),
        "sha256": ((_S,), True),
    },
    "upload_chunk": {
        "upload_id": ((_S,), True),
        "offset": ((_I,), True),
        "data": ((_S,), True),
        "sha256": ((_S,), True),
    },
    "fetch": {"job_id": ((_S,), True)},
    "fetch_chunk": {"job_id": ((_S,), True), "name": ((_S,), True), "offset": ((_I,), True)},
    "release": {"job_id": ((_S,), True)},
}

WORKER_MESSAGES: dict[str, dict[str, tuple[tuple[str, ...], bool]]] = {
    "ready": {
        "protocol": ((_I,), True),
        "package_version": ((_S,), True),
        "python_version": ((_S,), True),
        "pid": ((_I,), True),
        # the `device` fields, when torch was loaded before the client said hello
        "torch_version": ((_S,), False),
        "device": ((_S,), False),
        "device_name": ((_S,), False),
        "free_vram": ((_I, _0), False),
    },
    "device": {  # torch and the pipeline are loaded: what the jobs will run on
        "torch_version": ((_S,), True),
        "device": ((_S,), True),
        "device_name": ((_S,), True),
        "free_vram": ((_I, _0), True),
    },
    "queued": {"job_id": ((_S,), True), "position": ((_I,), True)},
    "progress": {
        "job_id": ((_S,), True),
        "stage": ((_S,), True),
        "step": ((_I,), True),
        "total": ((_I,), True),
        "elapsed": ((_N,), True),
        "eta": ((_N, _0), True),
        "detail": ((_S, _0), False),
    },
    "preview": {
        "job_id": ((_S,), True),
        "step": ((_I,), True),
        "total": ((_I,), True),
        "width": ((_I,), True),
        "height": ((_I,), True),
        "mime": ((_S,), True),
        "data": ((_S,), True),
    },
    "result": {
        "job_id": ((_S,), True),
        "path": ((_S,), True),
        "width": ((_I,), True),
        "height": ((_I,), True),
        "metadata": ((_D,), True),
        "timings": ((_D,), True),
        "model_cached": ((_B,), True),
        "files": ((_D,), False),  # {"hdr", "lighting"[, "hdr_exr", "lighting_exr"]: path} with HDR files
        "remote_files": ((_L,), False),  # a serving worker's: [{name, size, sha256}] (Remote workers)
        "native": ((_D,), False),  # a generate with size: the generated {path, width, height, files}
        "memory": ((_D,), False),  # GPU memory per stage, GiB (pipeline/memory_peaks.py); CUDA only
    },
    "warmed": {  # a warm job's end: the model is loaded (and compiled) for its parameters
        "job_id": ((_S,), True),
        "timings": ((_D,), True),
        "model_cached": ((_B,), True),
    },
    "error": {
        "job_id": ((_S, _0), True),
        "code": ((_S,), True),
        "message": ((_S,), True),
        "hint": ((_S,), True),
        "fatal": ((_B,), False),
        "details": ((_D,), False),
    },
    "log": {"level": ((_S,), True), "message": ((_S,), True), "job_id": ((_S, _0), False)},
    "status": {
        "running": ((_S, _0), True),
        "queued": ((_L,), True),
        "loads": ((_I,), True),
        "model_loaded": ((_B,), True),
        "pid": ((_I,), True),
        "rss_bytes": ((_I, _0), True),
    },
    "pong": {},
    "chunk": {
        "job_id": ((_S,), True),
        "name": ((_S,), True),
        "offset": ((_I,), True),
        "size": ((_I,), True),
        "data": ((_S,), True),
        "sha256": ((_S,), True),
    },
    "uploaded": {"upload_id": ((_S,), True), "size": ((_I,), True)},
}

FINAL_TYPES = ("result", "warmed", "error")  # a job's last event is one of these (with its job_id)
SUCCESS_TYPES = ("result", "warmed")  # the final events of a job that did what it was asked

CHILD_MESSAGES: dict[str, dict[str, tuple[tuple[str, ...], bool]]] = {
    "found": {"components": ((_D,), True)},
    "download_progress": {"file": ((_S,), True), "done": ((_I,), True), "total": ((_I,), True)},
    "downloaded": {"components": ((_D,), True)},
    "error": {"code": ((_S,), True), "message": ((_S,), True), "hint": ((_S,), True)},
    "deps": {
        "python": ((_S,), True),
        "python_version": ((_S,), True),
        "packages": ((_D,), True),
        "device": ((_S, _0), True),
        "device_name": ((_S, _0), True),
        "missing": ((_L,), True),
        "ok": ((_B,), True),
        "target": ((_S, _0), True),
    },
}


# ----------------------------------------------------------------------------------------------
# Building and encoding


def message(type_: str, **fields: Any) -> dict:
    """A message dict with the version and type set."""
    return {"v": PROTOCOL_VERSION, "type": type_, **fields}


def error(code: str, message_: str, hint: str = "", job_id: str | None = None, **extra: Any) -> dict:
    """An `error` message; `extra` may carry `fatal` and `details`. `code` must be one of
    ERROR_CODES: clients act on codes (fix buttons, retries), so a new one is declared first."""
    if code not in ERROR_CODES:
        raise ValueError(f"undeclared error code {code!r}: add it to protocol.py's error lists")
    return message("error", job_id=job_id, code=code, message=message_, hint=hint, **extra)


def encode(msg: Mapping[str, Any], limit: int = MAX_MESSAGE_BYTES) -> bytes:
    """One frame: compact JSON + newline. Raises ProtocolError if it would exceed `limit`."""
    if "v" not in msg or "type" not in msg:
        raise ProtocolError("bad_message", "A message needs 'v' and 'type'.", "Build it with message().")
    try:
        text = json.dumps(msg, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError, RecursionError) as exc:
        raise ProtocolError("bad_message", f"Message is not JSON-serialisable: {exc}.") from None
    try:
        data = text.encode("utf-8") + b"\n"
    except UnicodeEncodeError:  # lone surrogates: they only occur inside JSON strings
        data = _LONE_SURROGATE.sub(_escaped_surrogate, text).encode("utf-8") + b"\n"
    if len(data) > limit:
        raise ProtocolError(
            "message_too_large",
            f"A {msg['type']} message of {len(data)} bytes exceeds the {limit}-byte limit.",
            "Send less (previews at most 512x256).",
        )
    return data


_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def _escaped_surrogate(match: re.Match) -> str:
    """The JSON text of a backslash escape standing for one lone surrogate."""
    code = ord(match.group())
    if 0xDC80 <= code <= 0xDCFF:  # surrogateescape: the file name's byte, as Python writes bytes
        return f"\\\\x{code - 0xDC00:02x}"
    return f"\\\\u{code:04x}"


# ----------------------------------------------------------------------------------------------
# Framing and decoding


class FrameDecoder:
    """Splits a byte stream into lines, enforcing the size limit without buffering more than it.

    `feed` returns, in stream order, each complete line (bytes, newline stripped) or a
    ProtocolError for a frame that was too large (its bytes are discarded up to its newline).
    """

    def __init__(self, limit: int = MAX_MESSAGE_BYTES) -> None:
        self.limit = limit
        self._buf = bytearray()
        self._scanned = 0  # bytes of _buf already known to hold no newline
        self._skipping = False  # inside an oversized frame: drop bytes until its newline

    def feed(self, data: bytes) -> list[bytes | ProtocolError]:
        out: list[bytes | ProtocolError] = []
        self._buf += data
        while True:
            nl = self._buf.find(b"\n", self._scanned)
            if nl < 0:
                self._scanned = len(self._buf)
                if len(self._buf) > self.limit:
                    if not self._skipping:
                        out.append(_too_large(self.limit))
                    self._skipping = True
                    self._buf.clear()
                    self._scanned = 0
                return out
            line = bytes(self._buf[:nl]).rstrip(b"\r")
            del self._buf[: nl + 1]
            self._scanned = 0
            if self._skipping:  # the tail of a frame already refused
                self._skipping = False
            elif len(line) > self.limit:
                out.append(_too_large(self.limit))
            elif line.strip():
                out.append(line)


def _too_large(limit: int) -> ProtocolError:
    return ProtocolError(
        "message_too_large",
        f"A message exceeded the {limit}-byte limit and was discarded.",
        "Send messages under 1 MiB, one JSON object per line.",
    )


def decode(line: bytes | str, schemas: Mapping[str, Mapping[str, tuple]] = CLIENT_MESSAGES) -> dict:
    """Parse and check one line against `schemas` (CLIENT_MESSAGES in the worker, WORKER_MESSAGES
    in the client). Raises ProtocolError; never anything else."""
    try:
        text = line.decode("utf-8") if isinstance(line, (bytes, bytearray)) else line
        msg = json.loads(text)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise ProtocolError(
            "bad_message", "The message is not valid UTF-8 JSON.", "Send one JSON object per line."
        ) from None
    if not isinstance(msg, dict):
        raise ProtocolError("bad_message", "The message is not a JSON object.", "Send a JSON object.")
    version = msg.get("v")
    if not _kind_ok(version, _I) or version != PROTOCOL_VERSION:
        raise ProtocolError(
            "version_mismatch",
            f"Protocol version {version!r} is not supported; this side speaks version {PROTOCOL_VERSION}.",
            "Use the client and worker of the same add-on version (restart Blender after updating).",
        )
    type_ = msg.get("type")
    if not isinstance(type_, str) or type_ not in schemas:
        raise ProtocolError(
            "unknown_type",
            f"Unknown message type {type_!r}.",
            f"Known types: {', '.join(schemas)}.",
        )
    _check_fields(type_, msg, schemas[type_])
    return msg


def _check_fields(type_: str, msg: dict, schema: Mapping[str, tuple]) -> None:
    for name, (kinds, required) in schema.items():
        if name not in msg:
            if required:
                raise ProtocolError("bad_message", f"{type_}: field {name!r} is missing.")
            continue
        if not any(_kind_ok(msg[name], k) for k in kinds):
            raise ProtocolError(
                "bad_message", f"{type_}: field {name!r} must be {' or '.join(kinds)}, got {msg[name]!r:.80}."
            )
    for field in _ID_FIELDS:
        value = msg.get(field)
        if field in schema and value is not None and not _JOB_ID_RE.match(value):
            raise ProtocolError(
                "bad_message",
                f"{type_}: {field} must be 1-64 letters, digits, '-' or '_', got {value!r:.80}.",
            )


def _kind_ok(value: Any, kind: str) -> bool:
    if kind == _I:  # JSON true/false are bools in Python, which are ints: not accepted as numbers
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == _N:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return isinstance(value, {_S: str, _B: bool, _D: dict, _L: list, _0: type(None)}[kind])


# ----------------------------------------------------------------------------------------------
# The analysis in a result's metadata: what the add-on reads to light the scene and fill the panel.
# Nested dicts are objects with (at least) these fields; _V3 is a list of three numbers. The worker
# writes more (candidates, settings); only these fields are a contract.

_V3 = "vec3"
SUN_LAMP_SCHEMA = {"direction": _V3, "rotation_euler": _V3, "color": _V3, "strength": _N, "angle": _N}
SUN_ESTIMATE_SCHEMA = {"azimuth_deg": _N, "elevation_deg": _N, "diameter_deg": _N, "direction": _V3}
ANALYSIS_SCHEMA: dict[str, Any] = {
    "seam": {"seam_z": _N, "seam_ok": _B, "seam_z_offset": _N, "pole_detail_ratio": (_N, _0)},
    "lighting": {
        "exposure": _N,
        "sun_share": _N,
        "sun_irradiance_rgb": _V3,
        "sun_lamp": (SUN_LAMP_SCHEMA, _0),
        "sun": {"found": _B, "reason": _S, "sun": (SUN_ESTIMATE_SCHEMA, _0)},
    },
}


def check_analysis(metadata: Mapping[str, Any]) -> None:
    """Raise ProtocolError (``bad_message``) unless the metadata's ``seam`` and ``lighting`` (when
    present: a job without HDR has neither) follow ANALYSIS_SCHEMA."""
    for key, schema in ANALYSIS_SCHEMA.items():
        if key in metadata:
            _check_shape(metadata[key], schema, key)


def _check_shape(value: Any, schema: Any, where: str) -> None:
    alternatives = schema if isinstance(schema, tuple) else (schema,)
    problems = []
    for alt in alternatives:
        try:
            _check_one_shape(value, alt, where)
            return
        except ProtocolError as exc:
            problems.append(exc.message)
    raise ProtocolError("bad_message", problems[0], "The worker and the add-on disagree: update both.")


def _check_one_shape(value: Any, schema: Any, where: str) -> None:
    if isinstance(schema, dict):
        if not isinstance(value, dict):
            raise ProtocolError("bad_message", f"{where} must be an object, got {value!r:.60}.")
        for name, sub in schema.items():
            if name not in value:
                raise ProtocolError("bad_message", f"{where}.{name} is missing.")
            _check_shape(value[name], sub, f"{where}.{name}")
    elif schema == _V3:
        if not (isinstance(value, list) and len(value) == 3 and all(_kind_ok(x, _N) for x in value)):
            raise ProtocolError("bad_message", f"{where} must be three numbers, got {value!r:.60}.")
    elif not _kind_ok(value, schema):
        raise ProtocolError("bad_message", f"{where} must be {schema}, got {value!r:.60}.")


# ----------------------------------------------------------------------------------------------
# job parameters (every kind): the table in params.py owns names, defaults and limits


def check_job_params(kind: str, params: Mapping[str, Any]) -> dict:
    """The params of a job of `kind` (one of ``params.JOB_KINDS``) checked against the parameter
    table, defaults filled; returns a new dict.

    Raises ProtocolError with code ``bad_parameters`` (the message and the fix from the table).
    """
    try:
        return check_params(params, kind)
    except ParamError as exc:
        raise ProtocolError("bad_parameters", exc.message, exc.hint) from None


def check_generate_params(params: Mapping[str, Any]) -> dict:
    """`check_job_params` for a `generate` job."""
    return check_job_params(GENERATE, params)
