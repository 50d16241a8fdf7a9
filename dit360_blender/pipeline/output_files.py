"""Where a panorama is written: one PNG inside the chosen output folder, never anywhere else."""

from __future__ import annotations

import os
import re
import tempfile
import unicodedata
from pathlib import Path

from .errors import BadParametersError, OutputWriteError

SLUG_MAX = 48
LIGHTING_SUFFIX = "_lighting"  # <stem>_lighting.hdr/.exr: the sun-clamped twin written beside <stem>.png
CUBE_INFIX = "_cube"  # <stem>_cube_px.png ... _cube_nz / _cube_cross: the cube maps beside <stem>.png
_CUBE_NAME = re.compile(r"_cube_(?:px|nx|py|ny|pz|nz|cross)$", re.IGNORECASE)
# DiT360's prompts conventionally start with this phrase; it says nothing about the picture.
_PROMPT_PREFIX = re.compile(r"^\s*this is a panorama(?: image)?[\s.,:;!-]*", re.IGNORECASE)


def slugify(text: str, max_len: int = SLUG_MAX) -> str:
    """Lowercase ASCII words joined by '-', at most `max_len` characters, cut at a word boundary."""
    text = _PROMPT_PREFIX.sub("", text) or text
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    slug = re.sub(r"[^a-z0-9]+", "-", ascii_text.lower()).strip("-")
    if len(slug) > max_len:
        cut = slug[: max_len + 1]
        slug = cut[: cut.rfind("-")] if "-" in cut else slug[:max_len]
    return slug.strip("-") or "panorama"


def plan_output(
    output_dir: str | Path,
    prompt: str,
    seed: int,
    filename: str | None = None,
    default_stem: str | None = None,
) -> Path:
    """The file a job writes: ``<output_dir>/<filename>.png`` when a name is given (overwritten),
    else ``<output_dir>/<slug>_<seed>.png`` (or `default_stem`, e.g. an edit's) with ``-2``, ``-3``...
    added so earlier results survive.

    Raises BadParametersError for any name that would land outside `output_dir`, and for a name
    ending in ``_lighting`` (another job's lighting file: job ``x`` writes ``x_lighting.hdr``) or in
    ``_cube_<face>`` (another job's cube face: ``x_cube_px.png``).
    """
    folder = Path(output_dir)
    if not folder.is_absolute():
        raise BadParametersError(f"The output folder {folder} is not absolute.", "Choose a full folder path.")
    stem = filename if filename is not None else default_stem or f"{slugify(prompt)}_{seed}"
    if not stem or any(sep in stem for sep in ("/", "\\", "\0")) or stem in (".", ".."):
        raise BadParametersError(
            f"The file name {stem!r} is not allowed.", "Use a plain name without folders."
        )
    if stem.lower().endswith(LIGHTING_SUFFIX):  # lower(): the same file on case-insensitive disks
        raise BadParametersError(
            f"The file name {stem!r} ends in {LIGHTING_SUFFIX!r}, which names the lighting file of "
            f"{stem[: -len(LIGHTING_SUFFIX)]!r} (<name>{LIGHTING_SUFFIX}.hdr): it would overwrite it.",
            f"Choose a name that does not end in {LIGHTING_SUFFIX}.",
        )
    cube = _CUBE_NAME.search(stem)
    if cube:
        raise BadParametersError(
            f"The file name {stem!r} ends in {cube.group(0)!r}, which names a cube-map face of "
            f"{stem[: cube.start()]!r}: it would overwrite it.",
            f"Choose a name that does not end in {cube.group(0)}.",
        )
    path = folder / f"{stem}.png"
    if filename is None:
        path = _unique(path)
    if path.resolve().parent != folder.resolve():
        raise BadParametersError(
            f"The file name {stem!r} would be written outside the output folder {folder}.",
            "Use a plain name; the image always goes into the output folder.",
        )
    return path


def ensure_writable(folder: str | Path) -> None:
    """Create the folder and prove a file can be made in it, before any GPU time is spent."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".dit360-probe-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise OutputWriteError(
            f"Cannot write into the output folder {folder}: {exc.strerror or exc}.",
            "Choose an output folder that exists (or can be created) and that you can write to, "
            "on a disk with free space.",
        ) from None


def _unique(path: Path) -> Path:
    if not path.exists():
        return path
    for i in range(2, 10_000):
        candidate = path.with_name(f"{path.stem}-{i}{path.suffix}")
        if not candidate.exists():
            return candidate
    raise OutputWriteError(f"Too many files named {path.stem}-N.png.", "Choose another output folder.")
