"""Worker parts in-process: output paths, error classification, the job runner's failure handling,
the queue, the parent watch and the preview projection."""

from __future__ import annotations

import base64
import io
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from dit360_blender.pipeline.dit360 import Cancelled
from dit360_blender.pipeline.errors import BadParametersError, OutputWriteError, WeightsMissingError
from dit360_blender.pipeline.memory_peaks import StagePeaks
from dit360_blender.pipeline.output_files import ensure_writable, plan_output, slugify
from dit360_blender.protocol import (
    MAX_PREVIEW_HEIGHT,
    MAX_PREVIEW_WIDTH,
    ProtocolError,
    check_generate_params,
)
from dit360_blender.worker.jobqueue import JobQueue, QueuedJob
from dit360_blender.worker.jobs import JobRunner, classify
from dit360_blender.worker.parent import parent_watch
from dit360_blender.worker.preview import PreviewRenderer, fit_latent_rgb

# -- outputs ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "prompt, slug",
    [
        ("This is a panorama. A beach at dusk, palm trees!", "a-beach-at-dusk-palm-trees"),
        ("Café «Ünïcode» — 日本 snow", "cafe-unicode-snow"),
        ("...", "panorama"),
        ("this is a panorama", "this-is-a-panorama"),
        ("word " * 30, "-".join(["word"] * 9)),  # 49 characters with a tenth: cut at a word
    ],
)
def test_slugify(prompt, slug):
    assert slugify(prompt) == slug
    assert len(slugify(prompt)) <= 48 and slugify(prompt).isascii()


def test_plan_output_names_and_keeps_earlier_results(tmp_path):
    first = plan_output(tmp_path, "This is a panorama. A beach", 7)
    assert first == tmp_path / "a-beach_7.png"
    first.write_bytes(b"x")
    assert plan_output(tmp_path, "This is a panorama. A beach", 7) == tmp_path / "a-beach_7-2.png"
    assert plan_output(tmp_path, "p", 1, filename="fixed") == tmp_path / "fixed.png"


@pytest.mark.parametrize("name", ["../up", "a/b", "..", "a\\b"])
def test_plan_output_refuses_escapes(tmp_path, name):
    with pytest.raises(BadParametersError):
        plan_output(tmp_path, "p", 1, filename=name)


def test_plan_output_refuses_a_symlink_out(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "evil.png").symlink_to(tmp_path / "elsewhere.png")
    with pytest.raises(BadParametersError):
        plan_output(tmp_path / "out", "p", 1, filename="evil")


def test_ensure_writable_explains_the_fix(tmp_path):
    (tmp_path / "afile").write_text("not a folder")
    with pytest.raises(OutputWriteError) as info:
        ensure_writable(tmp_path / "afile" / "out")
    assert info.value.code == "disk_write_failed" and "output folder" in info.value.hint
    ensure_writable(tmp_path / "new" / "deep")
    assert list((tmp_path / "new" / "deep").iterdir()) == []  # the probe is gone


# -- errors and the runner -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "exc, code, fatal",
    [
        (Cancelled(), "cancelled", False),
        (WeightsMissingError("gone", "copy them"), "weights_missing", False),
        (torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"), "out_of_memory", False),
        (RuntimeError("MPS backend out of memory"), "out_of_memory", False),
        (MemoryError(), "out_of_memory", False),
        (RuntimeError("CUDA error: an illegal memory access was encountered"), "cuda_error", True),
        (RuntimeError("CUBLAS_STATUS_EXECUTION_FAILED when calling cublasGemmEx"), "cuda_error", True),
        (KeyError("boom"), "internal", False),
    ],
)
def test_classify(exc, code, fatal):
    got_code, message, hint, got_fatal = classify(exc)
    assert (got_code, got_fatal) == (code, fatal)
    assert message
    if code not in ("cancelled",):
        assert hint


class _FailingPipe:
    def __init__(self, exc):
        self.exc = exc
        self.peaks = StagePeaks(torch.device("cpu"))  # the real counters: empty off CUDA

    def use_vae_wrap(self, on):  # the per-job decode setting the runner applies first
        self.vae_wrap = on

    def generate(self, request, on_step=None, should_cancel=None, on_stage=None):
        on_stage("encoding")
        raise self.exc


class _FakeCache:
    def __init__(self, pipe):
        self.pipe = pipe

    def get(self, params, on_load, on_download, on_search=None):
        return self.pipe, True


def _job(tmp_path, **over):
    params = check_generate_params(
        {
            "prompt": "p",
            "output_dir": str(tmp_path),
            "width": 128,
            "height": 64,
            "steps": 3,
            "preview_every": 0,
            **over,
        }
    )
    return QueuedJob("job1", params)


@pytest.mark.parametrize(
    "exc, code, keeps_serving",
    [
        (torch.cuda.OutOfMemoryError("CUDA out of memory"), "out_of_memory", True),
        (RuntimeError("CUDA error: device-side assert triggered"), "cuda_error", False),
        (ValueError("odd"), "internal", True),
    ],
)
def test_runner_reports_and_decides_whether_to_keep_serving(tmp_path, exc, code, keeps_serving):
    sent = []
    runner = JobRunner(sent.append, _FakeCache(_FailingPipe(exc)))
    assert runner.run(_job(tmp_path)) is keeps_serving
    final = sent[-1]
    assert final["type"] == "error" and final["code"] == code and final["job_id"] == "job1"
    assert final["fatal"] is (not keeps_serving) and final["hint"]
    assert list(tmp_path.iterdir()) == []  # nothing written


class _Peaks:
    def report(self):  # what StagePeaks reports on a GPU under a 16 GiB budget
        return {"sample": {"allocated_gib": 14.9, "reserved_gib": 15.2}, "device_used_gib": 16.0,
                "cap_gib": 15.25}  # fmt: skip


def test_an_out_of_memory_error_under_a_budget_names_the_budget_and_the_stage(tmp_path):
    pipe = _FailingPipe(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"))
    pipe.peaks = _Peaks()
    sent = []
    assert JobRunner(sent.append, _FakeCache(pipe)).run(_job(tmp_path)) is True
    final = sent[-1]
    assert final["code"] == "out_of_memory" and "15.2 GiB" in final["message"]
    assert final["hint"].startswith("Raise the VRAM budget") and "stream" in final["hint"]
    assert final["details"]["stage"] == "encoding"
    assert final["details"]["memory"]["sample"]["reserved_gib"] == 15.2


def test_an_out_of_memory_error_without_a_budget_keeps_the_plain_hint(tmp_path):
    sent = []
    runner = JobRunner(
        sent.append, _FakeCache(_FailingPipe(torch.cuda.OutOfMemoryError("CUDA out of memory")))
    )
    assert runner.run(_job(tmp_path)) is True
    final = sent[-1]
    assert "budget" not in final["message"] and not final["hint"].startswith("Raise")
    assert final["details"] == {"stage": "encoding"}


def test_runner_refuses_bad_parameters_before_loading(tmp_path):
    sent = []
    runner = JobRunner(sent.append, None)  # a cache access would fail: it must not happen
    with pytest.raises(ProtocolError):  # refused on arrival ...
        _job(tmp_path, width=100, height=50)
    job = _job(tmp_path)
    job.params.update(width=100, height=50)  # ... and by the runner, should one get past that
    assert runner.run(job) is True
    assert sent[-1]["code"] == "bad_parameters"


# -- queue -----------------------------------------------------------------------------------------


def test_queue_order_cancel_and_stop():
    q = JobQueue()
    positions = []
    for name in "abc":
        q.put(QueuedJob(name, {}), positions.append)
    assert positions == [0, 1, 2]
    running = q.take()
    assert running.job_id == "a"
    assert q.cancel("b")[0] == "queued" and not q.known("b")
    running.step = 4
    kind, job = q.cancel("a")
    assert kind == "running" and job.cancel.is_set() and job.cancel_step == 4
    assert q.cancel("zzz") is None
    q.done(running)
    assert q.snapshot() == (None, ["c"])
    assert [j.job_id for j in q.stop()] == ["c"]
    assert q.take() is None


# -- parent watch ----------------------------------------------------------------------------------


def test_parent_watch_sees_a_process_die():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        alive = parent_watch(proc.pid)
        assert alive()
        proc.kill()
        time.sleep(0.2)
        assert not alive()  # a killed, not yet reaped (zombie) process counts as dead
    finally:
        proc.kill()
        proc.wait()
    assert not alive()
    assert parent_watch(os.getppid())()  # our own parent, watched directly


# -- previews --------------------------------------------------------------------------------------


def test_fit_latent_rgb_shapes(tiny_paths):
    from dit360_blender.pipeline.vae_checkpoint import load_autoencoder

    vae = load_autoencoder(tiny_paths.vae, dtype=torch.float32, device="cpu")
    weights, bias = fit_latent_rgb(vae)
    assert weights.shape == (16, 3) and bias.shape == (3,)
    assert torch.isfinite(weights).all() and weights.abs().sum() > 0


def test_preview_is_small():
    weights, bias = torch.randn(16, 3) * 0.1, torch.zeros(3)
    width, height = 8192, 4096
    renderer = PreviewRenderer((weights, bias), width=width, height=height)
    tokens = (height // 16) * (width // 16 + 2)
    png, w, h = renderer.render(torch.randn(1, tokens, 64))
    assert (w, h) == (MAX_PREVIEW_WIDTH, MAX_PREVIEW_HEIGHT)
    with Image.open(io.BytesIO(png)) as im:
        assert im.size == (w, h) and im.mode == "RGB"
    assert len(base64.b64encode(png)) < 1 << 20


class _LinearVelocity(torch.nn.Module):
    """A stand-in transformer whose velocity is a fixed linear map of the state plus a bias."""

    def __init__(self, dim: int = 64) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(5)
        self.a = torch.randn(dim, dim, generator=g, dtype=torch.float64) * 0.2
        self.b = torch.randn(dim, generator=g, dtype=torch.float64)

    def forward(self, img, **_):
        return (img.double() @ self.a + self.b).float()


def test_sampler_hands_over_x0_equal_to_a_float64_recomputation():
    """x0 = x_t - t * v at every step, recomputed here in float64 with the same Euler updates."""
    from dit360_blender.pipeline.sampling import denoise, get_sigmas

    model = _LinearVelocity()
    x = torch.randn(1, 12, 64, generator=torch.Generator().manual_seed(2))
    sigmas = get_sigmas(5, 12)
    seen = []
    final = denoise(
        model, x, torch.zeros(1, 12, 3), torch.zeros(1, 4, 8), torch.zeros(1, 4, 3), torch.zeros(1, 8),
        sigmas, 2.8, on_step=seen.append,
    )  # fmt: skip
    ref, expected = x.double(), []
    for i in range(5):
        t, t_next = float(sigmas[i]), float(sigmas[i + 1])
        v = ref @ model.a + model.b
        expected.append(ref - t * v)
        ref = ref + (t_next - t) * v
    assert [s.index for s in seen] == [1, 2, 3, 4, 5] and all(s.total == 5 for s in seen)
    for step, want in zip(seen, expected):
        assert torch.allclose(step.x0.double(), want, rtol=1e-4, atol=1e-4)
    assert torch.allclose(seen[-1].x0, final, atol=1e-5)  # at t = 0 the estimate is the result
    assert not torch.allclose(seen[0].x0, final, atol=1e-2)  # ... and earlier ones are not trivially it


def test_preview_pixels_are_the_projected_latents():
    """The preview of a token state equals an independent numpy projection of its unpadded latents."""
    g = torch.Generator().manual_seed(9)
    weights, bias = torch.randn(16, 3, generator=g) * 0.3, torch.randn(3, generator=g) * 0.1
    width, height = 128, 64
    grid_h, grid_w = height // 16, width // 16
    tokens = torch.randn(1, grid_h * (grid_w + 2), 64, generator=g)
    png, w, h = PreviewRenderer((weights, bias), width=width, height=height).render(tokens)
    with Image.open(io.BytesIO(png)) as im:
        got = np.asarray(im.convert("RGB")).astype(np.float64)
    t = tokens[0].double().numpy().reshape(grid_h, grid_w + 2, 16, 2, 2)[:, 1:-1]  # drop the wrap columns
    latents = t.transpose(2, 0, 3, 1, 4).reshape(16, grid_h * 2, grid_w * 2)  # c, (h ph), (w pw)
    rgb = np.einsum("chw,ck->hwk", latents, weights.double().numpy()) + bias.double().numpy()
    want = np.clip((rgb + 1) / 2, 0, 1) * 255
    assert (w, h) == (grid_w * 2, grid_h * 2)
    assert np.abs(got - want).max() <= 0.5 + 1e-6


def test_background_previews_are_the_rendered_ones_in_order_and_drain_waits_for_them():
    """`submit` (what the sampling loop calls) delivers, from another thread and in submission
    order, the very PNGs `render` makes; `drain` returns only when all are delivered; a failing
    delivery is logged, not raised into the job."""
    import threading

    g = torch.Generator().manual_seed(9)
    weights, bias = torch.randn(16, 3, generator=g) * 0.3, torch.randn(3, generator=g) * 0.1
    renderer = PreviewRenderer((weights, bias), width=256, height=128)
    estimates = [torch.randn(1, 8 * 18, 64, generator=g) for _ in range(6)]
    delivered: list[tuple[bytes, int, int, str]] = []
    slow = threading.Event()

    def deliver(png: bytes, w: int, h: int) -> None:
        slow.wait(0.05)  # slower than submitting: the loop must not wait for it
        delivered.append((png, w, h, threading.current_thread().name))

    for x0 in estimates:
        renderer.submit(x0, deliver)
    renderer.drain()
    assert [d[:3] for d in delivered] == [renderer.render(x0) for x0 in estimates]
    assert all(d[3].startswith("dit360-preview") for d in delivered)

    def broken(png: bytes, w: int, h: int) -> None:
        raise OSError("the socket went away")

    renderer.submit(estimates[0], broken)
    renderer.drain()  # no exception
    renderer.submit(estimates[1], deliver)  # and the renderer still works after a drain
    renderer.drain()
    assert delivered[-1][:3] == renderer.render(estimates[1])
