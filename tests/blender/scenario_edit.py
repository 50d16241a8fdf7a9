"""Every edit of issue 14 in real Blender (the bpy module) through the real worker with the tiny model,
in one process: a small world is generated, then Regenerate View (the scene camera, the World turned
by its Rotation), Paint Mask + Regenerate Masked, Repair Seam (of an image that was not generated
here) and Photo to Panorama run through `api.edit_world` and the operators; each result must be a
History child of its source and one undo step, and failures must leave the World as it was.

    python tests/blender/scenario_edit.py CONFIG.json      (CONFIG: see tests/test_blender_edit.py)

Writes CONFIG["out"]: {step: {"ok", "error", "data", "seconds"}}; the pytest module asserts on it.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402  (sets BLENDER_USER_RESOURCES before bpy)

USER_RESOURCES = harness.USER_RESOURCES  # Blender's user folders for this run (a temporary one)

import bpy  # noqa: E402
import numpy as np  # noqa: E402

CFG = json.loads(Path(sys.argv[1]).read_text(encoding="utf-8"))
PROMPT = "This is a panorama image. A red desert canyon under a pale sky"
SMALL = {"width": 128, "height": 64}
TIMERS = harness.FakeTimers()
steps = harness.Steps(CFG["out"])
ctx: dict = {}


def mod(name: str):
    return importlib.import_module(f"{harness.MODULE}.blender.{name}")


def api():
    return mod("api")


def describe(world) -> dict:
    return mod("world").describe(world)


def env_image(world):
    return mod("world").our_nodes(world)["env"].image


def history() -> list[dict]:
    return [
        {"name": e.name, "filepath": bpy.path.abspath(e.filepath), "parent": bpy.path.abspath(e.parent),
         "edit_kind": e.edit_kind, "edit": json.loads(e.edit_json) if e.edit_json else None,
         "prompt": e.prompt, "seed": e.seed, "width": e.width, "height": e.height}
        for e in bpy.context.scene.dit360.history
    ]  # fmt: skip


def result_record(image) -> dict:
    png = image.get("dit360_png_file")
    return {"image": image.name, "png": bpy.path.abspath(png) if png else None, "history": history()}


def undo_back(data: dict, world_name: str) -> None:
    """Ctrl+Z once: the World must show what it showed before the edit, then redo the edit."""
    world = bpy.data.worlds[world_name]
    data["image_after"] = env_image(world).name
    data["undo"] = sorted(bpy.ops.ed.undo())
    data["image_after_undo"] = env_image(bpy.data.worlds[world_name]).name
    data["redo"] = sorted(bpy.ops.ed.redo())
    data["image_after_redo"] = env_image(bpy.data.worlds[world_name]).name


class Layout:
    """Records what a panel draws: labels and operator ids (any other layout call is accepted)."""

    def __init__(self, log: list) -> None:
        object.__setattr__(self, "log", log)

    def __getattr__(self, name):
        def call(*args, **kwargs):
            if name == "label" and kwargs.get("text"):
                self.log.append(kwargs["text"])
            if name == "operator":
                self.log.append(args[0])
            return Layout(self.log)

        return call

    def __setattr__(self, name, value):
        pass


def panel_log() -> list[str]:
    log: list = []
    mod("edit_panel").DIT360_PT_edit.draw(type("P", (), {"layout": Layout(log)})(), bpy.context)
    return log


# -- steps ------------------------------------------------------------------------------------------


def step_install(data: dict) -> None:
    harness.install_zip(CFG["zip"])
    harness.configure(CFG["models"], CFG.get("worker_python"))
    harness.reset_scene()
    world = harness.user_world()
    scene = bpy.context.scene
    scene.render.resolution_x, scene.render.resolution_y = 64, 36
    cam = bpy.data.objects.new("Camera", bpy.data.cameras.new("Camera"))
    scene.collection.objects.link(cam)
    scene.camera = cam
    cam.data.sensor_fit = "HORIZONTAL"
    cam.data.angle = math.radians(70.0)
    cam.rotation_euler = (
        math.radians(100.0),
        0.0,
        math.radians(30.0 - 90.0),
    )  # yaw 30, pitch 10 in the world
    bpy.ops.ed.undo_push(message="Original")
    image = api().generate_world(PROMPT, seed=7, steps=2, **SMALL)
    data["source"] = result_record(image)
    data["world"] = world.name
    data["panel"] = "DIT360_PT_edit" in dir(bpy.types)
    data["operators"] = [hasattr(bpy.ops.dit360, n) for n in ("regenerate_view", "paint_mask", "regenerate_masked",
                                                              "photo_to_panorama", "repair_seam")]  # fmt: skip
    ctx["world"] = world.name


def step_view(data: dict) -> None:
    scene = bpy.context.scene
    world = bpy.data.worlds[ctx["world"]]
    world.dit360.rotation = 0.6  # the World turned: the view is taken through its Mapping node
    bpy.ops.ed.undo_push(message="rotation")
    mapping = mod("world").our_nodes(world)["mapping"]
    data["mapping_rotation"] = list(mapping.inputs["Rotation"].default_value)
    data["camera_matrix"] = [list(r) for r in scene.camera.matrix_world.to_3x3()]
    data["camera_angle"] = scene.camera.data.angle
    data["source_png"] = result_record(env_image(world))["png"]
    ops = mod("edit_ops")
    mapping_m = ops.world_mapping(world, ops.environment_node(world))
    cam = scene.camera
    data["camera_view"] = ops.camera_view(scene, cam, mapping_m)

    class Viewport:  # a 3D viewport looking through the camera: what RegionView3D holds
        is_perspective = True
        view_matrix = cam.matrix_world.inverted()
        window_matrix = cam.calc_matrix_camera(bpy.context.evaluated_depsgraph_get(), x=64, y=36)

    data["viewport_view"] = ops.viewport_view(Viewport(), mapping_m)
    refused = {}
    for what, change, undo in (("ortho", ("type", "ORTHO"), ("type", "PERSP")),
                               ("shift", ("shift_x", 0.1), ("shift_x", 0.0))):  # fmt: skip
        setattr(cam.data, *change)
        try:
            ops.camera_view(scene, cam, mapping_m)
            refused[what] = None
        except mod("errors").GenerationError as err:
            refused[what] = [err.code, err.message, err.hint]
        setattr(cam.data, *undo)
    scene.dit360_edit.use_viewport = True  # background Blender has no 3D viewport to take it from
    try:
        api().edit_world("view", seed=1, steps=2)
    except mod("errors").GenerationError as err:
        refused["viewport"] = [err.code, err.message, err.hint]
    scene.dit360_edit.use_viewport = False
    data["refused"] = refused
    image = api().edit_world("view", "This is a panorama image. A tall stone tower", seed=11, steps=2,
                             strength=0.8, feather=6.0)  # fmt: skip
    data.update(result_record(image))
    undo_back(data, ctx["world"])
    data["torch_loaded"] = "torch" in sys.modules


def step_cancel(data: dict) -> None:
    """An edit reports progress and previews like a generation; cancelled, it changes nothing."""
    world = bpy.data.worlds[ctx["world"]]
    before = describe(world)
    entries = len(bpy.context.scene.dit360.history)
    outputs = sorted(p.name for p in mod("output").output_dir(bpy.context.scene.dit360).iterdir())
    job = api().edit_world(
        "seam", "This is a panorama image. A canyon", seed=13, steps=400, band=20.0, wait=False
    )
    TIMERS.pump(lambda: job.done or job.previews_shown >= 1, timeout=120)
    data["scene_world_mid_job"] = bpy.context.scene.world.name
    data["cancel_sent"] = api().cancel()
    TIMERS.pump(lambda: job.done, timeout=120)
    data["error"] = None if job.error is None else job.error.code
    data["events"] = sorted(set(job.events))
    data["stages"] = sorted({stage for stage, _ in job.progress_log})
    data["previews"] = job.previews_shown
    data["world_unchanged"] = describe(world) == before
    data["scene_world"] = bpy.context.scene.world.name
    data["history_unchanged"] = len(bpy.context.scene.dit360.history) == entries
    data["worlds"] = sorted(w.name for w in bpy.data.worlds)
    after = sorted(p.name for p in mod("output").output_dir(bpy.context.scene.dit360).iterdir())
    data["new_files"] = sorted(set(after) - set(outputs))


def step_mask(data: dict) -> None:
    world = bpy.data.worlds[ctx["world"]]
    data["source_png"] = result_record(env_image(world))["png"]
    assert bpy.ops.dit360.paint_mask() == {"FINISHED"}
    before = describe(world)
    mask = world.get("dit360_mask")
    data["mask_name"] = mask.name
    data["mask_size"] = list(mask.size)
    data["mask_file"] = bpy.path.abspath(mask.filepath)
    data["mask_file_exists"] = Path(data["mask_file"]).is_file()
    # nothing painted yet: refused before anything is submitted, the World as it was
    try:
        api().edit_world("mask", seed=3, steps=2)
        data["empty_error"] = None
    except mod("errors").GenerationError as err:
        data["empty_error"] = [err.code, err.message, err.hint]
    data["world_unchanged_after_empty"] = describe(world) == before
    # "paint": a white rectangle, as a brush stroke leaves it (in memory, not saved yet)
    w, h = mask.size
    pixels = np.zeros((h, w, 4), np.float32)
    pixels[..., 3] = 1.0
    pixels[h // 4 : h // 2, w // 8 : w // 3, :3] = 1.0
    mask.pixels.foreach_set(pixels.ravel())
    mask.update()
    image = api().edit_world("mask", "This is a panorama image. A lake", seed=5, steps=2, feather=4.0)
    data.update(result_record(image))
    data["mask_saved"] = bool(not mask.is_dirty)
    data["mask_copy"] = str(shutil.copyfile(data["mask_file"], Path(CFG["work"]) / "mask-at-edit.png"))
    data["panel"] = panel_log()
    undo_back(data, ctx["world"])


def step_seam(data: dict) -> None:
    """An image that was not generated here, with a wrap discontinuity: Repair Seam."""
    world = bpy.data.worlds[ctx["world"]]
    image = bpy.data.images.load(CFG["seam_source"], check_existing=False)
    api().set_world_image(image, world)
    bpy.ops.ed.undo_push(message="user image")
    result = api().edit_world("seam", "This is a panorama image. A canyon", seed=9, steps=2, band=24.0)
    data.update(result_record(result))
    undo_back(data, ctx["world"])


def step_photo(data: dict) -> None:
    world = bpy.data.worlds[ctx["world"]]
    # a photo without EXIF and no field of view: the worker refuses it, the World stays as it was
    before = describe(world)
    entries = len(bpy.context.scene.dit360.history)
    try:
        api().edit_world("photo", "This is a panorama image. A street", seed=1, steps=2, photo=CFG["photo"])
        data["no_fov_error"] = None
    except mod("errors").GenerationError as err:
        data["no_fov_error"] = [err.code, err.message, err.hint]
    data["world_unchanged_after_error"] = describe(world) == before
    data["history_unchanged_after_error"] = len(bpy.context.scene.dit360.history) == entries
    data["preview_worlds_left"] = [w.name for w in bpy.data.worlds if w.name.startswith("DiT360 Preview")]
    # through the operator, the field of view given
    scene = bpy.context.scene
    scene.dit360_edit.photo = ""  # the operator's file browser gives it (its filepath)
    scene.dit360_edit.photo_hfov = CFG["photo_hfov"]
    scene.dit360_edit.yaw, scene.dit360_edit.pitch = CFG["photo_yaw"], 0.0
    scene.dit360.randomize_seed = False
    scene.dit360.seed = 21
    scene.dit360.steps = 2
    scene.dit360.width, scene.dit360.height = CFG["photo_size"]
    data["operator"] = sorted(bpy.ops.dit360.photo_to_panorama(filepath=CFG["photo"], wait=True))
    data["panel_photo"] = scene.dit360_edit.photo
    image = env_image(world)
    data.update(result_record(image))
    api().stop_worker()
    TIMERS.pump(lambda: not mod("pump").PUMP.link.closing, timeout=30)


def step_mask_file(data: dict) -> None:
    """Painted strokes survive a save, a reload and packing: the file is written on save."""
    world = bpy.data.worlds[ctx["world"]]
    mask = world["dit360_mask"]
    w, h = mask.size
    pixels = np.zeros((h, w, 4), np.float32)
    pixels[..., 3] = 1.0
    pixels[2:6, 40:50, :3] = 1.0  # new strokes, not saved by anyone
    mask.pixels.foreach_set(pixels.ravel())
    data["dirty_before_save"] = mask.is_dirty
    blend = Path(CFG["work"]) / "edited.blend"
    bpy.ops.wm.save_as_mainfile(filepath=str(blend))
    mask = bpy.data.worlds[ctx["world"]]["dit360_mask"]
    data["dirty_after_save"] = mask.is_dirty
    path = bpy.path.abspath(mask.filepath)
    data["mask_file"] = path
    bpy.ops.wm.open_mainfile(filepath=str(blend))
    world = bpy.data.worlds[ctx["world"]]
    mask = world.get("dit360_mask")
    data["mask_after_reload"] = None if mask is None else mask.name
    back = np.empty(len(mask.pixels), np.float32)
    mask.pixels.foreach_get(back)
    data["strokes_after_reload"] = back.reshape(h, w, 4)[2:6, 40:50, :3].min().item()
    data["rest_after_reload"] = float(back.reshape(h, w, 4)[..., :3].sum() - 4 * 10 * 3)
    mask.pack()
    copy = mod("edit_ops").save_mask(mask)  # a packed mask: written as a copy, still packed
    data["packed_copy"] = str(copy)
    data["still_packed"] = mask.packed_file is not None


ORDER = [("install", step_install), ("view", step_view), ("cancel", step_cancel), ("mask", step_mask), ("seam", step_seam),
         ("photo", step_photo), ("mask_file", step_mask_file)]  # fmt: skip

if __name__ == "__main__":
    for name, fn in ORDER:
        if name != "install" and not steps.results.get("install", {}).get("ok"):
            steps.results[name] = {"ok": False, "error": "install failed", "data": {}, "seconds": 0}
            continue
        steps.run(name, fn)
    for fn in list(TIMERS.due):
        TIMERS.unregister(fn)
    bpy.app.timers.register, bpy.app.timers.unregister, bpy.app.timers.is_registered = TIMERS._real
    steps.save()
    sys.stdout.flush()
    os._exit(0)
