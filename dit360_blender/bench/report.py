"""The benchmark's markdown tables: every step as a ratio to compiled diffusers measured in the same
run (eager diffusers when compiling it failed), and the worker's result-event figures."""

from __future__ import annotations


def markdown_table(results: dict) -> str:
    eager = results.get("diffusers", {}).get("step_s")
    compiled = results.get("diffusers_compiled", {}).get("step_s")
    base, base_name = (compiled, "compiled diffusers") if compiled else (eager, "diffusers eager")
    lines = [
        f"| mode | step s | × {base_name} | encode s | decode s | 28-step job s | job peak GiB | peak GiB | streamed GiB | load s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label, step in (("diffusers eager", eager), ("diffusers + compile_repeated_blocks", compiled)):
        if step:
            ratio = f"{step / base:.2f}" if base else "–"
            lines.append(f"| {label} | {step:.3f} | {ratio} | | | | | | | |")
    for mode, r in results["modes"].items():
        if "skipped" in r:
            lines.append(f"| {mode} | skipped: {r['skipped']} |||||||||")
            continue
        ratio = f"{r['step_s'] / base:.2f}" if base else "–"

        def cell(key: str, fmt: str = "{:.3f}", r: dict = r) -> str:
            return fmt.format(r[key]) if key in r else ""

        lines.append(
            f"| {mode} | {r['step_s']:.3f} | {ratio} | {cell('encode_s')} | {cell('decode_s')} | {cell('job_s', '{:.2f}')} "
            f"| {cell('job_peak_gib', '{:.2f}')} | {cell('peak_gib', '{:.2f}')} | {cell('streamed_gib', '{:.1f}')} | {cell('load_s', '{:.1f}')} |"
        )
    return "\n".join(lines) + "\n" + worker_table(results.get("worker", []))


def worker_table(records: list[dict]) -> str:
    if not records:
        return ""
    lines = [
        "",
        "| worker variant | spawn → ready s | spawn → device (torch loaded) s | cold job → result s | warm job → result s | warm: last step at s | tail after last step s | transformer evaluations | device VRAM peak GiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        if "skipped" in r:
            lines.append(f"| {r['name']} | skipped: {r['skipped']} ||||||||")
            continue
        warm, cold = r.get("warm", {}), r.get("cold", {})

        def num(d: dict, key: str, fmt: str = "{:.2f}") -> str:
            return fmt.format(d[key]) if isinstance(d.get(key), (int, float)) else ""

        lines.append(
            f"| {r['name']} | {num(r, 'spawn_to_ready_s')} | {num(r, 'spawn_to_device_s')} "
            f"| {num(cold, 'result_s')} | {num(warm, 'result_s')} "
            f"| {num(warm, 'last_step_s')} | {num(warm, 'tail_after_last_step_s')} "
            f"| {num(warm, 'transformer_evaluations', '{}')} | {num(r, 'device_vram_peak_gib')} |"
        )
    return "\n".join(lines) + "\n"
