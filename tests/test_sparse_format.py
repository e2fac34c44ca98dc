"""The unstructured-sparse CPU inference kernel (CSR by output row) against the float64 reference:
odd sizes, empty/full rows, an all-zero matrix, NaN in pruned weights, poisoned outputs, and the
routing of masked_linear / MaskedLinear / capkit.load to it."""
import math
from unittest import mock

import pytest
import torch

from capkit.ops import backend_status, masked_linear
from capkit.ops import sparse_format
from capkit.ops.sparse_format import csr_applies, csr_linear, pack_csr, packed_for_mask

pytestmark = pytest.mark.skipif(backend_status(torch.device("cpu"))["cpu"] is not None,
                                reason="capkit._C (the C++ CPU kernels) is not built")

SHAPES = [(1, 7, 127), (7, 127, 33), (127, 33, 64), (64, 9, 769), (130, 100, 50), (65, 40, 8),
          (577, 45, 300), (1000, 3, 129)]  # the last two: the many-token schedule, several panels


def tol(k):
    return 16 * 2e-6 * math.sqrt(k) + 2e-6


def reference(x, w, m, b):
    wm = torch.where(m, w.double(), torch.zeros((), dtype=torch.float64))
    return torch.nn.functional.linear(x.double(), wm, None if b is None else b.double())


def call_kernel(x, packed, bias):
    """The op allocates its output: fill freed memory of that size with NaN first, so an element
    the kernel failed to write would show."""
    junk = torch.full((x.shape[0] * packed.shape[0] + 64,), float("nan"))
    del junk
    return csr_linear(x, packed, bias)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("density", [0.05, 0.3, 1.0])
@pytest.mark.parametrize("with_bias", [True, False])
def test_matches_reference(shape, density, with_bias):
    m_, n, k = shape
    x, w = torch.randn(m_, k), torch.randn(n, k)
    mask = torch.rand(n, k) < density
    b = torch.randn(n) if with_bias else None
    y = call_kernel(x, pack_csr(w, mask), b)
    assert y.shape == (m_, n) and y.dtype == torch.float32
    torch.testing.assert_close(y.double(), reference(x, w, mask, b), atol=tol(k), rtol=0)


def test_empty_full_rows_all_zero_and_nan_in_pruned_entries():
    n, k, m_ = 37, 75, 70
    w = torch.randn(n, k)
    mask = torch.rand(n, k) < 0.2
    mask[0] = False          # empty rows (first, middle, last)
    mask[17] = False
    mask[-1] = False
    mask[5] = True           # full rows
    mask[30] = True
    w[~mask] = float("nan")  # pruned entries must never be read
    x, b = torch.randn(m_, k), torch.randn(n)
    y = call_kernel(x, pack_csr(w, mask), b)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y.double(), reference(x, w, mask, b), atol=tol(k), rtol=0)
    torch.testing.assert_close(y[:, 0], b[0].expand(m_), atol=0, rtol=0)  # an empty row is its bias

    zero = torch.zeros(n, k, dtype=torch.bool)
    packed = pack_csr(w, zero)
    assert packed.nnz == 0
    y0 = call_kernel(x, packed, b)
    torch.testing.assert_close(y0, b.expand(m_, n), atol=0, rtol=0)
    torch.testing.assert_close(call_kernel(x, packed, None), torch.zeros(m_, n), atol=0, rtol=0)


@pytest.mark.parametrize("threads", [1, 3, 5])
def test_tile_widths_and_schedules_over_thread_counts(threads):
    """The kernel picks 64-, 32- or 16-token tiles and a tile-per-thread or a shared-buffer schedule
    from the token and thread counts: every combination these sizes reach must agree with the
    reference (torch.set_num_threads sets the OpenMP team the kernel sees)."""
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        w, mask = torch.randn(70, 96), torch.rand(70, 96) < 0.2
        b = torch.randn(70)
        packed = pack_csr(w, mask)
        for m_ in (1, 5, 16, 17, 33, 48, 80, 96, 130, 200, 320):
            x = torch.randn(m_, 96)
            torch.testing.assert_close(call_kernel(x, packed, b).double(), reference(x, w, mask, b),
                                       atol=tol(96), rtol=0)
    finally:
        torch.set_num_threads(before)


def test_every_output_is_written_and_leading_dims_kept():
    x = torch.randn(3, 43, 50)
    w, mask = torch.randn(29, 50), torch.rand(29, 50) < 0.15
    for _ in range(3):  # reuse of the kernel's scratch across calls of other sizes
        y = csr_linear(x, pack_csr(w, mask), None)
        assert y.shape == (*x.shape[:-1], 29) and torch.isfinite(y).all()
        torch.testing.assert_close(y.double(), reference(x.reshape(-1, 50), w, mask, None).view(*x.shape[:-1], 29),
                                   atol=tol(50), rtol=0)
        x = torch.randn(2, 200, 50)


@pytest.mark.parametrize("panel", [0, 1, 8, 13, 128])
def test_pack_round_trip_density_and_panels(panel):
    w, mask = torch.randn(13, 50), torch.rand(13, 50) < 0.4
    p = pack_csr(w, mask, panel=panel)
    assert p.ptr.dtype == p.col_idx.dtype == torch.int32
    assert p.density == pytest.approx(mask.float().mean().item())
    torch.testing.assert_close(p.to_dense(), torch.where(mask, w, torch.zeros(())))
    x = torch.randn(70, 50)
    torch.testing.assert_close(csr_linear(x, p).double(), reference(x, w, mask, None), atol=tol(50), rtol=0)


def test_native_op_checks_arguments():
    x, w, mask = torch.randn(4, 10), torch.randn(6, 10), torch.rand(6, 10) < 0.5
    p = pack_csr(w, mask)
    op = torch.ops.capkit.csr_linear_forward
    with pytest.raises(RuntimeError, match="entries"):
        op(torch.randn(4, 9), p.ptr, p.col_idx, p.values, None, 6, 4)  # 3 panels of 4 for 9 columns
    with pytest.raises(RuntimeError, match="int32"):
        op(x, p.ptr.long(), p.col_idx, p.values, None, 6, p.panel)
    with pytest.raises(RuntimeError, match="same length"):
        op(x, p.ptr, p.col_idx, p.values[:-1], None, 6, p.panel)
    with pytest.raises(RuntimeError, match="bias"):
        op(x, p.ptr, p.col_idx, p.values, torch.randn(5), 6, p.panel)


@pytest.fixture
def csr_threshold():
    with mock.patch.object(sparse_format, "csr_max_density", lambda dtype=torch.float32: 0.3):
        yield


def test_masked_linear_routes_sparse_bool_inference_to_csr(csr_threshold):
    x, w, b = torch.randn(2, 9, 40), torch.randn(31, 40), torch.randn(31)
    mask = torch.rand(31, 40) < 0.1
    w[~mask] = float("nan")
    assert csr_applies(x, w, mask, b, "cpu") and csr_applies(x, w, mask, b, "auto")
    assert not csr_applies(x, w, mask, b, "torch")
    assert not csr_applies(x, w, torch.rand(31, 40) < 0.9, b, "cpu")  # too dense
    assert not csr_applies(x, w.requires_grad_(), mask, b, "cpu")  # training keeps the dense kernels
    w = w.detach()
    ref = reference(x.reshape(-1, 40), w, mask, b).view(2, 9, 31)
    with torch.no_grad(), mock.patch.object(sparse_format, "pack_csr", wraps=pack_csr) as spy:
        for backend in ("cpu", "auto"):
            y = masked_linear(x, w, mask, b, backend=backend)
            torch.testing.assert_close(y.double(), ref, atol=tol(40), rtol=0)
        assert spy.call_count == 1  # the format is built once and cached
        w.mul_(2.0)  # an in-place write to the weight rebuilds it
        y = masked_linear(x, w, mask, b, backend="cpu")
        assert spy.call_count == 2
    torch.testing.assert_close(y.double(), reference(x.reshape(-1, 40), w, mask, b).view(2, 9, 31),
                               atol=2 * tol(40), rtol=0)


def test_masked_linear_module_uses_packed_weight(csr_threshold):
    from capkit.nn import MaskedLinear

    lin = MaskedLinear(48, 20)
    mask = torch.rand(20, 48) < 0.1
    lin.set_mask(mask)
    x = torch.randn(5, 48)
    with torch.no_grad():
        y = lin(x)
        p1 = lin._csr
        y2 = lin(x)
        assert lin._csr is p1 is not None  # not rebuilt per call
    torch.testing.assert_close(y, y2)
    torch.testing.assert_close(y.double(), reference(x, lin.weight.detach(), mask, lin.bias.detach()),
                               atol=tol(48), rtol=0)
    with torch.no_grad():
        lin.weight.add_(1.0)
        lin(x)
    assert lin._csr is not p1
    # training: the dense path, gradients flow
    out = lin(x).sum()
    out.backward()
    assert lin.weight.grad is not None


def test_packed_for_mask_cache_follows_weight_identity():
    w1, mask = torch.randn(8, 16), torch.rand(8, 16) < 0.3
    p1 = packed_for_mask(w1, mask)
    assert packed_for_mask(w1, mask) is p1
    w2 = w1.clone()
    assert packed_for_mask(w2, mask) is not p1


@pytest.mark.parametrize("kind", ["bool", "block"])
def test_compiled_sparse_inference_keeps_the_csr_kernel(csr_threshold, kind, monkeypatch):
    """A torch.compile graph of a pruned model runs the CSR kernel (through the capkit::masked_linear
    op, asked with the real tensors when the graph runs), packs each weight once, and matches eager;
    for 0/1 masks and for block masks."""
    import torch._dynamo
    import torch._dynamo.testing
    from capkit.nn import MaskedLinear, patch_model
    from capkit.ops import BlockMask
    from _models import tiny_bert, token_batch

    torch._dynamo.reset()
    model = tiny_bert().eval()
    patch_model(model)
    gen = torch.Generator().manual_seed(3)
    layers = [m for m in model.modules() if isinstance(m, MaskedLinear)]
    for m in layers:
        if kind == "bool":
            m.set_mask(torch.rand(m.out_features, m.in_features, generator=gen) < 0.1)
        else:
            grid = torch.rand(-(-m.out_features // 16), -(-m.in_features // 16), generator=gen) < 0.25
            grid[0, 0] = True
            m.set_mask(BlockMask.from_block_grid(grid, 16, (m.out_features, m.in_features)))
    if kind == "block":  # the tiny model's few blocks are dense by area: let every one through
        monkeypatch.setattr(sparse_format, "csr_max_density", lambda dtype=torch.float32: 1.0)
    batch = token_batch(model.config)
    with torch.no_grad():
        eager = model(**batch).logits
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    from capkit.ops import _library
    with mock.patch.object(_library, "csr_linear", wraps=_library.csr_linear) as kernel, \
            mock.patch.object(sparse_format, "pack_csr", wraps=sparse_format.pack_csr) as packs, \
            torch.no_grad():
        out = [compiled(**batch).logits for _ in range(3)]
    assert counter.frame_count == 1
    # block layouts go to the CSR kernel from their second sighting on (the eager run above was
    # their first); 0/1 masks from the first
    assert kernel.call_count == 3 * len(layers)
    assert packs.call_count <= len(layers)  # cached across the graph's runs, not packed per call
    for o in out:
        torch.testing.assert_close(o, eager, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("element", [False, True])
def test_sparse_block_masks_in_inference_run_the_csr_kernel(csr_threshold, element):
    """A fixed block mask (pure, or with a 0/1 element mask inside its live blocks) at a block
    density within the threshold runs the CSR kernel in inference, packed once per weight and
    layout; training and denser block masks keep the block kernels."""
    import importlib

    from capkit.ops import BlockMask

    ml_module = importlib.import_module("capkit.ops.masked_linear")

    gen = torch.Generator().manual_seed(11)
    w, b = torch.randn(70, 96, generator=gen), torch.randn(70, generator=gen)
    blocks = torch.rand(5, 6, generator=gen) < 0.25
    dense = blocks.repeat_interleave(16, 0).repeat_interleave(16, 1)[:70, :96]
    if element:
        dense = dense & (torch.rand(70, 96, generator=gen) < 0.7)
    bm = BlockMask.from_dense(dense, 16, keep_element_mask=element)
    assert (bm.mask is not None) == element and 0 < bm.layout.block_density <= 0.3
    w[~dense] = float("nan")  # never read by either path
    x = torch.randn(2, 33, 96, generator=gen)
    with mock.patch.object(ml_module, "csr_linear", wraps=ml_module.csr_linear) as kernel, \
            mock.patch.object(sparse_format, "pack_csr", wraps=sparse_format.pack_csr) as packs, torch.no_grad():
        ys = [masked_linear(x, w, bm, b) for _ in range(3)]
        # the first call with a layout runs the block kernels (a mask made afresh per forward
        # never pays for a CSR build); the same layout again runs the CSR kernel, packed once
        assert kernel.call_count == 2 and packs.call_count == 1
        fresh = BlockMask.from_dense(dense, 16, keep_element_mask=element)  # same pattern, new tensors
        masked_linear(x, w, fresh, b)
        assert kernel.call_count == 2 and packs.call_count == 1
    ref = reference(x.reshape(-1, 96), torch.nan_to_num(w), dense, b).view(2, 33, 70)
    for y in ys:
        torch.testing.assert_close(y.double(), ref, atol=tol(96), rtol=0)
    with mock.patch.object(ml_module, "csr_linear", wraps=ml_module.csr_linear) as kernel:
        wg = torch.nan_to_num(w).requires_grad_()
        masked_linear(x, wg, bm, b).sum().backward()  # training: the block kernels, gradients flow
        with torch.no_grad():
            denser = BlockMask.from_dense(torch.ones(70, 96, dtype=torch.bool), 16)
            masked_linear(x, w.nan_to_num(), denser, b)
    assert kernel.call_count == 0 and wg.grad is not None


def _row_block_mask(n, k, rows, cols, keep, seed):
    """A mask kept in blocks of rows x cols (the last blocks cut at the edges), plus a few rows of
    other patterns so that some groups of four rows differ."""
    g = torch.Generator().manual_seed(seed)
    blocks = torch.rand(-(-n // rows), -(-k // cols), generator=g) < keep
    mask = blocks.repeat_interleave(rows, 0)[:n].repeat_interleave(cols, 1)[:, :k].clone()
    mask[5] = torch.rand(k, generator=g) < 0.5  # breaks the group of rows 4..7
    return mask


def test_row_quads_mark_groups_of_four_equal_rows():
    mask = _row_block_mask(22, 40, 4, 8, 0.5, 0)  # 22 rows: 5 groups, rows 20-21 in none
    quads = sparse_format.pack_csr(torch.randn(22, 40), mask).row_quads
    expected = [int(bool((mask[4 * i:4 * i + 4] == mask[4 * i]).all())) for i in range(5)]
    assert quads.dtype == torch.uint8 and quads.tolist() == expected and expected[1] == 0 and sum(expected) >= 3


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("rows,cols,panel", [(4, 8, None), (32, 32, None), (8, 1, 13), (32, 32, 48)])
def test_grouped_rows_match_the_reference(threads, rows, cols, panel):
    """Rows pruned in groups of four (or more) take the four-row path of the kernel: every tile
    width, both schedules, panels, odd sizes, empty groups, and NaN in pruned entries."""
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        for n, k in ((70, 96), (130, 200)):
            w = torch.randn(n, k)
            mask = _row_block_mask(n, k, rows, cols, 0.3, n)
            mask[8:12] = False  # an empty group
            packed = pack_csr(w.masked_fill(~mask, float("nan")), mask, panel=panel)
            assert packed.row_quads.sum() > 0
            b = torch.randn(n)
            for m_ in (1, 5, 16, 33, 64, 130):
                x = torch.randn(m_, k)
                torch.testing.assert_close(call_kernel(x, packed, b).double(), reference(x, w, mask, b),
                                           atol=tol(k), rtol=0)
    finally:
        torch.set_num_threads(before)
