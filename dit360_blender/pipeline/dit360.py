"""DiT360 text → 360° panorama: text encoders, FLUX + LoRA, wrap-padded sampling, VAE decode."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from ..params import ParamError, check_values
from .errors import BadParametersError, DeviceError
from .flux_checkpoint import config_axes_dim, infer_params, load_flux_transformer, read_shapes
from .flux_layers import set_attention_backend
from .flux_model import Flux
from .fp8 import enable_fp8_matmul
from .lora import LoraMerger, load_lora
from .memory import MemoryPlan, limit_allocator, plan_memory, resident_block_budget
from .memory_peaks import StagePeaks
from .model_files.catalogue import FLUX_REPO, LORA_REPO, ModelPaths
from .sampling import (
    PATCH,
    VAE_DOWNSCALE,
    Cancelled,
    StepCallback,
    crop_pad,
    denoise,
    get_noise,
    get_sigmas,
    image_ids,
    pack,
    unpack,
    wrap_pad,
    wrap_pad_ids,
)
from .step_cache import StepCache
from .streaming import BlockStreamer, module_bytes, move_except, spread_indices
from .text_encoders import TextEncoders
from .vae_checkpoint import load_autoencoder
from .vae_model import AutoEncoder

T5_MAX_LENGTH = 512
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TOKEN_SIZE = VAE_DOWNSCALE * PATCH  # one transformer token covers 16x16 pixels

__all__ = ["Cancelled", "DiT360Pipeline", "GenerateRequest", "Generation", "pick_device", "DTYPES"]


@dataclass
class GenerateRequest:
    """One panorama. Defaults are DiT360's: 2048x1024, 28 steps, guidance 2.8."""

    prompt: str
    seed: int = 0
    steps: int = 28
    guidance: float = 2.8
    width: int = 2048
    height: int = 1024
    step_cache: float = 0.0  # opt-in First-Block-Cache threshold (pipeline/step_cache.py); 0 = off

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Refuse bad requests before anything is loaded or written (the limits are the
        parameter table's, `dit360_blender/params.py`); a request checks itself when made."""
        try:
            check_values(asdict(self))
        except ParamError as exc:
            raise BadParametersError(exc.message, exc.hint) from None


@dataclass
class Generation:
    """The result: an RGB image as float (3, H, W) in [0, 1] on the CPU, plus what made it."""

    image: Tensor
    request: GenerateRequest
    metadata: dict
    timings: dict = field(default_factory=dict)
    memory: dict = field(default_factory=dict)  # GPU memory per stage (memory_peaks.StagePeaks)

    def to_uint8(self) -> Tensor:
        """(H, W, 3) uint8, rounded like diffusers' image post-processing."""
        return (self.image.permute(1, 2, 0) * 255).round().to(torch.uint8)


def pick_device(name: str = "auto") -> torch.device:
    """'auto' → CUDA, else Apple MPS, else CPU; an explicit device must exist."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(
            "CUDA was requested but this PyTorch sees no CUDA GPU.",
            "Choose device 'auto' or 'cpu', or install a CUDA build of PyTorch.",
        )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise DeviceError("MPS was requested but is not available here.", "Choose device 'auto' or 'cpu'.")
    return device


class DiT360Pipeline:
    """All models loaded once; `generate` may be called any number of times."""

    def __init__(
        self,
        text_encoders: TextEncoders,
        transformer: Flux,
        vae: AutoEncoder,
        device: torch.device,
        dtype: torch.dtype,
        model_info: dict,
        plan: MemoryPlan | None = None,
        streamers: list[BlockStreamer] | None = None,
    ) -> None:
        self.text_encoders = text_encoders
        self.transformer = transformer
        self.vae = vae
        self.device = device
        self.dtype = dtype
        self.model_info = model_info
        self.plan = plan or MemoryPlan("resident", False, False, False, None)
        self.streamers = streamers or []
        self.vae_wrap = True
        self.allocator_cap: int | None = None  # bytes (memory.limit_allocator), None: uncapped
        self.load_memory: dict = {}  # the load's GPU memory peaks (memory_peaks.StagePeaks.report)
        self.load_timings: dict[str, float] = {}  # seconds per part of the load (_LoadClock)
        self.peaks = StagePeaks(device)  # the running (or last) job's

    @classmethod
    def load(
        cls,
        paths: ModelPaths,
        device: str | torch.device = "auto",
        dtype: str | torch.dtype = "auto",
        lora_strength: float = 1.0,
        axes_dim: list[int] | None = None,
        memory_mode: str = "resident",
        vram_budget_gib: float | None = None,
        attention: str = "auto",
        compile: bool | str = False,  # True/"on", False/"off" or "auto"
        vae_wrap: bool = True,
        loras: Sequence[tuple[Path | str, float]] = (),
    ) -> DiT360Pipeline:
        """Load the text encoders, the transformer with the LoRA merged, and the VAE.

        `memory_mode` is one of `memory.MEMORY_MODES` (see there); `vram_budget_gib` bounds the
        `stream` mode; `attention` picks the SDPA backend (`auto` prefers cuDNN on Hopper);
        `compile` compiles each transformer block with torch.compile (CUDA, not with `stream`;
        'auto' does so where it can: CUDA, Triton importable, not streaming — about 20 s once per
        worker, then each step ~1.3-1.8x faster on an H200);
        `vae_wrap` decodes with horizontal wrap-around (off reproduces the reference pipeline);
        `loras` are the user's own FLUX LoRAs, (file, strength) each, on top of DiT360's (`lora.py`);
        `axes_dim` (FLUX's RoPE axes) defaults to the transformer folder's config.json
        (`axes_dims_rope`), else FLUX.1's [16, 56, 56].
        """
        device = pick_device(device) if isinstance(device, str) else device
        dtype = resolve_dtype(dtype, device)
        axes_dim = axes_dim or config_axes_dim(paths.transformer)
        compile = {"on": True, "off": False}.get(compile, compile)  # type: ignore[call-overload]
        plan = plan_memory(memory_mode, device, vram_budget_gib)
        cap = limit_allocator(plan, device)  # the budget holds from the first byte loaded
        peaks = StagePeaks(device, cap)
        peaks.begin("load")
        set_attention_backend(attention, device)
        text_device = "cpu" if plan.stream_text_encoder else device
        # The text encoders load on a side thread while the transformer loads here: both are mostly
        # file reads and copies, which release the GIL. (Our models take every tensor from the file,
        # so transformers setting the default dtype meanwhile cannot change them.)
        clock = _LoadClock()
        loading = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dit360-text-load")
        text_future = loading.submit(
            clock.timed, "text_encoders_s", TextEncoders.load, paths.text_encoder, paths.tokenizer,
            paths.text_encoder_2, paths.tokenizer_2, dtype=dtype, device=text_device,
        )  # fmt: skip
        try:
            transformer = clock.timed(
                "transformer_s", _load_transformer, paths, plan, device, dtype, axes_dim, lora_strength, loras
            )
            vae = clock.timed("vae_s", load_autoencoder, paths.vae, dtype=dtype, device=device)
            text_encoders = clock.timed("text_encoders_wait_s", text_future.result)
        finally:
            loading.shutdown(wait=True)  # never leave a load running behind an error
        clock.timed("fp8_setup_s", enable_fp8_matmul, transformer, device, dtype)
        if compile == "auto":
            compile = _can_compile(plan, device)
        if compile:
            clock.timed("compile_setup_s", _compile, transformer, plan, device)
        streamers = clock.timed(
            "placement_s", _place_for_streaming, plan, device, text_encoders, transformer, vae
        )
        info = {
            "model": FLUX_REPO,
            "transformer": Path(paths.transformer).name,
            "lora": LORA_REPO if paths.lora is not None and lora_strength != 0.0 else None,
            "lora_file": Path(paths.lora).name if paths.lora is not None else None,
            "lora_strength": lora_strength,
            "loras": [{"file": Path(path).name, "strength": float(strength)} for path, strength in loras],
            "dtype": str(dtype).removeprefix("torch."),
            "device": device.type,
            "memory_mode": plan.mode,
            "compiled": bool(compile),
        }
        pipe = cls(text_encoders, transformer, vae, device, dtype, info, plan, streamers)
        pipe.use_vae_wrap(vae_wrap)
        pipe.allocator_cap, pipe.load_memory = cap, peaks.report()
        pipe.load_timings = clock.marks
        return pipe

    def use_vae_wrap(self, on: bool) -> None:
        """Decode with (or without) the horizontal wrap-around from now on; recorded in the metadata."""
        self.vae_wrap = on
        self.model_info["vae_wrap"] = on

    def decode(self, latents: Tensor) -> Tensor:
        """Latents (1, 16, H/8, W/8) → RGB float (3, H, W) in [0, 1] on the CPU.

        With `vae_wrap` the decoder pads circularly left/right, so it can't add a seam at the
        0°/360° edge; the fp8 and stream modes decode in exact tiles to bound memory.
        """
        z = latents.to(self.device, self.dtype)
        with torch.inference_mode():
            if self.plan.vae_tile:
                decoded = self.vae.decode_tiled(z, tile=self.plan.vae_tile, wrap=self.vae_wrap)
            else:
                decoded = self.vae.decode(z, wrap=self.vae_wrap)
        return (decoded[0].float() / 2 + 0.5).clamp(0, 1).cpu()

    def generate(
        self,
        request: GenerateRequest,
        on_step: StepCallback | None = None,
        should_cancel: Callable[[], bool] | None = None,
        on_stage: Callable[[str], None] | None = None,
        latents: Tensor | None = None,
    ) -> Generation:
        """One panorama. Raises `Cancelled` between steps when `should_cancel()` returns true.

        `latents` overrides the seeded noise (1, 16, H/8, W/8), for comparisons with references.
        """
        stage = on_stage or (lambda name: None)
        timings: dict[str, float] = {}
        start = time.perf_counter()
        peaks = self.peaks = StagePeaks(self.device, self.allocator_cap)

        stage("encoding")
        peaks.begin("encode")
        txt, vec = self.text_encoders.encode(request.prompt, max_length=T5_MAX_LENGTH)
        txt, vec = txt.to(self.device), vec.to(self.device)
        timings["encode_s"] = time.perf_counter() - start

        stage("sampling")
        peaks.begin("sample")
        t0 = time.perf_counter()
        noise = (
            get_noise(request.seed, request.height, request.width)
            if latents is None
            else latents.float().cpu()
        )
        grid_h, grid_w = request.height // TOKEN_SIZE, request.width // TOKEN_SIZE
        img = wrap_pad(pack(noise), grid_h, grid_w).to(self.device)
        img_ids = wrap_pad_ids(image_ids(grid_h, grid_w), grid_h, grid_w)[None].to(self.device)
        txt_ids = torch.zeros(1, txt.shape[1], 3, device=self.device)
        sigmas = get_sigmas(request.steps, img.shape[1])
        cache = StepCache(request.step_cache) if request.step_cache > 0 else None
        x = denoise(
            self.transformer, img, img_ids, txt, txt_ids, vec, sigmas, request.guidance,
            dtype=self.dtype, on_step=on_step, should_cancel=should_cancel, cache=cache,
        )  # fmt: skip
        _sync(self.device)
        timings["sample_s"] = time.perf_counter() - t0

        stage("decoding")
        peaks.begin("decode")
        t0 = time.perf_counter()
        image = self.decode(unpack(crop_pad(x, grid_h, grid_w), grid_h, grid_w))
        timings["decode_s"] = time.perf_counter() - t0
        timings["total_s"] = time.perf_counter() - start
        metadata = {
            **asdict(request),
            **self.model_info,
            "sampler": "euler flow-matching, DiT360 wrap padding (1 column per side)",
            "noise": "torch CPU generator, float32",
            "transformer_evaluations": cache.full_evaluations if cache is not None else request.steps,
        }
        return Generation(
            image=image, request=request, metadata=metadata, timings=timings, memory=peaks.report()
        )


DEFAULT_IMAGE_TOKENS = 64 * 130  # 2048x1024 with DiT360's two wrap columns
STREAM_PREFETCH = 2


class _LoadClock:
    """Seconds per part of a load (`marks`), for the worker's timings: what a first job waits for."""

    def __init__(self) -> None:
        self.marks: dict[str, float] = {}

    def timed(self, name: str, fn: Callable, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            self.marks[name] = round(time.perf_counter() - t0, 4)


def _load_transformer(
    paths: ModelPaths,
    plan: MemoryPlan,
    device: torch.device,
    dtype: torch.dtype,
    axes_dim: list[int] | None,
    lora_strength: float,
    loras: Sequence[tuple[str | Path, float]],
) -> Flux:
    """The transformer with DiT360's LoRA (and the user's) merged."""
    merge = None
    dit360_lora = paths.lora if lora_strength != 0.0 else None
    if dit360_lora is not None or loras:  # `loras`: the user's own, (file, strength), on top
        params = infer_params(read_shapes(paths.transformer), axes_dim)
        extra = [(load_lora(path), float(strength)) for path, strength in loras]
        merge = LoraMerger(load_lora(dit360_lora) if dit360_lora else None, params, lora_strength, extra)
    transformer = load_flux_transformer(
        paths.transformer,
        dtype=dtype,
        device="cpu" if plan.stream_transformer else device,
        axes_dim=axes_dim,
        merge=merge,
        quantize_fp8=plan.quantize_fp8,
        work_device=device,
    )
    return transformer


def _streamed_blocks(block_bytes: list[int], room: int) -> list[int]:
    """The fewest blocks to stream, spread evenly, so the resident rest fits in `room` bytes."""
    total = sum(block_bytes)
    for count in range(len(block_bytes) + 1):
        streamed = spread_indices(len(block_bytes), count)
        if total - sum(block_bytes[i] for i in streamed) <= room:
            return streamed
    return list(range(len(block_bytes)))


def _can_compile(plan: MemoryPlan, device: torch.device) -> bool:
    if device.type != "cuda" or plan.stream_transformer:
        return False
    try:
        import triton  # noqa: F401  (Inductor's GPU backend; not bundled on Windows)
    except ImportError:
        return False
    return True


def _compile(transformer: Flux, plan: MemoryPlan, device: torch.device) -> None:
    if device.type != "cuda":
        raise DeviceError(
            "torch.compile is only used on CUDA GPUs here.", "Turn compile off for this device."
        )
    if plan.stream_transformer:
        raise DeviceError(
            "The 'stream' memory mode swaps weights in and out of the blocks, which compiled blocks don't allow.",
            "Use compile with the 'resident' or 'fp8' memory mode, or turn compile off.",
        )
    transformer.compile_blocks()


def _place_for_streaming(
    plan: MemoryPlan, device: torch.device, text: TextEncoders, transformer: Flux, vae: AutoEncoder
) -> list[BlockStreamer]:
    """Move what always stays to the device and set up streaming for the rest (fp8/stream modes)."""
    streamers = []
    if plan.stream_text_encoder:
        t5_blocks = list(text.t5.encoder.block)
        streamers.append(BlockStreamer(t5_blocks, device, range(len(t5_blocks)), STREAM_PREFETCH))
        move_except(text.t5, t5_blocks, device)  # the embedding and the final norm
        text.clip.to(device)
    if not plan.stream_transformer:
        return streamers
    blocks = [*transformer.double_blocks, *transformer.single_blocks]
    block_bytes = [module_bytes(b) for b in blocks]
    for name, module in transformer.named_children():
        if name not in ("double_blocks", "single_blocks"):
            module.to(device)
    fixed = module_bytes(transformer) - sum(block_bytes) + module_bytes(vae) + module_bytes(text.clip)
    fixed += module_bytes(text.t5) - sum(module_bytes(b) for b in text.t5.encoder.block)
    room = resident_block_budget(plan, DEFAULT_IMAGE_TOKENS, fixed, max(block_bytes), STREAM_PREFETCH)
    streamed = _streamed_blocks(block_bytes, room)
    streamers.append(BlockStreamer(blocks, device, streamed, STREAM_PREFETCH))
    return streamers


def resolve_dtype(value: str | torch.dtype, device: torch.device) -> torch.dtype:
    """A precision name as a torch dtype; 'auto' is fp16 on CUDA and MPS, fp32 on the CPU.

    fp16 is DiT360's own precision: its inference loads FLUX.1-dev in float16 and the LoRA was
    trained in 16-bit mixed precision. The transformer clamps where diffusers does in fp16
    (flux_layers), and T5 keeps transformers' fp32 output projections (text_encoders). On MPS
    fp16 also runs on every macOS that has MPS, where bf16 needs macOS 14. On the CPU half
    precision is slower than fp32, so fp32 there. bf16 stays selectable.
    """
    if isinstance(value, torch.dtype):
        return value
    if value == "auto":
        return torch.float32 if device.type == "cpu" else torch.float16
    if value not in DTYPES:
        raise BadParametersError(f"Unknown precision {value!r}.", f"Choose one of {', '.join(DTYPES)}.")
    return DTYPES[value]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
