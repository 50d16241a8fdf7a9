"""The edit geometry against Blender itself (real bpy 4.5, Cycles, in a child process).

A World reads a smooth test panorama through a Mapping node (Texture Coordinate ▸ Generated ▸
Mapping, turned about all three axes ▸ Environment Texture), as the add-on's chain does. A camera
of known field of view, aimed with Blender's own Euler angles and a roll, renders it:

* `view_angles` of Blender's camera matrix (through `mapping_matrix` of the node's rotation) gives
  the yaw/pitch/roll at which our `equirect_to_perspective` of the same panorama equals the render;
* the World then shows the VIEW MASK those angles give (computed inside Blender by the add-on's
  numpy code, as Regenerate View does): rendered from that camera it is white everywhere, and from a
  wider camera it is white where our signed distance says the first camera sees, black beyond the
  feather, and in between what our own sampling of the mask predicts.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_panorama_cubemap import field

from dit360_blender.panorama import projection, sphere
from dit360_blender.panorama.cubemap import sample_equirect

pytestmark = pytest.mark.skipif(importlib.util.find_spec("bpy") is None, reason="needs the bpy module")

ROOT = Path(__file__).resolve().parent.parent
WORLD_ANGLES = (40.0, 15.0, 10.0)  # yaw, pitch, roll of the camera in the world (degrees)
W_YAW, W_PITCH, W_ROLL = WORLD_ANGLES
MAPPING = (0.3, -0.2, 1.1)  # the Mapping node's Euler XYZ rotation (radians)
HFOV, SIZE = 50.0, (48, 32)  # the camera: horizontal field of view, width x height (aspect 1.5)
WIDE_HFOV, WIDE_SIZE = 110.0, (96, 64)
FEATHER, MASK_SIZE = 3.0, (512, 256)

SCRIPT = r"""
import json, math, sys
import bpy, mathutils
import numpy as np

job = json.load(open(sys.argv[1]))
sys.path.insert(0, job["root"])
from dit360_blender.panorama import projection  # the add-on's own numpy code, as its operators use it

bpy.ops.wm.read_factory_settings(use_empty=True)
scene = bpy.context.scene
scene.render.engine = "CYCLES"
scene.cycles.device = "CPU"
scene.cycles.samples = 16
scene.cycles.use_denoising = False
scene.cycles.filter_width = 0.01  # the pixel centre's ray
scene.view_settings.view_transform = "Standard"
scene.render.resolution_percentage = 100
scene.render.image_settings.file_format = "OPEN_EXR"
scene.render.image_settings.color_depth = "32"
world = bpy.data.worlds.new("world")
scene.world = world
world.use_nodes = True
world.cycles.sampling_method = "NONE"
nt = world.node_tree
coords = nt.nodes.new("ShaderNodeTexCoord")
mapping = nt.nodes.new("ShaderNodeMapping")
mapping.inputs["Rotation"].default_value = job["mapping"]
env = nt.nodes.new("ShaderNodeTexEnvironment")
nt.links.new(coords.outputs["Generated"], mapping.inputs["Vector"])
nt.links.new(mapping.outputs["Vector"], env.inputs["Vector"])
nt.links.new(env.outputs["Color"], nt.nodes["Background"].inputs["Color"])


def float_image(name, rgb):
    h, w = rgb.shape[:2]
    image = bpy.data.images.new(name, width=w, height=h, alpha=True, float_buffer=True)
    rgba = np.ones((h, w, 4), np.float32)
    rgba[..., :3] = rgb[::-1]  # Blender's rows start at the bottom
    image.pixels.foreach_set(rgba.ravel())
    image.update()
    return image


camera = bpy.data.objects.new("camera", bpy.data.cameras.new("camera"))
scene.collection.objects.link(camera)
scene.camera = camera
camera.data.sensor_fit = "HORIZONTAL"
yaw, pitch, roll = job["world_angles"]
# Blender's way to aim a camera: X by 90 + pitch (from looking down to the horizon), Z by yaw - 90
# (its view then at azimuth yaw), after a roll about its own Z
aim = mathutils.Euler((math.radians(90 + pitch), 0.0, math.radians(yaw - 90)), "XYZ").to_matrix()
camera.matrix_world = (aim @ mathutils.Matrix.Rotation(math.radians(roll), 3, "Z")).to_4x4()
bpy.context.view_layer.update()
out = {"matrix": [list(r) for r in camera.matrix_world.to_3x3()]}


def render(name, hfov, size):
    camera.data.angle = math.radians(hfov)
    scene.render.resolution_x, scene.render.resolution_y = size
    scene.render.filepath = job["tmp"] + "/" + name + ".exr"
    bpy.ops.render.render(write_still=True)
    image = bpy.data.images.load(scene.render.filepath, check_existing=False)
    w, h = image.size
    a = np.empty(w * h * 4, np.float32)
    image.pixels.foreach_get(a)
    bpy.data.images.remove(image)
    return a.reshape(h, w, 4)[::-1, :, :3]


env.image = float_image("panorama", np.load(job["panorama"]))
np.save(job["tmp"] + "/view.npy", render("view", job["hfov"], job["size"]))
# what Regenerate View does: the camera's rotation through the Mapping node, then the mask
mapping_m = projection.mapping_matrix(tuple(mapping.inputs["Rotation"].default_value), tuple(mapping.inputs["Scale"].default_value))
angles = projection.view_angles(np.array(camera.matrix_world.to_3x3()), mapping_m)
w, h = job["size"]
yaw, pitch, roll = angles
mask = projection.view_mask(*job["mask_size"], yaw, pitch, job["hfov"], w / h, roll, feather=job["feather"])
np.save(job["tmp"] + "/mask.npy", mask)
env.image = float_image("mask", np.repeat(mask[..., None], 3, axis=-1))
np.save(job["tmp"] + "/mask_view.npy", render("mask_view", job["hfov"], job["size"]))
np.save(job["tmp"] + "/mask_wide.npy", render("mask_wide", job["wide_hfov"], job["wide_size"]))
out["angles"] = list(angles)
json.dump(out, open(job["tmp"] + "/out.json", "w"))
"""


@pytest.fixture(scope="module")
def blender(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("edit-geometry-blender")
    h, w = 128, 256
    u, v = sphere.uv_from_pixel(*np.mgrid[0:h, 0:w], h, w)
    panorama = field(sphere.direction_from_uv(u, v)).astype(np.float32)
    np.save(tmp / "panorama.npy", panorama)
    job = {
        "root": str(ROOT), "tmp": str(tmp), "panorama": str(tmp / "panorama.npy"), "mapping": list(MAPPING),
        "world_angles": list(WORLD_ANGLES), "hfov": HFOV, "size": list(SIZE), "wide_hfov": WIDE_HFOV,
        "wide_size": list(WIDE_SIZE), "feather": FEATHER, "mask_size": list(MASK_SIZE),
    }  # fmt: skip
    (tmp / "job.json").write_text(json.dumps(job))
    (tmp / "script.py").write_text(SCRIPT)
    env = dict(os.environ, BLENDER_USER_RESOURCES=str(tmp / "bpy-user"))
    proc = subprocess.run(
        [sys.executable, str(tmp / "script.py"), str(tmp / "job.json")],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0 and (tmp / "out.json").is_file(), proc.stdout[-3000:] + proc.stderr[-3000:]
    out = json.loads((tmp / "out.json").read_text())
    renders = {
        name: np.load(tmp / f"{name}.npy").astype(np.float64) for name in ("view", "mask_view", "mask_wide")
    }
    return {"out": out, "panorama": panorama, "mask": np.load(tmp / "mask.npy"), **renders}


def test_blender_camera_angles_are_ours(blender):
    """Blender's Euler-aimed, rolled camera is our camera_matrix of the same world angles."""
    matrix = np.array(blender["out"]["matrix"])
    assert np.allclose(matrix, projection.camera_matrix(*WORLD_ANGLES), atol=1e-6)
    assert projection.view_angles(matrix) == pytest.approx(WORLD_ANGLES, abs=1e-4)


def test_our_perspective_sampling_is_what_the_blender_camera_renders_through_the_mapping(blender):
    matrix = np.array(blender["out"]["matrix"])
    mapping = projection.mapping_matrix(MAPPING)
    yaw, pitch, roll = projection.view_angles(matrix, mapping)
    # the same code in Blender (its node holds the rotation in float32)
    assert blender["out"]["angles"] == pytest.approx([yaw, pitch, roll], abs=1e-4)
    ours = projection.equirect_to_perspective(blender["panorama"], *SIZE, yaw, pitch, HFOV, roll)
    render = blender["view"]
    error = np.abs(render - ours)
    # Cycles' linear texture lookup vs our bilinear at the pixel centre, on a smooth field (0.1-0.9)
    assert error.mean() < 2e-4 and error.max() < 5e-3, (error.mean(), error.max())
    # the same camera in world angles, the Mapping applied to its rays: the same image
    world = projection.equirect_to_perspective(
        blender["panorama"], *SIZE, W_YAW, W_PITCH, HFOV, W_ROLL, mapping=mapping
    )
    assert np.abs(world - ours).max() < 1e-5
    # without the Mapping node's turn, or mirrored, it is another picture
    assert (
        np.abs(
            render
            - projection.equirect_to_perspective(blender["panorama"], *SIZE, W_YAW, W_PITCH, HFOV, W_ROLL)
        ).mean()
        > 0.05
    )
    assert np.abs(render - ours[:, ::-1]).mean() > 0.05


def test_the_view_mask_is_white_where_the_camera_sees(blender):
    assert blender["mask_view"].min() > 0.999  # every pixel of the camera's own frame
    matrix = np.array(blender["out"]["matrix"])
    mapping = projection.mapping_matrix(MAPPING)
    yaw, pitch, roll = projection.view_angles(matrix, mapping)
    # the wider camera's rays, in the panorama's frame
    rays = projection.perspective_rays(*WIDE_SIZE, W_YAW, W_PITCH, WIDE_HFOV, W_ROLL) @ mapping.T
    s = projection.view_signed_distance(rays, yaw, pitch, HFOV, SIZE[0] / SIZE[1], roll)
    wide = blender["mask_wide"][..., 0]
    texel = 360.0 / MASK_SIZE[0]
    seen, beyond = s > texel, s < -(FEATHER + texel)
    assert seen.sum() > 400 and beyond.sum() > 1500  # both parts are in the frame
    assert wide[seen].min() > 0.999
    assert wide[beyond].max() < 1e-3
    predicted = sample_equirect(blender["mask"][..., None], rays)[..., 0]
    assert np.abs(wide - predicted).max() < 0.02  # the feather where Blender reads it
    assert math.isclose(float(wide.mean()), float(predicted.mean()), abs_tol=2e-3)
