"""Is the process that started us still alive? Portable, standard library only.

Why: if Blender crashes or is killed, nothing sends `shutdown`, and a worker left behind would keep
~30 GB of VRAM. The worker polls this every half second and exits when it turns false.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable


def parent_watch(pid: int) -> Callable[[], bool]:
    """A cheap `alive()` check for process `pid`, set up now (so a reused PID is not mistaken for it)."""
    if sys.platform == "win32":
        return _windows_watch(pid)
    return _posix_watch(pid)


def _posix_watch(pid: int) -> Callable[[], bool]:
    # When `pid` is our real parent, a changed getppid() is exact: an orphan is re-parented at once,
    # even while the dead parent is still an unreaped zombie. Otherwise probe the PID.
    direct = os.getppid() == pid

    def alive() -> bool:
        if direct and os.getppid() != pid:
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # exists, owned by someone else
            return True
        return not _is_zombie(pid)

    return alive


def _is_zombie(pid: int) -> bool:
    """Linux only (elsewhere False): a killed, unreaped process still answers kill(pid, 0)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    # "pid (comm) S ...": comm may contain spaces and parentheses; the state follows the last ')'.
    return stat[stat.rfind(b")") + 2 : stat.rfind(b")") + 3] == b"Z"


def _windows_watch(pid: int) -> Callable[[], bool]:
    import ctypes
    from ctypes import wintypes

    synchronize, wait_object_0, access_denied = 0x00100000, 0x0, 5
    kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)
    kernel32.OpenProcess.argtypes = [wintypes.DWORD, wintypes.BOOL, wintypes.DWORD]
    kernel32.OpenProcess.restype = wintypes.HANDLE
    kernel32.WaitForSingleObject.argtypes = [wintypes.HANDLE, wintypes.DWORD]
    kernel32.WaitForSingleObject.restype = wintypes.DWORD
    # The handle is kept open for the worker's life: it pins this process object, so a new
    # process that reuses the PID later cannot be mistaken for the parent.
    handle = kernel32.OpenProcess(synchronize, False, pid)
    if not handle:
        if ctypes.get_last_error() == access_denied:  # cannot watch it: rely on the socket closing
            return lambda: True
        return lambda: False  # no such process: the parent is already gone

    def alive() -> bool:
        return kernel32.WaitForSingleObject(handle, 0) != wait_object_0

    return alive
