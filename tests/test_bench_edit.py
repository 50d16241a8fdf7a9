"""The edit benchmark (bench/edit_jobs.py) on the tiny models: every edit kind runs through the real
worker, runs the steps its strength selects, changes something and writes its JSON."""

from __future__ import annotations

import json

from dit360_blender.bench.edit_jobs import main


def test_edit_bench_tiny_smoke(tmp_path):
    out = tmp_path / "edit.json"
    assert main(["--tiny", "--work", str(tmp_path / "work"), "--variants", "auto fp16", "--steps", "3",
                 "--out", str(out)]) == 0  # fmt: skip
    record = json.loads(out.read_text())
    variant = record["variants"][0]
    assert "skipped" not in variant, variant
    assert [variant[k]["steps_run"] for k in ("mask_s1.0", "mask_s0.6", "view", "seam", "photo")] == [
        3,
        2,
        3,
        3,
        3,
    ]
    for kind in ("mask_s1.0", "mask_s0.6", "view", "seam"):
        assert variant[kind]["finite_and_varied"] and 0 < variant[kind]["changed_share"] < 0.5, kind
