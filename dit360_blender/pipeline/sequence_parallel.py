"""One panorama over several processes (GPUs): sequence-parallel sampling with torch.distributed.

The joint token sequence the transformer attends over — the text tokens, then the image tokens with
DiT360's wrap columns — is cut into one contiguous slice per rank (`ShardLayout`). Everything in
FLUX except attention works token by token (norms, modulation, the MLPs, the Euler step), so each
rank runs the unchanged `Flux.forward` and `denoise` on its slice: its text tokens (rank 0 holds
most, later ranks often none) and its image tokens, with their own position ids, so the RoPE of a
token is the one it has in one process. Only attention needs the other ranks' tokens:

* Ulysses (heads divisible by the ranks: FLUX's 24 heads on 2, 3, 4, 6, 8): one all-to-all swaps
  "all heads of my tokens" for "my heads of all tokens", SDPA runs on the whole sequence, and a
  second all-to-all swaps back.
* Ring (otherwise): each rank keeps its queries and passes its keys/values around the ring; the
  blocks' results are merged with their log-sum-exp (online softmax), in float32.

Both give the one-process result up to float rounding (tests/test_sequence_parallel.py). Every rank
holds all weights. Two groups: `group`, the tensors' (NCCL on GPUs, gloo on CPUs), and `control`, a
gloo group on the CPU for the per-step cancel flag and the job's inputs, so a flag never waits for
a GPU stream. Rank 0 (the worker's process) decides cancel, gets the progress callbacks (with the
whole latents gathered for previews) and decodes; the other ranks return None.

The single-process path does not come here: a block's `attention_fn` is swapped only inside
`sharded_attention` and only in a sharded run.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from .flux_layers import apply_rope
from .flux_model import Flux
from .sampling import (
    Cancelled,
    SamplerStep,
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

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------
# Who holds which tokens


@dataclass(frozen=True)
class ShardLayout:
    """The joint sequence of `text` + `image` tokens cut into `world` contiguous slices, the first
    `(text + image) % world` of them one token longer."""

    text: int
    image: int
    world: int

    @property
    def sizes(self) -> list[int]:
        total = self.text + self.image
        base, extra = divmod(total, self.world)
        return [base + (r < extra) for r in range(self.world)]

    def bounds(self, rank: int) -> tuple[int, int]:
        start = sum(self.sizes[:rank])
        return start, start + self.sizes[rank]

    def text_slice(self, rank: int) -> slice:
        start, end = self.bounds(rank)
        return slice(min(start, self.text), min(end, self.text))

    def image_slice(self, rank: int) -> slice:
        start, end = self.bounds(rank)
        return slice(max(start, self.text) - self.text, max(end, self.text) - self.text)


# ---------------------------------------------------------------------------------------------
# The process groups and the attention over them


class SequenceParallel:
    """This rank's place in the groups and the distributed attention its blocks use."""

    def __init__(self, group=None, control=None, mode: str = "auto") -> None:
        self.group = group if group is not None else dist.group.WORLD
        self.control = control if control is not None else self.group
        self.rank = dist.get_rank(self.group)
        self.world = dist.get_world_size(self.group)
        self.mode = mode
        self.sizes: list[int] = []  # every rank's slice of the joint sequence, set per run
        self._global = [dist.get_global_rank(self.group, r) for r in range(self.world)]
        self._control_root = dist.get_global_rank(self.control, 0)
        # One bound method for the blocks, kept: compiled blocks guard on the object they call, so
        # a new one per job would recompile them every job.
        self.block_attention = self.attention

    def mode_for(self, num_heads: int) -> str:
        if self.mode != "auto":
            return self.mode
        return "ulysses" if num_heads % self.world == 0 else "ring"

    def describe(self, num_heads: int) -> str:
        """What the metadata says: the attention mode, "none" for one rank in auto mode."""
        return "none" if self.world == 1 and self.mode == "auto" else self.mode_for(num_heads)

    # -- attention -------------------------------------------------------------------------------

    @torch.compiler.disable  # compiled blocks run the collectives eagerly, between compiled parts
    def attention(self, q: Tensor, k: Tensor, v: Tensor, pe: Tensor) -> Tensor:
        """flux_layers.attention for this rank's tokens: q, k, v (b, heads, n_local, d), `pe` the
        local tokens' RoPE; returns (b, n_local, heads * d) as one process would for these tokens."""
        q, k = apply_rope(q, k, pe)
        if self.world == 1 and self.mode == "auto":  # a forced mode runs its code even alone (bench)
            x = F.scaled_dot_product_attention(q.contiguous(), k.contiguous(), v.contiguous())
        elif self.mode_for(q.shape[1]) == "ulysses":
            x = self._ulysses(q, k, v)
        else:
            x = self._ring(q, k, v)
        return rearrange(x, "b h n d -> b n (h d)")

    def _ulysses(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        world, sizes = self.world, self.sizes
        b, heads, n, d = q.shape
        if heads % world:
            raise ValueError(f"Ulysses attention needs the {heads} heads to divide over {world} ranks.")
        h = heads // world
        # To rank j: heads j*h..(j+1)*h of my n tokens; from rank j: my heads of its sizes[j] tokens.
        send = rearrange(torch.stack((q, k, v)), "s b (w h) n d -> w s b h n d", w=world).contiguous()
        recv = send.new_empty(3 * b * h * d * sum(sizes))
        dist.all_to_all_single(
            recv, send.reshape(-1),
            output_split_sizes=[3 * b * h * m * d for m in sizes],
            input_split_sizes=[3 * b * h * n * d] * world,
            group=self.group,
        )  # fmt: skip
        parts = recv.split([3 * b * h * m * d for m in sizes])
        full = torch.cat([p.view(3, b, h, m, d) for p, m in zip(parts, sizes)], dim=3)
        out = F.scaled_dot_product_attention(full[0], full[1], full[2])  # (b, h, all tokens, d)
        back = torch.cat([c.reshape(-1) for c in out.split(sizes, dim=2)])
        mine = out.new_empty(world * b * h * n * d)
        dist.all_to_all_single(
            mine, back,
            output_split_sizes=[b * h * n * d] * world,
            input_split_sizes=[b * h * m * d for m in sizes],
            group=self.group,
        )  # fmt: skip
        return rearrange(mine.view(world, b, h, n, d), "w b h n d -> b (w h) n d")

    def _ring(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Keys/values travel the ring (to rank+1, from rank-1) while this rank attends to the block
        it holds; the partial results are merged exactly by their log-sum-exp."""
        world, rank, sizes = self.world, self.rank, self.sizes
        out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        lse = torch.full((*q.shape[:-1], 1), float("-inf"), dtype=torch.float32, device=q.device)
        kv = torch.stack((k, v)).contiguous()
        for step in range(world):
            pending, incoming = None, None
            if step < world - 1:  # start passing the block on before computing with it
                owner = (rank - step - 1) % world  # whose block arrives next
                incoming = kv.new_empty((2, *k.shape[:2], sizes[owner], k.shape[-1]))
                pending = dist.batch_isend_irecv(
                    [
                        dist.P2POp(dist.isend, kv, self._global[(rank + 1) % world], self.group),
                        dist.P2POp(dist.irecv, incoming, self._global[(rank - 1) % world], self.group),
                    ]
                )
            block_out, block_lse = block_attention(q, kv[0], kv[1])
            merged = torch.logaddexp(lse, block_lse)
            out = out * torch.exp(lse - merged) + block_out * torch.exp(block_lse - merged)
            lse = merged
            if pending is not None:
                for work in pending:
                    work.wait()
                kv = incoming
        return out.to(q.dtype)

    # -- control ---------------------------------------------------------------------------------

    def decide(self, value: bool) -> bool:
        """Rank 0's `value`, on every rank (a CPU broadcast on the control group)."""
        flag = torch.tensor([int(bool(value))], dtype=torch.int32)
        dist.broadcast(flag, src=self._control_root, group=self.control)
        return bool(flag.item())

    def share(self, tensor: Tensor | None, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
        """Rank 0's CPU `tensor` (of `shape`, `dtype`) on every rank; other ranks pass None."""
        buffer = tensor.to("cpu", dtype).contiguous() if self.rank == 0 else torch.empty(shape, dtype=dtype)
        dist.broadcast(buffer, src=self._control_root, group=self.control)
        return buffer

    def gather_tokens(self, local: Tensor, counts: list[int]) -> Tensor | None:
        """Every rank's (b, counts[r], c) slice, joined in rank order, on rank 0 (None elsewhere)."""
        longest = max(counts)
        padded = local.new_zeros((local.shape[0], longest, local.shape[2]))
        padded[:, : local.shape[1]] = local
        pieces = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(pieces, padded.contiguous(), group=self.group)
        if self.rank != 0:
            return None
        return torch.cat([p[:, :count] for p, count in zip(pieces, counts)], dim=1)


def block_attention(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """softmax(q k^T / sqrt(d)) v for one block of keys, and its log-sum-exp (b, h, n, 1), both
    float32. A fused kernel that returns the log-sum-exp (PyTorch's memory-efficient attention on
    CUDA, its flash kernel on the CPU) where it agrees with the plain math on a probe (checked once
    per device type and dtype), else the plain math."""
    key = (q.device.type, q.dtype)
    if key not in _FUSED_OK:
        _FUSED_OK[key] = _fused_agrees(q)
    if _FUSED_OK[key]:
        out, lse = _fused_attention(q, k, v)
        return out.float(), lse
    return _math_attention(q, k, v)


_FUSED_OK: dict[tuple, bool] = {}


def _math_attention(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    scores = (q.float() * q.shape[-1] ** -0.5) @ k.float().transpose(-1, -2)
    block_max = scores.amax(dim=-1, keepdim=True)
    weights = torch.exp(scores - block_max)
    total = weights.sum(dim=-1, keepdim=True)
    return (weights @ v.float()) / total, block_max + torch.log(total)


def _fused_attention(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    if q.device.type == "cuda":
        out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True)[:2]
    else:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v)[:2]
    return out, lse[..., : q.shape[2]].float().unsqueeze(-1)  # CUDA pads the rows to 32


def _fused_agrees(like: Tensor) -> bool:
    generator = torch.Generator().manual_seed(0)
    q, k, v = (
        torch.randn((1, 2, n, like.shape[-1]), generator=generator).to(like.device, like.dtype)
        for n in (37, 53, 53)
    )
    try:
        out, lse = _fused_attention(q, k, v)
    except (RuntimeError, NotImplementedError, AttributeError) as exc:  # this build lacks the kernel
        logger.info("fused attention with LSE unavailable on %s (%s): plain math instead", like.device, exc)
        return False
    ref_out, ref_lse = _math_attention(q, k, v)
    tol = 1e-4 if like.dtype == torch.float32 else 3e-2
    return bool((out.float() - ref_out).abs().max() <= tol and (lse - ref_lse).abs().max() <= tol)


@contextmanager
def sharded_attention(model: Flux, sp: SequenceParallel) -> Iterator[None]:
    """The model's blocks attend through `sp` inside this block, as one process outside it."""
    blocks = [*model.double_blocks, *model.single_blocks]
    for block in blocks:
        block.attention_fn = sp.block_attention
    try:
        yield
    finally:
        for block in blocks:
            block.__dict__.pop("attention_fn", None)


@dataclass
class ShardedStepCache(StepCache):
    """The step cache deciding on the whole image: the residuals' sums are added over the ranks, so
    every rank skips the same steps (each alone would decide on its own tokens and diverge)."""

    group: object = None

    def can_skip(self, first_residual: Tensor) -> bool:
        reference = self._first_residual
        if self.force_full or self.threshold <= 0 or reference is None or self._rest_residual is None:
            return super().can_skip(first_residual)
        sums = torch.stack([(first_residual - reference).abs().sum(), reference.abs().sum()]).float()
        dist.all_reduce(sums, group=self.group)
        if float(sums[0] / sums[1].clamp_min(1e-12)) < self.threshold:
            self.skipped += 1
            return True
        self.full_evaluations += 1
        return False


# ---------------------------------------------------------------------------------------------
# Sampling


def denoise_sharded(
    model: Flux,
    img: Tensor,
    img_ids: Tensor,
    txt: Tensor,
    txt_ids: Tensor,
    vec: Tensor,
    sigmas: Tensor,
    guidance: float,
    sp: SequenceParallel,
    dtype: torch.dtype = torch.float32,
    on_step: StepCallback | None = None,
    should_cancel: Callable[[], bool] | None = None,
    step_cache: float = 0.0,
    step_latents: bool = False,
    on_cache: Callable[[StepCache], None] | None = None,
) -> Tensor | None:
    """`sampling.denoise` over the ranks: every rank passes the whole inputs (the same on each) and
    the same `step_latents`; rank 0 gets the final latents (padded token layout), the others None.

    Rank 0's `should_cancel` decides for all (Cancelled is raised on every rank at the same step);
    with `step_latents` every step's latents and x0 are gathered for rank 0's `on_step`."""
    layout = ShardLayout(txt.shape[1], img.shape[1], sp.world)
    sp.sizes = layout.sizes
    counts = [_length(layout.image_slice(r)) for r in range(sp.world)]  # image tokens per rank
    t, i = layout.text_slice(sp.rank), layout.image_slice(sp.rank)

    def cancel() -> bool:
        return sp.decide(should_cancel() if (sp.rank == 0 and should_cancel is not None) else False)

    def step(s: SamplerStep) -> None:
        latents, x0 = sp.gather_tokens(s.latents, counts), sp.gather_tokens(s.x0, counts)
        if sp.rank == 0 and on_step is not None:
            on_step(SamplerStep(s.index, s.total, latents, x0))

    cache = ShardedStepCache(step_cache, group=sp.group) if step_cache > 0 else None
    with sharded_attention(model, sp):
        x = denoise(
            model, img[:, i], img_ids[:, i], txt[:, t], txt_ids[:, t], vec, sigmas, guidance,
            dtype=dtype, on_step=step if step_latents else None, should_cancel=cancel, cache=cache,
        )  # fmt: skip
    if on_cache is not None and cache is not None:
        on_cache(cache)
    return sp.gather_tokens(x, counts)


def _length(s: slice) -> int:
    return s.stop - s.start


def generate_sharded(
    pipe,
    request,
    sp: SequenceParallel,
    on_step: StepCallback | None = None,
    should_cancel: Callable[[], bool] | None = None,
    on_stage: Callable[[str], None] | None = None,
    latents: Tensor | None = None,
    step_latents: bool = False,
):
    """`DiT360Pipeline.generate` with the sampling spread over the ranks (`pipe` is a loaded
    DiT360Pipeline on every rank, `request` the same everywhere). Rank 0 encodes the prompt and
    draws the noise and hands both to the others (so every rank samples from identical inputs),
    and decodes; it returns the Generation, the other ranks return None."""
    from .dit360 import T5_MAX_LENGTH, TOKEN_SIZE, Generation, _sync

    stage = on_stage or (lambda name: None)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    stage("encoding")
    grid_h, grid_w = request.height // TOKEN_SIZE, request.width // TOKEN_SIZE
    if sp.rank == 0:
        txt, vec = pipe.text_encoders.encode(request.prompt, max_length=T5_MAX_LENGTH)
        noise = get_noise(request.seed, request.height, request.width) if latents is None else latents
        shapes = torch.tensor([*txt.shape, vec.shape[1]], dtype=torch.int64)
    else:
        txt = vec = noise = None
        shapes = torch.zeros(4, dtype=torch.int64)
    shapes = sp.share(shapes, (4,), torch.int64).tolist()
    txt = sp.share(txt, tuple(shapes[:3]), torch.float32).to(pipe.device)
    vec = sp.share(vec, (1, shapes[3]), torch.float32).to(pipe.device)
    noise_shape = (1, 16, request.height // 8, request.width // 8)
    noise = sp.share(None if noise is None else noise.float(), noise_shape, torch.float32)
    timings["encode_s"] = time.perf_counter() - start

    stage("sampling")
    t0 = time.perf_counter()
    img = wrap_pad(pack(noise), grid_h, grid_w).to(pipe.device)
    img_ids = wrap_pad_ids(image_ids(grid_h, grid_w), grid_h, grid_w)[None].to(pipe.device)
    txt_ids = torch.zeros(1, txt.shape[1], 3, device=pipe.device)
    sigmas = get_sigmas(request.steps, img.shape[1])
    caches: list[StepCache] = []
    x = denoise_sharded(
        pipe.transformer, img, img_ids, txt, txt_ids, vec, sigmas, request.guidance, sp,
        dtype=pipe.dtype, on_step=on_step, should_cancel=should_cancel, step_cache=request.step_cache,
        step_latents=step_latents, on_cache=caches.append,
    )  # fmt: skip
    _sync(pipe.device)
    timings["sample_s"] = time.perf_counter() - t0
    if sp.rank != 0:
        return None

    stage("decoding")
    t0 = time.perf_counter()
    image = pipe.decode(unpack(crop_pad(x, grid_h, grid_w), grid_h, grid_w))
    timings["decode_s"] = time.perf_counter() - t0
    timings["total_s"] = time.perf_counter() - start
    metadata = {
        **asdict(request),
        **pipe.model_info,
        "sampler": "euler flow-matching, DiT360 wrap padding (1 column per side)",
        "noise": "torch CPU generator, float32",
        "transformer_evaluations": caches[0].full_evaluations if caches else request.steps,
        "ranks": sp.world,
        "sequence_parallel": sp.describe(pipe.transformer.num_heads),
    }
    return Generation(image=image, request=request, metadata=metadata, timings=timings)


__all__ = [
    "Cancelled",
    "SequenceParallel",
    "ShardLayout",
    "ShardedStepCache",
    "denoise_sharded",
    "generate_sharded",
    "sharded_attention",
]
