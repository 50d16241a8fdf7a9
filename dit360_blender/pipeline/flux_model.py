"""The FLUX.1 flow transformer (12B for FLUX.1-dev); tiny configs run the same code."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .flux_layers import (
    DoubleStreamBlock,
    EmbedND,
    LastLayer,
    MLPEmbedder,
    SingleStreamBlock,
    sdpa_context,
    timestep_embedding,
)
from .step_cache import StepCache


@dataclass
class FluxParams:
    in_channels: int = 64
    out_channels: int = 64
    vec_in_dim: int = 768
    context_in_dim: int = 4096
    hidden_size: int = 3072
    mlp_ratio: float = 4.0
    num_heads: int = 24
    depth: int = 19
    depth_single_blocks: int = 38
    axes_dim: list[int] = field(default_factory=lambda: [16, 56, 56])
    theta: int = 10_000
    qkv_bias: bool = True
    guidance_embed: bool = True

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if sum(self.axes_dim) != self.hidden_size // self.num_heads:
            raise ValueError(
                f"axes_dim {self.axes_dim} must sum to the head dim {self.hidden_size // self.num_heads}"
            )


FLUX_DEV = FluxParams()


class Flux(nn.Module):
    """Image tokens (b, n, 64) + text tokens (b, 512, 4096) + pooled text → velocity (b, n, 64)."""

    def __init__(self, params: FluxParams) -> None:
        super().__init__()
        self.params = params
        self.in_channels = params.in_channels
        self.out_channels = params.out_channels
        self.hidden_size = params.hidden_size
        self.num_heads = params.num_heads
        self.pe_embedder = EmbedND(params.hidden_size // params.num_heads, params.theta, params.axes_dim)
        self.img_in = nn.Linear(params.in_channels, params.hidden_size, bias=True)
        self.time_in = MLPEmbedder(256, params.hidden_size)
        self.vector_in = MLPEmbedder(params.vec_in_dim, params.hidden_size)
        self.guidance_in = MLPEmbedder(256, params.hidden_size) if params.guidance_embed else nn.Identity()
        self.txt_in = nn.Linear(params.context_in_dim, params.hidden_size)
        self.double_blocks = nn.ModuleList(
            DoubleStreamBlock(params.hidden_size, params.num_heads, params.mlp_ratio, params.qkv_bias)
            for _ in range(params.depth)
        )
        self.single_blocks = nn.ModuleList(
            SingleStreamBlock(params.hidden_size, params.num_heads, params.mlp_ratio)
            for _ in range(params.depth_single_blocks)
        )
        self.final_layer = LastLayer(params.hidden_size, params.out_channels)

    def forward(
        self,
        img: Tensor,
        img_ids: Tensor,
        txt: Tensor,
        txt_ids: Tensor,
        timesteps: Tensor,
        y: Tensor,
        guidance: Tensor | None = None,
        cache: StepCache | None = None,
    ) -> Tensor:
        """timesteps and guidance are per batch item: sigma in [0, 1] and the guidance value.
        With `cache` (pipeline/step_cache.py) the blocks after the first may be skipped."""
        dtype = img.dtype
        img = self.img_in(img)
        vec = self.time_in(timestep_embedding(timesteps.to(dtype), 256))
        if self.params.guidance_embed:
            if guidance is None:
                raise ValueError("This FLUX model embeds guidance: pass a guidance value (2.8 for DiT360).")
            vec = vec + self.guidance_in(timestep_embedding(guidance.to(dtype), 256))
        vec = vec + self.vector_in(y.to(dtype))
        txt = self.txt_in(txt.to(dtype))

        pe = self.pe_embedder(torch.cat((txt_ids, img_ids), dim=1))
        with sdpa_context():
            first_in = img
            img, txt = self.double_blocks[0](img=img, txt=txt, vec=vec, pe=pe)
            first_out = img
            if cache is not None and cache.can_skip(first_out - first_in):
                return self.final_layer(first_out + cache.rest(), vec)
            for block in self.double_blocks[1:]:
                img, txt = block(img=img, txt=txt, vec=vec, pe=pe)
            x = torch.cat((txt, img), dim=1)
            for block in self.single_blocks:
                x = block(x, vec=vec, pe=pe)
        img = x[:, txt.shape[1] :, ...]
        if cache is not None:
            cache.store(first_out - first_in, img - first_out)
        return self.final_layer(img, vec)

    def compile_blocks(self) -> None:
        """Regional torch.compile: each block is compiled, and blocks of one kind share the
        compiled code, so compiling takes one block's time per kind rather than the whole model's.
        Needs Triton (Linux; on Windows, the triton-windows package)."""
        for block in [*self.double_blocks, *self.single_blocks]:
            block.compile(dynamic=False)
