"""Process memory figures for stats() and the benchmarks."""
from __future__ import annotations

import ctypes
import functools
import resource
import sys


def peak_rss_mb() -> float:
    """This process's peak RSS in MiB. On Linux from VmHWM, which starts afresh at exec: ru_maxrss
    would carry over a parent's peak, as getrusage(2) keeps it across execve."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss / 2**20 if sys.platform == "darwin" else maxrss / 1024  # bytes vs KiB


@functools.cache
def _malloc_trim():
    """glibc's malloc_trim among the symbols this process already has (no library search: ctypes.util.find_library
    runs ldconfig, milliseconds at every load), or None."""
    try:
        return getattr(ctypes.CDLL(None), "malloc_trim", None)
    except (OSError, TypeError):   # no handle for the process itself (Windows)
        return None


def trim_heap() -> bool:
    """Hand the C heap's free pages back to the system (glibc's malloc_trim): loading a model builds and drops
    megabytes of small python objects (the vocabulary's lists, the tokenizer's build inputs), and without this their
    pages stay in RSS. False where the C library has no malloc_trim."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
