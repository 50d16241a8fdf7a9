"""Sequence-parallel sampling over gloo ranks on the CPU equals one process (fp32, within 1e-5).

Three real processes (tests/sequence_parallel_ranks.py) sample tiny FLUX models sharded: Ulysses
(4 heads on 2 ranks, 6 on 3) and ring attention (3 heads on 2 ranks, 4 on 3), DiT360's wrap-padded
ids, uneven slices (rank 0 holds the text and one image token on 3 ranks); the step cache deciding
alike on every rank; a cancel on rank 0 stopping every rank before the same step.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dit360_blender.pipeline.sampling import Cancelled, denoise
from dit360_blender.pipeline.step_cache import StepCache

sys.path.insert(0, str(Path(__file__).parent))
import sequence_parallel_ranks as R  # noqa: E402

TOL = 1e-5


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sp")
    root = str(Path(__file__).resolve().parents[1])
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    script = str(Path(__file__).with_name("sequence_parallel_ranks.py"))
    procs = [
        subprocess.Popen([sys.executable, script, str(r), "3", str(tmp / "store"), str(tmp / "out")], env=env)
        for r in range(3)
    ]
    codes = [p.wait(timeout=180) for p in procs]
    assert codes == [0, 0, 0]
    report = json.loads((tmp / "out.json").read_text())
    return load_file(str(tmp / "out.safetensors")), report


def reference(name: str, cancel: bool = False):
    _, heads, threshold, cancel_at = R.SCENARIOS[name]
    x = R.inputs()
    steps = []
    cache = StepCache(threshold) if threshold > 0 else None
    try:
        final = denoise(
            R.tiny_model(heads), x["img"], x["img_ids"], x["txt"], x["txt_ids"], x["vec"], x["sigmas"],
            x["guidance"], on_step=lambda s: steps.append(s.latents.clone()),
            should_cancel=lambda: cancel_at > 0 and len(steps) + 1 >= cancel_at, cache=cache,
        )  # fmt: skip
    except Cancelled:
        final = None
    return final, steps, cache


@pytest.mark.parametrize(
    "name, mode", [("ulysses2", "ulysses"), ("ring2", "ring"), ("ring3", "ring"), ("ulysses3", "ulysses")]
)
def test_sharded_sampling_equals_one_process(sharded, name, mode):
    got, report = sharded
    assert report[name]["mode"] == mode
    final, steps, _ = reference(name)
    assert final.abs().max() > 0.1  # a real image, not zeros
    error = (got[f"{name}.final"] - final).abs().max().item()
    assert error < TOL, error
    for i, s in enumerate(steps):  # rank 0's previews see the whole latents of every step
        assert (got[f"{name}.step{i + 1}"] - s).abs().max().item() < TOL
    # a wrong merge would be far off: the model's output really depends on the other ranks' tokens
    assert (got[f"{name}.final"] - R.inputs()["img"]).abs().max() > 0.1


def test_step_cache_skips_the_same_steps_on_every_rank(sharded):
    got, report = sharded
    final, _, cache = reference("cache3")
    assert cache.skipped == 1 and cache.full_evaluations == 3  # the decision matters here
    assert [r[1] for r in report["cache3"]["per_rank"]] == [cache.full_evaluations] * 3
    assert (got["cache3.final"] - final).abs().max().item() < TOL


def test_a_cancel_on_rank_0_stops_every_rank_before_the_same_step(sharded):
    got, report = sharded
    _, steps, _ = reference("cancel3")
    assert len(steps) == 2
    assert [r[0] for r in report["cancel3"]["per_rank"]] == [2, 2, 2]
    assert "cancel3.final" not in got
    assert torch.allclose(got["cancel3.step2"], steps[1], atol=TOL)


@pytest.mark.parametrize("fused", [True, False])
def test_ring_block_attention_and_its_log_sum_exp_equal_float64_math(fused):
    from dit360_blender.pipeline import sequence_parallel as S

    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 3, n, 16, generator=g) for n in (11, 29, 29))
    out, lse = (S._fused_attention if fused else S._math_attention)(q, k, v)
    scores = q.double() @ k.double().transpose(-1, -2) / 4.0
    assert (lse.squeeze(-1) - torch.logsumexp(scores, -1)).abs().max() < 1e-5
    assert (out - torch.softmax(scores, -1) @ v.double()).abs().max() < 1e-5
    assert S._fused_agrees(q)  # the probe accepts the CPU kernel (and so the ring runs fused here)
