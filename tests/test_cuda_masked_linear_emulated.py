"""The CUDA C++ masked-linear kernels run on the CPU: csrc/cuda/masked_linear.cu compiled as host
C++ against tests/cuda_emu/ (CTAs as real threads, WMMA fragments multiplied in fp32, cp.async as
a plain copy), checked by the GPU suite's own helpers (tests/test_cuda_masked_linear.py: float64
references, every gradient request, dead blocks exactly zero) on shapes small enough to emulate:
edge tiles, unaligned rows, split reductions, every block size. Timing, the real tensor cores and
the ATen bindings need a GPU."""
import ctypes

import pytest
import test_cuda_masked_linear as gpu_suite
import torch
from _cuda_emu import build
from _cuda_emu import pointer as _ptr

DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    dll = build(tmp_path_factory.mktemp("cuda_emu"), "masked_linear.cu", "masked_linear_host.cpp", opt="-O2")
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    dll.emu_ml_forward.argtypes = [p, p, p, i32, p, p, p, i64, p, i64, i64, i64, i32, i32]
    dll.emu_ml_grad_input.argtypes = [p, p, p, i32, p, p, i64, p, i64, i64, i64, i32, i32]
    dll.emu_ml_grad_weight.argtypes = [p, p, p, p, i32, p, p, i64, p, p, i64, i64, i64, i32, i32, i32, i32]
    for f in (dll.emu_ml_forward, dll.emu_ml_grad_input, dll.emu_ml_grad_weight):
        f.restype = i32
    dll.emu_ml_workspace_bytes.argtypes = [i32, i64, i64, i64, i32]
    dll.emu_ml_workspace_bytes.restype = i64
    return dll


def _mask_kind(mask):
    return 0 if mask is None else 1 if mask.dtype in (torch.uint8, torch.bool) else 2


class EmulatedOps:
    """torch.ops.capkit.masked_linear_* as the CUDA bindings define them, on the emulated launchers
    (outputs poisoned with NaN first, so every element must be written)."""

    def __init__(self, lib):
        self.lib = lib

    @staticmethod
    def _c(t):
        return None if t is None else t.contiguous()

    def masked_linear_forward(self, x, w, mask, bias, row_ptr, col_idx, block):
        x, w, mask, bias = map(self._c, (x, w, mask, bias))
        (M, K), N = x.shape, w.shape[0]
        y = torch.full((M, N), float("nan"), dtype=x.dtype)
        nnz = 0 if col_idx is None else col_idx.numel()
        rc = self.lib.emu_ml_forward(_ptr(x), _ptr(w), _ptr(mask), _mask_kind(mask), _ptr(bias), _ptr(row_ptr),
                                     _ptr(col_idx), nnz, _ptr(y), M, N, K, block, DTYPE_CODES[x.dtype])
        assert rc == 0, f"forward launcher returned {rc}"
        return y

    def masked_linear_grad_input(self, g, w, mask, col_ptr, row_idx, block):
        g, w, mask = map(self._c, (g, w, mask))
        (M, N), K = g.shape, w.shape[1]
        dx = torch.full((M, K), float("nan"), dtype=g.dtype)
        nnz = 0 if row_idx is None else row_idx.numel()
        rc = self.lib.emu_ml_grad_input(_ptr(g), _ptr(w), _ptr(mask), _mask_kind(mask), _ptr(col_ptr),
                                        _ptr(row_idx), nnz, _ptr(dx), M, N, K, block, DTYPE_CODES[g.dtype])
        assert rc == 0, f"grad_input launcher returned {rc}"
        return dx

    def masked_linear_grad_weight(self, g, x, w, mask, row_ptr, col_idx, block, need_w, need_m):
        g, x, w, mask = map(self._c, (g, x, w, mask))
        M, N, K = x.shape[0], w.shape[0], w.shape[1]
        dw = torch.full((N, K), float("nan"), dtype=w.dtype) if need_w else torch.empty(0, dtype=w.dtype)
        like = mask if mask is not None else w
        dm = torch.full((N, K), float("nan"), dtype=like.dtype) if need_m else torch.empty(0, dtype=like.dtype)
        nnz = 0 if col_idx is None else col_idx.numel()
        rc = self.lib.emu_ml_grad_weight(_ptr(g), _ptr(x), _ptr(w), _ptr(mask), _mask_kind(mask), _ptr(row_ptr),
                                         _ptr(col_idx), nnz, _ptr(dw), _ptr(dm), M, N, K, block,
                                         DTYPE_CODES[w.dtype], int(need_w), int(need_m))
        assert rc == 0, f"grad_weight launcher returned {rc}"
        return dw, dm


@pytest.fixture
def emulated(lib, monkeypatch):
    """The GPU suite's helpers on CPU tensors and the emulated kernels."""
    ops = EmulatedOps(lib)
    monkeypatch.setattr(gpu_suite, "DEV", "cpu")
    monkeypatch.setattr(gpu_suite, "_ops", lambda: ops)
    return gpu_suite


DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (M, N, K): edge tiles and unaligned rows (odd K), few tokens (split-K in forward and dx),
# many tokens over a small weight (grad_weight split over tokens)
SPLIT_K, SPLIT_TOKENS = (1, 264, 264), (520, 40, 48)
DENSE_SHAPES = [(1, 7, 5), (7, 127, 69), (33, 130, 96), SPLIT_K, SPLIT_TOKENS]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_shapes_reach_the_split_reductions(lib, dtype):
    # the emulated device reports 4 SMs: these shapes leave it too few output tiles to fill
    code = DTYPE_CODES[dtype]
    assert lib.emu_ml_workspace_bytes(0, *SPLIT_K, code) > 0  # forward splits over K
    assert lib.emu_ml_workspace_bytes(1, *SPLIT_K, code) > 0  # dx splits over N
    assert lib.emu_ml_workspace_bytes(2, *SPLIT_TOKENS, code) > 0  # dW splits over the tokens
    assert lib.emu_ml_workspace_bytes(0, 33, 130, 96, code) == 0


@pytest.mark.parametrize("shape", DENSE_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("mask_kind", ["none", "u8", "float"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dense(emulated, shape, mask_kind, dtype):
    M, N, K = shape
    emulated.run_all(M, N, K, dtype, mask_kind, with_bias=(M + N) % 2 == 0)


@pytest.mark.parametrize("block", [16, 32, 64, 128])
@pytest.mark.parametrize("mask_kind", ["none", "u8", "float"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_layout(emulated, block, mask_kind, dtype):
    emulated.run_all(9, 200, 300, dtype, mask_kind, layout=emulated.Layout(200, 300, block, density=0.5),
                     with_bias=block % 32 == 0)


@pytest.mark.parametrize("density", [0.0, 1.0])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_layout_empty_and_full(emulated, density, dtype):
    layout = emulated.Layout(96, 64, 32, density=density, dead_line=False)
    emulated.run_all(17, 96, 64, dtype, "float", layout=layout)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_layout_split_reductions(emulated, dtype):
    # one token: forward and dx split their reductions; many tokens: grad_weight splits over them
    emulated.run_all(1, 256, 320, dtype, "u8", layout=emulated.Layout(256, 320, 64, density=0.6))
    emulated.run_all(600, 64, 64, dtype, "float", layout=emulated.Layout(64, 64, 16, density=0.5))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_special_inputs(emulated, dtype):
    emulated.test_no_tokens(32, dtype)
    emulated.test_unaligned_and_strided_inputs(dtype)
    emulated.test_bool_mask(dtype)


def test_pruned_entries_are_exact_zeros(emulated):
    emulated.test_pruned_entries_are_exact_zeros()
