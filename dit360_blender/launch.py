"""How this package is run in a child Python outside Blender (the worker, the model download): the
child's environment. Standard library only; the client and the Blender side's background tasks both
build it here, so every child finds the same packages and gets the token the same way."""

from __future__ import annotations

import os
import stat
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent


class UnsafeFolderError(PermissionError):
    """A folder the worker would write to (and run in) that another user could control."""


def default_work_dir() -> Path:
    """This user's own folder in the temporary directory (the shared one, e.g. /tmp, is never used
    itself): where a worker started without a folder of its caller's keeps its log and caches."""
    uid = getattr(os, "getuid", None)
    return Path(tempfile.gettempdir()) / (f"dit360_blender-{uid()}" if uid else "dit360_blender")


def private_dir(folder: Path) -> Path:
    """`folder`, created 0700 if missing; refused (UnsafeFolderError) when it is a symbolic link, is
    not a folder, or (POSIX) is owned by another user: anyone who can write there could plant a
    `worker.log` link or a module the worker would run. A folder of ours that others may write to
    (made under umask 002, say) loses those write bits."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    try:
        folder.mkdir(mode=0o700)
    except FileExistsError:
        pass
    info = folder.lstat()
    if stat.S_ISLNK(info.st_mode):
        problem = "is a symbolic link (someone may have planted it)"
    elif not stat.S_ISDIR(info.st_mode):
        problem = "is not a folder"
    elif sys.platform != "win32" and info.st_uid != os.geteuid():
        problem = f"belongs to another user (uid {info.st_uid})"
    else:
        if sys.platform != "win32" and info.st_mode & 0o022:
            folder.chmod(stat.S_IMODE(info.st_mode) & ~0o022)
        return folder
    raise UnsafeFolderError(f"The worker's folder {folder} {problem}; refusing to use it.")


def worker_env(
    vendor_dir: Path | None,
    hf_token: str | None = None,
    extra: Mapping[str, str] | None = None,
    compile_cache: Path | None = None,
) -> dict[str, str]:
    """This process's environment plus: the vendor folder and this package's parent first on
    PYTHONPATH, unbuffered UTF-8 output, and the Hugging Face token. Secrets travel only here:
    argv is visible to other users, and nothing is written to a file. `extra` is applied last.

    `compile_cache`: where torch.compile keeps its Inductor, FX-graph and AOTAutograd caches, so a
    new worker recompiles from them in seconds (unless the user set TORCHINDUCTOR_CACHE_DIR)."""
    env = dict(os.environ)  # a token already in Blender's environment still counts
    if compile_cache is not None and "TORCHINDUCTOR_CACHE_DIR" not in env:
        env["TORCHINDUCTOR_CACHE_DIR"] = str(compile_cache)
        env.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "1")
        env.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "1")
    if hf_token and hf_token.strip():
        env["HF_TOKEN"] = hf_token.strip()
    paths = ([str(vendor_dir)] if vendor_dir else []) + [str(PACKAGE_DIR.parent)]
    # An empty entry means "the working directory", a relative one a folder in it: both would
    # import whatever lies in the worker's folder, so only the caller's absolute entries pass.
    paths += [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and os.path.isabs(p)]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONIOENCODING"] = "utf-8"
    env["PYTHONSAFEPATH"] = "1"  # 3.11+: do not put the working directory first on sys.path
    env["HF_HUB_DISABLE_TELEMETRY"] = "1"
    if sys.platform.startswith("linux"):  # fewer, growable CUDA segments: less memory lost to
        # fragmentation between the load's, the steps' and the decode's differently sized blocks
        # (PyTorch supports them on Linux only)
        env.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    env.update(extra or {})
    return env
