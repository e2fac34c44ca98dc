"""Triton kernels for the streaming InfoNCE op (``capkit.ops.info_nce``).

Scores ``s_ij = (qs_i . k_j) * key_scale_j``; key ``j`` is left out for query ``i`` when
``j == self_index[i]``. The ``B x M`` score matrix is never stored: each program owns a block of
queries and streams a range of keys in ``BLOCK_M`` chunks, reducing ``d`` in ``BLOCK_D`` chunks
with ``tl.dot`` (fp32 accumulation).

* forward: an online log-sum-exp (running max, rescaled sum) plus the sums and counts of the
  positive scores -> ``stats [B, 5] = (lse, sum_u, cnt_u, sum_s, cnt_s)``.
* backward: the scores are recomputed, ``g_ij = a_u [j in P_u] + a_s [j in P_s] + c exp(s_ij - lse_i)``
  is formed per tile and ``dqs += (g * key_scale) @ k`` for one ``BLOCK_DO`` slice of ``d``.

When there are few query blocks, the keys are split into ``S`` ranges handled by separate
programs: partial stats ``[S, B, 5]`` are merged with a log-sum-exp over the partial lse's
(sums and counts add up), partial ``dqs [S, B, d]`` are summed; both are deterministic.

Precision: fp32 keys use ``tl.dot`` with ``tf32x3`` (about fp32 accuracy on tensor cores). For
fp16/bf16 keys the queries (once, on the host) and the ``g`` tiles (in the kernel) are scaled per
row and split into 2 (fp16) or 3 (bf16) parts in the key dtype; products of 16-bit values are
exact in fp32, so the scores keep about fp32 accuracy while the keys are read and multiplied as
stored, on tensor cores.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import INTERPRET as _INTERPRET, autotuned, fit_configs, on_device

__all__ = ["info_nce_forward", "info_nce_backward"]

# The interpreter gets one fixed config (read at launch time so it can be overridden).
_INTERPRET_FWD_META = {"BLOCK_B": 16, "BLOCK_M": 64, "BLOCK_D": 128}
_INTERPRET_BWD_META = {"BLOCK_B": 16, "BLOCK_M": 64, "BLOCK_D": 128, "BLOCK_DO": 128}

# fp32 keys: tf32x3 keeps the scores near fp32 (they are divided by the temperature, so plain
# tf32 would cost ~1e-3 in the loss). The interpreter computes every dot in fp32 anyway.
_FP32_DOT_PRECISION = "ieee" if _INTERPRET else "tf32x3"

# Custom reductions run element by element in the interpreter.
_FUSED_REDUCE = not _INTERPRET

# Parts a fp32 operand is split into when multiplied with 16-bit keys (11 resp. 8 significant
# bits per part).
_PARTS = {torch.float16: 2, torch.bfloat16: 3}

# fp16 backward: largest key_scale for which g * key_scale (|g| <= 1 after the row scaling)
# stays well inside the fp16 range; keys with a larger one (norm < 1/_G_LIMIT) get it applied
# to the key instead.
_G_LIMIT = 16384.0

# Split heuristics: with few query blocks the op is bound by reading the keys, which needs
# programs on every SM; aim for a few waves, give each split at least a couple of key tiles,
# and cap the partial dqs buffer.
_WAVES = 4
_MIN_KEYS_PER_SPLIT = 64 if _INTERPRET else 128
_MAX_PARTIAL_ELEMS = 1 << 25
_MAX_GRID_DIM = 65535  # grid dimensions 1 and 2
_NOMINAL_BLOCK_B = 64
_NOMINAL_BLOCK_DO = 128


# ---------------------------------------------------------------------------
# Autotune configuration
# ---------------------------------------------------------------------------

def _fcfg(bb, bm, bd, warps, stages):
    return triton.Config({"BLOCK_B": bb, "BLOCK_M": bm, "BLOCK_D": bd}, num_warps=warps, num_stages=stages)


def _bcfg(bb, bm, bd, bdo, warps, stages):
    return triton.Config({"BLOCK_B": bb, "BLOCK_M": bm, "BLOCK_D": bd, "BLOCK_DO": bdo},
                         num_warps=warps, num_stages=stages)


# Tiles chosen so that the sm_90 builds stay free of register spills for 16-bit keys (fp32
# keys, whose tf32x3 dots split both operands in registers, spill a little in the backward).
# A 64-row tile gets 4 warps (one warpgroup) so both dots of the backward share a layout.
_FWD_CONFIGS = [
    _fcfg(128, 64, 64, 8, 3),
    _fcfg(128, 64, 32, 8, 3),
    _fcfg(64, 64, 64, 4, 3),
    _fcfg(64, 64, 32, 4, 3),
    _fcfg(64, 128, 32, 4, 3),
    _fcfg(32, 128, 64, 8, 3),
    _fcfg(32, 64, 64, 4, 3),
    _fcfg(32, 64, 32, 8, 3),
]

_BWD_CONFIGS = [
    _bcfg(64, 32, 32, 128, 4, 3),
    _bcfg(64, 32, 64, 128, 4, 2),
    _bcfg(64, 64, 64, 64, 4, 3),
    _bcfg(64, 64, 64, 128, 8, 3),
    _bcfg(128, 32, 64, 128, 8, 2),
    _bcfg(128, 64, 64, 64, 8, 3),
    _bcfg(32, 32, 64, 128, 4, 3),
    _bcfg(32, 64, 64, 64, 4, 3),
]

_KEY = ["B_BUCKET", "M_BUCKET", "D", "SPLITS", "HAS_SCALE", "HAS_LAB", "HAS_SELF", "N_PARTS", "KEY_BYTES"]


def _pow2_at_least_16(n) -> int:
    return max(16, triton.next_power_of_2(max(int(n), 1)))


def _make_prune(backward: bool):
    """Clamp tiles to the problem (a 4-row batch needs no 128-row tile) and fit shared memory."""

    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        caps = {
            "BLOCK_B": _pow2_at_least_16(args["B_BUCKET"]),
            "BLOCK_M": _pow2_at_least_16(args["M_BUCKET"]),
            "BLOCK_D": _pow2_at_least_16(args["D"]),
            "BLOCK_DO": _pow2_at_least_16(args["D"]),
        }
        kb = int(args["KEY_BYTES"])
        qb = 4 if int(args["N_PARTS"]) == 0 else 2 * int(args["N_PARTS"])

        def smem_bytes(meta, stages):
            per_stage = meta["BLOCK_B"] * meta["BLOCK_D"] * qb + meta["BLOCK_M"] * meta["BLOCK_D"] * kb
            fixed = meta["BLOCK_M"] * meta["BLOCK_DO"] * kb if backward else 0
            return stages * per_stage + fixed

        small = {"BLOCK_B": 16, "BLOCK_M": 32, "BLOCK_D": 32}
        if backward:
            small["BLOCK_DO"] = 64
        return fit_configs(configs, lambda meta: {k: min(v, caps[k]) for k, v in meta.items()}, smem_bytes,
                           triton.Config(small, num_warps=4, num_stages=2))

    return prune


def _tuned(configs, backward: bool):
    return autotuned(configs, _KEY, _make_prune(backward))


# ---------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------

@triton.jit
def _dot_split(a, b, acc, N_PARTS: tl.constexpr, DOT_PRECISION: tl.constexpr):
    # acc += a @ b with b as stored. N_PARTS == 0: b is fp32. Otherwise a (fp32, |a| <= ~1) is
    # written as a sum of N_PARTS values in b's 16-bit dtype; each product is exact in fp32.
    if N_PARTS == 0:
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    else:
        r = a
        for _ in tl.static_range(N_PARTS):
            part = r.to(b.dtype)
            acc = tl.dot(part, b, acc)
            r = r - part.to(tl.float32)
    return acc


@triton.jit
def _add_pair(a0, a1, b0, b1):
    return a0 + b0, a1 + b1


@triton.jit
def _masked_sum_count(s, pos, FUSED: tl.constexpr):
    # On GPU one two-operand reduction keeps the count in the scores' register layout (else
    # the id comparison gets recomputed in a layout of its own). The interpreter runs custom
    # reductions element by element, so it takes two plain sums.
    if FUSED:
        return tl.reduce((tl.where(pos, s, 0.0), tl.where(pos, 1.0, 0.0)), 1, _add_pair)
    else:
        return tl.sum(tl.where(pos, s, 0.0), axis=1), tl.sum(tl.where(pos, 1.0, 0.0), axis=1)


@triton.jit
def _query_rows(qid_ptr, qlab_ptr, self_ptr, offs_b, b_ok, HAS_LAB: tl.constexpr, HAS_SELF: tl.constexpr):
    # Ids, labels and left-out key of a block of queries (labels / left-out key: unused
    # placeholders when absent).
    q_id = tl.load(qid_ptr + offs_b, mask=b_ok, other=0)
    q_lab = q_id
    q_self = q_id
    if HAS_LAB:
        q_lab = tl.load(qlab_ptr + offs_b, mask=b_ok, other=0)
    if HAS_SELF:
        q_self = tl.load(self_ptr + offs_b, mask=b_ok, other=-1)
    return q_id, q_lab, q_self


@triton.jit
def _key_block_range(M, SPLITS, pid_s, BLOCK_M: tl.constexpr):
    # The key blocks [lo, hi) of key split pid_s (empty for the splits past the last block).
    n_kb = tl.cdiv(M, BLOCK_M)
    per = tl.cdiv(n_kb, SPLITS)
    lo = pid_s * per
    return lo, tl.minimum(lo + per, n_kb)


@triton.jit
def _score_tile(q_ptr, k_ptr, offs_b, b_ok, offs_m, m_ok, D, PART_STRIDE,
                N_PARTS: tl.constexpr, DOT_PRECISION: tl.constexpr,
                BLOCK_B: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    # [BLOCK_B, BLOCK_M] of q . k reduced over d. With N_PARTS > 0, q_ptr holds N_PARTS
    # row-scaled 16-bit parts of the queries, PART_STRIDE elements apart.
    acc = tl.zeros((BLOCK_B, BLOCK_M), dtype=tl.float32)
    q_rows = q_ptr + offs_b[:, None].to(tl.int64) * D
    k_rows = k_ptr + offs_m[:, None].to(tl.int64) * D
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_ok = offs_d[None, :] < D
        k = tl.trans(tl.load(k_rows + offs_d[None, :], mask=m_ok[:, None] & d_ok, other=0.0))
        if N_PARTS == 0:
            q = tl.load(q_rows + offs_d[None, :], mask=b_ok[:, None] & d_ok, other=0.0)
            acc = tl.dot(q, k, acc, input_precision=DOT_PRECISION)
        else:
            for p in tl.static_range(N_PARTS):
                # Part offsets in int64: p * B * d passes 2^31 for B * d >= 2^30 (3 parts).
                q = tl.load(q_rows + p * tl.cast(PART_STRIDE, tl.int64) + offs_d[None, :],
                            mask=b_ok[:, None] & d_ok, other=0.0)
                acc = tl.dot(q, k, acc)
    return acc


@triton.jit
def _key_block_scores(q_ptr, k_ptr, ks_ptr, q_mul, offs_b, b_ok, kb, M, D, PART_STRIDE,
                      HAS_SCALE: tl.constexpr, N_PARTS: tl.constexpr, DOT_PRECISION: tl.constexpr,
                      BLOCK_B: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    # Scores of key block kb: (key offsets, key in range, s [BLOCK_B, BLOCK_M], key scales).
    # q_mul: the query row factors (N_PARTS > 0); the key scales are a placeholder without HAS_SCALE.
    offs_m = kb * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    s = _score_tile(q_ptr, k_ptr, offs_b, b_ok, offs_m, m_ok, D, PART_STRIDE,
                    N_PARTS, DOT_PRECISION, BLOCK_B, BLOCK_M, BLOCK_D)
    if N_PARTS != 0:
        s = s * q_mul[:, None]
    ks = m_ok.to(tl.float32)
    if HAS_SCALE:
        ks = tl.load(ks_ptr + offs_m, mask=m_ok, other=0.0)
        s = s * ks[None, :]
    return offs_m, m_ok, s, ks


@_tuned(_FWD_CONFIGS, backward=False)
@triton.jit
def _fwd_kernel(
    q_ptr, qmul_ptr, k_ptr, ks_ptr, qid_ptr, kid_ptr, qlab_ptr, klab_ptr, self_ptr, out_ptr,
    B, M, D, PART_STRIDE, SPLITS, B_BUCKET, M_BUCKET,
    HAS_SCALE: tl.constexpr, HAS_LAB: tl.constexpr, HAS_SELF: tl.constexpr,
    N_PARTS: tl.constexpr, KEY_BYTES: tl.constexpr, DOT_PRECISION: tl.constexpr,
    FUSED_REDUCE: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_b = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    b_ok = offs_b < B

    q_id, q_lab, q_self = _query_rows(qid_ptr, qlab_ptr, self_ptr, offs_b, b_ok, HAS_LAB, HAS_SELF)
    q_mul = tl.full((BLOCK_B,), 1.0, tl.float32)  # row factors of 16-bit query parts
    if N_PARTS != 0:
        q_mul = tl.load(qmul_ptr + offs_b, mask=b_ok, other=1.0)

    kb_lo, kb_hi = _key_block_range(M, SPLITS, pid_s, BLOCK_M)
    m_i = tl.full((BLOCK_B,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_B,), dtype=tl.float32)
    sum_u = tl.zeros((BLOCK_B,), dtype=tl.float32)
    cnt_u = tl.zeros((BLOCK_B,), dtype=tl.float32)
    sum_s = tl.zeros((BLOCK_B,), dtype=tl.float32)
    cnt_s = tl.zeros((BLOCK_B,), dtype=tl.float32)
    for kb in range(kb_lo, kb_hi):
        offs_m, m_ok, s, _ = _key_block_scores(q_ptr, k_ptr, ks_ptr, q_mul, offs_b, b_ok, kb, M, D, PART_STRIDE,
                                               HAS_SCALE, N_PARTS, DOT_PRECISION, BLOCK_B, BLOCK_M, BLOCK_D)
        kept = m_ok[None, :] & b_ok[:, None]
        if HAS_SELF:
            kept = kept & (offs_m[None, :] != q_self[:, None])

        k_id = tl.load(kid_ptr + offs_m, mask=m_ok, other=0)
        add_s, add_c = _masked_sum_count(s, kept & (k_id[None, :] == q_id[:, None]), FUSED_REDUCE)
        sum_u += add_s
        cnt_u += add_c
        if HAS_LAB:
            k_lab = tl.load(klab_ptr + offs_m, mask=m_ok, other=0)
            add_s, add_c = _masked_sum_count(s, kept & (k_lab[None, :] == q_lab[:, None]), FUSED_REDUCE)
            sum_s += add_s
            cnt_s += add_c

        # Online log-sum-exp; a row with nothing kept yet has max -inf, shifted by 0 instead.
        s_kept = tl.where(kept, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s_kept, axis=1))
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.exp(m_i - shift) + tl.sum(tl.exp(s_kept - shift[:, None]), axis=1)
        m_i = m_new

    lse = tl.where(l_i > 0, m_i + tl.log(tl.maximum(l_i, 1e-30)), float("-inf"))
    out = out_ptr + (pid_s.to(tl.int64) * B + offs_b) * 5
    tl.store(out + 0, lse, mask=b_ok)
    tl.store(out + 1, sum_u, mask=b_ok)
    tl.store(out + 2, cnt_u, mask=b_ok)
    tl.store(out + 3, sum_s, mask=b_ok)
    tl.store(out + 4, cnt_s, mask=b_ok)


@_tuned(_BWD_CONFIGS, backward=True)
@triton.jit
def _bwd_kernel(
    q_ptr, qmul_ptr, k_ptr, ks_ptr, qid_ptr, kid_ptr, qlab_ptr, klab_ptr, self_ptr, lse_ptr, coef_ptr, out_ptr,
    B, M, D, PART_STRIDE, SPLITS, B_BUCKET, M_BUCKET,
    HAS_SCALE: tl.constexpr, HAS_LAB: tl.constexpr, HAS_SELF: tl.constexpr,
    N_PARTS: tl.constexpr, KEY_BYTES: tl.constexpr, DOT_PRECISION: tl.constexpr, G_LIMIT: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DO: tl.constexpr,
):
    # Output tile: rows offs_b, columns offs_do of dqs, from key split pid_s. The scores are
    # recomputed over all of d for each column slice.
    pid_b = tl.program_id(0)
    pid_d = tl.program_id(1)
    pid_s = tl.program_id(2)
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    b_ok = offs_b < B
    offs_do = pid_d * BLOCK_DO + tl.arange(0, BLOCK_DO)
    do_ok = offs_do < D

    q_id, q_lab, q_self = _query_rows(qid_ptr, qlab_ptr, self_ptr, offs_b, b_ok, HAS_LAB, HAS_SELF)
    lse = tl.load(lse_ptr + offs_b, mask=b_ok, other=float("-inf"))
    # Rows whose lse is -inf have no kept key: their gradient is 0 (no exp(-inf - -inf)).
    row_ok = lse > float("-inf")
    lse = tl.where(row_ok, lse, 0.0)
    coef = coef_ptr + offs_b.to(tl.int64) * 3
    a_u = tl.load(coef + 0, mask=b_ok, other=0.0)
    a_s = tl.load(coef + 1, mask=b_ok, other=0.0)
    c_p = tl.load(coef + 2, mask=b_ok, other=0.0)

    g_mul = tl.full((BLOCK_B,), 1.0, tl.float32)
    g_inv = g_mul
    q_mul = g_mul
    if N_PARTS != 0:
        q_mul = tl.load(qmul_ptr + offs_b, mask=b_ok, other=1.0)
        # Before the key scale, |g_ij| <= |a_u| + |a_s| + |c| (softmax <= 1): dividing by that
        # keeps the 16-bit parts of g clear of fp16 underflow and overflow.
        gmax = tl.abs(a_u) + tl.abs(a_s) + tl.abs(c_p)
        g_mul = tl.where(gmax > 0, gmax, 1.0)
        g_inv = 1.0 / g_mul

    kb_lo, kb_hi = _key_block_range(M, SPLITS, pid_s, BLOCK_M)
    acc = tl.zeros((BLOCK_B, BLOCK_DO), dtype=tl.float32)
    for kb in range(kb_lo, kb_hi):
        offs_m, m_ok, s, ks = _key_block_scores(q_ptr, k_ptr, ks_ptr, q_mul, offs_b, b_ok, kb, M, D, PART_STRIDE,
                                                HAS_SCALE, N_PARTS, DOT_PRECISION, BLOCK_B, BLOCK_M, BLOCK_D)
        kept = m_ok[None, :] & row_ok[:, None]
        if HAS_SELF:
            kept = kept & (offs_m[None, :] != q_self[:, None])

        p = tl.exp(tl.where(kept, s - lse[:, None], float("-inf")))
        g = c_p[:, None] * p
        k_id = tl.load(kid_ptr + offs_m, mask=m_ok, other=0)
        g += tl.where(kept & (k_id[None, :] == q_id[:, None]), a_u[:, None], 0.0)
        if HAS_LAB:
            k_lab = tl.load(klab_ptr + offs_m, mask=m_ok, other=0)
            g += tl.where(kept & (k_lab[None, :] == q_lab[:, None]), a_s[:, None], 0.0)
        k = tl.load(k_ptr + offs_m[:, None].to(tl.int64) * D + offs_do[None, :],
                    mask=m_ok[:, None] & do_ok[None, :], other=0.0)
        if HAS_SCALE:
            if G_LIMIT > 0:
                # A key of (near) zero norm has a huge inverse norm: g * key_scale would
                # overflow fp16 (and inf * 0 is NaN). For such keys the scale goes onto the
                # key instead (|k * key_scale| <= 1), rounded to fp16.
                big = ks > G_LIMIT
                g = g * tl.where(big, 1.0, ks)[None, :]
                k = tl.where(big[:, None], (k.to(tl.float32) * ks[:, None]).to(k.dtype), k)
            else:
                g = g * ks[None, :]
        if N_PARTS != 0:
            g = g * g_inv[:, None]
        acc = _dot_split(g, k, acc, N_PARTS, DOT_PRECISION)

    acc = acc * g_mul[:, None]
    out = out_ptr + (pid_s.to(tl.int64) * B + offs_b[:, None]) * D + offs_do[None, :]
    tl.store(out, acc, mask=b_ok[:, None] & do_ok[None, :])


# ---------------------------------------------------------------------------
# Host-side launchers
# ---------------------------------------------------------------------------

_SM_COUNT = {}


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter: a small nominal machine, so that splits get exercised
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


def _choose_splits(device, tiles: int, m: int, cap: int, num_splits: Optional[int]) -> int:
    if num_splits is not None:
        return max(1, min(int(num_splits), _MAX_GRID_DIM))
    target = _WAVES * _num_sms(device)
    if tiles >= target:
        return 1
    return max(1, min(math.ceil(target / tiles), math.ceil(m / _MIN_KEYS_PER_SPLIT), cap, _MAX_GRID_DIM))


def _prepare(qs, keys, key_scale, qid, kid, qlab, klab, self_index):
    if (qlab is None) != (klab is None):
        raise ValueError("qlab and klab must be given together")
    qs = qs.to(torch.float32).contiguous()
    if keys.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        keys = keys.to(torch.float32)
    if _INTERPRET and keys.dtype == torch.bfloat16:
        keys = keys.to(torch.float32)  # the interpreter has no bf16; the upcast is exact
    keys = keys.contiguous()
    if key_scale is not None:
        key_scale = key_scale.to(torch.float32).contiguous()
    tensors = [t.contiguous() if t is not None else None for t in (qid, kid, qlab, klab, self_index)]
    return (qs, keys, key_scale, *tensors)


def _split_queries(qs, keys):
    """(query operand, row factors): fp32 keys take qs as it is; 16-bit keys take N_PARTS parts
    [N_PARTS, B, d] in the key dtype of qs / rowmax|qs| (kept in range for fp16), whose sum
    times the row factor is qs to about fp32 precision."""
    n_parts = _PARTS.get(keys.dtype, 0)
    if n_parts == 0:
        return qs, qs.new_ones(1)
    amax = qs.abs().amax(dim=1)
    q_mul = torch.where(amax > 0, amax, torch.ones_like(amax))
    r = qs / q_mul[:, None]
    parts = []
    for _ in range(n_parts):
        part = r.to(keys.dtype)
        parts.append(part)
        r = r - part.to(torch.float32)
    return torch.stack(parts).contiguous(), q_mul.contiguous()


def _kernel_args(qs, keys, key_scale, qid, kid, qlab, klab, self_index):
    dummy = qid
    q_op, q_mul = _split_queries(qs, keys)
    return (q_op, q_mul, keys, key_scale if key_scale is not None else qs, qid, kid,
            qlab if qlab is not None else dummy, klab if klab is not None else dummy,
            self_index if self_index is not None else dummy)


def _flags(keys, key_scale, qlab, self_index, b, m):
    return dict(
        B_BUCKET=triton.next_power_of_2(max(b, 1)),
        M_BUCKET=triton.next_power_of_2(max(m, 1)),
        HAS_SCALE=key_scale is not None,
        HAS_LAB=qlab is not None,
        HAS_SELF=self_index is not None,
        N_PARTS=_PARTS.get(keys.dtype, 0),
        KEY_BYTES=keys.element_size(),
        DOT_PRECISION=_FP32_DOT_PRECISION,
    )


def info_nce_forward(qs, keys, key_scale, qid, kid, qlab, klab, self_index, *,
                     num_splits: Optional[int] = None) -> torch.Tensor:
    """stats [B, 5] fp32 = (lse, sum_u, cnt_u, sum_s, cnt_s) per query (see the module doc).

    ``num_splits`` forces the number of key ranges (default: chosen from the device size).
    """
    qs, keys, key_scale, qid, kid, qlab, klab, self_index = _prepare(
        qs, keys, key_scale, qid, kid, qlab, klab, self_index)
    b, d = qs.shape
    m = keys.shape[0]
    if b == 0 or m == 0:
        stats = torch.zeros((b, 5), device=qs.device, dtype=torch.float32)
        stats[:, 0] = float("-inf")
        return stats

    splits = _choose_splits(qs.device, triton.cdiv(b, _NOMINAL_BLOCK_B), m, _MAX_GRID_DIM, num_splits)
    out = torch.empty((splits, b, 5), device=qs.device, dtype=torch.float32)
    meta = dict(_INTERPRET_FWD_META) if _INTERPRET else {}

    def grid(META):
        return (triton.cdiv(b, META["BLOCK_B"]), splits)

    with on_device(qs):
        _fwd_kernel[grid](
            *_kernel_args(qs, keys, key_scale, qid, kid, qlab, klab, self_index), out,
            b, m, d, b * d, splits,
            **_flags(keys, key_scale, qlab, self_index, b, m),
            FUSED_REDUCE=_FUSED_REDUCE,
            **meta,
        )
    if splits == 1:
        return out[0]
    # Merge the key ranges: lse over the partial lse's (all -inf stays -inf), sums add up.
    return torch.cat([torch.logsumexp(out[:, :, :1], dim=0), out[:, :, 1:].sum(0)], dim=1)


def info_nce_backward(qs, keys, key_scale, qid, kid, qlab, klab, self_index, lse, coef, *,
                      num_splits: Optional[int] = None) -> torch.Tensor:
    """dqs [B, d] fp32 = sum over kept j of g_ij * key_scale_j * k_j (see the module doc)."""
    qs, keys, key_scale, qid, kid, qlab, klab, self_index = _prepare(
        qs, keys, key_scale, qid, kid, qlab, klab, self_index)
    lse = lse.to(torch.float32).contiguous()
    coef = coef.to(torch.float32).contiguous()
    b, d = qs.shape
    m = keys.shape[0]
    if b == 0 or m == 0 or d == 0:
        return torch.zeros((b, d), device=qs.device, dtype=torch.float32)

    tiles = triton.cdiv(b, _NOMINAL_BLOCK_B) * triton.cdiv(d, _NOMINAL_BLOCK_DO)
    cap = max(1, _MAX_PARTIAL_ELEMS // (b * d))
    splits = _choose_splits(qs.device, tiles, m, cap, num_splits)
    out = torch.empty((splits, b, d), device=qs.device, dtype=torch.float32)
    meta = dict(_INTERPRET_BWD_META) if _INTERPRET else {}

    def grid(META):
        return (triton.cdiv(b, META["BLOCK_B"]), triton.cdiv(d, META["BLOCK_DO"]), splits)

    with on_device(qs):
        _bwd_kernel[grid](
            *_kernel_args(qs, keys, key_scale, qid, kid, qlab, klab, self_index), lse, coef, out,
            b, m, d, b * d, splits,
            **_flags(keys, key_scale, qlab, self_index, b, m),
            G_LIMIT=_G_LIMIT if (keys.dtype == torch.float16 and key_scale is not None) else 0.0,
            **meta,
        )
    return out[0] if splits == 1 else out.sum(0)
