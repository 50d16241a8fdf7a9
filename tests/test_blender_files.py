"""Nothing the artist has is lost: a .blend with a generated World is saved, moved, saved mid-job,
packed, made relative, saved under another folder and appended from, in real Blender (the bpy
module) with the tiny model through the real worker, and a synthetic result with a known sun
(tests/test_blender_lighting.py). One Blender process runs tests/blender/scenario_files.py; each
test checks one step's record.
"""

from __future__ import annotations

import importlib.util

import pytest
from test_blender_extension import build_zip, run_scenario
from test_blender_lighting import synthetic_result

pytestmark = pytest.mark.skipif(importlib.util.find_spec("bpy") is None, reason="needs the bpy module")


@pytest.fixture(scope="module")
def files(tiny_models, tmp_path_factory) -> dict:
    work = tmp_path_factory.mktemp("blender-files")
    folder = work / "synthetic"
    folder.mkdir()
    result = synthetic_result(folder, "A", 1)
    cfg = {
        "zip": str(build_zip(work / "dist")),
        "models": str(tiny_models["root"]),
        "work": str(work),
        "results": {"A": {"event": result["event"], "params": result["params"], "folder": str(folder)}},
    }
    return run_scenario("scenario_files.py", cfg, "files", timeout=900)


def step(results: dict, name: str) -> dict:
    record = results[name]
    assert record["ok"], f"step {name} failed:\n{record['error']}"
    return record["data"]


def test_images_and_history_beside_the_blend_are_relative_and_survive_a_move(files):
    d = step(files, "move_project")
    assert d["image"]["filepath"].startswith("//dit360/"), d["image"]
    assert all(v.startswith("//dit360/") for v in d["image_props"].values()), d["image_props"]
    first = d["history"][0]
    assert first["filepath"].startswith("//dit360/") and first["hdr"].startswith("//dit360/")
    # a folder the user chose outside the project stays absolute
    assert d["outside"]["filepath"].startswith("/") and "renders-elsewhere" in d["outside"]["filepath"]
    assert d["outside_history"]["filepath"].startswith("/")
    # moved: the World's image loads from the new place, the history re-applies
    assert d["moved_image"]["size"] == [128, 64] and d["moved_image"]["has_data"]
    assert "/moved-project/dit360/" in d["moved_file"]
    assert d["apply_history"] == ["FINISHED"] and d["moved_after_apply"]["size"] == [128, 64]


def test_saving_mid_job_keeps_the_users_world_in_the_file(files):
    d = step(files, "save_mid_job")
    assert d["fake_user_mid_job"] is True
    assert d["shown_after_save"] == "DiT360 Preview World" and d["previews_after_save"] >= 1
    assert d["job_after_open"] is False
    assert d["reopened_world"] == "UserWorld" and d["reopened_worlds"] == ["UserWorld"]
    assert "DiT360 Preview" not in d["reopened_images"]
    assert d["reopened_unchanged"] and d["reopened_fake_user"] is False
    assert d["next_job_ok"] and d["worlds_after_next"] == ["UserWorld"]


def test_the_sun_toggle_keeps_the_sun_after_packing_and_deleting_the_outputs(files):
    d = step(files, "sun_after_pack")
    for case in ("fresh", "reopened"):
        off, on = d[case]["off"], d[case]["on"]
        assert off["kind"] == "hdr" and off["suns"] == [] and off["size"] == [512, 256], (
            case,
            off,
        )  # in the map
        assert on["kind"] == "lighting" and on["suns"] == ["DiT360 Sun"], (case, on)  # as a lamp
    assert d["packed_images"] == ["hdr", "lighting"]  # both HDRs are in the .blend
    assert d["hdr_missing_off"] == {"kind": "lighting", "suns": ["DiT360 Sun"]}  # never without its sun


def test_the_world_renders_the_same_after_relative_save_as_pack_and_append(files):
    d = step(files, "artist_paths")
    r = d["renders"]
    print("\nSphere means: " + "; ".join(f"{k} {[round(x, 4) for x in v]}" for k, v in r.items()))
    assert max(r["reference"]) > 0.01  # the World lights the sphere
    for case in ("relative", "save_as", "packed", "appended"):
        for got, want in zip(r[case], r["reference"]):
            assert got == pytest.approx(want, rel=1e-3, abs=1e-4), (case, r[case], r["reference"])
    assert d["relative_path"].startswith("//dit360/")
    assert d["save_as_path"].startswith("//") and all(d["save_as_history"])
    assert d["save_as_apply_history"] == ["FINISHED"]
    assert d["packed"] and d["appended"]
