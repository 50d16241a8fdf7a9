"""One kernel that turns an fp8 layer's input rows into e4m3 + one scale per row (Triton, CUDA).

The fp8 matmuls quantise their activations per token (fp8.py). Under torch.compile, Inductor fuses
that into what comes before it, but for the two widest inputs — a single block's
cat(attention, gelu(mlp)) into `linear2` (15360 wide) and a double block's gelu(mlp) into the MLP's
second Linear (12288 wide) — it makes a looped reduction that reads each row twice and computes
the GELU twice: 0.36–0.39 ms a call, 22 ms of every step on an H200 (bench/step_variants.py). Here
one program holds a whole row in registers: it reads the row once, applies the GELU, finds the
row's abs-max and writes the fp8 row and its scale.

The numbers are the plain path's (fp8.py) up to rounding: the GELU (tanh form, as x·sigmoid(2u)) is
rounded to the compute dtype before the abs-max, as `nn.GELU` then `torch.cat` leave it, and the
row is scaled by one reciprocal instead of a division per element; on an H200, 7 in 10 million e4m3
values came out one step apart from the plain path's, the scales identical. `available()` is False
without Triton (CPU, MPS, Windows without triton-windows); callers then take the plain path.
"""

import logging
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

logger = logging.getLogger(__name__)

try:
    import triton
    import triton.language as tl
    from torch.library import triton_op, wrap_triton
except Exception:  # no Triton here (or one that fails to import): the plain path only
    triton = None

MAX_ROW = 32768  # one row per program, in registers: wider rows take the plain path


def available(x: Tensor) -> bool:
    """The fused kernel can quantise rows of `x` (a CUDA tensor in a half dtype, Triton present)."""
    return triton is not None and x.is_cuda and x.dtype in (torch.bfloat16, torch.float16)


if triton is not None:

    @triton.jit
    def _gelu_quantize_rows_kernel(
        first_ptr, first_stride, second_ptr, second_stride, out_ptr, scale_ptr,
        FIRST: tl.constexpr, SECOND: tl.constexpr, BLOCK: tl.constexpr, ROUND_BF16: tl.constexpr,
    ):  # fmt: skip
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        in_first = cols < FIRST
        in_second = (cols >= FIRST) & (cols < FIRST + SECOND)
        first = tl.load(first_ptr + row * first_stride + cols, mask=in_first, other=0.0).to(tl.float32)
        x = tl.load(second_ptr + row * second_stride + (cols - FIRST), mask=in_second, other=0.0)
        x = x.to(tl.float32)
        inner = 0.7978845608028654 * (x + 0.044715 * x * x * x)
        # 0.5 x (1 + tanh(u)) = x sigmoid(2u), without 1 - 2/(e^2u + 1)'s cancellation for x < 0
        gelu = x / (1.0 + tl.exp(-2.0 * inner))
        if ROUND_BF16:  # as nn.GELU leaves it in the compute dtype
            gelu = gelu.to(tl.bfloat16).to(tl.float32)
        else:
            gelu = gelu.to(tl.float16).to(tl.float32)
        values = tl.where(in_first, first, gelu)
        scale = tl.maximum(tl.max(tl.abs(values), axis=0) / 448.0, 1e-12)
        # one exact reciprocal per row: a per-element IEEE division made the kernel compute-bound
        quantised = tl.clamp(values * tl.math.div_rn(1.0, scale), -448.0, 448.0)  # e4m3's largest
        tl.store(
            out_ptr + row * (FIRST + SECOND) + cols, quantised.to(tl.float8e4nv), mask=cols < FIRST + SECOND
        )
        tl.store(scale_ptr + row, scale)

    @triton_op("dit360::gelu_quantize_rows", mutates_args={})
    def _gelu_quantize_rows(first: Tensor | None, second: Tensor) -> tuple[Tensor, Tensor]:
        rows, second_width = second.shape
        first_width = 0 if first is None else first.shape[1]
        out = torch.empty(rows, first_width + second_width, dtype=torch.float8_e4m3fn, device=second.device)
        scale = torch.empty(rows, 1, dtype=torch.float32, device=second.device)
        block = triton.next_power_of_2(first_width + second_width)
        source = second if first is None else first
        wrap_triton(_gelu_quantize_rows_kernel)[(rows,)](
            source, source.stride(0), second, second.stride(0), out, scale,
            FIRST=first_width, SECOND=second_width, BLOCK=block,
            ROUND_BF16=second.dtype == torch.bfloat16, num_warps=8,  # fastest of 4-32 on an H200
        )  # fmt: skip
        return out, scale


def probe(device: torch.device, dtype: torch.dtype, shapes: Sequence[tuple[int, int]]) -> bool:
    """The kernel compiles and runs on `device` in `dtype` for every (first, second) width in
    `shapes` (Triton builds one kernel per width) and agrees with the plain formula, found by one
    16-row call each: a Triton or driver that can't build it must not fail the user's job. Only
    where `device` is the current CUDA device: Triton launches there, whatever the tensors' device."""
    if triton is None or device.type != "cuda":
        return False
    if device.index is not None and device.index != torch.cuda.current_device():
        logger.info("fused fp8 quantisation not used on %s (not the current CUDA device)", device)
        return False
    for first_width, second_width in shapes:
        if not _probe_shape(device, dtype, first_width, second_width):
            return False
    return True


def _probe_shape(device: torch.device, dtype: torch.dtype, first_width: int, second_width: int) -> bool:
    from .fp8 import first_line, quantize_activations  # fp8.py imports this module at its top

    gen = torch.Generator().manual_seed(0)
    first = torch.randn(16, first_width, generator=gen).to(device, dtype) if first_width else None
    second = (3 * torch.randn(16, second_width, generator=gen)).to(device, dtype)
    try:
        with torch.cuda.device(device):
            xq, scale = gelu_quantize_rows(first, second)
            torch.cuda.synchronize(device)
    except Exception as exc:  # CompilationError, RuntimeError, ...: whatever this build raises
        logger.info("fused fp8 quantisation unavailable on %s: %s", device, first_line(exc))
        return False
    x = F.gelu(second, approximate="tanh")
    x = (x if first is None else torch.cat((first, x), dim=1)).float()
    ref_scale = quantize_activations(x)[1]
    got = xq.float() * scale
    # e4m3 keeps 3 mantissa bits: a right kernel is within half a step (1/16) of each value
    if not torch.allclose(scale, ref_scale, rtol=1e-2) or ((got - x).abs() > x.abs() / 15 + 1e-3).any():
        logger.warning("fused fp8 quantisation on %s gives wrong results; not using it", device)
        return False
    return True


def gelu_quantize_rows(first: Tensor | None, second: Tensor) -> tuple[Tensor, Tensor]:
    """(e4m3 rows, fp32 scales (rows, 1)) of cat(first, gelu_tanh(second)) along the last axis, one
    scale per row (its abs-max maps to 448). `first` (optional) and `second` are (rows, width)
    with unit stride along the row (a split's view is fine); call only where `available` holds."""
    width = second.shape[1] + (0 if first is None else first.shape[1])
    if width > MAX_ROW or second.stride(1) != 1 or (first is not None and first.stride(1) != 1):
        raise ValueError(
            f"rows of {width} columns with a unit inner stride are needed, got {second.stride()}"
        )
    return _gelu_quantize_rows(first, second)
