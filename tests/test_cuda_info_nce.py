"""GPU tests of the CUDA C++ InfoNCE kernels (csrc/cuda/info_nce.cu, backend "cuda").

Loss and query gradient against the float64 reference on random data: with and without labels
and self_index, duplicate ids, queries without positives, B = 1, M below one key tile, M = 0,
fp32 / fp16 / bf16 keys, temperatures 0.05-1, and shapes whose key split ranges from one CTA to
hundreds (the split merge kernels run), up to CAP's 32 x 4,200 x 768 and a 65,536-key bank.
"""
import pytest
import torch

from capkit.ops.info_nce import _STREAMING, info_nce


def _skip_reason():
    if not torch.cuda.is_available():
        return "needs a CUDA GPU"
    return _STREAMING["cuda"].unavailable_reason(torch.device("cuda"))


_SKIP = _skip_reason()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(_SKIP is not None, reason=_SKIP or "")]
DEV = "cuda"


def make_case(b, m, d, key_dtype=torch.float32, labels=True, self_index=True, n_ids=None):
    q = torch.randn(b, d, device=DEV)
    k = torch.randn(m, d, device=DEV)
    n_ids = n_ids or max(1, m // 3)
    qid = torch.randint(0, n_ids, (b,), device=DEV)
    kid = torch.randint(0, n_ids, (m,), device=DEV)
    if m >= 4:
        kid[:4] = qid[0]  # several positives sharing one id
    qlab = torch.randint(0, 3, (b,), device=DEV) if labels else None
    klab = torch.randint(0, 3, (m,), device=DEV) if labels else None
    si = torch.randint(-1, m, (b,), device=DEV) if self_index and m > 0 else None
    return q, k.to(key_dtype), qid, kid, qlab, klab, si


def check(case, rtol=1e-4, grad_rtol=1e-3, **kw):
    q, k, qid, kid, qlab, klab, si = case
    kw = dict(dict(query_labels=qlab, key_labels=klab, self_index=si, temperature=0.1, unsup_weight=0.7,
                   sup_weight=2.0 if qlab is not None else 0.0), **kw)
    qc = q.clone().requires_grad_()
    loss = info_nce(qc, k, qid, kid, backend="cuda", **kw)
    loss.backward()
    q64 = q.double().requires_grad_()
    ref = info_nce(q64, k.double(), qid, kid, backend="torch", **kw)
    ref.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=rtol, atol=1e-5)
    torch.testing.assert_close(qc.grad.double(), q64.grad, rtol=grad_rtol, atol=1e-6)


@pytest.mark.parametrize("b,m,d", [(1, 1, 3), (1, 7, 16), (7, 127, 33), (32, 300, 64), (5, 3, 769),
                                   (33, 1000, 48), (130, 2049, 40), (32, 4200, 768)])
@pytest.mark.parametrize("labels", [False, True])
@pytest.mark.parametrize("normalization", ["cap", "mean"])
def test_matches_reference(b, m, d, labels, normalization):
    check(make_case(b, m, d, labels=labels), normalization=normalization)


@pytest.mark.parametrize("key_dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("b,m,d", [(9, 200, 48), (32, 4200, 768), (100, 65536, 96)])
def test_half_precision_keys(key_dtype, b, m, d):
    check(make_case(b, m, d, key_dtype=key_dtype), grad_rtol=2e-3)


@pytest.mark.parametrize("temperature", [0.05, 0.3, 1.0])
@pytest.mark.parametrize("normalize", [True, False])
def test_temperatures_and_unnormalised(temperature, normalize):
    q, k, qid, kid, qlab, klab, si = make_case(20, 500, 64)
    if not normalize:
        q, k = q * 0.2, k * 0.2
    check((q, k, qid, kid, qlab, klab, si), temperature=temperature, normalize=normalize)


def test_many_query_blocks_one_key_tile():
    check(make_case(4096, 64, 32, n_ids=4096))  # one split: dq written without the sum kernel


def test_queries_without_positives_and_self_only_keys():
    q = torch.randn(6, 16, device=DEV)
    k = torch.randn(10, 16, device=DEV)
    qid = torch.tensor([0, 1, 2, 3, 100, 101], device=DEV)  # the last two have no positive
    kid = torch.arange(10, device=DEV)
    si = torch.tensor([0, -1, 2, 5, -1, 9], device=DEV)  # query 0 and 2 lose their only positive
    check((q, k, qid, kid, None, None, si))
    # a single key that is each query's own copy: nothing is left, the loss is zero
    one = torch.randn(1, 16, device=DEV)
    qc = one.clone().requires_grad_()
    loss = info_nce(qc, one, torch.zeros(1, dtype=torch.long, device=DEV), torch.zeros(1, dtype=torch.long, device=DEV),
                    self_index=torch.zeros(1, dtype=torch.long, device=DEV), backend="cuda")
    loss.backward()
    assert float(loss.detach()) == 0.0 and torch.equal(qc.grad, torch.zeros_like(qc.grad))


def test_empty_bank_gives_zero_loss():
    q = torch.randn(3, 8, device=DEV, requires_grad=True)
    k = torch.empty(0, 8, device=DEV)
    e = torch.empty(0, dtype=torch.long, device=DEV)
    loss = info_nce(q, k, torch.arange(3, device=DEV), e, backend="cuda")
    loss.backward()
    assert float(loss.detach()) == 0.0 and torch.equal(q.grad, torch.zeros_like(q.grad))


def check_stats(case, rtol, atol):
    """The raw forward, (lse, sum_u, cnt_u, sum_s, cnt_s) per query, against a direct float64 computation."""
    q, k, qid, kid, qlab, klab, si = case
    scale = 1.0 / k.float().norm(dim=1)
    stats = _STREAMING["cuda"].forward(q, k, scale, qid, kid, qlab, klab, si)
    s = (q.double() @ k.double().t()) * scale.double()
    keep = torch.ones_like(s, dtype=torch.bool)
    rows = torch.nonzero(si >= 0).squeeze(1)
    keep[rows, si[rows]] = False
    pu = (qid[:, None] == kid[None, :]) & keep
    ps = (qlab[:, None] == klab[None, :]) & keep
    expect = torch.stack([torch.logsumexp(s.masked_fill(~keep, float("-inf")), 1), (s * pu).sum(1),
                          pu.sum(1).double(), (s * ps).sum(1), ps.sum(1).double()], 1)
    torch.testing.assert_close(stats.double(), expect, rtol=rtol, atol=atol)


def test_stats_against_a_direct_computation():
    check_stats(make_case(37, 3000, 72), rtol=1e-4, atol=1e-3)


def test_bad_input_names_the_argument():
    q, k, qid, kid, qlab, klab, si = make_case(4, 10, 8)
    f = torch.ops.capkit.info_nce_forward
    with pytest.raises(RuntimeError, match="qs must be float32"):
        f(q.half(), k, None, qid, kid, None, None, None)
    with pytest.raises(RuntimeError, match="keys must have 8 columns"):
        f(q, k[:, :4], None, qid, kid, None, None, None)
    with pytest.raises(RuntimeError, match="kid must be a vector of length 10"):
        f(q, k, None, qid, kid[:5], None, None, None)
    with pytest.raises(RuntimeError, match="qlab and klab must be given together"):
        f(q, k, None, qid, kid, qlab, None, None)
    with pytest.raises(RuntimeError, match="qid must be a CUDA tensor"):
        f(q, k, None, qid.cpu(), kid, None, None, None)
    with pytest.raises(RuntimeError, match="coef must be"):
        torch.ops.capkit.info_nce_backward(q, k, None, qid, kid, None, None, None, torch.zeros(4, device=DEV),
                                           torch.zeros(4, 2, device=DEV))
