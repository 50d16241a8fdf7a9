"""The command line: help and doctor without weights, generate on the tiny models, and bad input."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import save_file
from test_panorama_exr import read_exr

from dit360_blender.cli import main
from dit360_blender.panorama.rgbe import read_hdr
from dit360_blender.pipeline.image_io import read_png_metadata
from dit360_blender.pipeline.output_files import plan_output

TINY = ["--width", "128", "--height", "64", "--steps", "3", "--quiet"]


def run_cli(*args, env_extra=None):
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run(
        [sys.executable, "-m", "dit360_blender", *args], capture_output=True, text=True, env=env, timeout=300
    )


@pytest.fixture
def empty_hf(tmp_path, monkeypatch):
    """An empty Hugging Face cache and no network: nothing can be found or downloaded."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path / "hf"


def test_help_works_without_weights():
    for args in (["--help"], ["generate", "--help"]):
        done = run_cli(*args)
        assert done.returncode == 0, done.stderr
        assert "usage" in done.stdout


def test_doctor_without_weights_lists_what_is_missing(tmp_path):
    done = run_cli("doctor", env_extra={"HF_HOME": str(tmp_path), "HF_HUB_CACHE": str(tmp_path / "hub")})
    assert done.returncode == 0, done.stderr
    assert "torch" in done.stdout
    assert "transformer     MISSING" in done.stdout
    assert "fix:" in done.stdout


def test_doctor_finds_the_tiny_models(tiny_models):
    done = run_cli("doctor", "--models-dir", str(tiny_models["root"]))
    assert "MISSING" not in done.stdout, done.stdout
    assert "flux1-dev.safetensors" in done.stdout


def test_generate_writes_png_with_metadata(tiny_models, tmp_path):
    out = tmp_path / "pano.png"
    done = run_cli("generate", "This is a panorama. A red desert", "--seed", "42", "--out", str(out),
                   "--models-dir", str(tiny_models["root"]), *TINY)  # fmt: skip
    assert done.returncode == 0, done.stderr
    image = np.asarray(Image.open(out))
    assert image.shape == (64, 128, 3)
    assert image.std() > 5  # a real image, not a flat fill
    meta = read_png_metadata(out)
    assert meta["prompt"] == "This is a panorama. A red desert"
    assert meta["seed"] == 42 and meta["steps"] == 3 and meta["guidance"] == 2.8
    assert meta["model"] == "black-forest-labs/FLUX.1-dev"
    assert meta["lora"] == "Insta360-Research/DiT360-Panorama-Image-Generation"
    assert "seam_z" in meta["seam"] and meta["lighting"]["exposure"] > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "pano.exr", "pano.hdr", "pano.png", "pano_lighting.exr", "pano_lighting.hdr"
    ]  # fmt: skip
    for stem in ("pano", "pano_lighting"):  # the EXR holds the light of the .hdr beside it
        exr = read_exr(tmp_path / f"{stem}.exr")[0].astype(np.float64)
        rgbe = read_hdr(tmp_path / f"{stem}.hdr").astype(np.float64)
        assert np.all(np.abs(exr - rgbe) <= rgbe.max(axis=-1, keepdims=True) / 128), stem


def test_generate_no_exr_writes_the_png_and_hdrs_only(tiny_models, tmp_path):
    out = tmp_path / "pano.png"
    done = run_cli("generate", "This is a panorama. A red desert", "--seed", "42", "--out", str(out),
                   "--models-dir", str(tiny_models["root"]), "--no-exr", *TINY)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pano.hdr", "pano.png", "pano_lighting.hdr"]
    assert "pano.exr" not in done.stdout and "pano.hdr" in done.stdout


def test_generate_default_name_is_slug_and_seed(tiny_models, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert (
        main(
            [
                "generate",
                "This is a panorama. Snowy Alps!",
                "--seed",
                "5",
                "--models-dir",
                str(tiny_models["root"]),
                *TINY,
            ]
        )
        == 0
    )
    assert (tmp_path / "snowy-alps_5.png").is_file()
    # the CLI names its file as the worker does (one naming rule: pipeline/output_files.py)
    assert plan_output(tmp_path / "elsewhere", "This is a panorama image. A beach", 5).name == "a-beach_5.png"


@pytest.mark.parametrize(
    "args,expected",
    [
        (["", "--seed", "1"], "prompt is empty"),
        (["   ", "--seed", "1"], "prompt is empty"),
        (["a beach", "--width", "130", "--height", "65"], "multiple of 16"),
        (["a beach", "--width", "256", "--height", "64"], "not 2:1"),
        (["a beach", "--steps", "0"], "steps must be a positive"),
        (["a beach", "--steps", "-3"], "steps must be a positive"),
    ],
)
def test_bad_parameters_are_refused_before_anything_happens(tmp_path, capsys, args, expected, empty_hf):
    out = tmp_path / "x.png"
    code = main(["generate", *args, "--out", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2
    assert expected in err and "fix:" in err
    assert list(tmp_path.iterdir()) == [empty_hf] or not out.exists()
    assert not out.exists()


def test_missing_weights_say_what_to_download(tmp_path, capsys, empty_hf):
    out = tmp_path / "x.png"
    code = main(["generate", "a beach", "--out", str(out), "--models-dir", str(tmp_path / "nothing"), *TINY])
    err = capsys.readouterr().err
    assert code == 1
    assert "flux1-dev.safetensors" in err and "--download" in err
    assert not out.exists()


def test_offline_download_names_the_files(tmp_path, capsys, empty_hf):
    out = tmp_path / "x.png"
    code = main(
        ["generate", "a beach", "--out", str(out), "--download", "--models-dir", str(tmp_path / "m"), *TINY]
    )
    err = capsys.readouterr().err
    assert code == 1
    assert "flux1-dev.safetensors" in err
    assert "fix:" in err
    assert not out.exists()


def _copy_models(tiny_models, tmp_path):
    root = tmp_path / "models"
    shutil.copytree(tiny_models["root"], root, ignore=shutil.ignore_patterns("transformer", "vae"))
    return root


def test_truncated_transformer_is_reported(tiny_models, tmp_path, capsys, empty_hf):
    root = _copy_models(tiny_models, tmp_path)
    path = root / "FLUX.1-dev" / "flux1-dev.safetensors"
    explicit = tmp_path / "cut.safetensors"
    explicit.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    out = tmp_path / "x.png"
    code = main(
        [
            "generate",
            "a beach",
            "--out",
            str(out),
            "--models-dir",
            str(root),
            "--transformer",
            str(explicit),
            *TINY,
        ]
    )
    err = capsys.readouterr().err
    assert code == 1
    assert "truncated" in err and "download" in err.lower()
    assert not out.exists()


def test_lora_with_foreign_keys_is_reported(tiny_models, tmp_path, capsys, empty_hf):
    import torch

    root = _copy_models(tiny_models, tmp_path)
    bad = tmp_path / "sdxl_lora.safetensors"
    save_file({"lora_unet_mid_block_attentions_0.lora_down.weight": torch.randn(4, 8),
               "lora_unet_mid_block_attentions_0.lora_up.weight": torch.randn(8, 4)}, str(bad))  # fmt: skip
    out = tmp_path / "x.png"
    code = main(
        ["generate", "a beach", "--out", str(out), "--models-dir", str(root), "--lora", str(bad), *TINY]
    )
    err = capsys.readouterr().err
    assert code == 1
    assert "lora_unet_mid_block_attentions_0" in err
    assert not out.exists()


def test_lora_extra_is_applied_and_recorded(tiny_models, tmp_path):
    from lora_files import bfl_style_lora
    from safetensors.torch import load_file

    flux = load_file(str(tiny_models["flux"] / "flux1-dev.safetensors"))
    style = bfl_style_lora(flux, tmp_path / "style.safetensors", "kohya", seed=3)
    images = []
    for extra in ([], ["--lora-extra", f"{style}:0.8"]):
        out = tmp_path / f"pano{len(images)}.png"
        done = run_cli("generate", "This is a panorama. A red desert", "--seed", "42", "--out", str(out),
                       "--models-dir", str(tiny_models["root"]), "--no-hdr", *extra, *TINY)  # fmt: skip
        assert done.returncode == 0, done.stderr
        images.append(np.asarray(Image.open(out)).astype(float))
    assert np.abs(images[1] - images[0]).mean() > 1  # the LoRA changed the world
    assert read_png_metadata(out)["loras"] == [{"file": "style.safetensors", "strength": 0.8}]


def test_unwritable_output_leaves_nothing(tiny_models, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    code = main(
        [
            "generate",
            "a beach",
            "--out",
            str(blocker / "x.png"),
            "--models-dir",
            str(tiny_models["root"]),
            *TINY,
        ]
    )
    err = capsys.readouterr().err
    assert code == 1
    assert "write" in err and "fix:" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]
