"""Every edit kind of issue 14 end to end in real Blender (bpy 4.5) through the real worker with the
tiny model: Regenerate View, Paint Mask + Regenerate Masked, Repair Seam, Photo to Panorama. One
Blender process runs tests/blender/scenario_edit.py; each test checks one step's record against
the add-on's numpy geometry computed here from what Blender reported (camera matrix, Mapping
rotation), and the written PNGs read back with Pillow.
"""

from __future__ import annotations

import importlib.util
import math

import numpy as np
import pytest
from PIL import Image
from test_blender_extension import build_zip, run_scenario

from dit360_blender.panorama import masks, projection, seam

pytestmark = pytest.mark.skipif(importlib.util.find_spec("bpy") is None, reason="needs the bpy module")

PHOTO_SIZE, PHOTO_HFOV, PHOTO_YAW, PHOTO_PANO = (20, 14), 60.0, 40.0, (128, 64)


def seam_source(path) -> np.ndarray:
    """A smooth panorama (128x64) whose right half is brightened: a hard step at the 0°/360° wrap and
    at the centre (the centre one stays: only the wrap is repaired)."""
    y, x = np.mgrid[0:64, 0:128] / 64.0
    rgb = np.stack([0.4 + 0.2 * np.sin(3 * x + y), 0.5 + 0.2 * np.cos(2 * y), 0.3 + 0.1 * x / 2], -1)
    rgb[:, 64:] += 0.25
    pixels = (np.clip(rgb, 0, 1) * 255).round().astype(np.uint8)
    Image.fromarray(pixels).save(path)
    return pixels


@pytest.fixture(scope="module")
def edit(tiny_models, tmp_path_factory) -> dict:
    work = tmp_path_factory.mktemp("blender-edit")
    photo = (np.random.default_rng(14).random((PHOTO_SIZE[1], PHOTO_SIZE[0], 3)) * 255).astype(np.uint8)
    Image.fromarray(photo).save(work / "photo.png")
    seam_pixels = seam_source(work / "seam-source.png")
    cfg = {
        "zip": str(build_zip(work / "dist")), "models": str(tiny_models["root"]), "work": str(work),
        "photo": str(work / "photo.png"), "photo_hfov": PHOTO_HFOV, "photo_yaw": PHOTO_YAW,
        "photo_size": list(PHOTO_PANO), "seam_source": str(work / "seam-source.png"),
    }  # fmt: skip
    out = run_scenario("scenario_edit.py", cfg, "edit", timeout=600)
    return {"out": out, "photo": photo, "seam": seam_pixels}


def step(results: dict, name: str) -> dict:
    record = results["out"][name]
    assert record["ok"], f"step {name} failed:\n{record['error']}"
    return record["data"]


def png(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def child_of(d: dict, kind: str, parent: str) -> dict:
    """The newest History entry is the edit, a child of `parent`; the result's PNG is that entry's."""
    entry = d["history"][0]
    assert entry["edit_kind"] == kind and entry["edit"]["mask_kind"] == kind
    assert entry["parent"] == parent and entry["filepath"] == d["png"]
    assert (entry["width"], entry["height"]) == (128, 64)
    return entry


def one_undo_step(d: dict, before: str) -> None:
    assert d["undo"] == ["FINISHED"] and d["image_after_undo"] == before
    assert d["redo"] == ["FINISHED"] and d["image_after_redo"] == d["image_after"] == d["image"]


def test_edit_ui_is_registered_and_the_source_world_is_generated(edit):
    d = step(edit, "install")
    assert d["panel"] and all(d["operators"])
    assert len(d["source"]["history"]) == 1 and d["source"]["history"][0]["parent"] == ""


def test_regenerate_view_is_what_the_camera_sees_through_the_turned_world(edit):
    source = step(edit, "install")["source"]
    d = step(edit, "view")
    entry = child_of(d, "view", source["png"])
    assert entry["prompt"] == "This is a panorama image. A tall stone tower" and entry["seed"] == 11
    e = entry["edit"]
    # the camera's view, taken through the Mapping node's rotation, here from what Blender reported
    mapping = projection.mapping_matrix(d["mapping_rotation"])
    yaw, pitch, roll = projection.view_angles(np.array(d["camera_matrix"]), mapping)
    assert (e["yaw"], e["pitch"], e["roll"]) == pytest.approx((yaw, pitch, roll), abs=1e-4)
    assert yaw == pytest.approx(30.0 + math.degrees(0.6), abs=1e-3)  # camera yaw 30 + the World's turn
    assert e["hfov"] == pytest.approx(math.degrees(d["camera_angle"]), abs=1e-4)
    assert e["aspect"] == pytest.approx(64 / 36, abs=1e-5)  # the render's frame
    assert e["strength"] == pytest.approx(0.8) and e["feather"] == 6.0
    # a viewport looking through the camera (its view and window matrices) gives the same view
    for key in ("yaw", "pitch", "roll", "hfov", "aspect"):
        assert d["viewport_view"][key] == pytest.approx(d["camera_view"][key], abs=1e-4), key
        assert d["camera_view"][key] == pytest.approx(e[key], abs=1e-4), key
    assert "orthographic" in d["refused"]["ortho"][1] and "Shift" in d["refused"]["shift"][1]
    assert (
        "no 3D viewport" in d["refused"]["viewport"][1] and "Use Viewport off" in d["refused"]["viewport"][2]
    )
    mask = projection.view_mask(128, 64, yaw, pitch, e["hfov"], e["aspect"], roll, feather=6.0)
    before, after = png(source["png"]), png(d["png"])
    assert np.array_equal(after[mask == 0], before[mask == 0])  # outside the view: the source's pixels
    assert np.abs(after[mask == 1].astype(int) - before[mask == 1]).mean() > 2  # inside: regenerated
    one_undo_step(d, source["image"])
    assert d["torch_loaded"] is False


def test_an_edit_shows_progress_and_previews_and_a_cancel_changes_nothing(edit):
    d = step(edit, "cancel")
    assert d["scene_world_mid_job"] == "DiT360 Preview World" and d["previews"] >= 1
    assert "sampling" in d["stages"] and {"progress", "preview", "error"} <= set(d["events"])
    assert d["cancel_sent"] and d["error"] == "cancelled"
    assert d["world_unchanged"] and d["scene_world"] == "UserWorld" and d["history_unchanged"]
    assert d["worlds"] == ["UserWorld"] and d["new_files"] == []


def test_paint_mask_then_regenerate_masked(edit):
    view = step(edit, "view")
    d = step(edit, "mask")
    # the mask is made for the World (half the panorama's size, black, on disk); black is refused
    assert d["mask_size"] == [64, 32] and d["mask_file_exists"]
    assert d["empty_error"][0] == "bad_parameters" and "black everywhere" in d["empty_error"][1]
    assert d["world_unchanged_after_empty"]
    entry = child_of(d, "mask", view["png"])
    assert entry["edit"]["mask"] == d["mask_file"] and d["mask_saved"]  # the strokes reached the file
    painted = masks.mask_from_image(png(d["mask_copy"]))  # the file as the edit read it
    # the white rectangle painted (Blender's rows 8-15 from the bottom: rows 16-23 from the top)
    assert painted[16:24, 8:21].min() == 1.0 and painted.mean() < 0.2
    mask = masks.feather_mask(masks.resize_mask(painted, 128, 64), 4.0)
    before, after = png(view["png"]), png(d["png"])
    assert np.array_equal(after[mask == 0], before[mask == 0])
    assert np.abs(after[mask >= 0.5].astype(int) - before[mask >= 0.5]).mean() > 2
    one_undo_step(d, view["image"])
    # the panel: every edit's button, and the selected entry's lineage (this edit of the view edit)
    assert {"dit360.regenerate_view", "dit360.paint_mask", "dit360.regenerate_masked",
            "dit360.photo_to_panorama", "dit360.repair_seam"} <= set(d["panel"])  # fmt: skip
    assert f"{entry['name']}: mask edit of {view['history'][0]['name']}" in d["panel"]


def test_repair_seam_of_an_image_made_elsewhere(edit):
    d = step(edit, "seam")
    entry = child_of(d, "seam", edit["out"]["_meta"]["cfg"]["seam_source"])
    assert entry["edit"]["band"] == 24.0
    band_rolled = masks.seam_band_mask(128, 64, 24.0, feather_deg=entry["edit"]["feather"])[0]
    band = masks.unroll_half(np.broadcast_to(band_rolled, (64, 128)))
    before, after = edit["seam"], png(d["png"])
    assert np.array_equal(after[band == 0], before[band == 0])  # outside the band: bit for bit
    assert np.abs(after[band == 1].astype(int) - before[band == 1]).mean() > 2
    # the step across the old seam: 87x the band's other column steps before (a smooth image with a
    # jump), at their level after (the tiny random model draws rough texture there: measured 0.94x)
    for image, low, high in ((before, 20.0, None), (after, None, 1.5)):
        steps = seam.column_steps(masks.roll_half(image))  # boundary x: between columns x and x + 1
        inside = (band_rolled[:-1] > 0) & (band_rolled[1:] > 0)
        inside[63] = False  # the old seam itself, between columns 63 and 64 of the rolled image
        ratio = steps[63] / np.median(steps[:-1][inside])
        assert (low is None or ratio > low) and (high is None or ratio < high), ratio
    assert d["undo"] == ["FINISHED"] and d["image_after_undo"] == "seam-source.png"


def test_photo_to_panorama_keeps_the_photo_and_a_failure_changes_nothing(edit):
    d = step(edit, "photo")
    code, message, hint = d["no_fov_error"]
    assert code == "bad_parameters" and "EXIF" in message and "field of view" in hint
    assert d["world_unchanged_after_error"] and d["history_unchanged_after_error"]
    assert d["preview_worlds_left"] == []
    assert d["operator"] == ["FINISHED"] and d["panel_photo"] == edit["out"]["_meta"]["cfg"]["photo"]
    entry = child_of(d, "photo", edit["out"]["_meta"]["cfg"]["photo"])
    assert entry["edit"]["hfov"] == PHOTO_HFOV and entry["edit"]["yaw"] == PHOTO_YAW
    placed = projection.photo_to_equirect(
        edit["photo"].astype(np.float64), *PHOTO_PANO, PHOTO_HFOV, PHOTO_YAW
    )
    covered = placed.coverage == 1
    result = png(d["png"])
    expected = np.clip(np.rint(placed.rgb), 0, 255).astype(np.uint8)
    assert covered.sum() > 50
    assert np.array_equal(result[covered], expected[covered])  # the photo's pixels as projected


def test_painted_strokes_survive_save_reload_and_packing(edit):
    d = step(edit, "mask_file")
    assert d["dirty_before_save"] and not d["dirty_after_save"]  # saving the .blend wrote the mask
    painted = masks.mask_from_image(png(d["mask_file"]))
    assert painted[26:30, 40:50].min() == 1.0  # Blender's rows 2-5 from the bottom of 32
    assert d["mask_after_reload"] == "DiT360 Mask (UserWorld)"  # still the World's mask
    assert d["strokes_after_reload"] == 1.0 and d["rest_after_reload"] == 0.0
    assert d["still_packed"] and png(d["packed_copy"])[26:30, 40:50].min() == 255
