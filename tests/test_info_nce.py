"""info_nce: the reference against a per-query spelling of CAP's loss, every streaming backend
against the reference (value and gradient), edge cases and bad input."""

import pytest
import torch
import torch.nn.functional as F

from capkit.ops.info_nce import _STREAMING, info_nce, info_nce_reference

CPU = torch.device("cpu")


def loop_loss(q, k, qid, kid, qlab, klab, self_index, tau, w_u, w_s, normalization, normalize):
    """CAP's loss written query by query, as the paper's formula reads (float64)."""
    q, k = q.double(), k.double()
    if normalize:
        q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
    terms = [(qid, kid, w_u)] + ([(qlab, klab, w_s)] if qlab is not None else [])
    total = torch.zeros((), dtype=torch.float64)
    for qv, kv, w in terms:
        per_query, counts = [], []
        for i in range(q.shape[0]):
            cols = [j for j in range(k.shape[0]) if self_index is None or j != int(self_index[i])]
            if not cols:
                continue
            s = torch.stack([q[i] @ k[j] / tau for j in cols])
            lse = torch.logsumexp(s, 0)
            pos = [c for c, j in enumerate(cols) if int(kv[j]) == int(qv[i])]
            if pos:
                per_query.append(sum(s[c] - lse for c in pos) / len(pos))
                counts.append(len(pos))
        if not per_query:
            continue
        if normalization == "cap":
            total = total - w * sum(per_query) / sum(counts)
        else:
            total = total - w * sum(per_query) / len(per_query)
    return total


def make_case(b, m, d, n_classes=3, with_labels=True, with_self=True, seed_dups=True, dtype=torch.float64):
    q = torch.randn(b, d, dtype=dtype)
    k = torch.randn(m, d, dtype=dtype)
    qid = torch.randint(0, max(1, m // 2), (b,))
    kid = torch.randint(0, max(1, m // 2), (m,))
    if seed_dups and m >= 3:
        kid[:3] = qid[0]  # several positives with one id
    qlab = torch.randint(0, n_classes, (b,)) if with_labels else None
    klab = torch.randint(0, n_classes, (m,)) if with_labels else None
    self_index = None
    if with_self:
        self_index = torch.randint(-1, m, (b,))
    return q, k, qid, kid, qlab, klab, self_index


@pytest.mark.parametrize("normalization", ["cap", "mean"])
@pytest.mark.parametrize("with_labels", [False, True])
@pytest.mark.parametrize("with_self", [False, True])
def test_reference_matches_per_query_formula(normalization, with_labels, with_self):
    q, k, qid, kid, qlab, klab, si = make_case(5, 11, 7, with_labels=with_labels, with_self=with_self)
    w_s = 2.0 if with_labels else 0.0
    for tau in (0.05, 0.3, 1.0):
        ref = info_nce_reference(q, k, qid, kid, query_labels=qlab, key_labels=klab, self_index=si, temperature=tau,
                                 unsup_weight=0.7, sup_weight=w_s, normalization=normalization)
        expect = loop_loss(q, k, qid, kid, qlab if with_labels else None, klab, si, tau, 0.7, w_s, normalization,
                           True)
        torch.testing.assert_close(ref, expect, rtol=1e-10, atol=1e-12)


def test_reference_single_positive_is_cross_entropy():
    # One positive per query, no self: the standard InfoNCE equals cross-entropy on the logits.
    q, k = torch.randn(6, 8, dtype=torch.float64), torch.randn(9, 8, dtype=torch.float64)
    target = torch.randint(0, 9, (6,))
    kid = torch.arange(100, 109)
    qid = kid[target]
    ref = info_nce_reference(q, k, qid, kid, temperature=0.2, normalization="mean")
    logits = F.normalize(q, dim=1) @ F.normalize(k, dim=1).t() / 0.2
    torch.testing.assert_close(ref, F.cross_entropy(logits, target))
    # "cap" equals "mean" when every query has exactly one positive.
    torch.testing.assert_close(info_nce_reference(q, k, qid, kid, temperature=0.2, normalization="cap"), ref)


def test_reference_gradcheck():
    q, k, qid, kid, qlab, klab, si = make_case(4, 9, 5)
    q.requires_grad_()
    torch.autograd.gradcheck(
        lambda q_: info_nce_reference(q_, k, qid, kid, query_labels=qlab, key_labels=klab, self_index=si,
                                      temperature=0.3, sup_weight=1.5), (q,))


def streaming_backends():
    return [name for name, impl in _STREAMING.items() if impl.unavailable_reason(CPU) is None]


BACKENDS = streaming_backends()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("b,m,d", [(1, 1, 3), (1, 7, 16), (7, 127, 33), (32, 300, 64), (5, 3, 769)])
@pytest.mark.parametrize("normalization", ["cap", "mean"])
@pytest.mark.parametrize("labels", [False, True])
def test_streaming_matches_reference(backend, b, m, d, normalization, labels):
    q, k, qid, kid, qlab, klab, si = make_case(b, m, d, with_labels=labels, dtype=torch.float32)
    if not labels:
        qlab = klab = None
    kwargs = dict(query_labels=qlab, key_labels=klab, self_index=si, temperature=0.1, unsup_weight=0.5,
                  sup_weight=3.0 if labels else 0.0, normalization=normalization)
    q32 = q.clone().requires_grad_()
    loss = info_nce(q32, k, qid, kid, backend=backend, **kwargs)
    loss.backward()
    q64 = q.double().requires_grad_()
    ref = info_nce(q64, k.double(), qid, kid, backend="torch", **kwargs)
    ref.backward()
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(q32.grad.double(), q64.grad, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("key_dtype", [torch.float16, torch.bfloat16])
def test_half_precision_keys(backend, key_dtype):
    if backend == "triton" and key_dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter has no bfloat16")
    q, k, qid, kid, qlab, klab, si = make_case(9, 200, 48, dtype=torch.float32)
    kh = k.to(key_dtype)
    q32 = q.clone().requires_grad_()
    loss = info_nce(q32, kh, qid, kid, query_labels=qlab, key_labels=klab, self_index=si, sup_weight=1.0,
                    backend=backend)
    loss.backward()
    q64 = q.double().requires_grad_()
    ref = info_nce(q64, kh.double(), qid, kid, query_labels=qlab, key_labels=klab, self_index=si, sup_weight=1.0,
                   backend="torch")
    ref.backward()
    torch.testing.assert_close(loss.double(), ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(q32.grad.double(), q64.grad, rtol=2e-3, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS + ["torch"])
def test_no_positives_adds_nothing(backend):
    q = torch.randn(4, 8)
    k = torch.randn(6, 8)
    qid = torch.tensor([100, 101, 102, 103])
    kid = torch.arange(6)
    q.requires_grad_()
    loss = info_nce(q, k, qid, kid, backend=backend)
    loss.backward()
    assert float(loss.detach()) == 0.0 and torch.count_nonzero(q.grad) == 0


@pytest.mark.parametrize("backend", BACKENDS + ["torch"])
def test_self_only_key_is_left_out(backend):
    # A single key that is the query's own copy: no candidates, no loss, no NaN.
    q = torch.randn(1, 4, requires_grad=True)
    loss = info_nce(q, q.detach(), torch.tensor([0]), torch.tensor([0]), self_index=torch.tensor([0]),
                    backend=backend)
    loss.backward()
    assert float(loss.detach()) == 0.0 and torch.isfinite(q.grad).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_without_normalization(backend):
    q, k, qid, kid, _, _, si = make_case(6, 40, 12, with_labels=False, dtype=torch.float32)
    q, k = q * 0.3, k * 0.3
    a = info_nce(q, k, qid, kid, self_index=si, normalize=False, temperature=0.5, backend=backend)
    r = info_nce(q.double(), k.double(), qid, kid, self_index=si, normalize=False, temperature=0.5, backend="torch")
    torch.testing.assert_close(a.double(), r, rtol=1e-4, atol=1e-5)


def test_bad_input_errors():
    q, k = torch.randn(3, 4), torch.randn(5, 4)
    qid, kid = torch.arange(3), torch.arange(5)
    with pytest.raises(ValueError, match="keys have dimension"):
        info_nce(q, torch.randn(5, 3), qid, kid)
    with pytest.raises(ValueError, match="query_ids must have 3 entries"):
        info_nce(q, k, torch.arange(4), kid)
    with pytest.raises(TypeError, match="key_ids must be a 1-D int64"):
        info_nce(q, k, qid, kid.int())
    with pytest.raises(ValueError, match="temperature must be a positive"):
        info_nce(q, k, qid, kid, temperature=0.0)
    with pytest.raises(ValueError, match="temperature must be a positive"):
        info_nce(q, k, qid, kid, temperature=-1)
    with pytest.raises(ValueError, match="query_labels and key_labels must be given together"):
        info_nce(q, k, qid, kid, query_labels=qid)
    with pytest.raises(ValueError, match="needs query_labels"):
        info_nce(q, k, qid, kid, sup_weight=1.0)
    with pytest.raises(ValueError, match="normalization must be one of"):
        info_nce(q, k, qid, kid, normalization="sum")
    with pytest.raises(ValueError, match="self_index entries must lie"):
        info_nce(q, k, qid, kid, self_index=torch.tensor([0, 5, 1]))
    with pytest.raises(TypeError, match="query must be floating"):
        info_nce(q.long(), k, qid, kid)
    with pytest.raises(ValueError, match="backend must be one of"):
        info_nce(q, k, qid, kid, backend="cuda-fast")


def test_module_matches_function():
    from capkit.nn import InfoNCE

    q, k, qid, kid, qlab, klab, si = make_case(4, 20, 8)
    mod = InfoNCE(temperature=0.2, unsup_weight=0.3, sup_weight=2.0, backend="torch")
    expect = info_nce(q, k, qid, kid, query_labels=qlab, key_labels=klab, self_index=si, temperature=0.2,
                      unsup_weight=0.3, sup_weight=2.0, backend="torch")
    torch.testing.assert_close(mod(q, k, qid, kid, qlab, klab, si), expect)
    # Without labels the supervised term is off rather than an error.
    torch.testing.assert_close(mod(q, k, qid, kid), info_nce(q, k, qid, kid, temperature=0.2, unsup_weight=0.3,
                                                             backend="torch"))
    with pytest.raises(ValueError, match="temperature must be positive"):
        InfoNCE(temperature=0)


def test_auto_picks_the_cpu_kernels_and_matches_the_reference(monkeypatch):
    import importlib

    mod = importlib.import_module("capkit.ops.info_nce")
    q = torch.randn(6, 24, requires_grad=True)
    k = torch.randn(50, 24)
    qid, kid = torch.arange(6), torch.randint(0, 8, (50,))
    qlab, klab = torch.randint(0, 2, (6,)), torch.randint(0, 2, (50,))
    kw = dict(query_labels=qlab, key_labels=klab, self_index=torch.tensor([0, -1, 3, -1, 7, 9]),
              unsup_weight=0.1, sup_weight=10.0)
    expected = "cpu" if _STREAMING["cpu"].unavailable_reason(CPU) is None else "torch"
    assert mod._choose(q) == expected
    assert mod._choose(q.double()) == "torch"  # the kernels compute in float32
    calls = []
    real = _STREAMING["cpu"].forward
    monkeypatch.setattr(_STREAMING["cpu"], "forward", lambda *a: calls.append(1) or real(*a))
    auto = info_nce(q, k, qid, kid, **kw)
    (g_auto,) = torch.autograd.grad(auto, q)
    ref = info_nce(q, k, qid, kid, backend="torch", **kw)
    (g_ref,) = torch.autograd.grad(ref, q)
    assert len(calls) == (1 if expected == "cpu" else 0)
    torch.testing.assert_close(auto, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_auto, g_ref, rtol=1e-4, atol=1e-6)


def test_auto_on_gpus_prefers_triton_then_the_cuda_kernels(monkeypatch):
    import importlib
    from types import SimpleNamespace

    mod = importlib.import_module("capkit.ops.info_nce")
    query = SimpleNamespace(device=torch.device("cuda", 0), dtype=torch.float32)

    def present(*names):
        for name in ("triton", "cuda"):
            why = None if name in names else f"{name} missing"
            monkeypatch.setattr(_STREAMING[name], "unavailable_reason", lambda device, why=why: why)

    present("triton", "cuda")
    assert mod._choose(query) == "triton"
    present("cuda")
    assert mod._choose(query) == "cuda"  # streaming (O(B + M) memory) rather than the B x M reference
    present()
    assert mod._choose(query) == "torch"
