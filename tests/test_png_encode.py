"""The threaded PNG encoder: Pillow's decoder (an independent reader) gives back every pixel and
text chunk, zlib checks the joined stream's adler32, and a failed write leaves no file."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from dit360_blender.panorama.png_encode import _adler32_combine, write_png_rgb
from dit360_blender.pipeline.image_io import read_png_metadata, save_png


def _chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    out, pos = [], 8
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, payload = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert crc == zlib.crc32(kind + payload), kind
        out.append((kind, payload))
        pos += 12 + length
    return out


@pytest.mark.parametrize(
    ("height", "width", "threads"),
    [(1, 1, 1), (3, 5, 4), (257, 130, 3), (700, 700, 7)],  # 700²: noise is > 1 IDAT chunk
)
def test_pillow_decodes_every_pixel(height, width, threads):
    rng = np.random.default_rng(height * 31 + width)
    rgb = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    write_png_rgb(buf, rgb, {"Software": "test"}, threads=threads)
    data = buf.getvalue()
    chunks = _chunks(data)
    assert chunks[0][0] == b"IHDR" and chunks[-1] == (b"IEND", b"")
    idat = b"".join(p for k, p in chunks if k == b"IDAT")
    raw = zlib.decompress(idat)  # raises on a wrong adler32 or a broken band join
    assert len(raw) == height * (width * 3 + 1)
    with Image.open(io.BytesIO(data)) as im:
        assert im.mode == "RGB" and im.size == (width, height)
        np.testing.assert_array_equal(np.asarray(im), rgb)


def test_a_smooth_image_compresses():
    y, x = np.mgrid[0:256, 0:512]
    rgb = np.stack([x % 256, y, (x + y) % 256], -1).astype(np.uint8)
    buf = io.BytesIO()
    write_png_rgb(buf, rgb, {}, threads=2)
    assert len(buf.getvalue()) < rgb.nbytes / 20
    with Image.open(io.BytesIO(buf.getvalue())) as im:
        np.testing.assert_array_equal(np.asarray(im), rgb)


def test_adler32_combine_equals_zlib():
    rng = np.random.default_rng(5)
    for _ in range(20):
        a, b = (rng.integers(0, 256, rng.integers(0, 200_000), dtype=np.uint8).tobytes() for _ in "ab")
        combined = _adler32_combine(zlib.adler32(a), zlib.adler32(b), len(b))
        assert combined == zlib.adler32(a + b)


def test_save_png_keeps_metadata_in_any_script(tmp_path):
    rgb = np.random.default_rng(2).integers(0, 256, (40, 80, 3), dtype=np.uint8)
    metadata = {"prompt": "雪山の湖, a café at dusk", "seed": 7, "seam": {"score": 0.25}}
    path = save_png(tmp_path / "pano.png", rgb, metadata)
    assert read_png_metadata(path) == metadata
    with Image.open(path) as im:
        assert im.text["Software"] == "dit360_blender"
        np.testing.assert_array_equal(np.asarray(im), rgb)
    assert [p.name for p in tmp_path.iterdir()] == ["pano.png"]


@pytest.mark.parametrize(
    "bad", [np.zeros((4, 4, 3), np.float32), np.zeros((4, 4), np.uint8), np.zeros((0, 4, 3), np.uint8)]
)
def test_a_bad_image_leaves_nothing_and_keeps_the_old_file(tmp_path, bad):
    old = save_png(tmp_path / "pano.png", np.full((2, 2, 3), 9, np.uint8), {"seed": 1})
    before = old.read_bytes()
    with pytest.raises(ValueError, match="uint8"):
        save_png(tmp_path / "pano.png", bad, {"seed": 2})
    assert [p.name for p in tmp_path.iterdir()] == ["pano.png"]
    assert old.read_bytes() == before
