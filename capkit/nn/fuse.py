"""Inference fusions for loaded sparse models.

A BERT-family feed-forward block starts with ``intermediate.dense`` (hidden -> 4 x hidden) and
its activation. When the dense layer is a :class:`~capkit.nn.MaskedLinear` that runs on the CSR
kernel and the activation is the exact (erf) GELU, the kernel applies the GELU to each output
tile while the tile is still in cache, instead of a separate pass over the whole
``[tokens, 4 x hidden]`` activation. :func:`fuse_gelu` swaps such blocks for
:class:`GeluIntermediate`, which keeps the same submodules (the state dict, and so saving and
loading, are unchanged) and gives the same output on every path: where the CSR kernel does not
run (training, GPU, denser masks, tracing) the GELU runs after the layer as before.
"""
from __future__ import annotations

import torch
from torch import nn

from capkit.nn.masked_linear import MaskedLinear

__all__ = ["GeluIntermediate", "fuse_gelu", "is_exact_gelu"]


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


def _fusable(module: nn.Module) -> bool:
    if isinstance(module, GeluIntermediate) or not type(module).__name__.endswith("Intermediate"):
        return False
    children = dict(module.named_children())
    return (set(children) == {"dense", "intermediate_act_fn"} and isinstance(children["dense"], MaskedLinear)
            and is_exact_gelu(children["intermediate_act_fn"]))


def fuse_gelu(model: nn.Module) -> int:
    """Replace every transformers ``*Intermediate`` block of ``model`` whose ``dense`` is a
    :class:`MaskedLinear` and whose activation is the exact GELU by :class:`GeluIntermediate`
    (in place); returns how many were replaced. Other blocks are left as they are."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"fuse_gelu: model must be an nn.Module, got {type(model).__name__}")
    targets = [(name, module) for name, module in model.named_modules() if _fusable(module)]
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, GeluIntermediate(module.dense, module.intermediate_act_fn))
    return len(targets)
