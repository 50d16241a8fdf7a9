"""Which exact bytes a model path stands for, as far as the file system tells without reading them:
each file's resolved path, size, modification and change times and inode. The worker keys its loaded
models on it, so a file saved again in place, replaced under its name or cut short loads anew (or
fails as the damaged file it is) instead of being served from memory or mapped pages that changed.

``st_ctime_ns`` changes on every write and can't be set back by a copy tool, which keeps the
modification time; the inode changes when a file is replaced by a rename.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path


def file_identity(path: Path | str) -> tuple:
    """(resolved path, size, mtime_ns, ctime_ns, inode); a missing file: (path, None, ...)."""
    path = Path(path).expanduser()
    try:
        st = path.stat()
    except OSError:  # missing or unreadable: the load reports it
        return (str(path), None, None, None, None)
    return (str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)


def path_identity(path: Path | str) -> tuple:
    """A file's identity, or a folder's: that of every file in it (hidden folders like .cache left out)."""
    path = Path(path).expanduser()
    if not path.is_dir():
        return (file_identity(path),)
    files = sorted(p for p in path.rglob("*") if not _hidden(p.relative_to(path).parts) and p.is_file())
    return tuple(file_identity(p) for p in files)


def models_identity(paths: Mapping[str, Path | str | None], extra: Iterable[Path | str] = ()) -> tuple:
    """Every component's path identity (None for a component not used), then the `extra` files'."""
    components = tuple(
        (name, None if value is None else path_identity(value)) for name, value in sorted(paths.items())
    )
    return components + tuple(file_identity(p) for p in extra)


def _hidden(parts: tuple[str, ...]) -> bool:
    return any(part.startswith(".") for part in parts)
