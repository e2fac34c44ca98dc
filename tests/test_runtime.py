"""capkit.tune_cpu_allocator: freed memory stays in the process (checked in a fresh interpreter,
so this test process keeps glibc's defaults)."""
import subprocess
import sys

import pytest

from capkit.runtime import _libc, tune_cpu_allocator

glibc_only = pytest.mark.skipif(_libc() is None, reason="the C library is not glibc")

PROBE = r"""
import ctypes, sys
import torch
import capkit
from capkit.runtime import allocator_tuning

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
tuned = sys.argv[1] == "1"
if tuned:
    assert capkit.tune_cpu_allocator() is True
    assert allocator_tuning()["trim_threshold"] == 1 << 30
else:
    assert allocator_tuning() is None
x = torch.ones(16 << 20)  # 64 MiB, above glibc's largest automatic mmap threshold (32 MiB)
del x
print(libc.mallinfo2().fordblks)
"""


def _free_bytes_after_a_large_free(tuned: bool) -> int:
    out = subprocess.run([sys.executable, "-c", PROBE, "1" if tuned else "0"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    return int(out.stdout.strip().splitlines()[-1])


@glibc_only
def test_tuned_allocator_keeps_a_freed_large_block():
    if not hasattr(_libc(), "mallinfo2"):
        pytest.skip("mallinfo2 needs glibc 2.33 or later")
    default = _free_bytes_after_a_large_free(False)
    tuned = _free_bytes_after_a_large_free(True)
    assert default < (64 << 20), "glibc's defaults are expected to unmap a freed 64 MiB block"
    assert tuned >= (64 << 20), "after tune_cpu_allocator the freed 64 MiB block stays in the heap"


@pytest.mark.parametrize("bad", [True, 1.5, "1g", None])
def test_tune_cpu_allocator_rejects_a_non_int(bad):
    with pytest.raises(TypeError, match="threshold_bytes must be an int"):
        tune_cpu_allocator(bad)


@pytest.mark.parametrize("bad", [0, 1000, 1 << 31])
def test_tune_cpu_allocator_rejects_an_out_of_range_threshold(bad):
    with pytest.raises(ValueError, match="threshold_bytes must be at least 1 MiB and below 2 GiB"):
        tune_cpu_allocator(bad)
