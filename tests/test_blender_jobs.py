"""A job next to what an artist does meanwhile, in real Blender (the bpy module) with the tiny model
through the real worker: shared and separate Worlds, renames and undo mid-job, how soon the timer
reacts, a worker that cannot start or dies, disabling the add-on mid-job. One Blender process runs
tests/blender/scenario_jobs.py; each test checks one step's record.
"""

from __future__ import annotations

import importlib.util
import re

import pytest
from test_blender_extension import build_zip, python_without_torch, run_scenario
from test_blender_lighting import synthetic_result

pytestmark = pytest.mark.skipif(importlib.util.find_spec("bpy") is None, reason="needs the bpy module")


@pytest.fixture(scope="module")
def jobs(tiny_models, tmp_path_factory) -> dict:
    work = tmp_path_factory.mktemp("blender-jobs")
    folder = work / "synthetic"
    folder.mkdir()
    result = synthetic_result(folder, "A", 1)
    cfg = {
        "zip": str(build_zip(work / "dist")),
        "models": str(tiny_models["root"]),
        "work": str(work),
        "python_without_torch": python_without_torch(),
        "results": {"A": {"event": result["event"], "params": result["params"]}},
    }
    return run_scenario("scenario_jobs.py", cfg, "jobs", timeout=900)


def step(results: dict, name: str) -> dict:
    record = results[name]
    assert record["ok"], f"step {name} failed:\n{record['error']}"
    return record["data"]


def test_every_scene_sharing_the_world_gets_the_sun(jobs):
    d = step(jobs, "shared_world")
    assert d["worlds"] == {"Scene": "UserWorld", "Shot 2": "UserWorld"}
    assert len(d["suns"]["Scene"]) == 1 and len(d["suns"]["Shot 2"]) == 1
    assert d["suns_off"] == {"Scene": [], "Shot 2": []}  # Sun Lamp off: the sun is in the map
    assert len(d["suns_on"]["Scene"]) == 1 and len(d["suns_on"]["Shot 2"]) == 1


def test_a_job_in_one_scene_never_touches_another_scenes_world(jobs):
    d = step(jobs, "separate_worlds")
    assert d["error"] is None
    assert d["b_seen"] == ["World B"] and d["b_world"] == "World B" and d["b_unchanged"]
    assert d["b_suns"] == []
    assert d["a_world"] == "World A" and d["a_has_chain"]
    assert d["worlds"] == ["World A", "World B"]


def test_renaming_either_world_mid_job_loses_nothing(jobs):
    d = step(jobs, "renames")
    assert d["preview_world"] == "DiT360 Preview World"
    assert d["worlds_mid_job"] == ["My Preview Now", "Renamed By User"]  # no second preview World
    assert d["cancelled"] and d["worlds_after_cancel"] == ["Renamed By User"]
    assert d["scene_world_after_cancel"] == "Renamed By User" and d["unchanged_but_name"]
    assert d["error"] is None
    assert d["worlds_after_result"] == ["Renamed Again"]  # no new "World" took the result
    assert d["scene_world_after_result"] == "Renamed Again" and d["result_in_renamed"]
    assert d["fake_user"] is False  # our guard is gone with the job


def test_undo_mid_job_leaves_no_preview_world_and_the_worker_goes_on(jobs):
    d = step(jobs, "undo_mid_job")
    assert d["undo"] == ["FINISHED"]
    assert d["previews_after_undo"] >= 1 and d["scene_world_mid_job"] == "DiT360 Preview World"
    assert d["cancelled"] and d["worlds"] == ["UserWorld"] and "DiT360 Preview" not in d["images"]
    assert d["scene_world"] == "UserWorld" and d["world_unchanged"] and d["fake_user"] is False
    assert d["next_job_ok"]


def test_generate_and_cancel_reach_the_pump_within_an_active_tick(jobs):
    d = step(jobs, "timer_latency")
    assert d["idle_interval"] > 1.0  # the pump was idling at its slow cadence
    print(f"\nGenerate -> first tick {d['generate_to_tick_s'] * 1000:.1f} ms, "
          f"Cancel -> {d['cancel_to_tick_s'] * 1000:.1f} ms, idle ticks in 3 s: {d['idle_ticks_in_3s']}")  # fmt: skip
    # within one active tick (0.1 s) plus the OS's scheduling slack on a loaded 2-core machine (a
    # cancel once took 100.1 ms there), far below the 2 s idle cadence they must not wait for
    assert d["generate_to_tick_s"] <= 0.5
    assert d["cancel_to_tick_s"] <= 0.5
    assert d["idle_ticks_in_3s"] <= 2  # idle, it stays cheap


def test_a_worker_that_cannot_start_shows_its_cause_and_the_log(jobs):
    d = step(jobs, "start_failure")
    assert d["error"]["code"] == "worker_start_failed"
    labels = " ".join(d["labels"])
    assert "No module named 'torch'" in labels  # the cause, not the traceback's first line
    assert "Traceback" not in labels and "tooltip" not in labels
    logs = [o for o in d["operators"] if o["id"] == "wm.path_open"]
    assert len(logs) == 1 and logs[0]["text"] == "Open Worker Log"
    assert "Traceback (most recent call last)" in d["log_text"] and "No module named 'torch'" in d["log_text"]
    assert "dit360.install_dependencies" in [o["id"] for o in d["operators"]]


def test_a_worker_that_fails_after_connecting_leaves_no_socket_open(jobs):
    d = step(jobs, "start_failure")
    assert d["error"]["code"] == "worker_start_failed"  # it failed after the client had connected
    assert d["sockets_after"] <= d["sockets_before"], d
    assert not [w for w in d["resource_warnings"] if "socket" in w], d["resource_warnings"]


def test_a_dead_workers_message_has_no_progress_bars(jobs):
    d = step(jobs, "worker_died")
    assert d["code"] == "worker_died" and "stopped unexpectedly" in d["message"]
    assert "\r" not in d["message"] and not re.search(r"\d+%\|", d["message"]), d["message"]


def test_the_panel_loads_the_model_in_the_background_when_the_preference_says_so(jobs):
    d = step(jobs, "warm_on_open")
    assert d["scheduled_when_off"] is False  # off by default: opening the panel starts nothing
    assert d["checks"] == ["OK", "OK"] and d["scheduled"] is True and d["warm_started"] is True
    assert d["info_while_warming"].startswith("Loading the model in the background")
    assert d["info"].startswith("Model loaded in the background"), d["info"]
    assert (d["seed"], d["prompt"]) == (4242, "")  # the scene is not touched (randomize was on)
    assert d["again"] is False  # once per settings
    assert d["loads_after_warm"] == 1
    assert d["generate_error"] is None and d["loads_after_generate"] == 1  # the Generate loaded nothing


def test_disabling_the_add_on_mid_job_stops_the_worker_and_leaves_the_users_world(jobs):
    d = step(jobs, "disable_mid_job")
    assert d["fake_user_mid_job"] is True  # the waiting World survives a save, autosave or crash
    assert d["worker_alive"] is False
    assert d["worlds"] == ["UserWorld"] and "DiT360 Preview" not in d["images"]
    assert d["scene_world"] == "UserWorld" and d["world_unchanged"] and d["fake_user"] is False
    assert d["timers_left"] == []
