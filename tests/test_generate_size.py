"""generate's `size` (issue 15: `generate … --size 8k`): the generated panorama is upscaled beside
it in the same job, the native files kept and named in the result's `native`; a missing upscale
model is refused before any sampling. Real worker processes and the real CLI on the tiny models; the
runs that upscale use the super-resolution venv .venv-sr (spandrel needs torchvision there) with a
tiny random Real-ESRGAN Compact x4.

References: the native PNG of a generate with a size must be bit-identical to a plain generate of
the same job (the upscale must not touch it), and the upscale must be what an `upscale` job of that
PNG gives (the same model, the same tiles: bit-identical too)."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from test_upscale_models import ROOT, build_sr_model, sr_python

from dit360_blender.client import Job, JobError, WorkerClient

PROMPT = "This is a panorama image. A misty pine forest at dawn."


def pixels(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


@pytest.fixture(scope="module")
def sr(tmp_path_factory):
    python = sr_python()
    root = tmp_path_factory.mktemp("generate-size")
    model = build_sr_model(root / "compact_x4.safetensors", seed=3)
    client = WorkerClient(python=python, log_dir=root / "logs", extra_env={"HF_HUB_OFFLINE": "1"})
    yield root, model, python, client
    client.close()


def base_job(tiny_models, out, **over) -> Job:
    fields = dict(
        prompt=PROMPT, output_dir=out, seed=77, steps=4, width=256, height=128, device="cpu", dtype="fp32",
        models_dir=tiny_models["root"],
    )  # fmt: skip
    return Job(**(fields | over))


def test_generate_with_a_size_keeps_the_native_world_and_adds_the_upscale(sr, tiny_models, tmp_path):
    root, model, _python, client = sr
    plain = client.run(base_job(tiny_models, tmp_path / "plain"), timeout=300)
    events = []
    job = base_job(tiny_models, tmp_path / "sized", size="4k", upscale_model=model, upscale_tile=256)
    result = client.run(job, on_event=events.append, timeout=600)
    assert (result["width"], result["height"]) == (4096, 2048)
    native = result["native"]
    assert (native["width"], native["height"]) == (256, 128)
    assert result["path"].endswith(os.path.basename(native["path"])[:-4] + "_4k.png")
    assert np.array_equal(pixels(native["path"]), pixels(plain["path"]))  # the generation untouched
    assert set(native["files"]) >= {"hdr", "lighting"} and all(
        os.path.isfile(f) for f in native["files"].values()
    )
    assert set(result["files"]) >= {"hdr", "lighting", "hdr_exr", "lighting_exr"}
    up = result["metadata"]["upscale"]
    assert up["source"] == native["path"] and up["passes"] == 2 and up["refine"] is False
    stages = [e["stage"] for e in events if e["type"] == "progress"]
    assert stages.index("sampling") < stages.index("upscaling")
    # the same as an upscale job of the generated PNG
    alone = client.run(
        Job(kind="upscale", source=native["path"], size="4k", upscale_model=model, upscale_tile=256,
            output_dir=tmp_path / "alone", device="cpu", dtype="fp32"),
        timeout=300,
    )  # fmt: skip
    assert np.array_equal(pixels(alone["path"]), pixels(result["path"]))


def test_generate_with_a_size_and_no_upscale_model_fails_before_sampling(tiny_models, tmp_path):
    out = tmp_path / "out"
    with WorkerClient(log_dir=tmp_path / "logs", extra_env={"HF_HUB_OFFLINE": "1"}) as client:
        events = []
        with pytest.raises(JobError) as err:
            client.run(base_job(tiny_models, out, size="8k"), on_event=events.append, timeout=120)
    assert err.value.code == "weights_missing" and "RealESRGAN_x4plus" in err.value.message
    assert not any(e.get("stage") == "sampling" for e in events)
    assert not out.exists() or not any(out.iterdir())


def test_cli_generate_size_writes_both_and_refuses_without_a_model(sr, tiny_models, tmp_path):
    _root, model, python, _client = sr
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"HF_HUB_OFFLINE": "1"}
    args = ["-m", "dit360_blender", "generate", PROMPT, "--seed", "5", "--steps", "3", "--width", "256",
            "--height", "128", "--device", "cpu", "--dtype", "fp32", "--models-dir", str(tiny_models["root"]),
            "--size", "4k", "--tile", "256", "--quiet"]  # fmt: skip
    out = tmp_path / "pano.png"
    done = subprocess.run(
        [str(python), *args, "--model", str(model), "--out", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert pixels(out).shape == (128, 256, 3) and pixels(tmp_path / "pano_4k.png").shape == (2048, 4096, 3)
    assert "pano_4k.png" in done.stdout and " x4, " in done.stdout
    # without an upscale model: refused before loading the diffusion model, nothing written
    empty = tmp_path / "none"
    empty.mkdir()
    refused = subprocess.run(
        [sys.executable, *args, "--out", str(empty / "p.png")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert refused.returncode != 0 and "RealESRGAN_x4plus" in refused.stderr, refused.stderr
    assert "loading models" not in refused.stderr and list(empty.iterdir()) == []
