"""Shared by the Blender scenario scripts (each runs in its own process: bpy loads once per process).

Import this module *before* bpy: it points Blender's user folders at a temporary directory
(BLENDER_USER_RESOURCES) so nothing touches ~/.config/blender, and it swaps `bpy.app.timers` for a
scheduler the scenario drives itself (timers never fire in the bpy module).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

if "bpy" in sys.modules:
    raise RuntimeError("import harness before bpy")
USER_RESOURCES = os.environ.setdefault("BLENDER_USER_RESOURCES", tempfile.mkdtemp(prefix="dit360-bpy-user-"))

import bpy  # noqa: E402
import numpy as np  # noqa: E402

ADDON_ID = "dit360_blender"
MODULE = f"bl_ext.user_default.{ADDON_ID}"


class FakeTimers:
    """Stands in for bpy.app.timers: records functions and their due times; `pump` runs them."""

    def __init__(self) -> None:
        self.due: dict = {}
        self.calls = 0
        self._real = (bpy.app.timers.register, bpy.app.timers.unregister, bpy.app.timers.is_registered)
        bpy.app.timers.register = self.register
        bpy.app.timers.unregister = self.unregister
        bpy.app.timers.is_registered = self.is_registered

    def register(self, fn, first_interval: float = 0.0, persistent: bool = False) -> None:
        self.due[fn] = time.monotonic() + first_interval

    def unregister(self, fn) -> None:
        if fn not in self.due:
            raise ValueError("timer not registered")
        del self.due[fn]

    def is_registered(self, fn) -> bool:
        return fn in self.due

    def run_due(self) -> int:
        now = time.monotonic()
        ran = 0
        for fn, due in list(self.due.items()):
            if due <= now and fn in self.due:
                self.calls += 1
                ran += 1
                interval = fn()
                if interval is None:
                    self.due.pop(fn, None)
                elif fn in self.due:
                    self.due[fn] = time.monotonic() + interval
        return ran

    def pump(self, until, timeout: float = 120.0, on_tick=None) -> None:
        """Run due timers until `until()` is true; `on_tick()` after every round that ran one."""
        deadline = time.monotonic() + timeout
        while not until():
            if time.monotonic() > deadline:
                raise TimeoutError(f"condition not met within {timeout} s (timers: {list(self.due)})")
            if self.run_due() and on_tick is not None:
                on_tick()
            time.sleep(0.005)


def install_zip(zip_path: str) -> object:
    """Install the built extension zip into the user repository and enable it (Blender's own way)."""
    result = bpy.ops.extensions.package_install_files(
        filepath=zip_path, repo="user_default", enable_on_install=True
    )
    assert result == {"FINISHED"}, result
    assert MODULE in bpy.context.preferences.addons, list(bpy.context.preferences.addons.keys())
    return sys.modules[MODULE]


def addon_prefs():
    return bpy.context.preferences.addons[MODULE].preferences


def configure(models_root: str, python: str | None = None) -> None:
    p = addon_prefs()
    p.python_source = "CUSTOM"
    p.python_path = python or sys.executable
    p.models_source = "FOLDER"
    p.models_dir = models_root
    p.device = "CPU"
    p.dtype = "FP32"
    p.idle_minutes = 0


def reset_scene() -> None:
    bpy.ops.wm.read_homefile(use_empty=True, use_factory_startup=True)


def user_world(name: str = "UserWorld") -> bpy.types.World:
    """A World with the user's own nodes: a Background fed by an RGB node, and a stray Math node."""
    world = bpy.data.worlds.new(name)
    if bpy.app.version < (5, 0, 0):
        world.use_nodes = True
    nt = world.node_tree
    rgb = nt.nodes.new("ShaderNodeRGB")
    rgb.name = "User RGB"
    rgb.outputs[0].default_value = (0.2, 0.3, 0.4, 1.0)
    nt.links.new(rgb.outputs[0], nt.nodes["Background"].inputs["Color"])
    math_node = nt.nodes.new("ShaderNodeMath")
    math_node.name = "User Math"
    world["user_note"] = "mine"
    bpy.context.scene.world = world
    return world


def sphere_scene(engine: str) -> None:
    """A diffuse white sphere (radius 1) seen by an orthographic camera from -Y, 64x32, film transparent."""
    scene = bpy.context.scene
    bpy.ops.mesh.primitive_uv_sphere_add(radius=1.0, segments=64, ring_count=32)
    bpy.ops.object.shade_smooth()
    sphere = bpy.context.active_object
    mat = bpy.data.materials.new("Diffuse")
    if bpy.app.version < (5, 0, 0):
        mat.use_nodes = True
    nt = mat.node_tree
    nt.nodes.clear()
    diffuse = nt.nodes.new("ShaderNodeBsdfDiffuse")
    diffuse.inputs["Color"].default_value = (0.8, 0.8, 0.8, 1.0)
    out = nt.nodes.new("ShaderNodeOutputMaterial")
    nt.links.new(diffuse.outputs[0], out.inputs["Surface"])
    sphere.data.materials.append(mat)
    cam_data = bpy.data.cameras.new("Camera")
    cam_data.type = "ORTHO"
    cam_data.ortho_scale = 4.0
    cam = bpy.data.objects.new("Camera", cam_data)
    scene.collection.objects.link(cam)
    cam.location = (0.0, -5.0, 0.0)
    cam.rotation_euler = (np.pi / 2, 0.0, 0.0)
    scene.camera = cam
    r = scene.render
    r.engine = engine
    r.resolution_x, r.resolution_y, r.resolution_percentage = 64, 32, 100
    r.film_transparent = True
    r.image_settings.file_format = "OPEN_EXR"
    r.image_settings.color_depth = "32"
    scene.view_settings.view_transform = "Standard"
    if engine == "CYCLES":
        c = scene.cycles
        c.device = "CPU"
        c.samples = 8
        c.use_denoising = False
        c.use_adaptive_sampling = False
    else:
        eevee = scene.eevee
        if hasattr(eevee, "taa_render_samples"):
            eevee.taa_render_samples = 8


def _disc_mask() -> np.ndarray:
    """The 64x32 frame's pixels well inside the sphere's silhouette (radius 16 px), row 0 = top."""
    py, px = np.mgrid[0:32, 0:64]
    x, z = (px + 0.5 - 32) / 16, (16 - (py + 0.5)) / 16
    return x * x + z * z < 0.95


def render_sphere_mean(out_path: str) -> tuple[list[float], int]:
    """Render, read the EXR back (linear), return the mean RGB over the sphere's inner pixels and the
    number of pixels the sphere covers (alpha)."""
    scene = bpy.context.scene
    scene.render.filepath = out_path
    bpy.ops.render.render(write_still=True)
    image = bpy.data.images.load(out_path, check_existing=False)
    w, h = image.size
    a = np.empty(w * h * 4, np.float32)
    image.pixels.foreach_get(a)
    bpy.data.images.remove(image)
    a = a.reshape(h, w, 4)[::-1]  # row 0 = top
    covered = int((a[..., 3] > 0.999).sum())
    return [float(x) for x in a[_disc_mask()][:, :3].mean(axis=0)], covered


def environment_for_prediction(world: bpy.types.World) -> tuple[np.ndarray, float]:
    """Turn our Sun lamp off (the sun, if the generator drew one, stays in the map: `.hdr`) and return
    the World's environment pixels and its lighting Background strength (exposure x Strength)."""
    world_mod = sys.modules[MODULE + ".blender.world"]
    world.dit360.use_sun = False
    nodes = world_mod.our_nodes(world)
    return image_linear(nodes["env"].image), float(nodes["background"].inputs["Strength"].default_value)


def image_linear(image: bpy.types.Image) -> np.ndarray:
    """(H, W, 3) linear float pixels of a Blender image, row 0 = top (Blender converts sRGB bytes)."""
    w, h = image.size
    a = np.empty(w * h * 4, np.float32)
    image.pixels.foreach_get(a)
    a = a.reshape(h, w, 4)[::-1, :, :3]
    if not image.is_float and image.colorspace_settings.name.lower().startswith("srgb"):
        a = np.where(a <= 0.04045, a / 12.92, ((a + 0.055) / 1.055) ** 2.4)
    return a


def predicted_sphere_mean(
    env: np.ndarray, rotation: float, albedo: float = 0.8, strength: float = 1.0
) -> list[float]:
    """What a Lambertian sphere seen from -Y (orthographic, 64x32 frame, radius 16 px) averages to under
    `env` at Background `strength`, turned by the Mapping node's Z `rotation`:
    albedo/π · strength · ∫ env(ω) max(0, n·ω) dω per pixel."""
    import importlib

    sphere = importlib.import_module(MODULE + ".panorama.sphere")  # the add-on's own numpy-only copy
    direction_from_uv, row_solid_angles = sphere.direction_from_uv, sphere.row_solid_angles

    h, w, _ = env.shape
    u = (np.arange(w) + 0.5) / w
    v = 1.0 - (np.arange(h) + 0.5) / h  # Blender's v runs bottom -> top; row 0 is the top
    uu, vv = np.meshgrid(u, v)
    dirs = direction_from_uv(uu, vv).reshape(-1, 3)  # the lookup direction of each image pixel
    # The Mapping node rotates the lookup vector: world direction d reads the image at Rz(rot)·d,
    # so image direction ω is seen from world direction Rz(-rot)·ω.
    c, s = np.cos(-rotation), np.sin(-rotation)
    rot = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
    world_dirs = dirs @ rot.T
    omega = np.broadcast_to(row_solid_angles(h, w)[:, None], (h, w)).reshape(-1)
    radiance = env.reshape(-1, 3)
    py, px = np.nonzero(_disc_mask())
    x, z = (px + 0.5 - 32) / 16, (16 - (py + 0.5)) / 16
    normals = np.stack([x, -np.sqrt(np.clip(1 - x * x - z * z, 0.0, None)), z], axis=1)
    cos = np.clip(normals @ world_dirs.T, 0.0, None) * omega[None, :]
    irradiance = cos @ radiance  # (pixels, 3)
    return [float(x) for x in (albedo * strength / np.pi * irradiance).mean(axis=0)]


class Steps:
    """Runs named steps in order; each records ok/error/data; the JSON goes to `out`."""

    def __init__(self, out: str) -> None:
        self.out = out
        self.results: dict = {}

    def run(self, name: str, fn, *args) -> None:
        t0 = time.monotonic()
        data: dict = {}
        try:
            fn(data, *args)
            ok, err = True, None
        except BaseException:
            ok, err = False, traceback.format_exc()
            print(f"STEP {name} FAILED\n{err}", file=sys.stderr, flush=True)
        self.results[name] = {
            "ok": ok,
            "error": err,
            "data": data,
            "seconds": round(time.monotonic() - t0, 3),
        }
        self.save()

    def save(self) -> None:
        Path(self.out).write_text(json.dumps(self.results, indent=1, default=str), encoding="utf-8")
