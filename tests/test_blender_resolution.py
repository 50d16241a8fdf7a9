"""Resolution / Refine in the panel and the sizes of a history entry (real bpy 4.5 LTS, one Blender
process running tests/blender/scenario_resolution.py): the panel offers 2K/4K/8K/16K, Refine and
the estimate of what the choice costs; a 2K result and an upscale made from it are one history
entry with both sizes, and the World shows the larger one's EXR (also when re-applied from the
history); a result that carries its native size records both; the panel sends size/refine with a
job. The results are real files (analyze + the shared writer), through the protocol's encoder."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from test_blender_extension import build_zip, run_scenario
from test_panorama_synthetic import sun_panorama
from test_upscale_models import build_sr_model, sr_python

from dit360_blender.client import Job
from dit360_blender.panorama.analyze import analyze
from dit360_blender.pipeline.make_panorama import _write_files
from dit360_blender.protocol import WORKER_MESSAGES, decode, encode, message

pytestmark = pytest.mark.skipif(importlib.util.find_spec("bpy") is None, reason="needs the bpy module")


def result(folder: Path, stem: str, rgb: np.ndarray, upscale_of: str | None = None) -> dict:
    folder.mkdir(exist_ok=True)
    height, width = rgb.shape[:2]
    params = Job(prompt="synthetic sizes", output_dir=str(folder), width=128, height=64).to_params()
    analysis, hdr = analyze(rgb, sun_share=float(params["sun_share"]))
    metadata = {"prompt": params["prompt"], "seed": 0, "width": width, "height": height, **analysis}
    if upscale_of:
        metadata["upscale"] = {"source": upscale_of, "model": "test", "scale": 2}
    path, files = _write_files(folder / f"{stem}.png", rgb, metadata, hdr, exr=True)
    event = decode(encode(message(
        "result", job_id=stem, path=str(path), width=width, height=height, metadata=metadata,
        timings={"total_s": 0.1}, model_cached=True, files=files,
    )), WORKER_MESSAGES)  # fmt: skip
    event_path = folder / f"{stem}-event.json"
    event_path.write_text(json.dumps(event), encoding="utf-8")
    return {"event": str(event_path), "params": params, "files": files, "path": str(path)}


@pytest.fixture(scope="module")
def run(tiny_models, tmp_path_factory) -> dict:
    work = tmp_path_factory.mktemp("blender-resolution")
    small = sun_panorama(35.0, 30.0, height=64, width=128)
    native = result(work / "out", "pano", small)
    big = result(
        work / "out", "pano_4k", small.repeat(2, axis=0).repeat(2, axis=1), upscale_of=native["path"]
    )
    cfg = {
        "zip": str(build_zip(work / "dist")),
        "models": str(tiny_models["root"]),
        "work": str(work),
        "results": {
            k: {"event": v["event"], "params": v["params"]}
            for k, v in (("native", native), ("upscaled", big))
        },
    }
    cfg["sr"] = sr_setup(tiny_models, work)
    return {
        "out": run_scenario("scenario_resolution.py", cfg, "resolution", timeout=900),
        "native": native,
        "big": big,
    }


def sr_setup(tiny_models, work: Path) -> dict:
    """The super-resolution venv's Python and a models folder: the tiny models plus a tiny random
    Real-ESRGAN Compact x4 saved as the default model's file (spandrel recognises it by its tensors)."""
    python = sr_python()
    models = work / "sr-models"
    models.mkdir()
    for item in Path(tiny_models["root"]).iterdir():
        (models / item.name).symlink_to(item, target_is_directory=item.is_dir())
    (models / "Real-ESRGAN").mkdir()
    build_sr_model(models / "Real-ESRGAN" / "RealESRGAN_x4plus.pth", seed=4)
    return {"python": str(python), "models": str(models)}


def step(run: dict, name: str) -> dict:
    record = run["out"][name]
    assert record["ok"], record["error"]
    return record["data"]


def _texts(log: list) -> list[str]:
    return [e["text"] or "" for e in log if e["call"] == "label"]


def _props(log: list) -> list[str]:
    return [e["args"][0] for e in log if e["call"] == "prop" and e["args"]]


def test_the_panel_offers_resolution_refine_and_their_cost(run):
    d = step(run, "panel")
    assert "size" in _props(d["native"]) and "refine" not in _props(d["native"])  # 2K: nothing to refine
    assert not any("RAM" in t for t in _texts(d["native"]))
    assert {"size", "refine", "refine_strength"} <= set(_props(d["8k"]))
    cost = next(t for t in _texts(d["8k"]) if "8192×4096" in t)
    assert "GB RAM" in cost and "refine tiles" in cost
    assert any("Estimates" in t for t in _texts(d["8k"]))  # the assumptions are stated
    assert (d["job"]["size"], d["job"]["refine"]) == ("8k", True)
    assert d["job"]["refine_strength"] == pytest.approx(0.35)


def test_an_upscale_joins_its_entry_and_the_world_shows_the_larger_exr(run):
    d = step(run, "upscale")
    native, big = run["native"]["files"], run["big"]["files"]
    assert d["after_native"]["entries"] == 1
    assert d["after_native"]["world"] == str(Path(native["lighting_exr"]).resolve())
    assert d["entries"] == 1  # the upscale is a size of the same entry, not a new one
    assert d["sizes"] == [
        [256, 128, run["big"]["path"], big["hdr"]],
        [128, 64, run["native"]["path"], native["hdr"]],
    ]
    assert d["entry_file"] == run["big"]["path"]
    assert d["world"] == str(Path(big["lighting_exr"]).resolve())
    assert any(t.startswith("Sizes: 256px · 128px") for t in _texts(d["history_panel"]))
    # the entry's thumbnail is the native PNG's; the upscale's (16K in real use) is never loaded
    assert f"history:{Path(run['native']['path']).resolve()}" in d["thumbnails"]
    assert not any("pano_4k" in key for key in d["thumbnails"])


def test_reapplying_from_the_history_shows_the_largest(run):
    d = step(run, "reapply")
    assert d["apply"] == ["FINISHED"]
    assert d["world"] == str(Path(run["big"]["files"]["lighting_exr"]).resolve())


def test_a_result_with_its_native_size_records_both(run):
    d = step(run, "native_in_result")
    assert d["entries"] == 2  # a new generation: its own entry
    assert [s[:2] for s in d["sizes"]] == [[256, 128], [128, 64]]
    assert d["world"] == str(Path(run["big"]["files"]["lighting_exr"]).resolve())


def test_an_entry_offers_upscale_to_the_panels_resolution(run):
    d = step(run, "upscale_button")
    ops = [e for e in d["panel"] if e["call"] == "operator"]
    assert any(e["args"] == ["dit360.upscale_history"] and e["text"] == "Upscale to 4K" for e in ops)
    assert not any(
        e["args"] == ["dit360.upscale_history"] for e in d["native_panel"] if e["call"] == "operator"
    )
    assert (d["poll_native"], d["poll_4k"]) == (False, True)
    # it starts from the entry's smallest size: the panorama the generation made
    assert d["native_file"] == str(Path(run["native"]["path"]).resolve())
    assert d["errors"]["native"][0] == "GenerationError" and "nothing to upscale" in d["errors"]["native"][1]
    assert d["errors"]["missing"][0] == "GenerationError" and "gone.png" in d["errors"]["missing"][1]


def test_generate_at_4k_generates_2k_then_upscales_that_entry(run):
    d = step(run, "chain")
    assert d["result"] == ["FINISHED"]  # the 2K world was applied (the upscale's failure is a warning)
    entry = d["entry"]
    assert entry["size"] == "NATIVE" and entry["sizes"] == [[128, 64]]  # the worker generated at 2K
    up = d["upscale"]
    assert up["source"] == entry["file"] and up["size"] == "4k" and up["refine"] is False
    assert up["seed"] == entry["seed"]  # the entry's own (the upscale kind takes no prompt: None)
    # no upscale model in the tiny models folder, downloads off: refused before anything is written
    assert d["upscale_error"][0] == "weights_missing" and "upscale model" in d["upscale_error"][1]
    assert d["panel_error"] == "weights_missing"
    assert Path(d["world"]).parent == Path(entry["file"]).parent and Path(d["world"]).suffix == ".exr"
    assert Path(d["world"]).stem.startswith(Path(entry["file"]).stem)  # the 2K world stays


def test_generate_at_8k_in_blender_upscales_for_real_and_the_world_shows_it(run):
    """2K -> 8K end to end in real Blender with the tiny models and a tiny x4 model: one History
    entry with both sizes, the World on the 8K EXR (its seam: the next test)."""

    d = step(run, "chain_8k")
    assert d["result"] == ["FINISHED"] and d["upscale_error"] is None, d
    assert d["sizes"] == [[8192, 4096], [512, 256]]
    big = Path(d["files"][0])
    assert big.name.endswith("_8k.png") and d["entry_file"] == str(big)
    assert big.parent == Path(d["files"][1]).parent  # beside the 2K world, in the operator's folder
    assert Path(d["world"]).suffix == ".exr" and Path(d["world"]).stem.startswith(big.stem)
    from PIL import Image

    with Image.open(big) as im:
        rgb = np.asarray(im.convert("RGB"))
    assert rgb.shape == (4096, 8192, 3)


def test_the_8k_world_from_blender_has_no_seam_its_source_lacks(run):
    """The 8K file's wrap is at interior level among the boundaries between its source pixels (x16:
    every 16th column; tiny Compact x4 adds a nearest-neighbour copy of its input, so among all
    boundaries those stand out, the wrap always being one of them: panorama/seam.py)."""
    from PIL import Image

    from dit360_blender.panorama.seam import seam_score
    from dit360_blender.pipeline.image_io import read_png_metadata

    d = step(run, "chain_8k")
    big, native = (Path(f) for f in d["files"])
    with Image.open(big) as im:
        upscaled = seam_score(np.asarray(im.convert("RGB")), period=16)
    with Image.open(native) as im:
        source = seam_score(np.asarray(im.convert("RGB")))
    print(f"\nseam z: native {source.seam_z:.2f}, 8K {upscaled.seam_z:.2f} (period 16)")
    assert upscaled.seam_ok and upscaled.seam_z <= max(source.seam_z, 0.0) + 1.0
    assert abs(upscaled.seam_z_offset) < 3.5 and 1.0 < upscaled.seam_percentile < 99.0
    recorded = read_png_metadata(big)["seam"]  # what the worker measured and the panel shows
    assert recorded["period"] == 16 and recorded["seam_ok"] is True
    assert recorded["seam_z"] == pytest.approx(upscaled.seam_z, abs=1e-9)
