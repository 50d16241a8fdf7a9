"""The generated World lights a diffuse sphere in Eevee too (a separate process: without libEGL an
Eevee render aborts the whole process, so the pytest side runs this only where libEGL exists).

    python tests/blender/scenario_eevee.py CONFIG.json   -> CONFIG["out"] (same record format as scenario_main)
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402  (sets BLENDER_USER_RESOURCES before bpy)

USER_RESOURCES = harness.USER_RESOURCES  # Blender's user folders for this run (a temporary one)

import bpy  # noqa: E402

CFG = json.loads(Path(sys.argv[1]).read_text(encoding="utf-8"))
WORK = Path(CFG["work"])
PROMPT = "This is a panorama image. A red desert canyon under a pale sky"


def step_eevee(data: dict) -> None:
    harness.install_zip(CFG["zip"])
    harness.configure(CFG["models"], CFG.get("worker_python"))
    harness.reset_scene()
    # 4.2-4.5 call it BLENDER_EEVEE_NEXT, 5.0 BLENDER_EEVEE
    engines = bpy.types.RenderSettings.bl_rna.properties["engine"].enum_items.keys()
    engine = "BLENDER_EEVEE_NEXT" if "BLENDER_EEVEE_NEXT" in engines else "BLENDER_EEVEE"
    data["engine"] = engine
    harness.sphere_scene(engine)
    api = importlib.import_module(harness.MODULE + ".api")
    image = api.generate_world(PROMPT, seed=8, steps=3, width=128, height=64, wait=True, timeout=180)
    world = bpy.context.scene.world
    data["returned_kind"] = image.get("dit360_kind")
    env, strength = harness.environment_for_prediction(world)  # .hdr (the sun, if any, in the map)
    world_mod = sys.modules[harness.MODULE + ".blender.world"]
    renders = {}
    for label, rotation in (("rot0", 0.0), ("rot180", 3.141592653589793)):
        world.dit360.rotation = rotation
        t0 = time.monotonic()
        mean, covered = harness.render_sphere_mean(str(WORK / f"eevee_{label}.exr"))
        renders[label] = {"mean": mean, "covered_px": covered, "seconds": time.monotonic() - t0,
                          "predicted": harness.predicted_sphere_mean(env, rotation, strength=strength)}  # fmt: skip
    world.dit360.rotation = 0.0
    black = bpy.data.images.new("black", 16, 8)
    black.pixels.foreach_set([0.0, 0.0, 0.0, 1.0] * 16 * 8)
    world_mod.set_image(world, black)
    renders["black"] = {"mean": harness.render_sphere_mean(str(WORK / "eevee_black.exr"))[0]}
    data["renders"] = renders
    data["torch_loaded"] = "torch" in sys.modules
    bpy.ops.preferences.addon_disable(module=harness.MODULE)


if __name__ == "__main__":
    timers = harness.FakeTimers()
    steps = harness.Steps(CFG["out"])
    steps.run("eevee", step_eevee)
    for fn in list(timers.due):
        timers.unregister(fn)
    sys.stdout.flush()
    os._exit(0)
