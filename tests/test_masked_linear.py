"""masked_linear through its public API: every backend usable here against the float64 reference
(``backend="torch"``), every gradient, every mask kind, odd and BERT-like sizes, bad input."""
import math

import pytest
import torch

from capkit.ops import BlockMask, NMMask, backend_status, block_grid_to_layout, masked_linear
from conftest import triton_usable

CPU = torch.device("cpu")
STATUS = backend_status(CPU)


def fast_backends():
    out = []
    if STATUS["cpu"] is None:
        out.append(("cpu", torch.float32))
    if triton_usable():
        out += [("triton", torch.float32), ("triton", torch.float16)]
    if torch.cuda.is_available():
        out += [("cuda", torch.float32), ("cuda", torch.float16), ("cuda", torch.bfloat16)]
    return out


BACKENDS = fast_backends()
SHAPES = [(1, 7, 127), (7, 127, 769), (127, 33, 64), (769, 96, 40), (1024, 20, 2048)]


def device_of(backend):
    return torch.device("cuda") if backend == "cuda" or (backend == "triton" and torch.cuda.is_available()) else CPU


def tol(dtype, k):
    # Error of a k-term fp32-accumulated dot product of unit-variance data, with headroom.
    eps = {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    return 8 * eps * math.sqrt(k) + eps


def make_mask(kind, n, k, device, block_size=32):
    if kind == "none":
        return None
    if kind == "bool":
        return torch.rand(n, k, device=device) > 0.6
    if kind == "uint8":
        return (torch.rand(n, k, device=device) > 0.3).to(torch.uint8)
    if kind == "float":
        return (torch.rand(n, k, device=device) > 0.5).float().requires_grad_()
    if kind == "block":
        grid = torch.rand(-(-n // block_size), -(-k // block_size), device=device) > 0.5
        return BlockMask.from_block_grid(grid, block_size, (n, k))
    if kind == "block+elem":
        grid = torch.rand(-(-n // block_size), -(-k // block_size), device=device) > 0.4
        elem = torch.rand(n, k, device=device) > 0.3
        return BlockMask(block_grid_to_layout(grid, block_size, (n, k)), elem)
    if kind == "block+float":
        # Float element mask with the straight-through gradient: dmask is dense (also in dead
        # blocks), dweight is zero in dead blocks.
        grid = torch.rand(-(-n // block_size), -(-k // block_size), device=device) > 0.4
        elem = (torch.rand(n, k, device=device) > 0.3).float().requires_grad_()
        return BlockMask(block_grid_to_layout(grid, block_size, (n, k)), elem)
    if kind == "nm":
        return NMMask.from_scores(torch.randn(n, k, device=device))
    raise ValueError(kind)


def cast_mask(mask, dtype=None, device=None):
    """Same mask for the reference: floating masks in float64, detached copy with its own grad."""
    if mask is None:
        return None
    if isinstance(mask, BlockMask):
        return BlockMask(mask.layout, cast_mask(mask.mask))
    if isinstance(mask, NMMask):
        return mask
    if mask.dtype.is_floating_point:
        return mask.detach().to(torch.float64).requires_grad_(mask.requires_grad)
    return mask


def run_case(backend, dtype, shape, mask_kind, bias=True, block_size=32):
    m, n, k = shape
    dev = device_of(backend)
    x = torch.randn(m, k, device=dev, dtype=dtype, requires_grad=True)
    w = torch.randn(n, k, device=dev, dtype=dtype, requires_grad=True)
    b = torch.randn(n, device=dev, dtype=dtype, requires_grad=True) if bias else None
    mask = make_mask(mask_kind, n, k, dev, block_size)
    if isinstance(mask, torch.Tensor) and mask.dtype.is_floating_point:
        mask = mask.detach().to(dtype).requires_grad_()
    if isinstance(mask, BlockMask) and mask.mask is not None and mask.mask.dtype.is_floating_point:
        mask = BlockMask(mask.layout, mask.mask.detach().to(dtype).requires_grad_())
    y = masked_linear(x, w, mask, b, backend=backend)
    dy = torch.randn_like(y)
    y.backward(dy)

    x64 = x.detach().double().requires_grad_()
    w64 = w.detach().double().requires_grad_()
    b64 = b.detach().double().requires_grad_() if bias else None
    m64 = cast_mask(mask)
    y64 = masked_linear(x64, w64, m64, b64, backend="torch")
    y64.backward(dy.double())

    t = tol(dtype, k)
    assert y.dtype == dtype and y.shape == (m, n)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y.double(), y64, atol=t * 4, rtol=t)
    torch.testing.assert_close(x.grad.double(), x64.grad, atol=tol(dtype, n) * 4, rtol=tol(dtype, n))
    torch.testing.assert_close(w.grad.double(), w64.grad, atol=tol(dtype, m) * 4, rtol=tol(dtype, m))
    if bias:
        torch.testing.assert_close(b.grad.double(), b64.grad, atol=tol(dtype, m) * 4, rtol=tol(dtype, m))
    if isinstance(mask, BlockMask) and mask.mask is not None and mask.mask.requires_grad:
        mask, m64 = mask.mask, m64.mask
    if isinstance(mask, torch.Tensor) and mask.requires_grad:
        assert mask.grad is not None
        torch.testing.assert_close(mask.grad.double(), m64.grad, atol=tol(dtype, m) * 4, rtol=tol(dtype, m))


@pytest.mark.parametrize("backend,dtype", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("mask_kind", ["none", "bool", "uint8", "float", "block", "block+elem", "block+float"])
def test_matches_reference(backend, dtype, shape, mask_kind):
    if backend == "triton" and shape[0] * shape[1] * shape[2] > 2_000_000:
        pytest.skip("too large for the Triton interpreter")
    run_case(backend, dtype, shape, mask_kind)


@pytest.mark.parametrize("backend,dtype", BACKENDS)
@pytest.mark.parametrize("block_size", [16, 32, 64, 128])
def test_block_sizes(backend, dtype, block_size):
    run_case(backend, dtype, (33, 2 * block_size + 5, 3 * block_size - 3), "block", block_size=block_size)


@pytest.mark.parametrize("backend,dtype", BACKENDS)
def test_nm_mask(backend, dtype):
    run_case(backend, dtype, (17, 40, 64), "nm")


@pytest.mark.parametrize("backend,dtype", [bd for bd in BACKENDS if bd[0] != "triton"])
def test_bert_shape(backend, dtype):
    # BERT FFN shapes (768 <-> 3072) with a 90% block-sparse mask, on fewer tokens to stay fast.
    run_case(backend, dtype, (96, 3072, 768), "block", block_size=32)
    run_case(backend, dtype, (96, 768, 3072), "block+elem", block_size=64)


@pytest.mark.parametrize("backend,dtype", BACKENDS)
def test_no_bias_and_frozen_inputs(backend, dtype):
    dev = device_of(backend)
    x = torch.randn(5, 3, 48, device=dev, dtype=dtype)
    w = torch.randn(20, 48, device=dev, dtype=dtype, requires_grad=True)
    mask = torch.rand(20, 48, device=dev) > 0.5
    y = masked_linear(x, w, mask, backend=backend)
    ref = masked_linear(x.double(), w.detach().double(), mask, backend="torch")
    assert y.shape == (5, 3, 20)
    torch.testing.assert_close(y.double(), ref, atol=tol(dtype, 48) * 4, rtol=tol(dtype, 48))
    y.sum().backward()
    assert w.grad is not None and torch.isfinite(w.grad).all()


@pytest.mark.parametrize("backend,dtype", BACKENDS)
def test_non_contiguous_inputs(backend, dtype):
    dev = device_of(backend)
    x = torch.randn(40, 9, device=dev, dtype=dtype).t()  # [9, 40], transposed view
    w = torch.randn(40, 20, device=dev, dtype=dtype).t()  # [20, 40], transposed view
    mask = (torch.rand(40, 20, device=dev) > 0.5).t()
    bias = torch.randn(40, device=dev, dtype=dtype)[::2]
    y = masked_linear(x, w, mask, bias, backend=backend)
    ref = masked_linear(x.double(), w.double(), mask, bias.double(), backend="torch")
    torch.testing.assert_close(y.double(), ref, atol=tol(dtype, 40) * 4, rtol=tol(dtype, 40))


@pytest.mark.parametrize("backend,dtype", BACKENDS + [("torch", torch.float32)])
def test_empty_inputs(backend, dtype):
    dev = device_of(backend)
    w = torch.randn(8, 16, device=dev, dtype=dtype, requires_grad=True)
    b = torch.randn(8, device=dev, dtype=dtype, requires_grad=True)
    x = torch.randn(0, 16, device=dev, dtype=dtype, requires_grad=True)
    y = masked_linear(x, w, torch.ones(8, 16, dtype=torch.bool, device=dev), b, backend=backend)
    assert y.shape == (0, 8)
    y.sum().backward()
    assert torch.count_nonzero(w.grad) == 0 and torch.count_nonzero(b.grad) == 0
    x3 = torch.randn(2, 0, 16, device=dev, dtype=dtype)
    assert masked_linear(x3, w.detach(), None, backend=backend).shape == (2, 0, 8)


@pytest.mark.parametrize("backend,dtype", BACKENDS)
def test_nan_handling(backend, dtype):
    dev = device_of(backend)
    x = torch.randn(6, 32, device=dev, dtype=dtype)
    w = torch.randn(16, 32, device=dev, dtype=dtype)
    mask = torch.rand(16, 32, device=dev) > 0.5
    # NaN in a pruned weight of a 0/1 mask contributes nothing, on every backend.
    w[~mask] = float("nan")
    y = masked_linear(x, w, mask, backend=backend)
    ref = masked_linear(x.double(), w.double(), mask, backend="torch")
    assert torch.isfinite(ref).all()
    torch.testing.assert_close(y.double(), ref, atol=tol(dtype, 32) * 4, rtol=tol(dtype, 32))
    # NaN in the input propagates to that row only.
    x[2, 5] = float("nan")
    y = masked_linear(x, w, mask, backend=backend)
    assert torch.isnan(y[2]).any() and torch.isfinite(y[[0, 1, 3, 4, 5]]).all()


def test_reference_matches_plain_formula():
    # The reference backend against an independent spelling of the definition.
    x = torch.randn(11, 37, dtype=torch.float64, requires_grad=True)
    w = torch.randn(13, 37, dtype=torch.float64, requires_grad=True)
    m = (torch.rand(13, 37) > 0.5).double().requires_grad_()
    b = torch.randn(13, dtype=torch.float64, requires_grad=True)
    y = masked_linear(x, w, m, b, backend="torch")
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, w, m, b), dy)
    expect_y = x @ (w * m).t() + b
    expect = torch.autograd.grad(expect_y, (x, w, m, b), dy)
    torch.testing.assert_close(y, expect_y)
    for g, e in zip(grads, expect):
        torch.testing.assert_close(g, e)
    torch.autograd.gradcheck(lambda x_, w_, m_, b_: masked_linear(x_, w_, m_, b_, backend="torch"),
                             (x[:3].detach().requires_grad_(), w, m, b))


@pytest.mark.filterwarnings("ignore:Input #")
@pytest.mark.parametrize("backend", [b for b, dt in BACKENDS if dt == torch.float32 and b != "cuda"])
def test_gradcheck_fast_backend_in_fp32(backend):
    # Finite differences in fp32 are coarse: compare analytic vs numeric with loose tolerances.
    x = torch.randn(4, 24, requires_grad=True)
    w = torch.randn(10, 24, requires_grad=True)
    m = (torch.rand(10, 24) > 0.4).float().requires_grad_()
    b = torch.randn(10, requires_grad=True)
    torch.autograd.gradcheck(lambda *a: masked_linear(*a, backend=backend), (x, w, m, b),
                             eps=1e-2, atol=5e-2, rtol=5e-2)


# ----------------------------------------------------------------------------- bad input
def test_bad_input_errors_name_the_argument():
    x = torch.randn(4, 8)
    w = torch.randn(5, 8)
    with pytest.raises(ValueError, match="in_features"):
        masked_linear(torch.randn(4, 9), w, None)
    with pytest.raises(ValueError, match="weight must be 2-D"):
        masked_linear(x, torch.randn(8), None)
    with pytest.raises(TypeError, match="weight's dtype"):
        masked_linear(x, w.double(), None)
    with pytest.raises(TypeError, match="x must be a floating"):
        masked_linear(x.long(), w.long(), None)
    with pytest.raises(ValueError, match="mask must have the weight's shape"):
        masked_linear(x, w, torch.ones(8, 5, dtype=torch.bool))
    with pytest.raises(TypeError, match="mask must be bool, uint8 or floating"):
        masked_linear(x, w, torch.ones(5, 8, dtype=torch.int64))
    with pytest.raises(TypeError, match="mask must be a torch.Tensor"):
        masked_linear(x, w, [[1] * 8] * 5)
    with pytest.raises(ValueError, match="bias must be a tensor of shape"):
        masked_linear(x, w, None, torch.randn(4))
    with pytest.raises(ValueError, match="backend must be one of"):
        masked_linear(x, w, None, backend="fastest")
    with pytest.raises(ValueError, match="block_size must be one of"):
        BlockMask.from_dense(torch.ones(5, 8, dtype=torch.bool), 24)
    with pytest.raises(ValueError, match="BlockMask\\) has shape"):
        masked_linear(x, w, BlockMask.from_dense(torch.ones(6, 8, dtype=torch.bool), 16))
    with pytest.raises(ValueError, match="not 2:4 sparse"):
        NMMask(torch.ones(5, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match="multiple of 4"):
        NMMask(torch.zeros(5, 6, dtype=torch.bool))
    with pytest.raises(RuntimeError, match="backend 'cuda' cannot run here"):
        if torch.cuda.is_available():
            pytest.skip("cuda is usable here")
        masked_linear(x, w, None, backend="cuda")


@pytest.mark.skipif(STATUS["cpu"] is not None, reason="compiled extension missing")
def test_cpu_backend_rejects_other_dtypes_clearly():
    with pytest.raises(RuntimeError, match="backend 'cpu' supports float32"):
        masked_linear(torch.randn(2, 8, dtype=torch.float64), torch.randn(3, 8, dtype=torch.float64), None,
                      backend="cpu")


@pytest.mark.skipif(STATUS["cpu"] is not None, reason="compiled extension missing")
def test_native_op_checks_arguments():
    x, w = torch.randn(4, 8), torch.randn(5, 8)
    with pytest.raises(RuntimeError, match="row_ptr must have"):
        torch.ops.capkit.masked_linear_forward(x, w, None, None, torch.zeros(3, dtype=torch.int32),
                                               torch.zeros(0, dtype=torch.int32), 16)
    with pytest.raises(RuntimeError, match="block_size must be one of"):
        torch.ops.capkit.masked_linear_forward(x, w, None, None, torch.zeros(2, dtype=torch.int32),
                                               torch.zeros(0, dtype=torch.int32), 20)
    with pytest.raises(RuntimeError, match="mask must have the weight's shape"):
        torch.ops.capkit.masked_linear_forward(x, w, torch.ones(4, 8, dtype=torch.bool), None, None, None, 0)


def test_autocast_computes_in_the_autocast_dtype_like_f_linear():
    torch.manual_seed(0)
    x = torch.randn(5, 24)
    w = torch.randn(7, 24, requires_grad=True)
    b = torch.randn(7, requires_grad=True)
    m = (torch.rand(7, 24) > 0.5).float().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = masked_linear(x, w, m, b, backend="torch")
        ref = torch.nn.functional.linear(x, w * m, b)
    assert y.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), ref.float(), atol=0.1, rtol=0.02)
    y.float().sum().backward()
    assert w.grad.dtype == torch.float32 and m.grad is not None and b.grad is not None
