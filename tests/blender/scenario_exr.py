"""The OpenEXR environments in real Blender (bpy), in one process: a worker result whose .hdr files
have their EXRs beside them goes through the add-on's apply path (`results.apply_result`); the same
panorama without EXRs is applied next for comparison; then the history re-applies the first.

    python tests/blender/scenario_exr.py CONFIG.json      (CONFIG: see tests/test_blender_exr.py)

Writes CONFIG["out"]: {step: {"ok", "error", "data", "seconds"}}; the pytest module asserts on it.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402  (sets BLENDER_USER_RESOURCES before bpy)

# isort: split
import bpy  # noqa: E402
import numpy as np  # noqa: E402

CFG = json.loads(Path(sys.argv[1]).read_text(encoding="utf-8"))
WORK = Path(CFG["work"])
TIMERS = harness.FakeTimers()
steps = harness.Steps(CFG["out"])


def mod(name: str):
    return sys.modules[f"{harness.MODULE}.blender.{name}"]


def event(name: str) -> dict:
    return json.loads(Path(CFG["results"][name]["event"]).read_text(encoding="utf-8"))


def params(name: str) -> dict:
    return CFG["results"][name]["params"]


def shown() -> dict:
    """The World's environment image: its file, type and what it records, and its pixels (top row first)."""
    image = mod("world").current_image(bpy.context.scene.world)
    w, h = image.size
    pixels = np.empty(w * h * 4, np.float32)
    image.pixels.foreach_get(pixels)
    np.save(WORK / f"pixels-{image.name}.npy", pixels.reshape(h, w, 4)[::-1, :, :3])
    return {
        "filepath": str(Path(bpy.path.abspath(image.filepath)).resolve()),
        "is_float": bool(image.is_float),
        "colorspace": image.colorspace_settings.name,
        "kind": image.get("dit360_kind"),
        "hdr_file": image.get("dit360_hdr_file"),
        "lighting_file": image.get("dit360_lighting_file"),
        "pixels": str(WORK / f"pixels-{image.name}.npy"),
    }


def step_install(data: dict) -> None:
    harness.install_zip(CFG["zip"])
    harness.configure(CFG["models"])


def step_apply(data: dict) -> None:
    """The result with EXRs, then the same panorama with .hdr files only: both rendered by Cycles."""
    harness.reset_scene()
    harness.user_world()
    harness.sphere_scene("CYCLES")
    scene = bpy.context.scene
    for name in ("exr", "hdr"):
        mod("results").apply_result(scene, event(name), params(name))
        data[name] = shown()
        data[name]["suns"] = sorted(o.name for o in scene.objects if o.get("dit360_role") == "sun")
        data[name]["render"], data[name]["covered"] = harness.render_sphere_mean(str(WORK / f"{name}.exr"))


def step_history(data: dict) -> None:
    """The history entry of the EXR result (it records the .hdr paths) brings the EXR back."""
    scene = bpy.context.scene
    index = next(i for i, e in enumerate(scene.dit360.history) if e.filepath == event("exr")["path"])
    entry = scene.dit360.history[index]
    data["entry"] = {"hdr": entry.hdr_path, "lighting": entry.lighting_path}
    data["apply"] = sorted(bpy.ops.dit360.apply_history(index=index))
    data["env"] = shown()


ORDER = [("install", step_install), ("apply", step_apply), ("history", step_history)]

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
