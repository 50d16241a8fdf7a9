"""The real client against a real worker that gets unlucky: jobs that cannot be sent as they are,
and (at the end of the module, since it costs the worker) a worker that hangs.

One client serves the module; its worker is started by the first test, as in Blender.
"""

from __future__ import annotations

import os
import shutil
import signal
import time
from pathlib import Path

import pytest
from PIL import Image
from test_client_lifecycle import gone

from dit360_blender.client import Job, JobError, WorkerClient
from dit360_blender.protocol import FINAL_TYPES, ProtocolError

PROMPT = "This is a panorama. A frozen lake between pines."
HEARTBEAT_S = 6.0  # the module's client gives up on a silent worker after this (default 30 s)


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    logs = tmp_path_factory.mktemp("resilience-logs")
    c = WorkerClient(log_dir=logs, extra_env={"HF_HUB_OFFLINE": "1"}, heartbeat_timeout=HEARTBEAT_S)
    yield c
    c.close()


@pytest.fixture
def job(tiny_models, tmp_path):
    def make(**over) -> Job:
        fields = dict(
            prompt=PROMPT, output_dir=tmp_path / "out", seed=3, steps=1, width=32, height=16,
            device="cpu", dtype="fp32", hdr=False, preview_every=0, models_dir=tiny_models["root"],
        )  # fmt: skip
        fields.update(over)
        return Job(**fields)

    return make


def finals(client: WorkerClient, job_ids: list[str], timeout: float = 240.0) -> dict[str, list[dict]]:
    """Poll like the Blender timer until every job has ended; each job's final events (a list, so a
    second final event would show)."""
    ended: dict[str, list[dict]] = {job_id: [] for job_id in job_ids}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not all(ended.values()):
        for ev in client.poll():
            if ev["type"] in FINAL_TYPES and ev.get("job_id") in ended:
                ended[ev["job_id"]].append(ev)
        time.sleep(0.02)
    missing = [job_id for job_id, evs in ended.items() if not evs]
    assert not missing, f"jobs that never ended: {missing}"
    return ended


# -- item 2: the outbox ----------------------------------------------------------------------------


def test_a_job_with_a_lone_surrogate_does_not_lose_the_jobs_queued_behind_it(client, job, tmp_path):
    """Both jobs wait in the outbox while the worker starts; the first one's prompt has no UTF-8
    form (it used to kill the starter thread, and neither job ever ended)."""
    assert client.worker_pid is None
    odd = client.submit(job(prompt=PROMPT + " \udcff", filename="odd"))
    plain = client.submit(job(filename="plain"))
    ended = finals(client, [odd, plain])
    assert [e["type"] for e in ended[odd]] == ["result"] and [e["type"] for e in ended[plain]] == ["result"]
    meta = ended[odd][0]["metadata"]
    assert meta["prompt"] == PROMPT + " \\xff"  # the byte, written out: the worker drew that prompt
    with Image.open(ended[plain][0]["path"]) as im:
        assert im.size == (32, 16)


def test_a_job_too_large_to_send_is_refused_at_submit_and_the_worker_serves_on(client, job):
    pid = client.worker_pid
    with pytest.raises(ProtocolError) as info:
        client.submit(job(model_paths={"transformer": "/m/" + "x" * (2 << 20)}))
    assert info.value.code == "message_too_large"
    ended = finals(client, [client.submit(job(filename="after-large"))])
    assert ended and client.worker_pid == pid  # the same worker: nothing was half-sent to it
    assert os.path.exists(Path(next(iter(ended.values()))[0]["path"]))


# -- item 8: a relative models folder ------------------------------------------------------------


def test_a_relative_models_folder_is_the_callers_not_the_workers(client, job, tmp_path, monkeypatch):
    """Relative to the script's working directory, as any path it passes: the worker runs in a
    folder of its own and used to search there (weights_missing)."""
    shutil.copytree(job().params["models"]["models_dir"], tmp_path / "rel-models")
    monkeypatch.chdir(tmp_path)
    result = client.run(job(models_dir="rel-models", filename="relative"), timeout=300)
    assert result["metadata"]["prompt"] == PROMPT


# -- item 6: a model file cut short under a loaded model ------------------------------------------


def test_model_files_cut_short_mid_job_and_between_jobs_end_as_errors_not_sigbus(client, job, tmp_path):
    """On the CPU the transformer and the VAE used to stay memory-mapped from their files: cutting
    them short mid-job killed the worker with SIGBUS at its next read (worker_died). Now the job in
    flight finishes from the worker's own copy, the next one sees the changed files and refuses them
    as damaged, and with the files restored the same worker serves again."""
    models = tmp_path / "models"
    shutil.copytree(
        job().params["models"]["models_dir"], models, ignore=shutil.ignore_patterns("transformer", "vae")
    )
    weights = [models / "FLUX.1-dev" / "flux1-dev.safetensors", models / "FLUX.1-dev" / "ae.safetensors"]
    saved = {path: path.read_bytes() for path in weights}
    pid = client.worker_pid

    def cut_short_at_first_step(event: dict) -> None:
        if event["type"] == "progress" and event["stage"] == "sampling" and event["step"] == 1:
            for path in weights:
                os.truncate(path, path.stat().st_size // 3)  # in place: the same file, shorter

    result = client.run(
        job(models_dir=models, steps=6, filename="cut-mid-job"), on_event=cut_short_at_first_step, timeout=300
    )
    assert result["model_cached"] is False and client.worker_pid == pid
    with Image.open(result["path"]) as im:
        assert im.size == (32, 16)
    with pytest.raises(JobError) as info:
        client.run(job(models_dir=models, filename="cut"), timeout=300)
    assert info.value.code == "weights_missing" and "truncated" in info.value.message
    for path, data in saved.items():
        path.write_bytes(data)
    again = client.run(job(models_dir=models, steps=6, filename="restored"), timeout=300)
    assert again["model_cached"] is False and client.worker_pid == pid
    with Image.open(again["path"]) as a, Image.open(result["path"]) as b:
        assert a.tobytes() == b.tobytes()  # the job cut short under finished with intact weights


# -- item 4: a hung worker (last: it costs the module its worker) ---------------------------------


def test_a_hung_worker_is_reported_unresponsive_killed_and_replaced(client, job):
    """SIGSTOP mid-job: the process lives but says nothing. run() without a timeout of its own ends
    with worker_unresponsive once the heartbeat timeout has passed; the hung process is killed and
    the next job gets a fresh worker. (Every earlier job of this module ran under the same short
    timeout, the first one through the model load: the worker's reader thread answers the pings
    while its job thread is busy.)"""
    assert client.heartbeat_timeout == HEARTBEAT_S
    pid = client.worker_pid
    stopped: list[float] = []

    def hang_at_first_step(event: dict) -> None:
        if event["type"] == "progress" and event["stage"] == "sampling" and not stopped:
            os.kill(pid, signal.SIGSTOP)
            stopped.append(time.monotonic())

    with pytest.raises(JobError) as info:
        client.run(job(steps=400, width=128, height=64, filename="long"), on_event=hang_at_first_step)
    waited = time.monotonic() - stopped[0]
    err = info.value
    assert err.code == "worker_unresponsive" and f"{HEARTBEAT_S:.0f} s" in err.message and err.hint
    assert HEARTBEAT_S - 0.5 <= waited <= HEARTBEAT_S + 10, waited
    deadline = time.monotonic() + 10
    while not gone(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert gone(pid), "the hung worker was left running"
    result = client.run(job(filename="after-hang"), timeout=300)
    assert result["type"] == "result" and client.worker_pid not in (None, pid)
