"""spandrel-loaded super-resolution models in the wrap-aware tiled upscale (pipeline/sr_models.py +
pipeline/upscale.py), on tiny random networks of spandrel's own architectures saved as .pth and
.safetensors (run inside .venv-sr; see tests/test_upscale_models.py).

References: the network we built, run directly on the same input (what loading must reproduce); one
untiled run of it over the panorama extended as the sphere continues it by far more than the network
reaches (what tiling must reproduce); the same with the input rolled by whole columns (the wrap).
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from sr_nets import build, save
from test_upscale import sphere_by_definition

from dit360_blender.pipeline.errors import BadCheckpointError, BadParametersError, WeightsMissingError
from dit360_blender.pipeline.sr_models import load_sr_model as _load
from dit360_blender.pipeline.sr_models import receptive_margin
from dit360_blender.pipeline.upscale import upscale, upscale_pass

H, W = 24, 48
CASES = [  # name, spandrel's architecture name, scale
    ("esrgan_x4", "ESRGAN", 4),
    ("esrgan_x2", "ESRGAN", 2),
    ("compact_x4", "RealESRGAN Compact", 4),
    ("swinir_x2", "SwinIR", 2),
]


@functools.cache
def load_sr_model(path, dtype="auto"):
    """Each file loaded once per module (the margin probe is the slow part)."""
    return _load(path, dtype=dtype)


def panorama(seed: int, height: int = H, width: int = W) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).uniform(0.0, 1.0, (3, height, width))).float()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sr")
    out = {}
    for name, _, _ in CASES:
        net = build(name)
        out[name] = (net, save(net, folder / f"{name}.pth"), save(net, folder / f"{name}.safetensors"))
    return out


@pytest.mark.parametrize("name,arch,scale", CASES)
def test_spandrel_loads_each_file_as_the_network_that_was_saved(files, name, arch, scale):
    net, pth, st = files[name]
    x = panorama(1, 16, 16)[None]
    with torch.no_grad():
        expected = net.eval()(x)
    for path in (pth, st):
        loaded = load_sr_model(path)
        assert (loaded.architecture, loaded.scale, loaded.path) == (arch, scale, path)
        assert loaded.dtype == torch.float32 and 0 < loaded.margin < 48 and not loaded.margin_capped
        with torch.no_grad():
            got = loaded.sr.module(x)
        assert got.shape == (1, 3, 16 * scale, 16 * scale)
        assert (got - expected).abs().max() < 1e-6, path.name


def untiled_reference(module, scale: int, image: torch.Tensor, reach: int) -> torch.Tensor:
    """The network once over the whole panorama extended by `reach` (more than it sees), cropped."""
    ext = torch.from_numpy(sphere_by_definition(image.numpy(), reach))
    with torch.no_grad():
        out = module(ext[None])[0]
    return out[
        :, reach * scale : (reach + image.shape[1]) * scale, reach * scale : (reach + image.shape[2]) * scale
    ]


@pytest.mark.parametrize("name", ["esrgan_x4", "compact_x4"])
def test_tiles_with_the_measured_margin_equal_one_untiled_run(files, name):
    loaded = load_sr_model(files[name][2])
    image = panorama(2)
    reference = untiled_reference(loaded.sr.module, loaded.scale, image, reach=H).clamp(0, 1)  # reach 24 > 19
    for tile in (9, 30):
        got = upscale_pass(image, loaded.sr, tile=tile)
        assert (got - reference).abs().max() <= 1e-5, (name, tile, loaded.margin)


@pytest.mark.parametrize("name,shift", [("esrgan_x4", 1), ("esrgan_x4", 23), ("compact_x4", W // 2)])
def test_rolling_the_input_rolls_the_output(files, name, shift):
    loaded = load_sr_model(files[name][1])
    image = panorama(3)
    plain = upscale_pass(image, loaded.sr, tile=12)
    rolled = upscale_pass(torch.roll(image, shift, dims=-1), loaded.sr, tile=12)
    assert (rolled - torch.roll(plain, loaded.scale * shift, dims=-1)).abs().max() <= 1e-5


def test_the_measured_margin_is_the_reach_of_a_network_of_known_reach():
    # five 3x3 convolutions: an output pixel sees exactly 5 input pixels each side, and no further
    torch.manual_seed(4)
    layers = [torch.nn.Conv2d(3 if i == 0 else 6, 6, 3, padding=1) for i in range(4)]
    net = torch.nn.Sequential(*layers, torch.nn.Conv2d(6, 12, 3, padding=1), torch.nn.PixelShuffle(2))
    assert receptive_margin(net, 2, cap=16, tolerance=0.0) == (5, 0.0)
    margin, residual = receptive_margin(net, 2, cap=3, tolerance=0.0)
    assert margin == 3 and residual > 0  # capped: what lies beyond is reported


def test_chained_passes_of_a_loaded_model_reach_the_width_and_a_x3_model_cannot_make_4x():
    x2 = load_sr_model(build_and_save("esrgan_x2"))
    image = panorama(5, 16, 32)
    out = upscale(image, x2.sr, 128, tile=16)  # two x2 passes
    assert out.shape == (3, 64, 128)
    x3 = load_sr_model(build_and_save("compact_x3"))
    with pytest.raises(BadParametersError) as err:
        upscale(image, x3.sr, 128, tile=16)  # 32 -> 96 -> 288: no whole factor gives 128
    assert "288" in err.value.message and "96" in err.value.hint


def test_half_precision_on_request_and_refused_where_the_architecture_does_not_support_it(files):
    loaded = load_sr_model(files["esrgan_x4"][1], dtype="bf16")
    assert loaded.dtype == torch.bfloat16
    image = panorama(6)
    reference = upscale_pass(image, load_sr_model(files["esrgan_x4"][1]).sr, tile=16)
    assert (upscale_pass(image, loaded.sr, tile=16, dtype=torch.bfloat16) - reference).abs().max() < 0.05
    with pytest.raises(BadParametersError) as err:
        load_sr_model(files["swinir_x2"][1], dtype="fp16")  # spandrel: SwinIR does not support fp16
    assert "swinir_x2.pth" in err.value.message and "fp16" in err.value.message


def build_and_save(name: str):
    import tempfile
    from pathlib import Path

    return save(build(name), Path(tempfile.mkdtemp()) / f"{name}.safetensors")


def test_files_that_are_not_upscale_models_get_errors_naming_the_file_and_spandrels_words(tmp_path):
    unknown = tmp_path / "mystery.safetensors"
    from safetensors.torch import save_file

    save_file({"encoder.layer.0.weight": torch.rand(4, 4), "head.bias": torch.rand(4)}, str(unknown))
    with pytest.raises(BadCheckpointError) as err:
        load_sr_model(unknown)
    assert str(unknown) in err.value.message and "spandrel" in err.value.message
    assert "unsupported model architecture" in err.value.message

    garbage = tmp_path / "notes.pth"
    garbage.write_text("not a model")
    with pytest.raises(BadCheckpointError) as err:
        load_sr_model(garbage)
    assert str(garbage) in err.value.message and "spandrel said" in err.value.message

    with pytest.raises(WeightsMissingError) as err:
        load_sr_model(tmp_path / "absent.pth")
    assert "absent.pth" in err.value.message

    evil = tmp_path / "evil.pth"  # a pickle that would run code: spandrel's unpickler refuses it
    import pickle

    class Boom:
        def __reduce__(self):
            return (print, ("ran",))

    evil.write_bytes(pickle.dumps({"w": Boom()}))
    with pytest.raises(BadCheckpointError) as err:
        load_sr_model(evil)
    assert "forbidden" in err.value.message
