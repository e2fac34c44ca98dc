"""Compile check of the Triton kernels for NVIDIA GPUs with Triton's own compiler; needs no GPU.

The interpreter runs the kernels' arithmetic on CPUs; this compiles them as a GPU would
(tests/triton_aot.py: every kernel, the variants that change the generated code, the largest
tile each autotune prune keeps), so a tl.dot shape, a layout or a shared-memory overrun shows
here and not first on a GPU. sm_90 (H100) in the default suite (about a minute on 2 cores),
sm_80 (A100) with the slow ones. On a machine with a GPU the kernels run in the GPU tests.
"""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parent / "triton_aot.py"


def _ptxas_ships() -> bool:
    spec = importlib.util.find_spec("triton")
    return spec is not None and (Path(spec.origin).parent / "backends" / "nvidia" / "bin" / "ptxas").exists()


pytestmark = [pytest.mark.skipif(not _ptxas_ships(), reason="triton with its NVIDIA ptxas is not installed"),
              pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: the GPU tests run the kernels")]


def _compile(arch: int):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(SCRIPT), str(arch)], capture_output=True, text=True, env=env,
                          timeout=900)
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    bad = [r for r in rows if not r["ok"]]
    assert proc.returncode == 0 and not bad, (bad, proc.stderr[-3000:])
    kernels = {r["kernel"].split()[0] for r in rows}
    assert kernels == {"masked_linear.fwd", "masked_linear.dx", "masked_linear.gw", "info_nce.fwd", "info_nce.bwd",
                       "topk.histogram", "topk.select"}, kernels
    assert all(0 < r["shared"] for r in rows if not r["kernel"].startswith("topk.select"))


def test_triton_kernels_compile_for_sm90():
    _compile(90)


@pytest.mark.slow
def test_triton_kernels_compile_for_sm80():
    _compile(80)
