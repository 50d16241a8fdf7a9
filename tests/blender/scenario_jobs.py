"""A job's life next to what an artist does meanwhile, in real Blender (bpy), in one process: scenes that
share a World or have their own, renames and undo mid-job, how soon the timer reacts, a worker that
fails to start or dies (what the panel says, what is left open), disabling the add-on mid-job.

    python tests/blender/scenario_jobs.py CONFIG.json      (CONFIG: see tests/test_blender_jobs.py)

Writes CONFIG["out"]: {step: {"ok", "error", "data", "seconds"}}; the pytest module asserts on it.
"""

from __future__ import annotations

import gc
import json
import os
import signal
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402  (sets BLENDER_USER_RESOURCES before bpy)

USER_RESOURCES = harness.USER_RESOURCES  # Blender's user folders for this run (a temporary one)

import bpy  # noqa: E402

CFG = json.loads(Path(sys.argv[1]).read_text(encoding="utf-8"))
PROMPT = "This is a panorama image. A red desert canyon under a pale sky"
SMALL = {"width": 128, "height": 64}
TIMERS = harness.FakeTimers()
steps = harness.Steps(CFG["out"])


def mod(name: str):
    return sys.modules[f"{harness.MODULE}.blender.{name}"]


def pump():
    return mod("pump").PUMP


def describe(world) -> dict:
    return mod("world").describe(world)


def job_done() -> bool:
    return pump().job is not None and pump().job.done


def preview_seen() -> bool:
    job = pump().job
    return job is not None and (job.done or "preview" in job.events)


def run_until(predicate, timeout: float = 180.0) -> None:
    TIMERS.pump(predicate, timeout=timeout)


def suns(scene) -> list[str]:
    return sorted(o.name for o in scene.objects if o.get("dit360_role") == "sun")


def event(name: str) -> dict:
    return json.loads(Path(CFG["results"][name]["event"]).read_text(encoding="utf-8"))


def generate(**kwargs) -> None:
    args = {"prompt": PROMPT, "wait": False, **SMALL, **kwargs}
    result = bpy.ops.dit360.generate(**args)
    assert result == {"FINISHED"}, result


def stop_worker() -> None:
    """No worker (and none closing): the next job starts a fresh one."""
    link = pump().link
    link.stop()
    run_until(lambda: not link.worker_running and not link.closing, timeout=60)


# -- steps ------------------------------------------------------------------------------------------


def step_install(data: dict) -> None:
    harness.install_zip(CFG["zip"])
    harness.configure(CFG["models"], CFG.get("worker_python"))
    data["torch_loaded"] = "torch" in sys.modules


def step_shared_world(data: dict) -> None:
    """Two scenes share the World a result goes into: each gets the Sun (defect 4)."""
    harness.reset_scene()
    world = harness.user_world()
    other = bpy.data.scenes.new("Shot 2")
    other.world = world
    scene = bpy.context.scene
    mod("results").apply_result(scene, event("A"), CFG["results"]["A"]["params"])
    data["suns"] = {s.name: suns(s) for s in (scene, other)}
    data["worlds"] = {s.name: s.world.name for s in (scene, other)}
    world.dit360.use_sun = False  # the toggle: both scenes lose the lamp (the sun is in the map now)
    data["suns_off"] = {s.name: suns(s) for s in (scene, other)}
    world.dit360.use_sun = True
    data["suns_on"] = {s.name: suns(s) for s in (scene, other)}


def step_separate_worlds(data: dict) -> None:
    """Two scenes with their own Worlds: a job in one never touches the other."""
    harness.reset_scene()
    scene = bpy.context.scene
    world_a = harness.user_world("World A")
    scene_b = bpy.data.scenes.new("Scene B")
    bpy.context.window.scene = scene_b
    world_b = harness.user_world("World B")  # the user's own nodes in B's World too
    bpy.context.window.scene = scene
    before_b = describe(world_b)
    seen_b = set()
    generate(seed=21, steps=2)
    TIMERS.pump(
        job_done, timeout=180, on_tick=lambda: seen_b.add(scene_b.world.name if scene_b.world else None)
    )
    data["error"] = None if pump().job.error is None else pump().job.error.code
    data["b_seen"] = sorted(w or "" for w in seen_b)
    data["b_world"] = scene_b.world.name
    data["b_unchanged"] = describe(scene_b.world) == before_b
    data["b_suns"] = suns(scene_b)
    data["a_world"] = scene.world.name
    data["a_has_chain"] = mod("world").has_chain(world_a)
    data["worlds"] = sorted(w.name for w in bpy.data.worlds)


def step_renames(data: dict) -> None:
    """Renaming the user's World and the preview World mid-job (defect 5)."""
    harness.reset_scene()
    world = harness.user_world()
    before = describe(world)
    generate(seed=31, steps=400)
    run_until(preview_seen)
    scene = bpy.context.scene
    data["preview_world"] = scene.world.name
    world.name = "Renamed By User"
    scene.world.name = "My Preview Now"
    shown = pump().job.previews_shown
    run_until(lambda: pump().job.previews_shown > shown or job_done())
    data["worlds_mid_job"] = sorted(w.name for w in bpy.data.worlds)
    bpy.ops.dit360.cancel()
    run_until(job_done)
    data["cancelled"] = pump().job.error is not None and pump().job.error.code == "cancelled"
    data["worlds_after_cancel"] = sorted(w.name for w in bpy.data.worlds)
    data["scene_world_after_cancel"] = scene.world.name if scene.world else None
    after = describe(bpy.data.worlds["Renamed By User"])
    data["unchanged_but_name"] = {k: v for k, v in after.items() if k != "world"} == {
        k: v for k, v in before.items() if k != "world"
    }
    # a job that succeeds after its World was renamed: the result goes into that World
    generate(seed=32, steps=3)
    run_until(preview_seen)
    bpy.data.worlds["Renamed By User"].name = "Renamed Again"
    run_until(job_done)
    job = pump().job
    data["error"] = None if job.error is None else [job.error.code, job.error.message]
    data["worlds_after_result"] = sorted(w.name for w in bpy.data.worlds)
    data["scene_world_after_result"] = scene.world.name if scene.world else None
    data["result_in_renamed"] = mod("world").has_chain(bpy.data.worlds.get("Renamed Again"))
    data["fake_user"] = bpy.data.worlds["Renamed Again"].use_fake_user


def step_undo_mid_job(data: dict) -> None:
    """Ctrl+Z while a job runs: no crash, no preview World left behind, the job still ends cleanly."""
    harness.reset_scene()
    world = harness.user_world()
    bpy.ops.ed.undo_push(message="Original")
    before = describe(world)
    generate(seed=41, steps=400)
    bpy.ops.ed.undo_push(message="Generate World")  # the operator's own step, as the UI makes it
    run_until(preview_seen)
    data["undo"] = sorted(bpy.ops.ed.undo())
    data["worlds_after_undo"] = sorted(w.name for w in bpy.data.worlds)
    shown = pump().job.previews_shown
    run_until(lambda: pump().job.previews_shown > shown or job_done())
    data["previews_after_undo"] = pump().job.previews_shown - shown
    data["scene_world_mid_job"] = bpy.context.scene.world.name
    bpy.ops.dit360.cancel()
    run_until(job_done)
    data["cancelled"] = pump().job.error is not None and pump().job.error.code == "cancelled"
    data["worlds"] = sorted(w.name for w in bpy.data.worlds)
    data["images"] = sorted(i.name for i in bpy.data.images)
    data["scene_world"] = bpy.context.scene.world.name
    data["world_unchanged"] = describe(bpy.data.worlds["UserWorld"]) == before
    data["fake_user"] = bpy.data.worlds["UserWorld"].use_fake_user
    generate(seed=42, steps=1)
    run_until(job_done)
    data["next_job_ok"] = pump().job.error is None


def _first_tick_after(t0: float, calls: int, timeout: float = 5.0) -> float:
    """Drive the timers as Blender does (run what is due, else wait a little) until the pump has run
    once more; the seconds from `t0`."""
    deadline = time.monotonic() + timeout
    while TIMERS.calls == calls:
        if time.monotonic() > deadline:
            return timeout
        TIMERS.run_due()
        time.sleep(0.002)
    return time.monotonic() - t0


def step_timer_latency(data: dict) -> None:
    """Generate and Cancel while the pump idles at its slow cadence (a worker is up, the idle stop is
    on): the pump runs again within 0.1 s (defect 6); idle, it stays slow."""
    harness.reset_scene()
    harness.user_world()
    link = pump().link
    harness.addon_prefs().idle_minutes = 1
    link.ensure_client().start()
    mod("pump").ensure_timer()
    calls = TIMERS.calls
    _first_tick_after(time.monotonic(), calls)  # the pump ran: it now waits its idle interval
    data["idle_interval"] = min(due for due in TIMERS.due.values()) - time.monotonic()
    calls = TIMERS.calls
    t0 = time.monotonic()
    generate(seed=51, steps=400)
    data["generate_to_tick_s"] = _first_tick_after(t0, calls)
    run_until(preview_seen)
    calls = TIMERS.calls
    t0 = time.monotonic()
    bpy.ops.dit360.cancel()
    data["cancel_to_tick_s"] = _first_tick_after(t0, calls)
    run_until(job_done)
    # idle again: how often does the pump run in 3 s?
    TIMERS.run_due()
    calls = TIMERS.calls
    t_end = time.monotonic() + 3.0
    while time.monotonic() < t_end:
        TIMERS.run_due()
        time.sleep(0.01)
    data["idle_ticks_in_3s"] = TIMERS.calls - calls
    harness.addon_prefs().idle_minutes = 0


def _socket_fds() -> int:
    """The sockets this process has open (Linux: /proc/self/fd)."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{fd}").startswith("socket:")
        except OSError:
            pass
    return count


class Recorder:
    """Stands in for a UILayout: records labels, and operators with the properties set on them."""

    def __init__(self, log: list) -> None:
        object.__setattr__(self, "_log", log)

    def __getattr__(self, name):
        def call(*args, **kwargs):
            entry = {
                "call": name,
                "text": kwargs.get("text"),
                "args": [a for a in args if isinstance(a, str)],
            }
            self._log.append(entry)
            return _Props(entry) if name == "operator" else Recorder(self._log)

        return call

    def __setattr__(self, name, value):
        pass


class _Props:
    def __init__(self, entry: dict) -> None:
        object.__setattr__(self, "_entry", entry)

    def __setattr__(self, name, value):
        self._entry.setdefault("props", {})[name] = value


def draw_main_panel() -> list:
    log: list = []
    panels = mod("panels")
    panels.DIT360_PT_main.draw(type("P", (), {"layout": Recorder(log)})(), bpy.context)
    return log


def step_start_failure(data: dict) -> None:
    """A worker Python without torch: the panel shows the cause and the log button (defect 7); no
    socket is left open (defect 8)."""
    harness.reset_scene()
    harness.user_world()
    stop_worker()
    gc.collect()
    data["sockets_before"] = _socket_fds()
    harness.addon_prefs().python_path = CFG["python_without_torch"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        generate(seed=61, steps=2)
        run_until(job_done, timeout=120)
        gc.collect()
        data["sockets_after"] = _socket_fds()
    data["resource_warnings"] = [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]
    s = bpy.context.window_manager.dit360
    data["error"] = {"code": s.error_code, "message": s.error_message, "hint": s.error_hint}
    log = draw_main_panel()
    data["labels"] = [e["text"] for e in log if e["call"] == "label" and e["text"]]
    data["operators"] = [{"id": e["args"][0] if e["args"] else None, "text": e["text"], "props": e.get("props", {})}
                         for e in log if e["call"] == "operator"]  # fmt: skip
    logs = [o["props"]["filepath"] for o in data["operators"] if o["id"] == "wm.path_open"]
    data["log_text"] = Path(logs[0]).read_text(encoding="utf-8", errors="replace")[-6000:] if logs else ""
    harness.addon_prefs().python_path = CFG.get("worker_python") or sys.executable
    bpy.ops.dit360.clear_error()


def step_worker_died(data: dict) -> None:
    """The worker is killed mid-job: the message says so, without its progress bars (defect 8)."""
    harness.reset_scene()
    harness.user_world()
    stop_worker()
    generate(seed=71, steps=400)
    run_until(preview_seen)
    os.kill(pump().link.client.worker_pid, signal.SIGKILL)
    run_until(job_done)
    err = pump().job.error
    data["code"] = err.code if err else None
    data["message"] = err.message if err else ""


def step_warm_on_open(data: dict) -> None:
    """Preference "Load the Model When the Panel Opens": the panel's draw schedules a warm job once
    the checks say the packages are there; it loads the model in the worker without touching the
    scene (the seed stays), once per settings; the Generate after it loads nothing."""
    harness.reset_scene()
    stop_worker()
    panels, preferences, state = mod("panels"), mod("common").prefs(), mod("common").runtime()
    scene = bpy.context.scene
    scene.dit360.randomize_seed, scene.dit360.seed = True, 4242
    scene.dit360.prompt = ""
    preferences.warm_on_open = False
    panels.schedule_warm()
    data["scheduled_when_off"] = TIMERS.is_registered(panels._warm_after_draw)
    preferences.warm_on_open = True
    mod("prefs").schedule_checks()
    checking = ("UNKNOWN", "CHECKING")
    run_until(lambda: state.deps_state not in checking and state.models_state not in checking, timeout=120)
    data["checks"] = [state.deps_state, state.models_state]
    panels.schedule_warm()
    data["scheduled"] = TIMERS.is_registered(panels._warm_after_draw)
    run_until(lambda: not TIMERS.is_registered(panels._warm_after_draw))
    data["warm_started"] = pump().warm_id is not None
    data["info_while_warming"] = state.worker_info
    run_until(lambda: pump().warm_id is None, timeout=180)
    data["info"] = state.worker_info
    data["seed"], data["prompt"] = scene.dit360.seed, scene.dit360.prompt
    data["again"] = pump().warm(scene)  # the same settings: not twice
    data["loads_after_warm"] = pump().link.client.status()["loads"]
    generate(seed=5, steps=2)
    run_until(job_done)
    data["generate_error"] = pump().job.error.code if pump().job.error else None
    data["loads_after_generate"] = pump().link.client.status()["loads"]
    preferences.warm_on_open = False


def step_disable_mid_job(data: dict) -> None:
    """Disabling the add-on mid-job: the worker stops, the World is the user's again, nothing of the
    preview stays, the fake user is gone."""
    harness.reset_scene()
    world = harness.user_world()
    before = describe(world)
    generate(seed=81, steps=400)
    run_until(preview_seen)
    pid = pump().link.client.worker_pid
    data["fake_user_mid_job"] = bpy.data.worlds["UserWorld"].use_fake_user
    bpy.ops.preferences.addon_disable(module=harness.MODULE)
    time.sleep(0.5)
    try:
        data["worker_alive"] = os.waitpid(pid, os.WNOHANG) == (0, 0)
    except ChildProcessError:
        data["worker_alive"] = False
    data["worlds"] = sorted(w.name for w in bpy.data.worlds)
    data["images"] = sorted(i.name for i in bpy.data.images)
    data["scene_world"] = bpy.context.scene.world.name if bpy.context.scene.world else None
    data["world_unchanged"] = describe(bpy.data.worlds["UserWorld"]) == before
    data["fake_user"] = bpy.data.worlds["UserWorld"].use_fake_user
    data["timers_left"] = [getattr(f, "__module__", "") for f in TIMERS.due]


ORDER = [
    ("install", step_install),
    ("shared_world", step_shared_world),
    ("separate_worlds", step_separate_worlds),
    ("renames", step_renames),
    ("undo_mid_job", step_undo_mid_job),
    ("timer_latency", step_timer_latency),
    ("start_failure", step_start_failure),
    ("worker_died", step_worker_died),
    ("warm_on_open", step_warm_on_open),
    ("disable_mid_job", step_disable_mid_job),
]

if __name__ == "__main__":
    only = set(CFG.get("only") or [])
    for name, fn in ORDER:
        if only and name not in only and name != "install":
            continue
        if name != "install" and not steps.results.get("install", {}).get("ok"):
            steps.results[name] = {"ok": False, "error": "install failed", "data": {}, "seconds": 0}
            continue
        steps.run(name, fn)
    for fn in list(TIMERS.due):  # leave no timer behind: bpy 4.5 can hang at exit with one registered
        TIMERS.unregister(fn)
    bpy.app.timers.register, bpy.app.timers.unregister, bpy.app.timers.is_registered = TIMERS._real
    steps.save()
    sys.stdout.flush()
    os._exit(0)  # skip Blender's atexit add-on teardown (already done) and its slow exit
