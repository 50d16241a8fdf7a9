"""The `warm` job (issue 13: the first Generate does not wait for the load): a real worker process
through the real client on the tiny models. A warm job takes a generate's parameters, loads what
that generate uses, writes nothing and ends in `warmed`; the generate that follows finds the model
loaded (model_cached, no loading stage, one load in the worker's own count)."""

from __future__ import annotations

import pytest

from dit360_blender.client import Job, JobError, WorkerClient
from dit360_blender.params import ParamError, check_params

PROMPT = "This is a panorama image. A quiet harbour at dawn."


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    with WorkerClient(log_dir=tmp_path_factory.mktemp("warm-logs"), extra_env={"HF_HUB_OFFLINE": "1"}) as c:
        yield c


def fields(tiny_models, out, **over) -> dict:
    values = dict(
        prompt=PROMPT, output_dir=out, seed=3, steps=2, width=128, height=64, device="cpu", dtype="fp32",
        models_dir=tiny_models["root"],
    )  # fmt: skip
    return values | over


def test_a_warm_job_loads_what_the_next_generate_uses_and_writes_nothing(client, tiny_models, tmp_path):
    out = tmp_path / "renders"
    events = []
    warmed = client.run(Job(kind="warm", **fields(tiny_models, out)), on_event=events.append, timeout=300)
    assert warmed["type"] == "warmed" and warmed["model_cached"] is False
    assert warmed["timings"]["load_s"] > 0 and "compile_s" not in warmed["timings"]  # no compile on the CPU
    assert "loading" in [e.get("stage") for e in events]
    assert not out.exists()  # nothing written, not even the folder
    assert client.status()["loads"] == 1

    events.clear()
    result = client.run(Job(**fields(tiny_models, out)), on_event=events.append, timeout=300)
    assert result["model_cached"] is True and "loading" not in [e.get("stage") for e in events]
    assert client.status()["loads"] == 1
    assert result["path"].startswith(str(out))

    again = client.run(Job(kind="warm", **fields(tiny_models, out)), timeout=60)  # already warm
    assert again["model_cached"] is True and client.status()["loads"] == 1


def test_a_warm_job_without_its_model_files_fails_like_the_generate_would(client, tiny_models, tmp_path):
    with pytest.raises(JobError) as err:
        client.run(
            Job(kind="warm", **fields(tiny_models, tmp_path / "o", models_dir=tmp_path / "none")), timeout=120
        )
    assert err.value.code == "weights_missing"
    assert not (tmp_path / "o").exists()


def test_a_warm_job_takes_exactly_a_generates_parameters(tiny_models, tmp_path):
    values = Job(**fields(tiny_models, tmp_path)).to_params()
    assert check_params(values, "warm") == check_params(values, "generate")
    with pytest.raises(ParamError):
        check_params({**values, "source": str(tmp_path / "x.png")}, "warm")  # an edit's, not a generate's
