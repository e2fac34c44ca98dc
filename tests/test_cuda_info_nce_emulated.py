"""The CUDA C++ InfoNCE kernels run on the CPU: csrc/cuda/info_nce.cu compiled as host C++ against
tests/cuda_emu/ (each CTA as real threads meeting at barriers, warp shuffles as exchanges), put
behind ``info_nce(backend="cuda")`` and checked by the GPU suite's own helpers
(tests/test_cuda_info_nce.py: float64 reference, loss and gradient, raw statistics) on shapes
small enough to emulate. This checks the kernels' tiling, indexing, masks, online log-sum-exp, key
splits and merge kernels without a GPU; timing, memory coalescing and the ATen bindings need one."""
import ctypes

import pytest
import test_cuda_info_nce as gpu_suite
import torch
from _cuda_emu import build
from _cuda_emu import pointer as _ptr

from capkit.ops.info_nce import _STREAMING

KEY_TYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    dll = build(tmp_path_factory.mktemp("cuda_emu"), "info_nce.cu", "info_nce_host.cpp")
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    common = [p, p, i32, p, p, p, p, p, p, i64, i64, i64, i32, i32]
    dll.emu_info_nce_forward.argtypes = common + [p]
    dll.emu_info_nce_backward.argtypes = common + [p, p, p]
    dll.emu_info_nce_splits.argtypes = [i64, i64, i64, i32, i32, i32]
    for f in (dll.emu_info_nce_forward, dll.emu_info_nce_backward, dll.emu_info_nce_splits):
        f.restype = i32
    return dll


class Emulated:
    """The ``_STREAMING`` interface over the emulated CUDA launchers, for CPU tensors; outputs poisoned
    with NaN first."""

    name = "cuda"

    def __init__(self, lib, num_sms=4, num_splits=0):
        self.lib, self.num_sms, self.num_splits = lib, num_sms, num_splits

    def unavailable_reason(self, device):
        return None if device.type == "cpu" else "the emulated kernels take CPU tensors"

    def _common(self, qs, keys, key_scale, qid, kid, qlab, klab, si):
        return [_ptr(qs), _ptr(keys), KEY_TYPES[keys.dtype], _ptr(key_scale), _ptr(qid), _ptr(kid), _ptr(qlab),
                _ptr(klab), _ptr(si), qs.shape[0], keys.shape[0], qs.shape[1], self.num_sms, self.num_splits]

    def forward(self, *args):
        stats = torch.full((args[0].shape[0], 5), float("nan"))
        assert self.lib.emu_info_nce_forward(*self._common(*args), _ptr(stats)) == 0
        return stats

    def backward(self, *args):
        *args, lse, coef = args
        dqs = torch.full(tuple(args[0].shape), float("nan"))
        assert self.lib.emu_info_nce_backward(*self._common(*args), _ptr(lse), _ptr(coef), _ptr(dqs)) == 0
        return dqs


@pytest.fixture
def emulate(lib, monkeypatch):
    """``emulate(**options)``: the GPU suite's helpers on CPU tensors, backend "cuda" on the emulated
    kernels (options: num_sms, num_splits)."""

    def use(**options):
        impl = Emulated(lib, **options)
        monkeypatch.setattr(gpu_suite, "DEV", "cpu")
        monkeypatch.setitem(_STREAMING, "cuda", impl)
        return impl

    return use


@pytest.mark.parametrize("b,m,d", [(1, 1, 3), (1, 7, 16), (7, 127, 33), (40, 300, 70), (5, 3, 100), (33, 1000, 48)])
@pytest.mark.parametrize("labels", [False, True])
@pytest.mark.parametrize("normalization", ["cap", "mean"])
def test_matches_reference(emulate, b, m, d, labels, normalization):
    emulate()
    gpu_suite.check(gpu_suite.make_case(b, m, d, labels=labels), normalization=normalization)


@pytest.mark.parametrize("num_splits", [1, 2, 3, 64])
def test_every_key_split_gives_the_same_loss(emulate, num_splits):
    # one split writes dq itself; more go through the partials and the merge / sum kernels
    emulate(num_splits=num_splits)
    gpu_suite.check(gpu_suite.make_case(37, 1000, 40))


@pytest.mark.parametrize("key_dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision_keys(emulate, key_dtype):
    emulate()
    gpu_suite.check(gpu_suite.make_case(9, 200, 48, key_dtype=key_dtype), grad_rtol=2e-3)


@pytest.mark.parametrize("temperature,normalize", [(0.05, True), (1.0, True), (0.5, False)])
def test_temperatures_and_unnormalised(emulate, temperature, normalize):
    emulate()
    q, k, *rest = gpu_suite.make_case(20, 150, 24)
    if not normalize:
        q, k = q * 0.3, k * 0.3
    gpu_suite.check((q, k, *rest), temperature=temperature, normalize=normalize)


def test_raw_statistics_and_left_out_rows(emulate):
    impl = emulate()
    q, k, qid, kid, qlab, klab, _ = gpu_suite.make_case(40, 130, 36)
    si = torch.randint(-1, 130, (40,))
    gpu_suite.check_stats((q, k, qid, kid, qlab, klab, si), rtol=1e-5, atol=1e-4)
    # one key that is the query's own copy: nothing is kept (lse -inf, no positives), and dq is zero
    one = torch.randn(1, 8)
    ids = torch.zeros(1, dtype=torch.long)
    st = impl.forward(one, one, None, ids, ids, None, None, ids)
    assert st[0, 0] == float("-inf") and st[0, 1:].tolist() == [0.0, 0.0, 0.0, 0.0]
    dq = impl.backward(one, one, None, ids, ids, None, None, ids, st[:, 0].contiguous(), torch.ones(1, 3))
    assert torch.equal(dq, torch.zeros_like(dq))


def test_empty_bank(emulate):
    impl = emulate()
    q = torch.randn(3, 8)
    k = torch.empty(0, 8)
    e = torch.empty(0, dtype=torch.long)
    st = impl.forward(q, k, None, torch.arange(3), e, None, None, None)
    assert (st[:, 0] == float("-inf")).all() and (st[:, 1:] == 0).all()
    dq = impl.backward(q, k, None, torch.arange(3), e, None, None, None, st[:, 0].contiguous(), torch.ones(3, 3))
    assert torch.equal(dq, torch.zeros_like(dq))


def test_gpu_suite_edge_cases(emulate):
    emulate()
    gpu_suite.test_queries_without_positives_and_self_only_keys()
    gpu_suite.test_empty_bank_gives_zero_loss()


def test_key_split_rule(lib):
    splits = lib.emu_info_nce_splits
    # about 4 CTAs per SM: 132 SMs, one query block, 66 key tiles of 64 -> one tile each
    assert splits(32, 4200, 768, 132, 0, 0) == 66
    assert splits(4096, 1 << 20, 768, 132, 0, 0) == 5  # 128 query blocks: 528 / 128 -> 5 splits
    assert splits(32, 64, 8, 132, 0, 0) == 1  # a single tile is never split
    assert splits(40, 300, 8, 4, 0, 0) == 5  # 8 wanted, only 5 tiles
    assert splits(40, 300, 8, 4, 4, 0) == 3  # 4 asked for: 2 tiles each leaves one empty, so 3
    # the backward's fp32 partials stay within 1 GiB: B * d * 4 bytes = 256 MiB per split
    assert splits(32, 1 << 20, 2 << 20, 132, 0, 1) == 4
