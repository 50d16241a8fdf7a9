"""How this package is run in a child Python outside Blender (the worker, the model download): the
child's environment. Standard library only; the client and the Blender side's background tasks both
build it here, so every child finds the same packages and gets the token the same way."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent


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
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONIOENCODING"] = "utf-8"
    env["PYTHONSAFEPATH"] = "1"  # 3.11+: do not put the working directory first on sys.path
    env["HF_HUB_DISABLE_TELEMETRY"] = "1"
    env.update(extra or {})
    return env
