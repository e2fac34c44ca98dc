"""Tests for the Triton masked / block-sparse linear kernels.

Without a CUDA device the kernels run under the Triton interpreter, so sizes
are kept small enough for a CPU. Every output is compared against a float64
PyTorch reference, and every kernel call runs with float allocations
poisoned with NaN so that unwritten output elements are caught.
"""

import contextlib
import math
import os
import zlib

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton")

from capkit.kernels import masked_linear as tk  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

MASK_KINDS = ["none", "bool", "float"]
DTYPES = [torch.float32, torch.float16]


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------

def _seed(*parts):
    # Stable across processes (str hashes are randomised per interpreter).
    return zlib.crc32(repr(parts).encode()) % 100_000


def _gen(seed):
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def _randn(shape, dtype, g):
    return torch.randn(shape, generator=g, dtype=torch.float32).to(device=DEVICE, dtype=dtype)


def make_mask(kind, n, k, dtype, g):
    if kind == "none":
        return None
    if kind == "bool":
        return (torch.rand((n, k), generator=g) > 0.5).to(torch.uint8).to(DEVICE)
    # Mix of exact zeros and non-trivial factors.
    keep = torch.rand((n, k), generator=g) > 0.3
    fac = torch.rand((n, k), generator=g) * 1.5 + 0.25
    return (fac * keep).to(device=DEVICE, dtype=dtype)


def make_layout(n, k, b, g, dead_row=True, dead_col=True, density=0.5):
    """Random block grid with CSR and CSC int32 views.

    Returns (grid[bool nbr x nbc], row_ptr, col_idx, col_ptr, row_idx).
    """
    nbr, nbc = -(-n // b), -(-k // b)
    grid = torch.rand((nbr, nbc), generator=g) < density
    if dead_row and nbr > 1:
        grid[int(torch.randint(nbr, (1,), generator=g))] = False
    if dead_col and nbc > 1:
        grid[:, int(torch.randint(nbc, (1,), generator=g))] = False
    row_ptr = torch.zeros(nbr + 1, dtype=torch.int32)
    row_ptr[1:] = grid.sum(1).cumsum(0)
    col_idx = grid.nonzero()[:, 1].to(torch.int32)  # row-major order: ascending per row
    col_ptr = torch.zeros(nbc + 1, dtype=torch.int32)
    col_ptr[1:] = grid.sum(0).cumsum(0)
    row_idx = grid.t().nonzero()[:, 1].to(torch.int32)
    to = lambda t: t.contiguous().to(DEVICE)
    return grid, to(row_ptr), to(col_idx), to(col_ptr), to(row_idx)


def expand_layout(grid, b, n, k):
    return grid.repeat_interleave(b, 0).repeat_interleave(b, 1)[:n, :k].to(DEVICE)


def effective_mask(mask, layout_dense, n, k):
    m = torch.ones((n, k), dtype=torch.float64, device=DEVICE)
    if mask is not None:
        m = m * mask.double()
    if layout_dense is not None:
        m = m * layout_dense.double()
    return m


def reference(x, w, mask, bias, g_out, layout_dense):
    """float64 reference: y, dx, G, dW, dM."""
    n, k = w.shape
    m_eff = effective_mask(mask, layout_dense, n, k)
    w_eff = w.double() * m_eff
    y = x.double() @ w_eff.t()
    if bias is not None:
        y = y + bias.double()
    dx = g_out.double() @ w_eff
    G = g_out.double().t() @ x.double()
    dW = G * m_eff
    dM = G * w.double()
    return y, dx, dW, dM


def tol(dtype, red):
    # Error grows with the reduction length; fp16 also rounds the output.
    s = math.sqrt(max(red, 1))
    if dtype == torch.float32:
        return dict(rtol=1e-4, atol=2e-5 * s)
    if dtype == torch.float16:
        return dict(rtol=1e-2, atol=2e-3 * s)
    return dict(rtol=4e-2, atol=1.6e-2 * s)  # bfloat16


def check(out, ref, dtype, red, name):
    assert out is not None, name
    assert out.shape == ref.shape, (name, out.shape, ref.shape)
    assert not torch.isnan(out).any(), f"{name}: NaN (unwritten output?)"
    torch.testing.assert_close(out.double(), ref, msg=lambda m: f"{name}: {m}", **tol(dtype, red))


@contextlib.contextmanager
def poisoned_alloc():
    """Fill fresh floating-point allocations with NaN."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def _poison(t):
        if t.is_floating_point() and t.numel():
            t.fill_(float("nan"))
        return t

    def empty(*a, **k):
        return _poison(real_empty(*a, **k))

    def empty_like(*a, **k):
        return _poison(real_empty_like(*a, **k))

    torch.empty, torch.empty_like = empty, empty_like
    try:
        yield
    finally:
        torch.empty, torch.empty_like = real_empty, real_empty_like


def call(fn, *args):
    with poisoned_alloc():
        return fn(*args)


def make_problem(M, N, K, dtype, mask_kind, seed, b=None, with_bias=True, **layout_kw):
    g = _gen(seed)
    x = _randn((M, K), dtype, g)
    w = _randn((N, K), dtype, g)
    g_out = _randn((M, N), dtype, g)
    bias = _randn((N,), dtype, g) if with_bias else None
    mask = make_mask(mask_kind, N, K, dtype, g)
    if b is None:
        lay = dict(grid=None, row_ptr=None, col_idx=None, col_ptr=None, row_idx=None, dense=None)
    else:
        grid, rp, ci, cp, ri = make_layout(N, K, b, g, **layout_kw)
        lay = dict(grid=grid, row_ptr=rp, col_idx=ci, col_ptr=cp, row_idx=ri,
                   dense=expand_layout(grid, b, N, K))
    return x, w, g_out, bias, mask, lay


def run_all(M, N, K, dtype, mask_kind, seed, b=None, with_bias=True,
            need_w=True, need_m=None, **layout_kw):
    x, w, g_out, bias, mask, lay = make_problem(M, N, K, dtype, mask_kind, seed, b, with_bias, **layout_kw)
    if need_m is None:
        need_m = mask_kind == "float"
    y_ref, dx_ref, dW_ref, dM_ref = reference(x, w, mask, bias, g_out, lay["dense"])
    bs = b if b is not None else 32

    y = call(tk.masked_linear_forward, x, w, mask, bias, lay["row_ptr"], lay["col_idx"], bs)
    check(y, y_ref, dtype, K, "y")
    assert y.dtype == dtype

    dx = call(tk.masked_linear_grad_input, g_out, w, mask, lay["col_ptr"], lay["row_idx"], bs)
    check(dx, dx_ref, dtype, N, "dx")
    assert dx.dtype == dtype

    dW, dM = call(tk.masked_linear_grad_weight, g_out, x, w, mask, lay["row_ptr"], lay["col_idx"],
                  bs, need_w, need_m)
    if need_w:
        check(dW, dW_ref, dtype, M, "dW")
        assert dW.dtype == w.dtype
        if lay["dense"] is not None:
            assert (dW[~lay["dense"]] == 0).all(), "dead blocks of dW must be zero"
    else:
        assert dW is None
    if need_m:
        check(dM, dM_ref, dtype, M, "dM")
        assert dM.dtype == mask.dtype
    else:
        assert dM is None


# ---------------------------------------------------------------------------
# dense (no block layout)
# ---------------------------------------------------------------------------

DENSE_SHAPES = [(1, 7, 127), (7, 127, 769), (127, 64, 96)]


@pytest.mark.parametrize("shape", DENSE_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mask_kind", MASK_KINDS)
def test_dense(shape, dtype, mask_kind):
    M, N, K = shape
    seed = _seed(shape, str(dtype), mask_kind)
    run_all(M, N, K, dtype, mask_kind, seed, with_bias=(M != 7))


@pytest.mark.parametrize("need_w,need_m", [(True, True), (True, False), (False, True), (False, False)])
def test_grad_weight_flags_dense(need_w, need_m):
    M, N, K = 33, 50, 70
    x, w, g_out, _, mask, _ = make_problem(M, N, K, torch.float32, "float", 11)
    _, _, dW_ref, dM_ref = reference(x, w, mask, None, g_out, None)
    dW, dM = call(tk.masked_linear_grad_weight, g_out, x, w, mask, None, None, 32, need_w, need_m)
    if need_w:
        check(dW, dW_ref, torch.float32, M, "dW")
    else:
        assert dW is None
    if need_m:
        check(dM, dM_ref, torch.float32, M, "dM")
    else:
        assert dM is None


# ---------------------------------------------------------------------------
# block-sparse layouts
# ---------------------------------------------------------------------------

SPARSE_CASES = [
    # (M, N, K, block)
    (1, 7, 127, 16),
    (7, 127, 300, 16),
    (127, 64, 96, 16),
    (7, 127, 769, 32),
    (40, 100, 130, 32),
    (127, 64, 96, 32),
    (33, 200, 300, 64),
    (127, 64, 96, 64),
    (20, 300, 260, 128),
]


# Every case runs with every mask kind; the dtype alternates so that each
# block size sees both fp32 and fp16 without doubling the run time.
SPARSE_PARAMS = [
    pytest.param(case, mk, DTYPES[(i + j) % 2],
                 id="M{}_N{}_K{}_b{}-".format(*case) + mk + "-" + str(DTYPES[(i + j) % 2])[6:])
    for i, case in enumerate(SPARSE_CASES)
    for j, mk in enumerate(MASK_KINDS)
]


@pytest.mark.parametrize("case,mask_kind,dtype", SPARSE_PARAMS)
def test_block_sparse(case, mask_kind, dtype):
    M, N, K, b = case
    seed = _seed(case, str(dtype), mask_kind)
    run_all(M, N, K, dtype, mask_kind, seed, b=b, with_bias=(b != 64))


@pytest.mark.skipif(not INTERPRET, reason="tile sizes are only fixed under the interpreter")
@pytest.mark.parametrize("tiles,b,shape", [
    ((32, 16, 32), 64, (37, 150, 270)),
    ((16, 32, 16), 128, (37, 150, 270)),
    ((16, 16, 16), 32, (21, 70, 100)),
], ids=["64-sub16x32", "128-sub32x16", "32-sub16x16"])
@pytest.mark.parametrize("mask_kind", ["bool", "float"])
def test_block_sparse_sub_tiles(tiles, b, shape, mask_kind, monkeypatch):
    """Tiles smaller than the block: each live block is walked in sub-tiles."""
    for name, v in zip(("BLOCK_M", "BLOCK_N", "BLOCK_K"), tiles):
        monkeypatch.setitem(tk._INTERPRET_META, name, v)
    run_all(*shape, torch.float32, mask_kind, _seed(tiles, b, mask_kind), b=b)


@pytest.mark.parametrize("mask_kind", ["none", "bool", "float"])
@pytest.mark.parametrize("need_w,need_m", [(True, True), (True, False), (False, True)])
def test_grad_weight_flags_sparse(mask_kind, need_w, need_m):
    if need_m and mask_kind != "float":
        pytest.skip("mask gradient only exists for float masks")
    run_all(45, 90, 100, torch.float32, mask_kind, 23, b=32, need_w=need_w, need_m=need_m)


@pytest.mark.parametrize("b", [16, 32, 64])
def test_dead_blocks_are_skipped(b):
    """Data only reachable through dead blocks is never read.

    NaN is planted in dead weight blocks, in the x columns of a fully dead
    block column and in the grad_out columns of a fully dead block row. A
    kernel that loads and zero-multiplies dead blocks would propagate NaN.
    """
    M, N, K = 9, 150, 170
    x, w, g_out, bias, mask, lay = make_problem(M, N, K, torch.float32, "bool", 100 + b, b)
    dead = ~lay["dense"]
    dead_rows = (~lay["grid"]).all(1).nonzero().flatten().tolist()
    dead_cols = (~lay["grid"]).all(0).nonzero().flatten().tolist()
    assert dead_rows and dead_cols
    y_ref, dx_ref, dW_ref, _ = reference(x, w, mask, bias, g_out, lay["dense"])
    w_nan, x_nan, g_nan = w.clone(), x.clone(), g_out.clone()
    w_nan[dead] = float("nan")
    for c in dead_cols:
        x_nan[:, c * b:(c + 1) * b] = float("nan")
    for r in dead_rows:
        g_nan[:, r * b:(r + 1) * b] = float("nan")
    y = call(tk.masked_linear_forward, x_nan, w_nan, mask, bias, lay["row_ptr"], lay["col_idx"], b)
    check(y, y_ref, torch.float32, K, "y")
    dx = call(tk.masked_linear_grad_input, g_nan, w_nan, mask, lay["col_ptr"], lay["row_idx"], b)
    check(dx, dx_ref, torch.float32, N, "dx")
    dW, dM = call(tk.masked_linear_grad_weight, g_nan, x_nan, w_nan, mask, lay["row_ptr"], lay["col_idx"],
                  b, True, False)
    check(dW, dW_ref, torch.float32, M, "dW")
    assert dM is None


def test_fully_dead_row_and_column():
    """A dead block row gives y == bias there; a dead block column gives dx == 0."""
    M, N, K, b = 17, 96, 112, 32
    x, w, g_out, bias, mask, lay = make_problem(M, N, K, torch.float32, "float", 5, b)
    grid = lay["grid"]
    dead_rows = (~grid).all(1).nonzero().flatten().tolist()
    dead_cols = (~grid).all(0).nonzero().flatten().tolist()
    assert dead_rows and dead_cols
    y = call(tk.masked_linear_forward, x, w, mask, bias, lay["row_ptr"], lay["col_idx"], b)
    dx = call(tk.masked_linear_grad_input, g_out, w, mask, lay["col_ptr"], lay["row_idx"], b)
    dW, dM = call(tk.masked_linear_grad_weight, g_out, x, w, mask, lay["row_ptr"], lay["col_idx"],
                  b, True, True)
    _, _, _, dM_ref = reference(x, w, mask, bias, g_out, lay["dense"])
    for r in dead_rows:
        rows = slice(r * b, min((r + 1) * b, N))
        torch.testing.assert_close(y[:, rows], bias[rows].expand(M, -1))
        assert (dW[rows] == 0).all()
    for c in dead_cols:
        cols = slice(c * b, min((c + 1) * b, K))
        assert (dx[:, cols] == 0).all()
        assert (dW[:, cols] == 0).all()
    # dM is dense: nonzero inside dead blocks.
    check(dM, dM_ref, torch.float32, M, "dM")
    assert dM[~lay["dense"]].abs().sum() > 0


def test_all_blocks_dead():
    M, N, K, b = 5, 40, 50, 16
    x, w, g_out, bias, mask, _ = make_problem(M, N, K, torch.float32, "none", 9)
    grid, rp, ci, cp, ri = make_layout(N, K, b, _gen(1), density=0.0)
    assert ci.numel() == 0
    y = call(tk.masked_linear_forward, x, w, mask, bias, rp, ci, b)
    torch.testing.assert_close(y, bias.expand(M, -1))
    dx = call(tk.masked_linear_grad_input, g_out, w, mask, cp, ri, b)
    assert (dx == 0).all()
    dW, _ = call(tk.masked_linear_grad_weight, g_out, x, w, mask, rp, ci, b, True, False)
    assert (dW == 0).all()


def test_all_blocks_live_matches_dense():
    M, N, K, b = 21, 70, 90, 32
    x, w, g_out, bias, mask, _ = make_problem(M, N, K, torch.float32, "float", 77)
    _, rp, ci, cp, ri = make_layout(N, K, b, _gen(2), dead_row=False, dead_col=False, density=1.0)
    y_s = call(tk.masked_linear_forward, x, w, mask, bias, rp, ci, b)
    y_d = call(tk.masked_linear_forward, x, w, mask, bias, None, None, b)
    torch.testing.assert_close(y_s, y_d, rtol=1e-5, atol=1e-5)
    dx_s = call(tk.masked_linear_grad_input, g_out, w, mask, cp, ri, b)
    dx_d = call(tk.masked_linear_grad_input, g_out, w, mask, None, None, b)
    torch.testing.assert_close(dx_s, dx_d, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------
# larger shape, edge cases, dtypes
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("b", [None, 32])
def test_bert_like(b):
    run_all(64, 768, 192, torch.float16, "float", 2024, b=b)


def test_mask_as_bool_tensor():
    """A torch.bool mask is read as bytes, same as uint8."""
    M, N, K = 10, 40, 60
    x, w, g_out, bias, mask_u8, _ = make_problem(M, N, K, torch.float32, "bool", 3)
    mask_b = mask_u8.bool()
    y_u8 = call(tk.masked_linear_forward, x, w, mask_u8, bias, None, None, 32)
    y_b = call(tk.masked_linear_forward, x, w, mask_b, bias, None, None, 32)
    torch.testing.assert_close(y_u8, y_b)


@pytest.mark.parametrize("b", [None, 16])
@pytest.mark.parametrize("mask_kind", ["none", "float"])
def test_m_zero(b, mask_kind):
    N, K = 40, 50
    g = _gen(4)
    x = _randn((0, K), torch.float32, g)
    w = _randn((N, K), torch.float32, g)
    g_out = _randn((0, N), torch.float32, g)
    bias = _randn((N,), torch.float32, g)
    mask = make_mask(mask_kind, N, K, torch.float32, g)
    if b is None:
        rp = ci = cp = ri = None
    else:
        _, rp, ci, cp, ri = make_layout(N, K, b, g)
    bs = b or 32
    y = call(tk.masked_linear_forward, x, w, mask, bias, rp, ci, bs)
    assert y.shape == (0, N) and y.dtype == x.dtype
    dx = call(tk.masked_linear_grad_input, g_out, w, mask, cp, ri, bs)
    assert dx.shape == (0, K)
    need_m = mask is not None
    dW, dM = call(tk.masked_linear_grad_weight, g_out, x, w, mask, rp, ci, bs, True, need_m)
    assert dW.shape == (N, K) and (dW == 0).all()
    if need_m:
        assert dM.shape == (N, K) and (dM == 0).all()
    else:
        assert dM is None


@pytest.mark.skipif(INTERPRET or not torch.cuda.is_available(), reason="bf16 needs a GPU")
@pytest.mark.parametrize("b", [None, 64])
@pytest.mark.parametrize("mask_kind", MASK_KINDS)
def test_bf16_gpu(b, mask_kind):
    run_all(300, 768, 1024, torch.bfloat16, mask_kind, 31, b=b)


@pytest.mark.skipif(INTERPRET or not torch.cuda.is_available(), reason="large shapes need a GPU")
@pytest.mark.parametrize("b", [None, 32, 128])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_large_gpu(b, dtype):
    run_all(4096, 3072, 768, dtype, "bool", 41, b=b)
    run_all(769, 768, 3072, dtype, "float", 42, b=b)


# ---------------------------------------------------------------------------
# autotune pruning (host code: runs the same everywhere, the autotuner itself only on GPUs)
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("kernel", ["fwd", "dx", "gw"])
@pytest.mark.parametrize("mask_dtype", [None, torch.uint8, torch.float32])
@pytest.mark.parametrize("elem_bytes", [2, 4])
def test_autotune_prune_keeps_shared_memory_in_budget(kernel, mask_dtype, elem_bytes):
    from capkit.kernels._common import SMEM_BUDGET

    configs = tk._GW_CONFIGS if kernel == "gw" else tk._MM_CONFIGS
    mask = None if mask_dtype is None else torch.empty(4, dtype=mask_dtype)
    kind = tk._mask_kind(mask)
    args = {"BLOCK_SIZE": 0, "HAS_LAYOUT": False, "ELEM_BYTES": elem_bytes, "MASK_KIND": kind,
            "mask_ptr": mask if mask is not None else torch.empty(4)}
    kept = tk._make_prune(kernel, ("BLOCK_N", "BLOCK_K"))(configs, args)
    assert kept and all(c.num_stages >= 2 for c in kept)
    mask_bytes = 0 if (mask is None or kernel == "gw") else mask.element_size()
    for c in kept:  # the mask tile that forward and dx stream beside the weight tile counts too
        m = c.kwargs
        need = c.num_stages * (tk._operand_elems(kernel, m) * elem_bytes + m["BLOCK_N"] * m["BLOCK_K"] * mask_bytes)
        assert need <= SMEM_BUDGET, (m, c.num_stages, need)
    if kernel == "fwd" and elem_bytes == 4 and mask_dtype == torch.float32:
        plain = tk._make_prune(kernel, ("BLOCK_N", "BLOCK_K"))(configs, {**args, "MASK_KIND": 0})
        assert sum(c.num_stages for c in kept) < sum(c.num_stages for c in plain)  # the mask costs stages
