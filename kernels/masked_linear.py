"""Triton kernels for masked / block-sparse linear layers.

The effective weight is ``W' = weight * mask * layout`` where ``mask`` is an
optional element mask (uint8 0/1 or a float factor) and ``layout`` is an
optional block-sparsity pattern given as CSR (``row_ptr``/``col_idx``) and CSC
(``col_ptr``/``row_idx``) over the ``[ceil(N/b), ceil(K/b)]`` block grid.
``W'`` is never materialised: the mask is applied to weight tiles after they
are loaded, and dead blocks are skipped by iterating only over live blocks.

All products accumulate in fp32. Operand tiles are fed to ``tl.dot`` in the
input dtype so that fp16/bf16 use tensor cores.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ._common import INTERPRET as _INTERPRET, autotuned, fit_configs, on_device

__all__ = [
    "masked_linear_forward",
    "masked_linear_grad_input",
    "masked_linear_grad_weight",
]

# The interpreter gets a single fixed config (read at launch time so it can be overridden).
_INTERPRET_META = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 4}

# Mask kinds (compile-time specialisation).
_MASK_NONE = 0
_MASK_BINARY = 1  # uint8 (or bool viewed as uint8) holding 0/1
_MASK_FLOAT = 2  # multiplicative factor in the weight's dtype


# ---------------------------------------------------------------------------
# Autotune configuration helpers
# ---------------------------------------------------------------------------

def _cfg(bm, bn, bk, warps, stages, group_m=8):
    return triton.Config(
        {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group_m},
        num_warps=warps,
        num_stages=stages,
    )


# Forward / grad_input: BLOCK_M x BLOCK_N x BLOCK_K GEMM tiles.
_MM_CONFIGS = [
    _cfg(128, 256, 64, 8, 3),
    _cfg(128, 128, 64, 8, 4),
    _cfg(128, 128, 32, 4, 4),
    _cfg(64, 128, 64, 4, 4),
    _cfg(128, 64, 64, 4, 4),
    _cfg(64, 64, 64, 4, 3),
    _cfg(32, 64, 64, 2, 5),
]

# grad_weight: output tile BLOCK_N x BLOCK_K, reduction over M in BLOCK_M steps.
_GW_CONFIGS = [
    _cfg(64, 128, 128, 8, 4),
    _cfg(32, 128, 128, 4, 4),
    _cfg(64, 64, 128, 4, 4),
    _cfg(64, 128, 64, 4, 4),
    _cfg(64, 64, 64, 4, 3),
    _cfg(128, 64, 64, 4, 3),
]


def _operand_elems(kernel: str, meta: dict) -> int:
    """Elements of the two operand tiles staged in shared memory per stage."""
    bm, bn, bk = meta["BLOCK_M"], meta["BLOCK_N"], meta["BLOCK_K"]
    if kernel == "fwd":
        return bm * bk + bn * bk
    if kernel == "dx":
        return bm * bn + bn * bk
    return bm * bn + bm * bk  # grad_weight


def _make_prune(kernel: str, layout_dims: Tuple[str, ...]):
    """Build an ``early_config_prune`` hook.

    With a block layout, the tile dims in ``layout_dims`` are clamped to the
    block size so every tile lies inside a single block (a power-of-two tile
    no larger than a power-of-two block divides it). Configs whose pipelined
    operand tiles would not fit in shared memory get fewer stages or are
    dropped.
    """

    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        block = int(args["BLOCK_SIZE"])
        has_layout = bool(args["HAS_LAYOUT"])
        elsize = args["ELEM_BYTES"]

        def clamp(meta):
            if has_layout:
                for d in layout_dims:
                    meta[d] = min(meta[d], block)
            return meta

        # forward and dx stream a mask tile beside each weight tile (grad_weight reads it once, at the end)
        mask = args.get("mask_ptr")
        mask_bytes = (mask.element_size() if kernel != "gw" and int(args["MASK_KIND"]) != _MASK_NONE
                      and isinstance(mask, torch.Tensor) else 0)

        def smem_bytes(meta, stages):
            mask_tile = meta["BLOCK_N"] * meta["BLOCK_K"] * mask_bytes
            return stages * (_operand_elems(kernel, meta) * elsize + mask_tile)

        small = min(32, block) if has_layout else 32
        return fit_configs(configs, clamp, smem_bytes, _cfg(32, small, small, 4, 2))

    return prune


# fp32 inputs compile to different dots under tf32 and ieee: tune them separately.
_MM_KEY = ["M_BUCKET", "N", "K", "BLOCK_SIZE", "HAS_LAYOUT", "MASK_KIND", "DOT_PRECISION"]


def _tuned(kernel: str, configs, layout_dims, extra_key=()):
    return autotuned(configs, _MM_KEY + list(extra_key), _make_prune(kernel, layout_dims))


# ---------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------

@triton.jit
def _grouped_tile(pid, num_pid_a, num_pid_b, GROUP: tl.constexpr):
    # Group GROUP consecutive row-tiles so neighbouring programs share operand
    # tiles in L2.
    num_in_group = GROUP * num_pid_b
    group_id = pid // num_in_group
    first_a = group_id * GROUP
    group_size = tl.minimum(num_pid_a - first_a, GROUP)
    pid_a = first_a + ((pid % num_in_group) % group_size)
    pid_b = (pid % num_in_group) // group_size
    return pid_a, pid_b


@triton.jit
def _reduction_range(ptr, tile_start, n, HAS_LAYOUT: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                     TILE: tl.constexpr):
    # (first list entry, number of TILE-wide reduction steps) of the output tile starting at
    # tile_start. With a layout the tile lies inside one block row (CSR) or column (CSC): only
    # its live blocks, listed from ptr[blk], are walked, each in BLOCK_SIZE // TILE sub-tiles.
    # Dense: all of 0..n.
    if HAS_LAYOUT:
        blk = tile_start // BLOCK_SIZE
        start = tl.load(ptr + blk)
        n_iter = (tl.load(ptr + blk + 1) - start) * (BLOCK_SIZE // TILE)
    else:
        start = 0
        n_iter = tl.cdiv(n, TILE)
    return start, n_iter


@triton.jit
def _reduction_offsets(idx_ptr, start, it, HAS_LAYOUT: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                       TILE: tl.constexpr):
    # Reduction indices of step `it` of _reduction_range's walk (idx_ptr: the block list).
    if HAS_LAYOUT:
        SUB = BLOCK_SIZE // TILE
        blk = tl.load(idx_ptr + start + it // SUB)
        r0 = blk * BLOCK_SIZE + (it % SUB) * TILE
    else:
        r0 = it * TILE
    return r0 + tl.arange(0, TILE)


@triton.jit
def _load_weight_tile(w_ptr, mask_ptr, offs_n, offs_k, N, K, stride_wn,
                      MASK_KIND: tl.constexpr):
    # Returns the [BLOCK_N, BLOCK_K] tile of weight * mask in the weight dtype.
    ok = (offs_n[:, None] < N) & (offs_k[None, :] < K)
    off = offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :]
    w = tl.load(w_ptr + off, mask=ok, other=0.0)
    if MASK_KIND == 1:
        # 0/1 mask: a pruned weight contributes nothing, even if it is not finite.
        m = tl.load(mask_ptr + off, mask=ok, other=0)
        w = tl.where(m != 0, w, tl.zeros_like(w))
    elif MASK_KIND == 2:
        m = tl.load(mask_ptr + off, mask=ok, other=0)
        w = w * m.to(w.dtype)
    return w


@_tuned("fwd", _MM_CONFIGS, ("BLOCK_N", "BLOCK_K"))
@triton.jit
def _fwd_kernel(
    x_ptr, w_ptr, mask_ptr, bias_ptr, y_ptr, row_ptr, col_idx,
    M, N, K, M_BUCKET,
    stride_xm, stride_wn, stride_ym,
    ELEM_BYTES: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    HAS_LAYOUT: tl.constexpr,
    MASK_KIND: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_m, pid_n = _grouped_tile(pid, tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    x_rows = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm

    start, n_iter = _reduction_range(row_ptr, pid_n * BLOCK_N, K, HAS_LAYOUT, BLOCK_SIZE, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for it in range(0, n_iter):
        offs_k = _reduction_offsets(col_idx, start, it, HAS_LAYOUT, BLOCK_SIZE, BLOCK_K)
        a = tl.load(x_rows + offs_k[None, :], mask=m_ok[:, None] & (offs_k[None, :] < K), other=0.0)
        w = _load_weight_tile(w_ptr, mask_ptr, offs_n, offs_k, N, K, stride_wn, MASK_KIND)
        acc = tl.dot(a, tl.trans(w), acc, input_precision=DOT_PRECISION)

    if HAS_BIAS:
        b = tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0)
        acc += b.to(tl.float32)[None, :]
    y_off = offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :]
    tl.store(y_ptr + y_off, acc.to(y_ptr.dtype.element_ty),
             mask=m_ok[:, None] & (offs_n[None, :] < N))


@_tuned("dx", _MM_CONFIGS, ("BLOCK_N", "BLOCK_K"))
@triton.jit
def _grad_input_kernel(
    g_ptr, w_ptr, mask_ptr, dx_ptr, col_ptr, row_idx,
    M, N, K, M_BUCKET,
    stride_gm, stride_wn, stride_dxm,
    ELEM_BYTES: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    HAS_LAYOUT: tl.constexpr,
    MASK_KIND: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # dx[M, K] = grad_out[M, N] @ W'[N, K]; output tile BLOCK_M x BLOCK_K,
    # reduction over N in BLOCK_N steps.
    pid = tl.program_id(0)
    pid_m, pid_k = _grouped_tile(pid, tl.cdiv(M, BLOCK_M), tl.cdiv(K, BLOCK_K), GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    g_rows = g_ptr + offs_m[:, None].to(tl.int64) * stride_gm

    start, n_iter = _reduction_range(col_ptr, pid_k * BLOCK_K, N, HAS_LAYOUT, BLOCK_SIZE, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for it in range(0, n_iter):
        offs_n = _reduction_offsets(row_idx, start, it, HAS_LAYOUT, BLOCK_SIZE, BLOCK_N)
        g = tl.load(g_rows + offs_n[None, :], mask=m_ok[:, None] & (offs_n[None, :] < N), other=0.0)
        w = _load_weight_tile(w_ptr, mask_ptr, offs_n, offs_k, N, K, stride_wn, MASK_KIND)
        acc = tl.dot(g, w, acc, input_precision=DOT_PRECISION)

    dx_off = offs_m[:, None].to(tl.int64) * stride_dxm + offs_k[None, :]
    tl.store(dx_ptr + dx_off, acc.to(dx_ptr.dtype.element_ty),
             mask=m_ok[:, None] & (offs_k[None, :] < K))


@_tuned("gw", _GW_CONFIGS, ("BLOCK_N", "BLOCK_K"),
        extra_key=("COMPUTE_DEAD", "NEED_DW", "NEED_DM"))
@triton.jit
def _grad_weight_kernel(
    g_ptr, x_ptr, w_ptr, mask_ptr, dw_ptr, dm_ptr, row_ptr, col_idx,
    M, N, K, M_BUCKET,
    stride_gm, stride_xm, stride_wn,
    ELEM_BYTES: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    HAS_LAYOUT: tl.constexpr,
    COMPUTE_DEAD: tl.constexpr,
    SEARCH_ITERS: tl.constexpr,
    MASK_KIND: tl.constexpr,
    NEED_DW: tl.constexpr,
    NEED_DM: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # G[N, K] = grad_out[M, N]^T @ x[M, K]; output tile BLOCK_N x BLOCK_K,
    # reduction over M. dW = G * mask_eff and dM = G * weight share one G.
    pid = tl.program_id(0)
    pid_n, pid_k = _grouped_tile(pid, tl.cdiv(N, BLOCK_N), tl.cdiv(K, BLOCK_K), GROUP_M)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    n_ok = offs_n < N
    k_ok = offs_k < K

    n_iter = tl.cdiv(M, BLOCK_M)
    if HAS_LAYOUT:
        # The tile lies inside one block; find whether it is live by binary
        # search of its column in the (ascending) CSR row.
        brow = (pid_n * BLOCK_N) // BLOCK_SIZE
        bcol = (pid_k * BLOCK_K) // BLOCK_SIZE
        start = tl.load(row_ptr + brow)
        end = tl.load(row_ptr + brow + 1)
        lo = start
        hi = end
        for _ in tl.static_range(SEARCH_ITERS):
            mid = (lo + hi) // 2
            v = tl.load(col_idx + mid, mask=mid < hi, other=0)
            go_right = (mid < hi) & (v < bcol)
            lo = tl.where(go_right, mid + 1, lo)
            hi = tl.where(go_right, hi, mid)
        found = tl.load(col_idx + lo, mask=lo < end, other=-1)
        live = (lo < end) & (found == bcol)
        if not COMPUTE_DEAD:
            # Dead blocks skip the reduction entirely and only write zeros.
            n_iter = n_iter * live.to(tl.int32)

    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for it in range(0, n_iter):
        offs_m = it * BLOCK_M + tl.arange(0, BLOCK_M)
        m_ok = offs_m < M
        rows = offs_m[:, None].to(tl.int64)
        g = tl.load(g_ptr + rows * stride_gm + offs_n[None, :],
                    mask=m_ok[:, None] & n_ok[None, :], other=0.0)
        a = tl.load(x_ptr + rows * stride_xm + offs_k[None, :],
                    mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        acc = tl.dot(tl.trans(g), a, acc, input_precision=DOT_PRECISION)

    ok = n_ok[:, None] & k_ok[None, :]
    off = offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :]
    if NEED_DW:
        dw = acc
        if MASK_KIND == 1:
            m = tl.load(mask_ptr + off, mask=ok, other=0)
            dw = tl.where(m != 0, dw, 0.0)
        elif MASK_KIND == 2:
            m = tl.load(mask_ptr + off, mask=ok, other=0)
            dw = dw * m.to(tl.float32)
        if HAS_LAYOUT and COMPUTE_DEAD:
            # G was computed for dead blocks too (for dM); dW is zero there.
            # Without COMPUTE_DEAD dead tiles have acc == 0 already.
            dw = tl.where(live, dw, 0.0)
        tl.store(dw_ptr + off, dw.to(dw_ptr.dtype.element_ty), mask=ok)
    if NEED_DM:
        w = tl.load(w_ptr + off, mask=ok, other=0.0)
        dm = acc * w.to(tl.float32)
        tl.store(dm_ptr + off, dm.to(dm_ptr.dtype.element_ty), mask=ok)


# ---------------------------------------------------------------------------
# Host-side launchers
# ---------------------------------------------------------------------------

def _mask_kind(mask: Optional[torch.Tensor]) -> int:
    if mask is None:
        return _MASK_NONE
    if mask.dtype in (torch.uint8, torch.bool):
        return _MASK_BINARY
    return _MASK_FLOAT


def _as_kernel_mask(mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    # bool and uint8 share a byte layout; uint8 avoids i1 pointer quirks.
    if mask is not None and mask.dtype == torch.bool:
        return mask.view(torch.uint8)
    return mask


def _tf32_allowed() -> bool:
    try:
        return bool(torch.backends.cuda.matmul.allow_tf32)
    except Exception:  # legacy/new precision APIs mixed: read the new one
        try:
            return torch.backends.cuda.matmul.fp32_precision == "tf32"
        except Exception:
            return False


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs follow torch's matmul setting so results match F.linear;
    # the setting is irrelevant for 16-bit operands.
    if dtype == torch.float32 and not _tf32_allowed():
        return "ieee"
    return "tf32"


def _m_bucket(m: int) -> int:
    # Autotune per power-of-two bucket of M so varying batch sizes do not
    # trigger a re-tune on every new M.
    return triton.next_power_of_2(max(int(m), 1))


def _launch_flags(operand, mask, layout_ptr, block_size) -> dict:
    """Constexpr flags shared by the three kernels (plus the fixed tiles under the interpreter)."""
    has_layout = layout_ptr is not None
    # 0 when dense so the (ignored) block size does not split compile caches.
    bs = int(block_size) if has_layout else 0
    flags = dict(
        ELEM_BYTES=operand.element_size(),
        BLOCK_SIZE=bs,
        HAS_LAYOUT=has_layout,
        MASK_KIND=_mask_kind(mask),
        DOT_PRECISION=_dot_precision(operand.dtype),
    )
    if _INTERPRET:
        flags.update(_INTERPRET_META)
        if has_layout:
            # Tiles inside one block (the autotune prune does the same on GPUs).
            flags["BLOCK_N"] = min(flags["BLOCK_N"], bs)
            flags["BLOCK_K"] = min(flags["BLOCK_K"], bs)
    return flags


def _tile_grid(rows: int, row_tile: str, cols: int, col_tile: str):
    """1-D launch grid over the tiles of a rows x cols output (tile sizes named in META)."""
    return lambda META: (triton.cdiv(rows, META[row_tile]) * triton.cdiv(cols, META[col_tile]),)


def masked_linear_forward(x, weight, mask, bias, row_ptr, col_idx, block_size) -> torch.Tensor:
    """y = x @ (weight * mask * layout)^T + bias, shape [M, N], dtype x.dtype."""
    M, K = x.shape
    N = weight.shape[0]
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    if M == 0 or N == 0:
        return y
    if K == 0:
        y.zero_()
        if bias is not None:
            y += bias
        return y

    mask = _as_kernel_mask(mask)
    with on_device(x):
        _fwd_kernel[_tile_grid(M, "BLOCK_M", N, "BLOCK_N")](
            x, weight,
            mask if mask is not None else weight,
            bias if bias is not None else weight,
            y,
            row_ptr if row_ptr is not None else weight,
            col_idx if row_ptr is not None else weight,
            M, N, K, _m_bucket(M),
            x.stride(0), weight.stride(0), y.stride(0),
            HAS_BIAS=bias is not None,
            **_launch_flags(x, mask, row_ptr, block_size),
        )
    return y


def masked_linear_grad_input(grad_out, weight, mask, col_ptr, row_idx, block_size) -> torch.Tensor:
    """dx = grad_out @ (weight * mask * layout), shape [M, K], dtype grad_out.dtype."""
    M, N = grad_out.shape
    K = weight.shape[1]
    dx = torch.empty((M, K), device=grad_out.device, dtype=grad_out.dtype)
    if M == 0 or K == 0:
        return dx
    if N == 0:
        return dx.zero_()

    mask = _as_kernel_mask(mask)
    with on_device(grad_out):
        _grad_input_kernel[_tile_grid(M, "BLOCK_M", K, "BLOCK_K")](
            grad_out, weight,
            mask if mask is not None else weight,
            dx,
            col_ptr if col_ptr is not None else weight,
            row_idx if col_ptr is not None else weight,
            M, N, K, _m_bucket(M),
            grad_out.stride(0), weight.stride(0), dx.stride(0),
            **_launch_flags(grad_out, mask, col_ptr, block_size),
        )
    return dx


def masked_linear_grad_weight(
    grad_out, x, weight, mask, row_ptr, col_idx, block_size,
    need_weight_grad, need_mask_grad,
) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Returns (dW, dM) from G = grad_out^T @ x.

    dW = G * mask * layout (weight dtype), dM = G * weight (mask dtype).
    With a layout and no mask gradient, G is computed only for live blocks;
    dead blocks of dW are written as zeros.
    """
    need_weight_grad = bool(need_weight_grad)
    need_mask_grad = bool(need_mask_grad) and mask is not None
    if not need_weight_grad and not need_mask_grad:
        return None, None

    M = grad_out.shape[0]
    N, K = weight.shape
    dw = torch.empty_like(weight) if need_weight_grad else None
    dm = torch.empty(mask.shape, device=mask.device, dtype=mask.dtype) if need_mask_grad else None
    if N == 0 or K == 0:
        return dw, dm
    if M == 0:
        if dw is not None:
            dw.zero_()
        if dm is not None:
            dm.zero_()
        return dw, dm

    kmask = _as_kernel_mask(mask)
    flags = _launch_flags(x, kmask, row_ptr, block_size)
    has_layout, bs = flags["HAS_LAYOUT"], flags["BLOCK_SIZE"]
    search_iters = max(1, triton.cdiv(K, bs).bit_length()) if has_layout else 1

    with on_device(x):
        _grad_weight_kernel[_tile_grid(N, "BLOCK_N", K, "BLOCK_K")](
            grad_out, x, weight,
            kmask if kmask is not None else weight,
            dw if dw is not None else weight,
            dm if dm is not None else weight,
            row_ptr if has_layout else weight,
            col_idx if has_layout else weight,
            M, N, K, _m_bucket(M),
            grad_out.stride(0), x.stride(0), weight.stride(0),
            COMPUTE_DEAD=need_mask_grad or not has_layout,
            SEARCH_ITERS=search_iters,
            NEED_DW=need_weight_grad,
            NEED_DM=need_mask_grad,
            **flags,
        )
    return dw, dm
