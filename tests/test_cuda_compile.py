"""Compile check of the CUDA sources (csrc/cuda/*.cu) with nvcc; needs no GPU.

Each source is compiled for sm_80 and sm_90a, the architectures capkit ships.
The two compilations run concurrently (they are independent and each takes
tens of seconds).
"""
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CUDA_SOURCES = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))
GENCODES = {
    "sm_80": "arch=compute_80,code=sm_80",
    "sm_90a": "arch=compute_90a,code=sm_90a",
}

# About 50 s on 2 cores (both architectures in parallel): below the ~60 s
# threshold for the slow marker.
pytestmark = pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH")


def test_cuda_sources_exist():
    assert CUDA_SOURCES, f"no .cu files under {ROOT / 'csrc' / 'cuda'}"


@pytest.mark.parametrize("source", CUDA_SOURCES, ids=lambda p: p.name)
def test_nvcc_compiles(source, tmp_path):
    procs = {}
    for arch, gencode in GENCODES.items():
        cmd = [
            "nvcc", "-c", "-std=c++17", "-O2", "-gencode", gencode,
            str(source), "-o", str(tmp_path / f"{source.stem}.{arch}.o"),
        ]
        procs[arch] = (cmd, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                             text=True, cwd=ROOT))
    failures = []
    for arch, (cmd, proc) in procs.items():
        _, err = proc.communicate()
        if proc.returncode != 0:
            failures.append(f"{arch}: `{' '.join(cmd)}` exited with {proc.returncode}:\n{err}")
    assert not failures, "\n\n".join(failures)
