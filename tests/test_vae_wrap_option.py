"""The wrap-around VAE decode is an option (`vae_wrap`, on by default): off, the CLI and the worker
give DiT360's own output; on, the image differs from it at the 0°/360° edges.

The reference is DiT360's pipeline assembled from diffusers parts (tests/test_parity_pipeline.py),
run on the same noise; the images compared are the PNGs the CLI and the worker wrote.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_parity_pipeline import PROMPT, reference_dit360

from dit360_blender.client import Job, WorkerClient
from dit360_blender.pipeline.sampling import get_noise

SEED, STEPS, W, H = 1234, 5, 128, 64
EDGE = 8  # columns at each side that the wrap-around changes most


@pytest.fixture(scope="module")
def reference(tiny_models) -> np.ndarray:
    image = reference_dit360(
        tiny_models["flux"], tiny_models["lora"].parent, PROMPT, get_noise(SEED, H, W), STEPS, 2.8, W, H
    )
    return (image.permute(1, 2, 0) * 255).round().byte().numpy()  # as our PNGs are rounded


def _png(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def _cli(tiny_models, out: Path, *extra: str) -> np.ndarray:
    args = [
        "generate", PROMPT, "--models-dir", str(tiny_models["root"]), "--seed", str(SEED),
        "--steps", str(STEPS), "--width", str(W), "--height", str(H), "--device", "cpu",
        "--dtype", "fp32", "--no-hdr", "--quiet", "--out", str(out), *extra,
    ]  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-m", "dit360_blender", *args],
        capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return _png(out)


def assert_matches_reference(got: np.ndarray, reference: np.ndarray) -> None:
    """Equal up to rounding: float parity is 1e-4, so a pixel may round to the next level."""
    diff = np.abs(got.astype(int) - reference.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01, (diff.max(), (diff > 0).mean())


def assert_differs_at_the_edges(got: np.ndarray, reference: np.ndarray) -> None:
    diff = np.abs(got.astype(float) - reference.astype(float))
    edges = np.concatenate([diff[:, :EDGE], diff[:, -EDGE:]], axis=1).mean()
    assert edges > 1.0  # grey levels, on average over the border columns
    assert edges > 5 * diff[:, 3 * EDGE : -3 * EDGE].mean()


def test_cli_no_vae_wrap_gives_dit360s_output(tiny_models, reference, tmp_path):
    assert_matches_reference(_cli(tiny_models, tmp_path / "plain.png", "--no-vae-wrap"), reference)
    assert_differs_at_the_edges(_cli(tiny_models, tmp_path / "wrapped.png"), reference)


def test_worker_vae_wrap_off_gives_dit360s_output(tiny_models, reference, tmp_path):
    client = WorkerClient(log_dir=tmp_path / "logs", extra_env={"HF_HUB_OFFLINE": "1"})
    try:
        fields = dict(
            prompt=PROMPT, output_dir=tmp_path / "out", seed=SEED, steps=STEPS, width=W, height=H,
            device="cpu", dtype="fp32", models_dir=tiny_models["root"], hdr=False, preview_every=0,
        )  # fmt: skip
        plain = client.run(Job(vae_wrap=False, filename="plain", **fields), timeout=300)
        wrapped = client.run(Job(filename="wrapped", **fields), timeout=300)  # the default: on
    finally:
        client.close()
    assert plain["metadata"]["vae_wrap"] is False and wrapped["metadata"]["vae_wrap"] is True
    assert wrapped["model_cached"] is True  # a decode setting: switching it reloads nothing
    assert_matches_reference(_png(Path(plain["path"])), reference)
    assert_differs_at_the_edges(_png(Path(wrapped["path"])), reference)
