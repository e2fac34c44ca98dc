"""Tests for the Triton InfoNCE kernels (kernels/info_nce.py).

Without a CUDA device the kernels run under the Triton interpreter, so sizes are small. The
stats and dqs are compared against a float64 PyTorch computation over the full score matrix,
with float allocations inside the module poisoned with NaN so unwritten outputs show up.
"""

import contextlib
import math
import os

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton")

from capkit.kernels import info_nce as tk  # noqa: E402
from capkit.ops.info_nce import info_nce  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

SHAPES = [(1, 1, 3), (1, 7, 16), (7, 127, 33), (32, 300, 64), (5, 3, 769), (33, 1000, 48)]


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------

@contextlib.contextmanager
def poisoned():
    """torch.empty / empty_like return NaN-filled float tensors while active."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def fill(t):
        if t.dtype.is_floating_point:
            t.fill_(float("nan"))
        return t

    def empty(*args, **kwargs):
        return fill(real_empty(*args, **kwargs))

    def empty_like(*args, **kwargs):
        return fill(real_empty_like(*args, **kwargs))

    mp = pytest.MonkeyPatch()
    mp.setattr(tk.torch, "empty", empty)
    mp.setattr(tk.torch, "empty_like", empty_like)
    try:
        yield
    finally:
        mp.undo()


def forward(*args, **kwargs):
    with poisoned():
        return tk.info_nce_forward(*args, **kwargs)


def backward(*args, **kwargs):
    with poisoned():
        return tk.info_nce_backward(*args, **kwargs)


def make_inputs(b, m, d, key_dtype=torch.float32, labels=True, scale=True, self_index=True, tau=0.1):
    q = F.normalize(torch.randn(b, d, dtype=torch.float64), dim=1) / tau
    keys = torch.randn(m, d).to(key_dtype)
    key_scale = (1.0 / keys.double().norm(dim=1)).float() if scale else None
    n_ids = max(1, m // 3)
    qid = torch.randint(0, n_ids, (b,))
    kid = torch.randint(0, n_ids, (m,))
    if m >= 3:
        kid[:3] = qid[0]  # one id several times among the keys
    qlab = torch.randint(0, 3, (b,)) if labels else None
    klab = torch.randint(0, 3, (m,)) if labels else None
    si = None
    if self_index:
        si = torch.randint(-1, m, (b,))
        si[0] = -1
        if b >= 3:
            si[2] = si[1]  # two queries leaving out the same key
    coef = torch.randn(b, 3)
    dev = lambda t: None if t is None else t.to(DEVICE)  # noqa: E731
    return dict(qs=q.float().to(DEVICE), keys=keys.to(DEVICE), key_scale=dev(key_scale), qid=dev(qid),
                kid=dev(kid), qlab=dev(qlab), klab=dev(klab), self_index=dev(si), coef=coef.to(DEVICE))


def fwd_args(c):
    return (c["qs"], c["keys"], c["key_scale"], c["qid"], c["kid"], c["qlab"], c["klab"], c["self_index"])


def reference(c, lse=None):
    """(stats [B, 5], dqs [B, d]) in float64 from the full score matrix.

    dqs uses ``lse`` when given (the kernel's, as the op passes it), else the exact one.
    """
    q, k = c["qs"].double().cpu(), c["keys"].double().cpu()
    s = q @ k.t()
    ks = c["key_scale"]
    if ks is not None:
        s = s * ks.double().cpu()[None, :]
    b, m = s.shape
    kept = torch.ones(b, m, dtype=torch.bool)
    si = c["self_index"]
    if si is not None:
        si = si.cpu()
        rows = torch.nonzero(si >= 0).squeeze(1)
        kept[rows, si[rows]] = False
    exact_lse = torch.logsumexp(s.masked_fill(~kept, float("-inf")), dim=1)
    pos_u = kept & (c["qid"].cpu()[:, None] == c["kid"].cpu()[None, :])
    if c["qlab"] is not None:
        pos_s = kept & (c["qlab"].cpu()[:, None] == c["klab"].cpu()[None, :])
    else:
        pos_s = torch.zeros_like(kept)
    zero = torch.zeros_like(s)
    stats = torch.stack([exact_lse, torch.where(pos_u, s, zero).sum(1), pos_u.sum(1).double(),
                         torch.where(pos_s, s, zero).sum(1), pos_s.sum(1).double()], dim=1)
    lse = exact_lse if lse is None else lse.double().cpu()
    finite = torch.isfinite(lse)
    p = torch.where(kept & finite[:, None], torch.exp(s - torch.where(finite, lse, 0.0)[:, None]), zero)
    coef = c["coef"].double().cpu()
    g = coef[:, :1] * pos_u + coef[:, 1:2] * pos_s + coef[:, 2:] * p
    if ks is not None:
        g = g * ks.double().cpu()[None, :]
    return stats, g @ k


def check_stats(stats, ref):
    assert stats.dtype == torch.float32 and tuple(stats.shape) == tuple(ref.shape)
    stats = stats.double().cpu()
    finite = torch.isfinite(ref[:, 0])
    assert torch.equal(torch.isfinite(stats[:, 0]), finite)
    assert (stats[~finite, 0] == float("-inf")).all()
    assert torch.isfinite(stats[:, 1:]).all()
    torch.testing.assert_close(stats[finite, 0], ref[finite, 0], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(stats[:, 1:], ref[:, 1:], rtol=1e-5, atol=1e-4)
    assert torch.equal(stats[:, 2], ref[:, 2]) and torch.equal(stats[:, 4], ref[:, 4])


def check_dqs(dqs, ref):
    assert dqs.dtype == torch.float32 and tuple(dqs.shape) == tuple(ref.shape)
    dqs = dqs.double().cpu()
    assert torch.isfinite(dqs).all()
    scale = max(1.0, float(ref.abs().max()))
    torch.testing.assert_close(dqs, ref, rtol=1e-4, atol=1e-5 * scale)


def run_and_check(c, **kwargs):
    stats = forward(*fwd_args(c), **kwargs)
    ref_stats, _ = reference(c)
    check_stats(stats, ref_stats)
    lse = stats[:, 0].contiguous()
    dqs = backward(*fwd_args(c), lse, c["coef"], **kwargs)
    check_dqs(dqs, reference(c, lse)[1])
    return stats, dqs


# ---------------------------------------------------------------------------
# kernels against float64
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("key_dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("options", ["plain", "full"])
@pytest.mark.parametrize("b,m,d", SHAPES)
def test_matches_float64(b, m, d, options, key_dtype):
    full = options == "full"
    c = make_inputs(b, m, d, key_dtype, labels=full, scale=full, self_index=full)
    run_and_check(c)


@pytest.mark.parametrize("labels", [False, True])
@pytest.mark.parametrize("scale", [False, True])
@pytest.mark.parametrize("self_index", [False, True])
def test_option_combinations(labels, scale, self_index):
    c = make_inputs(7, 127, 33, labels=labels, scale=scale, self_index=self_index)
    stats, _ = run_and_check(c)
    if not labels:
        assert (stats[:, 3:] == 0).all()


@pytest.mark.parametrize("num_splits", [1, 2, 3, 7, 50])
def test_key_splits_agree(num_splits):
    # More splits than key blocks leaves some empty: they must merge as nothing.
    c = make_inputs(20, 127, 33)
    run_and_check(c, num_splits=num_splits)


@pytest.mark.skipif(not INTERPRET, reason="overrides the interpreter's fixed tiles")
def test_small_tiles(monkeypatch):
    # Several d chunks with a ragged last one, several key and query blocks.
    monkeypatch.setitem(tk._INTERPRET_FWD_META, "BLOCK_M", 16)
    monkeypatch.setitem(tk._INTERPRET_FWD_META, "BLOCK_D", 16)
    monkeypatch.setitem(tk._INTERPRET_BWD_META, "BLOCK_M", 16)
    monkeypatch.setitem(tk._INTERPRET_BWD_META, "BLOCK_D", 16)
    monkeypatch.setitem(tk._INTERPRET_BWD_META, "BLOCK_DO", 16)
    c = make_inputs(18, 37, 41)
    run_and_check(c)
    run_and_check(c, num_splits=3)


def test_fused_reduction(monkeypatch):
    # The GPU's two-operand reduction for the positive sums and counts.
    monkeypatch.setattr(tk, "_FUSED_REDUCE", True)
    c = make_inputs(5, 20, 8)
    stats = forward(*fwd_args(c))
    check_stats(stats, reference(c)[0])


def test_three_part_split(monkeypatch):
    # The bf16 scheme (three 16-bit parts), checked with fp16 keys where the interpreter can.
    monkeypatch.setitem(tk._PARTS, torch.float16, 3)
    c = make_inputs(9, 150, 40, torch.float16)
    run_and_check(c)


def test_self_only_key_gives_minus_inf():
    c = make_inputs(1, 1, 5)
    c["self_index"] = torch.tensor([0], device=DEVICE)
    c["qid"] = c["kid"].clone()
    stats = forward(*fwd_args(c))
    assert stats[0, 0].item() == float("-inf")
    assert (stats[0, 1:] == 0).all()
    dqs = backward(*fwd_args(c), stats[:, 0].contiguous(), c["coef"])
    assert (dqs == 0).all()


@pytest.mark.parametrize("key_dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_empty_rows_next_to_full_rows(key_dtype):
    c = make_inputs(3, 1, 8, key_dtype)
    c["self_index"] = torch.tensor([0, -1, 0], device=DEVICE)
    stats, dqs = run_and_check(c)
    assert stats[0, 0] == float("-inf") and stats[2, 0] == float("-inf") and torch.isfinite(stats[1, 0])
    assert (dqs[0] == 0).all() and (dqs[2] == 0).all()


def test_no_positives():
    c = make_inputs(4, 30, 8, labels=False)
    c["qid"] = torch.arange(100, 104, device=DEVICE)
    stats, _ = run_and_check(c)
    assert (stats[:, 1:] == 0).all()


def test_zero_keys_with_key_scale_fp16():
    # Zero rows (e.g. an empty bank slot) get key_scale 1/eps: g * key_scale overflows fp16.
    c = make_inputs(6, 40, 24, torch.float16)
    c["keys"][5].zero_()
    c["keys"][17].zero_()
    c["key_scale"] = 1.0 / c["keys"].float().norm(dim=1).clamp_min(1e-12)
    run_and_check(c)


def test_tiny_keys_with_key_scale_fp16():
    # Nonzero keys of norm < 1/16384 (subnormal fp16): their normalised direction still counts.
    c = make_inputs(6, 40, 24, torch.float16)
    c["keys"][3] = (c["keys"][3].float() * 1e-6).to(torch.float16)
    c["keys"][30] = (c["keys"][30].float() * 1e-5).to(torch.float16)
    c["key_scale"] = 1.0 / c["keys"].float().norm(dim=1).clamp_min(1e-12)
    c["qid"][:] = c["kid"][3]
    stats = forward(*fwd_args(c))
    ref_stats, _ = reference(c)
    check_stats(stats, ref_stats)
    lse = stats[:, 0].contiguous()
    dqs = backward(*fwd_args(c), lse, c["coef"])
    ref = reference(c, lse)[1]
    assert torch.isfinite(dqs).all()
    # Those two keys enter the backward as k * key_scale rounded to fp16.
    torch.testing.assert_close(dqs.double().cpu(), ref, rtol=2e-3, atol=2e-3 * float(ref.abs().max()))
    # ... and they matter: dropping key 3 changes dqs by far more than that.
    c2 = dict(c)
    c2["self_index"] = torch.full_like(c["qid"], 3)
    _, without = reference(c2, lse)
    assert (without - ref).abs().max() > 0.1 * ref.abs().max()


@pytest.mark.parametrize("key_dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_large_and_tiny_queries(key_dtype):
    # Unnormalised queries far outside fp16's range (and tiny ones) keep fp32 accuracy.
    c = make_inputs(4, 50, 20, key_dtype, scale=False)
    c["qs"] = c["qs"] * torch.tensor([1e5, 1e-6, 1.0, 3e3], device=DEVICE)[:, None]
    c["keys"] = (c["keys"].float() * 1e-3).to(key_dtype)
    c["qid"][:] = c["qid"][0]  # every query has positives
    stats, _ = run_and_check(c)
    # Row-relative accuracy of the positive sums, the tiny row included.
    ref = reference(c)[0]
    torch.testing.assert_close(stats[:, 1].double().cpu(), ref[:, 1], rtol=1e-4, atol=0.0)


# ---------------------------------------------------------------------------
# through the op
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("normalization", ["cap", "mean"])
@pytest.mark.parametrize("normalize", [True, False])
def test_op_triton_matches_torch(normalization, normalize):
    b, m, d = 12, 90, 24
    q = torch.randn(b, d)
    k = torch.randn(m, d)
    qid = torch.randint(0, 20, (b,))
    kid = torch.randint(0, 20, (m,))
    kid[:4] = qid[0]
    qlab, klab = torch.randint(0, 3, (b,)), torch.randint(0, 3, (m,))
    si = torch.randint(-1, m, (b,))
    if not normalize:
        q, k = q * 0.3, k * 0.3
    kw = dict(query_labels=qlab.to(DEVICE), key_labels=klab.to(DEVICE), self_index=si.to(DEVICE),
              temperature=0.2, unsup_weight=0.7, sup_weight=1.3, normalization=normalization,
              normalize=normalize)
    qt = q.clone().to(DEVICE).requires_grad_()
    loss = info_nce(qt, k.to(DEVICE), qid.to(DEVICE), kid.to(DEVICE), backend="triton", **kw)
    loss.backward()
    q64 = q.double().to(DEVICE).requires_grad_()
    ref = info_nce(q64, k.double().to(DEVICE), qid.to(DEVICE), kid.to(DEVICE), backend="torch", **kw)
    ref.backward()
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(qt.grad.double(), q64.grad, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------
# GPU only
# ---------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("b,m,d", [(5, 3, 769), (32, 300, 64), (33, 1000, 48)])
def test_bf16_keys(b, m, d):
    c = make_inputs(b, m, d, torch.bfloat16)
    run_and_check(c)


@pytest.mark.gpu
@pytest.mark.parametrize("key_dtype", [torch.float32, torch.float16, torch.bfloat16],
                         ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("b,m,d", [(32, 4200, 768), (64, 65536, 128), (256, 65536, 64)])
def test_large_banks(b, m, d, key_dtype):
    c = make_inputs(b, m, d, key_dtype)
    run_and_check(c)


@pytest.mark.gpu
@pytest.mark.parametrize("num_splits", [1, 5, 64])
def test_large_bank_splits(num_splits):
    c = make_inputs(100, 65536, 96, torch.float16)
    run_and_check(c, num_splits=num_splits)


@pytest.mark.gpu
def test_cap_shape_op_bf16():
    q = torch.randn(32, 768, device=DEVICE)
    k = torch.randn(4200, 768, device=DEVICE).to(torch.bfloat16)
    qid = torch.randint(0, 1000, (32,), device=DEVICE)
    kid = torch.randint(0, 1000, (4200,), device=DEVICE)
    kid[:32] = qid
    si = torch.arange(32, device=DEVICE)
    qt = q.clone().requires_grad_()
    loss = info_nce(qt, k, qid, kid, self_index=si, temperature=0.07, backend="triton")
    loss.backward()
    q64 = q.double().requires_grad_()
    ref = info_nce(q64, k.double(), qid, kid, self_index=si, temperature=0.07, backend="torch")
    ref.backward()
    assert math.isfinite(float(loss.detach()))
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(qt.grad.double(), q64.grad, rtol=1e-4, atol=1e-6)
