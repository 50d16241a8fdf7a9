"""Worker: Remote in real Blender (issue 16): a serving worker in a process of its own (its own
folder tree, reached through a TCP forwarder standing in for the SSH tunnel), the add-on's
preferences pointing at it; tests/blender/scenario_remote.py runs a job and a cancel in bpy."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest
from tcp_forwarder import Forwarder
from test_blender_extension import build_zip, run_scenario
from test_remote_worker import start_remote

pytestmark = pytest.mark.skipif(importlib.util.find_spec("bpy") is None, reason="needs the bpy module")


@pytest.fixture(scope="module")
def scenario(tiny_models, tmp_path_factory) -> dict:
    work = tmp_path_factory.mktemp("blender-remote")
    remote = start_remote(tmp_path_factory.mktemp("remote-machine"), Path(tiny_models["root"]))
    fwd = Forwarder(remote.port)
    token = work / "gpu-box.token"
    shutil.copy(remote.token_file, token)
    token.chmod(0o600)
    try:
        cfg = {
            "zip": str(build_zip(work / "dist")), "models": str(tiny_models["root"]), "work": str(work),
            "port": fwd.port, "token_file": str(token),
        }  # fmt: skip
        results = run_scenario("scenario_remote.py", cfg, "remote", timeout=600)
        results["_remote"] = {
            "log": remote.log,
            "tree": str(remote.tree),
            "alive": remote.proc.poll() is None,
        }
        return results
    finally:
        fwd.close()
        remote.proc.terminate()
        remote.proc.wait(10)


def test_the_preferences_offer_local_or_remote_by_ssh_host_or_host_port(scenario):
    record = scenario["install"]
    assert record["ok"], record["error"]
    d = record["data"]
    assert d["drawn_LOCAL"] == ["label: Worker", "prop: worker_mode"]
    props = {mode: [x for x in d[f"drawn_{mode}"] if x.startswith("prop: ")] for mode in ("SSH", "ADDRESS")}
    assert props["SSH"] == [
        "prop: worker_mode", "prop: remote_connection", "prop: remote_ssh_alias", "prop: remote_port",
        "prop: remote_token_file",
    ]  # fmt: skip
    assert props["ADDRESS"] == [
        "prop: worker_mode", "prop: remote_connection", "prop: remote_address", "prop: remote_token_file",
    ]  # fmt: skip
    assert any("--serve" in x for x in d["drawn_SSH"])


def test_a_remote_job_in_blender_shows_progress_previews_and_lands_locally(scenario):
    record = scenario["remote_job"]
    assert record["ok"], record["error"]
    d = record["data"]
    assert d["error"] is None and d["client"] == "RemoteWorkerClient"
    assert {"progress", "preview", "result"} <= set(d["events"]), d["events"]
    assert d["worker_info"].startswith("Remote worker ready: ") and "(cpu" in d["worker_info"]
    tree = scenario["_remote"]["tree"]
    assert d["images"] and all(Path(p).is_file() and not p.startswith(tree) for p in d["images"]), d["images"]
    assert scenario["_remote"]["log"].count(" done in ") == 1


def test_cancel_reaches_the_remote_worker_and_it_serves_on(scenario):
    record = scenario["cancel"]
    assert record["ok"], record["error"]
    assert record["data"]["error"] == "cancelled"
    assert "cancel" in scenario["_remote"]["log"].lower() and scenario["_remote"]["alive"]
