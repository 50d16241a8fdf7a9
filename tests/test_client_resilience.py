"""The real client against a real worker that gets unlucky: jobs that cannot be sent as they are,
and (at the end of the module, since it costs the worker) a worker that hangs.

One client serves the module; its worker is started by the first test, as in Blender.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from PIL import Image

from dit360_blender.client import Job, WorkerClient
from dit360_blender.protocol import FINAL_TYPES, ProtocolError

PROMPT = "This is a panorama. A frozen lake between pines."


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    c = WorkerClient(log_dir=tmp_path_factory.mktemp("resilience-logs"), extra_env={"HF_HUB_OFFLINE": "1"})
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
