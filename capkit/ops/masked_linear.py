"""``masked_linear``: ``y = x @ (weight * mask)^T + bias`` without materialising ``weight * mask``.

Gradients (straight-through for movement pruning): ``dx = dy @ (W * M)``,
``dweight = (dy^T x) * M``, ``dbias = sum(dy)``, and, when ``mask`` is a floating tensor that
requires grad, ``dmask = (dy^T x) * W``; ``dy^T x`` is computed once for both.
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch

from capkit.ops import _library
from capkit.ops._backends import BACKENDS, apply_mask, effective_mask
from capkit.ops.masks import BlockMask, NMMask, check_dense_mask
from capkit.ops.sparse_format import (block_csr_applies, csr_applies, csr_linear, packed_for_block_mask,
                                      packed_for_mask)

MaskLike = Union[torch.Tensor, BlockMask, NMMask, None]

__all__ = ["masked_linear"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _split_mask(mask: MaskLike, weight_shape, device):
    """-> (dense element mask or None, layout or None, kind name)."""
    if mask is None:
        return None, None, "none"
    if isinstance(mask, BlockMask):
        if mask.shape != tuple(weight_shape):
            raise ValueError(f"mask (BlockMask) has shape {mask.shape}, the weight has {tuple(weight_shape)}")
        if mask.device != device:
            raise ValueError(f"mask (BlockMask) is on {mask.device}, the weight is on {device}")
        return mask.mask, mask.layout, "block"
    if isinstance(mask, NMMask):
        if mask.shape != tuple(weight_shape):
            raise ValueError(f"mask (NMMask) has shape {mask.shape}, the weight has {tuple(weight_shape)}")
        return mask.mask, None, "nm"
    check_dense_mask(mask, weight_shape)
    return mask, None, "dense"


def masked_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    mask: MaskLike,
    bias: Optional[torch.Tensor] = None,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """Linear layer with a masked weight, ``y = x @ (weight * mask)^T + bias``.

    Args:
        x: input ``[..., in_features]``; any leading shape, need not be contiguous.
        weight: ``[out_features, in_features]``, same dtype and device as ``x``.
        mask: None, a dense tensor of the weight's shape (bool/uint8: keep where nonzero, pruned
            entries contribute nothing; floating: multiplicative, receives a gradient when it
            requires grad), a :class:`BlockMask` (dead blocks are skipped) or an :class:`NMMask`.
        bias: optional ``[out_features]``.
        backend: ``"auto"`` (choice from measured results), ``"torch"`` (reference),
            ``"triton"``, ``"cuda"`` or ``"cpu"``.
    Returns:
        ``[..., out_features]`` in ``x``'s dtype.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [out_features, in_features], got shape {tuple(weight.shape)}")
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension (its last is in_features)")
    out_f, in_f = weight.shape
    if x.shape[-1] != in_f:
        raise ValueError(f"x's last dimension ({x.shape[-1]}) must equal weight's in_features ({in_f})")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"x must be a floating tensor (float16/bfloat16/float32/float64), got {x.dtype}")
    if torch.is_autocast_enabled(x.device.type) and weight.dtype in (torch.float32, torch.float64):
        # Under autocast behave like F.linear: compute in the autocast dtype (the casts are
        # differentiable, so fp32 master weights, biases and scores still get their gradients).
        x, weight, bias, mask = _autocast_inputs(x, weight, bias, mask)
    if weight.dtype != x.dtype:
        raise TypeError(f"weight's dtype ({weight.dtype}) must equal x's dtype ({x.dtype})")
    if weight.device != x.device:
        raise ValueError(f"weight is on {weight.device} but x is on {x.device}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (out_f,):
            shape = tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__
            raise ValueError(f"bias must be a tensor of shape ({out_f},), got {shape}")
        if bias.dtype != x.dtype or bias.device != x.device:
            raise TypeError(f"bias must match x's dtype and device ({x.dtype}, {x.device}), got ({bias.dtype}, {bias.device})")
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"backend must be one of {('auto',) + BACKENDS}, got {backend!r}")

    dense_mask, layout, kind = _split_mask(mask, weight.shape, weight.device)
    if dense_mask is not None and dense_mask.device != weight.device:
        raise ValueError(f"mask is on {dense_mask.device} but the weight is on {weight.device}")

    lead = x.shape[:-1]
    rows = math.prod(lead)
    if rows == 0 or out_f == 0 or in_f == 0:
        # Empty problems: shape-correct results that stay in the autograd graph.
        w = apply_mask(weight, effective_mask(weight, dense_mask, layout))
        return torch.nn.functional.linear(x, w, bias)

    if kind == "dense" and csr_applies(x, weight, dense_mask, bias, backend):
        # Inference with a fixed 0/1 mask sparse enough for the CSR kernel (measured threshold).
        return csr_linear(x, packed_for_mask(weight, dense_mask), bias)
    if kind == "block" and block_csr_applies(x, weight, layout, dense_mask, bias, backend):
        # A fixed block mask as sparse: the CSR kernel was faster than the block kernel there.
        return csr_linear(x, packed_for_block_mask(weight, layout, dense_mask), bias)

    training = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, weight, dense_mask, bias)
    )
    if dense_mask is not None and dense_mask.requires_grad and not dense_mask.dtype.is_floating_point:
        raise TypeError("mask requires grad but is not floating point")
    x2d = x.reshape(rows, in_f).contiguous()
    mask_c = dense_mask.contiguous() if dense_mask is not None else None
    bias_c = bias.contiguous() if bias is not None else None
    # The custom op capkit::masked_linear (capkit.ops._library): "auto" is resolved inside it, by
    # the dispatch table, so that torch.compile traces the call as one node.
    with torch.autocast(x.device.type, enabled=False):
        y = torch.ops.capkit.masked_linear(x2d, weight.contiguous(), mask_c, bias_c,
                                           *_library.layout_tensors(layout), kind, bool(training), backend)
    return y.view(*lead, out_f)


def masked_linear_with_steps(x: torch.Tensor, weight: torch.Tensor, mask: MaskLike, bias: Optional[torch.Tensor],
                             backend: str, activation: Optional[str] = None, residual: Optional[torch.Tensor] = None,
                             layer_norm: Optional[torch.nn.LayerNorm] = None) -> torch.Tensor:
    """Inference only: ``masked_linear(x, weight, mask, bias)`` followed by ``activation``
    (``"gelu"``) or ``+ residual`` (the output's shape) and/or ``layer_norm`` (an ``nn.LayerNorm``
    over the outputs), as one ``capkit::masked_linear_fused`` call, so that a torch.compile graph
    keeps the steps inside the CSR kernel. The caller (:class:`capkit.nn.MaskedLinear`) has checked
    the arguments and that autograd is off."""
    out_f, in_f = weight.shape
    dense_mask, layout, kind = _split_mask(mask, weight.shape, weight.device)
    lead = x.shape[:-1]
    rows = math.prod(lead)
    ln_w = ln_b = None
    eps = 1e-5
    if layer_norm is not None:
        ln_w, ln_b, eps = layer_norm.weight, layer_norm.bias, float(layer_norm.eps)
    y = torch.ops.capkit.masked_linear_fused(
        x.reshape(rows, in_f), weight, dense_mask, bias, *_library.layout_tensors(layout), kind, backend,
        1 if activation == "gelu" else 0, None if residual is None else residual.reshape(rows, out_f),
        layer_norm is not None, ln_w, ln_b, eps)
    return y.view(*lead, out_f)


def _autocast_inputs(x, weight, bias, mask):
    dtype = torch.get_autocast_dtype(x.device.type)
    x = x.to(dtype)
    weight = weight.to(dtype)
    bias = bias.to(dtype) if bias is not None else None
    if isinstance(mask, torch.Tensor) and mask.dtype.is_floating_point:
        mask = mask.to(dtype)
    return x, weight, bias, mask
