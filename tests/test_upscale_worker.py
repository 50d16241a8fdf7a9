"""The worker's `upscale` job (worker/upscale_job.py) through the real client and a real worker
process, whose Python is the super-resolution venv .venv-sr (spandrel needs torchvision; see
tests/test_upscale_models.py), with a tiny random Real-ESRGAN Compact x4 saved as .safetensors.

References: the PNG the same model gives through the upscale command's shared step in this process
is not available here (no spandrel in the dev venv), so the result is checked against what the job
must be: a 4096x2048 PNG + HDR/EXR files, metadata['upscale'] naming the source and model, progress
counting every tile of the pass in the "upscaling" stage, and the bad-input refusals the table and
the model make.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from test_upscale_models import build_sr_model, sr_python

from dit360_blender.client import Job, JobError, WorkerClient
from dit360_blender.protocol import ProtocolError


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    python = sr_python()
    root = tmp_path_factory.mktemp("upscale-worker")
    model = build_sr_model(root / "compact_x4.safetensors", seed=5)
    rng = np.random.default_rng(0)
    x = np.linspace(0, 2 * np.pi, 1024, endpoint=False)
    base = 0.5 + 0.3 * np.sin(x)[None, :, None] * np.cos(np.linspace(0, np.pi, 512))[:, None, None]
    pano = np.clip(base + rng.normal(0, 0.03, (512, 1024, 3)), 0, 1)
    Image.fromarray((pano * 255).round().astype(np.uint8)).save(root / "pano.png")
    client = WorkerClient(python=python, log_dir=root / "logs", extra_env={"HF_HUB_OFFLINE": "1"})
    yield root, model, client
    client.close()


def test_an_upscale_job_writes_the_4k_hdri_and_counts_its_tiles(setup):
    root, model, client = setup
    events = []
    job = Job(kind="upscale", source=root / "pano.png", size="4k", upscale_model=model, upscale_tile=256,
              output_dir=root / "out", device="cpu", dtype="fp32")  # fmt: skip
    result = client.run(job, on_event=events.append, timeout=300)
    assert (result["width"], result["height"]) == (4096, 2048)
    with Image.open(result["path"]) as im:
        assert im.size == (4096, 2048)
    assert result["path"].endswith("pano_4k.png")
    assert set(result["files"]) >= {"hdr", "lighting", "hdr_exr", "lighting_exr"}
    up = result["metadata"]["upscale"]
    assert up["source"] == str(root / "pano.png") and up["model"] == model.name and up["scale"] == 4
    assert up["passes"] == 1 and up["tile"] == 256 and up["refine"] is False
    tiles = [e for e in events if e["type"] == "progress" and e["stage"] == "upscaling" and e["step"]]
    assert [e["step"] for e in tiles] == list(range(1, 9)) and {e["total"] for e in tiles} == {8}  # 2 x 4
    assert "seam_z" in result["metadata"]["seam"]


def test_bad_upscale_jobs_are_refused_and_write_nothing(setup, tmp_path):
    root, model, client = setup
    base = dict(kind="upscale", source=root / "pano.png", output_dir=tmp_path, device="cpu", dtype="fp32")
    with pytest.raises(ProtocolError) as perr:  # the table refuses it in the client already
        client.run(Job(**base, size="native", upscale_model=model), timeout=60)
    assert perr.value.code == "bad_parameters" and "native" in perr.value.message
    unknown = tmp_path / "notes.pth"
    unknown.write_text("hello")
    with pytest.raises(JobError) as err:
        client.run(Job(**base, size="4k", upscale_model=unknown), timeout=60)
    assert err.value.code == "bad_checkpoint" and "notes.pth" in err.value.message
    with pytest.raises(JobError) as err:  # no default model in an empty models folder, downloads off
        client.run(Job(**base, size="4k", models_dir=tmp_path / "models"), timeout=60)
    assert err.value.code == "weights_missing" and "RealESRGAN_x4plus.pth" in err.value.message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.pth"]
