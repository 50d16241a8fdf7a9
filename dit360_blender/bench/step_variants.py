"""The fp8 + compile transformer step, several ways, in one process (issue #13's step).

    python -m dit360_blender.bench.step_variants --json out.json [--diffusers]

Random full-size FLUX.1-dev weights built on the GPU (no files), quantised as the `fp8` memory
mode does (e4m3, one scale per output row, the blocks' Linear layers only), DiT360's padded
sequence at 2048x1024. Variants, each timed with CUDA events (median of `--repeats` after
warm-ups that include the compile):

- `compile`: the blocks compiled one by one, as the pipeline does (the reference row);
- `compile + coordinate descent`: Inductor's coordinate-descent tuning of its kernels' launch
  parameters (longer compile);
- `compile + fused GELU quantisation`: the widest fp8 inputs quantised by fp8_fused.py's kernel
  (what the pipeline does; `compile` alone is the path before it), its accuracy checked first;
- `compile + CUDA graph` (`--cuda-graph`): the whole compiled forward captured once into a CUDA
  graph and replayed (2026-12-03: 0.2358 s against 0.2349 s, the GPU already busy 98 % of the step).

Each variant's one-step profile is summarised by kernel family (fp8 GEMMs, attention, Inductor's
fused kernels, the rest) with GPU busy time against the step's wall time, and the slowest fused
kernels by name. `--diffusers` adds diffusers' transformer eager and with
`compile_repeated_blocks` (the baseline every ratio is taken against). Prints and writes numbers;
no timings are asserted anywhere.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from dit360_blender.bench.cuda_timing import cuda_median
from dit360_blender.pipeline.flux_checkpoint import QUANTIZABLE
from dit360_blender.pipeline.flux_layers import set_attention_backend
from dit360_blender.pipeline.flux_model import FLUX_DEV, Flux
from dit360_blender.pipeline.fp8 import Fp8Linear, enable_fp8_matmul, quantize_activations, quantize_rowwise
from dit360_blender.pipeline.sampling import image_ids, wrap_pad_ids

WIDTH, HEIGHT = 2048, 1024


def fp8_model(device: torch.device) -> Flux:
    torch.manual_seed(0)
    with torch.device(device):
        model = Flux(FLUX_DEV).to(torch.bfloat16).eval().requires_grad_(False)
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear) or not name.startswith(QUANTIZABLE):
            continue
        layer = Fp8Linear(module.in_features, module.out_features, module.bias is not None).to(device)
        q, scale = quantize_rowwise(module.weight.data)
        layer.weight.data, layer.scale_weight = q, scale
        if module.bias is not None:
            layer.bias.data = module.bias.data
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer)
    enable_fp8_matmul(model, device, torch.bfloat16)
    return model


def inputs(device: torch.device) -> tuple:
    grid_h, grid_w = HEIGHT // 16, WIDTH // 16
    ids = wrap_pad_ids(image_ids(grid_h, grid_w), grid_h, grid_w).to(device)[None]
    gen = torch.Generator(device).manual_seed(0)
    p = FLUX_DEV
    img = torch.randn(1, ids.shape[1], 64, device=device, generator=gen, dtype=torch.bfloat16)
    txt = torch.randn(1, 512, p.context_in_dim, device=device, generator=gen, dtype=torch.bfloat16)
    vec = torch.randn(1, p.vec_in_dim, device=device, generator=gen, dtype=torch.bfloat16)
    t = torch.full((1,), 0.7, device=device)
    g = torch.full((1,), 2.8, device=device)
    return img, ids, txt, torch.zeros(1, 512, 3, device=device), t, vec, g


def timed(fn: Callable[[], object], repeats: int, warmups: int = 3) -> dict:
    step_s, warm_s = cuda_median(fn, repeats, warmups)
    return {"step_s": step_s, "warmups_s": warm_s}


def family(name: str) -> str:
    lowered = name.lower()
    if "attention" in lowered or "fmha" in lowered or "flash" in lowered or "cudnn" in lowered:
        return "attention"
    if "gemm" in lowered or "xmma" in lowered or "cutlass" in lowered or "sm90" in lowered:
        return "gemm"
    if lowered.startswith("triton") or "quantize_rows" in lowered:
        return "inductor fused"
    return "other"


def profile_summary(fn: Callable[[], object]) -> dict:
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
    kernels: dict[str, list[float]] = {}
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA and event.device_time > 0:
            kernels.setdefault(event.name, []).append(event.device_time / 1000.0)  # ms
    families: dict[str, float] = {}
    for name, times in kernels.items():
        families[family(name)] = families.get(family(name), 0.0) + sum(times)
    fused = sorted(
        (
            (name, sum(times), len(times))
            for name, times in kernels.items()
            if family(name) == "inductor fused"
        ),
        key=lambda row: -row[1],
    )
    return {
        "wall_ms": start.elapsed_time(end),
        "busy_ms": sum(families.values()),
        "families_ms": families,
        "top_fused": [{"name": n[:120], "ms": ms, "calls": c} for n, ms, c in fused[:14]],
    }


def captured(forward: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
    """The forward replayed from a CUDA graph (static inputs: the same tensors every call)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            forward()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        forward()
    return graph.replay


def set_fused_gelu_input(model: Flux, on: bool) -> None:
    for module in model.modules():
        if isinstance(module, Fp8Linear):
            module.fuse_gelu_input = on


def fused_accuracy(model: Flux, args_: tuple) -> tuple[dict, torch.Tensor]:
    """The fused GELU quantisation against the plain path: one layer's fp8 input at the real shape
    and the whole (eager) forward."""
    from dit360_blender.pipeline import fp8_fused

    gen = torch.Generator(args_[0].device).manual_seed(1)
    rows = args_[1].shape[1] + 512
    linear1 = torch.randn(rows, 21504, device=args_[0].device, generator=gen).to(torch.bfloat16)
    attn = torch.randn(rows, 3072, device=args_[0].device, generator=gen).to(torch.bfloat16)
    mlp = linear1[:, 9216:]
    xq, scale = fp8_fused.gelu_quantize_rows(attn, mlp)
    x = torch.cat((attn, torch.nn.functional.gelu(mlp, approximate="tanh")), dim=-1)
    ref_q, ref_scale = quantize_activations(x)
    record = {
        "layer_fp8_values_differing": (xq.float() != ref_q.float()).float().mean().item(),
        "layer_scale_max_rel_diff": ((scale - ref_scale).abs() / ref_scale).max().item(),
    }
    with torch.inference_mode():
        set_fused_gelu_input(model, False)
        plain = model(*args_).double()
        set_fused_gelu_input(model, True)
        fused = model(*args_).double()
    record["forward_rel_diff"] = ((fused - plain).norm() / plain.norm()).item()
    print(f"[fused accuracy] {record}", flush=True)
    return record, fused


def run_variant(
    name: str,
    model: Flux,
    args_: tuple,
    repeats: int,
    setup: Callable | None = None,
    fused: bool = False,
    eager_fused: torch.Tensor | None = None,
) -> dict:
    import torch._dynamo

    torch._dynamo.reset()
    set_fused_gelu_input(model, fused)
    record: dict = {}
    try:
        if setup is not None:
            setup()
        model.compile_blocks()

        def forward():
            with torch.inference_mode():
                return model(*args_)

        fn = forward
        if name.endswith("CUDA graph"):
            with torch.inference_mode():
                t0 = time.perf_counter()
                fn = captured(forward)
                record["capture_s"] = time.perf_counter() - t0
        record.update(timed(fn, repeats))
        if fused and eager_fused is not None:  # what Inductor made of the custom kernel's call
            compiled = forward().double()
            record["compiled_vs_eager_rel_diff"] = (
                (compiled - eager_fused).norm() / eager_fused.norm()
            ).item()
        record["profile"] = profile_summary(fn)
    except Exception as exc:  # a variant that can't run here is reported, the others still run
        record["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
    print(f"[{name}] {json.dumps(record, default=float)}", flush=True)
    return record


def diffusers_rows(device: torch.device, repeats: int) -> dict:
    from diffusers import FluxTransformer2DModel

    p = FLUX_DEV
    with torch.device(device):
        model = FluxTransformer2DModel(
            in_channels=64, num_layers=p.depth, num_single_layers=p.depth_single_blocks,
            attention_head_dim=p.hidden_size // p.num_heads, num_attention_heads=p.num_heads,
            joint_attention_dim=p.context_in_dim, pooled_projection_dim=p.vec_in_dim,
            guidance_embeds=True, axes_dims_rope=tuple(p.axes_dim),
        ).to(torch.bfloat16).eval()  # fmt: skip
    img, ids, txt, txt_ids, t, vec, g = inputs(device)

    def forward():
        with torch.inference_mode():
            return model(
                hidden_states=img, encoder_hidden_states=txt, pooled_projections=vec, timestep=t,
                img_ids=ids[0], txt_ids=txt_ids[0], guidance=g, return_dict=False,
            )  # fmt: skip

    rows = {"diffusers eager": timed(forward, repeats)}
    print(f"[diffusers eager] {rows['diffusers eager']}", flush=True)
    model.compile_repeated_blocks(fullgraph=True)
    rows["diffusers compile_repeated_blocks"] = timed(forward, repeats)
    print(f"[diffusers compiled] {rows['diffusers compile_repeated_blocks']}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--diffusers", action="store_true")
    parser.add_argument("--coordinate-descent", action="store_true", help="also with Inductor's tuning")
    parser.add_argument("--cuda-graph", action="store_true", help="also replayed from a CUDA graph")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    device = torch.device("cuda")
    set_attention_backend("auto", device)
    results: dict = {"torch": torch.__version__, "gpu": torch.cuda.get_device_name(device)}
    if args.diffusers:
        results.update(diffusers_rows(device, args.repeats))
        torch.cuda.empty_cache()  # the diffusers model is gone with its function's frame
    model = fp8_model(device)
    step_inputs = inputs(device)

    import torch._inductor.config as inductor_config

    def tuning(on: bool) -> Callable[[], None]:
        return lambda: setattr(inductor_config, "coordinate_descent_tuning", on)

    probed = any(m.fuse_gelu_input for m in model.modules() if isinstance(m, Fp8Linear))
    results["fused kernel probe passed"] = probed
    eager_fused = None
    if probed:
        results["fused accuracy"], eager_fused = fused_accuracy(model, step_inputs)
    variants = [("compile", tuning(False), False)]
    if probed:
        variants.append(("compile + fused GELU quantisation", tuning(False), True))
    if args.cuda_graph:
        variants.append(("compile + CUDA graph", tuning(False), False))
    if args.coordinate_descent:
        variants.append(("compile + coordinate descent", tuning(True), False))
        if probed:
            variants.append(("compile + fused GELU quantisation + coordinate descent", tuning(True), True))
    for name, setup, fused in variants:
        results[name] = run_variant(name, model, step_inputs, args.repeats, setup, fused, eager_fused)
        if args.json:
            args.json.write_text(json.dumps(results, indent=1, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
