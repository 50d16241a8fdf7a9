"""This worker process: what it reports about itself (the `ready` and `device` fields, its resident memory) and
how it leaves (at once, whatever the job is doing, so its memory and VRAM go with it)."""

from __future__ import annotations

import logging
import os
import platform
import sys

from .._version import __version__
from ..protocol import PROTOCOL_VERSION

logger = logging.getLogger("dit360_blender.worker")


def hard_exit(code: int, reason: str) -> None:
    """Leave now, whatever the job is doing: the process's memory (and VRAM) goes with it."""
    logger.warning("exiting: %s", reason)
    for handler in logging.getLogger().handlers:
        try:
            handler.flush()
        except Exception:
            pass
    os._exit(code)


def finish(code: int) -> int:
    """Skip interpreter teardown (daemon threads blocked in sockets, CUDA finalisers): flush and go."""
    logger.info("worker exiting (code %d)", code)
    logging.shutdown()
    os._exit(code)


def rss_bytes() -> int | None:
    """Resident memory of this process (Linux and Windows; None elsewhere)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        pass
    if sys.platform == "win32":
        return _windows_rss()
    return None


def _windows_rss() -> int | None:
    import ctypes
    from ctypes import wintypes

    class Counters(ctypes.Structure):
        _fields_ = [("cb", wintypes.DWORD), ("PageFaultCount", wintypes.DWORD)] + [
            (name, ctypes.c_size_t)
            for name in (
                "PeakWorkingSetSize", "WorkingSetSize", "QuotaPeakPagedPoolUsage", "QuotaPagedPoolUsage",
                "QuotaPeakNonPagedPoolUsage", "QuotaNonPagedPoolUsage", "PagefileUsage", "PeakPagefileUsage",
            )
        ]  # fmt: skip

    counters = Counters()
    counters.cb = ctypes.sizeof(Counters)
    kernel32 = ctypes.WinDLL("kernel32")
    kernel32.GetCurrentProcess.restype = wintypes.HANDLE
    kernel32.K32GetProcessMemoryInfo.argtypes = [wintypes.HANDLE, ctypes.c_void_p, wintypes.DWORD]
    kernel32.K32GetProcessMemoryInfo.restype = wintypes.BOOL
    ok = kernel32.K32GetProcessMemoryInfo(kernel32.GetCurrentProcess(), ctypes.byref(counters), counters.cb)
    return int(counters.WorkingSetSize) if ok else None


def ready_fields() -> dict:
    """Everything `ready` can report: `base_ready_fields` and `device_fields` (imports torch)."""
    return {**base_ready_fields(), **device_fields()}


def base_ready_fields() -> dict:
    """What `ready` reports before torch is imported (the worker answers its client at once)."""
    return {
        "protocol": PROTOCOL_VERSION,
        "package_version": __version__,
        "python_version": platform.python_version(),
        "pid": os.getpid(),
    }


def device_fields() -> dict:
    """The `device` event's fields (also in `ready` once known). Imports torch and the pipeline, so
    a broken install fails here, at start, with the import's own error."""
    import torch

    from ..pipeline.dit360 import pick_device

    device = pick_device("auto")
    name, free = _describe(torch, device)
    return {
        "torch_version": str(torch.__version__),
        "device": device.type,
        "device_name": name,
        "free_vram": free,
    }


def _describe(torch, device) -> tuple[str, int | None]:
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return torch.cuda.get_device_name(device), int(free)
    if device.type == "mps":
        return "Apple GPU (MPS)", None
    return platform.processor() or platform.machine() or "CPU", None
