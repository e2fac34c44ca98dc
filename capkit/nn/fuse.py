"""Inference fusions for loaded sparse models.

The steps of a BERT-family layer that follow a linear layer can run inside the CSR kernel, on
each output tile while the tile is still in cache, instead of as separate passes over the whole
activation: the exact (erf) GELU after ``intermediate.dense``, and the residual connection and
LayerNorm after ``attention.output.dense`` and ``output.dense`` (``LayerNorm(dense(h) + input)``).
:func:`fuse_for_inference` swaps such blocks for :class:`GeluIntermediate` and
:class:`ResidualOutput`. Both keep the same submodules (the state dict, and so saving and
loading, are unchanged) and give the same output on every path: where the CSR kernel does not run
(training, GPU, denser masks, tracing) the step runs after the layer as before, and
:class:`ResidualOutput` applies its dropout, when active, before the sum as the original does.
"""
from __future__ import annotations

from typing import Dict

import torch
from torch import nn

from capkit.nn.masked_linear import MaskedLinear

__all__ = ["GeluIntermediate", "ResidualOutput", "fuse_for_inference", "is_exact_gelu"]


def is_exact_gelu(act) -> bool:
    """Whether ``act`` computes ``torch.nn.functional.gelu`` (the erf form): ``nn.GELU()`` or
    transformers' ``GELUActivation`` (not its tanh or Python variants)."""
    if isinstance(act, nn.GELU):
        return act.approximate == "none"
    try:
        from transformers.activations import GELUActivation
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    return type(act) is GELUActivation and getattr(act, "act", None) is torch.nn.functional.gelu


class GeluIntermediate(nn.Module):
    """``gelu(dense(x))`` with the GELU inside the CSR kernel when that kernel runs; a drop-in
    for a transformers ``*Intermediate`` block (``dense`` + exact-GELU ``intermediate_act_fn``)."""

    def __init__(self, dense: MaskedLinear, intermediate_act_fn: nn.Module):
        super().__init__()
        if not isinstance(dense, MaskedLinear):
            raise TypeError(f"GeluIntermediate: dense must be a MaskedLinear, got {type(dense).__name__}")
        if not is_exact_gelu(intermediate_act_fn):
            raise ValueError("GeluIntermediate: intermediate_act_fn must be the exact (erf) GELU, got "
                             f"{intermediate_act_fn!r}")
        self.dense = dense
        self.intermediate_act_fn = intermediate_act_fn

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if isinstance(self.dense, MaskedLinear):
            return self.dense(hidden_states, activation="gelu")
        # dense swapped for a plain layer since (capkit.nn.unpatch): the two steps
        return self.intermediate_act_fn(self.dense(hidden_states))


class ResidualOutput(nn.Module):
    """``LayerNorm(dropout(dense(h)) + input_tensor)`` with the sum and the LayerNorm inside the
    CSR kernel when that kernel runs and the dropout is inactive; a drop-in for a transformers ``*SelfOutput`` /
    ``*Output`` block (``dense``, ``dropout``, ``LayerNorm``)."""

    def __init__(self, dense: MaskedLinear, LayerNorm: nn.LayerNorm, dropout: nn.Dropout):  # noqa: N803
        super().__init__()
        if not isinstance(dense, MaskedLinear):
            raise TypeError(f"ResidualOutput: dense must be a MaskedLinear, got {type(dense).__name__}")
        if not isinstance(LayerNorm, nn.LayerNorm):
            raise TypeError(f"ResidualOutput: LayerNorm must be an nn.LayerNorm, got {type(LayerNorm).__name__}")
        if not isinstance(dropout, nn.Dropout):
            raise TypeError(f"ResidualOutput: dropout must be an nn.Dropout, got {type(dropout).__name__}")
        self.dense = dense
        self.LayerNorm = LayerNorm
        self.dropout = dropout

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        if isinstance(self.dense, MaskedLinear) and not (self.dropout.training and self.dropout.p > 0):
            return self.dense(hidden_states, residual=input_tensor, layer_norm=self.LayerNorm)
        return self.LayerNorm(self.dropout(self.dense(hidden_states)) + input_tensor)


def _children(module: nn.Module) -> dict:
    return dict(module.named_children())


def _gelu_block(module: nn.Module) -> bool:
    c = _children(module)
    return (type(module).__name__.endswith("Intermediate") and set(c) == {"dense", "intermediate_act_fn"}
            and isinstance(c["dense"], MaskedLinear) and is_exact_gelu(c["intermediate_act_fn"]))


def _residual_block(module: nn.Module) -> bool:
    c = _children(module)
    return (type(module).__name__.endswith("Output") and set(c) == {"dense", "LayerNorm", "dropout"}
            and isinstance(c["dense"], MaskedLinear) and type(c["LayerNorm"]) is nn.LayerNorm
            and type(c["dropout"]) is nn.Dropout)


def fuse_for_inference(model: nn.Module) -> Dict[str, int]:
    """Replace, in place, every transformers ``*Intermediate`` block of ``model`` whose ``dense``
    is a :class:`MaskedLinear` and whose activation is the exact GELU by :class:`GeluIntermediate`,
    and every ``*SelfOutput`` / ``*Output`` block (``dense`` a MaskedLinear, ``dropout``,
    ``LayerNorm``) by :class:`ResidualOutput`. Returns how many of each were replaced
    (``{"gelu": n, "residual": m}``); other blocks, and blocks already fused, are left alone."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"fuse_for_inference: model must be an nn.Module, got {type(model).__name__}")
    counts = {"gelu": 0, "residual": 0}
    targets = []
    for name, module in model.named_modules():
        if isinstance(module, (GeluIntermediate, ResidualOutput)):
            continue
        if _gelu_block(module):
            targets.append((name, GeluIntermediate(module.dense, module.intermediate_act_fn), "gelu"))
        elif _residual_block(module):
            targets.append((name, ResidualOutput(module.dense, module.LayerNorm, module.dropout), "residual"))
    for name, fused, kind in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        fused.train(parent.get_submodule(child).training)
        setattr(parent, child, fused)
        counts[kind] += 1
    return counts
