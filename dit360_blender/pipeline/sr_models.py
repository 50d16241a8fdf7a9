"""Super-resolution model files, loaded through spandrel: any architecture it detects (ESRGAN /
Real-ESRGAN, SwinIR, HAT, DAT, SPAN, ...), from a .pth (a restricted unpickler: tensors only) or a
.safetensors file, as the `upscale.SuperResolution` the wrap-aware tiled upscale runs.

spandrel (the loader ComfyUI and chaiNNer use) reads the state dict, recognises the architecture and
its hyper-parameters from the keys and shapes, and builds the network; we would otherwise have to
write and maintain each of those architectures and their detection by hand.

What spandrel does not say is how far a network sees: the tiles' margin. `receptive_margin` measures
it on the network itself: the gradient of a block of output pixels with respect to the input of a
random image, and the smallest margin outside which the input can move those outputs by no more than
`tolerance` (linearised). For a convolutional network whose reach is below the cap this is exactly its
receptive field (the gradient is exactly zero beyond it), so tiles equal an untiled run; for deep
networks (Real-ESRGAN's 23 RRDB blocks reach ~350 px in theory) the margin stops at the cap, and the
influence left beyond it is recorded (`LoadedSR.margin_residual`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import BadCheckpointError, BadParametersError, DeviceError, WeightsMissingError
from .upscale import SuperResolution

logger = logging.getLogger(__name__)

__all__ = ["LoadedSR", "load_sr_model", "pick_sr_dtype", "receptive_margin", "tile_for_budget"]

SR_SUFFIXES = (".pth", ".safetensors", ".pt", ".ckpt")
MARGIN_CAP = 48  # input pixels: beyond this a deep network's tiles cost more than they change
MARGIN_TOLERANCE = 1e-6  # how much the input beyond the margin may still move an output (linearised)


@dataclass(frozen=True)
class LoadedSR:
    """A loaded super-resolution model and what we know of it."""

    sr: SuperResolution
    path: Path
    architecture: str
    dtype: torch.dtype
    device: torch.device
    margin_capped: bool  # the network reaches further than `sr.margin`
    margin_residual: float  # the linearised influence left beyond the margin (0 when not capped)

    @property
    def scale(self) -> int:
        return self.sr.scale

    @property
    def margin(self) -> int:
        return self.sr.margin

    def describe(self) -> dict:
        """What the result's metadata records of the model."""
        return {
            "model": self.path.name,
            "architecture": self.architecture,
            "scale": self.scale,
            "margin": self.margin,
            "margin_capped": self.margin_capped,
            "dtype": str(self.dtype).removeprefix("torch."),
        }


def load_sr_model(
    path: Path | str,
    device: torch.device | str = "cpu",
    dtype: str | torch.dtype = "auto",
    *,
    margin_cap: int = MARGIN_CAP,
) -> LoadedSR:
    """Load the super-resolution model in `path` onto `device` in `dtype` ("auto": fp16 on CUDA/MPS
    where the architecture supports it, else bf16, else fp32; fp32 on the CPU).

    Raises WeightsMissingError (no such file), BadCheckpointError (not a model spandrel knows, or
    not an RGB super-resolution model: the message names the file and what spandrel said),
    BadParametersError (a precision the architecture does not support)."""
    path = Path(path)
    if not path.is_file():
        raise WeightsMissingError(
            f"The upscale model file {path} does not exist.",
            "Pick a .pth or .safetensors super-resolution model (e.g. RealESRGAN_x4plus.pth), or leave "
            "the model empty to use the default one (downloaded once from the Hugging Face Hub).",
        )
    descriptor = _spandrel_load(path)
    device = torch.device(device)
    torch_dtype = pick_sr_dtype(dtype, device, descriptor.supports_half, descriptor.supports_bfloat16, path)
    module = descriptor.model.eval()
    quantum = max(1, int(descriptor.size_requirements.multiple_of))
    margin, residual = receptive_margin(module, descriptor.scale, quantum, cap=margin_cap, device=device)
    capped = residual > 0.0
    if capped:
        logger.info(
            "%s: the network reaches beyond %d input pixels (influence %.2g left there); tiles keep a "
            "%d px margin",
            path.name,
            margin_cap,
            residual,
            margin,
        )
    module = module.to(device=device, dtype=torch_dtype)
    sr = SuperResolution(module, scale=int(descriptor.scale), margin=margin, multiple_of=quantum)
    return LoadedSR(
        sr=sr,
        path=path,
        architecture=str(descriptor.architecture.name),
        dtype=torch_dtype,
        device=device,
        margin_capped=capped,
        margin_residual=residual,
    )


def _spandrel_load(path: Path):
    """spandrel's ImageModelDescriptor of `path`, or our error naming the file and spandrel's words."""
    try:
        import spandrel
    except ImportError as exc:
        raise BadCheckpointError(
            f"Cannot load the upscale model {path.name}: the spandrel package is missing ({exc}).",
            "Reinstall the worker's packages (python vendor_setup.py, or the add-on's Install "
            "Dependencies button): spandrel and torchvision are part of them.",
        ) from None
    try:
        descriptor = spandrel.ModelLoader(device="cpu").load_from_file(str(path))
    except spandrel.UnsupportedModelError:
        raise BadCheckpointError(
            f"{path} is not a super-resolution model spandrel recognises (spandrel: unsupported model "
            "architecture: no known architecture matches its tensor names and shapes).",
            "Use an upscale model spandrel supports (ESRGAN / Real-ESRGAN, SwinIR, HAT, DAT, SPAN, "
            "... as .pth or .safetensors, e.g. from OpenModelDB), or leave the model empty for the default.",
        ) from None
    except Exception as exc:  # a truncated file, not a checkpoint at all, a forbidden pickle global
        raise BadCheckpointError(
            f"Could not read the upscale model {path}: spandrel said {type(exc).__name__}: {_short(exc)}",
            "Check that the file is a complete .pth or .safetensors super-resolution model (download it "
            "again if it was cut short).",
        ) from None
    if getattr(descriptor, "purpose", None) not in ("SR", "Restoration") or descriptor.input_channels != 3:
        raise BadCheckpointError(
            f"{path.name} is a {descriptor.architecture.name} model for {descriptor.purpose} with "
            f"{descriptor.input_channels} input channel(s), not an RGB super-resolution model.",
            "Pick an RGB super-resolution (upscale) model, e.g. RealESRGAN_x4plus.pth.",
        )
    if descriptor.output_channels != 3:
        raise BadCheckpointError(
            f"{path.name} outputs {descriptor.output_channels} channel(s), not RGB.",
            "Pick an RGB super-resolution (upscale) model.",
        )
    return descriptor


def pick_sr_dtype(
    dtype: str | torch.dtype, device: torch.device, supports_half: bool, supports_bf16: bool, path: Path
) -> torch.dtype:
    """The precision the model runs in: an explicit one must be supported by the architecture."""
    names = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
    if isinstance(dtype, str) and dtype != "auto":
        if dtype not in names:
            raise BadParametersError(f"Unknown precision {dtype!r}.", "Use auto, fp16, bf16 or fp32.")
        dtype = names[dtype]
    if dtype == "auto":
        if device.type == "cpu":
            return torch.float32
        if supports_half:
            return torch.float16
        return torch.bfloat16 if supports_bf16 else torch.float32
    if (dtype == torch.float16 and not supports_half) or (dtype == torch.bfloat16 and not supports_bf16):
        short = {torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]
        raise BadParametersError(
            f"The upscale model {path.name} does not support {short} "
            "(its architecture gives wrong results at that precision).",
            "Choose precision auto or fp32.",
        )
    return dtype


def receptive_margin(
    module: torch.nn.Module,
    scale: int,
    quantum: int = 1,
    *,
    cap: int = MARGIN_CAP,
    tolerance: float = MARGIN_TOLERANCE,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> tuple[int, float]:
    """(margin, residual): the input pixels around a block of output pixels that can move them by more
    than `tolerance` (the mean absolute gradient summed over the input beyond the margin), measured
    on a random image in float32 on `device`; at most `cap` (rounded up to `quantum`). `residual` is
    the influence beyond the margin when the cap was reached, else 0."""
    cap = -(-cap // quantum) * quantum
    block = quantum
    size = 2 * cap + block + 2 * quantum  # room to see the reach pass the cap
    size = -(-size // quantum) * quantum
    generator = torch.Generator().manual_seed(seed)
    probe = torch.rand((1, 3, size, size), generator=generator).to(device)
    probe.requires_grad_(True)
    module = module.float().to(device)
    with torch.enable_grad():
        out = module(probe)
        c = (size // 2) // quantum * quantum
        target = out[:, :, c * scale : (c + block) * scale, c * scale : (c + block) * scale]
        target.sum().backward()
    influence = probe.grad.abs().sum(dim=(0, 1)).double().cpu() / target.numel()
    for r in range(0, cap + 1):
        outside = _outside(influence, c - r, c + block + r)
        if outside <= tolerance:
            return -(-r // quantum) * quantum, 0.0
    return cap, _outside(influence, c - cap, c + block + cap)


def _outside(influence: torch.Tensor, low: int, high: int) -> float:
    """The sum of `influence` outside the square [low, high)² (exactly 0 where all of it is 0)."""
    masked = influence.clone()
    masked[low:high, low:high] = 0.0
    return float(masked.sum())


def tile_for_budget(
    sr: SuperResolution,
    device: torch.device,
    dtype: torch.dtype,
    budget_bytes: int | None = None,
    *,
    measure: Callable[[int], int] | None = None,
    largest: int = 1024,
    smallest: int = 32,
) -> int:
    """The largest tile (input pixels per side, a multiple of the model's grid) whose peak device
    memory stays within `budget_bytes` (default: 80 % of the device's free memory). Device memory per
    tile is measured on two small tiles (`measure(tile) -> peak bytes`; default: CUDA's peak counter)
    and extrapolated by area. On the CPU/MPS there is no budget to read: 256 (see upscale.DEFAULT_TILE).

    Raises BadParametersError when even the smallest tile does not fit (a card too small for it)."""
    from .upscale import DEFAULT_TILE

    if measure is None:
        if device.type != "cuda":
            return DEFAULT_TILE
        measure = _cuda_peak(sr, device, dtype)
    if budget_bytes is None:
        free, _ = torch.cuda.mem_get_info(device)
        budget_bytes = int(free * 0.8)
    q = max(1, sr.multiple_of)
    a, b = _round(64, q), _round(128, q)
    peak_a, peak_b = measure(a), measure(b)
    per_px = max((peak_b - peak_a) / ((b + 2 * sr.margin) ** 2 - (a + 2 * sr.margin) ** 2), 0.0)
    fixed = max(peak_a - per_px * (a + 2 * sr.margin) ** 2, 0.0)

    def fits(t: int) -> bool:
        return fixed + per_px * (t + 2 * sr.margin) ** 2 <= budget_bytes

    low = _round(smallest, q)
    if not fits(low):
        need = fixed + per_px * (low + 2 * sr.margin) ** 2
        raise BadParametersError(
            f"The upscale model needs about {need / 2**30:.2f} GiB of device memory for its smallest "
            f"tile ({low} px plus a {sr.margin} px margin); {budget_bytes / 2**30:.2f} GiB are available.",
            "Close other programs using the GPU, run the upscale on the CPU (device cpu), or use a "
            "smaller upscale model.",
        )
    tile = low
    while tile + q <= largest and fits(tile + q):
        tile += q
    return tile


def _cuda_peak(sr: SuperResolution, device: torch.device, dtype: torch.dtype) -> Callable[[int], int]:
    def measure(tile: int) -> int:
        side = tile + 2 * sr.margin
        x = torch.rand((1, 3, side, side), device=device, dtype=dtype)
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        try:
            with torch.inference_mode():
                sr.module(x)
        except torch.cuda.OutOfMemoryError:
            raise DeviceError(
                f"The GPU ran out of memory on a {tile} px test tile of the upscale model.",
                "Close other programs using the GPU, or run the upscale on the CPU (device cpu).",
            ) from None
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device) - base)

    return measure


def _round(value: int, grid: int) -> int:
    return max(grid, math.ceil(value / grid) * grid)


def _short(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
