"""A worker that hangs mid-job (SIGSTOP: alive, silent), in real Blender (bpy) with the tiny model:
the panel says so with the fix and offers Stop Worker, the user's World is back, the next job runs.
And a Hugging Face token in the preferences that can't be real is not used, with the reason shown.

    python tests/blender/scenario_unresponsive.py CONFIG.json   (CONFIG: see tests/test_blender_unresponsive.py)

Writes CONFIG["out"]: {step: {"ok", "error", "data", "seconds"}}; the pytest module asserts on it.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402, I001  (sets BLENDER_USER_RESOURCES before bpy)

import bpy  # noqa: E402

CFG = json.loads(Path(sys.argv[1]).read_text(encoding="utf-8"))
HEARTBEAT_S = 4.0  # the add-on's client is told to give up on a silent worker after this
TIMERS = harness.FakeTimers()
steps = harness.Steps(CFG["out"])


def mod(name: str):
    return sys.modules[f"{harness.MODULE}.blender.{name}"]


def pump():
    return mod("pump").PUMP


def job_done() -> bool:
    return pump().job is not None and pump().job.done


def preview_seen() -> bool:
    job = pump().job
    return job is not None and (job.done or "preview" in job.events)


def generate(**kwargs) -> None:
    args = {
        "prompt": "This is a panorama image. A salt flat at noon",
        "wait": False,
        "width": 128,
        "height": 64,
    }
    result = bpy.ops.dit360.generate(**args, **kwargs)
    assert result == {"FINISHED"}, result


class Layout:
    """Stands in for a UILayout while the panel draws: records the operators it offers."""

    def __init__(self, operators: list) -> None:
        object.__setattr__(self, "_operators", operators)

    def __getattr__(self, name):
        def call(*args, **kwargs):
            if name == "operator":
                self._operators.append(args[0])
            elif name == "label":
                self._operators.append("label: " + kwargs.get("text", ""))
            return Layout(self._operators)

        return call

    def __setattr__(self, name, value):
        pass


def step_install(data: dict) -> None:
    harness.install_zip(CFG["zip"])
    harness.configure(CFG["models"], CFG.get("worker_python"))


def step_hung_worker(data: dict) -> None:
    harness.reset_scene()
    world = harness.user_world()
    before = mod("world").describe(world)
    pump().link.ensure_client().heartbeat_timeout = HEARTBEAT_S  # before its worker starts
    generate(seed=5, steps=400)
    TIMERS.pump(preview_seen, timeout=240)
    pid = pump().link.client.worker_pid
    os.kill(pid, signal.SIGSTOP)
    t0 = time.monotonic()
    TIMERS.pump(job_done, timeout=HEARTBEAT_S + 60)
    data["waited_s"] = time.monotonic() - t0
    s = bpy.context.window_manager.dit360
    data["error"] = {"code": s.error_code, "message": s.error_message, "hint": s.error_hint}
    data["stage"] = s.stage
    data["world_unchanged"] = bpy.context.scene.world == world and mod("world").describe(world) == before
    operators: list = []
    mod("panels").DIT360_PT_main.draw(type("P", (), {"layout": Layout(operators)})(), bpy.context)
    data["operators"] = operators
    data["stop_worker"] = sorted(bpy.ops.dit360.stop_worker())
    try:  # the client killed it: gone, or a zombie not reaped yet
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        data["old_worker_state"] = stat[stat.rfind(b")") + 2 : stat.rfind(b")") + 3].decode()
    except FileNotFoundError:
        data["old_worker_state"] = "gone"
    bpy.ops.dit360.clear_error()
    generate(seed=6, steps=1)
    TIMERS.pump(job_done, timeout=240)
    data["next_error"] = None if pump().job.error is None else pump().job.error.code
    data["next_pid_differs"] = pump().link.client.worker_pid != pid


def step_implausible_token(data: dict) -> None:
    """A one-letter 'token' in the preferences: not used (it would be scrubbed out of every message),
    and the Models box says why."""
    prefs = harness.addon_prefs()
    prefs.hf_token = "e"
    data["link_token"] = pump().link.hf_token()
    drawn: list = []
    mod("prefs").DIT360_Preferences._draw_models(prefs, Layout(drawn), bpy.context.window_manager.dit360)
    data["labels"] = [d for d in drawn if d.startswith("label: ")]
    prefs.hf_token = "hf_AbCdEfGhIjKlMnOpQrStUvWxYz01234567"
    data["real_token"] = pump().link.hf_token()
    prefs.hf_token = ""


if __name__ == "__main__":
    steps.run("install", step_install)
    if steps.results["install"]["ok"]:
        steps.run("hung_worker", step_hung_worker)
        steps.run("implausible_token", step_implausible_token)
    pump().link.shutdown()
    for fn in list(TIMERS.due):  # leave no timer behind: bpy 4.5 can hang at exit with one registered
        TIMERS.unregister(fn)
    bpy.app.timers.register, bpy.app.timers.unregister, bpy.app.timers.is_registered = TIMERS._real
    steps.save()
    sys.stdout.flush()
    os._exit(0)  # skip Blender's atexit add-on teardown and its slow exit
