"""Test configuration.

Triton kernels run on the CPU only through the interpreter, which must be switched on before
any module with ``@triton.jit`` is imported: hence the environment variable is set here, first.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    # A different, reproducible seed per test: random data is fresh for each test.
    import zlib

    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
    yield


def triton_usable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"
