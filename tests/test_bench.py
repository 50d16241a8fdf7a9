"""The benchmark runs end to end on tiny random models (its GPU figures live in docs/benchmarks.md)."""

from __future__ import annotations

import json

from dit360_blender.bench.run import main


def test_bench_tiny_smoke(tmp_path):
    out = tmp_path / "results"
    assert main(["--tiny", "--out", str(out), "--work", str(tmp_path / "models"), "--repeats", "1",
                 "--steps", "2", "--modes", "resident,fp8,stream:8", "--jobs", "resident",
                 "--worker", "auto bf16,auto bf16 warmed"]) == 0  # fmt: skip
    results = json.loads((out / "results.json").read_text())
    assert results["diffusers"]["step_s"] > 0
    assert results["modes"]["resident"]["job_s"] > 0
    assert results["modes"]["fp8"]["step_s"] > 0
    assert results["modes"]["stream:8"] == {"skipped": "needs CUDA"}
    # the user's path: a real worker through the real client, cold then warm, timed to `result`
    worker, warmed = results["worker"]
    assert worker["name"] == "auto bf16" and worker["spawn_to_ready_s"] > 0, worker
    for job in (worker["cold"], worker["warm"]):
        assert 0 < job["last_step_s"] < job["result_s"] and job["tail_after_last_step_s"] > 0
        assert job["transformer_evaluations"] == 2
    assert worker["cold"]["worker_timings"]["load_s"] > worker["warm"]["worker_timings"]["load_s"]
    # a warm job first (the panel's "Load the Model When the Panel Opens"): the first generate loads nothing
    assert warmed["name"] == "auto bf16 warmed" and warmed["preload"]["worker_timings"]["load_s"] > 0
    assert warmed["preload"]["transformer_evaluations"] is None  # it samples nothing on the CPU
    assert warmed["cold"]["worker_timings"]["load_s"] < warmed["preload"]["worker_timings"]["load_s"] / 10
    table = (out / "results.md").read_text()
    assert "| resident |" in table and "diffusers eager" in table and "| auto bf16 |" in table


def test_bench_times_quantised_checkpoints_with_and_without_the_lora(tmp_path):
    """Issue 12's measurement on tiny models: each quantised file loads through the normal paths, is
    timed with DiT360's LoRA as the side path and without it, and the LoRA changes the output."""
    out = tmp_path / "results"
    assert main(["--tiny", "--out", str(out), "--work", str(tmp_path / "models"), "--repeats", "1",
                 "--modes", "", "--jobs", "", "--no-diffusers",
                 "--checkpoints", "fp8-scaled,gguf-q8_0,gguf-q4_k"]) == 0  # fmt: skip
    results = json.loads((out / "results.json").read_text())["checkpoints"]
    for kind in ("fp8-scaled", "gguf-q8_0", "gguf-q4_k"):
        record = results[kind]
        assert record["lora"]["step_s"] > 0 and record["no lora"]["step_s"] > 0, record
        assert record["lora_effect_rel"] > 1e-6, record  # the side path ran (0.0 without it)
        assert record["side_path_cost_lora"] > 0
    assert not list((tmp_path / "models" / "quantised").iterdir())  # each file removed after its runs


def test_files_bench_times_the_saving_stage_it_runs_for_real(tmp_path):
    from dit360_blender.bench import files

    out = tmp_path / "files.json"
    assert files.main(["--widths", "256", "--repeats", "2", "--label", "here", "--json", str(out)]) == 0
    record = json.loads(out.read_text())
    size = record["sizes"][0]
    assert record["label"] == "here" and (size["width"], size["height"]) == (256, 128)
    assert len(size["runs_save_s"]) == 2 and all(t > 0 for t in size["runs_save_s"])
    assert set(size["one_file_s"]) == {"png", "hdr", "exr"}
    # the synthetic panorama has the sun the analysis must find (else the sun path goes untimed)
    from dit360_blender.panorama.analyze import analyze

    analysis, _ = analyze(files.sunny_panorama(512))
    assert analysis["lighting"]["sun"] is not None
