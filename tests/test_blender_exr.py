"""Blender's World uses the half-float OpenEXR beside the .hdr when there is one (real bpy 4.5 LTS).

A synthetic sun panorama is turned into a worker result as the worker makes one (`analyze`, the
shared `_write_files` with EXR on), and once more without EXRs in another folder; both go through
the add-on's apply path and are rendered by Cycles. Blender's pixels are compared with the EXR read
by the OpenEXR bindings, the render with the one lit by the .hdr. One Blender process runs
tests/blender/scenario_exr.py; each test here checks one step's record.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from test_blender_extension import build_zip, run_scenario
from test_panorama_exr import read_exr
from test_panorama_synthetic import sun_panorama

from dit360_blender.client import Job
from dit360_blender.panorama.analyze import analyze
from dit360_blender.pipeline.make_panorama import _write_files
from dit360_blender.protocol import WORKER_MESSAGES, decode, encode, message

pytestmark = pytest.mark.skipif(importlib.util.find_spec("bpy") is None, reason="needs the bpy module")

SIZE = (64, 128)  # height, width


def result(folder: Path, stem: str, exr: bool) -> dict:
    """A worker `result` (through the protocol's encoder and decoder) for the same sun panorama."""
    folder.mkdir()
    rgb = sun_panorama(40.0, 30.0, height=SIZE[0], width=SIZE[1])
    params = Job(
        prompt=f"synthetic {stem}", output_dir=str(folder), width=SIZE[1], height=SIZE[0]
    ).to_params()
    analysis, hdr = analyze(rgb, sun_share=float(params["sun_share"]))
    metadata = {"prompt": params["prompt"], "seed": 0, "width": SIZE[1], "height": SIZE[0], **analysis}
    path, files = _write_files(folder / f"{stem}.png", rgb, metadata, hdr, exr=exr)
    event = decode(encode(message(
        "result", job_id=stem, path=str(path), width=SIZE[1], height=SIZE[0], metadata=metadata,
        timings={"total_s": 0.1}, model_cached=True, files=files,
    )), WORKER_MESSAGES)  # fmt: skip
    event_path = folder / "event.json"
    event_path.write_text(json.dumps(event), encoding="utf-8")
    return {"event": str(event_path), "params": params, "files": files}


@pytest.fixture(scope="module")
def exr_run(tiny_models, tmp_path_factory) -> dict:
    work = tmp_path_factory.mktemp("blender-exr")
    results = {
        "exr": result(work / "with-exr", "sun-exr", True),
        "hdr": result(work / "hdr-only", "sun-hdr", False),
    }
    cfg = {
        "zip": str(build_zip(work / "dist")),
        "models": str(tiny_models["root"]),
        "work": str(work),
        "results": {k: {"event": v["event"], "params": v["params"]} for k, v in results.items()},
    }
    return {"out": run_scenario("scenario_exr.py", cfg, "exr", timeout=600), "results": results}


def step(run: dict, name: str) -> dict:
    record = run["out"][name]
    assert record["ok"], record["error"]
    return record["data"]


def test_the_world_loads_the_exr_as_float_linear_data(exr_run):
    d = step(exr_run, "apply")["exr"]
    files = exr_run["results"]["exr"]["files"]
    assert d["kind"] == "lighting" and d["suns"] == ["DiT360 Sun"]  # a sun was found: the clamped map
    assert d["filepath"] == str(Path(files["lighting_exr"]).resolve())
    assert d["is_float"] is True and d["colorspace"] == "Linear Rec.709"
    # the sibling files it records are the EXRs too, so switching kinds keeps the format
    assert d["hdr_file"] == files["hdr_exr"] and d["lighting_file"] == files["lighting_exr"]
    on_disk, _ = read_exr(files["lighting_exr"])
    # what Blender holds is exactly the file's half floats, widened to float32
    assert np.array_equal(np.load(d["pixels"]), on_disk.astype(np.float32))


def test_without_exr_the_world_keeps_the_hdr(exr_run):
    d = step(exr_run, "apply")["hdr"]
    files = exr_run["results"]["hdr"]["files"]
    assert set(files) == {"hdr", "lighting"}
    assert d["filepath"] == str(Path(files["lighting"]).resolve()) and d["is_float"] is True


def test_cycles_renders_the_exr_world_as_it_renders_the_hdr_world(exr_run):
    d = step(exr_run, "apply")
    exr, hdr = np.array(d["exr"]["render"]), np.array(d["hdr"]["render"])
    print(f"\nCycles sphere mean: EXR world {exr.round(4)}, HDR world {hdr.round(4)}")
    assert d["exr"]["covered"] > 300 and exr.min() > 0.05  # the sphere is there and lit
    # the same light (the two files differ by RGBE's rounding, < 1/256 of a pixel's peak)
    assert exr == pytest.approx(hdr, rel=0.01)


def test_history_reapplies_the_exr(exr_run):
    d = step(exr_run, "history")
    files = exr_run["results"]["exr"]["files"]
    assert d["entry"] == {"hdr": files["hdr"], "lighting": files["lighting"]}  # what it records: the .hdr
    assert d["apply"] == ["FINISHED"]
    assert d["env"]["filepath"] == str(Path(files["lighting_exr"]).resolve()) and d["env"]["is_float"]
