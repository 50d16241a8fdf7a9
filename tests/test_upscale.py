"""The wrap-aware, tiled super-resolution pass (pipeline/upscale.py) on tiny random networks (CPU).

References: the sphere around the image built pixel by pixel from its definition; a linear network
checked against float64 numpy correlation on that sphere; one untiled run of the network on the
extended image, cropped (what tiling must reproduce); nearest-neighbour networks whose chained
output is np.repeat. Rolling the input by whole columns rolls the output by scale x as many: the
wrap column is upscaled like any interior one, so no seam can appear there.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dit360_blender.panorama.seam import SEAM_MIN_PERIODS
from dit360_blender.pipeline.errors import BadParametersError
from dit360_blender.pipeline.make_upscale import seam_period
from dit360_blender.pipeline.upscale import SuperResolution, extend_sphere, plan_passes, upscale, upscale_pass

H, W = 24, 48


class TinySR(torch.nn.Module):
    """Three 3x3 convolutions (LeakyReLU between, as ESRGAN), pixel shuffle, plus the nearest-
    upsampled input: receptive-field radius 3 input pixels."""

    def __init__(self, scale: int, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.scale = scale
        self.body = torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 3, padding=1),
            torch.nn.LeakyReLU(0.2),
            torch.nn.Conv2d(8, 8, 3, padding=1),
            torch.nn.LeakyReLU(0.2),
            torch.nn.Conv2d(8, 3 * scale * scale, 3, padding=1),
        )
        for conv in self.body[::2]:
            torch.nn.init.normal_(conv.weight, std=0.15)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        up = F.interpolate(x, scale_factor=self.scale, mode="nearest")
        return up + 0.1 * F.pixel_shuffle(self.body(x), self.scale)


class Nearest(torch.nn.Module):
    def __init__(self, scale: int) -> None:
        super().__init__()
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, scale_factor=self.scale, mode="nearest")


def panorama(seed: int = 0, height: int = H, width: int = W) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).uniform(0.0, 1.0, (3, height, width))).float()


def sphere_by_definition(image: np.ndarray, margin: int) -> np.ndarray:
    """Pixel (r, c) of the extended image, r and c counted from the original's top-left corner."""
    _, height, width = image.shape
    out = np.empty((3, height + 2 * margin, width + 2 * margin), image.dtype)
    for r in range(-margin, height + margin):
        for c in range(-margin, width + margin):
            if r < 0:  # past the north pole: row -1-r, half a turn around
                src = (-1 - r, (c + width // 2) % width)
            elif r >= height:  # past the south pole
                src = (2 * height - 1 - r, (c + width // 2) % width)
            else:
                src = (r, c % width)
            out[:, r + margin, c + margin] = image[:, src[0], src[1]]
    return out


def untiled(model: SuperResolution, image: torch.Tensor) -> torch.Tensor:
    """The network once over the whole extended image, the margin cropped: what tiling must give."""
    m, s = model.margin, model.scale
    ext = torch.from_numpy(sphere_by_definition(image.numpy(), m))
    with torch.inference_mode():
        out = model.module(ext[None])[0]
    return out[:, m * s : (m + image.shape[1]) * s, m * s : (m + image.shape[2]) * s].clamp(0.0, 1.0)


def test_the_extension_is_the_sphere_around_the_image():
    image = panorama(1)
    for margin in (0, 1, 5, H):
        got = extend_sphere(image, margin).numpy()
        assert np.array_equal(got, sphere_by_definition(image.numpy(), margin)), margin
    with pytest.raises(ValueError):
        extend_sphere(panorama(1, width=W - 1), 2)  # an odd width has no half turn


def test_a_pass_equals_float64_correlation_on_the_sphere():
    torch.manual_seed(3)
    conv = torch.nn.Conv2d(3, 12, 3, padding=1, bias=False)
    with torch.no_grad():
        conv.weight.uniform_(0.0, 1.0 / 27)  # outputs stay within [0, 1]: the clamp changes nothing
    model = SuperResolution(torch.nn.Sequential(conv, torch.nn.PixelShuffle(2)), scale=2, margin=1)
    image = panorama(4)
    got = upscale_pass(image, model, tile=10).numpy()  # 3 x 5 tiles, the last ones overlapping
    ext = sphere_by_definition(image.numpy().astype(np.float64), 1)
    weight = conv.weight.detach().numpy().astype(np.float64)
    corr = np.zeros((12, H, W))
    for dy in range(3):
        for dx in range(3):
            corr += np.einsum("oc,chw->ohw", weight[:, :, dy, dx], ext[:, dy : dy + H, dx : dx + W])
    expected = corr.reshape(3, 2, 2, H, W).transpose(0, 3, 1, 4, 2).reshape(3, 2 * H, 2 * W)
    assert got.shape == (3, 2 * H, 2 * W) and np.abs(got - expected).max() < 1e-6


def test_tiles_give_the_untiled_result_and_need_the_whole_margin():
    image = panorama(5)
    model = SuperResolution(TinySR(2, seed=6), scale=2, margin=3)
    reference = untiled(model, image)
    for tile in (7, 16, 100):
        got = upscale_pass(image, model, tile=tile)
        assert (got - reference).abs().max() <= 1e-5, tile
    short = SuperResolution(model.module, scale=2, margin=2)  # one pixel less than the network reads
    assert (upscale_pass(image, short, tile=7) - untiled(short, image)).abs().max() > 1e-4


@pytest.mark.parametrize("shift", [1, 7, W // 2, W - 3])
def test_rolling_the_input_rolls_the_output_so_the_wrap_has_no_seam(shift):
    image = panorama(8)
    model = SuperResolution(TinySR(4, seed=9), scale=4, margin=3)
    plain = upscale_pass(image, model, tile=11)
    rolled = upscale_pass(torch.roll(image, shift, dims=-1), model, tile=11)
    assert (rolled - torch.roll(plain, 4 * shift, dims=-1)).abs().max() <= 1e-5


def test_chained_passes_and_the_box_filter_reach_the_asked_width():
    image = panorama(10)
    repeat = np.repeat(np.repeat(image.numpy(), 8, axis=1), 8, axis=2)
    x2 = SuperResolution(Nearest(2), scale=2, margin=0)
    assert np.array_equal(upscale(image, x2, 8 * W, tile=9).numpy(), repeat)  # three ×2 passes
    x4 = SuperResolution(Nearest(4), scale=4, margin=0)
    # ×4 twice is ×16, boxed down by 2 to ×8
    assert np.abs(upscale(image, x4, 8 * W, tile=9).numpy() - repeat).max() < 1e-6
    assert plan_passes(2048, 8192, 4) == (1, 1) and plan_passes(2048, 16384, 4) == (2, 2)
    assert plan_passes(2048, 16384, 2) == (3, 1) and plan_passes(2048, 2048, 4) == (0, 1)


def test_the_seam_is_scored_on_the_grid_of_the_source_pixels():
    # the output columns where a new source pixel begins repeat every `period` columns
    for source, width in ((512, 8192), (2048, 4096), (768, 4096), (2048, 2048)):
        period = seam_period(source, width)
        starts = {int(np.floor(i * width / source)) for i in range(source)}
        assert all(x in starts for x in range(0, width, period)), (source, width)
        assert width % period == 0 and (period == 1 or width // period >= SEAM_MIN_PERIODS)
    assert [seam_period(s, w) for s, w in ((512, 8192), (768, 4096), (2048, 2048))] == [16, 16, 1]
    assert seam_period(100, 4096) == 1  # 4096/100 = 1024/25: four periods are too few to compare


def test_sizes_a_model_cannot_reach_are_refused_with_the_ones_it_can():
    with pytest.raises(BadParametersError) as err:
        plan_passes(2048, 4096, 3)  # one ×3 pass gives 6144: no whole factor takes it to 4096
    assert "6144" in err.value.message and "6144" in err.value.hint
    with pytest.raises(BadParametersError):
        plan_passes(2048, 1024, 4)


def test_half_precision_tiles_stay_close_and_come_back_as_float32():
    image = panorama(11)
    model = SuperResolution(TinySR(2, seed=12), scale=2, margin=3)
    reference = untiled(model, image)
    seen = []
    got = upscale_pass(image, model, tile=16, dtype=torch.bfloat16, on_tile=lambda i, n: seen.append((i, n)))
    assert got.dtype == torch.float32 and got.device.type == "cpu"
    assert (got - reference).abs().max() < 0.03  # bf16's 8-bit mantissa
    assert seen == [(i, 6) for i in range(1, 7)]  # rows from 0 and 8, columns from 0, 16 and 32
