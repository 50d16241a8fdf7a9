"""Speed and memory of the quantised checkpoints users bring (issue 12), on random weights.

From the benchmark's bf16 ``flux1-dev.safetensors`` it writes, one at a time (each is deleted after
its runs, so the device's disk holds one):

* ``fp8-scaled``: ComfyUI's scaled fp8 (block Linear weights in float8_e4m3fn divided by a
  per-tensor ``.scale_weight``, the ``scaled_fp8`` marker), what ``flux1-dev-fp8`` users have;
* ``gguf-q8_0`` / ``gguf-q4_k``: city96-style GGUFs (BFL keys, ``general.architecture = flux``, the
  blocks' Linear weights quantised, the rest F16). The blocks are random bytes with fp16 scales of a
  plausible size: speed and memory don't depend on the values, and writing them takes seconds
  where quantising 12B weights with gguf's numpy code would take many minutes.

Each file is timed with DiT360's LoRA (the low-rank side path beside the stored weights) and
without it, so the side path's cost is the difference; ``--compile`` adds the compiled runs of the
fp8 file. The bf16 file's own ``fp8`` mode (quantised per row from the merged weights) is the other
way to run fp8 with a LoRA, timed by the main benchmark in the same run.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..pipeline.dit360 import DiT360Pipeline
from ..pipeline.model_files.catalogue import ModelPaths

GIB = 2**30
KINDS = ("fp8-scaled", "gguf-q8_0", "gguf-q4_k")
_BLOCKS = ("double_blocks.", "single_blocks.")
# Where each block format keeps its fp16 scales (ggml-common.h): random bytes there would be NaN.
_SCALE_OFFSETS = {"Q8_0": (0,), "Q4_K": (0, 2)}


def _is_block_linear(key: str, tensor_ndim: int) -> bool:
    return tensor_ndim == 2 and key.startswith(_BLOCKS) and key.endswith(".weight")


def write_quantised_transformer(bf16_file: Path, folder: Path, kind: str, device: str = "cpu") -> Path:
    """Write `kind` (one of KINDS) of the transformer in `bf16_file` into `folder`; returns the file."""
    folder.mkdir(parents=True, exist_ok=True)
    if kind == "fp8-scaled":
        return _write_scaled_fp8(bf16_file, folder / "flux1-dev-fp8-scaled.safetensors", device)
    if kind.startswith("gguf-"):
        qtype = kind.removeprefix("gguf-").upper()
        return _write_gguf(bf16_file, folder / f"flux1-dev-{qtype}.gguf", qtype)
    raise ValueError(f"unknown checkpoint kind {kind!r}; known: {', '.join(KINDS)}")


def _write_scaled_fp8(bf16_file: Path, target: Path, device: str) -> Path:
    fp8 = torch.float8_e4m3fn
    out: dict[str, torch.Tensor] = {"scaled_fp8": torch.empty(0, dtype=fp8)}
    with safe_open(str(bf16_file), framework="pt", device=device) as f:
        for key in f.keys():
            tensor = f.get_tensor(key)
            if _is_block_linear(key, tensor.ndim):
                scale = tensor.abs().amax().float() / torch.finfo(fp8).max
                out[key] = (tensor.float() / scale).to(fp8).cpu()
                out[key.removesuffix("weight") + "scale_weight"] = scale.reshape(()).cpu()
            else:
                out[key] = tensor.cpu().contiguous()
    save_file(out, str(target))
    return target


def _write_gguf(bf16_file: Path, target: Path, qtype_name: str) -> Path:
    import gguf

    qtype = gguf.GGMLQuantizationType[qtype_name]
    weights_per_block, bytes_per_block = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(0)
    writer = gguf.GGUFWriter(str(target), arch="flux")
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    with safe_open(str(bf16_file), framework="pt", device="cpu") as f:
        for key in sorted(f.keys()):
            tensor = f.get_tensor(key)
            if not _is_block_linear(key, tensor.ndim):
                writer.add_tensor(key, tensor.float().numpy().astype(np.float16))
                continue
            rows, cols = tensor.shape
            blocks = rng.integers(
                0, 256, size=(rows, cols // weights_per_block, bytes_per_block), dtype=np.uint8
            )
            # a block's weights are up to ~2^7 (Q8_0) or ~2^4 (K-quants) times its scale
            magnitude = float(tensor.abs().max()) / (128 if qtype_name == "Q8_0" else 1000)
            for offset in _SCALE_OFFSETS[qtype_name]:
                scale = rng.uniform(-magnitude, magnitude, size=blocks.shape[:2]).astype(np.float16)
                blocks[..., offset : offset + 2] = scale.view(np.uint8).reshape(*blocks.shape[:2], 2)
            writer.add_tensor(key, blocks.reshape(rows, -1), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return target


def checkpoint_variants(
    paths: ModelPaths,
    kinds: list[str],
    work: Path,
    device: torch.device,
    time_step: Callable[[Callable, torch.dtype], float],
    compile_fp8: bool,
    peak: Callable[[], int],
    reset_peak: Callable[[], None],
    free: Callable[[], None],
) -> dict:
    """Per kind: the file's size and write time, then per run (LoRA on/off, compiled) the load
    time, the step (median, as the main benchmark times it), peak VRAM and the LoRA's effect on
    one transformer output (relative; 0 would mean the side path did nothing)."""
    results: dict = {}
    for kind in kinds:
        t0 = time.perf_counter()
        file = write_quantised_transformer(paths.transformer, work / "quantised", kind, str(device))
        record: dict = {"write_s": time.perf_counter() - t0, "file_gib": file.stat().st_size / GIB}
        runs = [("lora", 1.0, False), ("no lora", 0.0, False)]
        if compile_fp8 and kind == "fp8-scaled":
            runs += [("lora+compile", 1.0, True), ("no lora+compile", 0.0, True)]
        outputs: dict[str, torch.Tensor] = {}
        for name, strength, compiled in runs:
            free()
            reset_peak()
            try:
                record[name] = _one_run(
                    dataclasses.replace(paths, transformer=file), device, strength, compiled, time_step,
                    outputs, name,
                )  # fmt: skip
                record[name]["peak_gib"] = peak() / GIB
            except Exception as exc:  # one failing run must not lose the others' numbers
                record[name] = {"skipped": f"failed: {type(exc).__name__}: {exc}"[:300]}
            print(f"[checkpoint {kind} / {name}] {record[name]}", flush=True)
        if "lora" in outputs and "no lora" in outputs:
            ref = outputs["no lora"].double()
            record["lora_effect_rel"] = ((outputs["lora"].double() - ref).norm() / ref.norm()).item()
        for run in ("lora", "lora+compile"):
            base = record.get(f"no {run}", {}).get("step_s")
            with_lora = record.get(run, {}).get("step_s")
            if base and with_lora:
                record[f"side_path_cost_{run.replace('+', '_')}"] = with_lora / base
        file.unlink()
        results[kind] = record
    return results


def _one_run(
    paths: ModelPaths,
    device: torch.device,
    lora_strength: float,
    compiled: bool,
    time_step: Callable[[Callable, torch.dtype], float],
    outputs: dict[str, torch.Tensor],
    name: str,
) -> dict:
    t0 = time.perf_counter()
    pipe = DiT360Pipeline.load(
        paths, device=device, dtype="bf16" if device.type == "cuda" else "fp32", memory_mode="resident", lora_strength=lora_strength,
        compile=compiled,
    )  # fmt: skip
    record = {"load_s": time.perf_counter() - t0}
    captured: list[torch.Tensor] = []

    def forward(*args):
        out = pipe.transformer(*args)
        if not captured:
            captured.append(out.detach().float().cpu())
        return out

    record["step_s"] = time_step(forward, pipe.dtype)
    outputs[name] = captured[0]
    return record
