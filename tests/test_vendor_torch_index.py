"""vendor_setup.py picks the PyTorch CUDA wheels the installed driver can run, read from nvidia-smi.

A fake `nvidia-smi` (a shell script printing what a real one prints) is put first on PATH, so
vendor_setup runs it as a real subprocess; nothing is installed (--dry-run) and no network is used.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "vendor_setup.py"
INDEX = "https://download.pytorch.org/whl/"

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="the fake nvidia-smi is a shell script")

HEADER = """\
+-----------------------------------------------------------------------------------------+
| NVIDIA-SMI {driver}             Driver Version: {driver}     CUDA Version: {cuda}     |
|-----------------------------------------+------------------------+----------------------+
| GPU  Name                 Persistence-M | Bus-Id          Disp.A | Volatile Uncorr. ECC |
|   0  NVIDIA GeForce RTX 3090        Off |   00000000:01:00.0  On |                  N/A |
+-----------------------------------------+------------------------+----------------------+
"""


def fake_nvidia_smi(folder: Path, cuda: str | None, caps: list[str], driver: str = "550.54.14") -> Path:
    """An executable `nvidia-smi` in `folder`: the usual table (with `CUDA Version: {cuda}`, or
    none), and one compute capability per line for --query-gpu=compute_cap."""
    folder.mkdir(parents=True, exist_ok=True)
    table = HEADER.format(driver=driver, cuda=cuda) if cuda else HEADER.splitlines()[0] + "\n"
    (folder / "table.txt").write_text(table)
    (folder / "caps.txt").write_text("".join(f"{c}\n" for c in caps))
    script = folder / "nvidia-smi"
    script.write_text(
        "#!/bin/sh\n"
        'case "$1" in --query-gpu=compute_cap) cat "$(dirname "$0")/caps.txt";;'
        ' *) cat "$(dirname "$0")/table.txt";; esac\n'
    )
    script.chmod(0o755)
    return folder


@pytest.fixture
def vs(monkeypatch):
    spec = importlib.util.spec_from_file_location("vendor_setup_torch_index", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.delenv("DIT360_TORCH_SPEC", raising=False)
    monkeypatch.setattr(mod, "platform_system", lambda: "Linux")
    return mod


def torch_index_of(vs, capsys, monkeypatch, tmp_path, smi: Path | None, *argv: str) -> tuple[int, str, str]:
    """Run vendor_setup --target --dry-run with `smi` first on PATH (or no nvidia-smi at all)."""
    path = os.pathsep.join(p for p in [str(smi) if smi else None, "/usr/bin", "/bin"] if p)
    monkeypatch.setenv("PATH", path)
    rc = vs.main(["--target", str(tmp_path / "vendor"), "--dry-run", *argv])
    out, err = capsys.readouterr()
    indexes = [w for line in out.splitlines() for w in line.split() if w.startswith(INDEX)]
    return rc, (indexes[0] if indexes else ""), out + err


@pytest.mark.parametrize(
    ("cuda", "tag"),
    [("13.0", "cu130"), ("13.2", "cu130"), ("12.9", "cu128"), ("12.8", "cu128"), ("12.6", "cu126"),
     ("12.5", "cu124"), ("12.4", "cu124"), ("12.2", "cu121"), ("12.0", "cu118"), ("11.8", "cu118")],
)  # fmt: skip
def test_driver_cuda_version_picks_the_newest_build_it_runs(vs, capsys, monkeypatch, tmp_path, cuda, tag):
    smi = fake_nvidia_smi(tmp_path / "bin", cuda, ["8.6"])
    rc, index, out = torch_index_of(vs, capsys, monkeypatch, tmp_path, smi)
    assert rc == 0, out
    assert index == INDEX + tag
    assert f"driver supports CUDA {cuda}" in out  # the message says why


def test_old_gpus_get_the_build_that_still_has_them(vs, capsys, monkeypatch, tmp_path):
    """Maxwell/Pascal/Volta (compute capability < 7.5) are only in the cu126 build of new torch."""
    smi = fake_nvidia_smi(tmp_path / "bin", "13.0", ["8.6", "6.1"])  # an RTX 3090 and a GTX 1080
    rc, index, out = torch_index_of(vs, capsys, monkeypatch, tmp_path, smi)
    assert rc == 0 and index == INDEX + "cu126"
    assert "compute capability 6.1" in out


def test_driver_too_old_is_refused_with_the_fix(vs, capsys, monkeypatch, tmp_path):
    smi = fake_nvidia_smi(tmp_path / "bin", "11.4", ["7.5"], driver="470.256.02")
    rc, index, out = torch_index_of(vs, capsys, monkeypatch, tmp_path, smi)
    assert rc == 1 and index == ""
    assert "CUDA 11.4" in out and "update the NVIDIA driver" in out and "--torch cpu" in out


def test_unreadable_version_falls_back_to_cu128_and_says_so(vs, capsys, monkeypatch, tmp_path):
    smi = fake_nvidia_smi(tmp_path / "bin", None, [])
    rc, index, out = torch_index_of(vs, capsys, monkeypatch, tmp_path, smi)
    assert rc == 0 and index == INDEX + "cu128"
    assert "did not say the driver's CUDA version" in out and "--cuda" in out


@pytest.mark.parametrize(("cuda", "tag"), [("12.6", "cu126"), ("12.9", "cu128"), ("11.8", "cu118")])
def test_cuda_override(vs, capsys, monkeypatch, tmp_path, cuda, tag):
    smi = fake_nvidia_smi(tmp_path / "bin", "13.0", ["6.1"])  # --cuda wins over the driver and the GPU
    rc, index, out = torch_index_of(vs, capsys, monkeypatch, tmp_path, smi, "--cuda", cuda)
    assert rc == 0 and index == INDEX + tag, out
    rc, index, _ = torch_index_of(vs, capsys, monkeypatch, tmp_path, None, "--cuda", cuda)  # no GPU here
    assert rc == 0 and index == INDEX + tag


def test_torch_index_override_wins(vs, capsys, monkeypatch, tmp_path):
    smi = fake_nvidia_smi(tmp_path / "bin", "12.4", ["8.6"])
    monkeypatch.setenv("PATH", str(smi))
    rc = vs.main(["--target", str(tmp_path / "v"), "--dry-run", "--torch-index", "https://example.invalid/x"])
    out, _ = capsys.readouterr()
    assert rc == 0 and "--index-url https://example.invalid/x " in out and INDEX not in out


def test_bad_cuda_values_are_refused(vs, capsys, monkeypatch, tmp_path):
    for argv in (["--cuda", "twelve"], ["--cuda", "12.6", "--torch", "cpu"]):
        rc, _, out = torch_index_of(vs, capsys, monkeypatch, tmp_path, None, *argv)
        assert rc == 1 and "--cuda" in out


@pytest.mark.parametrize("choice", [None, "mps", "cpu"])
def test_intel_mac_gets_a_clear_message(vs, capsys, monkeypatch, tmp_path, choice):
    monkeypatch.setattr(vs, "platform_system", lambda: "Darwin")
    monkeypatch.setattr(vs, "intel_mac", lambda: True)
    argv = ["--target", str(tmp_path / "v"), "--dry-run"] + (["--torch", choice] if choice else [])
    rc = vs.main(argv)
    out, err = capsys.readouterr()
    assert rc == 1 and "-m pip install" not in out
    assert "Intel (x86_64) Mac" in err and "2.2.2" in err and "torch>=" in err
    assert "Apple Silicon (arm64)" in err and "DIT360_TORCH_SPEC" in err


def test_apple_silicon_and_a_torch_spec_on_intel_are_fine(vs, capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(vs, "platform_system", lambda: "Darwin")
    monkeypatch.setattr(vs, "intel_mac", lambda: False)
    assert vs.main(["--target", str(tmp_path / "v"), "--dry-run"]) == 0
    monkeypatch.setattr(vs, "intel_mac", lambda: True)
    monkeypatch.setenv("DIT360_TORCH_SPEC", "/wheels/torch-2.6.0-cp311-cp311-macosx_10_15_x86_64.whl")
    assert vs.main(["--target", str(tmp_path / "v"), "--dry-run"]) == 0
    capsys.readouterr()


def test_blender_5_python_313_target(vs, capsys, monkeypatch, tmp_path):
    """Blender 5.1+ runs Python 3.13: the same choice, and the install targets that interpreter."""
    monkeypatch.setattr(vs, "interpreter_version", lambda: (3, 13))
    smi = fake_nvidia_smi(tmp_path / "bin", "12.8", ["12.0"])  # an RTX 5090
    rc, index, out = torch_index_of(vs, capsys, monkeypatch, tmp_path, smi)
    assert rc == 0 and index == INDEX + "cu128"
    assert f"$ {vs.format_cmd([sys.executable, '-m', 'pip', 'install', '--target'])}" in out


def test_script_as_a_subprocess_reads_the_driver(tmp_path):
    """The installer as the add-on runs it: its own process, the fake nvidia-smi first on PATH."""
    smi = fake_nvidia_smi(tmp_path / "bin", "12.4", ["8.9"])
    env = {**os.environ, "PATH": f"{smi}{os.pathsep}{os.environ['PATH']}"}
    env.pop("DIT360_TORCH_SPEC", None)
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--target", str(tmp_path / "vendor"), "--dry-run"],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "the NVIDIA driver supports CUDA 12.4" in done.stdout
    assert f"--index-url {INDEX}cu124 " in done.stdout
