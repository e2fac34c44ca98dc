"""Triton radix select: the k-th largest element of many tensors at once (mask thresholds).

Every float is mapped to an order-preserving uint32 key (the sign bit flipped for positives, all
bits flipped for negatives, -0.0 read as +0.0), so the k-th largest float is the float of the
k-th largest key. The key is found 8 bits at a time, from the top, in 4 passes:

* one histogram launch per pass (and per input dtype) covers all tensors: program ``(c, t)``
  reads chunk ``c`` of tensor ``t`` through a table of data pointers (no copy of the inputs),
  counts the current digit of the elements whose higher digits equal the prefix chosen so far,
  in a private histogram, and adds it atomically to row ``rows[t]`` of an int32
  ``[n_rows, 256]`` histogram. Several tensors may share a row (a global threshold);
* one tiny select launch (a program per row) finds the bucket holding the k-th largest key
  (reverse cumulative counts), appends its digit to the prefix and subtracts the count of the
  higher buckets from k. The last pass converts the full key back to the float.

Nothing waits for the host between launches. The first pass also counts the NaNs of every row
(they are keyed above +inf or below -inf) so that the caller can refuse them.
"""
from __future__ import annotations

import functools
from typing import List, Sequence, Tuple

import torch
import triton
import triton.language as tl

from ._common import INTERPRET as _INTERPRET, on_device

__all__ = ["kth_largest_rows"]

_RADIX_BITS = 8
_NUM_BINS = 1 << _RADIX_BITS
_SHIFTS = (24, 16, 8, 0)  # digit positions, most significant first

# One fixed config each (no autotuning). GPUs: a chunk of several blocks per program, so the
# private histogram is flushed to global memory once per 8192 elements. The interpreter pays
# per operation, not per element: large blocks, and two of them so the loop is exercised.
_META = {"BLOCK": 4096, "ITERS": 2} if _INTERPRET else {"BLOCK": 2048, "ITERS": 4, "num_warps": 8}

_MAX_GRID_DIM = 65535  # limit of grid dimensions 1 and 2
_MAX_ROW_ELEMS = 2**31 - 1  # int32 counts

_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


@triton.jit
def _float_to_key(x):
    """float32 -> uint32 key with the same order (-0.0 and +0.0 get the key of +0.0)."""
    x = tl.where(x == 0.0, 0.0, x)
    bits = x.to(tl.int32, bitcast=True)
    # Negative floats (sign bit set): flip all bits; others: flip the sign bit only.
    flip = (bits >> 31) | -2147483648
    return (bits ^ flip).to(tl.uint32, bitcast=True)


@triton.jit
def _histogram_kernel(ptr_table, numel_table, row_table, prefix_ptr, hist_ptr, nan_ptr,
                      DTYPE: tl.constexpr, SHIFT: tl.constexpr, FIRST: tl.constexpr, NUM_BINS: tl.constexpr,
                      HIGH: tl.constexpr, BLOCK: tl.constexpr, ITERS: tl.constexpr):
    # HIGH = SHIFT + log2(NUM_BINS): the digits above this pass's start there.
    t = tl.program_id(1)
    numel = tl.load(numel_table + t)
    start = tl.program_id(0).to(tl.int64) * (BLOCK * ITERS)
    # The grid is sized for the largest tensor: programs past the end of a smaller one do nothing.
    if start < numel:
        data = tl.load(ptr_table + t).to(tl.pointer_type(DTYPE))
        row = tl.load(row_table + t)
        prefix = tl.load(prefix_ptr + row).to(tl.uint32, bitcast=True)
        counts = tl.zeros([NUM_BINS], dtype=tl.int32)
        nans = tl.zeros([BLOCK], dtype=tl.int32)
        for i in range(ITERS):
            offs = start + i * BLOCK + tl.arange(0, BLOCK)
            inside = offs < numel
            x = tl.load(data + offs, mask=inside, other=0.0).to(tl.float32)
            key = _float_to_key(x)
            if FIRST:
                counted = inside
                nans += (x != x).to(tl.int32)  # lanes past the end read 0.0
            else:
                # Only elements whose higher digits are those chosen by the previous passes.
                counted = inside & (((key ^ prefix) >> HIGH) == 0)
            digit = ((key >> SHIFT) & (NUM_BINS - 1)).to(tl.int32)
            counts += tl.histogram(digit, NUM_BINS, mask=counted)
        bins = tl.arange(0, NUM_BINS)
        tl.atomic_add(hist_ptr + row * NUM_BINS + bins, counts, mask=counts > 0)
        if FIRST:
            tl.atomic_add(nan_ptr + row, tl.sum(nans, 0))


@triton.jit
def _select_kernel(hist_ptr, k_ptr, prefix_ptr, out_ptr,
                   SHIFT: tl.constexpr, LAST: tl.constexpr, NUM_BINS: tl.constexpr):
    row = tl.program_id(0)
    bins = tl.arange(0, NUM_BINS)
    counts = tl.load(hist_ptr + row * NUM_BINS + bins)
    above = tl.sum(counts, 0) - tl.cumsum(counts, 0)  # elements in higher buckets
    k = tl.load(k_ptr + row)
    # `above` does not increase with the bucket: the k-th largest lies in the first bucket with
    # fewer than k elements above it.
    digit = tl.sum((above >= k).to(tl.int32), 0)
    tl.store(k_ptr + row, k - tl.sum(tl.where(bins == digit, above, 0), 0))
    prefix = tl.load(prefix_ptr + row).to(tl.uint32, bitcast=True) | (digit.to(tl.uint32) << SHIFT)
    prefix = prefix.to(tl.int32, bitcast=True)
    tl.store(prefix_ptr + row, prefix)
    if LAST:
        # Inverse of _float_to_key: keys with the top bit set are non-negative floats.
        flip = ((prefix >> 31) ^ -1) | -2147483648
        tl.store(out_ptr + row, (prefix ^ flip).to(tl.float32, bitcast=True))


def _dense(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when its elements fill one block of memory (in any order, e.g. a transpose),
    else a contiguous copy."""
    if t.is_contiguous():
        return t
    by_stride = t.permute(sorted(range(t.dim()), key=lambda d: -t.stride(d)))
    return by_stride if by_stride.is_contiguous() else t.contiguous()


@functools.lru_cache(maxsize=32)
def _tables(device: torch.device, ptrs: Tuple[int, ...], numels: Tuple[int, ...], rows: Tuple[int, ...]):
    """Device copies of a launch's pointer, size and row tables (the same every training step)."""
    return (torch.tensor(ptrs, dtype=torch.int64).to(device),
            torch.tensor(numels, dtype=torch.int64).to(device),
            torch.tensor(rows, dtype=torch.int32).to(device))


@functools.lru_cache(maxsize=32)
def _k_table(device: torch.device, ks: Tuple[int, ...]) -> torch.Tensor:
    return torch.tensor(ks, dtype=torch.int32).to(device)


def kth_largest_rows(tensors: Sequence[torch.Tensor], rows: Sequence[int], ks: Sequence[int]
                     ) -> Tuple[torch.Tensor, torch.Tensor]:
    """The k-th largest value of every row of a grouping of ``tensors``.

    Row ``r`` holds the elements of every ``tensors[i]`` with ``rows[i] == r``; its k is ``ks[r]``
    (1 <= k <= the row's number of elements). Tensors must be non-empty, float32, float16
    or bfloat16, on one device; non-contiguous ones are copied unless they are dense in memory
    (element order does not matter).

    Returns ``(values, nan_counts)``: float32 ``[len(ks)]`` (a zero as +0.0) and the int32 number
    of NaNs of every row; the values of rows with NaN are meaningless.
    """
    n_rows = len(ks)
    device = tensors[0].device
    row_sizes = [0] * n_rows
    groups = {}  # dtype -> (pointers, sizes, rows)
    # Copies of non-dense inputs must outlive the queueing of the launches that read them; after
    # that, the caching allocator reuses their memory only after those launches.
    kept_alive: List[torch.Tensor] = []
    for t, r in zip(tensors, rows):
        t = _dense(t)
        kept_alive.append(t)
        ptrs, sizes, grp_rows = groups.setdefault(t.dtype, ([], [], []))
        ptrs.append(t.data_ptr())
        sizes.append(t.numel())
        grp_rows.append(r)
        row_sizes[r] += t.numel()
    if max(row_sizes) > _MAX_ROW_ELEMS:
        raise ValueError(f"radix select counts in int32: a row may hold at most {_MAX_ROW_ELEMS} elements, "
                         f"got {max(row_sizes)}")

    # One zeroed buffer: the histograms of all passes, then the prefixes, then the NaN counts.
    work = torch.zeros(len(_SHIFTS) * n_rows * _NUM_BINS + 2 * n_rows, dtype=torch.int32, device=device)
    hist = work[: len(_SHIFTS) * n_rows * _NUM_BINS].view(len(_SHIFTS), n_rows, _NUM_BINS)
    prefix = work[hist.numel(): hist.numel() + n_rows]
    nan_counts = work[hist.numel() + n_rows:]
    k = _k_table(device, tuple(ks)).clone()  # the select kernel updates it in place
    out = torch.empty(n_rows, dtype=torch.float32, device=device)

    chunk = _META["BLOCK"] * _META["ITERS"]
    launches = []
    for dtype, (ptrs, sizes, grp_rows) in groups.items():
        ptr_t, numel_t, row_t = _tables(device, tuple(ptrs), tuple(sizes), tuple(grp_rows))
        chunks = triton.cdiv(max(sizes), chunk)
        for s in range(0, len(ptrs), _MAX_GRID_DIM):
            e = min(len(ptrs), s + _MAX_GRID_DIM)
            launches.append((_TL_DTYPES[dtype], (chunks, e - s), ptr_t[s:e], numel_t[s:e], row_t[s:e]))

    with on_device(work):
        for p, shift in enumerate(_SHIFTS):
            for tl_dtype, grid, ptr_t, numel_t, row_t in launches:
                _histogram_kernel[grid](ptr_t, numel_t, row_t, prefix, hist[p], nan_counts,
                                        DTYPE=tl_dtype, SHIFT=shift, FIRST=p == 0, NUM_BINS=_NUM_BINS,
                                        HIGH=shift + _RADIX_BITS, **_META)
            _select_kernel[(n_rows,)](hist[p], k, prefix, out, SHIFT=shift, LAST=p == len(_SHIFTS) - 1,
                                      NUM_BINS=_NUM_BINS)
    return out, nan_counts
