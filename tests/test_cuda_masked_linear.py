"""GPU tests of the CUDA kernels behind torch.ops.capkit.masked_linear_*.

Every result is compared with a float64 PyTorch reference on random data:
fp32 / fp16 / bf16, no mask / uint8 (0/1) mask / mask in the weight's dtype,
dense weights and block layouts (b = 16 ... 128, partial edge blocks, dead
rows and columns of blocks), token counts from 0 to 4096.  Shapes include
few-token / few-tile cases so the split-reduction paths (second reduction
kernel) run too, and unaligned inputs so the scalar load paths run.
"""
import math

import pytest
import torch


def _skip_reason():
    if not torch.cuda.is_available():
        return "needs a CUDA GPU"
    try:
        import capkit._C  # noqa: F401
    except Exception as exc:  # ImportError, or OSError from a broken build
        return f"capkit._C is not importable ({exc})"
    try:
        name = torch.ops.capkit.masked_linear_forward.default.name()
    except (AttributeError, RuntimeError) as exc:
        return f"torch.ops.capkit.masked_linear_forward is not registered ({exc})"
    if not torch._C._dispatch_has_kernel_for_dispatch_key(name, "CUDA"):
        return "capkit._C was built without its CUDA kernels"
    return None


_SKIP = _skip_reason()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(_SKIP is not None, reason=_SKIP or "")]

DEV = "cuda"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
MASK_KINDS = ["none", "u8", "float"]
BLOCKS = [16, 32, 64, 128]
# (rtol, atol per sqrt(reduction length)).  Inputs are exact in their dtype;
# what remains is fp32 accumulation, W * mask rounded to the dtype (float
# masks), and rounding of the outputs.
TOL = {
    torch.float32: (1e-4, 2e-5),
    torch.float16: (5e-3, 2e-3),
    torch.bfloat16: (2e-2, 1e-2),
}

# (M, N, K): odd sizes exercise edge tiles and the scalar (unvectorised)
# loads; (1, 512, 1000) and (1, 4096, 768) run split-K; (3072, 96, 80) and
# (4096, 128, 64) run grad_weight's split over tokens.
DENSE_SHAPES = [
    (1, 7, 5),
    (7, 127, 769),
    (127, 768, 768),
    (769, 769, 127),
    (1, 512, 1000),
    (1, 4096, 768),
    (3072, 96, 80),
    (4096, 128, 64),
]
LAYOUT_SHAPES = [
    (7, 200, 300),
    (127, 768, 769),
    (769, 130, 256),
    (1, 512, 1000),
    (3072, 96, 80),
]


# ---------------------------------------------------------------------------
# helpers


def _ops():
    return torch.ops.capkit


def randn(*shape, dtype):
    return torch.randn(*shape).to(device=DEV, dtype=dtype)


def make_mask(kind, n, k, dtype):
    if kind == "none":
        return None
    keep = torch.rand(n, k) > 0.3
    if kind == "u8":
        return keep.to(torch.uint8).to(DEV)
    # Exact zeros mixed with non-trivial factors.
    return ((torch.rand(n, k) * 1.5 + 0.25) * keep).to(device=DEV, dtype=dtype)


class Layout:
    """Random live-block grid with its int32 CSR and CSC (on the GPU)."""

    def __init__(self, n, k, b, density=0.5, dead_line=True):
        self.b = b
        nbr, nbc = -(-n // b), -(-k // b)
        live = torch.rand(nbr, nbc) < density
        if dead_line and nbr > 1:
            live[int(torch.randint(nbr, (1,)))] = False
        if dead_line and nbc > 1:
            live[:, int(torch.randint(nbc, (1,)))] = False
        self.live = live
        self.row_ptr, self.col_idx = self._compress(live)
        self.col_ptr, self.row_idx = self._compress(live.t())
        self.elem = live.repeat_interleave(b, 0).repeat_interleave(b, 1)[:n, :k].to(DEV)

    @staticmethod
    def _compress(grid):
        ptr = torch.zeros(grid.shape[0] + 1, dtype=torch.int64)
        ptr[1:] = grid.sum(1).cumsum(0)
        idx = grid.nonzero()[:, 1]  # row-major order: ascending within a row
        return ptr.to(torch.int32).to(DEV), idx.to(torch.int32).to(DEV)


def eff_mask(mask, layout, n, k):
    """float64 effective mask: 0/1 for uint8 masks, the factor for float masks."""
    m = torch.ones(n, k, dtype=torch.float64, device=DEV)
    if mask is not None:
        m = (mask != 0).double() if mask.dtype in (torch.uint8, torch.bool) else mask.double()
    if layout is not None:
        m = m * layout.elem.double()
    return m


def ref_forward(x, w, mask, bias, layout):
    n, k = w.shape
    y = x.double() @ (w.double() * eff_mask(mask, layout, n, k)).t()
    return y if bias is None else y + bias.double()


def ref_grad_input(g, w, mask, layout):
    n, k = w.shape
    return g.double() @ (w.double() * eff_mask(mask, layout, n, k))


def ref_grad_weight(g, x, w, mask, layout):
    n, k = w.shape
    G = g.double().t() @ x.double()
    return G * eff_mask(mask, layout, n, k), G * w.double()


def check(actual, expected, dtype, red, what):
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.device.type == torch.device(DEV).type, f"{what}: result on {actual.device}"
    rtol, a = TOL[dtype]
    torch.testing.assert_close(
        actual.double(), expected, rtol=rtol, atol=a * math.sqrt(max(red, 1)),
        msg=lambda m: f"{what} ({dtype}, reduction {red}): {m}",
    )


def forward(x, w, mask=None, bias=None, layout=None):
    rp, ci, b = (layout.row_ptr, layout.col_idx, layout.b) if layout else (None, None, 0)
    return _ops().masked_linear_forward(x, w, mask, bias, rp, ci, b)


def grad_input(g, w, mask=None, layout=None):
    cp, ri, b = (layout.col_ptr, layout.row_idx, layout.b) if layout else (None, None, 0)
    return _ops().masked_linear_grad_input(g, w, mask, cp, ri, b)


def grad_weight(g, x, w, mask=None, layout=None, need_w=True, need_m=False):
    rp, ci, b = (layout.row_ptr, layout.col_idx, layout.b) if layout else (None, None, 0)
    return _ops().masked_linear_grad_weight(g, x, w, mask, rp, ci, b, need_w, need_m)


def grad_needs(mask_kind):
    needs = [(True, False)]
    if mask_kind == "float":
        needs += [(True, True), (False, True)]
    return needs


def run_all(M, N, K, dtype, mask_kind, layout=None, with_bias=True):
    """Checks all three ops (and every applicable gradient request) on one problem."""
    x, w, g = randn(M, K, dtype=dtype), randn(N, K, dtype=dtype), randn(M, N, dtype=dtype)
    mask = make_mask(mask_kind, N, K, dtype)
    bias = randn(N, dtype=dtype) if with_bias else None

    y = forward(x, w, mask, bias, layout)
    assert y.dtype == dtype
    check(y, ref_forward(x, w, mask, bias, layout), dtype, K, "forward")

    dx = grad_input(g, w, mask, layout)
    assert dx.dtype == dtype
    check(dx, ref_grad_input(g, w, mask, layout), dtype, N, "grad_input")

    ref_dw, ref_dm = ref_grad_weight(g, x, w, mask, layout)
    for need_w, need_m in grad_needs(mask_kind):
        dw, dm = grad_weight(g, x, w, mask, layout, need_w, need_m)
        tag = f"grad_weight(need_weight_grad={need_w}, need_mask_grad={need_m})"
        if need_w:
            assert dw.dtype == dtype
            check(dw, ref_dw, dtype, M, tag + " dW")
            if layout is not None:
                dead = ~layout.elem
                assert (dw[dead] == 0).all(), f"{tag}: dW not zero on dead blocks"
        else:
            assert dw.shape == (0,), f"{tag}: dW should be empty, got {tuple(dw.shape)}"
        if need_m:
            assert dm.dtype == mask.dtype
            check(dm, ref_dm, dtype, M, tag + " dM")
        else:
            assert dm.shape == (0,), f"{tag}: dM should be empty, got {tuple(dm.shape)}"


# ---------------------------------------------------------------------------
# dense weights


@pytest.mark.parametrize("shape", DENSE_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("mask_kind", MASK_KINDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dense(shape, mask_kind, dtype):
    M, N, K = shape
    run_all(M, N, K, dtype, mask_kind, with_bias=(M + N) % 2 == 0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_large_tokens(dtype):
    run_all(4096, 768, 768, dtype, "float")


# ---------------------------------------------------------------------------
# block layouts


@pytest.mark.parametrize("shape", LAYOUT_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("mask_kind", MASK_KINDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_layout(shape, block, mask_kind, dtype):
    M, N, K = shape
    run_all(M, N, K, dtype, mask_kind, layout=Layout(N, K, block, density=0.5),
            with_bias=block % 32 == 0)


@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("density", [0.0, 1.0])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_layout_empty_and_full(block, density, dtype):
    # density 0: no live block at all (empty col_idx / row_idx): y = bias,
    # dx = 0, dW = 0.  density 1: same result as without a layout.
    layout = Layout(300, 200, block, density=density, dead_line=False)
    run_all(65, 300, 200, dtype, "float", layout=layout)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_tokens_3072_layout(dtype):
    run_all(3072, 768, 768, dtype, "u8", layout=Layout(768, 768, 64, density=0.3))


# ---------------------------------------------------------------------------
# special inputs


@pytest.mark.parametrize("layout_block", [None, 32])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_no_tokens(layout_block, dtype):
    N, K = 96, 80
    layout = Layout(N, K, layout_block) if layout_block else None
    x, w, g = randn(0, K, dtype=dtype), randn(N, K, dtype=dtype), randn(0, N, dtype=dtype)
    mask = make_mask("float", N, K, dtype)
    bias = randn(N, dtype=dtype)
    y = forward(x, w, mask, bias, layout)
    assert y.shape == (0, N) and y.dtype == dtype
    dx = grad_input(g, w, mask, layout)
    assert dx.shape == (0, K) and dx.dtype == dtype
    dw, dm = grad_weight(g, x, w, mask, layout, True, True)
    assert dw.shape == (N, K) and (dw == 0).all()
    assert dm.shape == (N, K) and (dm == 0).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_unaligned_and_strided_inputs(dtype):
    # Contiguous tensors whose data starts one element into their storage
    # (not 16-byte aligned: scalar load path), and a transposed weight
    # (made contiguous by the op).
    M, N, K = 33, 72, 136

    def shifted(*shape):
        flat = randn(math.prod(shape) + 1, dtype=dtype)
        return flat[1:].view(*shape)

    x, g = shifted(M, K), shifted(M, N)
    w = randn(K, N, dtype=dtype).t()
    mask = shifted(N, K)
    layout = Layout(N, K, 16)
    y = forward(x, w, mask, None, layout)
    check(y, ref_forward(x, w, mask, None, layout), dtype, K, "forward")
    dx = grad_input(g, w, mask, layout)
    check(dx, ref_grad_input(g, w, mask, layout), dtype, N, "grad_input")
    dw, dm = grad_weight(g, x, w, mask, layout, True, True)
    ref_dw, ref_dm = ref_grad_weight(g, x, w, mask, layout)
    check(dw, ref_dw, dtype, M, "dW")
    check(dm, ref_dm, dtype, M, "dM")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bool_mask(dtype):
    M, N, K = 40, 64, 96
    x, w = randn(M, K, dtype=dtype), randn(N, K, dtype=dtype)
    mask = torch.rand(N, K, device=DEV) > 0.5
    check(forward(x, w, mask), ref_forward(x, w, mask, None, None), dtype, K, "forward")


def test_pruned_entries_are_exact_zeros():
    # A 0/1 mask selects and dead blocks are skipped, so non-finite weights
    # there do not leak into the outputs.
    M, N, K, b = 16, 64, 64, 32
    x = randn(M, K, dtype=torch.float16)
    g = randn(M, N, dtype=torch.float16)
    w = randn(N, K, dtype=torch.float16)
    mask = torch.ones(N, K, dtype=torch.uint8, device=DEV)
    w[3, 5] = float("inf")
    mask[3, 5] = 0
    layout = Layout(N, K, b, density=1.0, dead_line=False)
    layout.live[1, 1] = False
    layout.row_ptr, layout.col_idx = Layout._compress(layout.live)
    layout.col_ptr, layout.row_idx = Layout._compress(layout.live.t())
    layout.elem = layout.live.repeat_interleave(b, 0).repeat_interleave(b, 1)[:N, :K].to(DEV)
    w[40, 40] = float("nan")  # inside dead block (1, 1)
    assert torch.isfinite(forward(x, w, mask, None, layout)).all()
    assert torch.isfinite(grad_input(g, w, mask, layout)).all()


def test_errors():
    x, w = randn(4, 32, dtype=torch.float16), randn(48, 32, dtype=torch.float16)
    layout = Layout(48, 32, 16)
    with pytest.raises(RuntimeError, match="block_size"):
        _ops().masked_linear_forward(x, w, None, None, layout.row_ptr, layout.col_idx, 24)
    with pytest.raises(RuntimeError, match="row_ptr"):
        _ops().masked_linear_forward(x, w, None, None, layout.row_ptr[:-1], layout.col_idx, 16)
    with pytest.raises(RuntimeError, match="mask"):
        forward(x, w, torch.ones(48, 32, device=DEV, dtype=torch.float32))
    with pytest.raises(RuntimeError, match="dtype"):
        forward(x, w.float())
    with pytest.raises(RuntimeError, match="need_mask_grad"):
        grad_weight(randn(4, 48, dtype=torch.float16), x, w,
                    torch.ones(48, 32, device=DEV, dtype=torch.uint8), None, True, True)
