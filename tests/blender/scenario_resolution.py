"""Resolution / Refine and the sizes of a history entry in real Blender (bpy), in one process: the
panel's Resolution row, Refine and the estimate; a 2K result then an upscale of it (one entry, two
sizes, the World on the larger EXR); a re-apply from the history; a result that carries its native
size; what the panel sends with a job.

    python tests/blender/scenario_resolution.py CONFIG.json      (CONFIG: see tests/test_blender_resolution.py)
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

CFG = json.loads(Path(sys.argv[1]).read_text(encoding="utf-8"))
TIMERS = harness.FakeTimers()
steps = harness.Steps(CFG["out"])


class Recorder:
    """Stands in for a UILayout: records every call (labels, props, operators) with its text."""

    def __init__(self, log: list) -> None:
        object.__setattr__(self, "_log", log)

    def __getattr__(self, name):
        def call(*args, **kwargs):
            self._log.append(
                {"call": name, "text": kwargs.get("text"), "args": [a for a in args if isinstance(a, str)]}
            )
            return Recorder(self._log)

        return call

    def __setattr__(self, name, value):
        pass


def mod(name: str):
    return sys.modules[f"{harness.MODULE}.blender.{name}"]


def event(name: str) -> dict:
    return json.loads(Path(CFG["results"][name]["event"]).read_text(encoding="utf-8"))


def params(name: str) -> dict:
    return CFG["results"][name]["params"]


def shown() -> str:
    image = mod("world").current_image(bpy.context.scene.world)
    return str(Path(bpy.path.abspath(image.filepath)).resolve())


def draw(panel: str) -> list:
    log: list = []
    cls = getattr(mod("panels"), panel)
    cls.draw(type("P", (), {"layout": Recorder(log)})(), bpy.context)
    return log


def step_install(data: dict) -> None:
    harness.install_zip(CFG["zip"])
    harness.configure(CFG["models"], CFG.get("worker_python"))


def step_panel(data: dict) -> None:
    settings = bpy.context.scene.dit360
    data["native"] = draw("DIT360_PT_main")
    settings.size, settings.refine, settings.refine_strength = "8K", True, 0.35
    data["8k"] = draw("DIT360_PT_main")
    data["job"] = mod("param_props").scene_job_values(settings, {})
    settings.size, settings.refine = "NATIVE", False


def _sizes(entry) -> list:
    return [[s.width, s.height, s.filepath, s.hdr_path] for s in entry.sizes]


def step_upscale(data: dict) -> None:
    """The 2K result, then an upscale result made from it."""
    harness.reset_scene()
    harness.user_world()
    scene = bpy.context.scene
    mod("results").apply_result(scene, event("native"), params("native"))
    data["after_native"] = {"entries": len(scene.dit360.history), "world": shown()}
    mod("results").apply_result(scene, event("upscaled"), params("upscaled"))
    entry = scene.dit360.history[scene.dit360.history_index]
    data["entries"] = len(scene.dit360.history)
    data["sizes"] = _sizes(entry)
    data["entry_file"] = entry.filepath
    data["world"] = shown()
    data["history_panel"] = draw("DIT360_PT_history")
    collection = mod("thumbnails").THUMBNAILS.collection
    data["thumbnails"] = sorted(collection.keys()) if collection is not None else None


def step_reapply(data: dict) -> None:
    scene = bpy.context.scene
    scene.world = harness.user_world("Other")
    data["apply"] = sorted(bpy.ops.dit360.apply_history(index=scene.dit360.history_index))
    data["world"] = shown()


def step_native_in_result(data: dict) -> None:
    """A generate result that was upscaled in the same job and carries its native size."""
    scene = bpy.context.scene
    both = dict(
        event("upscaled"), native={k: event("native")[k] for k in ("path", "width", "height", "files")}
    )
    both["metadata"] = dict(both["metadata"])
    both["metadata"].pop("upscale")
    mod("results").apply_result(scene, both, params("native"))
    entry = scene.dit360.history[0]
    data["entries"] = len(scene.dit360.history)
    data["sizes"] = _sizes(entry)
    data["world"] = shown()


def step_upscale_button(data: dict) -> None:
    """With a Resolution above 2K the entry offers Upscale; it refuses clearly what it can't do."""
    scene = bpy.context.scene
    settings = scene.dit360
    settings.size = "NATIVE"
    data["native_panel"] = draw("DIT360_PT_history")
    data["poll_native"] = bpy.ops.dit360.upscale_history.poll()
    settings.size = "4K"
    data["panel"] = draw("DIT360_PT_history")
    data["poll_4k"] = bpy.ops.dit360.upscale_history.poll()
    ops = sys.modules[f"{harness.MODULE}.blender.resolution_ops"]
    entry = settings.history[settings.history_index]
    data["native_file"] = str(ops.native_file(entry))
    errors = {}
    settings.size = "NATIVE"
    try:
        ops.start_upscale(scene, entry)
    except Exception as exc:  # GenerationError
        errors["native"] = [type(exc).__name__, getattr(exc, "message", str(exc))]
    settings.size = "4K"
    entry.sizes[len(entry.sizes) - 1].filepath = str(Path(CFG["work"]) / "gone.png")
    try:
        ops.start_upscale(scene, entry)
    except Exception as exc:
        errors["missing"] = [type(exc).__name__, getattr(exc, "message", str(exc))]
    data["errors"] = errors
    settings.size = "NATIVE"


def step_chain(data: dict) -> None:
    """Generate World with Resolution 4K, through the real worker on the tiny models: the worker
    generates at 2K (native), the result is applied and recorded, then an upscale job of that entry
    starts by itself. The dev venv's worker has no upscale model (none is in the tiny models folder
    and downloads are off), so it ends with weights_missing: the 2K world stays, the panel says why."""
    harness.reset_scene()
    harness.user_world()
    scene = bpy.context.scene
    settings = scene.dit360
    settings.size, settings.refine = "4K", False
    out = Path(CFG["work"]) / "chain"
    result = bpy.ops.dit360.generate(
        prompt="This is a panorama image. A chain test",
        seed=5,
        steps=1,
        width=128,
        height=64,
        output_dir=str(out),
    )
    pump = sys.modules[f"{harness.MODULE}.blender.pump"].PUMP
    entry = settings.history[0]
    data["result"] = sorted(result)
    data["entry"] = {
        "size": entry.size, "sizes": [[s.width, s.height] for s in entry.sizes],
        "file": str(Path(bpy.path.abspath(entry.filepath)).resolve()), "prompt": entry.prompt, "seed": entry.seed,
    }  # fmt: skip
    job = pump.job
    data["upscale"] = {k: job.params.get(k) for k in ("source", "size", "refine", "prompt", "seed")}
    data["upscale_error"] = [job.error.code, job.error.message] if job.error else None
    data["world"] = shown()
    data["panel_error"] = bpy.context.window_manager.dit360.error_code
    data["panel_message"] = bpy.context.window_manager.dit360.error_message
    settings.size = "NATIVE"


def step_chain_8k(data: dict) -> None:
    """Resolution 8K end to end with a worker that can upscale (CFG["sr"]: the super-resolution
    venv's Python and a models folder holding the tiny models and a tiny x4 model as the default
    RealESRGAN_x4plus.pth): the 2K world, then its 8K upscale in the same History entry, and the
    World showing the 8K EXR."""
    sr = CFG.get("sr")
    if not sr:
        data["skipped"] = True
        return
    bpy.ops.dit360.stop_worker()
    harness.configure(sr["models"], sr["python"])
    harness.reset_scene()
    harness.user_world()
    settings = bpy.context.scene.dit360
    settings.size, settings.refine = "8K", False
    result = bpy.ops.dit360.generate(
        prompt="This is a panorama image. An 8K chain test", seed=9, steps=1, width=512, height=256,
        output_dir=str(Path(CFG["work"]) / "chain8k"),
    )  # fmt: skip
    pump = sys.modules[f"{harness.MODULE}.blender.pump"].PUMP
    entry = settings.history[0]
    data["result"] = sorted(result)
    data["sizes"] = [[s.width, s.height] for s in entry.sizes]
    data["files"] = [str(Path(bpy.path.abspath(s.filepath)).resolve()) for s in entry.sizes]
    data["entry_file"] = str(Path(bpy.path.abspath(entry.filepath)).resolve())
    data["upscale_error"] = [pump.job.error.code, pump.job.error.message] if pump.job.error else None
    data["world"] = shown()
    settings.size = "NATIVE"


ORDER = [
    ("install", step_install),
    ("panel", step_panel),
    ("upscale", step_upscale),
    ("reapply", step_reapply),
    ("native_in_result", step_native_in_result),
    ("upscale_button", step_upscale_button),
    ("chain", step_chain),
    ("chain_8k", step_chain_8k),
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
