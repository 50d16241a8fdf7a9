"""Is a ``.safetensors`` file complete? Read from its header alone, without torch or safetensors.

The file starts with an 8-byte little-endian header length and a JSON header giving each tensor's
byte range; a file shorter than the ranges it describes is a copy or download that stopped
part-way. Model search uses this to skip such files, the loaders to refuse them with a fix.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

GGUF_MAGIC = b"GGUF"  # llama.cpp's format, as city96's quantised FLUX files use
_MAX_HEADER_BYTES = 100_000_000  # a longer "header" means the first 8 bytes are not a length at all


@dataclass(frozen=True)
class SafetensorsProblem:
    """Why a file is not a usable safetensors file.

    ``text`` follows the file's name ("ae.safetensors is truncated (512 bytes)"). ``kind`` lets a
    caller pick the fix: "missing", "unreadable" (permissions, I/O), "cut_short" (shorter than its
    header says) or "foreign" (not a safetensors file at all).
    """

    kind: Literal["missing", "unreadable", "cut_short", "foreign"]
    text: str


def safetensors_problem(path: Path) -> SafetensorsProblem | None:
    """None when ``path`` is a complete safetensors file, else what is wrong with it."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            if head[:4] == GGUF_MAGIC:  # its first 8 bytes would read as a huge header length
                return SafetensorsProblem("foreign", "is a GGUF file, not safetensors")
            if len(head) < 8:
                return SafetensorsProblem("cut_short", f"is truncated ({size} bytes)")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > _MAX_HEADER_BYTES or 8 + header_len > size:
                return SafetensorsProblem("cut_short", f"is truncated ({size} bytes)")
            header = json.loads(f.read(header_len))
    except FileNotFoundError:
        return SafetensorsProblem("missing", "is missing")
    except OSError as exc:
        return SafetensorsProblem("unreadable", f"cannot be read ({exc.strerror or exc})")
    except ValueError:  # not UTF-8 or not JSON
        return SafetensorsProblem("foreign", "is not a safetensors file (its header is not JSON)")
    data_end = _data_end(header)
    if data_end is None:
        return SafetensorsProblem("foreign", "is not a safetensors file (its header lists no tensor offsets)")
    expected = 8 + header_len + data_end
    if size < expected:
        return SafetensorsProblem(
            "cut_short",
            f"is incomplete: truncated at {size} of {expected} bytes (the download or copy stopped part-way)",
        )
    return None


def safetensors_keys(path: Path) -> list[str] | None:
    """The tensor names of a complete safetensors file (from its header alone); None when unusable."""
    if safetensors_problem(path) is not None:
        return None
    with path.open("rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
    return [k for k in header if k != "__metadata__"]


def _data_end(header: object) -> int | None:
    """The end of the last tensor's bytes, from the start of the data; None for a foreign header."""
    if not isinstance(header, dict):
        return None
    try:
        return max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (KeyError, TypeError, IndexError, ValueError):
        return None
