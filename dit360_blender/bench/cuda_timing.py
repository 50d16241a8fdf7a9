"""GPU timing for the stand-alone bench scripts: CUDA events around each call, median of several."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def cuda_median(fn: Callable[[], object], repeats: int, warmups: int) -> tuple[float, float]:
    """(median seconds of `repeats` calls timed with CUDA events, wall seconds of the `warmups`
    calls before them, which include any compiling)."""
    t0 = time.perf_counter()
    for _ in range(warmups):
        fn()
    torch.cuda.synchronize()
    warm_s = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000.0)
    return statistics.median(times), warm_s
