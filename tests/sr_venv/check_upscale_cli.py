"""`python -m dit360_blender upscale` end to end (run inside .venv-sr; see tests/test_upscale_models.py):
a 2048x1024 seamless panorama to an 8K HDRI with EXR files through the real command in a subprocess,
with a tiny random Real-ESRGAN Compact x4 model saved as .safetensors, and the bad inputs.

References: the tiny network run directly on the source's pixels across the 0°/360° wrap (what the
file must hold there); OpenEXR's own reader for the EXR; the seam score's interior boundaries for the
wrap; the process's peak RSS (VmHWM, reset after the imports, as tests/test_loading_memory.py does).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import OpenEXR
import pytest
import torch
from PIL import Image
from sr_nets import build, save

from dit360_blender import cli
from dit360_blender.panorama.seam import column_offsets, column_steps
from dit360_blender.pipeline.errors import BadParametersError
from dit360_blender.pipeline.image_io import read_png_metadata
from dit360_blender.pipeline.sr_models import load_sr_model, tile_for_budget

ROOT = Path(__file__).resolve().parents[2]
TILE = 128  # 8 x 16 = 128 tiles of the 2048x1024 source
# Peak RSS bound of the whole 8K job (upscale + 8-bit copy + analysis + PNG/HDR/EXR files), per output
# pixel: the float32 result (12 B) and its 8-bit copy (3 B) exist together once, the analysis and file
# writers add ~11 B (panorama/large.py's measured 345 MiB at 8K), plus room for the allocator.
RSS_BYTES_PER_OUTPUT_PIXEL = 24  # measured: 18.7

RUN = r"""
import json, runpy, sys
def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1])
import dit360_blender.cli, spandrel, torch, numpy, PIL.Image, OpenEXR  # imports before the baseline
from dit360_blender.pipeline import make_upscale, make_panorama  # noqa
before = status("VmRSS:")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
sys.argv = ["dit360_blender", *sys.argv[1:]]
code = 0
try:
    runpy.run_module("dit360_blender", run_name="__main__")
except SystemExit as exc:
    code = exc.code
print("MEMORY=" + json.dumps({"before_kib": before, "peak_kib": status("VmHWM:"), "code": code}))
"""


def seamless_panorama(width: int, seed: int = 0) -> np.ndarray:
    """Smooth colour waves periodic in longitude plus pixel noise: continuous across the wrap."""
    rng = np.random.default_rng(seed)
    height = width // 2
    y, x = np.mgrid[0:height, 0:width]
    lon = 2 * np.pi * x / width
    img = np.full((height, width, 3), 0.5)
    for c in range(3):
        for k in range(1, 6):
            amp, phase, rows = rng.uniform(0.05, 0.12), rng.uniform(0, 2 * np.pi), rng.integers(1, 4)
            img[..., c] += amp * np.sin(k * lon + phase) * np.cos(np.pi * (y / height - 0.5) * rows)
    img += rng.normal(0.0, 0.02, img.shape)
    return (np.clip(img, 0, 1) * 255).round().astype(np.uint8)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("upscale")
    Image.fromarray(seamless_panorama(2048)).save(folder / "pano.png")
    model = save(build("compact_x4", seed=3), folder / "compact_x4.safetensors")
    return folder, model


def test_2k_to_8k_seamless_hdri_with_exr_from_the_cli_in_bounded_memory(inputs):
    folder, model = inputs
    cmd = [sys.executable, "-c", RUN, "upscale", "pano.png", "--size", "8k", "--model", str(model)]
    cmd += ["--tile", str(TILE), "--quiet"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=folder, env=env, capture_output=True, text=True, timeout=500)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    memory = json.loads(proc.stdout.split("MEMORY=")[1])
    assert memory["code"] == 0, proc.stdout + proc.stderr
    png = folder / "pano_8k.png"
    names = {p.name for p in folder.iterdir()}
    assert {
        "pano_8k.png",
        "pano_8k.hdr",
        "pano_8k_lighting.hdr",
        "pano_8k.exr",
        "pano_8k_lighting.exr",
    } <= names

    with Image.open(png) as im:
        assert im.size == (8192, 4096)
        out = np.asarray(im.convert("RGB"))
    meta = read_png_metadata(png)
    up = meta["upscale"]
    assert (up["architecture"], up["scale"], up["passes"], up["box_factor"], up["tile"]) == (
        "RealESRGAN Compact",
        4,
        1,
        1,
        TILE,
    )
    assert up["source"] == str(folder / "pano.png") and up["model"] == model.name

    # the wrap in the file is what the network gives when it sees across it (no tile, no seam)
    loaded = load_sr_model(model)
    source = np.asarray(Image.open(folder / "pano.png").convert("RGB")).astype(np.float32) / 255
    m, band = loaded.margin, 32
    rows = slice(500 - m, 500 + band + m)
    across = np.concatenate([source[rows, -band - m :], source[rows, : band + m]], axis=1)
    with torch.no_grad():
        ref = loaded.sr.module(torch.from_numpy(across).permute(2, 0, 1)[None])[0].clamp(0, 1)
    ref = (ref[:, 4 * m : -4 * m, 4 * m : -4 * m].permute(1, 2, 0).numpy() * 255).round()
    got = np.concatenate(
        [out[2000 : 2000 + 4 * band, -4 * band :], out[2000 : 2000 + 4 * band, : 4 * band]], axis=1
    )
    assert np.abs(got.astype(np.float64) - ref).max() <= 1.0  # float rounding to 8 bits

    # the seam at the wrap is at interior level. A x4 pixel-shuffle network makes every 4th column
    # boundary (between two input pixels' 4x4 blocks) a boundary of another kind; the wrap is one of
    # those, so it is ranked among them (its 2047 interior twins), by both of the seam score's
    # statistics; the PNG records the score of the whole file
    assert {"seam_z", "seam_z_offset", "wrap_step"} <= set(meta["seam"])
    for stat in (column_steps(out), column_offsets(out)):
        twins = stat[3::4]  # boundaries x = 3, 7, ..., 8191 (the wrap)
        rank = float((twins[:-1] < twins[-1]).mean())
        assert 0.01 < rank < 0.99, (rank, twins[-1], np.median(twins[:-1]))

    # the EXR: half float, 8192x4096, what the .hdr beside it holds (within RGBE's precision)
    with OpenEXR.File(str(folder / "pano_8k.exr"), separate_channels=True) as exr:
        channels = exr.channels()
        rgb = np.stack([channels[c].pixels for c in "RGB"], axis=-1)
    assert rgb.shape == (4096, 8192, 3) and rgb.dtype == np.float16 and np.isfinite(rgb).all()
    assert float(rgb.astype(np.float32).mean()) > 0.05

    grown = (memory["peak_kib"] - memory["before_kib"]) * 1024
    assert grown < RSS_BYTES_PER_OUTPUT_PIXEL * 8192 * 4096, f"peak RSS grew by {grown / 2**20:.0f} MiB"
    print(
        f"8K upscale job: peak RSS +{grown / 2**20:.0f} MiB ({grown / (8192 * 4096):.1f} B per output pixel)"
    )


def run_cli(capsys, *argv) -> tuple[int, str]:
    code = cli.main(list(argv))
    return code, capsys.readouterr().err


def test_bad_inputs_are_clear_errors_and_write_nothing(inputs, tmp_path, capsys):
    folder, model = inputs
    pano = folder / "pano.png"
    out = tmp_path / "out.png"
    unknown = tmp_path / "weights.safetensors"
    from safetensors.torch import save_file

    save_file({"encoder.block.weight": torch.rand(3, 3)}, str(unknown))
    code, err = run_cli(
        capsys, "upscale", str(pano), "--size", "4k", "--model", str(unknown), "--out", str(out)
    )
    assert code == 1 and str(unknown) in err and "spandrel" in err and "fix:" in err

    x3 = save(build("compact_x3"), tmp_path / "compact_x3.pth")
    code, err = run_cli(capsys, "upscale", str(pano), "--size", "4k", "--model", str(x3), "--out", str(out))
    assert code == 2 and "4096 px is not reachable from 2048 px with a ×3 model" in err and "6144" in err

    wide = tmp_path / "wide.png"
    Image.fromarray(np.zeros((100, 300, 3), np.uint8)).save(wide)
    code, err = run_cli(
        capsys, "upscale", str(wide), "--size", "4k", "--model", str(model), "--out", str(out)
    )
    assert code == 2 and "not an equirectangular panorama" in err

    code, err = run_cli(
        capsys, "upscale", str(pano), "--size", "native", "--model", str(model), "--out", str(out)
    )
    assert code == 2 and "native" in err
    code, err = run_cli(capsys, "upscale", str(pano), "--size", "4k", "--model", str(tmp_path / "no.pth"))
    assert code == 1 and "no.pth" in err and "does not exist" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["compact_x3.pth", "weights.safetensors", "wide.png"]
    assert sorted(p.name for p in folder.iterdir() if p.name.startswith("pano_4k")) == []


def test_a_card_too_small_for_the_smallest_tile_is_refused_before_anything_runs(inputs):
    # CUDA's peak counter cannot exist here: `measure` stands in for it (bytes of a tile's peak)
    loaded = load_sr_model(inputs[1])
    per_px, fixed = 2000.0, 300 * 2**20

    def measure(tile: int) -> int:
        return int(fixed + per_px * (tile + 2 * loaded.margin) ** 2)

    cuda = torch.device("cuda")
    tile = tile_for_budget(loaded.sr, cuda, torch.float16, 2 * 2**30, measure=measure)
    assert fixed + per_px * (tile + 2 * loaded.margin) ** 2 <= 2 * 2**30  # the largest that fits
    assert fixed + per_px * (tile + 1 + 2 * loaded.margin) ** 2 > 2 * 2**30 or tile == 1024
    with pytest.raises(BadParametersError) as err:
        tile_for_budget(loaded.sr, cuda, torch.float16, 256 * 2**20, measure=measure)
    assert "smallest tile" in err.value.message and "GiB" in err.value.message
