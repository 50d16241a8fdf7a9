"""One panorama over two processes, through the real worker and client (device "cpu:2": two gloo
ranks on the CPU, as "cuda:0,1" would be two GPUs).

The worker is rank 0; its second rank is a spawned process. Checked: the job's image equals the
one-process pipeline's, with the same progress and previews; a cancel stops every rank before the
same step; a rank killed mid-job ends the job with `rank_failed` naming it, and the next job starts
a fresh group and gets the right image.
"""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dit360_blender.client import Job, JobError, WorkerClient

PROMPT = "This is a panorama image. A harbour at dawn."
W, H = 64, 32


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    logs = tmp_path_factory.mktemp("rank-logs")
    c = WorkerClient(log_dir=logs, extra_env={"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    c.logs = logs
    yield c
    c.close()


@pytest.fixture(scope="module")
def expected(tiny_paths):
    """The one-process image of the job below (seed 5, 4 steps)."""
    from dit360_blender.pipeline.dit360 import DiT360Pipeline, GenerateRequest

    pipe = DiT360Pipeline.load(tiny_paths, device="cpu", dtype="fp32")
    return pipe.generate(GenerateRequest(PROMPT, seed=5, steps=4, width=W, height=H)).to_uint8().numpy()


@pytest.fixture
def job(tiny_models, tmp_path):
    def make(**over) -> Job:
        fields = dict(
            prompt=PROMPT, output_dir=tmp_path / "out", seed=5, steps=4, width=W, height=H,
            device="cpu:2", dtype="fp32", models_dir=tiny_models["root"], hdr=False,
        )  # fmt: skip
        fields.update(over)
        return Job(**fields)

    return make


def log_text(client) -> str:
    return (Path(client.logs) / "worker.log").read_text(encoding="utf-8", errors="replace")


def wait_for(client, predicate, timeout=90.0):
    seen = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for ev in client.poll():
            seen.append(ev)
            if predicate(ev):
                return ev, seen
        time.sleep(0.01)
    raise AssertionError(f"no matching event within {timeout} s; saw {[e['type'] for e in seen]}")


def pixels(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def assert_same_image(got: np.ndarray, expected: np.ndarray) -> None:
    """fp32 sampling agrees within 1e-5 (test_sequence_parallel); after the VAE and rounding to
    8 bits a pixel may land one step off at most."""
    diff = np.abs(got.astype(int) - expected)
    assert got.shape == expected.shape and diff.max() <= 1, diff.max()
    assert (diff == 0).mean() > 0.99, (diff == 0).mean()


def test_a_two_rank_job_gives_the_one_process_image(client, job, expected):
    events = []
    result = client.run(job(preview_every=2), on_event=events.append, timeout=180)
    assert result["metadata"]["ranks"] == 2 and result["metadata"]["sequence_parallel"] == "ulysses"
    assert result["metadata"]["devices"] == ["cpu", "cpu"]
    assert_same_image(pixels(result["path"]), expected)
    sampled = [e["step"] for e in events if e["type"] == "progress" and e["stage"] == "sampling"]
    assert sampled == [0, 1, 2, 3, 4]
    assert [e["step"] for e in events if e["type"] == "preview"] == [2, 4]
    assert re.search(r"rank 1: finished after 4 steps", log_text(client))


def test_a_cancel_reaches_every_rank(client, job):
    job_id = client.submit(job(steps=400, preview_every=0, filename="cancelled"))
    wait_for(client, lambda e: e.get("job_id") == job_id and e["type"] == "progress" and e["step"] >= 2)
    assert client.cancel(job_id)
    final, _ = wait_for(client, lambda e: e.get("job_id") == job_id and e["type"] in ("result", "error"))
    assert final["type"] == "error" and final["code"] == "cancelled", final
    step = final["details"]["step"]
    assert 2 <= step < 400
    assert f"rank 1: cancelled after {step} steps" in log_text(client)  # the other rank stopped alike


def test_a_killed_rank_ends_the_job_clearly_and_the_next_job_restarts_the_group(client, job, expected):
    job_id = client.submit(job(steps=400, preview_every=0, filename="killed"))
    wait_for(client, lambda e: e.get("job_id") == job_id and e["type"] == "progress" and e["step"] >= 2)
    pid = int(re.findall(r"rank 1 of 2 started \(pid (\d+)\)", log_text(client))[-1])
    os.kill(pid, signal.SIGKILL)
    final, _ = wait_for(client, lambda e: e.get("job_id") == job_id and e["type"] in ("result", "error"))
    assert final["type"] == "error" and final["code"] == "rank_failed", final
    assert f"Rank 1 of 2 (cpu, pid {pid}) was killed (signal 9)" in final["message"], final["message"]
    assert "next job" in final["hint"]
    # the same worker serves on: a fresh group, the right image
    result = client.run(job(filename="after"), timeout=180)
    assert result["model_cached"] is False
    new_pid = int(re.findall(r"rank 1 of 2 started \(pid (\d+)\)", log_text(client))[-1])
    assert new_pid != pid
    assert_same_image(pixels(result["path"]), expected)


def test_a_bad_device_list_is_refused(client, job):
    with pytest.raises(JobError) as info:
        client.run(job(device="cuda:0,0"), timeout=60)
    assert info.value.code in ("device_unavailable", "bad_parameters"), info.value


def test_a_gpus_list_needs_those_gpus(client, job):
    """The preferences' GPUs field folds into the device; this machine has no CUDA GPU."""
    with pytest.raises(JobError) as info:
        client.run(job(device="auto", gpus="0,1"), timeout=60)
    assert info.value.code == "device_unavailable" and "cuda:0,1" in str(info.value), info.value


def test_device_settings_parse_and_refuse():
    from dit360_blender.params import ParamError, check_values
    from dit360_blender.pipeline.errors import DeviceError
    from dit360_blender.worker.ranks import device_spec, rank_devices

    assert rank_devices("cpu:3") == ["cpu"] * 3 and rank_devices("cuda:0") is None
    assert rank_devices("auto") is None and rank_devices("cpu") is None
    assert device_spec("auto", " 0, 1 ") == "cuda:0,1" and device_spec("cuda:1", "") == "cuda:1"
    for bad in (
        lambda: device_spec("cpu", "0,1"),
        lambda: rank_devices("cpu:0"),
        lambda: rank_devices("cuda:2,2"),
    ):
        with pytest.raises(DeviceError):
            bad()
    assert check_values({"device": "cuda:0,1,2,3", "gpus": "0,1,2,3"})["device"] == "cuda:0,1,2,3"
    for bad in ({"device": "cuda:0;1"}, {"device": "cuda:0,"}, {"gpus": "0,x"}, {"gpus": "0,1,"}):
        with pytest.raises(ParamError):
            check_values(bad)
