#!/usr/bin/env python3
"""Install the DiT360 worker's Python packages (torch, transformers, ...) for a given Python.

Standard library only; runs with any Python >= 3.10, including the one bundled with Blender.

Modes (pick one):

  --target DIR   pip install --target DIR ... with *this* interpreter.  The Blender add-on runs this
                 with Blender's Python and DIR = bpy.utils.extension_path_user(pkg, path="vendor").
  --venv DIR     create a venv at DIR (if needed) and install the runtime packages into it.
                 (--target and --venv install requirements/runtime.txt.)
  --dev          create/refresh .venv/ at the repo root with requirements/dev.txt: the runtime
                 packages at exact versions plus the test-only ones (pytest, ruff, bpy, ...); needs
                 Python 3.11 because bpy only ships cp311 wheels.

Other options:

  --torch {auto,cuda,cpu,mps,local}   which torch build to install (default: auto; --dev: local).
                 auto:  macOS -> PyPI torch (MPS; Apple Silicon only); Windows/Linux with nvidia-smi
                        -> CUDA wheels from the PyTorch index; otherwise CPU wheels from the PyTorch
                        CPU index.
                 local: the torch requirement as plain pip resolves it with your own pip config, no
                        extra index (what dev/CI machines with a local torch wheel use).
  --cuda X.Y     the CUDA version to pick the wheels for (default: the newest the NVIDIA driver
                 supports, from nvidia-smi, e.g. 12.4 -> cu124, 12.9 -> cu128, 13.0 -> cu130;
                 GPUs older than Turing get cu126, the newest build that still has them).
  --torch-index URL   index for the cuda/cpu choices (default: as chosen above / PyTorch's cpu index).
  DIT360_TORCH_SPEC   environment variable replacing the torch requirement, e.g. "torch==2.7.1" or a
                      path to a wheel; without an explicit --torch it implies --torch local.
  --check        report which runtime packages import (and their versions) and the torch device for
                 the chosen target/venv/dev venv (or this interpreter); exit 1 if one is missing.
                 Add --json for one machine-readable line: a `deps` message in the add-on's
                 child-process framing (dit360_blender/protocol.py).
  --dry-run      print the commands only.
  --force        ignore the "already installed" stamp and pass --force-reinstall to pip.

Examples:

  python3 vendor_setup.py --dev                       # dev/CI venv at .venv (Python 3.11)
  python3 vendor_setup.py --venv ~/dit360-worker      # a standalone worker venv
  <blender-python> vendor_setup.py --target <vendor>  # what the add-on's preferences run
  <blender-python> vendor_setup.py --check --target <vendor> --json
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

# ---------------------------------------------------------------------------------------------
# Requirements are data: requirements/runtime.txt (what the worker imports; ships beside this
# script in the add-on's zip) and requirements/dev.txt (the dev/CI venv's exact pins of the same
# packages plus the test-only ones; not shipped). The files say why each bound is what it is.
# ---------------------------------------------------------------------------------------------

REQUIREMENTS_DIR = Path(__file__).resolve().parent / "requirements"


def requirement_name(req: str) -> str:
    """The distribution name a requirement starts with: "torch>=2.4,<3" -> "torch"."""
    name = req.strip()
    for sep in "<>=!~[; @":
        name = name.split(sep, 1)[0]
    return name.lower()


def read_pins(path: Path) -> dict[str, str]:
    """Name -> requirement for each requirement line of a pip requirements file, in file order
    (comments and blank lines skipped); {} when the file is absent, as dev.txt is in the add-on."""
    if not path.is_file():
        return {}
    pins: dict[str, str] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        req = line.split(" #", 1)[0].strip()
        if req and not req.startswith("#"):
            pins[requirement_name(req)] = req
    return pins


RUNTIME_PINS = read_pins(REQUIREMENTS_DIR / "runtime.txt")
_DEV_PINS = read_pins(REQUIREMENTS_DIR / "dev.txt")
# dev.txt pins the runtime packages exactly and adds the test-only ones: the split is by name.
DEV_RUNTIME_PINS = {name: req for name, req in _DEV_PINS.items() if name in RUNTIME_PINS}
# Runtime packages the dev venv goes without (dev.txt says why: the super-resolution loader and the
# torchvision it imports, tested in their own venv, .ci/sr_venv.py); the dev check skips them.
NOT_IN_DEV_VENV = frozenset({"torchvision", "spandrel"})
# Packages only one feature needs: --check reports them, but a worker Python without them still
# generates and edits (its `ok` stays true, and the add-on says which feature is unavailable). An
# install always installs them and fails if they do not import.
FEATURE_PACKAGES: dict[str, str] = {"torchvision": "upscale", "spandrel": "upscale"}
# Installed in torch's own pip command (same index), so pip picks the build made for that torch.
TORCH_FAMILY = frozenset({"torch", "torchvision"})
DEV_TEST_PINS = {name: req for name, req in _DEV_PINS.items() if name not in RUNTIME_PINS}

# PyTorch's wheel indexes (override with --torch-index or --cuda). A driver runs wheels built for
# its CUDA version (nvidia-smi's "CUDA Version", the newest it supports) or older. Within
# runtime.txt's torch>=2.4,<3 the CUDA indexes carry: cu130 torch 2.9+ (driver 580+), cu128 2.7+
# (570+; the first with Blackwell / RTX 50xx), cu126 2.6+ (560+; the only one still built for
# Maxwell, Pascal and Volta), cu124 2.4-2.6 (550+), cu121 2.4-2.5 (530+), cu118 2.4-2.7 (520+).
# Every one has Python 3.11 (Blender 4.2-5.0) and 3.13 (Blender 5.1+) wheels of some such torch.
TORCH_INDEX_BASE = "https://download.pytorch.org/whl/"
TORCH_CPU_INDEX = TORCH_INDEX_BASE + "cpu"
TORCH_CUDA_BUILDS = ((13, 0), (12, 8), (12, 6), (12, 4), (12, 1), (11, 8))  # newest first
LEGACY_GPU_BUILD = (12, 6)  # for compute capability < 7.5, which newer builds leave out
TORCH_CUDA_INDEX = TORCH_INDEX_BASE + "cu128"  # when the driver's CUDA version can't be read

# ---------------------------------------------------------------------------------------------

# Distribution name -> module to import for --check, where the two differ.
IMPORT_NAMES: dict[str, str] = {"pillow": "PIL", "openexr": "OpenEXR"}

TORCH_CHOICES = ("auto", "cuda", "cpu", "mps", "local")
DEV_PYTHON = (3, 11)
REPO_ROOT = Path(__file__).resolve().parent
ADDON_PACKAGE = "dit360_blender"
STAMP_NAME = ".dit360-setup-stamp.json"
STAMP_SCHEMA = 1


class SetupError(Exception):
    """A failure with a message for the user; main() prints it and exits 1."""


# --- platform detection (functions so tests can monkeypatch them) ------------------------------


def platform_system() -> str:
    """'Linux', 'Darwin' or 'Windows'."""
    return platform.system()


def intel_mac() -> bool:
    """True for an x86_64 Python on macOS: an Intel Mac, or an Intel build under Rosetta."""
    return sys.platform == "darwin" and platform.machine() == "x86_64"


def nvidia_smi() -> str | None:
    """nvidia-smi's path: on PATH, or (Windows) in its usual System32 location."""
    found = shutil.which("nvidia-smi")
    if found is None and platform_system() == "Windows":
        path = Path(os.environ.get("SystemRoot", r"C:\Windows"), "System32", "nvidia-smi.exe")
        found = str(path) if path.is_file() else None
    return found


def has_nvidia_gpu() -> bool:
    return nvidia_smi() is not None


def run_nvidia_smi(*args: str) -> str:
    """nvidia-smi's output, or "" when it is missing or fails (a broken driver install)."""
    path = nvidia_smi()
    if path is None:
        return ""
    try:
        done = subprocess.run([path, *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return ""
    return done.stdout if done.returncode == 0 else ""


def interpreter_version() -> tuple[int, int]:
    return sys.version_info[:2]


def interpreter_path() -> str:
    return sys.executable


# --- helpers ------------------------------------------------------------------------------------


def log(msg: str = "") -> None:
    print(msg, flush=True)


def format_cmd(cmd: list[str]) -> str:
    if platform_system() == "Windows":
        # Double-quote what cmd.exe would treat specially (e.g. "torch>=2.4,<3"), for copy-paste.
        return " ".join(f'"{a}"' if a == "" or any(c in a for c in " \t<>|&^") else a for a in cmd)
    return shlex.join(cmd)


def run_cmd(cmd: list[str], *, dry_run: bool, env: dict[str, str] | None = None) -> None:
    """Print the command, then run it with its output streamed; raise SetupError on failure."""
    log(f"$ {format_cmd(cmd)}")
    if dry_run:
        return
    try:
        rc = subprocess.call(cmd, env=env, stdin=subprocess.DEVNULL)
    except OSError as exc:
        raise SetupError(f"could not run {cmd[0]}: {exc}") from exc
    if rc != 0:
        raise SetupError(f"command failed with exit code {rc}: {format_cmd(cmd)}")


def pip_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("PIP_USER", None)  # a user-level `user = true` would clash with --target / venvs
    env["PIP_NO_INPUT"] = "1"
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


def venv_python(venv: Path) -> Path:
    if platform_system() == "Windows":
        return venv / "Scripts" / "python.exe"
    return venv / "bin" / "python"


def venv_version(venv: Path) -> str | None:
    """The Python version recorded in DIR/pyvenv.cfg, or None when DIR is not a venv."""
    cfg = venv / "pyvenv.cfg"
    if not cfg.is_file():
        return None
    for line in cfg.read_text(encoding="utf-8", errors="replace").splitlines():
        key, _, value = line.partition("=")
        if key.strip() in ("version", "version_info"):
            return value.strip()
    return ""


def find_addon_folder(path: Path) -> Path | None:
    """The add-on folder that PATH lies in (or is), or None.

    An add-on folder is one holding blender_manifest.toml (the repo root or an installed
    extension), the folder holding dit360_blender/__init__.py, dit360_blender/ itself, or the
    folder this script lives in when it is the source tree or the installed extension.
    """
    path = Path(os.path.abspath(os.path.expanduser(path)))
    try:
        path = path.resolve()
    except OSError:
        pass
    own = REPO_ROOT
    own_is_addon = any(
        (own / name).exists() for name in ("blender_manifest.toml", "__init__.py", ADDON_PACKAGE)
    )
    for folder in (path, *path.parents):
        if own_is_addon and folder == own:
            return folder
        if (folder / "blender_manifest.toml").is_file():
            return folder
        if (folder / ADDON_PACKAGE / "__init__.py").is_file():
            return folder
        if folder.name == ADDON_PACKAGE and (folder / "__init__.py").is_file():
            return folder
    return None


# --- requirement selection ----------------------------------------------------------------------


def select_requirements(dev: bool, packages: list[str] | None) -> list[str]:
    """Requirement strings to install, torch first when it is part of the set."""
    pins = dict(DEV_RUNTIME_PINS, **DEV_TEST_PINS) if dev else dict(RUNTIME_PINS)
    if packages is None:
        if not pins:
            raise SetupError(missing_requirements(dev))
        return list(pins.values())
    reqs = []
    for name in packages:
        reqs.append(pins.get(name) or RUNTIME_PINS.get(name) or name)
    return reqs


def missing_requirements(dev: bool) -> str:
    name = "dev.txt" if dev else "runtime.txt"
    where = "a source checkout: the add-on does not ship it" if dev else "the add-on: reinstall it"
    return f"{REQUIREMENTS_DIR / name} is missing; it belongs to {where}"


def is_torch_req(req: str) -> bool:
    return requirement_name(req) == "torch"


def is_torch_family_req(req: str) -> bool:
    """torch or a package built for one torch release (torchvision): they go in one pip command."""
    return requirement_name(req) in TORCH_FAMILY


def _version(text: str) -> tuple[int, int] | None:
    match = re.fullmatch(r"\s*(\d+)\.(\d+)\s*", text)
    return (int(match[1]), int(match[2])) if match else None


def driver_cuda_version() -> tuple[int, int] | None:
    """The newest CUDA version the NVIDIA driver supports ("CUDA Version: 12.4" in nvidia-smi)."""
    match = re.search(r"CUDA Version\s*:\s*(\d+\.\d+)", run_nvidia_smi())
    return _version(match[1]) if match else None


def oldest_gpu() -> tuple[int, int] | None:
    """The lowest compute capability among the GPUs, e.g. (6, 1) for a GTX 1080."""
    lines = run_nvidia_smi("--query-gpu=compute_cap", "--format=csv,noheader").splitlines()
    return min((v for v in map(_version, lines) if v), default=None)


def cuda_index(cuda: str | None) -> tuple[str, str]:
    """(index URL, why) of the CUDA wheels for `cuda` ("12.6"), else for the installed driver."""
    if cuda is not None:
        wanted, why = _version(cuda), f"--cuda {cuda}"
        if wanted is None:
            raise SetupError(f"--cuda {cuda}: give a CUDA version like 12.6")
    else:
        wanted = driver_cuda_version()
        why = f"the NVIDIA driver supports CUDA {wanted[0]}.{wanted[1]}" if wanted else ""
    if wanted is None:
        return (
            TORCH_CUDA_INDEX,
            "nvidia-smi did not say the driver's CUDA version; assuming a recent one (--cuda X.Y)",
        )
    builds = [b for b in TORCH_CUDA_BUILDS if b <= wanted]
    if not builds:
        raise SetupError(
            f"CUDA {wanted[0]}.{wanted[1]} is older than any PyTorch CUDA build (the oldest is 11.8, "
            "driver 520 or newer): update the NVIDIA driver, or install the CPU build with --torch cpu"
        )
    build = builds[0]
    gpu = oldest_gpu() if cuda is None else None
    if gpu is not None and gpu < (7, 5) and build > LEGACY_GPU_BUILD:
        build = LEGACY_GPU_BUILD
        why += f"; a GPU of compute capability {gpu[0]}.{gpu[1]} needs the cu126 build"
    return f"{TORCH_INDEX_BASE}cu{build[0]}{build[1]}", why


INTEL_MAC = (
    "this is an Intel (x86_64) Mac, or an x86_64 Python under Rosetta: PyTorch's last macOS x86_64 "
    "wheels are torch 2.2.2 (Python 3.8-3.12), older than the worker's {spec}. On an Apple Silicon "
    "Mac use the Apple Silicon (arm64) Blender or Python; otherwise run the worker on a Linux or "
    "Windows PC (an NVIDIA GPU makes it fast), or install a torch you built yourself with "
    "DIT360_TORCH_SPEC=<wheel or requirement> (implies --torch local)"
)


def resolve_torch(
    choice: str | None, torch_index: str | None, dev: bool, default_spec: str, cuda: str | None = None
) -> tuple[str, str, str | None, str]:
    """Return (mode, torch requirement, index url or None, reason)."""
    env_spec = os.environ.get("DIT360_TORCH_SPEC", "").strip()
    spec = env_spec or default_spec
    if choice is None:
        choice = "local" if (dev or env_spec) else "auto"
        why = "DIT360_TORCH_SPEC is set" if env_spec else ("--dev default" if dev else "")
    else:
        why = "--torch " + choice
    system = platform_system()
    mode = choice
    if choice == "auto":
        if system == "Darwin":
            mode, why = "mps", "auto: macOS"
        elif has_nvidia_gpu() or cuda is not None:
            mode, why = "cuda", "auto: nvidia-smi found" if cuda is None else "auto: --cuda given"
        else:
            mode, why = "cpu", "auto: no nvidia-smi"
    if cuda is not None and mode != "cuda":
        raise SetupError(f"--cuda goes with the CUDA build, not with --torch {mode}")
    if mode in ("mps", "cpu") and intel_mac():
        raise SetupError(INTEL_MAC.format(spec=spec))
    if mode == "cuda":
        if system == "Darwin":
            raise SetupError("--torch cuda: PyTorch has no CUDA builds for macOS; use --torch mps")
        index = torch_index
        if index is None:
            index, reason = cuda_index(cuda)
            why += f"; {reason}" if reason else ""
    elif mode == "cpu":
        # macOS wheels on PyPI are the CPU/MPS build already.
        index = None if system == "Darwin" else (torch_index or TORCH_CPU_INDEX)
    elif mode == "mps":
        if system != "Darwin":
            log("warning: --torch mps only makes sense on macOS; installing torch from PyPI as is")
        index = None
    else:  # local
        index = None
    if env_spec:
        why += "; spec from DIT360_TORCH_SPEC"
    return mode, spec, index, why


def plan_pip_commands(
    python: str,
    reqs: list[str],
    torch_index: str | None,
    target: Path | None,
    force: bool,
) -> list[list[str]]:
    """The pip commands installing REQS with PYTHON: torch from its own index gets its own command."""
    base = [python, "-m", "pip", "install"]
    if target is not None:
        # --upgrade replaces packages a previous run left in the folder; prefer wheels because
        # Blender's Python cannot build C extensions.
        base += ["--target", str(target), "--upgrade", "--prefer-binary"]
    if force:
        base.append("--force-reinstall")
    torch_reqs = [r for r in reqs if is_torch_family_req(r)]
    other = [r for r in reqs if not is_torch_family_req(r)]
    if torch_index and torch_reqs:
        cmds = [base + ["--index-url", torch_index] + torch_reqs]
        if other:
            cmds.append(base + other)
        return cmds
    return [base + reqs]


# --- stamp --------------------------------------------------------------------------------------


def stamp_payload(commands: list[list[str]], python_version: str) -> dict:
    # The interpreter path is left out: the same requirement set from another path is the same.
    return {
        "schema": STAMP_SCHEMA,
        "python": python_version,
        "commands": [cmd[1:] for cmd in commands],
    }


def stamp_matches(stamp: Path, payload: dict) -> bool:
    try:
        return json.loads(stamp.read_text(encoding="utf-8")) == payload
    except (OSError, ValueError):
        return False


def write_stamp(stamp: Path, payload: dict) -> None:
    stamp.write_text(json.dumps(payload, indent=1) + "\n", encoding="utf-8")


# --- check --------------------------------------------------------------------------------------

CHECK_MARK = "DIT360_CHECK_JSON="

# Runs in the checked interpreter: argv[1] is a JSON spec {"target", "imports", "metadata", "device"}.
CHECK_SCRIPT = r"""
import importlib, importlib.metadata as md, json, sys
spec = json.loads(sys.argv[1])
if spec["target"]:
    sys.path.insert(0, spec["target"])
out = {"python": sys.executable, "python_version": sys.version.split()[0],
       "packages": {}, "device": None, "device_name": None}
def dist_version(dist):
    try:
        return md.version(dist)
    except Exception:
        return None
for dist, mod_name in spec["imports"]:
    entry = {"module": mod_name, "version": None, "path": None, "error": None}
    if spec["import"]:
        try:
            mod = importlib.import_module(mod_name)
            entry["version"] = getattr(mod, "__version__", None) or dist_version(dist)
            entry["path"] = getattr(mod, "__file__", None)
        except BaseException as exc:
            entry["error"] = "%s: %s" % (type(exc).__name__, exc)
    else:
        entry["version"] = dist_version(dist)
        if entry["version"] is None:
            entry["error"] = "not installed"
    out["packages"][dist] = entry
for dist in spec["metadata"]:
    v = dist_version(dist)
    out["packages"][dist] = {"module": None, "version": v, "path": None,
                             "error": None if v else "not installed"}
if spec["device"] and spec["import"] and "torch" in sys.modules:
    torch = sys.modules["torch"]
    try:
        if torch.cuda.is_available():
            out["device"] = "cuda"
            out["device_name"] = "%s (CUDA %s)" % (torch.cuda.get_device_name(0), torch.version.cuda)
        elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            out["device"] = "mps"
            out["device_name"] = "Apple MPS"
        else:
            out["device"] = "cpu"
            out["device_name"] = "CPU"
    except Exception as exc:
        out["device"] = "cpu"
        out["device_name"] = "CPU (device probe failed: %s)" % exc
print("DIT360_CHECK_JSON=" + json.dumps(out))
"""
assert CHECK_MARK in CHECK_SCRIPT


def run_check(
    python: str,
    target: Path | None,
    dists: list[str],
    metadata_only: list[str],
    do_import: bool = True,
    optional: frozenset[str] = frozenset(),
) -> dict:
    """Run CHECK_SCRIPT in PYTHON (with TARGET first on sys.path) and return its report; a package
    in OPTIONAL that does not import is reported in `packages` but not in `missing`, and `ok` holds."""
    imports = [(d, IMPORT_NAMES.get(d, d)) for d in dists]
    spec = {
        "target": str(target) if target else None,
        "imports": imports,
        "metadata": metadata_only,
        "import": do_import,
        "device": "torch" in dists,
    }
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    cmd = [python, "-s", "-c", CHECK_SCRIPT, json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True)
    except OSError as exc:
        raise SetupError(f"could not run {python}: {exc}") from exc
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(CHECK_MARK):
            report = json.loads(line[len(CHECK_MARK) :])
            missing = [d for d, e in report["packages"].items() if e["error"] and d not in optional]
            report["missing"] = missing
            report["ok"] = not missing
            report["target"] = str(target) if target else None
            return report
    raise SetupError(f"the check script failed in {python} (exit {proc.returncode}):\n{proc.stdout}")


def print_report(report: dict) -> None:
    log(f"python: {report['python']} ({report['python_version']})")
    if report.get("target"):
        log(f"target: {report['target']}")
    for dist, e in report["packages"].items():
        if e["error"]:
            log(f"  MISSING  {dist:<16} {e['error']}")
        else:
            where = f"  ({e['path']})" if e.get("path") else ""
            log(f"  ok       {dist:<16} {e['version'] or '?'}{where}")
    if report.get("device"):
        log(f"torch device: {report['device']} - {report['device_name']}")
    if report["missing"]:
        log(f"missing: {', '.join(report['missing'])}")
    for feature, dists in unavailable_features(report).items():
        log(f"without {', '.join(dists)} the {feature} is unavailable; everything else works")


def unavailable_features(report: dict) -> dict[str, list[str]]:
    """{feature: [its packages that do not import]} for the FEATURE_PACKAGES a check found missing."""
    out: dict[str, list[str]] = {}
    for dist, entry in report["packages"].items():
        if entry.get("error") and dist in FEATURE_PACKAGES:
            out.setdefault(FEATURE_PACKAGES[dist], []).append(dist)
    return out


def deps_message(report: dict) -> bytes:
    """The report as one `deps` frame of the add-on's protocol (what the add-on's check reads)."""
    protocol = import_protocol()
    return protocol.encode(protocol.message("deps", **report))


def import_protocol():
    """The add-on's protocol module, imported by its package name as the worker is (the package's
    parent folder first on sys.path): this script runs as a plain file, and the protocol imports its
    siblings. The package is this file's folder in the built zip, dit360_blender/ in a checkout."""
    here = Path(__file__).resolve().parent
    for package in (here, here / ADDON_PACKAGE):
        if (package / "__init__.py").is_file() and (package / "protocol.py").is_file():
            sys.path.insert(0, str(package.parent))
            return importlib.import_module(f"{package.name}.protocol")
    raise SetupError(f"the add-on's protocol.py is neither beside {__file__} nor in {here / ADDON_PACKAGE}")


def check_names(dev: bool, packages: list[str] | None) -> tuple[list[str], list[str]]:
    """(distributions to import, distributions only looked up in metadata) for --check."""
    if packages is not None:
        return packages, []
    # The add-on ships runtime.txt only: dev.txt is needed for --dev alone.
    for wanted, pins in ((False, RUNTIME_PINS), (True, DEV_TEST_PINS)):
        if not pins and (dev or not wanted):
            raise SetupError(missing_requirements(wanted))
    runtime = [d for d in RUNTIME_PINS if not (dev and d in NOT_IN_DEV_VENV)]
    return runtime, (list(DEV_TEST_PINS) if dev else [])


# --- modes --------------------------------------------------------------------------------------


def ensure_pip(dry_run: bool) -> None:
    """Blender's bundled Python may lack pip: bootstrap it with ensurepip when missing."""
    import importlib.util

    if importlib.util.find_spec("pip") is not None:
        return
    log("pip is not installed for this Python; bootstrapping it with ensurepip")
    try:
        run_cmd([interpreter_path(), "-m", "ensurepip", "--upgrade"], dry_run=dry_run, env=pip_env())
    except SetupError as exc:
        raise SetupError(
            f"{exc}\nthis Python has no pip and ensurepip failed; if Blender is installed in a "
            "read-only folder, run Blender's Python once as an administrator with "
            "`-m ensurepip --upgrade`, or use --venv with a separate Python"
        ) from exc


def install(
    python: str,
    python_version: str,
    reqs: list[str],
    torch_index: str | None,
    target: Path | None,
    stamp: Path,
    args: argparse.Namespace,
) -> bool:
    """Run pip unless the stamp says the same set is installed; return True when pip ran."""
    cmds = plan_pip_commands(python, reqs, torch_index, target, args.force)
    payload = stamp_payload(plan_pip_commands(python, reqs, torch_index, target, False), python_version)
    if not args.force and stamp_matches(stamp, payload):
        log(f"already up to date ({stamp} records the same requirement set; --force reinstalls)")
        return False
    for cmd in cmds:
        run_cmd(cmd, dry_run=args.dry_run, env=pip_env())
    if not args.dry_run:
        write_stamp(stamp, payload)
    return True


def verify(python: str, target: Path | None, dists: list[str], metadata_only: list[str]) -> dict:
    report = run_check(python, target, dists, metadata_only)
    print_report(report)
    if not report["ok"]:
        raise SetupError(
            f"installed, but these do not import: {', '.join(report['missing'])} (see above); "
            "rerun with --force, or see pip's output for what went wrong"
        )
    return report


def cmd_target(args: argparse.Namespace) -> int:
    target = Path(os.path.abspath(os.path.expanduser(args.target)))
    addon = find_addon_folder(target)
    if addon is not None:
        raise SetupError(
            f"refusing to install into {target}: it is inside the add-on folder {addon}.\n"
            "Packages there would be packed into the extension and loaded as add-on code. "
            "Use a folder outside it, e.g. the one Blender gives for the add-on: "
            'bpy.utils.extension_path_user(__package__, path="vendor", create=True)'
        )
    reqs, torch_index = requirements_with_torch(args, dev=False)
    python = interpreter_path()
    if not args.dry_run:
        ensure_pip(False)
        target.mkdir(parents=True, exist_ok=True)
    version = ".".join(map(str, interpreter_version()))
    ran = install(python, version, reqs, torch_index, target, target / STAMP_NAME, args)
    if ran and not args.dry_run:
        dists, _ = check_names(False, args.packages)
        verify(python, target, dists, [])
        log(f"done: packages installed in {target}")
    return 0


def create_venv(venv: Path, dry_run: bool) -> None:
    run_cmd([interpreter_path(), "-m", "venv", str(venv)], dry_run=dry_run)
    if not dry_run and not venv_python(venv).exists():
        raise SetupError(
            f"`python -m venv` did not create {venv_python(venv)}; on Debian/Ubuntu install the "
            "python3-venv package (apt-get install python3-venv)"
        )


def prepare_venv(venv: Path, dry_run: bool, need: tuple[int, int] | None) -> str:
    """Create VENV unless it exists; return the Python version it records."""
    version = venv_version(venv)
    if version is None:
        if venv.exists() and any(venv.iterdir()):
            raise SetupError(f"{venv} exists but is not a venv (no pyvenv.cfg); remove it or pick another")
        create_venv(venv, dry_run)
        return ".".join(map(str, interpreter_version()))
    if need is not None and tuple(int(p) for p in version.split(".")[:2] if p.isdigit()) != need:
        raise SetupError(
            f"{venv} was made with Python {version}, but {need[0]}.{need[1]} is needed; "
            f"delete it (rm -rf {venv}) and rerun with a Python {need[0]}.{need[1]}"
        )
    if not venv_python(venv).exists():
        raise SetupError(f"{venv} is a broken venv (no {venv_python(venv)}); delete it and rerun")
    return version


def requirements_with_torch(args: argparse.Namespace, dev: bool) -> tuple[list[str], str | None]:
    """The requirement list with the chosen torch build, and the index that build comes from."""
    reqs = select_requirements(dev, args.packages)
    if not any(is_torch_req(r) for r in reqs):
        return reqs, None
    default = (DEV_RUNTIME_PINS if dev else RUNTIME_PINS)["torch"]
    mode, spec, torch_index, why = resolve_torch(args.torch, args.torch_index, dev, default, args.cuda)
    log(f"torch: {mode} ({why}): {spec}" + (f" from {torch_index}" if torch_index else ""))
    return [spec if is_torch_req(r) else r for r in reqs], torch_index


def cmd_venv(args: argparse.Namespace) -> int:
    venv = Path(os.path.abspath(os.path.expanduser(args.venv)))
    reqs, torch_index = requirements_with_torch(args, dev=False)
    version = prepare_venv(venv, args.dry_run, None)
    python = str(venv_python(venv))
    ran = install(python, version, reqs, torch_index, None, venv / STAMP_NAME, args)
    if ran and not args.dry_run:
        dists, _ = check_names(False, args.packages)
        verify(python, None, dists, [])
        log(f"done: worker venv ready at {venv} (python: {python})")
    return 0


def dev_python_error() -> SetupError:
    got = ".".join(map(str, interpreter_version()))
    return SetupError(
        f"--dev needs Python 3.11 (bpy, Blender as a Python module, only has cp311 wheels on PyPI), "
        f"but this is Python {got} ({interpreter_path()}).\n"
        "Fix: run it with a 3.11 interpreter, e.g. `python3.11 vendor_setup.py --dev` "
        "(get one with `apt-get install python3.11 python3.11-venv`, `pyenv install 3.11`, "
        "`uv python install 3.11` or python.org)"
    )


def cmd_dev(args: argparse.Namespace) -> int:
    if interpreter_version() != DEV_PYTHON:
        raise dev_python_error()
    venv = REPO_ROOT / ".venv"
    reqs, torch_index = requirements_with_torch(args, dev=True)
    version = prepare_venv(venv, args.dry_run, DEV_PYTHON)
    python = str(venv_python(venv))
    ran = install(python, version, reqs, torch_index, None, venv / STAMP_NAME, args)
    if args.dry_run:
        return 0
    dists, meta = check_names(True, args.packages)
    if ran:
        verify(python, None, dists, meta)
    else:
        # Fast path: versions from metadata only, no imports.
        report = run_check(python, None, dists, meta, do_import=False)
        if not report["ok"]:
            raise SetupError(
                f"{venv} lacks {', '.join(report['missing'])} although its stamp says it is up to "
                "date; rerun with --force"
            )
        summary = ", ".join(f"{d} {e['version']}" for d, e in report["packages"].items())
        log(f"dev venv: python {report['python_version']}; {summary}")
    log(f"done: dev venv ready at {venv}")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    dev = bool(args.dev)
    target = None
    if args.target:
        target = Path(os.path.abspath(os.path.expanduser(args.target)))
        python = interpreter_path()
        if not target.is_dir():
            raise SetupError(f"{target} does not exist; install into it first (--target {target})")
    elif args.venv or dev:
        venv = REPO_ROOT / ".venv" if dev else Path(os.path.abspath(os.path.expanduser(args.venv)))
        python_path = venv_python(venv)
        if not python_path.exists():
            raise SetupError(
                f"no venv at {venv}; create it first (vendor_setup.py {'--dev' if dev else '--venv'})"
            )
        python = str(python_path)
    else:
        python = interpreter_path()
    dists, meta = check_names(dev, args.packages)
    if args.dry_run:
        log(f"would check {', '.join(dists + meta)} with {python}" + (f" and {target}" if target else ""))
        return 0
    report = run_check(python, target, dists, meta, optional=frozenset(FEATURE_PACKAGES))
    if args.json:
        sys.stdout.buffer.write(deps_message(report))
        sys.stdout.buffer.flush()
    else:
        print_report(report)
    return 0 if report["ok"] else 1


# --- CLI ----------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vendor_setup.py",
        description="Install the DiT360 worker's Python packages for a given Python.",
        epilog="examples:" + __doc__.split("Examples:", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--target", metavar="DIR", help="pip install --target DIR with this Python (Blender)")
    mode.add_argument("--venv", metavar="DIR", help="create a venv at DIR and install into it")
    mode.add_argument(
        "--dev", action="store_true", help="create/refresh .venv/ at the repo root (Python 3.11)"
    )
    p.add_argument("--torch", choices=TORCH_CHOICES, help="torch build (default: auto; --dev: local)")
    p.add_argument(
        "--cuda", metavar="X.Y", help="CUDA version to pick the torch wheels for (default: the driver's)"
    )
    p.add_argument("--torch-index", metavar="URL", help="index URL for --torch cuda/cpu")
    p.add_argument("--check", action="store_true", help="report what imports, and the torch device")
    p.add_argument("--json", action="store_true", help="with --check: print one `deps` protocol message")
    p.add_argument("--dry-run", action="store_true", help="print the commands only")
    p.add_argument("--force", action="store_true", help="reinstall even when the stamp matches")
    # Testing aid: install/check only these packages (comma separated names or requirements).
    p.add_argument("--packages", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.packages is not None:
        args.packages = [x.strip() for x in args.packages.split(",") if x.strip()]
        if not args.packages:
            parser.error("--packages needs at least one name")
    if args.json and not args.check:
        parser.error("--json only goes with --check")
    try:
        if args.check:
            return cmd_check(args)
        if args.target:
            return cmd_target(args)
        if args.venv:
            return cmd_venv(args)
        if args.dev:
            return cmd_dev(args)
    except SetupError as exc:
        print(f"vendor_setup: error: {exc}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print("vendor_setup: interrupted", file=sys.stderr, flush=True)
        return 130
    parser.error("choose one of --target DIR, --venv DIR or --dev (or --check)")
    return 2


if __name__ == "__main__":
    sys.exit(main())
