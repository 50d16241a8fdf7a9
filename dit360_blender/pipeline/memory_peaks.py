"""How much GPU memory each stage of a job held: what the `result` event (and an out-of-memory
error) reports, so a budget can be checked against the stage that fills it.

Per stage (load, encode, sample, decode), the caching allocator's peak *allocated* (tensors) and
peak *reserved* (what it holds from the device, cached blocks included) in GiB; at the end the
device's own use (`torch.cuda.mem_get_info`: every process on the card, the CUDA context included)
and the allocator cap the memory plan set, if any. Empty off CUDA (the CPU and MPS have no such
counters).
"""

from __future__ import annotations

import torch

from .memory import GIB


class StagePeaks:
    """Peaks per stage on one device; `begin(stage)` closes the previous stage and opens the next."""

    def __init__(self, device: torch.device, cap_bytes: int | None = None) -> None:
        self.device = device
        self.enabled = device.type == "cuda"
        self.stages: dict[str, dict[str, float]] = {}
        self.cap_bytes = cap_bytes  # the allocator's cap (memory.limit_allocator), None: uncapped
        self._open: str | None = None

    def begin(self, stage: str) -> None:
        """Record the open stage's peaks and start counting `stage` from the memory in use now."""
        if not self.enabled:
            return
        self._close()
        torch.cuda.reset_peak_memory_stats(self.device)
        self._open = stage

    def report(self) -> dict:
        """{stage: {"allocated_gib", "reserved_gib"}, ..., "device_used_gib", "cap_gib"} so far
        (the open stage included); {} off CUDA."""
        if not self.enabled:
            return {}
        self._close()
        free, total = torch.cuda.mem_get_info(self.device)
        out: dict = {name: dict(peaks) for name, peaks in self.stages.items()}
        out["device_used_gib"] = round((total - free) / GIB, 3)
        out["cap_gib"] = None if self.cap_bytes is None else round(self.cap_bytes / GIB, 3)
        return out

    def _close(self) -> None:
        if self._open is None:
            return
        self.stages[self._open] = {
            "allocated_gib": round(torch.cuda.max_memory_allocated(self.device) / GIB, 3),
            "reserved_gib": round(torch.cuda.max_memory_reserved(self.device) / GIB, 3),
        }
        self._open = None
