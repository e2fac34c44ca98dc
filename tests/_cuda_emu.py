"""Builds csrc/cuda sources for the host emulation of CUDA (tests/cuda_emu/) into a shared library
that the emulated test files call through ctypes."""
import ctypes
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EMU = ROOT / "tests" / "cuda_emu"


def build(out_dir: Path, source: str, host: str, opt: str = "-O1") -> ctypes.CDLL:
    """``csrc/cuda/<source>`` and ``tests/cuda_emu/<host>`` as one library; skips the calling test
    where the compiler lacks what the emulation needs (C++20 <barrier>, _Float16)."""
    cxx = shutil.which("g++")
    if cxx is None:
        pytest.skip("needs g++ (C++20) to build the host emulation")
    out = out_dir / f"lib{Path(source).stem}_emu.so"
    cmd = [cxx, "-std=c++20", opt, "-shared", "-fPIC", "-pthread", "-Wall", "-Wno-unknown-pragmas",
           "-DCAPKIT_CUDA_HOST_EMULATION", f"-I{EMU}", f"-I{ROOT / 'csrc' / 'cuda'}",
           "-include", str(EMU / "cuda_runtime.h"),
           "-x", "c++", str(ROOT / "csrc" / "cuda" / source), "-x", "c++", str(EMU / host), "-o", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 and any(s in proc.stderr for s in ("<barrier>", "_Float16")):
        pytest.skip(f"this g++ lacks C++20 <barrier> or _Float16: {proc.stderr[-300:]}")
    assert proc.returncode == 0, proc.stderr[-5000:]
    return ctypes.CDLL(str(out))


def pointer(t):
    """A contiguous tensor's data as a ctypes pointer (None for None or an empty tensor)."""
    if t is None or t.numel() == 0:
        return None
    assert t.is_contiguous(), "the emulated kernels read contiguous tensors"
    return ctypes.c_void_p(t.data_ptr())
