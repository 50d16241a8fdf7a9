"""The wire protocol between the Blender-side client and the model worker. Standard library only.

Both sides import this module, so it holds everything they must agree on: framing, size limits,
message types and their fields, the error codes, and the `generate` parameters.

Framing
-------
One message per line: a UTF-8 JSON object followed by ``\\n`` (JSON escapes newlines inside strings,
so a raw newline only ever ends a message). A line longer than ``MAX_MESSAGE_BYTES`` is refused with
``message_too_large`` and skipped up to its end, so one bad frame never desynchronises the stream.
Blank lines are ignored. Nothing is ever pickled or evaluated: ``json.loads`` and field type checks.

Every message has ``"v"`` (``PROTOCOL_VERSION``) and ``"type"``. Fields not listed below are ignored
(room for additions within a version); a missing or mistyped listed field is ``bad_message``.

Client → worker
~~~~~~~~~~~~~~~
========== ================================ =====================================================
type       fields                           meaning
========== ================================ =====================================================
hello      token, [client]                  must be the first message; a wrong token (or anything
                                            else first) gets an ``error`` and the connection closes
generate   job_id, params                   queue a job (``params``: see ``GENERATE_DEFAULTS``)
cancel     job_id                           stop the running job between two sampling steps, or
                                            drop it from the queue
status     –                                ask for a ``status`` reply
shutdown   –                                cancel everything and exit
========== ================================ =====================================================

Worker → client
~~~~~~~~~~~~~~~
========== ================================ =====================================================
ready      protocol, package_version,       reply to a good ``hello``
           torch_version, python_version,
           device, device_name, free_vram
           (bytes, null off CUDA), pid
queued     job_id, position                 the job was accepted (position 0: runs next/now)
progress   job_id, stage, step, total,      stage is one of ``STAGES``; step/total count sampling
           elapsed, eta, [detail]           steps (0 before sampling, total after); elapsed since
                                            the job started running, eta in seconds or null
preview    job_id, step, total, width,      a small PNG (≤ ``MAX_PREVIEW_WIDTH`` × ``MAX_PREVIEW_HEIGHT``),
           height, mime, data (base64)      base64, from a linear latent→RGB projection (no VAE)
result     job_id, path, width, height,     the image was written to ``path`` (inside the job's
           metadata, timings, model_cached  output_dir); timings in seconds
error      job_id (or null), code, message, a job failed (the job's final event) or a message was
           hint, [fatal], [details]         refused (job_id null); ``hint`` says the fix; ``fatal``:
                                            the worker exits after sending it
log        level, message, [job_id]         a notable worker log line (warnings, model loads)
status     running, queued, loads,          reply to ``status``; ``loads`` counts model loads in
           model_loaded, pid, rss_bytes     this worker (rss_bytes null where unknown)
========== ================================ =====================================================

A job ends with exactly one ``result`` or ``error`` carrying its ``job_id``. A cancelled job ends
with ``error`` code ``cancelled`` (no separate event type: one "job ended badly" path for clients);
its ``details`` hold ``step`` (steps completed) and ``cancel_step`` (steps completed when the worker
received the cancel), so "stopped within one step" can be checked.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from typing import Any

PROTOCOL_VERSION = 1
MAX_MESSAGE_BYTES = 1 << 20  # 1 MiB per line: a 512x256 preview PNG in base64 is at most ~530 KB
MAX_PREVIEW_WIDTH, MAX_PREVIEW_HEIGHT = 512, 256
MAX_PROMPT_CHARS = 4000  # T5 reads 512 tokens; anything much longer is a mistake, not a prompt

TOKEN_ENV = "DIT360_WORKER_TOKEN"  # the per-launch secret travels in the environment, never in argv
PORT_ANNOUNCE = "DIT360_WORKER_PORT"  # the worker's first stdout line: "DIT360_WORKER_PORT <port>"

STAGES = ("loading", "encoding", "sampling", "decoding", "saving")
DTYPES = ("fp32", "bf16", "fp16")
MEMORY_MODES = ("auto", "resident", "fp8", "stream")

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
    "busy",  # another client already owns this worker (in Blender: a generation is running)
    "unknown_job",  # cancel for a job the worker does not have (it may have just finished)
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
    "disk_write_failed",
    "cancelled",
    "internal",
)
CLIENT_ERRORS = (
    "worker_died",  # the worker process exited while a job was unfinished
    "worker_start_failed",  # no worker: its Python is missing or broken, or it did not answer
    "apply_failed",  # Blender could not apply a finished result (the image is gone)
)
ERROR_CODES = PROTOCOL_ERRORS + JOB_ERRORS + CLIENT_ERRORS

_JOB_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


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
    "hello": {"token": ((_S,), True), "client": ((_S,), False)},
    "generate": {"job_id": ((_S,), True), "params": ((_D,), True)},
    "cancel": {"job_id": ((_S,), True)},
    "status": {},
    "shutdown": {},
}

WORKER_MESSAGES: dict[str, dict[str, tuple[tuple[str, ...], bool]]] = {
    "ready": {
        "protocol": ((_I,), True),
        "package_version": ((_S,), True),
        "torch_version": ((_S,), True),
        "python_version": ((_S,), True),
        "device": ((_S,), True),
        "device_name": ((_S,), True),
        "free_vram": ((_I, _0), True),
        "pid": ((_I,), True),
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
        "files": ((_D,), False),  # {"hdr": path, "lighting": path} when HDR files were written
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
}

FINAL_TYPES = ("result", "error")  # a job's last event is one of these (with its job_id)


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
    except (TypeError, ValueError) as exc:
        raise ProtocolError("bad_message", f"Message is not JSON-serialisable: {exc}.") from None
    data = text.encode("utf-8") + b"\n"
    if len(data) > limit:
        raise ProtocolError(
            "message_too_large",
            f"A {msg['type']} message of {len(data)} bytes exceeds the {limit}-byte limit.",
            "Send less (previews at most 512x256).",
        )
    return data


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
    job_id = msg.get("job_id")
    if "job_id" in schema and job_id is not None and not _JOB_ID_RE.match(job_id):
        raise ProtocolError(
            "bad_message", f"{type_}: job_id must be 1-64 letters, digits, '-' or '_', got {job_id!r:.80}."
        )


def _kind_ok(value: Any, kind: str) -> bool:
    if kind == _I:  # JSON true/false are bools in Python, which are ints: not accepted as numbers
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == _N:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return isinstance(value, {_S: str, _B: bool, _D: dict, _L: list, _0: type(None)}[kind])


# ----------------------------------------------------------------------------------------------
# generate parameters

GENERATE_DEFAULTS: dict[str, Any] = {
    "prompt": None,  # required
    "output_dir": None,  # required, absolute: the only folder the worker writes the image into
    "seed": 0,
    "steps": 28,
    "guidance": 2.8,
    "width": 2048,
    "height": 1024,
    "lora_strength": 1.0,
    "device": "auto",  # auto | cpu | cuda | cuda:N | mps
    "dtype": "bf16",  # fp32 | bf16 | fp16
    "memory_mode": "auto",  # auto | resident | fp8 | stream (pipeline/memory.py); auto picks by free VRAM
    "vram_budget_gib": None,  # caps what `auto`/`stream` may use; null = the free VRAM
    "compile": "auto",  # "auto" | true | false: regional torch.compile (auto: CUDA with Triton, not stream)
    "hdr": True,  # also write <stem>.hdr and <stem>_lighting.hdr (panorama/hdr.py) next to the PNG
    "sun_share": 0.6,  # the sun's share of the HDR environment's light, in [0, 1)
    "filename": None,  # a plain file stem; default <slug-of-prompt>_<seed>
    "preview_every": 1,  # a preview every N sampling steps; 0 = none
    "models": None,  # {"models_dir": str|None, "paths": {component: str}, "allow_download": bool}
}
MODELS_DEFAULTS: dict[str, Any] = {"models_dir": None, "paths": {}, "allow_download": False}

_PARAM_KINDS: dict[str, tuple[str, ...]] = {
    "prompt": (_S,),
    "output_dir": (_S,),
    "seed": (_I,),
    "steps": (_I,),
    "guidance": (_N,),
    "width": (_I,),
    "height": (_I,),
    "lora_strength": (_N,),
    "device": (_S,),
    "dtype": (_S,),
    "memory_mode": (_S,),
    "vram_budget_gib": (_N, _0),
    "compile": (_S, _B),
    "hdr": (_B,),
    "sun_share": (_N,),
    "filename": (_S, _0),
    "preview_every": (_I,),
    "models": (_D, _0),
}
_DEVICE_RE = re.compile(r"^(auto|cpu|mps|cuda(:\d{1,2})?)$")
_STEM_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._ -]{0,99}$")
_WINDOWS_RESERVED = {
    "con",
    "prn",
    "aux",
    "nul",
    *(f"com{i}" for i in range(1, 10)),
    *(f"lpt{i}" for i in range(1, 10)),
}


def check_generate_params(params: Mapping[str, Any]) -> dict:
    """Type-check `generate` params and fill defaults; returns a new dict.

    Ranges that depend on the model (size multiple of 16, 2:1, steps) are the pipeline's
    `GenerateRequest.validate`; this checks what both sides can check without torch.
    Raises ProtocolError with code ``bad_parameters``.
    """
    if not isinstance(params, Mapping):
        raise _bad("The job parameters must be an object.", "Pass a dict of parameters.")
    unknown = sorted(set(params) - set(GENERATE_DEFAULTS))
    if unknown:
        raise _bad(
            f"Unknown parameter(s): {', '.join(map(str, unknown))}.",
            f"Known: {', '.join(GENERATE_DEFAULTS)}.",
        )
    out = {**GENERATE_DEFAULTS, **params}
    for name, kinds in _PARAM_KINDS.items():
        if out[name] is None and name in ("prompt", "output_dir"):
            raise _bad(f"The parameter {name!r} is required.", _REQUIRED_HINTS[name])
        if not any(_kind_ok(out[name], k) for k in kinds):
            raise _bad(
                f"{name} must be {' or '.join(kinds)}, got {out[name]!r:.80}.", "Fix the value's type."
            )
    _check_values(out)
    out["output_dir"] = os.path.expanduser(out["output_dir"])
    out["filename"] = _check_stem(out["filename"])
    out["models"] = _check_models(out["models"])
    return out


_REQUIRED_HINTS = {
    "prompt": 'Describe the scene, e.g. "This is a panorama. A beach at dusk".',
    "output_dir": "Choose an output folder (an absolute path).",
}


def _check_values(p: dict) -> None:
    if len(p["prompt"]) > MAX_PROMPT_CHARS:
        raise _bad(f"The prompt has {len(p['prompt'])} characters.", f"Keep it under {MAX_PROMPT_CHARS}.")
    if not _DEVICE_RE.match(p["device"]):
        raise _bad(f"Unknown device {p['device']!r}.", "Choose auto, cpu, cuda or mps.")
    if p["dtype"] not in DTYPES:
        raise _bad(f"Unknown precision {p['dtype']!r}.", f"Choose one of {', '.join(DTYPES)}.")
    if not 0.0 <= p["sun_share"] < 1.0:
        raise _bad(f"sun_share must be in [0, 1), got {p['sun_share']}.", "Use 0.6, or 0 for no sun.")
    if p["compile"] not in ("auto", True, False):
        raise _bad(f"compile must be 'auto', true or false, got {p['compile']!r}.", "Use 'auto'.")
    if p["memory_mode"] not in MEMORY_MODES:
        raise _bad(f"Unknown memory mode {p['memory_mode']!r}.", f"Choose one of {', '.join(MEMORY_MODES)}.")
    if p["vram_budget_gib"] is not None and not 0 < p["vram_budget_gib"] <= 4096:
        raise _bad(
            f"vram_budget_gib={p['vram_budget_gib']} is out of range.",
            "Give the GiB of VRAM to use, or null.",
        )
    if p["preview_every"] < 0:
        raise _bad("preview_every must be 0 (no previews) or more.", "Use 1 for a preview every step.")
    if not -10.0 <= p["lora_strength"] <= 10.0:
        raise _bad(f"lora_strength={p['lora_strength']} is out of range.", "Use 1.0 (0 turns the LoRA off).")
    if not os.path.isabs(os.path.expanduser(p["output_dir"])):
        raise _bad(
            f"The output folder {p['output_dir']!r} is not an absolute path.", "Choose a full folder path."
        )


def _check_stem(stem: str | None) -> str | None:
    """A user-given file name must be a plain name: no folders, no '..', nothing that escapes."""
    if stem is None:
        return None
    if stem.lower().endswith(".png"):
        stem = stem[:-4]
    if not _STEM_RE.match(stem) or ".." in stem or stem.split(".")[0].strip().lower() in _WINDOWS_RESERVED:
        raise _bad(
            f"The file name {stem!r} is not allowed.",
            "Use a plain name of letters, digits, spaces, '.', '-' or '_' (no folders); "
            "the image always goes into the output folder.",
        )
    return stem


def _check_models(models: Mapping[str, Any] | None) -> dict:
    models = {**MODELS_DEFAULTS, **(models or {})}
    unknown = sorted(set(models) - set(MODELS_DEFAULTS))
    if unknown:
        raise _bad(
            f"Unknown models setting(s): {', '.join(map(str, unknown))}.",
            "Use models_dir, paths, allow_download.",
        )
    if models["models_dir"] is not None and not isinstance(models["models_dir"], str):
        raise _bad("models.models_dir must be a folder path or null.", "Pass a string.")
    paths = models["paths"]
    if not isinstance(paths, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in paths.items()
    ):
        raise _bad(
            "models.paths must map component names to path strings.", 'e.g. {"transformer": "/x.safetensors"}'
        )
    if not isinstance(models["allow_download"], bool):
        raise _bad("models.allow_download must be true or false.", "Pass a boolean.")
    return {
        "models_dir": models["models_dir"],
        "paths": dict(paths),
        "allow_download": models["allow_download"],
    }


def _bad(message_: str, hint: str) -> ProtocolError:
    return ProtocolError("bad_parameters", message_, hint)
