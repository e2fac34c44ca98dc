"""Mask thresholds by selection (capkit.pruning.topk): every method against torch.topk.

The radix method runs its Triton kernels under the interpreter on CPU, so its inputs stay small
(one ~100k tensor per test at most).
"""
import contextlib
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from conftest import triton_usable  # noqa: E402

from capkit.pruning.topk import (  # noqa: E402
    METHODS,
    global_topk_threshold,
    kept_count,
    kth_largest,
    topk_thresholds,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
RUNNABLE = ["sort", "kthvalue", "auto"] + (["radix"] if triton_usable() else [])
SIZES = [(1,), (7,), (127,), (3, 5), (100_003,)]


def reference(t: torch.Tensor, k: int) -> torch.Tensor:
    return torch.topk(t.detach().flatten().float(), k).values[-1]


def assert_threshold(t: torch.Tensor, k: int, v: torch.Tensor) -> None:
    """v is the k-th largest of t: same value as topk, +0.0 for a zero, and t >= v keeps >= k."""
    assert v.dtype == torch.float32 and v.dim() == 0 and v.device == t.device and not v.requires_grad
    expected = reference(t, k)
    assert v.item() == expected.item(), (k, v.item(), expected.item())
    if v.item() == 0:
        assert not torch.signbit(v), "a zero threshold is +0.0"
    f = t.detach().float()
    assert int((f > v).sum()) < k <= int((f >= v).sum())


@contextlib.contextmanager
def poisoned_outputs():
    """The radix kernel's float outputs start as NaN, so an unwritten threshold shows up."""
    if "radix" not in RUNNABLE:
        yield
        return
    from capkit.kernels import topk_select as tk

    real_empty = torch.empty

    def empty(*args, **kwargs):
        out = real_empty(*args, **kwargs)
        return out.fill_(float("nan")) if out.dtype.is_floating_point else out

    mp = pytest.MonkeyPatch()
    mp.setattr(tk.torch, "empty", empty)
    try:
        yield
    finally:
        mp.undo()


def ks_for(n: int):
    return sorted({1, n, int(torch.randint(1, n + 1, ()).item())})


# ---------------------------------------------------------------------------
# kept_count
# ---------------------------------------------------------------------------

def test_kept_count():
    assert kept_count(10, 0.5) == 5
    assert kept_count(10, 1.0) == 10
    assert kept_count(10, 0.01) == 1  # at least one element
    assert kept_count(1, 0.3) == 1
    assert kept_count(589_824, 0.03) == round(0.03 * 589_824)
    assert kept_count(7, 0.5) == 4 and kept_count(5, 0.5) == 2  # Python's round: half to even


@pytest.mark.parametrize("keep", [0, 0.0, -0.1, 1.5, float("nan"), float("inf"), True, "0.5", None])
def test_kept_count_rejects_bad_keep(keep):
    with pytest.raises(ValueError, match="keep must be a number in \\(0, 1\\]"):
        kept_count(10, keep)


def test_kept_count_rejects_bad_numel():
    with pytest.raises(ValueError, match="numel must be >= 1"):
        kept_count(0, 0.5)
    with pytest.raises(TypeError, match="numel must be an int"):
        kept_count(2.5, 0.5)


# ---------------------------------------------------------------------------
# kth_largest
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("method", RUNNABLE)
@pytest.mark.parametrize("shape", SIZES, ids=lambda s: "x".join(map(str, s)))
def test_kth_largest_random(method, shape):
    t = torch.randn(*shape, device=DEVICE)
    n = t.numel()
    ks = ks_for(n) if (n < 1000 or method != "radix") else [int(torch.randint(1, n + 1, ()).item())]
    with poisoned_outputs():
        for k in ks:
            assert_threshold(t, k, kth_largest(t, k, method=method))


@pytest.mark.parametrize("method", RUNNABLE)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_kth_largest_low_precision(method, dtype):
    t = (torch.randn(33, 17, device=DEVICE) * 100).to(dtype)
    for k in ks_for(t.numel()):
        assert_threshold(t, k, kth_largest(t, k, method=method))


@pytest.mark.parametrize("method", RUNNABLE)
def test_kth_largest_ties(method):
    # Integers in a small range: nearly every threshold is tied.
    small = torch.randint(-3, 4, (1000,), device=DEVICE).float()
    for k in ks_for(small.numel()) + [500]:
        assert_threshold(small, k, kth_largest(small, k, method=method))
    same = torch.full((127,), torch.randn(()).item(), device=DEVICE)
    for k in ks_for(same.numel()):
        v = kth_largest(same, k, method=method)
        assert v.item() == same[0].item()
        assert int((same >= v).sum()) == 127  # ties at the threshold are all kept


@pytest.mark.parametrize("method", RUNNABLE)
def test_kth_largest_special_values(method):
    inf = float("inf")
    mixed = torch.cat([torch.tensor([-inf, inf, inf, -0.0, 0.0, -0.0]), torch.randn(57)]).to(DEVICE)
    mixed = mixed[torch.randperm(mixed.numel(), device=DEVICE)]
    negative = -torch.rand(63, device=DEVICE) - 1e-3
    zeros = torch.tensor([-0.0, 0.0, -0.0, -0.0], device=DEVICE)
    tiny = torch.tensor([-1e-45, 1e-45, -0.0, 0.0, 1e-38, -1e-38, 3.4e38, -3.4e38], device=DEVICE)
    for t in (mixed, negative, zeros, tiny):
        for k in range(1, t.numel() + 1):
            if t.numel() > 8 and k not in ks_for(t.numel()):
                continue
            assert_threshold(t, k, kth_largest(t, k, method=method))


@pytest.mark.parametrize("method", RUNNABLE)
def test_kth_largest_any_layout(method):
    base = torch.randn(40, 33, device=DEVICE)
    for t in (base.t(), base[::3, 1::2], base.view(8, 5, 33).permute(2, 0, 1)):
        for k in ks_for(t.numel()):
            assert_threshold(t, k, kth_largest(t, k, method=method))


def test_kth_largest_ignores_autograd():
    t = torch.randn(9, 4, device=DEVICE, requires_grad=True)
    assert_threshold(t, 3, kth_largest(t, 3))


@pytest.mark.parametrize("k", [0, 16, -1, True, 2.0, None])
def test_kth_largest_rejects_bad_k(k):
    with pytest.raises(ValueError, match=r"k must be an int in \[1, 15\]"):
        kth_largest(torch.randn(3, 5), k)


@pytest.mark.parametrize("method", RUNNABLE)
def test_nan_is_an_error(method):
    t = torch.randn(50, device=DEVICE)
    t[int(torch.randint(0, 50, ()).item())] = float("nan") * (1 if torch.rand(()) < 0.5 else -1)
    with pytest.raises(ValueError, match="scores contains NaN"):
        kth_largest(t, 3, method=method)
    good = [torch.randn(5, device=DEVICE), torch.randn(6, device=DEVICE)]
    with pytest.raises(ValueError, match=r"tensors\[2\] contains NaN"):
        topk_thresholds(good + [t], 0.5, method=method)
    with pytest.raises(ValueError, match=r"tensors\[2\] contains NaN"):
        global_topk_threshold(good + [t], 0.5, method=method)


def test_bad_tensors_are_errors():
    with pytest.raises(ValueError, match="scores is empty"):
        kth_largest(torch.empty(0, 3), 1)
    with pytest.raises(TypeError, match="scores must be float32, float16 or bfloat16, got torch.int64"):
        kth_largest(torch.arange(5), 1)
    with pytest.raises(TypeError, match="scores must be float32, float16 or bfloat16, got torch.float64"):
        kth_largest(torch.randn(5, dtype=torch.float64), 1)
    with pytest.raises(TypeError, match="scores must be a torch.Tensor"):
        kth_largest([1.0, 2.0], 1)
    with pytest.raises(TypeError, match="tensors must be a sequence of tensors"):
        topk_thresholds(torch.randn(4, 4), 0.5)
    with pytest.raises(ValueError, match=r"tensors\[1\] is empty"):
        topk_thresholds([torch.randn(3), torch.randn(0)], 0.5)
    with pytest.raises(ValueError, match=r"tensors\[1\] is on meta but tensors\[0\] is on cpu"):
        topk_thresholds([torch.randn(3), torch.randn(3, device="meta")], 0.5)
    with pytest.raises(ValueError, match="keep has 1 entries but there are 2 tensors"):
        topk_thresholds([torch.randn(3), torch.randn(3)], [0.5])
    with pytest.raises(ValueError, match=r"keep\[1\] must be a number in \(0, 1\]"):
        topk_thresholds([torch.randn(3), torch.randn(3)], [0.5, 0.0])
    with pytest.raises(ValueError, match="tensors is empty"):
        global_topk_threshold([], 0.5)
    with pytest.raises(ValueError, match="keep must be a number"):
        global_topk_threshold([torch.randn(3)], 2)


def test_unknown_method_lists_the_valid_ones():
    with pytest.raises(ValueError, match="method must be one of \\('auto', 'sort', 'kthvalue', 'radix'\\)"):
        kth_largest(torch.randn(5), 1, method="quickselect")
    assert METHODS == ("auto", "sort", "kthvalue", "radix")


@pytest.mark.skipif(torch.cuda.is_available(), reason="on CUDA the radix method is available")
def test_radix_unavailable_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="method 'radix' cannot run here: .*(GPU|triton)"):
        topk_thresholds([torch.randn(5)], 0.5, method="radix")
    # "auto" still works: it falls back to kthvalue.
    assert_threshold(torch.tensor([3.0, 1.0, 2.0]), 2, kth_largest(torch.tensor([3.0, 1.0, 2.0]), 2))


# ---------------------------------------------------------------------------
# batched and global thresholds
# ---------------------------------------------------------------------------

def mixed_batch():
    base = torch.randn(30, 41, device=DEVICE)
    return [
        torch.randn(1, device=DEVICE),
        torch.randn(7, device=DEVICE).half(),
        torch.randint(-2, 3, (127,), device=DEVICE).float(),
        torch.randn(3, 5, device=DEVICE),
        base.t(),  # dense but not contiguous: read in place
        base[::2, ::3],  # not dense: copied
        torch.full((64,), -0.0, device=DEVICE),
        torch.randn(20_001, device=DEVICE).bfloat16(),
    ]


@pytest.mark.parametrize("method", RUNNABLE)
def test_topk_thresholds_batched(method):
    tensors = mixed_batch()
    keeps = [float(f) for f in torch.rand(len(tensors)).clamp_min(0.01)]
    with poisoned_outputs():
        for keep in (keeps, 1.0, 1e-9, 0.1):
            out = topk_thresholds(tensors, keep, method=method)
            assert out.shape == (len(tensors),) and out.dtype == torch.float32 and out.device.type == DEVICE
            for i, t in enumerate(tensors):
                k = kept_count(t.numel(), keep[i] if isinstance(keep, list) else keep)
                assert_threshold(t, k, out[i])


@pytest.mark.parametrize("method", RUNNABLE)
def test_global_threshold_is_topk_of_the_concatenation(method):
    tensors = mixed_batch()
    flat = torch.cat([t.detach().flatten().float() for t in tensors])
    with poisoned_outputs():
        for keep in (1.0, 0.5, 0.03, 1e-9):
            k = kept_count(flat.numel(), keep)
            assert_threshold(flat, k, global_topk_threshold(tensors, keep, method=method))


@pytest.mark.skipif("radix" not in RUNNABLE, reason="needs triton (a GPU or the interpreter)")
def test_radix_splits_long_tensor_lists(monkeypatch):
    from capkit.kernels import topk_select as tk

    monkeypatch.setattr(tk, "_MAX_GRID_DIM", 3)  # 8 tensors -> launches of 3, 3 and 2 (per dtype)
    tensors = mixed_batch()
    out = topk_thresholds(tensors, 0.3, method="radix")
    for i, t in enumerate(tensors):
        assert_threshold(t, kept_count(t.numel(), 0.3), out[i])


@pytest.mark.skipif("radix" not in RUNNABLE, reason="needs triton (a GPU or the interpreter)")
def test_radix_refuses_rows_beyond_int32_counts(monkeypatch):
    from capkit.kernels import topk_select as tk

    monkeypatch.setattr(tk, "_MAX_ROW_ELEMS", 100)
    t = torch.randn(100, device=DEVICE)
    assert_threshold(t, 5, kth_largest(t, 5, method="radix"))
    with pytest.raises(ValueError, match="a row may hold at most 100 elements, got 101"):
        global_topk_threshold([torch.randn(50, device=DEVICE), torch.randn(51, device=DEVICE)], 0.5, method="radix")


def test_empty_batch():
    out = topk_thresholds([], 0.5)
    assert out.shape == (0,) and out.dtype == torch.float32


@pytest.mark.gpu
def test_radix_on_bert_base_shapes():
    shapes = [(768, 768)] * 4 + [(3072, 768), (768, 3072)]
    tensors = [torch.randn(*s, device="cuda") for _ in range(12) for s in shapes]
    for keep in (0.5, 0.1, 0.03):
        out = topk_thresholds(tensors, keep, method="radix")
        assert torch.equal(out, topk_thresholds(tensors, keep, method="auto"))
        expected = torch.stack([reference(t, kept_count(t.numel(), keep)) for t in tensors])
        assert torch.equal(out, expected)
        flat = torch.cat([t.flatten() for t in tensors])
        assert global_topk_threshold(tensors, keep, method="radix").item() == \
            reference(flat, kept_count(flat.numel(), keep)).item()


def test_cpu_kthvalue_helper_threads_end_with_the_call():
    # A lasting helper thread that ran a torch op keeps its own OpenMP team, which slows every
    # later parallel op of the process; the selection threads must be gone once it returns.
    import threading

    if torch.get_num_threads() < 2:
        pytest.skip("the threaded selection runs with two or more intra-op threads")
    tensors = [torch.randn(5000), torch.randn(3000), torch.randn(4000)]
    got = topk_thresholds(tensors, 0.1, method="kthvalue")
    want = torch.stack([reference(t, kept_count(t.numel(), 0.1)) for t in tensors])
    torch.testing.assert_close(got, want)
    assert not [t for t in threading.enumerate() if t.name.startswith("capkit-topk")]
