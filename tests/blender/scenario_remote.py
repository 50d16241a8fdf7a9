"""Worker: Remote in real Blender (bpy) with the tiny model (issue 16): the preferences name a
tunnel (host:port) and a token file; a job runs on the "remote" worker (another process with its own
folders, started by tests/test_blender_remote.py behind a TCP forwarder) with the same progress,
previews and cancel as a local one, and its image lands in the add-on's own output folder.

    python tests/blender/scenario_remote.py CONFIG.json

Writes CONFIG["out"]: {step: {"ok", "error", "data", "seconds"}}; the pytest module asserts on it.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402, I001  (sets BLENDER_USER_RESOURCES before bpy)

import bpy  # noqa: E402

CFG = json.loads(Path(sys.argv[1]).read_text(encoding="utf-8"))
TIMERS = harness.FakeTimers()
steps = harness.Steps(CFG["out"])


def pump():
    return sys.modules[f"{harness.MODULE}.blender.pump"].PUMP


def job_done() -> bool:
    return pump().job is not None and pump().job.done


def preview_seen() -> bool:
    job = pump().job
    return job is not None and (job.done or "preview" in job.events)


def generate(**kwargs) -> None:
    args = {"prompt": "This is a panorama image. A quarry lake", "wait": False, "width": 64, "height": 32}
    result = bpy.ops.dit360.generate(**args, **kwargs)
    assert result == {"FINISHED"}, result


class Layout:
    """Stands in for a UILayout while the preferences draw: records the properties and labels."""

    def __init__(self, drawn: list) -> None:
        object.__setattr__(self, "_drawn", drawn)

    def __getattr__(self, name):
        def call(*args, **kwargs):
            if name == "prop":
                self._drawn.append("prop: " + args[1])
            elif name == "label":
                self._drawn.append("label: " + kwargs.get("text", ""))
            return Layout(self._drawn)

        return call

    def __setattr__(self, name, value):
        pass


def step_install(data: dict) -> None:
    harness.install_zip(CFG["zip"])
    harness.configure(CFG["models"])
    p = harness.addon_prefs()
    p.worker_mode = "REMOTE"
    p.remote_connection = "ADDRESS"
    p.remote_address = f"127.0.0.1:{CFG['port']}"
    p.remote_token_file = CFG["token_file"]
    p.preview_every = 1
    p.python_path = "/nonexistent/python"  # a remote worker needs no local Python
    p.models_dir = "/nonexistent/models"  # nor local models
    remote_prefs = sys.modules[f"{harness.MODULE}.blender.remote_prefs"]
    for connection in ("SSH", "ADDRESS"):
        p.remote_connection = connection
        drawn: list = []
        remote_prefs.draw(p, Layout(drawn))
        data[f"drawn_{connection}"] = drawn
    p.worker_mode = "LOCAL"
    data["drawn_LOCAL"] = []
    remote_prefs.draw(p, Layout(data["drawn_LOCAL"]))
    p.worker_mode = "REMOTE"


def step_remote_job(data: dict) -> None:
    harness.reset_scene()
    harness.user_world()
    generate(seed=5, steps=3)
    TIMERS.pump(job_done, timeout=240)
    job = pump().job
    data["error"] = None if job.error is None else [job.error.code, job.error.message, job.error.hint]
    data["events"] = sorted(set(job.events))
    data["client"] = type(pump().link.client).__name__
    data["worker_info"] = bpy.context.window_manager.dit360.worker_info
    world = bpy.context.scene.world
    data["images"] = [
        bpy.path.abspath(n.image.filepath)
        for n in world.node_tree.nodes
        if getattr(n, "image", None) is not None and n.image.filepath
    ]


def step_cancel(data: dict) -> None:
    generate(seed=6, steps=400)
    TIMERS.pump(preview_seen, timeout=240)
    t0 = time.monotonic()
    bpy.ops.dit360.cancel()
    TIMERS.pump(job_done, timeout=60)
    data["cancel_s"] = time.monotonic() - t0
    job = pump().job
    data["error"] = None if job.error is None else job.error.code


if __name__ == "__main__":
    steps.run("install", step_install)
    if steps.results["install"]["ok"]:
        steps.run("remote_job", step_remote_job)
        steps.run("cancel", step_cancel)
    pump().link.shutdown()
    for fn in list(TIMERS.due):
        TIMERS.unregister(fn)
    bpy.app.timers.register, bpy.app.timers.unregister, bpy.app.timers.is_registered = TIMERS._real
    steps.save()
    sys.stdout.flush()
    os._exit(0)
