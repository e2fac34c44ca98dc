"""Attention on capkit's C++ CPU kernel for inference, through transformers' attention interface.

Pruning makes a model's linear layers cheap; the attention itself (``softmax(q k^T / sqrt(d)) v``)
is not sparse and becomes a large share of a pruned encoder's time on the CPU.
``capkit::attention_forward`` computes it for fp32 inference in one pass per head (see
``csrc/cpu/attention_cpu.cpp``): on the 2-core Xeon (AVX-512), 1 x 12 heads x 128 x 32 took
145 us against 194 us for ``torch.nn.functional.scaled_dot_product_attention``, 228 against
369 us at head size 64, 4.7 against 6.0 ms at batch 32 (scratch timings, inputs laid out as a
model's transposed projections).

:func:`use_cpu_attention` switches a transformers model to it (``capkit.load`` does this). The
registered attention function runs the kernel where it applies (CPU, fp32, no autograd, no dropout,
no causal mask, an additive or boolean mask, an AVX-512 CPU) and hands every other call to
transformers' own SDPA path unchanged, so training, GPUs and other dtypes behave as before.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

__all__ = ["ATTENTION_NAME", "cpu_attention", "cpu_attention_available", "use_cpu_attention"]

ATTENTION_NAME = "capkit_cpu"
_registered = False
_available: Optional[bool] = None


def cpu_attention_available() -> bool:
    """Whether the C++ kernel is built and has its vectorised path on this CPU (elsewhere it would
    run a plain loop, slower than torch's own attention, so it is not used). Asked once."""
    global _available
    if _available is None:
        from capkit._ext import build_info

        _available = bool(build_info().get("attention_vectorised", False))
    return _available


def additive_mask(mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """``mask`` as the attention kernel takes it: float32, added to the scores (a boolean mask's
    True keeps a key: 0, False removes it: -inf)."""
    if mask is None or mask.dtype == torch.float32:
        return mask
    return torch.where(mask, 0.0, float("-inf")) if mask.dtype == torch.bool else mask.to(torch.float32)


def cpu_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor] = None,
                  scale: Optional[float] = None) -> torch.Tensor:
    """``softmax(q k^T * scale + mask) v`` with the C++ kernel, for fp32 CPU tensors without autograd.

    Args:
        q: ``[B, H, Sq, D]``; k, v: ``[B, H, Sk, D]``; any strides whose last is 1 (other layouts
            are copied).
        mask: None, boolean (True keeps a key) or float (added to the scores; -inf removes a key),
            4-D and broadcastable to ``[B, H, Sq, Sk]``.
        scale: the factor of the scores, default ``1 / sqrt(D)``.
    Returns:
        ``[B, Sq, H, D]`` (contiguous: the layout a model reshapes to ``[B, Sq, H * D]``). A query
        whose keys are all removed gets zeros, as torch's SDPA gives.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"cpu_attention: {name} must be a 4-D tensor [batch, heads, positions, features], got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
        if t.dtype != torch.float32 or not t.is_cpu:
            raise TypeError(f"cpu_attention: {name} must be a float32 CPU tensor, got {t.dtype} on {t.device}")
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.dim() != 4:
            raise ValueError("cpu_attention: mask must be a 4-D tensor broadcastable to [batch, heads, Sq, Sk]")
        mask = additive_mask(mask)
    q, k, v = (t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    return torch.ops.capkit.attention_forward(q, k, v, mask, float(scale))


def _applies(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
             attention_mask, dropout: float, is_causal, kwargs) -> bool:
    if torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value)):
        return False
    if dropout and module.training:
        return False
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", False)
    if causal or kwargs.get("softcap") is not None or kwargs.get("output_attentions", False):
        return False
    if kwargs.get("position_bias") is not None or getattr(module, "num_key_value_groups", 1) != 1:
        return False
    if not all(t.is_cpu and t.dtype == torch.float32 for t in (query, key, value)):
        return False
    if attention_mask is not None and (not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 4
                                       or not attention_mask.is_cpu):
        return False
    if torch.is_autocast_enabled("cpu"):
        return False
    return bool(_available)  # set by use_cpu_attention, before any call (and any graph) reaches here


def _attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attention_mask: Optional[torch.Tensor], dropout: float = 0.0, scaling: Optional[float] = None,
                       is_causal: Optional[bool] = None, **kwargs):
    """transformers' attention-function signature: ``(output [B, S, H, D], None)``."""
    if _applies(module, query, key, value, attention_mask, dropout, is_causal, kwargs):
        return cpu_attention(query, key, value, attention_mask, scaling), None
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  is_causal=is_causal, **kwargs)


def _register() -> bool:
    global _registered
    if _registered:
        return True
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
    except ImportError:  # transformers without the attention interface
        return False
    AttentionInterface.register(ATTENTION_NAME, _attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION_NAME, sdpa_mask)  # the same masks SDPA gets
    _registered = True
    return True


def use_cpu_attention(model: nn.Module) -> bool:
    """Switch a transformers model whose attention runs through transformers' SDPA path to capkit's
    CPU kernel (other calls still reach SDPA, see the module docstring). Returns whether it did:
    False, with the model unchanged, for models on another attention implementation (eager, flash,
    flex), without a transformers config, or where the kernel's vectorised path is unavailable."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"use_cpu_attention: model must be an nn.Module, got {type(model).__name__}")
    config = getattr(model, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) not in ("sdpa", ATTENTION_NAME):
        return False
    if not cpu_attention_available() or not _register():
        return False
    configs = {id(config): config}
    for m in model.modules():  # sub-models may hold configs of their own
        c = getattr(m, "config", None)
        if c is not None and getattr(c, "_attn_implementation", None) == "sdpa":
            configs[id(c)] = c
    for c in configs.values():
        c._attn_implementation = ATTENTION_NAME
    return True
