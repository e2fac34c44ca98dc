"""``info_nce``: CAP's multi-positive contrastive loss in one streaming pass over the keys.

For queries ``q [B, d]`` (the only input with a gradient) and keys ``[M, d]``, with
``s_ij = q_i . k_j / temperature`` (both L2-normalised when ``normalize``), key ``j`` is left out
for query ``i`` when ``j == self_index[i]``; ``lp_ij = s_ij - log sum_j' exp(s_ij')`` over the
keys that are not left out. Positives of query ``i``: ``P_u`` = keys with ``key_ids == query_ids[i]``
(unsupervised), ``P_s`` = keys with ``key_labels == query_labels[i]`` (supervised). Each term
``t`` with weight ``w_t`` is

* ``normalization="cap"``: ``-w_t / (sum_i |P_i|) * sum_i (1/|P_i|) sum_{p in P_i} lp_ip``
  (the reference code's double normalisation), or
* ``normalization="mean"``: ``-w_t * mean over queries with positives of mean_{p in P_i} lp_ip``;

queries without positives add nothing. The two terms share one log-sum-exp per query.

The fast backends never hold the ``B x M`` score matrix: a forward pass streams the keys once
and returns five numbers per query (log-sum-exp, and the sum and count of positive scores of
each term); the backward streams them again to form ``dq``.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F

from capkit.ops import _library  # noqa: F401  (registers capkit::info_nce_stats)
from capkit.ops._backends import get_backend

__all__ = ["info_nce", "info_nce_reference", "INFO_NCE_BACKENDS"]

INFO_NCE_BACKENDS = ("torch", "triton", "cuda", "cpu")
_NORMALIZATIONS = ("cap", "mean")
_EPS = 1e-12  # as F.normalize


def _check_inputs(query, keys, query_ids, key_ids, query_labels, key_labels, self_index, temperature,
                  unsup_weight, sup_weight, normalization):
    for name, t in (("query", query), ("keys", keys)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 2:
            raise ValueError(f"{name} must be 2-D [rows, dim], got shape {tuple(t.shape)}")
        if not t.dtype.is_floating_point:
            raise TypeError(f"{name} must be floating point, got {t.dtype}")
    b, d = query.shape
    m = keys.shape[0]
    if keys.shape[1] != d:
        raise ValueError(f"keys have dimension {keys.shape[1]} but query has {d}")
    if keys.device != query.device:
        raise ValueError(f"keys are on {keys.device} but query is on {query.device}")

    def check_index(name, t, n):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.int64 or t.dim() != 1:
            got = f"{t.dtype} of shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise TypeError(f"{name} must be a 1-D int64 tensor, got {got}")
        if t.shape[0] != n:
            raise ValueError(f"{name} must have {n} entries (one per row of "
                             f"{'query' if name.startswith(('query', 'self')) else 'keys'}), got {t.shape[0]}")
        if t.device != query.device:
            raise ValueError(f"{name} is on {t.device} but query is on {query.device}")

    check_index("query_ids", query_ids, b)
    check_index("key_ids", key_ids, m)
    if (query_labels is None) != (key_labels is None):
        raise ValueError("query_labels and key_labels must be given together")
    if query_labels is not None:
        check_index("query_labels", query_labels, b)
        check_index("key_labels", key_labels, m)
    elif sup_weight != 0:
        raise ValueError(f"sup_weight={sup_weight} needs query_labels and key_labels")
    if self_index is not None:
        check_index("self_index", self_index, b)
        # (a value check needs the data: not while torch.compile traces)
        if b and not torch.compiler.is_compiling() and (bool((self_index < -1).any())
                                                        or bool((self_index >= m).any())):
            raise ValueError(f"self_index entries must lie in [-1, {m}), -1 meaning none")
    if not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"temperature must be a positive number, got {temperature!r}")
    if normalization not in _NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {_NORMALIZATIONS}, got {normalization!r}")
    for name, w in (("unsup_weight", unsup_weight), ("sup_weight", sup_weight)):
        if not isinstance(w, (int, float)):
            raise TypeError(f"{name} must be a number, got {type(w).__name__}")


def _term_weights(cnt: torch.Tensor, weight: float, normalization: str) -> torch.Tensor:
    """Per-query factor omega_i with L_t = -sum_i omega_i * mean_{p in P_i} lp_ip."""
    has = cnt > 0
    # "cap": 1 / (total number of positives) for every query (the reference's double
    # normalisation); "mean": 1 / (number of queries that have positives).
    denom = cnt.sum() if normalization == "cap" else has.sum().to(cnt.dtype)
    return torch.where(has, weight / denom.clamp_min(1), torch.zeros_like(cnt))


def info_nce_reference(query, keys, query_ids, key_ids, *, query_labels=None, key_labels=None, self_index=None,
                       temperature=0.1, unsup_weight=1.0, sup_weight=0.0, normalization="cap", normalize=True):
    """The definition: ``mm`` + ``log_softmax`` + masked means over the full ``B x M`` matrix."""
    dtype = torch.promote_types(query.dtype, torch.float32)
    q = query.to(dtype)
    k = keys.to(dtype)
    if normalize:
        q = F.normalize(q, dim=1, eps=_EPS)
        k = F.normalize(k, dim=1, eps=_EPS)
    logits = q @ k.t() / temperature
    b, m = logits.shape
    valid = torch.ones(b, m, dtype=torch.bool, device=q.device)
    if self_index is not None:
        rows = torch.nonzero(self_index >= 0).squeeze(1)
        valid[rows, self_index[rows]] = False
    # Rows with no key at all have no positives; keep them finite so no NaN reaches the gradient.
    empty_row = ~valid.any(1, keepdim=True)
    logits = torch.where(valid, logits, torch.full_like(logits, float("-inf")))
    logits = torch.where(empty_row, torch.zeros_like(logits), logits)
    lp = torch.log_softmax(logits, dim=1)
    loss = logits.new_zeros(())
    terms = [(query_ids, key_ids, unsup_weight)]
    if query_labels is not None and sup_weight != 0:
        terms.append((query_labels, key_labels, sup_weight))
    for qv, kv, w in terms:
        if w == 0:
            continue
        pos = (qv[:, None] == kv[None, :]) & valid
        cnt = pos.sum(1).to(dtype)
        mean_lp = torch.where(pos, lp, torch.zeros_like(lp)).sum(1) / cnt.clamp_min(1)
        loss = loss - (_term_weights(cnt, float(w), normalization) * mean_lp).sum()
    return loss


# ------------------------------------------------------------------------------------------
# Streaming backends: forward -> stats [B, 5] = (lse, sum_u, cnt_u, sum_s, cnt_s) of the scores
# s_ij = (qs_i . k_j) * key_scale_j, with qs = normalised query / temperature (fp32) and
# key_scale the keys' inverse norms (or None); backward -> dqs [B, d] given lse and the
# per-query coefficients coef [B, 3] = (a_u, a_s, c) of dL/ds_ij = a_u [j in P_u] + a_s [j in P_s]
# + c softmax_ij.


class _ExtensionStreaming:
    """Kernels of capkit._C behind ``torch.ops.capkit.info_nce_*``: the C++ CPU kernels, or the CUDA
    C++ ones (csrc/cuda/info_nce.cu) when the extension was built with CUDA; the dispatcher picks by
    the tensors' device."""

    def __init__(self, name: str, dispatch_key: str):
        self.name, self._key = name, dispatch_key

    def unavailable_reason(self, device: torch.device) -> Optional[str]:
        why = get_backend(self.name).unavailable_reason(device)  # extension present, tensors on its device
        if why is None and not torch._C._dispatch_has_kernel_for_dispatch_key("capkit::info_nce_forward", self._key):
            why = f"capkit._C was built without the {self.name} info_nce kernels"
        return why

    def forward(self, *args):
        return torch.ops.capkit.info_nce_forward(*args)

    def backward(self, *args):
        return torch.ops.capkit.info_nce_backward(*args)


class _TritonStreaming:
    """Triton kernels of capkit.kernels.info_nce."""

    name = "triton"

    def unavailable_reason(self, device: torch.device) -> Optional[str]:
        return get_backend("triton").unavailable_reason(device)  # same requirements as masked_linear's

    @functools.cached_property
    def _module(self):
        from capkit.kernels import info_nce as mod

        return mod

    def forward(self, *args):
        return self._module.info_nce_forward(*args)

    def backward(self, *args):
        return self._module.info_nce_backward(*args)


_STREAMING = {"triton": _TritonStreaming(), "cuda": _ExtensionStreaming("cuda", "CUDA"),
              "cpu": _ExtensionStreaming("cpu", "CPU")}


def _streaming_loss(query, keys, qid, kid, qlab, klab, self_index, temperature, w_u, w_s, normalization,
                    normalize, backend):
    """The loss from the streaming statistics (custom op ``capkit::info_nce_stats``); autograd
    differentiates the normalisation and the term weights, the op's registered backward the pass
    over the keys."""
    qf = query.float()
    if normalize:
        qn = qf / qf.norm(dim=1, keepdim=True).clamp_min(_EPS)
        key_scale = (1.0 / keys.float().norm(dim=1).clamp_min(_EPS)).contiguous()
    else:
        qn, key_scale = qf, None
    qs = (qn / temperature).contiguous()
    stats = torch.ops.capkit.info_nce_stats(qs, keys.contiguous(), key_scale, qid, kid, qlab, klab, self_index,
                                            backend)
    lse, sum_u, cnt_u, sum_s, cnt_s = stats.unbind(1)
    cnt_u, cnt_s = cnt_u.detach(), cnt_s.detach()
    loss = lse.new_zeros(())
    for total, cnt, w in ((sum_u, cnt_u, w_u), (sum_s, cnt_s, w_s if qlab is not None else 0.0)):
        omega = _term_weights(cnt, float(w), normalization)
        mean_lp = (total / cnt.clamp_min(1) - lse).where(cnt > 0, torch.zeros_like(lse))
        loss = loss - (omega * mean_lp).sum()
    return loss.to(torch.promote_types(query.dtype, torch.float32))


def info_nce(query, keys, query_ids, key_ids, *, query_labels=None, key_labels=None, self_index=None,
             temperature=0.1, unsup_weight=1.0, sup_weight=0.0, normalization="cap", normalize=True,
             backend="auto"):
    """Multi-positive InfoNCE of CAP (see the module docstring for the exact definition).

    Args:
        query: ``[B, d]`` anchors (the gradient flows to them, through the normalisation).
        keys: ``[M, d]`` candidates, no gradient (banks, detached copies); fp16/bf16 keys are
            read as they are and accumulated in fp32.
        query_ids, key_ids: int64 ``[B]`` / ``[M]``: equal ids make unsupervised positives.
        query_labels, key_labels: optional int64: equal labels make supervised positives.
        self_index: optional int64 ``[B]``: the key column holding query i's own copy, left out
            of numerator and denominator (-1: none).
        temperature: > 0. unsup_weight, sup_weight: term weights. normalization: "cap" or "mean".
        normalize: L2-normalise query and keys inside the op.
        backend: "auto", "torch" (reference, materialises B x M), "triton", "cuda" (CUDA C++), "cpu".
    Returns:
        A scalar loss (float32, or float64 for float64 queries).
    """
    _check_inputs(query, keys, query_ids, key_ids, query_labels, key_labels, self_index, temperature,
                  unsup_weight, sup_weight, normalization)
    if keys.requires_grad:
        keys = keys.detach()  # keys never receive a gradient (documented: banks, detached copies)
    if backend == "auto":
        backend = _choose(query)
    if backend == "torch":
        return info_nce_reference(query, keys, query_ids, key_ids, query_labels=query_labels,
                                  key_labels=key_labels, self_index=self_index, temperature=temperature,
                                  unsup_weight=unsup_weight, sup_weight=sup_weight, normalization=normalization,
                                  normalize=normalize)
    if backend not in _STREAMING:
        raise ValueError(f"backend must be one of {('auto',) + INFO_NCE_BACKENDS}, got {backend!r}")
    if not torch.compiler.is_compiling():
        why = _STREAMING[backend].unavailable_reason(query.device)
        if why is not None:
            raise RuntimeError(f"info_nce: backend '{backend}' cannot run here: {why}")
    if query.shape[0] == 0:
        return query.sum() * 0.0
    if query.dtype == torch.float64:
        raise TypeError("the streaming backends compute in float32; use backend='torch' for float64 queries")
    return _streaming_loss(query, keys, query_ids, key_ids, query_labels, key_labels, self_index,
                           float(temperature), float(unsup_weight), float(sup_weight), normalization,
                           bool(normalize), backend)


def _choose(query: torch.Tensor) -> str:
    return _choose_for(query.device, query.dtype)


@torch.compiler.assume_constant_result
def _choose_for(device: torch.device, dtype: torch.dtype) -> str:
    # A constant while torch.compile traces (the backends present do not change within a run).
    # GPUs: the streaming Triton kernel (tensor cores), else the CUDA C++ one (fp32 on the CUDA
    # cores; no GPU timing yet to rank it above Triton). CPUs: the C++
    # streaming kernels, which beat the reference at every shape measured on the 2-core machine
    # (benchmarks/results/amd-epyc-2c/info_nce_quick.md, forward+backward): B 4 x M 64 x d 32
    # 1.48x, CAP's 32 x 4,200 x 768 1.62x, 256 x 65,536 x 768 2.25x; the reference for float64
    # (the kernels compute in float32).
    if device.type == "cuda":
        # without Triton, the CUDA C++ kernels: streaming keeps the memory O(B + M)
        for name in ("triton", "cuda"):
            if _STREAMING[name].unavailable_reason(device) is None:
                return name
    if (device.type == "cpu" and dtype != torch.float64
            and _STREAMING["cpu"].unavailable_reason(device) is None):
        return "cpu"
    return "torch"
