"""The edit geometry (panorama/projection.py, panorama/masks.py) against independent math.

References written out here, not taken from the code under test: a pinhole camera built from the
azimuth/elevation of `sphere.direction_from_angles` and rotated with Rodrigues' formula; the angular
distance to a frame's edge found by brute force over densely sampled points of its sides; exact
block means for area resizing; EXIF focal lengths written by Pillow and the textbook
2 atan(36 / 2f). Blender's own renders of the same cameras are tests/test_edit_geometry_blender.py.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image
from test_panorama_cubemap import field

from dit360_blender.panorama import masks, projection, sphere
from dit360_blender.panorama.masks import GeometryError

RNG = np.random.default_rng(1414)


def rodrigues(axis: np.ndarray, degrees: float) -> np.ndarray:
    axis = axis / np.linalg.norm(axis)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    t = math.radians(degrees)
    return np.eye(3) + math.sin(t) * k + (1 - math.cos(t)) * k @ k


def reference_camera(yaw: float, pitch: float, roll: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(forward, right, up) of a camera: forward at (yaw, pitch) on the sphere, right horizontal
    and clockwise of forward seen from above, both turned about forward by -roll (Blender's local Z
    points backwards, so a turn about it by +roll is a turn about forward by -roll)."""
    forward = sphere.direction_from_angles(yaw, pitch)
    right = sphere.direction_from_angles(yaw - 90.0, 0.0)
    up = np.cross(right, forward)
    turn = rodrigues(forward, -roll)
    return forward, turn @ right, turn @ up


def reference_inside(directions, yaw, pitch, roll, hfov, aspect) -> np.ndarray:
    forward, right, up = reference_camera(yaw, pitch, roll)
    z = directions @ forward
    with np.errstate(divide="ignore", invalid="ignore"):
        x, y = (directions @ right) / z, (directions @ up) / z
    half_w = math.tan(math.radians(hfov) / 2)
    return (z > 0) & (np.abs(x) <= half_w) & (np.abs(y) <= half_w / aspect)


def reference_edge_distance(directions, yaw, pitch, roll, hfov, aspect, n=2000) -> np.ndarray:
    """Brute force: degrees to the nearest of n points along each side of the frame."""
    forward, right, up = reference_camera(yaw, pitch, roll)
    half_w = math.tan(math.radians(hfov) / 2)
    half_h = half_w / aspect
    t = np.linspace(-1, 1, n)[:, None]
    sides = [
        forward + half_w * right + t * half_h * up,
        forward - half_w * right + t * half_h * up,
        forward + half_h * up + t * half_w * right,
        forward - half_h * up + t * half_w * right,
    ]
    points = np.concatenate(sides)
    points /= np.linalg.norm(points, axis=1, keepdims=True)
    return np.degrees(np.arccos(np.clip((directions @ points.T).max(axis=1), -1, 1)))


def random_directions(n: int) -> np.ndarray:
    d = RNG.normal(size=(n, 3))
    return d / np.linalg.norm(d, axis=1, keepdims=True)


CAMERAS = [(0.0, 0.0, 0.0, 60.0, 1.5), (35.0, 20.0, 15.0, 75.0, 1.0), (-170.0, -55.0, -40.0, 100.0, 0.6),
           (120.0, 80.0, 5.0, 40.0, 2.0)]  # fmt: skip


@pytest.mark.parametrize(
    "yaw,pitch,roll", [(0, 0, 0), (35, 20, 15), (-170, -55, -40), (120, 80, 5), (10, -89, 30)]
)
def test_camera_matrix_is_the_reference_camera_and_view_angles_inverts_it(yaw, pitch, roll):
    m = projection.camera_matrix(yaw, pitch, roll)
    forward, right, up = reference_camera(yaw, pitch, roll)
    assert np.allclose(m[:, 0], right, atol=1e-12) and np.allclose(m[:, 1], up, atol=1e-12)
    assert np.allclose(-m[:, 2], forward, atol=1e-12)
    assert np.allclose(m.T @ m, np.eye(3), atol=1e-12) and np.linalg.det(m) == pytest.approx(1.0)
    assert projection.view_angles(m) == pytest.approx((yaw, pitch, roll), abs=1e-7)
    # a scaled camera object: its rotation is still found
    assert projection.view_angles(m * 2.5) == pytest.approx((yaw, pitch, roll), abs=1e-7)


def test_view_angles_through_a_mapping_node_equal_the_texture_frame_camera():
    rotation = (0.3, -0.2, 1.1)
    mapping = projection.mapping_matrix(rotation)
    # the Mapping node reads the image at R d: R = Rz Ry Rx (Blender's Euler XYZ), written out
    r = rodrigues(np.array([0, 0, 1.0]), math.degrees(1.1)) @ rodrigues(
        np.array([0, 1.0, 0]), math.degrees(-0.2)
    )
    r = r @ rodrigues(np.array([1.0, 0, 0]), math.degrees(0.3))
    assert np.allclose(mapping, r, atol=1e-12)
    world = projection.camera_matrix(40, 15, 10)
    yaw, pitch, roll = projection.view_angles(world, mapping)
    assert np.allclose(projection.camera_matrix(yaw, pitch, roll), r @ world, atol=1e-9)
    assert np.allclose(projection.mapping_matrix(rotation, vector_type="TEXTURE"), r.T, atol=1e-12)
    with pytest.raises(GeometryError, match="Point"):
        projection.mapping_matrix(rotation, vector_type="NORMAL")


@pytest.mark.parametrize("camera", CAMERAS)
def test_signed_distance_to_the_frame_is_the_brute_force_distance(camera):
    yaw, pitch, roll, hfov, aspect = camera
    d = random_directions(3000)
    forward = sphere.direction_from_angles(yaw, pitch)
    near = d + 1.5 * forward  # more directions near the frame
    d = np.concatenate([d, near / np.linalg.norm(near, axis=1, keepdims=True)])
    ours = projection.view_signed_distance(d, yaw, pitch, hfov, aspect, roll)
    inside = reference_inside(d, yaw, pitch, roll, hfov, aspect)
    assert np.array_equal(ours >= 0, inside)
    assert 0.05 < inside.mean() < 0.95
    reference = reference_edge_distance(d, yaw, pitch, roll, hfov, aspect)
    # the brute force samples each side every 2/2000 of it: < 0.03 degrees off
    assert np.abs(np.abs(ours) - reference).max() < 0.05


@pytest.mark.parametrize("camera", CAMERAS)
def test_view_mask_marks_exactly_the_pixels_the_camera_sees_and_feathers_outward(camera):
    yaw, pitch, roll, hfov, aspect = camera
    h, w = 64, 128
    hard = projection.view_mask(w, h, yaw, pitch, hfov, aspect, roll)
    u, v = sphere.uv_from_pixel(*np.mgrid[0:h, 0:w], h, w)
    dirs = sphere.direction_from_uv(u, v)
    assert np.array_equal(
        hard == 1, reference_inside(dirs.reshape(-1, 3), yaw, pitch, roll, hfov, aspect).reshape(h, w)
    )
    assert set(np.unique(hard)) == {0.0, 1.0}
    soft = projection.view_mask(w, h, yaw, pitch, hfov, aspect, roll, feather=8.0)
    distance = reference_edge_distance(dirs.reshape(-1, 3), yaw, pitch, roll, hfov, aspect, 1000).reshape(
        h, w
    )
    assert np.all(soft[hard == 1] == 1.0)  # all the camera sees stays regenerated
    outside = hard == 0
    assert np.all(soft[outside & (distance > 8.05)] == 0.0)  # exactly 0 beyond the feather
    t = np.clip(1 - distance / 8.0, 0, 1)
    assert np.abs(soft[outside] - (t * t * (3 - 2 * t))[outside]).max() < 0.02


def test_feather_mask_of_a_hard_view_mask_matches_the_exact_feather_and_keeps_zeros_exact():
    h, w = 256, 512
    for yaw, pitch, roll, hfov, aspect in [(30, 10, 0, 60, 1.5), (180, -70, 20, 110, 1.0)]:  # wrap, pole
        hard = projection.view_mask(w, h, yaw, pitch, hfov, aspect, roll)
        exact = projection.view_mask(w, h, yaw, pitch, hfov, aspect, roll, feather=6.0)
        ours = masks.feather_mask(hard, 6.0)
        assert np.abs(ours - exact).mean() < 2e-3 and np.abs(ours - exact).max() < 0.15  # half-pixel edges
        assert np.all(ours[hard == 1] == 1)
        far = projection.view_mask(w, h, yaw, pitch, hfov, aspect, roll, feather=7.0) == 0
        assert np.all(ours[far] == 0.0)  # bit-exact zeros away from the mask


def test_feather_mask_wraps_across_the_seam_and_keeps_soft_values():
    h, w = 128, 256
    m = np.zeros((h, w), np.float32)
    m[60:68, 0:3] = 1.0  # at the left edge: its feather must reach the right edge's columns
    m[20:24, 100:104] = 0.7  # soft marked values are kept as they are
    m[100, 200] = 0.3  # below 0.5: not a source of feather, kept
    out = masks.feather_mask(m, 5.0)
    # columns are 1.4 degrees apart; the edge lies half a column beyond the last marked one
    assert out[64, w - 2] > 0.5 and out[64, w - 3] > 0  # 2.1 and 3.5 degrees across the wrap
    assert out[64, w - 5] == 0 and out[64, 8] == 0  # 6.3 degrees on either side: beyond the feather
    assert np.all(out[20:24, 100:104] == np.float32(0.7)) and out[100, 200] == np.float32(0.3)
    assert masks.feather_mask(np.zeros((h, w), np.float32), 5.0).max() == 0.0
    with pytest.raises(GeometryError):
        masks.feather_mask(m, -1.0)


def smooth_photo(h: int, w: int) -> np.ndarray:
    """A smooth colour photo (values 0.1..0.9) whose detail is a few pixels wide."""
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    return np.stack(
        [
            0.5 + 0.4 * np.sin(9 * x + 4 * y),
            0.5 + 0.4 * np.cos(7 * y - 3 * x),
            0.5 + 0.4 * np.sin(5 * (x + y)),
        ],
        -1,
    )


def test_photo_to_panorama_and_back_reproduces_the_photo():
    photo = smooth_photo(45, 60)
    yaw, pitch, hfov = -25.0, 12.0, 50.0
    # a 1024-px panorama holds 1024 tan(25°)/pi = 151 px over 50 degrees: the photo is well inside
    rgb, coverage = projection.photo_to_equirect(photo, 1024, 512, hfov, yaw, pitch)
    assert rgb.shape == (512, 1024, 3) and rgb.dtype == np.float32
    back = projection.equirect_to_perspective(rgb, 60, 45, yaw, pitch, hfov)
    err = np.abs(back - photo)
    assert err.mean() < 2e-3 and err[1:-1, 1:-1].max() < 0.02, (err.mean(), err.max())
    # the coverage is exactly where the pixel centres land on the photo
    u, v = sphere.uv_from_pixel(*np.mgrid[0:512, 0:1024], 512, 1024)
    dirs = sphere.direction_from_uv(u, v).reshape(-1, 3)
    forward, right, up = reference_camera(yaw, pitch, 0.0)
    z = dirs @ forward
    half_w = math.tan(math.radians(hfov / 2))
    with np.errstate(divide="ignore", invalid="ignore"):
        col = ((dirs @ right) / z / half_w + 1) / 2 * 60 - 0.5
        row = (1 - (dirs @ up) / z / (half_w * 45 / 60)) / 2 * 45 - 0.5
    hit = (z > 0) & (col >= -0.5) & (col <= 59.5) & (row >= -0.5) & (row <= 44.5)
    assert np.array_equal(coverage.reshape(-1) == 1, hit)
    assert np.allclose(rgb.reshape(-1, 3)[~hit], photo.reshape(-1, 3).mean(axis=0), atol=1e-6)


def test_a_panorama_pixel_on_a_photo_pixel_centre_gets_its_value_exactly():
    h, w = 512, 1024
    photo = RNG.integers(0, 256, size=(9, 11, 3)).astype(np.float64) / 255.0
    # look exactly at the centre of panorama pixel (200, 700): the photo's centre pixel (4, 5) lands there
    u, v = sphere.uv_from_pixel(200, 700, h, w)
    yaw, pitch = sphere.angles_from_direction(sphere.direction_from_uv(u, v))
    rgb, coverage = projection.photo_to_equirect(photo, w, h, 8.0, yaw, pitch)
    assert coverage[200, 700] == 1
    assert np.abs(rgb[200, 700] - photo[4, 5]).max() < 1e-6  # float32 of the exact value
    # and the coverage is the photo's patch: 8 x 6.5 degrees at ~3 pixels per degree
    assert 380 < coverage.sum() < 520


def test_photo_errors_name_the_cause():
    photo = smooth_photo(30, 40)
    for bad in (0.0, -5.0, 180.0, 200.0, float("nan")):
        with pytest.raises(GeometryError, match="field of view"):
            projection.photo_to_equirect(photo, 256, 128, bad)
    limit = projection.max_photo_width(60.0, 256)
    assert limit == math.floor(256 * math.tan(math.radians(30)) / math.pi)  # 47
    with pytest.raises(GeometryError, match=f"at most {limit} px"):
        projection.photo_to_equirect(smooth_photo(40, limit + 1), 256, 128, 60.0)
    projection.photo_to_equirect(smooth_photo(30, limit), 256, 128, 60.0)  # at the limit: fine
    with pytest.raises(GeometryError, match="covers no pixel"):
        projection.photo_to_equirect(smooth_photo(1, 1), 256, 128, 0.01, 0.5, 0.3)
    big = smooth_photo(300, 400)
    fitted = projection.fit_photo(big, 60.0, 256)
    assert fitted.shape == (round(300 * limit / 400), limit, 3)
    assert np.allclose(fitted.mean(axis=(0, 1)), big.mean(axis=(0, 1)), atol=2e-3)  # area averages
    assert projection.fit_photo(photo, 60.0, 256) is photo


def test_exif_field_of_view(tmp_path):
    def jpeg(name, size, tags, ifd_tags=None):
        image = Image.new("RGB", size, (120, 90, 60))
        exif = Image.Exif()
        for k, v in tags.items():
            exif[k] = v
        if ifd_tags:
            exif.get_ifd(0x8769).update(ifd_tags)
        path = tmp_path / name
        image.save(path, exif=exif)
        return path

    # 28 mm full-frame equivalent: 2 atan(36 / 56)
    p = jpeg("f35.jpg", (60, 40), {}, {0xA405: 28})
    assert projection.exif_hfov(p) == pytest.approx(math.degrees(2 * math.atan(36 / 56)), abs=1e-9)
    # a 4.25 mm lens on a 6.4 mm wide sensor: 4000 px at 625 px per mm (resolution unit 4 = mm)
    p = jpeg("focal.jpg", (60, 40), {}, {0x920A: 4.25, 0xA20E: 625.0, 0xA210: 4, 0xA002: 4000})
    assert projection.exif_hfov(p) == pytest.approx(math.degrees(2 * math.atan(3.2 / 4.25)), abs=1e-6)
    # a portrait shot stored turned (Orientation 6): the width is the short side
    p = jpeg("portrait.jpg", (60, 40), {0x0112: 6}, {0xA405: 28})
    half_long = math.atan(36 / 56)
    assert projection.exif_hfov(p) == pytest.approx(
        math.degrees(2 * math.atan(math.tan(half_long) * 40 / 60))
    )
    assert projection.exif_hfov(jpeg("none.jpg", (60, 40), {})) is None
    (tmp_path / "text.jpg").write_text("not an image")
    assert projection.exif_hfov(tmp_path / "text.jpg") is None


def test_resize_mask_area_averages_down_and_keeps_its_place_up():
    blocks = RNG.random((16, 32)).astype(np.float32)
    big = np.kron(blocks, np.ones((8, 8), np.float32))  # 128 x 256 of 8x8 blocks
    assert np.allclose(masks.resize_mask(big, 32, 16), blocks, atol=1e-6)
    # 8-bit grey and RGB images are masks too (white = 1)
    grey = (big * 255).round().astype(np.uint8)
    assert np.allclose(masks.resize_mask(grey, 32, 16), blocks, atol=1 / 255)
    assert np.allclose(masks.resize_mask(np.stack([grey] * 3, -1), 32, 16), blocks, atol=1 / 255)
    # alpha painted over a constant colour is the mask
    rgba = np.zeros((128, 256, 4), np.uint8)
    rgba[..., 3] = grey
    assert np.allclose(masks.resize_mask(rgba, 32, 16), blocks, atol=1 / 255)
    # upsampled: a marked block stays where it was (its centre in the same direction)
    small = np.zeros((16, 32), np.float32)
    small[5, 9] = 1.0
    up = masks.resize_mask(small, 256, 128)
    r, c = np.unravel_index(up.argmax(), up.shape)
    assert abs((r + 0.5) / 128 - (5 + 0.5) / 16) < 1 / 128 and abs((c + 0.5) / 256 - (9 + 0.5) / 32) < 1 / 256
    # a pixel of rounding is fine; another aspect is refused with the shape to use
    assert masks.resize_mask(np.ones((100, 201), np.float32), 256, 128).shape == (128, 256)
    with pytest.raises(GeometryError, match="256x128"):
        masks.resize_mask(np.ones((100, 150), np.float32), 256, 128)
    with pytest.raises(GeometryError, match="NaN"):
        masks.resize_mask(np.full((64, 128), np.nan, np.float32), 256, 128)


def test_seam_band_sits_on_the_old_seam_and_nothing_outside_it_changes():
    h, w = 64, 360
    band = masks.seam_band_mask(w, h, 20.0)
    offset = np.abs((np.arange(w) + 0.5) / w - 0.5) * 360  # degrees from the middle of the rolled image
    assert np.array_equal(band[0] > 0, offset < 10.0)  # the band's 20 degrees, no more
    assert np.all(band[:, offset <= 5.0] == 1.0)  # the core (band minus a quarter each side)
    assert np.all(band == band[0])  # every row
    assert np.allclose(band[0], band[0, ::-1])  # symmetric about the old seam
    assert np.all(np.diff(band[0, : w // 2]) >= 0)  # rising towards it
    # rolled back, the band covers the wrap: the first and last columns
    source = RNG.random((h, w, 3)).astype(np.float32)
    rolled = masks.roll_half(source)
    assert np.array_equal(rolled[:, w // 2], source[:, 0]) and np.array_equal(
        rolled[:, w // 2 - 1], source[:, -1]
    )
    assert np.array_equal(masks.unroll_half(rolled), source)
    new = RNG.random((h, w, 3)).astype(np.float32)
    m = band[..., None]
    repaired = masks.unroll_half(m * new + (1 - m) * rolled)
    outside = masks.unroll_half(band) == 0
    assert np.array_equal(repaired[outside], source[outside])  # bit for bit
    assert not np.array_equal(repaired[~outside], source[~outside])
    with pytest.raises(GeometryError, match="narrower than a pixel"):
        masks.seam_band_mask(w, h, 0.5)
    with pytest.raises(GeometryError):
        masks.seam_band_mask(w, h, 0.0)
    with pytest.raises(GeometryError, match="even width"):
        masks.roll_half(np.zeros((4, 7)))


def test_equirect_to_perspective_samples_the_field_at_the_reference_rays():
    h, w = 256, 512
    u, v = sphere.uv_from_pixel(*np.mgrid[0:h, 0:w], h, w)
    pano = field(sphere.direction_from_uv(u, v))
    yaw, pitch, roll, hfov = 150.0, -20.0, 25.0, 70.0
    view = projection.equirect_to_perspective(pano, 40, 30, yaw, pitch, hfov, roll)
    forward, right, up = reference_camera(yaw, pitch, roll)
    half_w = math.tan(math.radians(hfov / 2))
    x = ((np.arange(40) + 0.5) / 40 * 2 - 1) * half_w
    y = (1 - (np.arange(30) + 0.5) / 30 * 2) * half_w * 30 / 40
    rays = forward + x[None, :, None] * right + y[:, None, None] * up
    assert np.abs(view - field(rays)).max() < 2e-3  # bilinear on a smooth field
