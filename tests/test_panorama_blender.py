"""Real Blender (bpy, in a subprocess) agrees with the panorama package:

* our .hdr loads as a float, linear image of the right size with the sun where we put it;
* Blender's Environment Texture samples direction d at exactly `sphere.uv_from_direction(d)` (a world
  whose pixels hold their own (u, v), seen through a camera, so every rendered pixel reads back the
  (u, v) Blender looked up; including across the wrap and over the zenith);
* `sphere.sun_lamp_rotation` points a lamp's local +Z at the sun (mathutils);
* a grey card (albedo 0.18, facing up) lit in Cycles by the HDR world at the `exposure` strength
  renders 0.18, and lit by the `lighting` world + the Sun lamp from `HdrResult.sun_lamp()` renders
  the same: the exposure rule and the lamp's units are right.

bpy is never imported into the pytest process (it would stay loaded); the script runs in a child
Python with BLENDER_USER_RESOURCES pointing at a temporary folder so nothing touches ~/.config.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from test_panorama_synthetic import sun_panorama

from dit360_blender.panorama import sphere
from dit360_blender.panorama.color import luminance
from dit360_blender.panorama.hdr import expand_to_hdr
from dit360_blender.panorama.rgbe import write_hdr_files

pytestmark = pytest.mark.skipif(importlib.util.find_spec("bpy") is None, reason="needs the bpy module")

SCRIPT = r"""
import json, os, sys, tempfile
import bpy, mathutils
import numpy as np

job = json.load(open(sys.argv[1]))
out = {}
tmp = job["tmp"]
LUMA = np.array([0.2126, 0.7152, 0.0722], np.float32)


def pixels(image):
    w, h = image.size
    a = np.empty(w * h * 4, np.float32)
    image.pixels.foreach_get(a)
    return a.reshape(h, w, 4)[::-1]  # Blender's row 0 is the bottom; ours is the top


# 1. the .hdr loads as a float image
img = bpy.data.images.load(job["hdr"], check_existing=False)
lum = pixels(img)[..., :3] @ LUMA
r, c = np.unravel_index(np.argmax(lum), lum.shape)
out["load"] = {"is_float": bool(img.is_float), "size": list(img.size), "colorspace": img.colorspace_settings.name,
               "brightest": [int(r), int(c)], "max": float(lum.max())}

bpy.ops.wm.read_factory_settings(use_empty=True)
scene = bpy.context.scene
scene.render.engine = "CYCLES"
scene.cycles.device = "CPU"
scene.cycles.use_denoising = False
scene.view_settings.view_transform = "Standard"
scene.render.image_settings.file_format = "OPEN_EXR"
scene.render.image_settings.color_depth = "32"
world = bpy.data.worlds.new("world")
scene.world = world
world.use_nodes = True
env = world.node_tree.nodes.new("ShaderNodeTexEnvironment")
background = world.node_tree.nodes["Background"]
world.node_tree.links.new(env.outputs["Color"], background.inputs["Color"])


def render(name):
    scene.render.filepath = os.path.join(tmp, name + ".exr")
    bpy.ops.render.render(write_still=True)
    image = bpy.data.images.load(scene.render.filepath, check_existing=False)
    a = pixels(image)[..., :3].copy()
    bpy.data.images.remove(image)
    return a


# 2. the mapping: a world whose pixels hold their own (u, v), through a wide camera
H, W = job["uv_size"]
uv_image = bpy.data.images.new("uv", width=W, height=H, alpha=True, float_buffer=True)
arr = np.zeros((H, W, 4), np.float32)
arr[..., 0] = ((np.arange(W) + 0.5) / W)[None, :]
arr[..., 1] = ((np.arange(H) + 0.5) / H)[:, None]  # Blender's v of its row k (bottom-up)
arr[..., 3] = 1.0
uv_image.pixels.foreach_set(arr.ravel())
uv_image.update()
env.image = uv_image
world.cycles.sampling_method = "NONE"  # only camera rays see this world
camera_data = bpy.data.cameras.new("camera")
camera = bpy.data.objects.new("camera", camera_data)
scene.collection.objects.link(camera)
scene.camera = camera
camera_data.angle = job["fov"]
scene.render.resolution_x = scene.render.resolution_y = job["uv_res"]
scene.cycles.samples = 1
scene.cycles.filter_width = 0.01  # rays through the pixel centres
out["uv_views"] = []
for d in job["views"]:
    camera.rotation_euler = mathutils.Vector(d).to_track_quat("-Z", "Y").to_euler()
    bpy.context.view_layer.update()
    a = render("uv")
    out["uv_views"].append({"matrix": [list(row) for row in camera.matrix_world.to_3x3()], "uv": a[..., :2].tolist()})

# 3. Sun lamp rotation: local +Z towards the sun
out["lamp_z"] = [list(mathutils.Euler(rot, "XYZ").to_matrix() @ mathutils.Vector((0, 0, 1))) for rot in job["rotations"]]

# 4. a grey card facing up, seen from above: HDR world vs lighting world + Sun lamp
camera_data.type = "ORTHO"
camera_data.ortho_scale = 1.0
camera.location = (0, 0, 1)
camera.rotation_euler = (0, 0, 0)
bpy.ops.mesh.primitive_plane_add(size=100.0)
material = bpy.data.materials.new("grey")
material.use_nodes = True
nodes = material.node_tree.nodes
nodes.clear()
diffuse = nodes.new("ShaderNodeBsdfDiffuse")
diffuse.inputs["Color"].default_value = (0.18, 0.18, 0.18, 1.0)
output = nodes.new("ShaderNodeOutputMaterial")
material.node_tree.links.new(diffuse.outputs[0], output.inputs[0])
bpy.context.active_object.data.materials.append(material)
world.cycles.sampling_method = "AUTOMATIC"
scene.cycles.filter_width = 1.5
scene.render.resolution_x = scene.render.resolution_y = 16
scene.cycles.samples = job["samples"]
scene.cycles.max_bounces = 0
background.inputs["Strength"].default_value = job["exposure"]
env.image = bpy.data.images.load(job["hdr"], check_existing=False)
out["card_hdr"] = render("card_hdr").mean(axis=(0, 1)).tolist()
env.image = bpy.data.images.load(job["lighting"], check_existing=False)
lamp = job["lamp"]
sun_data = bpy.data.lights.new("sun", "SUN")
sun_data.energy = lamp["strength"]
sun_data.color = lamp["color"]
sun_data.angle = lamp["angle"]
sun = bpy.data.objects.new("sun", sun_data)
sun.rotation_euler = lamp["rotation_euler"]
scene.collection.objects.link(sun)
out["card_lamp"] = render("card_lamp").mean(axis=(0, 1)).tolist()
print("RESULT " + json.dumps(out))
"""

VIEWS = [(-170.0, 10.0), (60.0, 70.0)]  # across the wrap; over the zenith
LAMP_DIRECTIONS = [(0.0, 0.0), (90.0, 0.0), (-90.0, 0.0), (30.0, 40.0), (150.0, -20.0), (-120.0, 75.0)]


@pytest.fixture(scope="module")
def blender(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("blender")
    image = sun_panorama(30.0, 40.0, height=128, width=256, radius_deg=3.0)
    result = expand_to_hdr(image, sun_share=0.6)
    paths = write_hdr_files(tmp / "pano.png", result)
    job = {
        "tmp": str(tmp),
        "hdr": str(paths["hdr"]),
        "lighting": str(paths["lighting"]),
        "uv_size": [256, 512],
        "fov": 1.5,
        "uv_res": 24,
        "views": [sphere.direction_from_angles(*v).tolist() for v in VIEWS],
        "rotations": [
            list(sphere.sun_lamp_rotation(sphere.direction_from_angles(*d))) for d in LAMP_DIRECTIONS
        ],
        "exposure": result.exposure,
        "lamp": result.sun_lamp(),
        "samples": 16,
    }
    (tmp / "job.json").write_text(json.dumps(job))
    (tmp / "check.py").write_text(SCRIPT)
    env = {**os.environ, "BLENDER_USER_RESOURCES": str(tmp / "user"), "XDG_CACHE_HOME": str(tmp / "cache")}
    done = subprocess.run(
        [sys.executable, str(tmp / "check.py"), str(tmp / "job.json")],
        capture_output=True, text=True, timeout=300, env=env, cwd=tmp,
    )  # fmt: skip
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stdout[-3000:] + done.stderr[-3000:]
    return {"out": json.loads(lines[-1][7:]), "job": job, "result": result}


def test_hdr_loads_in_blender_as_float(blender):
    load, result = blender["out"]["load"], blender["result"]
    assert load["is_float"] is True
    assert load["size"] == [256, 128]
    assert load["colorspace"] == "Linear Rec.709"
    r, c = load["brightest"]
    assert result.sun.mask[r, c]  # the brightest pixel Blender sees is in the sun region
    assert load["max"] == pytest.approx(float(luminance(result.hdr).max()), rel=0.01)


def test_blender_samples_the_environment_at_our_uv(blender):
    job = blender["job"]
    n, half = job["uv_res"], math.tan(job["fov"] / 2)
    centres = ((np.arange(n) + 0.5) / n * 2 - 1) * half
    x, y = np.meshgrid(centres, -centres)  # row 0 = top of the render
    camera_rays = np.stack([x, y, -np.ones_like(x)], axis=-1)  # a camera looks along its local -Z
    width = job["uv_size"][1]
    for view in blender["out"]["uv_views"]:
        rays = camera_rays @ np.array(view["matrix"]).T
        u, v = sphere.uv_from_direction(rays)
        seen = np.array(view["uv"])
        away_from_wrap = np.minimum(u, 1 - u) > 2 / width  # the texture's own values jump there
        du = (seen[..., 0] - u + 0.5) % 1.0 - 0.5
        assert np.abs(du[away_from_wrap]).max() < 1e-4
        assert np.abs(seen[..., 1] - v).max() < 1e-4
        assert away_from_wrap.mean() > 0.9


def test_sun_lamp_rotation_in_blender(blender):
    for (az, el), z_axis in zip(LAMP_DIRECTIONS, blender["out"]["lamp_z"]):
        assert z_axis == pytest.approx(sphere.direction_from_angles(az, el).tolist(), abs=1e-5)


def test_grey_card_and_sun_lamp_in_cycles(blender):
    card_hdr = np.array(blender["out"]["card_hdr"])
    card_lamp = np.array(blender["out"]["card_lamp"])
    assert float(luminance(card_hdr)) == pytest.approx(0.18, rel=0.03)  # the exposure rule
    assert card_lamp == pytest.approx(card_hdr, rel=0.02)  # the lamp replaces the sun in the map
