"""`python -m dit360_blender.bench`: speed and memory of every memory mode, on random weights.

Builds the full-size model set with random weights (no download), then for each mode measures
the transformer step (median of >= 5 after warm-up, CUDA events), text encoding, VAE decode, a
whole 28-step job, peak VRAM (`max_memory_allocated`) and host RSS; and, when diffusers is
installed, the diffusers `FluxTransformer2DModel` eager step on the same card in the same run, so
every figure can be given as a ratio to it. Writes JSON and a markdown table.

`--tiny` runs the same code on a tiny model set (a smoke test that runs on the CPU).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import re
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ..pipeline.dit360 import DEFAULT_IMAGE_TOKENS, DiT360Pipeline, GenerateRequest
from ..pipeline.fp8 import Fp8Linear
from ..pipeline.model_files.download import resolve_model_paths
from ..pipeline.sampling import image_ids, wrap_pad_ids
from .checkpoints import KINDS, checkpoint_variants
from .report import markdown_table
from .synthetic import FULL, TINY, write_synthetic_models
from .user_path import diffusers_compiled, worker_jobs, worker_variant

PROMPT = "This is a panorama. A sunny alpine lake surrounded by pine forest and snowy peaks."
GIB = 2**30


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dit360_blender.bench", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--tiny", action="store_true", help="tiny random models (CPU smoke test)")
    parser.add_argument(
        "--work", type=Path, help="folder for the random model files (default: a temp folder)"
    )
    parser.add_argument(
        "--out", type=Path, default=Path("bench_results"), help="folder for results.json and results.md"
    )
    parser.add_argument("--modes", default="resident,fp8,stream:8,stream:12,stream:16,stream:24")
    parser.add_argument(
        "--jobs", default="resident,fp8,stream:8", help="modes that also run whole 28-step jobs"
    )
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--no-diffusers", action="store_true")
    parser.add_argument("--compile", action="store_true", help="also time regional torch.compile in fp8 mode")
    parser.add_argument(
        "--compile-modes", default="fp8,resident,resident/fp16", help="the modes --compile times"
    )
    parser.add_argument(
        "--checkpoints",
        default="",
        help=f"quantised transformer files to write and time with and without the LoRA ({', '.join(KINDS)})",
    )
    parser.add_argument(
        "--cold-load", action="store_true", help="also measure cold load against raw file reads"
    )
    parser.add_argument(
        "--profile", action="store_true", help="print the top CUDA kernels of one step per mode"
    )
    parser.add_argument("--attention-probe", action="store_true", help="time each SDPA backend at our shape")
    parser.add_argument(
        "--worker",
        default="",
        help="worker variants to time through the real client, comma-separated (user_path.WORKER_VARIANTS, "
        "each optionally + ' warmed': a warm job first; "
        "a name twice = a second launch of it, with the compile cache warm)",
    )
    args = parser.parse_args(argv)
    bench = Bench(args)
    bench.run()
    return 0


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.cuda = self.device.type == "cuda"
        self.spec = TINY if args.tiny or not self.cuda else FULL
        self.width, self.height = (2048, 1024) if self.spec is FULL else (128, 64)
        self.results: dict = {"env": self._env(), "modes": {}, "notes": []}
        self.images: dict[str, torch.Tensor] = {}
        self.reference_layers: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        args.out.mkdir(parents=True, exist_ok=True)

    # -- driver --------------------------------------------------------------------------------

    def run(self) -> None:
        work = self.args.work or Path(tempfile.mkdtemp(prefix="dit360-bench-"))
        t0 = time.perf_counter()
        write_synthetic_models(work, self.spec, device=str(self.device))
        self.results["synthetic_write_s"] = time.perf_counter() - t0
        self.paths = resolve_model_paths(models_dir=work)
        self.results["pinned_h2d_gbps"] = self._h2d_bandwidth()
        if self.args.attention_probe and self.cuda:
            self._attention_probe()
        if not self.args.no_diffusers:
            self._diffusers_baseline()
        for mode in filter(None, (m.strip() for m in self.args.modes.split(","))):
            try:
                self._run_mode(mode)
            except Exception as exc:  # one broken mode must not lose the others' numbers
                self.results["modes"][mode.strip()] = {
                    "skipped": f"failed: {type(exc).__name__}: {exc}"[:300]
                }
                print(f"[{mode}] FAILED: {exc!r}", flush=True)
                import traceback

                traceback.print_exc()
                self._save()
        if self.args.compile and self.cuda:
            for mode in filter(None, (m.strip() for m in self.args.compile_modes.split(","))):
                try:
                    self._compiled(mode)
                except Exception as exc:
                    self.results["modes"][f"{mode}+compile"] = {"skipped": f"failed: {exc!r}"[:300]}
                    print(f"[{mode}+compile] FAILED {exc!r}", flush=True)
        if self.args.checkpoints:
            self.results["checkpoints"] = checkpoint_variants(
                self.paths, [k.strip() for k in self.args.checkpoints.split(",") if k.strip()], work,
                self.device, self._transformer_step, self.args.compile and self.cuda, _peak, _reset_peak, _free,
            )  # fmt: skip
            self._save()
        if self.args.cold_load:
            self._cold_load(work)
        self._worker_variants(work)
        self._save()

    def _worker_variants(self, work: Path) -> None:
        launches = [name.strip() for name in self.args.worker.split(",") if name.strip()]
        results = self.results.setdefault("worker", [])
        user_dir = work / "worker-user-folder"
        user_dir.mkdir(exist_ok=True)
        for name in launches:
            _free()
            try:
                record = worker_jobs(
                    work, user_dir, worker_variant(name), self.width, self.height, self.args.steps,
                    self.device if self.cuda else None,
                )  # fmt: skip
            except Exception as exc:  # one failing variant must not lose the others' numbers
                record = {"skipped": f"failed: {type(exc).__name__}: {exc}"[:300]}
            record["name"] = name
            results.append(record)
            print(f"[worker {name}] {json.dumps(record, default=float)}", flush=True)
            self._save()

    def _run_mode(self, mode: str) -> None:
        mode_part, _, dtype = mode.partition("/")  # "resident/fp16": that mode in another precision
        name, _, budget = mode_part.partition(":")
        if name == "stream" and not self.cuda:
            self.results["modes"][mode] = {"skipped": "needs CUDA"}
            return
        _free()
        _reset_peak()
        t0 = time.perf_counter()
        pipe = DiT360Pipeline.load(
            self.paths, device=self.device, dtype=dtype or ("bf16" if self.cuda else "fp32"),
            memory_mode=name, vram_budget_gib=float(budget) if budget else None,
        )  # fmt: skip
        record: dict = {"load_s": time.perf_counter() - t0, "rss_gib": _rss() / GIB}
        record["step_s"] = self._transformer_step(lambda *a: pipe.transformer(*a), pipe.dtype)
        if self.args.profile and self.cuda:
            self._profile(mode, lambda *a: pipe.transformer(*a), pipe.dtype)
        record["encode_s"] = self._median(lambda: pipe.text_encoders.encode(PROMPT), 3)
        z = torch.randn(1, 16, self.height // 8, self.width // 8, device=self.device)
        record["decode_s"] = self._median(lambda: pipe.decode(z), 3)
        if pipe.streamers:
            record["streamed_gib"] = (
                pipe.streamers[-1].streamed_bytes / GIB if pipe.plan.stream_transformer else 0.0
            )
        if mode in self.args.jobs.split(","):
            request = GenerateRequest(
                PROMPT, seed=1, steps=self.args.steps, width=self.width, height=self.height
            )
            pipe.generate(request)  # warm
            _reset_peak()
            t0 = time.perf_counter()
            result = pipe.generate(request)
            _sync()
            record["job_s"] = time.perf_counter() - t0
            record["job_timings"] = result.timings
            record["job_peak_gib"] = _peak() / GIB
            self.images[mode] = result.image
            if mode != "resident" and "resident" in self.images:
                ref = self.images["resident"].double()
                record["image_rel_diff_vs_resident"] = (
                    (result.image.double() - ref).abs().mean() / ref.abs().mean()
                ).item()
        record["peak_gib"] = _peak() / GIB
        if name == "resident":
            self.reference_layers = self._sample_layers(pipe)
        if name == "fp8" and self.reference_layers:
            record["fp8_layer_error"] = self._fp8_layer_error(pipe)
        self.results["modes"][mode] = record
        print(f"[{mode}] {json.dumps(record, default=float)}", flush=True)
        self._save()
        for streamer in pipe.streamers:
            streamer.close()

    # -- measurements --------------------------------------------------------------------------

    def _inputs(self, dtype: torch.dtype, flux_params) -> tuple:
        grid_h, grid_w = self.height // 16, self.width // 16
        ids = wrap_pad_ids(image_ids(grid_h, grid_w), grid_h, grid_w).to(self.device)
        n = ids.shape[0]
        gen = torch.Generator(self.device).manual_seed(0)
        img = torch.randn(1, n, 64, device=self.device, generator=gen, dtype=dtype)
        txt = torch.randn(1, 512, flux_params.context_in_dim, device=self.device, generator=gen, dtype=dtype)
        vec = torch.randn(1, flux_params.vec_in_dim, device=self.device, generator=gen, dtype=dtype)
        t = torch.full((1,), 0.7, device=self.device)
        g = torch.full((1,), 2.8, device=self.device)
        return img, ids, txt, torch.zeros(512, 3, device=self.device), t, vec, g

    def _transformer_step(self, forward: Callable, dtype: torch.dtype) -> float:
        img, ids, txt, txt_ids, t, vec, g = self._inputs(dtype, self.spec.flux)

        def step():
            with torch.inference_mode():
                forward(img, ids[None], txt, txt_ids[None], t, vec, g)

        return self._median(step, self.args.repeats)

    def _profile(self, mode: str, forward: Callable, dtype: torch.dtype) -> None:
        from torch.profiler import ProfilerActivity, profile

        img, ids, txt, txt_ids, t, vec, g = self._inputs(dtype, self.spec.flux)
        with profile(activities=[ProfilerActivity.CUDA]) as prof, torch.inference_mode():
            forward(img, ids[None], txt, txt_ids[None], t, vec, g)
            torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=22, max_name_column_width=70)
        print(f"[profile {mode}]\n{table}", flush=True)
        (self.args.out / f"profile_{re.sub(r'[^A-Za-z0-9._-]', '_', mode)}.txt").write_text(table)

    def _attention_probe(self) -> None:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        heads, n, d = self.spec.flux.num_heads, 8832, self.spec.flux.hidden_size // self.spec.flux.num_heads
        qkv = torch.randn(1, n, 3 * heads * d, device=self.device, dtype=torch.bfloat16)
        strided = qkv.view(1, n, 3, heads, d).permute(2, 0, 3, 1, 4)  # the layout our blocks produce
        contiguous = [x.contiguous() for x in strided]
        probe = {}
        for backend in (
            SDPBackend.CUDNN_ATTENTION,
            SDPBackend.FLASH_ATTENTION,
            SDPBackend.EFFICIENT_ATTENTION,
        ):
            for layout, (q, k, v) in (("strided", tuple(strided)), ("contiguous", tuple(contiguous))):
                try:
                    with sdpa_kernel([backend]):
                        probe[f"{backend.name}/{layout}"] = self._median(
                            lambda q=q, k=k, v=v: torch.nn.functional.scaled_dot_product_attention(q, k, v), 5
                        )
                except RuntimeError as exc:
                    probe[f"{backend.name}/{layout}"] = f"unavailable: {str(exc)[:80]}"
        self.results["attention_probe_s"] = probe
        print(f"[attention] {probe}", flush=True)

    def _median(self, fn: Callable, repeats: int, warmup: int = 2) -> float:
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeats):
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / 1000)
            else:
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
        return statistics.median(times)

    def _diffusers_baseline(self) -> None:
        try:
            from diffusers import FluxTransformer2DModel
        except ImportError:
            self.results["notes"].append("diffusers not installed: no baseline")
            return
        p = self.spec.flux
        _free()
        _reset_peak()
        dtype = torch.bfloat16 if self.cuda else torch.float32
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)  # build in bf16 directly: an fp32 12B model would not fit beside it
        with torch.device(self.device):
            model = FluxTransformer2DModel(
                in_channels=64, num_layers=p.depth, num_single_layers=p.depth_single_blocks,
                attention_head_dim=p.hidden_size // p.num_heads, num_attention_heads=p.num_heads,
                joint_attention_dim=p.context_in_dim, pooled_projection_dim=p.vec_in_dim,
                guidance_embeds=True, axes_dims_rope=tuple(p.axes_dim),
            ).eval()  # fmt: skip
        torch.set_default_dtype(previous)

        def forward(img, ids, txt, txt_ids, t, vec, g):
            return model(hidden_states=img, encoder_hidden_states=txt, pooled_projections=vec, timestep=t,
                         guidance=g, img_ids=ids[0], txt_ids=txt_ids[0], return_dict=False)[0]  # fmt: skip

        record = {"step_s": self._transformer_step(forward, dtype), "peak_gib": _peak() / GIB}
        self.results["diffusers"] = record
        print(f"[diffusers] {record}", flush=True)
        if self.cuda:
            try:
                compiled = diffusers_compiled(model, lambda: self._transformer_step(forward, dtype))
            except Exception as exc:
                compiled = {"skipped": f"failed: {type(exc).__name__}: {exc}"[:300]}
            self.results["diffusers_compiled"] = compiled
            print(f"[diffusers compiled] {compiled}", flush=True)

    SAMPLED_LAYERS = (
        "double_blocks.0.img_attn.qkv", "double_blocks.0.img_mlp.0", "double_blocks.9.txt_attn.proj",
        "double_blocks.18.img_mlp.2", "single_blocks.0.linear1", "single_blocks.0.linear2",
        "single_blocks.20.linear1", "single_blocks.37.linear2",
    )  # fmt: skip

    def _sample_layers(self, pipe: DiT360Pipeline) -> dict:
        """Host copies of a few bf16 layers (LoRA merged), to compare the fp8 ones against."""
        modules = dict(pipe.transformer.named_modules())
        out = {}
        for name in self.SAMPLED_LAYERS:
            if name in modules and isinstance(modules[name], torch.nn.Linear):
                layer = modules[name]
                out[name] = (
                    layer.weight.detach().cpu(),
                    None if layer.bias is None else layer.bias.detach().cpu(),
                )
        return out

    def _fp8_layer_error(self, pipe: DiT360Pipeline) -> dict:
        """‖fp8 layer(x) − bf16 layer(x)‖ / ‖bf16 layer(x)‖ on random activations of the real token count."""
        modules = dict(pipe.transformer.named_modules())
        errors = {}
        for name, (weight, bias) in self.reference_layers.items():
            module = modules[name]
            if not isinstance(module, Fp8Linear) or module.weight.device.type != self.device.type:
                continue
            rows = DEFAULT_IMAGE_TOKENS + 512 if self.cuda else 64
            x = torch.randn(rows, module.in_features, device=self.device, dtype=pipe.dtype)
            w, b = weight.to(self.device), None if bias is None else bias.to(self.device)
            with torch.inference_mode():
                ref = torch.nn.functional.linear(x, w, b).float()
                got = module(x).float()
            errors[name] = ((got - ref).norm() / ref.norm()).item()
        return errors

    def _compiled(self, mode: str) -> None:
        _free()
        _reset_peak()
        name, _, dtype = mode.partition("/")
        pipe = DiT360Pipeline.load(
            self.paths, device=self.device, dtype=dtype or "bf16", memory_mode=name, compile=True
        )
        t0 = time.perf_counter()
        record = {"step_s": self._transformer_step(lambda *a: pipe.transformer(*a), pipe.dtype)}
        record["compile_and_first_steps_s"] = time.perf_counter() - t0
        if self.args.profile:
            self._profile(f"{mode}+compile", lambda *a: pipe.transformer(*a), pipe.dtype)
        request = GenerateRequest(PROMPT, seed=1, steps=self.args.steps, width=self.width, height=self.height)
        pipe.generate(request)
        _reset_peak()
        t0 = time.perf_counter()
        result = pipe.generate(request)
        _sync()
        record["job_s"] = time.perf_counter() - t0
        record["job_timings"] = result.timings
        record["job_peak_gib"] = record["peak_gib"] = _peak() / GIB
        self.results["modes"][f"{mode}+compile"] = record
        print(f"[{mode}+compile] {record}", flush=True)
        self._save()

    def _h2d_bandwidth(self) -> float | None:
        if not self.cuda:
            return None
        host = torch.empty(2 * GIB, dtype=torch.uint8).pin_memory()
        dev = torch.empty_like(host, device=self.device)
        seconds = self._median(lambda: dev.copy_(host, non_blocking=True), 5)
        return 2 * GIB / seconds / 1e9

    def _cold_load(self, work: Path) -> None:
        files = sorted(
            p for p in work.rglob("*") if p.is_file() and p.suffix in (".safetensors", ".json", ".model")
        )
        dropped = _drop_page_cache(files)
        t0 = time.perf_counter()
        total = sum(_read_all(f) for f in files)
        read_s = time.perf_counter() - t0
        _drop_page_cache(files)
        _free()
        t0 = time.perf_counter()
        pipe = DiT360Pipeline.load(self.paths, device=self.device, dtype="bf16" if self.cuda else "fp32")
        _sync()
        load_s = time.perf_counter() - t0
        del pipe
        self.results["cold_load"] = {
            "bytes": total,
            "read_s": read_s,
            "load_s": load_s,
            "ratio": load_s / read_s,
            "page_cache_dropped": dropped,
        }
        print(f"[cold load] {self.results['cold_load']}", flush=True)

    # -- output --------------------------------------------------------------------------------

    def _env(self) -> dict:
        env = {
            "torch": torch.__version__,
            "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d"),
        }
        if torch.cuda.is_available():
            env["gpu"] = torch.cuda.get_device_name(0)
            env["cuda"] = torch.version.cuda
            env["driver"] = _driver_version()
        try:
            import diffusers

            env["diffusers"] = diffusers.__version__
        except ImportError:
            pass
        return env

    def _save(self) -> None:
        (self.args.out / "results.json").write_text(json.dumps(self.results, indent=2, default=float))
        (self.args.out / "results.md").write_text(markdown_table(self.results))


# -- helpers -----------------------------------------------------------------------------------


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _reset_peak() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def _peak() -> int:
    return torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0


def _rss() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        return 0


def _driver_version() -> str:
    try:
        import subprocess

        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _drop_page_cache(files: list[Path]) -> bool:
    """Ask the kernel to forget the files' cached pages (Linux); True if it accepted."""
    if not hasattr(os, "posix_fadvise"):
        return False
    ok = True
    for path in files:
        try:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
        except OSError:
            ok = False
    return ok


def _read_all(path: Path, chunk: int = 64 * 2**20) -> int:
    total = 0
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(chunk)
        view = memoryview(buf)
        while n := f.readinto(view):
            total += n
    return total
