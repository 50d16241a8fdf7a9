"""Edit jobs (issue 14) end to end on the tiny models: through the real worker and client (a
subprocess, a loopback socket), and through the CLI; every mask kind; what is written; bad input
refused with nothing written; cancel mid-edit leaves nothing.

One worker serves the module. Sizes are tiny (128x64, 2-3 steps) so the module stays fast.
"""

from __future__ import annotations

import base64
import io
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dit360_blender.client import Job, JobError, WorkerClient
from dit360_blender.panorama.masks import seam_band_mask
from dit360_blender.panorama.projection import view_mask
from dit360_blender.panorama.seam import seam_score
from dit360_blender.pipeline.image_io import read_png_metadata
from dit360_blender.protocol import ProtocolError

PROMPT = "This is a panorama. A quiet harbour at dawn, boats, mist over the water."
W, H = 128, 64
ROOT = Path(__file__).resolve().parents[1]


def _source(seed: int = 3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:H, 0:W] / np.array([H, W])[:, None, None]
    base = np.stack([np.sin(2 * np.pi * x + 1), np.cos(4 * y + np.cos(2 * np.pi * x)), np.sin(9 * y)], -1)
    return (
        np.clip((base * 0.35 + 0.5 + rng.normal(0, 0.05, base.shape)) * 255, 0, 255).round().astype(np.uint8)
    )


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("edit-inputs")
    source = root / "harbour.png"
    Image.fromarray(_source()).save(source)
    mask = np.zeros((H // 2, W // 2), np.uint8)  # half the size: resized to the source's
    mask[8:20, 10:30] = 255
    Image.fromarray(mask).save(root / "mask.png")
    Image.fromarray(np.zeros((H, W), np.uint8)).save(root / "empty_mask.png")
    Image.fromarray(np.full((H, H), 255, np.uint8)).save(root / "square_mask.png")
    Image.fromarray(_source(4)[:, : W - 16]).save(root / "not_2to1.png")
    photo = _source(5)[10:34, 40:76]  # 36 x 24 photo
    Image.fromarray(photo).save(root / "photo.png")
    exif = Image.Exif()
    exif.get_ifd(0x8769).update({0xA405: 15})  # FocalLengthIn35mmFilm 15 mm: 2 atan(18 / 15) = 100.4°
    Image.fromarray(photo).save(root / "photo_exif.jpg", exif=exif, quality=95)
    (root / "text.png").write_text("not an image")
    return root


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    c = WorkerClient(log_dir=tmp_path_factory.mktemp("edit-worker-logs"), extra_env={"HF_HUB_OFFLINE": "1"})
    yield c
    c.close()


@pytest.fixture
def edit(tiny_models, tmp_path, files):
    def make(**over) -> Job:
        fields = dict(
            kind="edit", prompt=PROMPT, output_dir=tmp_path / "out", seed=77, steps=3, device="cpu",
            dtype="fp32", models_dir=tiny_models["root"], source=files / "harbour.png",
            mask=files / "mask.png", feather=4.0,
        )  # fmt: skip
        fields.update(over)
        return Job(**fields)

    return make


def _run(client, job, timeout=180):
    events = []
    result = client.run(job, on_event=events.append, timeout=timeout)
    return result, events


def _png(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def test_mask_edit_through_the_worker(client, edit, files, tmp_path):
    result, events = _run(client, edit(strength=0.8))
    kinds = [e["type"] for e in events if e.get("job_id") == result["job_id"]]
    assert kinds[0] == "queued" and "progress" in kinds and "preview" in kinds and kinds[-1] == "result"
    steps = [e for e in events if e["type"] == "progress" and e["stage"] == "sampling"]
    assert {e["total"] for e in steps} == {3}  # 3 steps x strength 0.8 -> 3 - int(0.6) = 3
    out = Path(result["path"])
    assert out.parent == tmp_path / "out" and out.name == "harbour-mask_77.png"
    assert (result["width"], result["height"]) == (W, H)
    assert set(result["files"]) >= {"hdr", "lighting", "hdr_exr", "lighting_exr"}
    assert all(Path(f).is_file() for f in result["files"].values())
    meta = read_png_metadata(out)
    assert meta["edit"]["mask_kind"] == "mask" and meta["edit"]["source"] == str(files / "harbour.png")
    assert meta["edit"]["strength"] == 0.8 and meta["seed"] == 77 and meta["edit"]["steps_run"] == 3
    assert result["metadata"]["edit"] == meta["edit"]
    source, edited = _png(files / "harbour.png"), _png(out)
    from dit360_blender.panorama.masks import feather_mask, resize_mask

    with Image.open(files / "mask.png") as im:
        feathered = feather_mask(resize_mask(np.asarray(im), W, H), 4.0)
    outside = feathered == 0
    assert outside.sum() > 0.5 * W * H
    assert np.array_equal(edited[outside], source[outside])  # bit for bit
    inside = feathered == 1
    assert np.abs(edited[inside].astype(int) - source[inside]).mean() > 5


def test_a_source_of_any_2to1_size_is_worked_at_a_multiple_of_16(client, edit, files, tmp_path):
    odd = _source(6)[2:62, 4:124]  # 120 x 60: worked at 128 x 64, composited back at 120 x 60
    Image.fromarray(odd).save(tmp_path / "odd.png")
    mask = np.zeros((60, 120), np.uint8)
    mask[20:40, 50:80] = 255
    mask[5, 7] = 255  # one pixel: still regenerated at the working size
    Image.fromarray(mask).save(tmp_path / "odd_mask.png")
    result, events = _run(
        client, edit(source=tmp_path / "odd.png", mask=tmp_path / "odd_mask.png", feather=0.0)
    )
    edited = _png(result["path"])
    assert edited.shape == (60, 120, 3) and (result["width"], result["height"]) == (120, 60)
    assert result["metadata"]["work_size"] == [128, 64]
    assert any(e["type"] == "preview" for e in events)
    assert np.array_equal(edited[mask == 0], odd[mask == 0])
    assert np.abs(edited[mask == 255].astype(int) - odd[mask == 255]).mean() > 5


def test_view_and_seam_edits_through_the_worker(client, edit, files):
    result, _ = _run(client, edit(mask_kind="view", mask=None, yaw=90.0, pitch=10.0, hfov=50.0, aspect=1.5))
    source, edited = _png(files / "harbour.png"), _png(result["path"])
    seen = view_mask(W, H, 90.0, 10.0, 50.0, 1.5, feather=4.0)
    assert np.array_equal(edited[seen == 0], source[seen == 0])
    assert np.abs(edited[seen == 1].astype(int) - source[seen == 1]).mean() > 5
    meta = result["metadata"]["edit"]
    assert (meta["mask_kind"], meta["yaw"], meta["hfov"], meta["aspect"]) == ("view", 90.0, 50.0, 1.5)

    # a panorama with a wrap discontinuity: the left and right edges don't meet
    broken = source.copy()
    broken[:, : W // 2] = (broken[:, : W // 2].astype(int) * 0.4).astype(np.uint8)
    path = Path(result["path"]).parent / "broken.png"
    Image.fromarray(broken).save(path)
    fixed, seam_events = _run(client, edit(mask_kind="seam", mask=None, source=path, band=40.0, steps=3))
    last = [e for e in seam_events if e["type"] == "preview"][-1]
    shown = np.asarray(Image.open(io.BytesIO(base64.b64decode(last["data"]))).convert("L"), dtype=float)
    half = shown.shape[1] // 2
    assert shown[:, :half].mean() < shown[:, half:].mean()  # the darkened left half shows on the left
    repaired = _png(fixed["path"])
    band = np.roll(seam_band_mask(W, H, 40.0, feather_deg=4.0), -(W // 2), axis=1)  # back at the wrap
    assert np.array_equal(repaired[band == 0], broken[band == 0])
    assert not np.array_equal(repaired[:, :2], broken[:, :2])  # the columns at the seam changed
    assert fixed["metadata"]["edit"]["band"] == 40.0
    before, after = seam_score(broken), seam_score(repaired)
    print(f"\nseam z: broken {before.seam_z:.1f}, repaired {after.seam_z:.1f}")
    assert not before.seam_ok and after.seam_ok and after.seam_z < 3.5  # the wrap at interior level


def test_photo_edit_through_the_worker(client, edit, files):
    result, _ = _run(client, edit(mask_kind="photo", mask=None, source=None, photo=files / "photo.png",
                                  hfov=100.0, yaw=0.0, width=W, height=H))  # fmt: skip
    from dit360_blender.panorama.projection import photo_to_equirect

    placed = photo_to_equirect(_png(files / "photo.png"), W, H, 100.0)
    edited = _png(result["path"])
    covered = placed.coverage == 1
    assert covered.sum() > 100
    assert np.array_equal(edited[covered], np.rint(placed.rgb[covered]).astype(np.uint8))
    assert result["metadata"]["edit"]["hfov"] == 100.0 and Path(result["path"]).name == "photo-photo_77.png"
    # the field of view from the photo's EXIF; a 60° photo too detailed for 128 px, scaled down by fit
    from_exif, _ = _run(client, edit(mask_kind="photo", mask=None, source=None, photo=files / "photo_exif.jpg",
                                     width=W, height=H))  # fmt: skip
    assert from_exif["metadata"]["edit"]["hfov"] == pytest.approx(2 * np.degrees(np.arctan(18 / 15)))
    fitted, _ = _run(client, edit(mask_kind="photo", mask=None, source=files / "harbour.png",
                                  photo=files / "photo.png", hfov=60.0, fit=True))  # fmt: skip
    assert fitted["metadata"]["edit"]["fit"] is True and (fitted["width"], fitted["height"]) == (W, H)


def test_bad_edit_inputs_are_refused_and_nothing_is_written(client, edit, files, tmp_path):
    out = tmp_path / "out"
    cases = (
        (dict(source=files / "not_2to1.png"), "2:1"),
        (dict(source=files / "missing.png"), "does not exist"),
        (dict(source=files / "text.png"), "Could not read the source"),
        (dict(mask=files / "square_mask.png"), "stretched"),
        (dict(mask=files / "empty_mask.png"), "marks nothing"),
        (dict(mask_kind="photo", mask=None, source=None, photo=files / "photo.png", width=W, height=H), "EXIF"),
        (dict(mask_kind="photo", mask=None, source=None, photo=files / "photo.png", hfov=5.0, width=W, height=H),
         "more than"),
    )  # fmt: skip
    for over, words in cases:
        with pytest.raises(JobError) as info:
            client.run(edit(**over), timeout=60)
        assert info.value.code == "bad_parameters" and words in info.value.message, info.value.message
        assert info.value.hint
    with pytest.raises(ProtocolError) as refused:  # checked by the table before it is sent
        client.submit(edit(hfov=180.0, mask_kind="view", mask=None))
    assert refused.value.code == "bad_parameters"
    assert not out.exists() or not any(out.iterdir())


def test_cancel_mid_edit_leaves_nothing_written(client, edit, tmp_path):
    job_id = client.submit(edit(steps=60, preview_every=0, filename="cancelled"))
    deadline = time.monotonic() + 120
    final = None
    while final is None and time.monotonic() < deadline:
        for ev in client.poll():
            if ev.get("job_id") != job_id:
                continue
            if ev["type"] == "progress" and ev["stage"] == "sampling" and ev["step"] >= 2:
                client.cancel(job_id)
            if ev["type"] in ("result", "error"):
                final = ev
        time.sleep(0.01)
    assert final is not None and final["type"] == "error" and final["code"] == "cancelled"
    assert final["details"]["step"] < 60
    out = tmp_path / "out"
    assert not out.exists() or not any(out.iterdir())


def test_cli_edit_writes_the_files_and_refuses_bad_input(tiny_models, files, tmp_path):
    def cli(*args):
        return subprocess.run(
            [sys.executable, "-m", "dit360_blender", "edit", *args, "--models-dir", str(tiny_models["root"]),
             "--steps", "2", "--device", "cpu", "--dtype", "fp32", "--quiet"],
            capture_output=True, text=True, timeout=300, cwd=tmp_path,
            env={**os.environ, "PYTHONPATH": str(ROOT)},  # the default output folder is the cwd
        )  # fmt: skip

    help_run = subprocess.run(
        [sys.executable, "-m", "dit360_blender", "edit", "--help"], capture_output=True, text=True
    )
    assert help_run.returncode == 0 and "--repair-seam" in help_run.stdout and "--view" in help_run.stdout
    out = tmp_path / "edited.png"
    done = cli(
        str(files / "harbour.png"), "--prompt", PROMPT, "--view=-30,0,60", "--seed", "5", "--out", str(out)
    )
    assert done.returncode == 0, done.stderr
    assert out.is_file() and out.with_suffix(".hdr").is_file() and "view edit" in done.stdout
    meta = read_png_metadata(out)
    assert meta["edit"]["mask_kind"] == "view" and meta["edit"]["yaw"] == -30.0 and meta["seed"] == 5
    for args, words in (
        ((str(files / "harbour.png"), "--prompt", PROMPT), "one of --mask"),
        (
            (str(files / "harbour.png"), "--prompt", PROMPT, "--mask", "m.png", "--repair-seam"),
            "more than one",
        ),
        ((str(files / "harbour.png"), "--prompt", PROMPT, "--view", "1,2"), "YAW,PITCH,HFOV"),
        ((str(files / "not_2to1.png"), "--prompt", PROMPT, "--repair-seam"), "2:1"),
        (("--prompt", PROMPT, "--repair-seam"), "'source'"),
    ):
        bad = cli(*args, "--out", str(tmp_path / "bad.png"))
        assert bad.returncode == 2 and words in bad.stderr and "fix:" in bad.stderr, bad.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["edited.png", "edited.hdr", "edited_lighting.hdr", "edited.exr", "edited_lighting.exr"]
    )
