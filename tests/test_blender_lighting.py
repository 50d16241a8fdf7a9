"""The generated world lights the scene with its HDR and a Sun lamp, in real Blender (bpy 4.5 LTS).

The tiny random generator cannot draw a sun, so two SYNTHETIC panoramas with a known sun (a sky
gradient and a bright disc at a chosen azimuth/elevation, drawn in direction space) are turned into
worker results exactly as the worker does it (`panorama.analyze`, `write_lighting_files`, `save_png`,
a `result` message through the protocol's encoder and decoder) and fed to the runtime's apply path
(`results.apply_result`, which every job's result takes). One real job through the worker with the
tiny model closes the loop. One Blender process runs tests/blender/scenario_lighting.py; each test
here checks one step's record.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
from test_blender_extension import build_zip, run_scenario
from test_panorama_exr import read_exr
from test_panorama_synthetic import sun_panorama

from dit360_blender.client import Job
from dit360_blender.panorama import sphere
from dit360_blender.panorama.analyze import analyze, write_lighting_files
from dit360_blender.panorama.color import luminance
from dit360_blender.panorama.rgbe import read_hdr
from dit360_blender.pipeline.image_io import save_png
from dit360_blender.protocol import WORKER_MESSAGES, decode, encode, message

pytestmark = pytest.mark.skipif(importlib.util.find_spec("bpy") is None, reason="needs the bpy module")

SUNS = {"A": (20.0, 35.0), "B": (-110.0, 50.0)}  # azimuth, elevation (degrees) of the drawn suns
SIZE = (256, 512)  # height, width of the synthetic panoramas
ORTHO_SCALE, RESOLUTION = 6.0, (64, 48)  # the top-down render: 6 world units across 64 pixels
PROMPT = "This is a panorama image. A red desert canyon under a pale sky"


def synthetic_result(folder: Path, name: str, seed: int) -> dict:
    """A worker `result` for a synthetic sun panorama, made as the worker makes one (worker/jobs.py)."""
    azimuth, elevation = SUNS[name]
    rgb = sun_panorama(azimuth, elevation, height=SIZE[0], width=SIZE[1])
    job = Job(
        prompt=f"synthetic sun {name}", output_dir=str(folder), seed=seed, width=SIZE[1], height=SIZE[0]
    )
    params = job.to_params()
    metadata = {
        k: params[k] for k in ("prompt", "seed", "steps", "guidance", "width", "height", "lora_strength")
    }
    analysis, hdr = analyze(rgb, sun_share=float(params["sun_share"]))
    metadata.update(analysis)
    out = folder / f"synthetic-sun-{name.lower()}_{seed}.png"
    files = write_lighting_files(out, hdr)
    path = save_png(out, rgb, metadata)
    event = decode(encode(message(
        "result", job_id=f"synthetic-{name}", path=str(path), width=SIZE[1], height=SIZE[0],
        metadata=metadata, timings={"total_s": 0.5}, model_cached=True, files=files,
    )), WORKER_MESSAGES)  # fmt: skip
    event_path = folder / f"event-{name}.json"
    event_path.write_text(json.dumps(event), encoding="utf-8")
    return {
        "event": str(event_path),
        "params": params,
        "metadata": metadata,
        "files": files,
        "png": str(path),
    }


@pytest.fixture(scope="module")
def lighting(tiny_models, tmp_path_factory) -> dict:
    work = tmp_path_factory.mktemp("blender-lighting")
    folder = work / "synthetic"
    folder.mkdir()
    results = {name: synthetic_result(folder, name, seed) for name, seed in (("A", 1), ("B", 2))}
    cfg = {
        "zip": str(build_zip(work / "dist")),
        "models": str(tiny_models["root"]),
        "work": str(work),
        "results": {k: {"event": v["event"], "params": v["params"]} for k, v in results.items()},
        "prompt": PROMPT,
        "ortho_scale": ORTHO_SCALE,
        "resolution": list(RESOLUTION),
        "samples": 16,
        "look_fov_deg": 20.0,
        "look_res": 15,
    }
    out = run_scenario("scenario_lighting.py", cfg, "lighting", timeout=600)
    return {"out": out, "results": results}


def step(lighting: dict, name: str) -> dict:
    record = lighting["out"][name]
    assert record["ok"], record["error"]
    return record["data"]


def angle_deg(a, b) -> float:
    a, b = np.asarray(a, float), np.asarray(b, float)
    return math.degrees(math.acos(np.clip(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)), -1.0, 1.0)))


def rot_z(vector, degrees: float) -> np.ndarray:
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]]) @ np.asarray(vector, float)


def lamp_numbers(metadata: dict) -> dict:
    lighting = metadata["lighting"]
    return {"exposure": lighting["exposure"], "peak": max(lighting["sun_irradiance_rgb"]),
            "lamp": lighting["sun_lamp"]}  # fmt: skip


# -- the World uses the float HDR; our Sun points from the sun; undo ------------------------------------


def test_world_shows_the_float_lighting_hdr_and_one_sun_from_the_estimated_direction(lighting):
    d = step(lighting, "apply")
    files = lighting["results"]["A"]["files"]
    assert d["env"]["is_float"] is True and d["env"]["kind"] == "lighting"
    assert d["env"]["filepath"] == str(Path(files["lighting"]).resolve())  # the sun-clamped map, with a Sun
    assert d["env"]["size"] == [SIZE[1], SIZE[0]] and d["env"]["colorspace"] == "Linear Rec.709"
    assert d["env"]["png_file"] == lighting["results"]["A"]["png"] and Path(d["env"]["png_file"]).is_file()
    assert d["returned"] == d["env"]["name"] and d["scene_world"] == "UserWorld"
    assert d["suns"] == ["DiT360 Sun"]
    sun = d["sun"]
    truth = sphere.direction_from_angles(*SUNS["A"])
    error = angle_deg(sun["minus_z"], -truth)  # a light shines along its -Z: away from the sun
    print(f"\nSun A: -Z vs the drawn sun's opposite direction: {error:.3f}°")
    assert error < 2.0
    numbers = lamp_numbers(lighting["results"]["A"]["metadata"])
    assert d["background_strength"] == pytest.approx(numbers["exposure"], rel=1e-5)  # strength 1 x exposure
    assert sun["energy"] == pytest.approx(numbers["exposure"] * numbers["peak"], rel=1e-5)
    assert sun["energy"] == pytest.approx(numbers["lamp"]["strength"], rel=1e-5)  # = sun_lamp(exposure)
    assert sun["angle"] == pytest.approx(numbers["lamp"]["angle"], rel=1e-5) and 0.01 < sun["angle"] < 0.2
    assert sun["color"] == pytest.approx(numbers["lamp"]["color"], abs=1e-5)
    assert sun["use_shadow"] is True and sun["world_tag"] == "UserWorld"
    driver = sun["driver"]
    assert driver["valid"] and driver["simple"]  # no Python needed: works with Auto Run Scripts off
    assert driver["targets"] == [
        [
            "rot",
            "WORLD",
            "UserWorld",
            'node_tree.nodes["DiT360 Rotation"].inputs["Rotation"].default_value[2]',
        ]
    ]
    assert d["lights_unchanged"] and d["user_nodes_kept"]


def test_panel_shows_seam_and_sun_and_history_keeps_them(lighting):
    d = step(lighting, "apply")
    desc = d["describe"]
    assert desc["seam"].startswith("Seam: z ") and desc["seam_ok"] in (True, False)
    az, el = SUNS["A"]
    assert desc["sun_found"] is True and desc["sun"].startswith(
        f"Sun: azimuth {az:.0f}°, elevation {el:.0f}°"
    )
    assert desc["seam"] in d["labels"] and desc["sun"] in d["labels"]
    assert any(label.startswith("× exposure") for label in d["labels"])
    h = d["history"]
    files = lighting["results"]["A"]["files"]
    assert h["filepath"] == lighting["results"]["A"]["png"]  # the PNG stays on disk and in the history
    assert h["hdr"] == files["hdr"] and h["lighting"] == files["lighting"]
    assert h["has_seam"] and h["has_lighting"] and h["sun_share"] == pytest.approx(0.6)


def test_undo_gives_back_the_world_and_removes_the_sun(lighting):
    d = step(lighting, "apply")
    assert d["undo"] == ["FINISHED"]
    assert (
        d["undo_world_equal"] and d["undo_suns"] == [] and d["undo_objects_equal"] and d["undo_lights_equal"]
    )
    assert d["redo"] == ["FINISHED"] and d["redo_suns"] == ["DiT360 Sun"]
    assert d["redo_env"] == str(Path(lighting["results"]["A"]["files"]["lighting"]).resolve())


# -- the Sun follows the World's rotation --------------------------------------------------------------


def test_sun_follows_the_mapping_rotation(lighting):
    d = step(lighting, "rotation")
    z0 = d["at0"]["plus_z"]
    for key, degrees in (("at90", 90.0), ("manual45", 45.0), ("at_minus30", -30.0)):
        # Mapping turns the lookup vector by +θ, so what the World shows (and our Sun) turns by −θ
        error = angle_deg(d[key]["plus_z"], rot_z(z0, -degrees))
        assert error < 0.01, (key, error)
        turned = math.degrees(d[key]["rotation_z"] - d["at0"]["rotation_z"])
        assert turned == pytest.approx(-degrees, abs=1e-3), key
    assert d["control_after_manual"] == pytest.approx(90.0)  # the manual edit went through the node only
    az = SUNS["A"][0] + 30.0
    assert d["panel_sun"].startswith(f"Sun: azimuth {az:.0f}°")  # the panel shows it where it is now
    assert angle_deg(d["back_at0"]["plus_z"], z0) < 0.01


def test_camera_aimed_along_the_sun_sees_the_sun_of_the_rotated_world(lighting):
    d = step(lighting, "rotation")
    assert d["look_env_kind"] == "hdr"  # the sun in the map, for this look
    img = luminance(np.array(d["look"]))
    n = img.shape[0]
    r, c = np.unravel_index(np.argmax(img), img.shape)
    print(f"\nLook along the Sun at -30°: brightest pixel ({r}, {c}) of {n}x{n}, "
          f"{img.max():.1f} vs median {np.median(img):.3f}")  # fmt: skip
    assert abs(r - n // 2) <= 1 and abs(c - n // 2) <= 1  # within ~1.3° of the frame's centre
    assert img.max() > 20 * np.median(img)


# -- the renders: the shadow is on the side away from the sun ---------------------------------------------


def shadow_asymmetry(pixels: list, azimuth_deg: float) -> dict:
    """Mean luminance of the ground on the side away from the sun (in the cube's shadow) and on the sun
    side, 0.75-1.6 units from the cube's centre, within 0.35 of the sun's vertical plane."""
    img = luminance(np.array(pixels))
    h, w = img.shape
    px = ORTHO_SCALE / w
    cols, rows = np.meshgrid(np.arange(w), np.arange(h))
    x, y = (cols + 0.5 - w / 2) * px, (h / 2 - (rows + 0.5)) * px  # top-down camera: right +X, up +Y
    a = math.radians(azimuth_deg)
    along = x * math.cos(a) + y * math.sin(a)
    across = -x * math.sin(a) + y * math.cos(a)
    band = np.abs(across) < 0.35
    shadow = img[band & (along < -0.75) & (along > -1.6)]
    sunlit = img[band & (along > 0.75) & (along < 1.6)]
    return {"shadow": float(shadow.mean()), "sunlit": float(sunlit.mean()), "n": int(shadow.size),
            "asymmetry": float(1.0 - shadow.mean() / sunlit.mean())}  # fmt: skip


def test_cycles_shadow_falls_away_from_the_sun_as_a_lamp_or_from_the_map(lighting):
    d = step(lighting, "render")
    az = SUNS["A"][0]
    on = shadow_asymmetry(d["on"], az)
    alone = shadow_asymmetry(d["clamped_alone"], az)
    off = shadow_asymmetry(d["off"], az)
    print(f"\nCycles {RESOLUTION[0]}x{RESOLUTION[1]}, 16 spp (render s {d['render_s']}):"
          f"\n  Sun on:  shadow {on['shadow']:.4f} sunlit {on['sunlit']:.4f} asymmetry {on['asymmetry']:.3f}"
          f"\n  clamped map alone: shadow {alone['shadow']:.4f} sunlit {alone['sunlit']:.4f} asymmetry {alone['asymmetry']:.3f}"
          f"\n  Sun off: shadow {off['shadow']:.4f} sunlit {off['sunlit']:.4f} asymmetry {off['asymmetry']:.3f}")  # fmt: skip
    assert on["n"] >= 20
    assert on["asymmetry"] > 0.4  # a clear shadow on the far side of the cube
    assert alone["asymmetry"] < 0.3 * on["asymmetry"]  # without the sun's light: soft and weak
    # Sun off: no lamp, the sun is back in the map (`.hdr`) and lights the scene from there: the same
    # shadow and the same sunlit ground as the lamp gives (the lamp gives back what was clamped)
    assert off["asymmetry"] == pytest.approx(on["asymmetry"], rel=0.15)
    assert off["sunlit"] == pytest.approx(on["sunlit"], rel=0.1)
    assert d["off_suns"] == [] and d["off_env"]["kind"] == "hdr" and d["off_env"]["is_float"]
    assert d["off_env"]["filepath"] == str(Path(lighting["results"]["A"]["files"]["hdr"]).resolve())
    assert d["off_strengths"]["background"] == pytest.approx(d["on_strengths"]["background"])


# -- regenerate, the toggle, the strengths, history ---------------------------------------------------


def test_regenerating_replaces_our_sun_and_leaves_the_users_lights(lighting):
    d = step(lighting, "regenerate")
    assert d["suns"] == ["DiT360 Sun"]  # still exactly one
    truth = sphere.direction_from_angles(*SUNS["B"])
    error = angle_deg(d["sun"]["minus_z"], -truth)
    print(f"\nSun B: -Z vs the drawn sun's opposite direction: {error:.3f}°")
    assert error < 2.0
    assert d["env"]["filepath"] == str(Path(lighting["results"]["B"]["files"]["lighting"]).resolve())
    numbers = lamp_numbers(lighting["results"]["B"]["metadata"])
    assert d["sun"]["energy"] == pytest.approx(numbers["exposure"] * numbers["peak"], rel=1e-5)
    assert d["lights_unchanged"] and d["lights_in_data"] == ["DiT360 Sun", "User Lamp", "User Sun"]
    assert d["sun_strength_ratio"] == pytest.approx(2.0)
    assert d["strength_ratio"]["sun"] == pytest.approx(0.5)  # the lamp follows the Background strength
    assert d["strength_ratio"]["background"] == pytest.approx(0.5 * numbers["exposure"], rel=1e-5)


def test_toggling_the_sun_off_removes_it_and_undo_brings_it_back(lighting):
    d = step(lighting, "regenerate")
    files = lighting["results"]["B"]["files"]
    assert d["off_suns"] == [] and d["off_lights_unchanged"]
    # off: the sun is back in the map (the World shows <stem>.hdr), so the scene keeps its sun
    assert d["off_env"]["filepath"] == str(Path(files["hdr"]).resolve()) and d["off_env"]["is_float"]
    assert d["off_env"]["kind"] == "hdr"
    assert d["undo"] == ["FINISHED"] and d["undo_suns"] == ["DiT360 Sun"] and d["undo_use_sun"] is True
    assert d["undo_env"]["filepath"] == str(Path(files["lighting"]).resolve())


def test_history_reapplies_the_environment_with_its_sun(lighting):
    d = step(lighting, "regenerate")
    assert d["history_apply"] == ["FINISHED"] and d["history_suns"] == ["DiT360 Sun"]
    assert d["history_env"]["filepath"] == str(Path(lighting["results"]["A"]["files"]["lighting"]).resolve())
    assert angle_deg(d["history_sun"]["minus_z"], -sphere.direction_from_angles(*SUNS["A"])) < 2.0
    assert any(label.startswith("Sun: azimuth") for label in d["history_labels"])


# -- the real worker --------------------------------------------------------------------------------------


def test_worker_result_hdr_is_what_the_world_uses(lighting):
    d = step(lighting, "worker")
    env, h = d["env"], d["history"]
    # the worker writes the OpenEXR beside each .hdr (the default) and the World shows it
    shown = Path(h["hdr"]).with_suffix(".exr")
    assert env["filepath"] == str(shown.resolve()) and env["is_float"] and env["kind"] == "hdr"
    assert Path(h["filepath"]).suffix == ".png" and Path(h["filepath"]).is_file()
    assert Path(h["hdr"]).with_suffix("") == Path(h["filepath"]).with_suffix("")  # beside the PNG
    assert Path(h["lighting"]).is_file()
    assert env["png_file"] == h["filepath"] and d["returned"] == env["name"]
    on_disk = read_hdr(h["hdr"]).reshape(-1, 3).mean(axis=0)
    # Blender shows the same light as the .hdr (whose RGBE holds < 1/256 of a pixel's peak) ...
    assert d["pixels_mean"] == pytest.approx(on_disk.tolist(), rel=0.02)
    # ... read from the EXR: its half floats, widened to float32
    exr_mean = read_exr(shown)[0].astype(np.float32).reshape(-1, 3).mean(axis=0)
    assert d["pixels_mean"] == pytest.approx(exr_mean.tolist(), rel=1e-5)
    # the tiny model draws no sun: no Sun object (the synthetic one is gone), and the panel says why
    assert d["suns"] == [] and d["lights_unchanged"]
    assert d["describe"]["sun_found"] is False and d["describe"]["sun"].startswith("No sun: ")
    assert d["describe"]["sun"] in d["labels"] or any(
        label and d["describe"]["sun"].startswith(label) for label in d["labels"]
    )
    assert d["describe"]["seam"].startswith("Seam: z ")
    assert d["job_sun_share"] == pytest.approx(0.3) and d["requested_share"] == pytest.approx(0.3)
    assert d["background_strength"] == pytest.approx(d["describe"]["exposure"], rel=1e-5)
    assert d["torch_loaded"] is False
