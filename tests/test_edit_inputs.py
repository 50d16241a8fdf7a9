"""The edit's one reader of input files (pipeline/edit_inputs.py), without a model: what it refuses
and why, before anything loads or is written."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from dit360_blender import params
from dit360_blender.pipeline.edit_inputs import read_edit_inputs, work_size
from dit360_blender.pipeline.errors import BadParametersError


def _params(tmp_path, **over):
    source = tmp_path / "source.png"
    if not source.exists():
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 64, 3), dtype=np.uint8)).save(source)
    mask = tmp_path / "mask.png"
    if not mask.exists():
        m = np.zeros((32, 64), np.uint8)
        m[8:16, 20:30] = 255
        Image.fromarray(m).save(mask)
    values = {"prompt": "p", "output_dir": str(tmp_path / "out"), "source": str(source), "mask": str(mask)}
    return params.check_params({**values, **over}, params.EDIT)


def test_a_good_mask_edit_reads_its_files(tmp_path):
    inputs = read_edit_inputs(_params(tmp_path, feather=0.0))
    assert inputs.canvas.shape == (32, 64, 3) and inputs.canvas.dtype == np.uint8
    assert inputs.mask.shape == (32, 64) and inputs.mask[10, 25] == 1 and inputs.mask[0, 0] == 0
    assert inputs.work_size == (64, 32) and not inputs.unroll and inputs.stem == "source-mask_0"


@pytest.mark.parametrize(
    "make, words",
    [
        (lambda d: Image.new("1", (20000, 10000)).save(d / "huge.png"), "more"),
        (
            lambda d: Image.fromarray(np.full((32, 64), 40000, np.uint16)).save(d / "deep.png"),
            "more than 8 bits",
        ),
        (lambda d: (d / "folder.png").mkdir(), "Could not read"),
    ],
)
def test_unusable_sources_are_refused_with_a_fix(tmp_path, make, words):
    make(tmp_path)
    name = next(p for p in tmp_path.iterdir() if p.name in ("huge.png", "deep.png", "folder.png"))
    with pytest.raises(BadParametersError) as info:
        read_edit_inputs(_params(tmp_path, source=str(name)))
    assert words in info.value.message and info.value.hint and str(name) in info.value.message
    assert not (tmp_path / "out").exists()


def test_the_working_size_is_the_nearest_multiple_of_16():
    assert work_size(2048, 1024) == (2048, 1024)
    assert work_size(120, 60) == (128, 64) and work_size(4000, 2000) == (4000, 2000)
    assert work_size(1000, 500) == (992, 496) and work_size(20, 10) == (32, 16)
