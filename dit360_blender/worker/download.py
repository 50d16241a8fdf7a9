"""Find or download the model files in a process of its own, reporting in the protocol's framing.

``python -m dit360_blender.worker.download [--check] [--models-dir DIR] [--path COMPONENT=PATH ...]``

The Blender add-on runs this with the worker's Python (the one that has huggingface_hub), never
importing the Hub code into Blender itself. The Hugging Face token comes from the ``HF_TOKEN``
environment variable only: argv is visible to every user in process lists.

stdout carries the child messages of ``protocol.py`` (one frame per line, ``CHILD_MESSAGES``):
``found`` (what is present: with ``--check``, and first thing before a download), then
``download_progress`` per repo file (at most every 0.2 s per file, plus its last update), and
``downloaded`` (exit code 0) or ``error`` (exit code 1). ``--check`` with missing files is not an
error: it reports ``found`` and exits 0. Tracebacks go to stderr (the add-on's log).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ..pipeline.errors import DiT360Error
from ..pipeline.model_files.catalogue import COMPONENTS
from ..pipeline.model_files.download import download_models, resolve_model_paths
from ..pipeline.model_files.local_search import find_model_paths
from ..protocol import encode, error, message

REPORT_EVERY_S = 0.2


def _emit(msg: dict) -> None:
    sys.stdout.flush()  # anything a library printed goes first, then the frame, whole
    sys.stdout.buffer.write(encode(msg))
    sys.stdout.buffer.flush()


def _paths(found: dict) -> dict[str, str | None]:
    return {k: (None if v is None else str(v)) for k, v in found.items()}


def _parse_explicit(items: list[str]) -> dict[str, str]:
    explicit: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or name not in COMPONENTS:
            raise SystemExit(f"--path wants COMPONENT=PATH with COMPONENT one of {', '.join(COMPONENTS)}")
        if value.strip():
            explicit[name] = value
    return explicit


class _Progress:
    """Throttles huggingface_hub's byte counts: a UI needs a few updates a second, not thousands."""

    def __init__(self) -> None:
        self.last: dict[str, float] = {}

    def __call__(self, filename: str, done: int, total: int) -> None:
        now = time.monotonic()
        final = bool(total) and done >= total
        if final or now - self.last.get(filename, 0.0) >= REPORT_EVERY_S:
            self.last[filename] = now
            _emit(message("download_progress", file=filename, done=int(done), total=int(total)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dit360_blender.worker.download", description=__doc__)
    parser.add_argument("--check", action="store_true", help="only report which components are present")
    parser.add_argument("--models-dir", type=Path, default=None, help="the models folder (else the HF cache)")
    parser.add_argument("--path", action="append", default=[], metavar="COMPONENT=PATH")
    parser.add_argument("--no-lora", action="store_true", help="the DiT360 LoRA is not needed")
    args = parser.parse_args(argv)
    explicit = _parse_explicit(args.path)
    use_lora = not args.no_lora
    try:
        found = find_model_paths(explicit or None, args.models_dir, use_lora=use_lora)
        _emit(message("found", components=_paths(found)))
        if args.check:
            return 0
        missing = [c for c in COMPONENTS if found[c] is None and (c != "lora" or use_lora)]
        if missing:
            if explicit:
                # Files set one by one stay where they are; only the rest is fetched.
                paths = resolve_model_paths(
                    explicit, args.models_dir, allow_download=True, progress=_Progress(), use_lora=use_lora
                )
            else:
                paths = download_models(args.models_dir, progress=_Progress(), use_lora=use_lora)
            found = paths.as_dict()
        _emit(message("downloaded", components=_paths(found)))
        return 0
    except DiT360Error as exc:
        _emit(error(exc.code, exc.message, exc.hint))
        return 1
    except KeyboardInterrupt:
        _emit(error("cancelled", "The download was stopped."))
        return 1
    except Exception as exc:  # the add-on shows this; the traceback goes to stderr (its log)
        import traceback

        traceback.print_exc()
        _emit(
            error(
                "internal",
                f"Unexpected failure: {type(exc).__name__}: {exc}"[:2000],
                "See the download log (add-on Preferences, Models) and report it.",
            )
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
