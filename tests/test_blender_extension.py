"""The Blender extension in real Blender (the bpy module, 4.5 LTS), with the tiny model through the real
worker. One Blender process (tests/blender/scenario_main.py) runs every step in order — bpy can be
imported once per process and keeps global state — and each test here checks one step's record.

Built once for the module: the extension zip (build_extension.py, Blender's own builder), a wheel
for the Install Dependencies button to install without a network, and a stand-in Hugging Face Hub
on 127.0.0.1 (tests/test_hub.py's FakeHub) for the Download Models button.
"""

from __future__ import annotations

import ctypes.util
import importlib.util
import json
import math
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("bpy") is None, reason="needs the bpy module")

ROOT = Path(__file__).resolve().parents[1]
FAKE_PACKAGE = "dit360fakepkg"


def python_without_torch() -> str:
    """The interpreter this venv was made from: a real Python without torch (the "missing
    dependencies" case)."""
    base = getattr(sys, "_base_executable", None) or sys.executable
    probe = subprocess.run([base, "-c", "import torch"], capture_output=True)
    if probe.returncode == 0:
        pytest.skip(f"{base} has torch: no Python without it to test missing dependencies")
    return base


def build_zip(out_dir: Path) -> Path:
    env = dict(os.environ, BLENDER_USER_RESOURCES=str(out_dir / "bpy-user"))
    proc = subprocess.run(
        [sys.executable, str(ROOT / "build_extension.py"), "--output-dir", str(out_dir)],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return next(out_dir.glob("dit360_blender-*.zip"))


def write_wheel(folder: Path) -> Path:
    """A minimal pure-Python wheel (pip installs it from --find-links with no index)."""
    import base64
    import hashlib

    folder.mkdir(parents=True, exist_ok=True)
    dist = f"{FAKE_PACKAGE}-1.0.dist-info"
    files = {
        f"{FAKE_PACKAGE}/__init__.py": b"VALUE = 360\n",
        f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {FAKE_PACKAGE}\nVersion: 1.0\n".encode(),
        f"{dist}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    for name, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{name},sha256={digest},{len(data)}")
    record.append(f"{dist}/RECORD,,")
    files[f"{dist}/RECORD"] = ("\n".join(record) + "\n").encode()
    path = folder / f"{FAKE_PACKAGE}-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return path


@pytest.fixture(scope="module")
def built(tiny_models, tmp_path_factory) -> dict:
    """The extension zip (Blender's builder) and the shared parts of the scenarios' configuration."""
    work = tmp_path_factory.mktemp("blender")
    t0 = time.monotonic()
    zip_path = build_zip(work / "dist")
    return {"zip": str(zip_path), "models": str(tiny_models["root"]), "work": str(work),
            "build_s": time.monotonic() - t0}  # fmt: skip


def run_scenario(script: str, cfg: dict, name: str, timeout: float = 900, python: str | None = None) -> dict:
    """Run a scenario script in its own Blender process (`python`: one with bpy, default this one)."""
    work = Path(cfg["work"])
    cfg = dict(cfg, out=str(work / f"{name}.json"))
    (work / f"{name}-config.json").write_text(json.dumps(cfg), encoding="utf-8")
    env = dict(
        os.environ,
        BLENDER_USER_RESOURCES=str(work / f"bpy-user-{name}"),
        # Eevee's shader caches: kept between runs in the (git-ignored) pytest cache, never in ~/.cache
        XDG_CACHE_HOME=str(ROOT / ".pytest_cache" / "xdg-cache"),
    )
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_ENDPOINT", "PIP_NO_INDEX", "PIP_FIND_LINKS"):
        env.pop(var, None)
    t0 = time.monotonic()
    proc = subprocess.run(
        [python or sys.executable, str(ROOT / "tests" / "blender" / script), str(work / f"{name}-config.json")],
        capture_output=True, text=True, env=env, timeout=timeout,
    )  # fmt: skip
    elapsed = time.monotonic() - t0
    out = Path(cfg["out"])
    assert out.is_file(), f"no result (exit {proc.returncode})\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    results = json.loads(out.read_text(encoding="utf-8"))
    results["_meta"] = {"scenario_s": elapsed, "returncode": proc.returncode, "cfg": cfg}
    print(f"\nBlender scenario {name}: {elapsed:.1f} s: "
          + ", ".join(f"{k} {v['seconds']:.1f}" for k, v in results.items() if k != "_meta"))  # fmt: skip
    return results


@pytest.fixture(scope="module")
def scenario(built):
    from test_hub import TOKEN, FakeHub

    work = Path(built["work"])
    write_wheel(work / "wheels")
    hub = FakeHub()
    cfg = {
        **built,
        "python_without_torch": python_without_torch(),
        "fake_package": FAKE_PACKAGE,
        "wheel_dir": str(work / "wheels"),
        "hub_url": hub.url,
        "hf_token": TOKEN,
        "wrong_token": "hf_WRONGtoken0000000000000000000000",
    }
    try:
        results = run_scenario("scenario_main.py", cfg, "main")
    finally:
        hub.close()
    print(f"build {built['build_s']:.1f} s")
    return results


def step(results: dict, name: str) -> dict:
    record = results[name]
    assert record["ok"], f"step {name} failed:\n{record['error']}"
    return record["data"]


# -- no torch (nor bpy) where it does not belong ----------------------------------------------------


def test_package_import_pulls_in_neither_bpy_nor_torch():
    code = "import sys, dit360_blender, dit360_blender.client; print(sorted({'bpy', 'torch'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]"


def test_blender_side_never_imports_torch_or_the_hub_code():
    import ast

    for path in sorted((ROOT / "dit360_blender" / "blender").glob("*.py")) + [
        ROOT / "dit360_blender" / "api.py"
    ]:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [("." * node.level) + (node.module or "")]
            else:
                continue
            for name in names:
                assert name.split(".")[0] not in (
                    "torch",
                    "huggingface_hub",
                    "transformers",
                    "safetensors",
                ), path
                assert "pipeline" not in name and "worker" not in name, (path, name)


# -- packaging, install, register -----------------------------------------------------------------


def test_zip_installs_validates_and_registers_twice(scenario):
    d = step(scenario, "install")
    assert d["validate_rc"] == 0  # Blender's own validator on the built zip
    assert d["module"] == "bl_ext.user_default.dit360_blender"
    assert "/extensions/user_default/dit360_blender/__init__.py" in d["file"].replace("\\", "/")
    assert d["check"] == [True, True]
    assert d["cycles"] == [{"off": [False, False], "on": [True, True]}] * 2
    assert d["scene_prop"] and d["wm_prop"]
    assert d["prefs_idname"] == "bl_ext.user_default.dit360_blender"
    assert d["torch_loaded"] is False


def test_zip_layout(scenario):
    zip_path = scenario["_meta"]["cfg"]["zip"]
    names = set(zipfile.ZipFile(zip_path).namelist())
    assert {"blender_manifest.toml", "__init__.py", "vendor_setup.py", "blender/pump.py", "client.py",
            "worker/download.py", "pipeline/dit360.py"} <= names  # fmt: skip
    assert not any(n.startswith(("tests/", ".venv/", "dit360_blender/")) or "__pycache__" in n for n in names)


# -- the operator with the driven timer -------------------------------------------------------------


def test_operator_returns_at_once_and_progress_reaches_the_window_manager_in_order(scenario):
    d = step(scenario, "generate")
    assert d["error"] is None
    assert d["operator_result"] == ["FINISHED"] and d["operator_returned_s"] < 1.0
    assert d["running_after_call"] is True and d["timer_registered"] >= 1
    stages = [s for s, _ in d["progress_log"]]
    order = ["loading", "encoding", "sampling", "decoding", "saving"]
    assert [s for s in order if s in stages] == order
    assert [order.index(s) for s in stages] == sorted(order.index(s) for s in stages)
    sampled = [step for s, step in d["progress_log"] if s == "sampling"]
    assert sampled == sorted(sampled) and sampled[-1] == 3
    progress = [p for _, _, p, running in d["wm_states"] if running]
    assert progress == sorted(progress)  # the bar never goes back (ticks may see several events at once)
    assert d["wm_final"]["running"] is False and d["wm_final"]["stage"] == "done"
    assert d["wm_final"]["progress"] == 1.0 and not d["wm_final"]["error"]
    assert "preview" in d["events"] and d["events"][-1] == "result"
    # at most one per step (the client keeps only the newest of a batch), each in the viewport's World
    assert 1 <= d["previews_shown"] <= 3
    assert not d["timers_left"]  # the pump stopped itself once idle (the worker's idle timer is off)


def test_world_gets_the_chain_pointing_at_the_written_image(scenario):
    d = step(scenario, "generate")
    assert d["scene_world"] == "UserWorld"
    chain = d["chain"]
    assert chain["texcoord"] == "ShaderNodeTexCoord" and chain["mapping"] == "ShaderNodeMapping"
    assert chain["env"] == "ShaderNodeTexEnvironment" and chain["background"] == "ShaderNodeBackground"
    assert chain["frame"] == "NodeFrame"
    links = d["links"]
    assert "DiT360 Coordinates:Generated->DiT360 Rotation:Vector" in links
    assert "DiT360 Rotation:Vector->DiT360 Environment:Vector" in links
    assert "DiT360 Environment:Color->DiT360 Lighting:Color" in links
    assert "DiT360 Lighting:Background->World Output:Surface" in links
    img = d["image"]
    assert img["exists"] and img["size"] == [128, 64]
    # the World shows the float HDR written beside the PNG as half-float OpenEXR (<stem>.exr, or
    # <stem>_lighting.exr with a Sun), the .hdr of the same name beside it
    hdr = Path(img["filepath"])
    path = Path(img["props"]["dit360_png_file"])
    assert hdr.parent == path.parent and hdr.suffix == ".exr" and hdr.name.startswith(path.stem)
    assert hdr.with_suffix(".hdr").is_file()
    assert path.is_file() and path.name == "a-red-desert-canyon-under-a-pale-sky_4242.png"
    # an unsaved .blend: the add-on's user folder
    assert "/extensions/.user/user_default/dit360_blender/outputs" in str(path).replace("\\", "/")
    props = img["props"]
    assert props["dit360_prompt"].startswith("This is a panorama image. A red desert")
    assert props["dit360_seed"] == 4242 and props["dit360_steps"] == 3
    from dit360_blender.pipeline.image_io import read_png_metadata

    assert read_png_metadata(path)["seed"] == 4242  # the metadata is in the file too
    assert d["world_props"]["dit360_seed"] == 4242 and d["world_props"]["user_note"] == "mine"
    assert d["history"][0]["seed"] == 4242 and d["history"][0]["filepath"] == str(path)
    assert d["panel_seed"] == 4242


def test_user_nodes_survive_and_nothing_is_left_behind(scenario):
    d = step(scenario, "generate")
    nodes = d["after"]["nodes"]
    assert {"User RGB", "User Math", "Background", "World Output"} <= set(nodes)
    assert nodes["User RGB"]["type"] == "ShaderNodeRGB"
    assert "User RGB:Color->Background:Color" in d["links"]  # the user's own wiring is kept
    assert d["leftover_worlds"] == ["UserWorld"]  # the preview World is gone
    assert "DiT360 Preview" not in d["leftover_images"]


def test_undo_restores_the_previous_world(scenario):
    d = step(scenario, "undo")
    assert d["before_undo_has_chain"] is True
    assert d["undo"] == ["FINISHED"]
    assert d["equal_to_before"], d["after_undo"]
    assert d["scene_world"] == "UserWorld"
    assert d["redo"] == ["FINISHED"] and d["after_redo_has_chain"] is True


# -- scripting --------------------------------------------------------------------------------------


def test_api_generate_world_blocks_in_background_and_returns_the_image(scenario):
    d = step(scenario, "api")
    assert d["returned"] == "Image" and d["env_image"] == d["image"]
    assert Path(d["filepath"]).parent == Path(d["expected_dir"])  # //dit360/ next to the saved .blend
    assert d["packed"] is True and d["seed_prop"] == 7
    # only the image swapped (and the Background strength follows the new image's exposure)
    assert d["same_nodes"] and set(d["changed_nodes"]) <= {"DiT360 Environment", "DiT360 Lighting"}
    assert "DiT360 Environment" in d["changed_nodes"]
    assert d["new_world"] and d["new_world_image"] == d["image2"]  # a scene without a World gets one
    assert d["op_blocking_result"] == ["FINISHED"] and d["op_blocking_done"]
    assert "a-red-desert-canyon-under-a-pale-sky_9.png" in d["custom_out"]  # a folder the user chose


def test_history_reapplies_and_copies_settings(scenario):
    d = step(scenario, "history")
    assert [e["seed"] for e in d["entries"]] == [
        9,
        7,
        4242,
    ]  # newest first (the scene without a World has its own)
    assert d["applied_png"] == d["oldest_file"]  # the oldest entry's environment (its HDR) is shown
    assert len(d["oldest_hdrs"]) == 2  # the entry records the .hdr files; the World shows the EXR beside one
    assert Path(d["applied_file"]).suffix == ".exr"
    assert str(Path(d["applied_file"]).with_suffix(".hdr")) in d["oldest_hdrs"]
    assert d["panel_after_copy"]["seed"] == 4242 and d["panel_after_copy"]["randomize"] is False
    assert d["panel_after_copy"]["steps"] == 3


def test_world_controls_split_camera_and_lighting(scenario):
    d = step(scenario, "world_controls")
    assert "DiT360 Light Path:Is Camera Ray->DiT360 Camera/Lighting:Fac" in d["split_links"]
    assert "DiT360 Lighting:Background->DiT360 Camera/Lighting:Shader" in d["split_links"]
    assert "DiT360 Camera:Background->DiT360 Camera/Lighting:Shader_001" in d["split_links"]
    assert "DiT360 Environment:Color->DiT360 Camera:Color" in d["split_links"]
    assert "DiT360 Camera/Lighting:Shader->World Output:Surface" in d["split_links"]
    # the strengths multiply the environment's exposure
    assert d["strengths"]["DiT360 Lighting"] == pytest.approx(2.5 * d["exposure"], rel=1e-5)
    assert d["strengths"]["DiT360 Camera"] == pytest.approx(0.25 * d["exposure"], rel=1e-5)
    assert "DiT360 Lighting:Background->World Output:Surface" in d["unsplit_links"]
    assert d["unsplit_nodes"] == ["DiT360", "DiT360 Coordinates", "DiT360 Environment", "DiT360 Lighting",
                                  "DiT360 Rotation"]  # fmt: skip


# -- failure paths: the World stays exactly as it was and the fix is shown -----------------------------


def _unchanged(d: dict) -> None:
    assert d["world_unchanged"] is True
    assert d["scene_world"] == "UserWorld"
    assert d["worlds"] == ["UserWorld"] and "DiT360 Preview" not in d["images"]
    assert d["wm"]["running"] is False


def test_cancel_leaves_the_world_untouched(scenario):
    d = step(scenario, "cancel")
    assert d["preview_world_in_use"] == "DiT360 Preview World"  # the viewport shows the previews
    assert d["preview_world_image"] == "DiT360 Preview" and d["preview_thumbnail"][0] > 0
    assert d["cancel_op"] == ["FINISHED"] and d["error"]["code"] == "cancelled"
    _unchanged(d)
    assert d["wm"]["stage"] == "cancelled" and "unchanged" in d["wm"]["status"]
    assert d["cancel_latency_s"] < 10


def test_loading_a_file_mid_job_drops_the_job_and_the_next_one_runs(scenario):
    d = step(scenario, "file_load_mid_job")
    assert d["job_after_load"] is None and d["running_after_load"] is False
    assert d["worlds_after_load"] == []  # nothing of the old file's preview World came along
    assert d["next_job_ok"] is True


def test_worker_killed_mid_job_leaves_the_world_untouched_and_says_what_to_do(scenario):
    d = step(scenario, "worker_killed")
    assert d["error"]["code"] == "worker_died"
    _unchanged(d)
    assert d["wm"]["error_code"] == "worker_died" and "again" in d["wm"]["error_hint"]


def test_missing_weights_show_the_download_fix(scenario):
    d = step(scenario, "missing_weights")
    assert d["error"]["code"] == "weights_missing"
    _unchanged(d)
    assert "download" in d["wm"]["error_hint"].lower()


def test_missing_dependencies_show_the_install_fix(scenario):
    d = step(scenario, "missing_dependencies")
    assert d["error"]["code"] == "worker_start_failed"
    _unchanged(d)
    assert "install dependencies" in d["wm"]["error_hint"].lower()
    assert "No module named 'torch'" in d["wm"]["error_message"]  # the cause, from the worker's log
    assert d["nonexistent_wm"]["code"] == "worker_start_failed"
    assert (
        "does not exist" in d["nonexistent_wm"]["message"]
        and "Install Dependencies" in d["nonexistent_wm"]["hint"]
    )
    assert d["nonexistent_world_unchanged"] is True
    assert d["torch_loaded"] is False


# -- rendering -------------------------------------------------------------------------------------


def test_cycles_sphere_is_lit_by_the_generated_world(scenario):
    d = step(scenario, "render_cycles")
    r = d["renders"]
    print(f"\nCycles 64x32, 8 spp: env mean {d['env_mean']}; " + "; ".join(
        f"{k}: rendered {[round(x, 4) for x in v['mean']]}"
        + (f" predicted {[round(x, 4) for x in v['predicted']]} ({v['seconds']:.2f} s)" if "predicted" in v else "")
        for k, v in r.items()
    ))  # fmt: skip
    for label in ("rot0", "rot180"):
        rendered, predicted = r[label]["mean"], r[label]["predicted"]
        assert r[label]["covered_px"] > 700
        for got, want in zip(rendered, predicted):
            assert got == pytest.approx(want, rel=0.1, abs=0.01), (label, rendered, predicted)
    assert max(r["black"]["mean"]) < 0.01  # with a black image the sphere is black: our image lights it
    # turning the Mapping node moves the light: the change matches the prediction's change
    delta = [a - b for a, b in zip(r["rot0"]["mean"], r["rot180"]["mean"])]
    want = [a - b for a, b in zip(r["rot0"]["predicted"], r["rot180"]["predicted"])]
    assert max(abs(x) for x in want) > 0.01, "the generated environment is too uniform for this check"
    for got, expected in zip(delta, want):
        assert got == pytest.approx(expected, abs=max(0.01, 0.35 * abs(expected)))
        assert math.copysign(1, got) == math.copysign(1, expected) or abs(expected) < 0.01


# -- preferences -----------------------------------------------------------------------------------


def test_dependencies_status_and_install_in_the_background(scenario):
    d = step(scenario, "dependencies")
    assert d["state_while_checking"] == "CHECKING"
    assert (
        d["custom"]["state"] == "OK" and "torch" in d["custom"]["summary"] and "CPU" in d["custom"]["summary"]
    )
    assert d["no_torch"]["state"] == "MISSING" and "torch" in d["no_torch"]["summary"]
    assert "Online access is off" in d["offline_install"]
    assert d["install_result"] == ["FINISHED"] and d["install_returned_s"] < 1.0  # never blocks the UI
    assert d["state_while_installing"] == "INSTALLING"
    assert d["vendor_has_package"], d
    assert "/extensions/.user/user_default/dit360_blender/vendor" in d["vendor"].replace("\\", "/")
    assert d["install_log_exists"]
    assert d["after_install"]["state"] == "OK", d["after_install"]


def test_models_check_download_progress_and_gated_explanation(scenario):
    d = step(scenario, "models")
    assert d["found"]["state"] == "OK"
    assert d["missing"]["state"] == "MISSING" and "transformer" in d["missing"]["missing"]
    assert "offline" in d["offline"]["error"] and "Allow online access" in d["offline"]["hint"]
    assert d["offline"]["tasks"] == []  # nothing was started
    assert d["gated"]["state"] == "FAILED" and d["gated"]["code"] == "download_gated"
    assert "licence" in d["gated"]["hint"] and "token" in d["gated"]["hint"]
    dl = d["download"]
    assert d["state_while_downloading"] == "DOWNLOADING"
    assert dl["state"] == "OK" and not dl["error"], dl
    names = {f[0] for f in dl["files"]}
    assert {"flux1-dev.safetensors", "ae.safetensors", "adapter_model.safetensors"} <= names
    assert all(f[3] == 1.0 and f[1] == f[2] > 0 for f in dl["files"])  # every file reported to its end
    assert (
        "FLUX.1-dev/flux1-dev.safetensors" in dl["on_disk"]
        and "DiT360/adapter_model.safetensors" in dl["on_disk"]
    )
    assert d["token_in_logs"] is False and d["token_in_prefs_type"] == "PASSWORD"


def test_a_refused_or_oversized_child_line_is_logged_and_the_download_goes_on(scenario):
    d = step(scenario, "child_messages")
    assert d["state"] == "OK" and d["status"].startswith("Download complete") and not d["error"], d
    assert d["files"] == [["ae.safetensors", 100.0, 100.0, 1.0]]  # nothing of the refused message
    assert "some library's own output" in d["log"]
    assert "not a message: bad_message: download_progress: field 'done' is missing" in d["log"]
    assert "exceeded the 1048576-byte limit and was discarded" in d["log"] and "x" * 100 not in d["log"]


# -- UI --------------------------------------------------------------------------------------------


def test_panels_draw_in_every_state_and_offer_the_fix(scenario):
    d = step(scenario, "panels")
    ops = d["operators"]
    assert "dit360.generate" in ops["idle"] and "dit360.preview_lighting" in ops["idle"]
    assert "dit360.cancel" in ops["running"]
    assert "dit360.install_dependencies" in ops["error_deps"]
    assert "dit360.download_models" in ops["error_weights"]
    assert (
        "dit360.download_models" in ops["deps_missing"] and "dit360.open_preferences" in ops["deps_missing"]
    )
    assert any("packages are missing" in label for label in d["labels"]["deps_missing"])


def test_preview_lighting_uses_the_scene_world(scenario):
    d = step(scenario, "preview_lighting")
    assert d["material"]["result"] == ["FINISHED"] and d["material"]["shadings"]
    assert all(s == {"type": "MATERIAL", "scene_world": True} for s in d["material"]["shadings"])
    assert all(s == {"type": "RENDERED", "scene_world_render": True} for s in d["rendered"])


def test_idle_worker_is_stopped(scenario):
    d = step(scenario, "idle_stop")
    assert d["pid"] and d["pid_after"] is None and "idle" in d["info"]


def test_unregister_stops_the_worker_and_the_timer_and_gives_the_world_back(scenario):
    d = step(scenario, "unregister")
    assert d["pid_running"] and d["worker_alive_after"] is False
    assert d["world_restored"] is True and d["scene_world"] == "UserWorld"
    assert d["timers_left"] == [] and d["panel_registered"] is False
    assert d["torch_loaded"] is False


@pytest.mark.skipif(
    ctypes.util.find_library("EGL") is None, reason="Eevee needs libEGL (apt-get install libegl1)"
)
def test_eevee_sphere_is_lit_by_the_generated_world(built):
    results = run_scenario("scenario_eevee.py", built, "eevee")
    d = step(results, "eevee")
    r = d["renders"]
    print(f"Eevee ({d['engine']}) 64x32: " + "; ".join(
        f"{k}: rendered {[round(x, 4) for x in v['mean']]}"
        + (f" predicted {[round(x, 4) for x in v['predicted']]} ({v['seconds']:.2f} s)" if "predicted" in v else "")
        for k, v in r.items()
    ))  # fmt: skip
    for label in ("rot0", "rot180"):
        for got, want in zip(r[label]["mean"], r[label]["predicted"]):
            assert got == pytest.approx(want, rel=0.1, abs=0.01), (label, r[label])
    delta = [a - b for a, b in zip(r["rot0"]["mean"], r["rot180"]["mean"])]
    want = [a - b for a, b in zip(r["rot0"]["predicted"], r["rot180"]["predicted"])]
    for got, expected in zip(delta, want):
        assert got == pytest.approx(expected, abs=max(0.01, 0.35 * abs(expected)))
    assert max(r["black"]["mean"]) < 0.01
    assert d["torch_loaded"] is False
