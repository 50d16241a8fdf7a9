"""The worker end to end, through the real client: a subprocess, a loopback socket, the tiny model.

One worker serves the whole module (started by the first test), as in Blender between jobs.
"""

from __future__ import annotations

import base64
import io
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dit360_blender.client import Job, JobError, WorkerClient
from dit360_blender.pipeline.image_io import read_png_metadata
from dit360_blender.protocol import ProtocolError, check_analysis

HF_SECRET = "hf_TESTsecretTOKEN0123456789abcdefXYZ"
PROMPT = "This is a panorama. A quiet harbour at dawn, boats, mist over the water."
W, H = 128, 64


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    logs = tmp_path_factory.mktemp("worker-logs")
    # The HF token is set on the shared worker so every event of the module can be checked for it.
    c = WorkerClient(log_dir=logs, hf_token=HF_SECRET, extra_env={"HF_HUB_OFFLINE": "1"})
    c.seen = []  # every event any test received
    yield c
    c.close()


@pytest.fixture
def job(tiny_models, tmp_path):
    def make(**over) -> Job:
        fields = dict(
            prompt=PROMPT, output_dir=tmp_path / "out", seed=1234, steps=3, width=W, height=H,
            device="cpu", dtype="fp32", models_dir=tiny_models["root"],
        )  # fmt: skip
        fields.update(over)
        return Job(**fields)

    return make


def run(client, job, timeout=120):
    events = []
    try:
        result = client.run(job, on_event=events.append, timeout=timeout)
    finally:
        client.seen.extend(events)
    return result, events


def run_error(client, job, timeout=120):
    events = []
    with pytest.raises(JobError) as info:
        client.run(job, on_event=events.append, timeout=timeout)
    client.seen.extend(events)
    return info.value, events


def wait_for(client, predicate, timeout=60.0):
    """Poll like the Blender timer does until an event matches; returns (event, all events)."""
    seen = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for ev in client.poll():
            seen.append(ev)
            client.seen.append(ev)
            if predicate(ev):
                return ev, seen
        time.sleep(0.01)
    raise AssertionError(f"no matching event within {timeout} s; saw {[e['type'] for e in seen]}")


# -- one job end to end ----------------------------------------------------------------------------


def test_job_end_to_end_matches_the_in_process_pipeline(client, job, tiny_paths):
    steps = 5
    result, events = run(client, job(steps=steps, preview_every=2))
    types = [e["type"] for e in events]
    assert types[0] == "ready" and events[0]["protocol"] == 1 and events[0]["pid"] == client.worker_pid
    # `ready` comes before torch is loaded; the `device` event follows, before any job runs
    assert types.count("device") == 1 and types.index("device") < types.index("progress")
    device = events[types.index("device")]
    assert device["device"] == "cpu" and device["free_vram"] is None and device["torch_version"]
    assert "device" not in events[0]  # the client said hello long before torch had loaded
    assert client.ready_info["device"] == "cpu" and client.ready_info["pid"] == client.worker_pid
    assert types[-1] == "result"

    progress = [e for e in events if e["type"] == "progress"]
    stages = [p["stage"] for p in progress]
    assert stages == ["loading", "encoding", "sampling"] + ["sampling"] * steps + ["decoding", "saving"]
    sampled = [p["step"] for p in progress if p["stage"] == "sampling"]
    assert sampled == list(range(steps + 1))  # every step, in order
    assert all(p["total"] == steps for p in progress)
    elapsed = [p["elapsed"] for p in progress]
    assert elapsed == sorted(elapsed)
    assert progress[-3]["eta"] == pytest.approx(0, abs=5)  # the ETA after the last step: decode + save

    previews = [e for e in events if e["type"] == "preview"]
    assert [p["step"] for p in previews] == [2, 4, 5]
    # rendered beside the sampling loop, but all sent before the job's next stage
    decoding = next(i for i, e in enumerate(events) if e.get("stage") == "decoding")
    assert max(i for i, e in enumerate(events) if e["type"] == "preview") < decoding
    for p in previews:
        with Image.open(io.BytesIO(base64.b64decode(p["data"]))) as im:
            assert im.format == "PNG" and im.size == (p["width"], p["height"])
            assert im.size[0] <= 512 and im.size[1] <= 256

    assert result["model_cached"] is False
    path = Path(result["path"])
    assert (
        path.parent == Path(job().output_dir)
        and path.name == "a-quiet-harbour-at-dawn-boats-mist-over-the_1234.png"
    )
    meta = read_png_metadata(path)
    assert meta["prompt"] == PROMPT and meta["seed"] == 1234 and meta["steps"] == steps
    assert set(result["timings"]) >= {"load_s", "encode_s", "sample_s", "decode_s", "save_s", "total_s"}
    # a first job's load, part by part (the text encoders load beside the transformer), within load_s
    parts = {"load_transformer_s", "load_vae_s", "load_text_encoders_s", "load_text_encoders_wait_s"}
    assert parts <= set(result["timings"])
    assert (
        result["timings"]["load_transformer_s"] + result["timings"]["load_vae_s"]
        <= result["timings"]["load_s"]
    )
    assert "memory" not in result  # the CPU has no allocator counters: reported on CUDA only
    check_analysis(result["metadata"])  # the analysis the add-on reads follows the protocol's schema
    assert {"seam", "lighting"} <= set(result["metadata"]) and meta["seam"] == result["metadata"]["seam"]

    from dit360_blender.pipeline.dit360 import DiT360Pipeline, GenerateRequest

    pipe = DiT360Pipeline.load(tiny_paths, device="cpu", dtype="fp32")
    expected = (
        pipe.generate(GenerateRequest(PROMPT, seed=1234, steps=steps, width=W, height=H)).to_uint8().numpy()
    )
    with Image.open(path) as im:
        got = np.asarray(im.convert("RGB"))
    assert got.shape == expected.shape == (H, W, 3)
    assert np.array_equal(got, expected), np.abs(got.astype(int) - expected).max()


def test_same_models_load_nothing_the_second_time(client, job):
    result, events = run(client, job(steps=2))
    assert result["model_cached"] is True
    assert "loading" not in [e.get("stage") for e in events]
    assert client.status()["loads"] == 1


def test_jobs_queue_in_order(client, job):
    ids = [client.submit(job(steps=2, seed=s, preview_every=0)) for s in range(3)]
    finished = []
    queued = {}
    deadline = time.monotonic() + 120
    while len(finished) < 3 and time.monotonic() < deadline:
        for ev in client.poll():
            client.seen.append(ev)
            if ev["type"] == "queued":
                queued[ev["job_id"]] = ev["position"]
            if ev["type"] in ("result", "error"):
                assert ev["type"] == "result", ev
                finished.append(ev["job_id"])
        time.sleep(0.01)
    assert finished == ids
    assert [queued[i] for i in ids] == [0, 1, 2]


# -- cancel ----------------------------------------------------------------------------------------


def test_cancel_mid_sampling_stops_within_one_step(client, job):
    out = Path(job().output_dir)
    job_id = client.submit(job(steps=60, preview_every=0, filename="cancelled"))
    wait_for(client, lambda e: e.get("job_id") == job_id and e["type"] == "progress" and e["step"] >= 2)
    t0 = time.monotonic()
    assert client.cancel(job_id)
    final, seen = wait_for(client, lambda e: e.get("job_id") == job_id and e["type"] in ("result", "error"))
    latency = time.monotonic() - t0
    assert final["type"] == "error" and final["code"] == "cancelled"
    details = final["details"]
    assert details["step"] - details["cancel_step"] <= 1, details  # stopped within one sampling step
    assert details["step"] < 60
    last_step = max(e["step"] for e in seen if e["type"] == "progress")
    assert last_step == details["step"]
    assert not (out / "cancelled.png").exists()
    print(f"\ncancel latency {latency * 1000:.0f} ms (steps {details['cancel_step']} -> {details['step']})")
    # the next job runs normally
    result, _ = run(client, job(steps=2))
    assert Path(result["path"]).is_file()


def test_cancel_a_queued_job_removes_it(client, job):
    first = client.submit(job(steps=40, preview_every=0))
    second = client.submit(job(steps=2, preview_every=0))
    wait_for(client, lambda e: e.get("job_id") == second and e["type"] == "queued")
    assert client.cancel(second)
    ev, _ = wait_for(client, lambda e: e.get("job_id") == second and e["type"] in ("result", "error"))
    assert ev["code"] == "cancelled" and ev["details"]["step"] == 0
    client.cancel(first)
    ev, _ = wait_for(client, lambda e: e.get("job_id") == first and e["type"] in ("result", "error"))
    assert ev["code"] == "cancelled"
    assert client.cancel("0123456789abcdef") is False  # unknown: nothing to do


# -- errors the worker survives ------------------------------------------------------------------


def test_bad_parameters_are_refused_and_the_worker_keeps_serving(client, job):
    # the parameter table is checked before anything is sent (the worker checks again on arrival:
    # tests/test_worker_protocol.py sends bad params past the client)
    with pytest.raises(ProtocolError) as info:
        client.submit(job(width=100, height=50))
    err = info.value
    assert err.code == "bad_parameters" and "multiple of 16" in err.message and err.hint
    with pytest.raises(ProtocolError) as info:
        client.submit(job(width=256, height=256))
    assert info.value.code == "bad_parameters" and "2:1" in info.value.message
    result, _ = run(client, job(steps=1))
    assert result["type"] == "result"


def test_missing_weights_say_what_to_do(client, job, tmp_path):
    pid = client.worker_pid
    err, _ = run_error(client, job(models_dir=tmp_path / "empty-models"))
    assert err.code == "weights_missing" and "download" in err.hint.lower()
    err, _ = run_error(client, job(models_dir=tmp_path / "empty-models", allow_download=True))
    assert err.code == "download_failed" and err.hint  # HF_HUB_OFFLINE=1 in this worker
    assert client.worker_pid == pid


def test_unwritable_output_folder_fails_early_with_the_fix(client, job, tmp_path):
    (tmp_path / "afile").write_text("a file where a folder should be")
    t0 = time.monotonic()
    err, events = run_error(client, job(output_dir=tmp_path / "afile" / "out", steps=50))
    assert err.code == "disk_write_failed" and "output folder" in err.hint
    assert not any(e["type"] == "progress" and e["stage"] == "sampling" for e in events)  # before any work
    assert time.monotonic() - t0 < 10
    assert (tmp_path / "afile").read_text() == "a file where a folder should be"


def test_failed_save_leaves_nothing_half_written(client, job, tmp_path):
    out = tmp_path / "out2"
    (out / "taken.png").mkdir(parents=True)  # a folder where the image should go: the rename fails
    err, _ = run_error(client, job(output_dir=out, filename="taken", steps=1))
    assert err.code == "disk_write_failed" and err.hint
    assert sorted(p.name for p in out.iterdir()) == ["taken.png"]  # no .partial-* left
    assert list((out / "taken.png").iterdir()) == []


def test_a_filename_that_escapes_is_refused_before_sending(client, job):
    from dit360_blender.protocol import ProtocolError

    with pytest.raises(ProtocolError):
        client.submit(job(filename="../../etc/evil"))


# -- memory over many jobs -------------------------------------------------------------------------


def test_twenty_jobs_load_once_and_do_not_grow(client, job):
    rss = {}
    for i in range(1, 21):
        result, _ = run(client, job(steps=1, seed=i, preview_every=1))
        assert result["model_cached"] is True
        if i in (2, 20):
            rss[i] = client.status()["rss_bytes"]
    status = client.status()
    deadline = time.monotonic() + 5
    while status["running"] is not None and time.monotonic() < deadline:  # the result is sent just
        time.sleep(0.05)  # before the worker marks the job done; on a loaded machine status can land between
        status = client.status()
    assert status["loads"] == 1 and status["running"] is None and status["queued"] == []
    growth = rss[20] / rss[2] - 1
    print(
        f"\nRSS after job 2: {rss[2] / 2**20:.1f} MiB, after job 20: {rss[20] / 2**20:.1f} MiB ({growth:+.1%})"
    )
    assert abs(growth) <= 0.10


# -- secrets ---------------------------------------------------------------------------------------


def test_hf_token_never_appears_in_events_logs_or_argv(client):
    assert client.seen, "the tests above ran jobs through this worker"
    assert HF_SECRET not in repr(client.seen)
    log = client.log_path.read_text(encoding="utf-8")
    assert "job" in log and HF_SECRET not in log
    with open(f"/proc/{client.worker_pid}/cmdline", "rb") as f:
        argv = f.read().decode()
    assert HF_SECRET not in argv and "TOKEN" not in argv
    with open(f"/proc/{client.worker_pid}/environ", "rb") as f:
        env = dict(kv.split("=", 1) for kv in f.read().decode().split("\0") if "=" in kv)
    assert env["HF_TOKEN"] == HF_SECRET  # it travels in the environment only
