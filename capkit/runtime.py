"""Process settings for fast CPU inference.

PyTorch's CPU tensors come from the C library's ``malloc``. glibc serves a large block (a
``[4096, 1536]`` float activation is 24 MiB) with fresh pages: either straight from ``mmap``, or
from the heap top, which it hands back to the kernel (trims) as soon as more than twice the
current mmap threshold lies free there. Each forward of a model then touches every page of its
large activations anew, one page fault per 4 KiB. Once the weights are sparse this cost is a
large part of the whole forward (``benchmarks.sparse_inference --allocator default`` against the
tuned default measures it). ONNX Runtime keeps its own arena for the same reason.

:func:`tune_cpu_allocator` raises glibc's trim and mmap thresholds (``mallopt``), so that freed
activations stay in the process and the next forward reuses pages already mapped. The price is
resident memory: the process keeps its peak footprint instead of returning it between calls.
The setting is process-wide and cannot be undone piecemeal; call it once, before the first
forward. The same can be had without code through the environment, before Python starts:
``GLIBC_TUNABLES=glibc.malloc.trim_threshold=1073741824:glibc.malloc.mmap_threshold=1073741824``.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys
from typing import Optional

__all__ = ["tune_cpu_allocator", "allocator_tuning"]

_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
_M_MMAP_THRESHOLD = -3
_applied: Optional[dict] = None


@functools.lru_cache(maxsize=None)
def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version.restype = ctypes.c_char_p
        libc.gnu_get_libc_version()  # glibc only: musl and others have no mallopt thresholds
    except (OSError, AttributeError):
        return None
    return libc


def tune_cpu_allocator(threshold_bytes: int = 1 << 30) -> bool:
    """Keep freed memory in the process for reuse: blocks up to ``threshold_bytes`` come from the
    heap instead of ``mmap``, and the heap is trimmed only when more than ``threshold_bytes`` lie
    free at its top. Returns whether the setting was applied (``False`` where the C library is not
    glibc, e.g. macOS, Windows, musl: nothing changes there)."""
    global _applied
    if isinstance(threshold_bytes, bool) or not isinstance(threshold_bytes, int):
        raise TypeError(f"tune_cpu_allocator: threshold_bytes must be an int, got {type(threshold_bytes).__name__}")
    if not (1 << 20) <= threshold_bytes < (1 << 31):
        raise ValueError("tune_cpu_allocator: threshold_bytes must be at least 1 MiB and below 2 GiB "
                         f"(mallopt takes an int), got {threshold_bytes}")
    libc = _libc()
    if libc is None:
        return False
    ok = bool(libc.mallopt(_M_TRIM_THRESHOLD, ctypes.c_int(threshold_bytes))) and bool(
        libc.mallopt(_M_MMAP_THRESHOLD, ctypes.c_int(threshold_bytes)))
    if ok:
        _applied = {"allocator": "glibc " + libc.gnu_get_libc_version().decode(),
                    "trim_threshold": threshold_bytes, "mmap_threshold": threshold_bytes}
    return ok


def allocator_tuning() -> Optional[dict]:
    """What :func:`tune_cpu_allocator` set in this process (``None`` if it has not run or did not
    apply); benchmarks record it beside their timings."""
    return None if _applied is None else dict(_applied)
