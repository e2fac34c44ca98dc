"""capkit's fused ops as PyTorch custom ops (``torch.library``).

Each op has a schema, a fake implementation that gives output shapes and dtypes without running
anything (so ``torch.compile`` and ``torch.export`` trace through it), and a registered autograd
formula, so the compiler sees one opaque node per call instead of a graph break:

* ``capkit::masked_linear(x, weight, mask, bias, row_ptr, col_idx, col_ptr, row_idx, block_size,
  mask_kind, training, backend) -> y`` with its backward ops ``capkit::masked_linear_dx`` and
  ``capkit::masked_linear_dw``. A :class:`~capkit.ops.masks.BlockMask` travels as its four int32
  lists and its block size; an :class:`~capkit.ops.masks.NMMask` as its dense 0/1 mask
  (``mask_kind="nm"``).
* ``capkit::masked_linear_fused(x, weight, mask, bias, <the same mask lists>, backend, activation,
  residual, layer_norm, ln_weight, ln_bias, ln_eps) -> y``: inference only (no gradient), the
  layer and the steps after it (GELU, or residual sum and LayerNorm), inside the CSR kernel where
  that kernel runs; what a compiled :class:`~capkit.nn.MaskedLinear` calls with
  ``activation``/``residual``/``layer_norm`` and autograd off.
* ``capkit::encoder_layer_fused(x, attention_mask, heads, scale, <six linears as lists>, kinds,
  backends, <the two LayerNorms>) -> y``: inference only, a whole BERT-family encoder layer; what a
  compiled fast layer (:func:`capkit.nn.use_fast_layers`) calls.

The two inference-only ops are defined through ``torch.library.Library`` (schema, CPU and CUDA
kernels, fake kernel) rather than ``custom_op``, whose Python wrappers cost far more per call.
* ``capkit::info_nce_stats(qs, keys, key_scale, qid, kid, qlab, klab, self_index, backend)
  -> stats [B, 5]``: the streaming pass of :func:`capkit.ops.info_nce` (per query: log-sum-exp,
  sum and count of the positive scores of each term). Its gradient with respect to ``qs`` is the
  streaming backward kernel with ``coef = (dL/dsum_u, dL/dsum_s, dL/dlse)``; everything around it
  (normalisation, term weights) is plain PyTorch, differentiated by autograd.

The backend is a string argument, resolved inside the real implementation: ``"auto"`` becomes a
concrete backend there (from the measured dispatch table), so the choice never runs while a
graph is traced. These names are distinct from the C++ kernels' own ``torch.ops.capkit.*``
entries (``masked_linear_forward`` and the rest), which the implementations call.
"""
from __future__ import annotations

import sys
import weakref
from typing import Dict, List, Optional, Tuple

import torch

from capkit.ops._backends import choose_backend, get_backend
from capkit.ops import sparse_format
from capkit.ops.masks import BlockLayout
from capkit.ops.sparse_format import (block_csr_applies, csr_applies, csr_linear, packed_for_block_mask,
                                      packed_for_mask, tensor_version)

__all__ = ["CUSTOM_OPS", "layout_tensors"]

# The ops this module registers, as ``torch.ops`` names.
CUSTOM_OPS = ("capkit::masked_linear", "capkit::masked_linear_fused", "capkit::masked_linear_dx",
              "capkit::masked_linear_dw",
              "capkit::info_nce_stats", "capkit::info_nce_stats_backward", "capkit::encoder_layer_fused")


# Inference-only ops (no gradient) are defined through torch.library.Library, not custom_op: a call
# costs a few microseconds that way against 30-140 us through custom_op's wrappers (2-core Xeon: 4.8
# against 142 us for an empty op taking lists of tensors), which a compiled model pays at every node.
# A backward through them is refused by autograd's fallback, as for a custom_op without a formula.
_LIB = torch.library.Library("capkit", "FRAGMENT")


def _inference_op(schema: str):
    name = schema.split("(", 1)[0]

    def register(fn):
        _LIB.define(schema)
        for key in ("CPU", "CUDA"):
            _LIB.impl(name, fn, key)
        fn.register_fake = torch.library.register_fake(f"capkit::{name}")
        return fn

    return register


def layout_tensors(layout: Optional[BlockLayout]):
    """``(row_ptr, col_idx, col_ptr, row_idx, block_size)`` of a block layout (Nones and 0 without)."""
    if layout is None:
        return None, None, None, None, 0
    return layout.row_ptr, layout.col_idx, layout.col_ptr, layout.row_idx, int(layout.block_size)


# Layouts rebuilt from their tensors, by the identity of row_ptr: keeps the reference backend's
# dense block mask (cached on the layout) from being rebuilt at every call.
_LAYOUTS: Dict[int, Tuple[weakref.ref, tuple, BlockLayout]] = {}


def _layout(shape, row_ptr, col_idx, col_ptr, row_idx, block_size) -> Optional[BlockLayout]:
    if row_ptr is None:
        return None
    tensors = (row_ptr, col_idx, col_ptr, row_idx)
    state = tuple((t.data_ptr(), tensor_version(t)) for t in tensors) + (tuple(shape), int(block_size))
    hit = _LAYOUTS.get(id(row_ptr))
    if hit is not None and hit[0]() is row_ptr and hit[1] == state:
        return hit[2]
    layout = BlockLayout(tuple(int(s) for s in shape), int(block_size), *tensors, checked=True)
    if len(_LAYOUTS) > 4096:  # forget layouts whose tensors are gone
        for key in [k for k, v in _LAYOUTS.items() if v[0]() is None]:
            del _LAYOUTS[key]
    _LAYOUTS[id(row_ptr)] = (weakref.ref(row_ptr), state, layout)
    return layout


def _kernel_mask(mask: Optional[torch.Tensor], weight: torch.Tensor) -> Optional[torch.Tensor]:
    """Masks reach the kernels as uint8 (0/1 masks; bool is viewed, not copied) or the weight's dtype."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return mask.view(torch.uint8)
    if mask.dtype == torch.uint8:
        return mask
    return mask.to(weight.dtype)


def _resolve(backend: str, x: torch.Tensor, weight: torch.Tensor, mask: Optional[torch.Tensor],
             layout: Optional[BlockLayout], mask_kind: str, training: bool, op: str = "masked_linear"):
    """The backend object for a call: ``"auto"`` resolved by the dispatch table, then checked."""
    if backend == "auto":
        density = layout.block_density if layout is not None else None
        backend = choose_backend(x.device, x.dtype, mask_kind, density, training)
    impl = get_backend(backend)
    reason = impl.unavailable_reason(x.device) or impl.unsupported_reason(x, weight, mask)
    if reason is not None:
        raise RuntimeError(f"{op}: backend '{backend}' cannot run here: {reason}")
    return impl


# ---------------------------------------------------------------------------------------------
# masked_linear


def _inference_csr(x, weight, mask, bias, layout, mask_kind: str, backend: str):
    """The packed CSR when an inference call goes to the CSR kernel, else None: a fixed 0/1 mask
    (or block layout) sparse enough for it, the same choice an eager masked_linear call makes, taken
    inside the ops too so that a torch.compile graph (which calls them with the real tensors) keeps
    the sparse kernel. The CSR is cached on the mask (or layout)."""
    if mask_kind == "dense" and mask is not None and csr_applies(x, weight, mask, bias, backend):
        return packed_for_mask(weight, mask)
    if mask_kind == "block" and layout is not None and block_csr_applies(x, weight, layout, mask, bias, backend):
        return packed_for_block_mask(weight, layout, mask)
    return None


@torch.library.custom_op("capkit::masked_linear", mutates_args=())
def _masked_linear_op(x: torch.Tensor, weight: torch.Tensor, mask: Optional[torch.Tensor],
                      bias: Optional[torch.Tensor], row_ptr: Optional[torch.Tensor],
                      col_idx: Optional[torch.Tensor], col_ptr: Optional[torch.Tensor],
                      row_idx: Optional[torch.Tensor], block_size: int, mask_kind: str, training: bool,
                      backend: str) -> torch.Tensor:
    layout = _layout(weight.shape, row_ptr, col_idx, col_ptr, row_idx, block_size)
    packed = None if training else _inference_csr(x, weight, mask, bias, layout, mask_kind, backend)
    if packed is not None:
        return csr_linear(x, packed, bias)
    impl = _resolve(backend, x, weight, mask, layout, mask_kind, training)
    return impl.forward(x, weight, _kernel_mask(mask, weight), bias, layout)


@_masked_linear_op.register_fake
def _(x, weight, mask, bias, row_ptr, col_idx, col_ptr, row_idx, block_size, mask_kind, training, backend):
    return x.new_empty((x.shape[0], weight.shape[0]))


# Inference with the steps after the layer (capkit.nn.fuse): one node in a torch.compile graph,
# so that the CSR kernel applies them inside as it does in eager mode. Registered without a
# gradient: MaskedLinear calls it only with autograd off.


@_inference_op("masked_linear_fused(Tensor x, Tensor weight, Tensor? mask, Tensor? bias, Tensor? row_ptr, "
               "Tensor? col_idx, Tensor? col_ptr, Tensor? row_idx, SymInt block_size, str mask_kind, str backend, "
               "SymInt activation, Tensor? residual, bool layer_norm, Tensor? ln_weight, Tensor? ln_bias, "
               "float ln_eps) -> Tensor")
def _masked_linear_fused_op(x: torch.Tensor, weight: torch.Tensor, mask: Optional[torch.Tensor],
                            bias: Optional[torch.Tensor], row_ptr: Optional[torch.Tensor],
                            col_idx: Optional[torch.Tensor], col_ptr: Optional[torch.Tensor],
                            row_idx: Optional[torch.Tensor], block_size: int, mask_kind: str, backend: str,
                            activation: int, residual: Optional[torch.Tensor], layer_norm: bool,
                            ln_weight: Optional[torch.Tensor], ln_bias: Optional[torch.Tensor],
                            ln_eps: float) -> torch.Tensor:
    """``x @ (weight * mask)^T + bias``, then GELU (``activation=1``) or ``+ residual`` and/or the
    LayerNorm (``layer_norm``, with ``ln_weight``, ``ln_bias``, ``ln_eps``) over the outputs; x and
    residual 2-D. Inside the CSR kernel where it runs, after the layer otherwise."""
    if activation not in (0, 1):
        raise ValueError(f"masked_linear_fused: activation must be 0 (none) or 1 (gelu), got {activation}")
    layout = _layout(weight.shape, row_ptr, col_idx, col_ptr, row_idx, block_size)
    packed = _inference_csr(x, weight, mask, bias, layout, mask_kind, backend)
    fits = (residual is None or (residual.dtype == torch.float32 and residual.is_cpu)) and all(
        t is None or (t.dtype == torch.float32 and t.is_cpu) for t in (ln_weight, ln_bias))
    if packed is not None and fits:
        return sparse_format.csr_kernel_call(x, packed, bias, activation, residual, layer_norm, ln_weight, ln_bias,
                                             ln_eps)
    y = torch.ops.capkit.masked_linear(x, weight, mask, bias, row_ptr, col_idx, col_ptr, row_idx, block_size,
                                       mask_kind, False, backend)
    if activation == 1:
        y = torch.nn.functional.gelu(y)
    if residual is not None:
        y = y + residual
    if layer_norm:
        y = torch.nn.functional.layer_norm(y, (y.shape[-1],), ln_weight, ln_bias, ln_eps)
    return y


@_masked_linear_fused_op.register_fake
def _(x, weight, mask, bias, row_ptr, col_idx, col_ptr, row_idx, block_size, mask_kind, backend, activation,
      residual, layer_norm, ln_weight, ln_bias, ln_eps):
    return x.new_empty((x.shape[0], weight.shape[0]))


# A BERT-family encoder layer for inference in a torch.compile graph (capkit.nn.use_fast_layers):
# one node per layer that, when the graph runs, sends the layer to capkit::encoder_layer_forward
# if all six linears go to the CSR kernel (the same per-linear choice as masked_linear), and
# otherwise runs the six masked_linear_fused calls and the attention kernel one by one.


@_inference_op("encoder_layer_fused(Tensor x, Tensor? attention_mask, SymInt heads, float scale, Tensor[] weights, "
               "Tensor?[] masks, Tensor?[] biases, Tensor?[] row_ptrs, Tensor?[] col_idxs, Tensor?[] col_ptrs, "
               "Tensor?[] row_idxs, SymInt[] block_sizes, str kinds, str backends, Tensor?[] ln_weights, "
               "Tensor?[] ln_biases, float[] ln_eps) -> Tensor")
def _encoder_layer_fused_op(x: torch.Tensor, attention_mask: Optional[torch.Tensor], heads: int, scale: float,
                            weights: List[torch.Tensor], masks: List[Optional[torch.Tensor]],
                            biases: List[Optional[torch.Tensor]], row_ptrs: List[Optional[torch.Tensor]],
                            col_idxs: List[Optional[torch.Tensor]], col_ptrs: List[Optional[torch.Tensor]],
                            row_idxs: List[Optional[torch.Tensor]], block_sizes: List[int], kinds: str,
                            backends: str, ln_weights: List[Optional[torch.Tensor]],
                            ln_biases: List[Optional[torch.Tensor]], ln_eps: List[float]) -> torch.Tensor:
    """``x [B, S, hidden]``; six linears (query, key, value, attention output, feed-forward in,
    feed-forward out) as masked_linear_fused takes them, ``kinds`` and ``backends`` joined by
    commas; the two LayerNorms' parameters and eps. Inference only (the caller checks)."""
    from capkit.nn.attention import additive_mask, cpu_attention

    kind, backend = kinds.split(","), backends.split(",")
    b, s, h = x.shape
    x2 = x.reshape(b * s, h)
    lin = [(weights[i], masks[i], biases[i], row_ptrs[i], col_idxs[i], col_ptrs[i], row_idxs[i], block_sizes[i],
            kind[i]) for i in range(6)]
    packs = []
    for i, (w, m, bias, rp, ci, cp, ri, bs, k) in enumerate(lin):
        layout = _layout(w.shape, rp, ci, cp, ri, bs)
        packs.append(_inference_csr(x2, w, m, bias, layout, k, backend[i]))
    ln1 = (ln_weights[0], ln_biases[0], ln_eps[0])
    ln2 = (ln_weights[1], ln_biases[1], ln_eps[1])
    mask = attention_mask
    if all(p is not None for p in packs):
        return torch.ops.capkit.encoder_layer_forward(
            x.contiguous(), additive_mask(mask), heads, scale, [p.ptr for p in packs], [p.col_idx for p in packs],
            [p.values for p in packs], list(biases), [p.shape[0] for p in packs], [p.panel for p in packs],
            [p.row_quads for p in packs], *ln1, *ln2)

    def step(i, inp, activation=0, residual=None, ln=None):
        w, m, bias, rp, ci, cp, ri, bs, k = lin[i]
        lw, lb, eps = ln if ln is not None else (None, None, 1e-5)
        return torch.ops.capkit.masked_linear_fused(inp, w, m, bias, rp, ci, cp, ri, bs, k, backend[i], activation,
                                                    residual, ln is not None, lw, lb, eps)

    split = (b, s, heads, h // heads)
    q, k_, v = (step(i, x2).view(split).transpose(1, 2) for i in range(3))
    ctx = cpu_attention(q, k_, v, mask, scale).reshape(b * s, h)
    a = step(3, ctx, residual=x2, ln=ln1)
    return step(5, step(4, a, activation=1), residual=a, ln=ln2).view(b, s, h)


@_encoder_layer_fused_op.register_fake
def _(x, attention_mask, heads, scale, weights, masks, biases, row_ptrs, col_idxs, col_ptrs, row_idxs, block_sizes,
      kinds, backends, ln_weights, ln_biases, ln_eps):
    return x.new_empty(x.shape)


@torch.library.custom_op("capkit::masked_linear_dx", mutates_args=())
def _masked_linear_dx_op(grad_out: torch.Tensor, weight: torch.Tensor, mask: Optional[torch.Tensor],
                         row_ptr: Optional[torch.Tensor], col_idx: Optional[torch.Tensor],
                         col_ptr: Optional[torch.Tensor], row_idx: Optional[torch.Tensor], block_size: int,
                         mask_kind: str, backend: str) -> torch.Tensor:
    layout = _layout(weight.shape, row_ptr, col_idx, col_ptr, row_idx, block_size)
    impl = _resolve(backend, grad_out, weight, mask, layout, mask_kind, True)
    return impl.grad_input(grad_out.contiguous(), weight, _kernel_mask(mask, weight), layout)


@_masked_linear_dx_op.register_fake
def _(grad_out, weight, mask, row_ptr, col_idx, col_ptr, row_idx, block_size, mask_kind, backend):
    return grad_out.new_empty((grad_out.shape[0], weight.shape[1]))


@torch.library.custom_op("capkit::masked_linear_dw", mutates_args=())
def _masked_linear_dw_op(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                         mask: Optional[torch.Tensor], row_ptr: Optional[torch.Tensor],
                         col_idx: Optional[torch.Tensor], col_ptr: Optional[torch.Tensor],
                         row_idx: Optional[torch.Tensor], block_size: int, mask_kind: str, backend: str,
                         need_weight_grad: bool, need_mask_grad: bool) -> List[torch.Tensor]:
    """``[dweight, dmask]``; an entry not asked for is an empty tensor."""
    layout = _layout(weight.shape, row_ptr, col_idx, col_ptr, row_idx, block_size)
    impl = _resolve(backend, x, weight, mask, layout, mask_kind, True)
    dw, dm = impl.grad_weight(grad_out.contiguous(), x, weight, _kernel_mask(mask, weight), layout,
                              need_weight_grad, need_mask_grad)
    dw = dw if need_weight_grad else weight.new_empty((0,))
    dm = dm.to(mask.dtype) if need_mask_grad else weight.new_empty((0,))
    return [dw, dm]


@_masked_linear_dw_op.register_fake
def _(grad_out, x, weight, mask, row_ptr, col_idx, col_ptr, row_idx, block_size, mask_kind, backend,
      need_weight_grad, need_mask_grad):
    dw = weight.new_empty(weight.shape) if need_weight_grad else weight.new_empty((0,))
    dm = mask.new_empty(mask.shape) if need_mask_grad else weight.new_empty((0,))
    return [dw, dm]


def _masked_linear_setup(ctx, inputs, output):
    x, weight, mask, bias, row_ptr, col_idx, col_ptr, row_idx, block_size, mask_kind, training, backend = inputs
    ctx.save_for_backward(x, weight, mask, row_ptr, col_idx, col_ptr, row_idx)
    ctx.block_size, ctx.mask_kind, ctx.backend = block_size, mask_kind, backend


def _masked_linear_backward(ctx, grad_out):
    x, weight, mask, row_ptr, col_idx, col_ptr, row_idx = ctx.saved_tensors
    need_x, need_w, need_m, need_b = ctx.needs_input_grad[:4]  # need_b is False without a bias
    grad_out = grad_out.contiguous()  # once, for dx, dw and the bias
    lists = (row_ptr, col_idx, col_ptr, row_idx, ctx.block_size, ctx.mask_kind, ctx.backend)
    dx = dw = dm = db = None
    if need_x:
        dx = torch.ops.capkit.masked_linear_dx(grad_out, weight, mask, *lists)
    if need_w or need_m:
        dw, dm = torch.ops.capkit.masked_linear_dw(grad_out, x, weight, mask, *lists, bool(need_w), bool(need_m))
        dw = dw if need_w else None
        dm = dm if need_m else None
    if need_b:
        acc = torch.float64 if grad_out.dtype == torch.float64 else torch.float32
        db = grad_out.sum(0, dtype=acc).to(grad_out.dtype)
    return dx, dw, dm, db, None, None, None, None, None, None, None, None


_masked_linear_op.register_autograd(_masked_linear_backward, setup_context=_masked_linear_setup)


# ---------------------------------------------------------------------------------------------
# info_nce


def _streaming(backend: str, device: torch.device):
    mod = sys.modules["capkit.ops.info_nce"]  # the module's table, so that tests can replace entries

    if backend not in mod._STREAMING:
        raise ValueError(f"info_nce_stats: backend must be one of {tuple(mod._STREAMING)}, got {backend!r}")
    impl = mod._STREAMING[backend]
    why = impl.unavailable_reason(device)
    if why is not None:
        raise RuntimeError(f"info_nce: backend '{backend}' cannot run here: {why}")
    return impl


@torch.library.custom_op("capkit::info_nce_stats", mutates_args=())
def _info_nce_stats_op(qs: torch.Tensor, keys: torch.Tensor, key_scale: Optional[torch.Tensor],
                       qid: torch.Tensor, kid: torch.Tensor, qlab: Optional[torch.Tensor],
                       klab: Optional[torch.Tensor], self_index: Optional[torch.Tensor],
                       backend: str) -> torch.Tensor:
    impl = _streaming(backend, qs.device)
    return impl.forward(qs.contiguous(), keys.contiguous(), key_scale, qid, kid, qlab, klab, self_index)


@_info_nce_stats_op.register_fake
def _(qs, keys, key_scale, qid, kid, qlab, klab, self_index, backend):
    return qs.new_empty((qs.shape[0], 5), dtype=torch.float32)


@torch.library.custom_op("capkit::info_nce_stats_backward", mutates_args=())
def _info_nce_stats_backward_op(qs: torch.Tensor, keys: torch.Tensor, key_scale: Optional[torch.Tensor],
                                qid: torch.Tensor, kid: torch.Tensor, qlab: Optional[torch.Tensor],
                                klab: Optional[torch.Tensor], self_index: Optional[torch.Tensor],
                                lse: torch.Tensor, coef: torch.Tensor, backend: str) -> torch.Tensor:
    impl = _streaming(backend, qs.device)
    return impl.backward(qs.contiguous(), keys.contiguous(), key_scale, qid, kid, qlab, klab, self_index,
                         lse.contiguous(), coef.contiguous())


@_info_nce_stats_backward_op.register_fake
def _(qs, keys, key_scale, qid, kid, qlab, klab, self_index, lse, coef, backend):
    return torch.empty_like(qs, dtype=torch.float32)


def _info_nce_setup(ctx, inputs, output):
    qs, keys, key_scale, qid, kid, qlab, klab, self_index, backend = inputs
    ctx.save_for_backward(qs, keys, key_scale, qid, kid, qlab, klab, self_index, output)
    ctx.backend = backend


def _info_nce_backward(ctx, grad_stats):
    qs, keys, key_scale, qid, kid, qlab, klab, self_index, stats = ctx.saved_tensors
    dqs = None
    if ctx.needs_input_grad[0]:
        # stats = (lse, sum_u, cnt_u, sum_s, cnt_s); the counts are piecewise constant in qs.
        g = grad_stats.float()
        coef = torch.stack([g[:, 1], g[:, 3], g[:, 0]], dim=1).contiguous()
        dqs = torch.ops.capkit.info_nce_stats_backward(qs, keys, key_scale, qid, kid, qlab, klab, self_index,
                                                       stats[:, 0].contiguous(), coef, ctx.backend)
        dqs = dqs.to(qs.dtype)
    return dqs, None, None, None, None, None, None, None, None


_info_nce_stats_op.register_autograd(_info_nce_backward, setup_context=_info_nce_setup)
