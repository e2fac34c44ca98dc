"""Mask thresholds by selection: movement pruning's top-k without sorting.

Movement pruning keeps, in every weight matrix, the fraction ``keep`` of the weights with the
highest scores. The reference code sorted every score matrix on every forward; only the k-th
largest score is needed, and selection finds it in linear time. Methods:

* ``"sort"``: a full sort per tensor (the reference's way; for tests and as a benchmark baseline);
* ``"kthvalue"``: ``torch.kthvalue`` per tensor (quickselect on CPU); the default on CPU;
* ``"radix"``: a Triton radix select (:mod:`capkit.kernels.topk_select`) over all tensors at
  once: 4 passes of 8 bits, one histogram launch per pass, no host synchronisation until the
  final NaN check; the default on CUDA when triton is importable;
* ``"auto"``: the default of the tensors' device.

Thresholds and the tie rule: for a tensor of ``n`` elements, ``k = kept_count(n, keep)`` and the
threshold ``v`` is its k-th largest value (``torch.topk(t.flatten(), k).values[-1]``). The mask
``t >= v`` keeps the k largest elements and every other element equal to ``v``: at least k,
exactly k when no element outside the top k equals ``v``. All methods return the same ``v``.
Values are compared in float32 (float16 and bfloat16 convert exactly); -0.0 equals +0.0 and a
zero threshold is returned as +0.0; infinities are ordinary values; NaN is an error. Thresholds
never carry a gradient.
"""
from __future__ import annotations

import numbers
import operator
from typing import List, Sequence, Union

import torch

from capkit.ops._backends import get_backend

__all__ = ["METHODS", "kept_count", "kth_largest", "topk_thresholds", "global_topk_threshold"]

METHODS = ("auto", "sort", "kthvalue", "radix")
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_keep(keep, name: str = "keep") -> float:
    if isinstance(keep, bool) or not isinstance(keep, numbers.Real) or not 0 < keep <= 1:
        raise ValueError(f"{name} must be a number in (0, 1] (the fraction of elements kept), got {keep!r}")
    return float(keep)


def kept_count(numel: int, keep: float) -> int:
    """Number of elements a mask keeps: ``max(1, min(numel, round(keep * numel)))``.

    Args:
        numel: number of elements, >= 1.
        keep: fraction kept, in (0, 1].
    """
    keep = _check_keep(keep)
    try:
        numel = operator.index(numel)
    except TypeError:
        raise TypeError(f"numel must be an int, got {type(numel).__name__}") from None
    if numel < 1:
        raise ValueError(f"numel must be >= 1, got {numel}")
    return max(1, min(numel, int(round(keep * numel))))


def _check_tensor(t, name: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")
    if t.numel() == 0:
        raise ValueError(f"{name} is empty: a threshold needs at least one element")
    return t.detach()


def _check_tensors(tensors, name: str = "tensors") -> List[torch.Tensor]:
    if isinstance(tensors, torch.Tensor) or not isinstance(tensors, Sequence):
        raise TypeError(f"{name} must be a sequence of tensors (a list or tuple), got {type(tensors).__name__}")
    out = [_check_tensor(t, f"{name}[{i}]") for i, t in enumerate(tensors)]
    for i, t in enumerate(out[1:], 1):
        if t.device != out[0].device:
            raise ValueError(f"{name}[{i}] is on {t.device} but {name}[0] is on {out[0].device}: "
                             "all tensors must be on one device")
    return out


def _resolve_method(method, device: torch.device) -> str:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    triton_missing = get_backend("triton").unavailable_reason(device)
    if method == "auto":
        return "radix" if device.type == "cuda" and triton_missing is None else "kthvalue"
    if method == "radix" and triton_missing is not None:
        raise RuntimeError(f"method 'radix' cannot run here: {triton_missing}")
    return method


def _flat32(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).to(torch.float32)


def _positive_zero(v: torch.Tensor) -> torch.Tensor:
    return v + 0.0  # -0.0 + 0.0 == +0.0: the same zero from every method


def _raise_nan(name: str) -> None:
    raise ValueError(f"{name} contains NaN: thresholds are defined for NaN-free scores")


def _check_no_nan(flats: Sequence[torch.Tensor], names: Sequence[str]) -> None:
    # torch.max propagates NaN: one read per tensor, one host synchronisation for all.
    has_nan = torch.stack([f.max() for f in flats]).isnan()
    if bool(has_nan.any()):
        _raise_nan(names[int(has_nan.nonzero()[0, 0])])


def _select(flat: torch.Tensor, k: int, method: str) -> torch.Tensor:
    """k-th largest of a NaN-free float32 vector by a torch method."""
    if method == "sort":
        return torch.sort(flat, descending=True).values[k - 1]
    return torch.kthvalue(flat, flat.numel() - k + 1).values


def _radix(tensors: List[torch.Tensor], rows: List[int], ks: List[int], names: List[str]) -> torch.Tensor:
    from capkit.kernels import topk_select

    values, nan_counts = topk_select.kth_largest_rows(tensors, rows, ks)
    if bool(nan_counts.any()):  # the one host synchronisation of the radix path
        for t, name in zip(tensors, names):
            if bool(t.isnan().any()):
                _raise_nan(name)
    return values


def kth_largest(scores: torch.Tensor, k: int, *, method: str = "auto") -> torch.Tensor:
    """The k-th largest element of ``scores`` (all elements, whatever the shape).

    Equal to ``torch.topk(scores.flatten().float(), k).values[-1]``, up to the sign of a zero.

    Args:
        scores: float32/float16/bfloat16 tensor, non-empty, without NaN.
        k: 1 <= k <= scores.numel().
        method: "auto", "sort", "kthvalue" or "radix" (see the module docstring).
    Returns:
        A 0-d float32 tensor on ``scores``' device.
    """
    scores = _check_tensor(scores, "scores")
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 1 <= k <= scores.numel():
        raise ValueError(f"k must be an int in [1, {scores.numel()}] (scores has {scores.numel()} elements), "
                         f"got {k!r}")
    return _thresholds_for_counts([scores], [int(k)], method=method, names=["scores"])[0]


def _thresholds_for_counts(tensors: Sequence[torch.Tensor], ks: Sequence[int], *, method: str = "auto",
                               names: Sequence[str] = ()) -> torch.Tensor:
    """Per-tensor k-th largest values of checked tensors, given the counts."""
    names = list(names) or [f"tensors[{i}]" for i in range(len(tensors))]
    if not tensors:
        return torch.empty(0, dtype=torch.float32)
    method = _resolve_method(method, tensors[0].device)
    if method == "radix":
        return _radix(list(tensors), list(range(len(tensors))), list(ks), names)
    flats = [_flat32(t) for t in tensors]
    _check_no_nan(flats, names)
    if method == "kthvalue" and len(flats) > 1 and flats[0].device.type == "cpu" and torch.get_num_threads() > 1:
        # torch.kthvalue runs on one core; the selections are independent, so spread them over
        # the intra-op threads (the GIL is released inside the op). The threads end with the call:
        # a torch op on a lasting helper thread keeps an OpenMP team of its own alive, and with
        # more OpenMP threads than cores libgomp stops spinning at its barriers, which doubled the
        # cost of every later small parallel op of the process (a 128-token sparse linear: 80 ->
        # 150 us, measured on the 2-core Xeon).
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=torch.get_num_threads(), thread_name_prefix="capkit-topk") as pool:
            values = list(pool.map(lambda fk: _select(fk[0], fk[1], method), zip(flats, ks)))
    else:
        values = [_select(f, k, method) for f, k in zip(flats, ks)]
    return _positive_zero(torch.stack(values))


def topk_thresholds(tensors: Sequence[torch.Tensor], keep: Union[float, Sequence[float]], *,
                    method: str = "auto") -> torch.Tensor:
    """Per-tensor top-k thresholds of many score tensors in one call.

    Args:
        tensors: a list or tuple of float32/float16/bfloat16 tensors on one device, each
            non-empty and without NaN (any shapes; each tensor is one selection).
        keep: the fraction kept, in (0, 1]: one for all tensors, or one per tensor.
        method: "auto", "sort", "kthvalue" or "radix" (see the module docstring).
    Returns:
        float32 ``[len(tensors)]`` on the tensors' device: ``out[i]`` is the
        ``kept_count(tensors[i].numel(), keep_i)``-th largest element of ``tensors[i]``, so
        ``tensors[i] >= out[i]`` keeps at least that many elements (exactly that many without
        ties at the threshold).
    """
    tensors = _check_tensors(tensors)
    if isinstance(keep, Sequence) and not isinstance(keep, str):
        if len(keep) != len(tensors):
            raise ValueError(f"keep has {len(keep)} entries but there are {len(tensors)} tensors: "
                             "give one fraction, or one per tensor")
        keeps = [_check_keep(f, f"keep[{i}]") for i, f in enumerate(keep)]
    else:
        keeps = [_check_keep(keep)] * len(tensors)
    ks = [kept_count(t.numel(), f) for t, f in zip(tensors, keeps)]
    return _thresholds_for_counts(tensors, ks, method=method)


def global_topk_threshold(tensors: Sequence[torch.Tensor], keep: float, *, method: str = "auto") -> torch.Tensor:
    """One threshold over all tensors together (global top-k, e.g. global magnitude pruning).

    Args:
        tensors: a non-empty list or tuple of float32/float16/bfloat16 tensors on one device,
            each non-empty and without NaN.
        keep: the fraction of all their elements kept, in (0, 1].
        method: "auto", "sort", "kthvalue" or "radix" (see the module docstring). "sort" and
            "kthvalue" select from a float32 concatenation of the tensors; "radix" reads them in place.
    Returns:
        A 0-d float32 tensor: the ``kept_count(total, keep)``-th largest element of the
        concatenation, so ``t >= threshold`` over all tensors keeps at least that many elements.
    """
    tensors = _check_tensors(tensors)
    if not tensors:
        raise ValueError("tensors is empty: a global threshold needs at least one tensor")
    k = kept_count(sum(t.numel() for t in tensors), _check_keep(keep))
    names = [f"tensors[{i}]" for i in range(len(tensors))]
    method = _resolve_method(method, tensors[0].device)
    if method == "radix":
        return _radix(tensors, [0] * len(tensors), [k], names)[0]
    flats = [_flat32(t) for t in tensors]
    _check_no_nan(flats, names)
    return _positive_zero(_select(torch.cat(flats), k, method))
