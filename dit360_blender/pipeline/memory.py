"""Memory modes: how the models are placed on the device.

* `resident` — everything on the device in the chosen dtype (bf16: ~24 GB transformer + 9.5 GB
  T5 + the rest; the fastest when it fits).
* `fp8` — the transformer's block weights in fp8 with per-row scales (half the memory, fp8
  matmuls on Ada/Hopper/Blackwell); the T5 encoder stays in pinned host memory and is streamed
  through the GPU block by block while encoding, so it never holds VRAM during sampling.
  With a 16 GiB budget the worker's whole job stays within 16.0 GiB on the device (H200,
  docs/benchmarks.md); without one it takes ~26 GiB. On a card with room (no budget given, ≥ 40 GiB free) T5
  stays on the GPU and the decode is untiled instead: the speed of fp8 without the 16 GB layout.
* `stream` — like `fp8`, and only as many transformer blocks stay on the GPU as the VRAM budget
  allows; the others are copied from pinned host memory one or two blocks ahead on a side
  stream, hidden behind computation as far as the host link allows. CUDA only.
* `auto` — picks from the free VRAM: resident ≥ 40 GiB, fp8 ≥ 20 GiB, else stream with the free
  memory (less a margin) as the budget; resident on Apple MPS and the CPU.

A VRAM budget given (to any mode; the panel offers it for `stream`) is kept at the device level,
as the card's own monitor counts it: the caching allocator is capped at the budget less the CUDA
context (`allocator_cap`), so a job that would need more fails with an out-of-memory error instead
of quietly taking the rest of a bigger card — on an 80 GB card a 16 GiB budget acts as a 16 GB card.

Apple MPS has no float8, so `fp8` and `stream` are refused there.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import BadParametersError, DeviceError

MEMORY_MODES = ("auto", "resident", "fp8", "stream")
GIB = 2**30
AUTO_RESIDENT_GIB, AUTO_FP8_GIB, AUTO_MARGIN_GIB = 40.0, 20.0, 1.0
# What a worker's CUDA context (with cuBLAS' and cuDNN's handles and workspaces) holds outside the
# caching allocator: the device-level use is the allocator's reserve plus this. (Measured on an
# H200, torch 2.11: 0.77-0.79 GiB, docs/benchmarks.md.)
CUDA_CONTEXT_GIB = 0.8
FP8_WIDE_TILE_GIB = 20.0  # fp8 budgets below this decode in 64-pixel tiles (MemoryPlan.vae_tile)


@dataclass(frozen=True)
class MemoryPlan:
    mode: str
    quantize_fp8: bool
    stream_text_encoder: bool
    stream_transformer: bool
    vram_budget: int | None  # bytes: `stream`'s budget, or the one given to another mode (CUDA)
    roomy: bool = False  # fp8 on a card with room: T5 resident and one untiled decode (faster)

    @property
    def vae_tile(self) -> int | None:
        """Latent tile size for the exact tiled VAE decode, or None for one untiled decode.

        fp8 decodes in 128-pixel tiles (2 at 2048x1024: about half the untiled peak, little
        recomputation) unless the card has room, and in 64-pixel tiles within a budget under
        `FP8_WIDE_TILE_GIB` (the 16 GiB layout: 128-pixel tiles would be the job's peak, ~1.8 GiB
        above the step's); stream in 64-pixel tiles (8 tiles, about a quarter of the peak)."""
        if self.stream_transformer:
            return 64
        if not self.quantize_fp8 or self.roomy:
            return None
        tight = self.vram_budget is not None and self.vram_budget < FP8_WIDE_TILE_GIB * GIB
        return 64 if tight else 128


def plan_memory(mode: str, device: torch.device, vram_budget_gib: float | None = None) -> MemoryPlan:
    if mode not in MEMORY_MODES:
        raise BadParametersError(
            f"Unknown memory mode {mode!r}.", f"Choose one of {', '.join(MEMORY_MODES)}."
        )
    if mode == "auto":
        mode, vram_budget_gib = _auto(device, vram_budget_gib)
    budget = None if vram_budget_gib is None or device.type != "cuda" else int(vram_budget_gib * GIB)
    if mode == "resident":
        return MemoryPlan("resident", False, False, False, budget)
    if device.type == "mps":
        raise DeviceError(
            f"The '{mode}' memory mode stores the transformer in fp8, which Apple MPS can't hold: "
            "PyTorch's MPS backend has no float8 tensors.",
            "On a Mac choose the 'resident' memory mode (or 'auto') with fp16 precision.",
        )
    if device.type != "cuda" and mode == "stream":
        raise DeviceError(
            f"The 'stream' memory mode needs a CUDA GPU; this job runs on {device.type}.",
            "Choose 'resident' or 'fp8' (or 'auto').",
        )
    if mode == "fp8":
        # With room (no budget given and >= AUTO_RESIDENT_GIB free) nothing is streamed and the
        # decode is untiled: the 16 GiB layout is for the cards that need it.
        roomy = device.type == "cuda" and vram_budget_gib is None and _free_gib(device) >= AUTO_RESIDENT_GIB
        return MemoryPlan("fp8", True, device.type == "cuda" and not roomy, False, budget, roomy=roomy)
    if vram_budget_gib is None:
        vram_budget_gib = torch.cuda.mem_get_info(device)[0] / GIB - AUTO_MARGIN_GIB
    if vram_budget_gib < 4:
        raise BadParametersError(
            f"A VRAM budget of {vram_budget_gib:.1f} GiB is too small for DiT360 at 2048x1024.",
            "Give at least 6 GiB (8 GiB recommended), or close other programs using the GPU.",
        )
    return MemoryPlan("stream", True, True, True, int(vram_budget_gib * GIB))


def _free_gib(device: torch.device) -> float:
    return torch.cuda.mem_get_info(device)[0] / GIB


def _auto(device: torch.device, budget_gib: float | None) -> tuple[str, float | None]:
    if device.type != "cuda":
        return "resident", None
    free = _free_gib(device)
    if budget_gib is not None:
        free = min(free, budget_gib)
    if free >= AUTO_RESIDENT_GIB:  # a budget given stays the budget (capped: allocator_cap)
        return "resident", budget_gib
    if free >= AUTO_FP8_GIB:
        return "fp8", budget_gib
    return "stream", free - AUTO_MARGIN_GIB


def allocator_cap(plan: MemoryPlan, total_bytes: int) -> int | None:
    """Bytes the caching allocator may reserve on a card of `total_bytes` so the device-level use
    stays within the plan's budget (the budget less `CUDA_CONTEXT_GIB`); None without a budget.

    Raises BadParametersError for a budget the context alone would fill."""
    if plan.vram_budget is None:
        return None
    cap = min(plan.vram_budget, total_bytes) - int(CUDA_CONTEXT_GIB * GIB)
    if cap <= 0:
        raise BadParametersError(
            f"A VRAM budget of {plan.vram_budget / GIB:.1f} GiB leaves nothing beside the CUDA context "
            f"(~{CUDA_CONTEXT_GIB} GiB).",
            "Give at least 6 GiB (8 GiB recommended).",
        )
    return cap


def limit_allocator(plan: MemoryPlan, device: torch.device) -> int | None:
    """Cap this process's caching allocator on `device` for `plan` (`allocator_cap`), or lift an
    earlier job's cap when the plan has no budget; returns the cap in bytes (None: uncapped)."""
    if device.type != "cuda":
        return None
    # "cuda" (pick_device's, the CLI's) means the current GPU; the fraction call wants its index
    index = torch.cuda.current_device() if device.index is None else device.index
    total = torch.cuda.get_device_properties(index).total_memory
    cap = allocator_cap(plan, total)
    torch.cuda.empty_cache()  # what an earlier model left cached counts against the new cap
    torch.cuda.set_per_process_memory_fraction(1.0 if cap is None else cap / total, index)
    return cap


def resident_block_budget(
    plan: MemoryPlan, image_tokens: int, fixed_bytes: int, largest_block: int, prefetch: int
) -> int:
    """Bytes left for resident transformer blocks once everything else a job needs is set aside.

    Set aside: the weights that always stay (embedders, CLIP, the VAE, T5's embedding), the
    streaming slots, and the activations — about 200 KB per token of the joint sequence for the
    largest block in bf16 (linear1's output, fp32 q/k for RoPE, dense q/k/v copies, fp8 inputs),
    with 0.75 GiB slack for the tiled VAE decode and allocator fragmentation. (Measured on an
    H200: with 160 KB and 0.5 GiB an 8 GiB budget peaked at 8.41 GiB.)
    The budget is the device's: the CUDA context (`CUDA_CONTEXT_GIB`) comes off it first.
    """
    tokens = image_tokens + 512
    activations = tokens * 200_000 + 3 * GIB // 4
    room = plan.vram_budget - int(CUDA_CONTEXT_GIB * GIB)
    return room - fixed_bytes - activations - (prefetch + 1) * largest_block
