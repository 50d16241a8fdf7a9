"""The HDR world and the Sun lamp in real Blender (bpy), in one process: synthetic worker results with a
known sun go through the add-on's apply path (`results.apply_result`, what every job's result
takes); then one real job through the worker with the tiny model.

    python tests/blender/scenario_lighting.py CONFIG.json      (CONFIG: see tests/test_blender_lighting.py)

Writes CONFIG["out"]: {step: {"ok", "error", "data", "seconds"}}; the pytest module asserts on it.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402  (sets BLENDER_USER_RESOURCES before bpy)

USER_RESOURCES = harness.USER_RESOURCES

import bpy  # noqa: E402
import mathutils  # noqa: E402
import numpy as np  # noqa: E402

CFG = json.loads(Path(sys.argv[1]).read_text(encoding="utf-8"))
WORK = Path(CFG["work"])
TIMERS = harness.FakeTimers()
steps = harness.Steps(CFG["out"])
ctx: dict = {}


def mod(name: str):
    return sys.modules[f"{harness.MODULE}.blender.{name}"]


def ctrl():
    return mod("pump").PUMP


def world() -> bpy.types.World:
    return bpy.data.worlds["UserWorld"]


def tagged_suns() -> list[str]:
    return sorted(o.name for o in bpy.context.scene.objects if o.get("dit360_role") == "sun")


def sun_object() -> bpy.types.Object | None:
    suns = [o for o in bpy.context.scene.objects if o.get("dit360_role") == "sun"]
    return suns[0] if len(suns) == 1 else None


def evaluated_axes(obj: bpy.types.Object) -> dict:
    """The Sun's local +Z (towards the sun) and -Z (where it shines) in world space, evaluated."""
    bpy.context.view_layer.update()
    depsgraph = bpy.context.evaluated_depsgraph_get()
    matrix = obj.evaluated_get(depsgraph).matrix_world.to_3x3()
    z = matrix @ mathutils.Vector((0.0, 0.0, 1.0))
    return {"plus_z": list(z.normalized()), "minus_z": list((-z).normalized()),
            "rotation_z": obj.evaluated_get(depsgraph).rotation_euler[2]}  # fmt: skip


def lights_snapshot() -> dict:
    """Every light object that is not ours, with what we could have touched."""
    out = {}
    for obj in bpy.data.objects:
        if obj.type != "LIGHT" or obj.get("dit360_role") == "sun":
            continue
        d = obj.data
        out[obj.name] = {
            "type": d.type, "energy": round(d.energy, 6), "color": [round(c, 6) for c in d.color],
            "rotation": [round(r, 6) for r in obj.rotation_euler], "location": [round(v, 6) for v in obj.location],
            "driven": bool(obj.animation_data and obj.animation_data.drivers),
            "scenes": sorted(s.name for s in obj.users_scene),
        }  # fmt: skip
    return out


def env_record() -> dict:
    image = mod("world").current_image(world())
    return {
        "name": image.name,
        "filepath": str(Path(bpy.path.abspath(image.filepath)).resolve()),
        "is_float": bool(image.is_float),
        "colorspace": image.colorspace_settings.name,
        "kind": image.get("dit360_kind"),
        "png_file": image.get("dit360_png_file"),
        "size": list(image.size),
    }


def background_strength() -> float:
    return float(mod("world").our_nodes(world())["background"].inputs["Strength"].default_value)


def sun_record() -> dict | None:
    obj = sun_object()
    if obj is None:
        return None
    fcurve = obj.animation_data.drivers.find("rotation_euler", index=2) if obj.animation_data else None
    driver = fcurve.driver if fcurve is not None else None
    d = obj.data
    return {
        "name": obj.name,
        "world_tag": obj.get("dit360_world"),
        "energy": d.energy,
        "color": list(d.color),
        "angle": d.angle,
        "use_shadow": d.use_shadow,
        "collections": [c.name for c in obj.users_collection],
        "driver": None
        if driver is None
        else {
            "expression": driver.expression,
            "simple": driver.is_simple_expression,
            "valid": driver.is_valid,
            "targets": [
                (v.name, v.targets[0].id_type, v.targets[0].id.name, v.targets[0].data_path)
                for v in driver.variables
            ],  # fmt: skip
        },
        **evaluated_axes(obj),
    }


class _Layout:
    """Records the labels a panel draws (any layout call works and returns another recorder)."""

    def __init__(self, log: list) -> None:
        self._log = log

    def __getattr__(self, name):
        def call(*args, **kwargs):
            if name == "label" and kwargs.get("text"):
                self._log.append(kwargs["text"])
            return _Layout(self._log)

        return call

    def __setattr__(self, name, value):
        if name == "_log":
            object.__setattr__(self, name, value)


def panel_labels() -> list[str]:
    panels = mod("panels")
    log: list = []
    fake = type("P", (), {"layout": _Layout(log)})()
    panels.DIT360_PT_world.draw(fake, bpy.context)
    panels.DIT360_PT_history.draw(fake, bpy.context)
    return log


# -- the scene: a cube on a plane, seen from straight above -------------------------------------------


def diffuse(name: str, value: float) -> bpy.types.Material:
    mat = bpy.data.materials.new(name)
    if bpy.app.version < (5, 0, 0):
        mat.use_nodes = True
    nt = mat.node_tree
    nt.nodes.clear()
    bsdf = nt.nodes.new("ShaderNodeBsdfDiffuse")
    bsdf.inputs["Color"].default_value = (value, value, value, 1.0)
    out = nt.nodes.new("ShaderNodeOutputMaterial")
    nt.links.new(bsdf.outputs[0], out.inputs["Surface"])
    return mat


def cube_on_plane() -> None:
    scene = bpy.context.scene
    bpy.ops.mesh.primitive_plane_add(size=40.0, location=(0.0, 0.0, 0.0))
    plane = bpy.context.active_object
    plane.name = "Ground"
    plane.data.materials.append(diffuse("Ground", 0.5))
    bpy.ops.mesh.primitive_cube_add(size=1.0, location=(0.0, 0.0, 0.5))
    cube = bpy.context.active_object
    cube.name = "Cube"
    cube.data.materials.append(diffuse("Cube", 0.8))
    cam_data = bpy.data.cameras.new("Camera")
    cam_data.type = "ORTHO"
    cam_data.ortho_scale = CFG["ortho_scale"]
    cam = bpy.data.objects.new("Camera", cam_data)
    scene.collection.objects.link(cam)
    cam.location = (0.0, 0.0, 10.0)
    cam.rotation_euler = (0.0, 0.0, 0.0)  # looking down -Z; image right = +X, image up = +Y
    scene.camera = cam
    r = scene.render
    r.engine = "CYCLES"
    r.resolution_x, r.resolution_y = CFG["resolution"]
    r.resolution_percentage = 100
    r.image_settings.file_format = "OPEN_EXR"
    r.image_settings.color_depth = "32"
    scene.view_settings.view_transform = "Standard"
    c = scene.cycles
    c.device = "CPU"
    c.samples = CFG["samples"]
    c.use_denoising = False
    c.use_adaptive_sampling = False
    c.seed = 1
    # the user's own lights: a point lamp and a Sun of theirs (untagged), both must stay as they are
    for name, kind, energy in (("User Lamp", "POINT", 0.0), ("User Sun", "SUN", 0.0)):
        data = bpy.data.lights.new(name, kind)
        data.energy = energy  # 0 W: in the scene but not in the renders' numbers
        obj = bpy.data.objects.new(name, data)
        obj.location = (3.0, -2.0, 4.0)
        obj.rotation_euler = (0.3, 0.2, 0.1)
        scene.collection.objects.link(obj)


def render(name: str) -> list:
    scene = bpy.context.scene
    path = str(WORK / f"lighting_{name}.exr")
    scene.render.filepath = path
    t0 = time.monotonic()
    bpy.ops.render.render(write_still=True)
    ctx.setdefault("render_s", {})[name] = round(time.monotonic() - t0, 2)
    image = bpy.data.images.load(path, check_existing=False)
    w, h = image.size
    a = np.empty(w * h * 4, np.float32)
    image.pixels.foreach_get(a)
    bpy.data.images.remove(image)
    return a.reshape(h, w, 4)[::-1, :, :3].round(5).tolist()  # row 0 = top


def event(name: str) -> dict:
    return json.loads(Path(CFG["results"][name]["event"]).read_text(encoding="utf-8"))


def params(name: str) -> dict:
    return CFG["results"][name]["params"]


# -- steps ------------------------------------------------------------------------------------------


def step_install(data: dict) -> None:
    harness.install_zip(CFG["zip"])
    harness.configure(CFG["models"], CFG.get("worker_python"))
    data["torch_loaded"] = "torch" in sys.modules


def step_apply(data: dict) -> None:
    """Result A through the apply path; undo gives the scene back as it was; redo brings it again."""
    harness.reset_scene()
    harness.user_world()
    cube_on_plane()
    bpy.ops.ed.undo_push(message="Original")
    ctx["before_world"] = mod("world").describe(world())
    ctx["before_lights"] = lights_snapshot()
    ctx["before_objects"] = sorted(o.name for o in bpy.data.objects)
    scene = bpy.context.scene
    t0 = time.monotonic()
    image = mod("results").apply_result(scene, event("A"), params("A"))
    data["apply_s"] = time.monotonic() - t0
    mod("results").undo_push("DiT360: Generate World")  # what a finished job does
    data["returned"] = image.name
    data["env"] = env_record()
    data["suns"] = tagged_suns()
    data["sun"] = sun_record()
    data["background_strength"] = background_strength()
    data["scene_world"] = scene.world.name
    data["lights_unchanged"] = lights_snapshot() == ctx["before_lights"]
    after = mod("world").describe(world())
    data["user_nodes_kept"] = {"User RGB", "User Math"} <= set(after["nodes"])
    data["describe"] = mod("lighting").describe_environment(world())
    data["labels"] = panel_labels()
    entry = scene.dit360.history[0]
    data["history"] = {"filepath": entry.filepath, "hdr": entry.hdr_path, "lighting": entry.lighting_path,
                       "sun_share": entry.sun_share, "has_seam": bool(entry.seam_json),
                       "has_lighting": bool(entry.lighting_json)}  # fmt: skip
    # undo: the World, the objects and the lights as they were; redo: the result again
    data["undo"] = sorted(bpy.ops.ed.undo())
    data["undo_world_equal"] = mod("world").describe(world()) == ctx["before_world"]
    data["undo_suns"] = tagged_suns()
    data["undo_objects_equal"] = sorted(o.name for o in bpy.data.objects) == ctx["before_objects"]
    data["undo_lights_equal"] = lights_snapshot() == ctx["before_lights"]
    data["redo"] = sorted(bpy.ops.ed.redo())
    data["redo_suns"] = tagged_suns()
    data["redo_env"] = env_record()["filepath"]


def step_rotation(data: dict) -> None:
    """The Sun follows the World's rotation: through the control, and a manual edit of the node."""
    settings = world().dit360
    data["at0"] = evaluated_axes(sun_object())
    settings.rotation = math.radians(90.0)
    data["at90"] = evaluated_axes(sun_object())  # no explicit refresh: the control's update does it
    # the user edits the Mapping node by hand (our control stays at 90°): the driver reads the node
    mapping = mod("world").our_nodes(world())["mapping"]
    mapping.inputs["Rotation"].default_value[2] = math.radians(45.0)
    sun_object().update_tag(refresh={"OBJECT"})  # what any depsgraph refresh of the Sun does
    data["manual45"] = evaluated_axes(sun_object())
    data["control_after_manual"] = math.degrees(settings.rotation)
    settings.rotation = math.radians(-30.0)  # the control writes the node again
    data["at_minus30"] = evaluated_axes(sun_object())
    data["panel_sun"] = mod("lighting").describe_environment(world())["sun"]
    # Where the Sun points is where the World shows the sun: with the sun in the map (`.hdr`, put in
    # the World's chain for this look) a camera aimed along the Sun's +Z (recorded at -30°) sees the
    # sun in the middle of its frame.
    toward = mathutils.Vector(data["at_minus30"]["plus_z"])
    shown = mod("world").current_image(world())
    in_map = bpy.data.images.load(shown["dit360_hdr_file"], check_existing=True)
    in_map["dit360_kind"] = "hdr"
    mod("world").set_image(world(), in_map)
    settings.use_sun = False
    data["look_env_kind"] = env_record()["kind"]
    scene = bpy.context.scene
    hidden = [o for o in scene.objects if o.type == "MESH"]
    for o in hidden:
        o.hide_render = True
    cam = scene.camera
    saved = (cam.data.type, tuple(cam.rotation_euler), scene.render.resolution_x, scene.render.resolution_y,
             scene.cycles.samples, scene.cycles.filter_width)  # fmt: skip
    cam.data.type = "PERSP"
    cam.data.angle = math.radians(CFG["look_fov_deg"])
    cam.rotation_euler = toward.to_track_quat("-Z", "Y").to_euler()
    scene.render.resolution_x = scene.render.resolution_y = CFG["look_res"]
    scene.cycles.samples = 1
    scene.cycles.filter_width = 0.01
    data["look"] = render("look")
    cam.data.type, cam.rotation_euler = saved[0], saved[1]
    scene.render.resolution_x, scene.render.resolution_y, scene.cycles.samples = saved[2], saved[3], saved[4]
    scene.cycles.filter_width = saved[5]
    for o in hidden:
        o.hide_render = False
    mod("world").set_image(world(), shown)
    settings.use_sun = True
    settings.rotation = 0.0
    data["back_at0"] = evaluated_axes(sun_object())


def step_render(data: dict) -> None:
    """Cube on a plane, Cycles: Sun on; the clamped map alone (our Sun hidden); Sun off."""
    settings = world().dit360
    assert settings.use_sun and sun_object() is not None and math.isclose(settings.rotation, 0.0)
    data["on"] = render("on")
    data["on_strengths"] = {"background": background_strength(), "sun": sun_object().data.energy}
    sun = sun_object()
    sun.hide_render = True
    data["clamped_alone"] = render("clamped_alone")
    sun.hide_render = False
    settings.use_sun = False
    data["off_env"] = env_record()
    data["off_suns"] = tagged_suns()
    data["off_strengths"] = {"background": background_strength()}
    data["off"] = render("off")
    settings.use_sun = True
    data["render_s"] = ctx.get("render_s")


def step_regenerate(data: dict) -> None:
    """Result B replaces the Sun (still one), follows B's sun; the toggle and undo."""
    scene = bpy.context.scene
    first = sun_object().name
    mod("results").apply_result(scene, event("B"), params("B"))
    mod("results").undo_push("DiT360: Generate World")
    data["suns"] = tagged_suns()
    data["same_object"] = sun_object().name == first
    data["sun"] = sun_record()
    data["env"] = env_record()
    data["lights_unchanged"] = lights_snapshot() == ctx["before_lights"]
    data["lights_in_data"] = sorted(o.name for o in bpy.data.objects if o.type == "LIGHT")
    # the strength controls
    settings = world().dit360
    base = sun_object().data.energy
    settings.sun_strength = 2.0
    data["sun_strength_ratio"] = sun_object().data.energy / base
    settings.sun_strength = 1.0
    settings.strength = 0.5
    data["strength_ratio"] = {"sun": sun_object().data.energy / base, "background": background_strength()}
    settings.strength = 1.0
    # toggle off: our Sun goes, the World shows .hdr (the sun in the map); undo gives the Sun back
    settings.use_sun = False
    bpy.ops.ed.undo_push(message="Sun off")  # the UI pushes one for every property edit
    data["off_suns"] = tagged_suns()
    data["off_env"] = env_record()
    data["off_lights_unchanged"] = lights_snapshot() == ctx["before_lights"]
    data["undo"] = sorted(bpy.ops.ed.undo())
    data["undo_suns"] = tagged_suns()
    data["undo_env"] = env_record()
    data["undo_use_sun"] = world().dit360.use_sun
    # history: re-applying A brings A's environment and Sun back
    scene = bpy.context.scene  # undo replaced the Python objects
    index = next(i for i, e in enumerate(scene.dit360.history) if e.filepath == event("A")["path"])
    data["history_apply"] = sorted(bpy.ops.dit360.apply_history(index=index))
    data["history_suns"] = tagged_suns()
    data["history_env"] = env_record()
    data["history_sun"] = sun_record()
    data["history_labels"] = panel_labels()


def step_worker(data: dict) -> None:
    """A real job through the worker (tiny model, no sun): its HDR is what the World shows, no Sun."""
    scene = bpy.context.scene
    scene.dit360.sun_share = 0.3
    api = importlib.import_module(harness.MODULE + ".api")
    t0 = time.monotonic()
    image = api.generate_world(CFG["prompt"], seed=11, steps=2, width=128, height=64, wait=True, timeout=180)
    data["job_s"] = time.monotonic() - t0
    data["returned"] = image.name
    data["job_sun_share"] = ctrl().job.params.get("sun_share")
    data["env"] = env_record()
    entry = scene.dit360.history[0]
    data["history"] = {"filepath": entry.filepath, "hdr": entry.hdr_path, "lighting": entry.lighting_path}
    data["requested_share"] = json.loads(image["dit360_lighting"]).get("sun_share_requested")
    w, h = image.size
    a = np.empty(w * h * 4, np.float32)
    image.pixels.foreach_get(a)
    data["pixels_mean"] = a.reshape(h, w, 4)[..., :3].mean(axis=(0, 1)).tolist()
    data["suns"] = tagged_suns()
    data["describe"] = mod("lighting").describe_environment(world())
    data["labels"] = panel_labels()
    data["lights_unchanged"] = lights_snapshot() == ctx["before_lights"]
    data["background_strength"] = background_strength()
    data["torch_loaded"] = "torch" in sys.modules
    api.stop_worker()
    TIMERS.pump(lambda: not ctrl().link.closing, timeout=30)


ORDER = [
    ("install", step_install),
    ("apply", step_apply),
    ("rotation", step_rotation),
    ("render", step_render),
    ("regenerate", step_regenerate),
    ("worker", step_worker),
]

if __name__ == "__main__":
    for name, fn in ORDER:
        if name != "install" and not steps.results.get("install", {}).get("ok"):
            steps.results[name] = {"ok": False, "error": "install failed", "data": {}, "seconds": 0}
            continue
        steps.run(name, fn)
    bpy.ops.preferences.addon_disable(module=harness.MODULE)
    for fn in list(TIMERS.due):
        TIMERS.unregister(fn)
    bpy.app.timers.register, bpy.app.timers.unregister, bpy.app.timers.is_registered = TIMERS._real
    steps.save()
    sys.stdout.flush()
    os._exit(0)
