"""The C++ CPU kernels of info_nce (torch.ops.capkit.info_nce_forward / info_nce_backward)
against a float64 computation over the full score matrix, edge cases and bad input."""

import math

import pytest
import torch

from capkit._ext import load_extension

load_extension()
if not hasattr(torch.ops.capkit, "info_nce_forward"):
    pytest.skip("capkit._C is not built or has no info_nce kernels", allow_module_level=True)

fwd = torch.ops.capkit.info_nce_forward
bwd = torch.ops.capkit.info_nce_backward

SHAPES = [(1, 1, 3), (1, 7, 16), (7, 127, 33), (32, 300, 64), (5, 3, 769), (33, 1000, 48), (2, 5000, 8)]


def reference(qs, keys, key_scale, qid, kid, qlab, klab, self_index, lse=None, coef=None):
    """stats [B, 5] (and dqs [B, d] when lse and coef are given) in float64, with the absolute
    magnitudes the float32 rounding errors scale with."""
    q, k = qs.double(), keys.double()  # fp16 / bf16 keys convert exactly
    s = q @ k.t()
    if key_scale is not None:
        s = s * key_scale.double()
    b, m = s.shape
    kept = torch.ones(b, m, dtype=torch.bool)
    if self_index is not None:
        rows = torch.nonzero(self_index >= 0).squeeze(1)
        kept[rows, self_index[rows]] = False
    pu = (qid[:, None] == kid[None, :]) & kept
    ps = (qlab[:, None] == klab[None, :]) & kept if qlab is not None else torch.zeros_like(kept)
    lse_ref = torch.logsumexp(s.masked_fill(~kept, float("-inf")), dim=1)
    zero = torch.zeros_like(s)
    stats = torch.stack([lse_ref, torch.where(pu, s, zero).sum(1), pu.sum(1).double(),
                         torch.where(ps, s, zero).sum(1), ps.sum(1).double()], dim=1)
    # Rounding errors grow with the magnitudes summed: |q_i||k_j| along d for a score, |s| over the
    # terms of a positive sum; lse inherits the error of the largest scores.
    qk = (q.abs() @ k.abs().t()) * (key_scale.double()[None, :] if key_scale is not None else 1.0)
    qk_max = torch.where(kept, qk, zero).amax(1) if m else zero[:, 0]
    scale = torch.stack([qk_max + lse_ref.abs().nan_to_num(0, 0, 0) + 1, torch.where(pu, qk, zero).sum(1),
                         zero[:, 0], torch.where(ps, qk, zero).sum(1), zero[:, 0]], dim=1)
    if lse is None:
        return stats, scale
    lse64 = lse.double()[:, None]
    live = torch.isfinite(lse64) & kept
    p = torch.where(live, torch.exp(torch.where(live, s - lse64, zero)), zero)
    c = coef.double()
    g = c[:, 0:1] * pu + c[:, 1:2] * ps + c[:, 2:3] * p
    # exp(s - lse) carries the absolute error of s and lse as a relative one.
    amp = c[:, 2:3].abs() * p * (qk + qk_max[:, None] + 1)
    ks = key_scale.double()[None, :] if key_scale is not None else 1.0
    return (g * ks) @ k, ((g.abs() + amp) * ks) @ k.abs()


def make_case(b, m, d, key_dtype=torch.float32, labels=True, key_scale=True, self_index=True):
    q = torch.randn(b, d)
    qs = (q / q.norm(dim=1, keepdim=True).clamp_min(1e-12) / 0.1).contiguous()  # normalised / temperature
    keys = torch.randn(m, d).to(key_dtype)
    ks = 1.0 / keys.float().norm(dim=1).clamp_min(1e-12) if key_scale else None
    kid = torch.randint(0, m // 3 + 1, (m,))  # duplicate ids among the keys
    pick = torch.randint(0, m, (b,))
    qid = kid[pick].clone()  # every query has at least one positive
    qid[::3] = -5  # and some have none
    qlab = torch.randint(0, 4, (b,)) if labels else None
    klab = torch.randint(0, 4, (m,)) if labels else None
    si = None
    if self_index:
        si = torch.randint(-1, m, (b,))
        si[::2] = pick[::2]  # the left-out key is often a positive
        si[1::4] = -1
    return qs, keys, ks, qid, kid, qlab, klab, si


def fp32_tol(d, m):
    """Relative tolerance near float32 rounding: the unit roundoff grown like a sum of d + m terms."""
    return 4 * 2.0**-24 * math.sqrt(d + m + 16)


def check_stats(stats, ref, scale, rtol):
    assert stats.dtype == torch.float32 and stats.shape == ref.shape
    got = stats.double()
    # counts are exact; -inf log-sum-exps must match exactly.
    torch.testing.assert_close(got[:, 2], ref[:, 2], rtol=0, atol=0)
    torch.testing.assert_close(got[:, 4], ref[:, 4], rtol=0, atol=0)
    inf = torch.isinf(ref[:, 0])
    assert torch.equal(torch.isinf(got[:, 0]), inf)
    assert (got[inf, 0] < 0).all()
    err = (got - ref).abs()
    err[:, 0] = torch.where(inf, torch.zeros_like(err[:, 0]), err[:, 0])
    bound = rtol * scale + 1e-30
    assert (err <= bound).all(), f"max error/bound per column {(err / bound).amax(0).tolist()}"


def check_dqs(dqs, ref, scale, rtol):
    assert dqs.dtype == torch.float32 and dqs.shape == ref.shape
    err = (dqs.double() - ref).abs()
    bound = rtol * scale + 1e-30
    assert (err <= bound).all(), f"max error/bound {(err / bound).max():.3g}"


VARIANTS = {
    "plain": dict(labels=False, key_scale=False, self_index=False),
    "all": dict(labels=True, key_scale=True, self_index=True),
    "labels_self": dict(labels=True, key_scale=False, self_index=True),
    "scale_only": dict(labels=False, key_scale=True, self_index=False),
}


@pytest.mark.parametrize("key_dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("b,m,d", SHAPES)
def test_matches_float64(b, m, d, variant, key_dtype):
    case = make_case(b, m, d, key_dtype, **VARIANTS[variant])
    stats = fwd(*case)
    ref, scale = reference(*case)
    check_stats(stats, ref, scale, fp32_tol(d, m))
    # Backward from the op's own lse (as the autograd function does) and random coefficients.
    lse = stats[:, 0].contiguous()
    coef = torch.randn(b, 3)
    dqs = bwd(*case, lse, coef)
    ref_dqs, scale_dqs = reference(*case, lse=lse, coef=coef)
    check_dqs(dqs, ref_dqs, scale_dqs, fp32_tol(d, m))


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("b,m,d", [(40, 3000, 24), (300, 1200, 16)])
def test_split_key_ranges(b, m, d, threads):
    # Several threads split the keys into ranges whose partial results are combined.
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        case = make_case(b, m, d, torch.bfloat16)
        stats = fwd(*case)
        lse = stats[:, 0].contiguous()
        coef = torch.randn(b, 3)
        dqs = bwd(*case, lse, coef)
    finally:
        torch.set_num_threads(old)
    ref, scale = reference(*case)
    check_stats(stats, ref, scale, fp32_tol(d, m))
    ref_dqs, scale_dqs = reference(*case, lse=lse, coef=coef)
    check_dqs(dqs, ref_dqs, scale_dqs, fp32_tol(d, m))


@pytest.mark.parametrize("d", [8, 1024])
def test_row_layouts(d):
    # d = 8 is padded to 16 floats per row; rows of 1024 floats get a padded stride.
    case = make_case(6, 200, d, torch.float32)
    stats = fwd(*case)
    ref, scale = reference(*case)
    check_stats(stats, ref, scale, fp32_tol(d, 200))
    coef = torch.randn(6, 3)
    dqs = bwd(*case, stats[:, 0].contiguous(), coef)
    ref_dqs, scale_dqs = reference(*case, lse=stats[:, 0], coef=coef)
    check_dqs(dqs, ref_dqs, scale_dqs, fp32_tol(d, 200))


@pytest.mark.parametrize("key_dtype", [torch.float16, torch.bfloat16], ids=str)
def test_key_conversion_is_exact(key_dtype):
    # One-hot queries read single key entries: each query's one positive scores exactly k_j[i].
    d, m = 24, 5
    if key_dtype == torch.float16:
        special = [0.0, -0.0, 2.0**-24, -(2.0**-24), 1023 * 2.0**-24, 2.0**-14, 65504.0, -65504.0, 1 / 3]
    else:
        special = [0.0, -0.0, 2.0**-133, -(2.0**-127), 2.0**-126, 3.0e38, -1.0e30, 1 / 3]
    top = 10 if key_dtype == torch.float16 else 40  # finite keys: 0 * inf would make NaN scores
    keys = torch.randn(m, d) * torch.exp2(torch.randint(-20, top, (m, d)).float())
    keys.view(-1)[: len(special)] = torch.tensor(special)
    keys = keys.to(key_dtype)
    qs = torch.eye(d)
    qid = torch.arange(d) % m
    stats = fwd(qs, keys, None, qid, torch.arange(m), None, None, None)
    assert torch.equal(stats[:, 1], keys.float()[qid, torch.arange(d)])


def test_large_scores_stay_finite():
    # Scores far from 0 (no normalisation): the online max keeps exp from overflowing.
    qs = torch.randn(3, 16) * 30
    keys = torch.randn(400, 16)
    kid, qid = torch.arange(400), torch.tensor([0, 5, 399])
    stats = fwd(qs, keys, None, qid, kid, None, None, None)
    ref, scale = reference(qs, keys, None, qid, kid, None, None, None)
    assert torch.isfinite(stats).all()
    check_stats(stats, ref, scale, fp32_tol(16, 400))
    coef = torch.randn(3, 3)
    ref_dqs, scale_dqs = reference(qs, keys, None, qid, kid, None, None, None, lse=stats[:, 0], coef=coef)
    check_dqs(bwd(qs, keys, None, qid, kid, None, None, None, stats[:, 0].contiguous(), coef), ref_dqs, scale_dqs,
              fp32_tol(16, 400))


def test_no_kept_key_gives_minus_inf_and_zero_gradient():
    qs, keys = torch.randn(1, 5), torch.randn(1, 5)
    qid = kid = torch.tensor([7])
    lab = torch.tensor([1])
    stats = fwd(qs, keys, torch.ones(1), qid, kid, lab, lab, torch.tensor([0]))
    assert stats[0, 0].item() == float("-inf")
    assert stats[0, 1:].tolist() == [0.0, 0.0, 0.0, 0.0]
    dqs = bwd(qs, keys, torch.ones(1), qid, kid, lab, lab, torch.tensor([0]), stats[:, 0].contiguous(),
              torch.tensor([[1.0, 2.0, 3.0]]))
    assert torch.equal(dqs, torch.zeros(1, 5))


def test_empty_inputs():
    # No queries, no keys, zero dimension.
    z = torch.zeros(0, dtype=torch.long)
    assert fwd(torch.randn(0, 4), torch.randn(3, 4), None, z, torch.arange(3), None, None, None).shape == (0, 5)
    assert bwd(torch.randn(0, 4), torch.randn(3, 4), None, z, torch.arange(3), None, None, None, torch.zeros(0),
               torch.zeros(0, 3)).shape == (0, 4)
    stats = fwd(torch.randn(2, 4), torch.randn(0, 4), None, torch.arange(2), z, None, None, None)
    assert torch.isneginf(stats[:, 0]).all() and (stats[:, 1:] == 0).all()
    dqs = bwd(torch.randn(2, 4), torch.randn(0, 4), None, torch.arange(2), z, None, None, None, stats[:, 0].contiguous(),
              torch.ones(2, 3))
    assert torch.equal(dqs, torch.zeros(2, 4))
    # d = 0: every score is 0, so lse = log(number of kept keys).
    stats = fwd(torch.randn(2, 0), torch.randn(5, 0), None, torch.tensor([0, 1]), torch.tensor([0, 0, 1, 2, 3]), None,
                None, torch.tensor([1, -1]))
    torch.testing.assert_close(stats[:, 0], torch.log(torch.tensor([4.0, 5.0])))
    assert stats[:, 2].tolist() == [1.0, 1.0]


def test_bad_input_errors():
    b, m, d = 3, 5, 4
    qs, keys, ks = torch.randn(b, d), torch.randn(m, d), torch.rand(m)
    qid, kid = torch.arange(b), torch.arange(m)
    qlab, klab = torch.zeros(b, dtype=torch.long), torch.zeros(m, dtype=torch.long)
    si = torch.tensor([0, -1, 4])
    good = dict(qs=qs, keys=keys, key_scale=ks, qid=qid, kid=kid, qlab=qlab, klab=klab, self_index=si)
    order = list(good)

    def call(**over):
        args = {**good, **over}
        return fwd(*[args[n] for n in order])

    call()  # the good arguments pass
    cases = [
        (dict(qs=qs.double()), "float32 qs"),
        (dict(qs=qs[0]), "qs must be a 2-D"),
        (dict(qs=torch.randn(d, b).t()), "qs must be contiguous"),
        (dict(keys=keys.long()), "keys must be float32, float16 or bfloat16"),
        (dict(keys=torch.randn(m, d + 1)), "keys must have 4 columns"),
        (dict(keys=torch.randn(d, m).t()), "keys must be contiguous"),
        (dict(keys=keys[None]), "keys must be a 2-D"),
        (dict(key_scale=torch.rand(m + 1)), "key_scale must be a contiguous vector of length 5"),
        (dict(key_scale=ks.double()), "float32 key_scale"),
        (dict(qid=qid.int()), "qid must be int64"),
        (dict(qid=torch.arange(b + 1)), "qid must be a vector of length 3"),
        (dict(kid=torch.arange(m - 1)), "kid must be a vector of length 5"),
        (dict(kid=kid.float()), "kid must be int64"),
        (dict(klab=None), "qlab and klab must be given together"),
        (dict(qlab=torch.zeros(b + 2, dtype=torch.long)), "qlab must be a vector of length 3"),
        (dict(klab=klab.int()), "klab must be int64"),
        (dict(self_index=torch.tensor([0, 5, 1])), "self_index entries must lie in \\[-1, 5\\)"),
        (dict(self_index=torch.tensor([0, -2, 1])), "self_index entries"),
        (dict(self_index=torch.tensor([0, 1])), "self_index must be a vector of length 3"),
    ]
    for over, msg in cases:
        with pytest.raises(RuntimeError, match=msg):
            call(**over)
    lse, coef = torch.zeros(b), torch.zeros(b, 3)
    args = [good[n] for n in order]
    bwd(*args, lse, coef)
    with pytest.raises(RuntimeError, match="lse must be a contiguous vector of length 3"):
        bwd(*args, torch.zeros(b + 1), coef)
    with pytest.raises(RuntimeError, match="float32 lse"):
        bwd(*args, lse.double(), coef)
    with pytest.raises(RuntimeError, match=r"coef must be a contiguous \[3, 3\] tensor"):
        bwd(*args, lse, torch.zeros(b, 2))
    with pytest.raises(RuntimeError, match="float32 coef"):
        bwd(*args, lse, coef.half())
    with pytest.raises(RuntimeError, match="keys must have 4 columns"):
        bwd(qs, torch.randn(m, 2), *args[2:], lse, coef)
