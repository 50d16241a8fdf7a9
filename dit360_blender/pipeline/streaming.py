"""Running a stack of blocks whose weights do not all fit on the GPU.

Streamed blocks keep their weights in pinned host memory. Just before a block runs, its weights
are on the GPU already: they were copied on a side CUDA stream while earlier blocks computed
(`prefetch` blocks ahead, wrapping around to the next forward pass). After the block has run,
its parameters point back at the host copies and the GPU copies are released to the caching
allocator, so at most `prefetch + 1` streamed blocks occupy GPU memory at any time.

Works for any module list (FLUX's 57 blocks, T5's 24) through forward hooks; the blocks' code
is untouched.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .errors import DeviceError


def module_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in _tensors(module))


def _tensors(module: nn.Module) -> list[Tensor]:
    return [*module.parameters(), *module.buffers()]


def move_except(module: nn.Module, keep_out: Sequence[nn.Module], device: torch.device) -> None:
    """Move `module`'s tensors to `device`, except those of the `keep_out` submodules."""
    skip = {id(t) for block in keep_out for t in _tensors(block)}
    for tensor in _tensors(module):
        if id(tensor) not in skip:
            tensor.data = tensor.data.to(device)


def spread_indices(count: int, chosen: int) -> list[int]:
    """`chosen` indices spread evenly over range(count), so streamed blocks interleave with resident ones."""
    if chosen <= 0:
        return []
    if chosen >= count:
        return list(range(count))
    return sorted({round((i + 0.5) * count / chosen - 0.5) for i in range(chosen)})


class BlockStreamer:
    """Streams the blocks at `streamed` indices of `blocks`; the others are moved to `device` for good."""

    def __init__(
        self, blocks: Sequence[nn.Module], device: torch.device, streamed: Sequence[int], prefetch: int = 2
    ):
        if device.type != "cuda":
            raise DeviceError(
                "Weight streaming needs a CUDA GPU (it overlaps host-to-GPU copies with computation).",
                "Choose the 'resident' or 'fp8' memory mode on this device.",
            )
        self.blocks = list(blocks)
        self.device = device
        self.order = sorted(set(streamed))
        self.prefetch = max(1, prefetch)
        self.copy_stream = torch.cuda.Stream(device)
        self.host: dict[int, list[tuple[Tensor, Tensor]]] = {}
        self.in_flight: dict[int, tuple[list[Tensor], torch.cuda.Event]] = {}
        self.handles = []
        for index, block in enumerate(self.blocks):
            if index in self.order:
                self._park_on_host(index, block)
            else:
                block.to(device)
        self.streamed_bytes = sum(module_bytes(self.blocks[i]) for i in self.order)

    def _park_on_host(self, index: int, block: nn.Module) -> None:
        pairs = []
        for tensor in _tensors(block):
            pinned = tensor.detach().to("cpu").pin_memory()
            tensor.data = pinned
            pairs.append((tensor, pinned))
        self.host[index] = pairs
        self.handles.append(block.register_forward_pre_hook(lambda m, a, i=index: self._before(i)))
        self.handles.append(block.register_forward_hook(lambda m, a, o, i=index: self._after(i)))

    def _fetch(self, index: int) -> None:
        if index in self.in_flight:
            return
        with torch.cuda.stream(self.copy_stream):
            copies = [pinned.to(self.device, non_blocking=True) for _, pinned in self.host[index]]
            done = torch.cuda.Event()
            done.record(self.copy_stream)
        self.in_flight[index] = (copies, done)

    def _ahead(self, index: int, steps: int) -> int:
        position = self.order.index(index)
        return self.order[(position + steps) % len(self.order)]

    def _before(self, index: int) -> None:
        self._fetch(index)
        for step in range(1, self.prefetch + 1):
            self._fetch(self._ahead(index, step))
        copies, done = self.in_flight.pop(index)
        compute = torch.cuda.current_stream(self.device)
        compute.wait_event(done)
        for (tensor, _), gpu in zip(self.host[index], copies):
            gpu.record_stream(compute)  # freed only after the compute stream is done with it
            tensor.data = gpu

    def _after(self, index: int) -> None:
        for tensor, pinned in self.host[index]:
            tensor.data = pinned

    def close(self) -> None:
        """Remove the hooks (the blocks keep their host weights)."""
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        self.in_flight.clear()
