"""Tests for vendor_setup.py: command selection (--dry-run), refusals, the stamp, and one real install."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dit360_blender.protocol import CHILD_MESSAGES, decode

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "vendor_setup.py"


def _load():
    spec = importlib.util.spec_from_file_location("vendor_setup_under_test", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def vs(monkeypatch):
    mod = _load()
    monkeypatch.delenv("DIT360_TORCH_SPEC", raising=False)
    monkeypatch.setattr(mod, "interpreter_version", lambda: (3, 11))
    monkeypatch.setattr(mod, "platform_system", lambda: "Linux")
    monkeypatch.setattr(mod, "has_nvidia_gpu", lambda: False)
    return mod


def run_main(vs, capsys, *argv):
    rc = vs.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def pip_lines(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("$ ") and " -m pip install " in line]


# --- --dev ----------------------------------------------------------------------------------------


def test_dev_dry_run_uses_exact_pins_and_local_torch(vs, capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(vs, "REPO_ROOT", tmp_path)
    rc, out, err = run_main(vs, capsys, "--dev", "--dry-run")
    assert rc == 0, err
    assert f"-m venv {tmp_path / '.venv'}" in out
    [pip] = pip_lines(out)
    assert pip.startswith(f"$ {tmp_path / '.venv' / 'bin' / 'python'} -m pip install ")
    for req in ("torch==2.13.0", "numpy==1.26.4", "transformers==5.24.0", "pytest==9.2.0", "ruff==0.17.6"):
        assert f" {req}" in pip
    assert "'bpy==4.5.*'" in pip
    for test_only in ("diffusers==", "peft==", "sentencepiece==", "protobuf=="):
        assert test_only in pip
    assert "--index-url" not in pip and "--extra-index-url" not in pip
    assert not (tmp_path / ".venv").exists()  # dry run creates nothing


def test_dev_pins_keep_numpy_below_2_for_bpy(vs):
    numpy_pin = vs.DEV_RUNTIME_PINS["numpy"]
    assert numpy_pin.startswith("numpy==1.")
    assert set(vs.DEV_RUNTIME_PINS) == set(vs.RUNTIME_PINS) - vs.NOT_IN_DEV_VENV


def test_dev_ignores_gpu_by_default(vs, capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(vs, "REPO_ROOT", tmp_path)
    monkeypatch.setattr(vs, "has_nvidia_gpu", lambda: True)
    rc, out, _ = run_main(vs, capsys, "--dev", "--dry-run")
    assert rc == 0
    [pip] = pip_lines(out)
    assert "--index-url" not in pip and " torch==2.13.0" in pip


def test_dev_torch_spec_env_override(vs, capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(vs, "REPO_ROOT", tmp_path)
    monkeypatch.setenv("DIT360_TORCH_SPEC", "torch==2.12.1")
    rc, out, _ = run_main(vs, capsys, "--dev", "--dry-run")
    assert rc == 0
    [pip] = pip_lines(out)
    assert " torch==2.12.1" in pip and "torch==2.13.0" not in pip
    assert "--index-url" not in pip


def test_dev_with_explicit_cuda_uses_separate_torch_command(vs, capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(vs, "REPO_ROOT", tmp_path)
    rc, out, _ = run_main(vs, capsys, "--dev", "--dry-run", "--torch", "cuda")
    assert rc == 0
    torch_cmd, rest = pip_lines(out)
    assert torch_cmd.endswith(f"--index-url {vs.TORCH_CUDA_INDEX} torch==2.13.0")
    assert "torch" not in rest.replace("torch==", "")  # no torch spec in the second command
    assert "torch==" not in rest and "--index-url" not in rest


@pytest.mark.parametrize("version", [(3, 10), (3, 12), (3, 13)])
def test_dev_refuses_other_python(vs, capsys, monkeypatch, tmp_path, version):
    monkeypatch.setattr(vs, "REPO_ROOT", tmp_path)
    monkeypatch.setattr(vs, "interpreter_version", lambda: version)
    rc, out, err = run_main(vs, capsys, "--dev", "--dry-run")
    assert rc == 1
    assert "needs Python 3.11" in err
    assert f"Python {version[0]}.{version[1]}" in err
    assert "python3.11 vendor_setup.py --dev" in err  # names the fix
    assert pip_lines(out) == []


def test_dev_refuses_venv_of_other_python(vs, capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(vs, "REPO_ROOT", tmp_path)
    (tmp_path / ".venv").mkdir()
    (tmp_path / ".venv" / "pyvenv.cfg").write_text("home = /usr/bin\nversion = 3.12.3\n")
    rc, _, err = run_main(vs, capsys, "--dev", "--dry-run")
    assert rc == 1 and "3.12.3" in err and "rm -rf" in err


def test_dev_stamp_skips_pip_and_force_reinstalls(vs, capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(vs, "REPO_ROOT", tmp_path)
    venv = tmp_path / ".venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    ran: list[list[str]] = []
    monkeypatch.setattr(vs, "run_cmd", lambda cmd, **kw: ran.append(cmd))
    monkeypatch.setattr(vs, "verify", lambda *a, **kw: {"ok": True})
    ok = {"ok": True, "missing": [], "python_version": "3.11", "packages": {"x": {"version": "1"}}}
    monkeypatch.setattr(vs, "run_check", lambda *a, **kw: ok)

    rc, out, err = run_main(vs, capsys, "--dev")
    assert rc == 0, err
    assert len(ran) == 1 and ran[0][1:4] == ["-m", "pip", "install"]
    assert (venv / vs.STAMP_NAME).is_file()

    ran.clear()
    rc, out, _ = run_main(vs, capsys, "--dev")
    assert rc == 0 and ran == [] and "already up to date" in out

    # A changed requirement set invalidates the stamp.
    monkeypatch.setenv("DIT360_TORCH_SPEC", "torch==2.12.1")
    rc, _, _ = run_main(vs, capsys, "--dev")
    assert rc == 0 and len(ran) == 1 and "torch==2.12.1" in ran[0]
    monkeypatch.delenv("DIT360_TORCH_SPEC")

    ran.clear()
    run_main(vs, capsys, "--dev")  # back to the default set
    ran.clear()
    rc, _, _ = run_main(vs, capsys, "--dev", "--force")
    assert rc == 0 and len(ran) == 1 and "--force-reinstall" in ran[0]


# --- the requirement files ---------------------------------------------------------------------------


def test_pins_are_read_from_the_requirement_files(vs):
    assert vs.RUNTIME_PINS["torch"] == "torch>=2.4,<3" and vs.RUNTIME_PINS["pillow"] == "pillow>=10.1,<14"
    assert list(vs.RUNTIME_PINS) == [
        "torch", "safetensors", "transformers", "huggingface_hub", "numpy", "einops", "pillow", "gguf",
        "openexr", "torchvision", "spandrel",
    ]  # fmt: skip
    assert vs.DEV_RUNTIME_PINS["transformers"] == "transformers==5.24.0"
    assert set(vs.DEV_TEST_PINS) == {
        "diffusers",
        "peft",
        "sentencepiece",
        "protobuf",
        "pytest",
        "ruff",
        "bpy",
    }
    assert vs.DEV_TEST_PINS["bpy"] == "bpy==4.5.*"


def test_read_pins_skips_comments_and_keys_by_name(vs, tmp_path):
    path = tmp_path / "reqs.txt"
    path.write_text("# a comment\n\nTorch>=2.4,<3  # why\nbpy==4.5.*\nfoo[extra]>=1\n", encoding="utf-8")
    assert vs.read_pins(path) == {"torch": "Torch>=2.4,<3", "bpy": "bpy==4.5.*", "foo": "foo[extra]>=1"}
    assert vs.read_pins(tmp_path / "absent.txt") == {}


def _installed_copy(tmp_path, with_runtime: bool):
    """vendor_setup.py as the add-on ships it: beside requirements/runtime.txt, without dev.txt."""
    folder = tmp_path / "addon"
    (folder / "requirements").mkdir(parents=True)
    (folder / "vendor_setup.py").write_bytes(SCRIPT.read_bytes())
    if with_runtime:
        (folder / "requirements" / "runtime.txt").write_bytes(
            (ROOT / "requirements" / "runtime.txt").read_bytes()
        )
    return folder / "vendor_setup.py"


def test_the_shipped_layout_installs_the_runtime_pins_and_refuses_dev(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "DIT360_TORCH_SPEC")}
    script = _installed_copy(tmp_path, with_runtime=True)
    target = ["--target", str(tmp_path / "vendor"), "--torch", "local", "--dry-run"]
    proc = subprocess.run([sys.executable, str(script), *target], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "transformers>=4.46,<6" in proc.stdout and "pytest==" not in proc.stdout
    dev = subprocess.run(
        [sys.executable, str(script), "--dev", "--dry-run"], env=env, capture_output=True, text=True
    )
    assert dev.returncode == 1 and "dev.txt is missing" in dev.stderr
    check = subprocess.run(
        [sys.executable, str(script), "--check", "--dry-run"], env=env, capture_output=True, text=True
    )
    assert check.returncode == 0 and "would check torch" in check.stdout, check.stdout + check.stderr


def test_a_missing_runtime_file_is_an_error_not_an_empty_install(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "DIT360_TORCH_SPEC")}
    script = _installed_copy(tmp_path, with_runtime=False)
    for args in (["--target", str(tmp_path / "vendor"), "--dry-run"], ["--check"]):
        proc = subprocess.run([sys.executable, str(script), *args], env=env, capture_output=True, text=True)
        assert proc.returncode == 1 and "runtime.txt is missing" in proc.stderr, proc.stdout + proc.stderr


# --- torch choice for --target / --venv -------------------------------------------------------------


@pytest.mark.parametrize(
    ("system", "gpu", "index"),
    [
        ("Linux", True, "https://download.pytorch.org/whl/cu128"),
        ("Windows", True, "https://download.pytorch.org/whl/cu128"),
        ("Linux", False, "https://download.pytorch.org/whl/cpu"),
        ("Windows", False, "https://download.pytorch.org/whl/cpu"),
        ("Darwin", False, None),
        ("Darwin", True, None),
    ],
)
def test_target_auto_torch_per_platform(vs, capsys, monkeypatch, tmp_path, system, gpu, index):
    monkeypatch.setattr(vs, "platform_system", lambda: system)
    monkeypatch.setattr(vs, "has_nvidia_gpu", lambda: gpu)
    target = tmp_path / "vendor"
    rc, out, err = run_main(vs, capsys, "--target", str(target), "--dry-run")
    assert rc == 0, err
    cmds = pip_lines(out)
    target_arg = vs.format_cmd(["--target", str(target)])
    assert all(target_arg in c and "--upgrade" in c for c in cmds)
    if index is None:
        [cmd] = cmds
        assert "--index-url" not in cmd and "torch>=2.4,<3" in cmd and "transformers" in cmd
    else:
        torch_cmd, rest = cmds
        assert vs.format_cmd(["--index-url", index, "torch>=2.4,<3"]) in torch_cmd
        assert "transformers" not in torch_cmd
        assert "--index-url" not in rest and "torch>=" not in rest
        for name in ("safetensors", "transformers", "huggingface_hub", "numpy", "einops", "pillow"):
            assert f"{name}>=" in rest
    assert not target.exists()


@pytest.mark.parametrize(
    ("choice", "index"),
    [
        ("cuda", "https://download.pytorch.org/whl/cu128"),
        ("cpu", "https://download.pytorch.org/whl/cpu"),
        ("mps", None),
        ("local", None),
    ],
)
def test_venv_explicit_torch_choice(vs, capsys, tmp_path, choice, index):
    venv = tmp_path / "worker"
    rc, out, err = run_main(vs, capsys, "--venv", str(venv), "--torch", choice, "--dry-run")
    assert rc == 0, err
    assert f"-m venv {venv}" in out
    cmds = pip_lines(out)
    assert all(c.startswith(f"$ {venv / 'bin' / 'python'} -m pip install ") for c in cmds)
    assert all("--target" not in c for c in cmds)
    if index:
        assert f"--index-url {index} 'torch>=2.4,<3'" in cmds[0] and len(cmds) == 2
    else:
        assert len(cmds) == 1 and "--index-url" not in cmds[0]


def test_custom_torch_index(vs, capsys, tmp_path):
    rc, out, _ = run_main(
        vs,
        capsys,
        "--target",
        str(tmp_path / "v"),
        "--torch",
        "cuda",
        "--torch-index",
        "https://example.invalid/cu126",
        "--dry-run",
    )
    assert rc == 0
    assert "--index-url https://example.invalid/cu126 " in pip_lines(out)[0]


def test_cuda_refused_on_macos(vs, capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(vs, "platform_system", lambda: "Darwin")
    rc, _, err = run_main(vs, capsys, "--target", str(tmp_path / "v"), "--torch", "cuda", "--dry-run")
    assert rc == 1 and "macOS" in err


def test_torch_spec_env_implies_local(vs, capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(vs, "has_nvidia_gpu", lambda: True)
    monkeypatch.setenv("DIT360_TORCH_SPEC", "torch==2.13.0")
    rc, out, _ = run_main(vs, capsys, "--target", str(tmp_path / "v"), "--dry-run")
    assert rc == 0
    [cmd] = pip_lines(out)
    assert " torch==2.13.0 " in cmd and "--index-url" not in cmd


def test_windows_venv_python_path(vs, capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(vs, "platform_system", lambda: "Windows")
    rc, out, _ = run_main(vs, capsys, "--venv", str(tmp_path / "w"), "--dry-run")
    assert rc == 0
    assert all(str(tmp_path / "w" / "Scripts" / "python.exe") in c for c in pip_lines(out))


# --- refusing a target inside the add-on ----------------------------------------------------------


def test_refuses_target_in_folder_with_manifest(vs, capsys, tmp_path):
    addon = tmp_path / "extensions" / "user_default" / "dit360_blender"
    addon.mkdir(parents=True)
    (addon / "blender_manifest.toml").write_text('id = "dit360_blender"\n')
    for target in (addon, addon / "vendor", addon / "deep" / "er"):
        rc, out, err = run_main(vs, capsys, "--target", str(target), "--dry-run")
        assert rc == 1
        assert "refusing to install" in err and str(addon) in err
        assert "extension_path_user" in err
        assert pip_lines(out) == []
    assert not (addon / "vendor").exists()


def test_refuses_target_in_package_folder(vs, capsys, tmp_path):
    repo = tmp_path / "checkout"
    (repo / "dit360_blender").mkdir(parents=True)
    (repo / "dit360_blender" / "__init__.py").write_text("")
    for target in (repo / "vendor", repo / "dit360_blender" / "vendor"):
        rc, _, err = run_main(vs, capsys, "--target", str(target), "--dry-run")
        assert rc == 1 and "refusing to install" in err


def test_refuses_target_in_this_repo(vs, capsys):
    rc, _, err = run_main(vs, capsys, "--target", str(ROOT / "vendor"), "--dry-run")
    assert rc == 1 and "refusing to install" in err


def test_accepts_blender_user_vendor_path(vs, capsys, tmp_path):
    # What bpy.utils.extension_path_user(pkg, path="vendor") gives: outside the add-on folder.
    (tmp_path / "extensions" / "user_default" / "dit360_blender").mkdir(parents=True)
    (tmp_path / "extensions" / "user_default" / "dit360_blender" / "blender_manifest.toml").write_text("")
    vendor = tmp_path / "extensions" / ".user" / "user_default" / "dit360_blender" / "vendor"
    rc, out, err = run_main(vs, capsys, "--target", str(vendor), "--dry-run")
    assert rc == 0, err
    assert len(pip_lines(out)) == 2


# --- CLI odds and ends --------------------------------------------------------------------------------


def test_needs_a_mode(vs, capsys):
    with pytest.raises(SystemExit) as exc:
        vs.main([])
    assert exc.value.code == 2


def test_json_needs_check(vs, capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        vs.main(["--target", str(tmp_path), "--json"])
    assert exc.value.code == 2


def test_packages_option_is_hidden(vs):
    assert "--packages" not in vs.build_parser().format_help()


def test_check_missing_target(vs, capsys, tmp_path):
    rc, _, err = run_main(vs, capsys, "--check", "--target", str(tmp_path / "nope"))
    assert rc == 1 and "does not exist" in err


# --- one real install ------------------------------------------------------------------------------------


def test_real_target_install_of_einops(tmp_path):
    target = tmp_path / "vendor"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "DIT360_TORCH_SPEC")}
    cmd = [sys.executable, str(SCRIPT), "--target", str(target), "--packages", "einops"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "-m pip install --target" in proc.stdout
    assert (target / "einops" / "__init__.py").is_file()

    probe = subprocess.run(
        [sys.executable, "-c", "import einops; print(einops.__file__)"],
        env=dict(env, PYTHONPATH=str(target)),
        capture_output=True,
        text=True,
        check=True,
    )
    assert Path(probe.stdout.strip()).resolve().is_relative_to(target.resolve())

    # Idempotent: the stamp makes the second run skip pip.
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert again.returncode == 0 and "already up to date" in again.stdout
    assert "-m pip install" not in again.stdout

    check = subprocess.run(
        [sys.executable, str(SCRIPT), "--check", "--json", "--target", str(target), "--packages", "einops"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert check.returncode == 0, check.stdout + check.stderr
    report = json.loads(check.stdout.strip().splitlines()[-1])
    assert report["ok"] and report["packages"]["einops"]["version"]
    assert Path(report["packages"]["einops"]["path"]).resolve().is_relative_to(target.resolve())

    # A package that is not there makes --check fail.
    missing = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--check",
            "--target",
            str(target),
            "--packages",
            "einops,not_a_pkg_dit360",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert missing.returncode == 1 and "MISSING" in missing.stdout


# --- --check --json: one message in the add-on's child-process framing -----------------------------


def check_json(script: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    cmd = [sys.executable, str(script), "--check", "--json", "--packages", "json"]
    proc = subprocess.run(cmd, env=env, cwd=script.parent, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    [line] = proc.stdout.splitlines()
    return decode(line, CHILD_MESSAGES)


def test_check_json_is_one_deps_message():
    msg = check_json(SCRIPT)
    assert msg["v"] == 1 and msg["type"] == "deps" and msg["ok"] and msg["missing"] == []
    assert msg["packages"]["json"]["version"] and msg["python"] and msg["target"] is None


def test_check_json_finds_the_protocol_beside_it_as_in_the_zip(tmp_path):
    """In the built zip vendor_setup.py sits beside the add-on's __init__.py and protocol.py."""
    addon = tmp_path / "user_default" / "dit360_blender"
    shutil.copytree(ROOT / "dit360_blender", addon, ignore=shutil.ignore_patterns("__pycache__", "bench"))
    shutil.copytree(ROOT / "requirements", addon / "requirements")
    shutil.copy2(SCRIPT, addon / "vendor_setup.py")
    msg = check_json(addon / "vendor_setup.py")
    assert msg["type"] == "deps" and msg["ok"]


def test_check_reports_a_missing_feature_package_without_failing(vs):
    """A worker Python without spandrel (only the upscale needs it) passes --check, the report
    naming it; a required package that is missing still fails; an install's check is strict."""
    pytest.importorskip("einops")
    if importlib.util.find_spec("spandrel") is not None:
        pytest.skip("this Python has spandrel; the case is a Python without it")
    lenient = vs.run_check(sys.executable, None, ["einops", "spandrel"], [], optional=frozenset({"spandrel"}))
    assert lenient["ok"] and lenient["missing"] == []
    assert lenient["packages"]["spandrel"]["error"] and not lenient["packages"]["einops"]["error"]
    assert vs.unavailable_features(lenient) == {"upscale": ["spandrel"]}
    strict = vs.run_check(sys.executable, None, ["einops", "spandrel"], [])
    assert not strict["ok"] and strict["missing"] == ["spandrel"]
    required_missing = vs.run_check(
        sys.executable, None, ["no_such_pkg_dit360"], [], optional=frozenset({"spandrel"})
    )
    assert not required_missing["ok"] and required_missing["missing"] == ["no_such_pkg_dit360"]
