"""A hung worker in real Blender (the bpy module): the panel shows worker_unresponsive with its fix
and a Stop Worker button, the World is the user's again and the next job runs on a fresh worker.
One Blender process runs tests/blender/scenario_unresponsive.py."""

from __future__ import annotations

import importlib.util
import sys

import pytest
from test_blender_extension import build_zip, run_scenario

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("bpy") is None, reason="needs the bpy module"),
    pytest.mark.skipif(sys.platform == "win32", reason="SIGSTOP"),
]


def test_a_hung_worker_is_shown_with_stop_worker_and_the_next_job_runs(tiny_models, tmp_path):
    cfg = {
        "zip": str(build_zip(tmp_path / "dist")),
        "models": str(tiny_models["root"]),
        "work": str(tmp_path),
    }
    results = run_scenario("scenario_unresponsive.py", cfg, "unresponsive", timeout=900)
    record = results["hung_worker"]
    assert record["ok"], record["error"]
    d = record["data"]
    assert d["error"]["code"] == "worker_unresponsive" and "answered nothing for 4 s" in d["error"]["message"]
    assert "again" in d["error"]["hint"] and d["stage"] == "failed"
    assert 4.0 - 0.5 <= d["waited_s"] <= 4.0 + 15, d["waited_s"]
    assert "dit360.stop_worker" in d["operators"] and d["stop_worker"] == ["FINISHED"]
    assert d["world_unchanged"]
    assert d["old_worker_state"] in ("gone", "Z"), d["old_worker_state"]  # not "T" (stopped)
    assert d["next_error"] is None and d["next_pid_differs"]
