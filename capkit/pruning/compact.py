"""Physical removal of pruned attention heads and FFN neurons: smaller dense layers.

Removing head ``h`` of a layer deletes rows ``h*head_size : (h+1)*head_size`` of the query, key
and value weights and biases and the same input columns of the attention output weight;
removing FFN neuron ``j`` deletes row ``j`` of the FFN input weight and bias and input column
``j`` of the FFN output weight. Attention in transformers reshapes with ``view(..., -1,
head_size)`` (and older versions read ``num_attention_heads``/``all_head_size``, which are updated
per layer), so a layer with fewer heads runs unchanged.

The per-layer sizes are recorded as ``model.config.capkit_structure = {"heads": [...],
"intermediate_sizes": [...]}`` (plain JSON, kept by ``save_pretrained``). To load a compacted
checkpoint, build the model from its config, call :func:`shrink_to_structure` with that record,
then ``load_state_dict``.
"""
from __future__ import annotations

import numbers
import warnings
from typing import Dict, List, Optional

import torch
from torch import nn

from capkit.nn.masked_linear import MaskedLinear
from capkit.nn.patch import EncoderLayer, encoder_layers
from capkit.pruning.structured import StructuredMasks

__all__ = ["compact_model", "shrink_to_structure", "structure_of"]

STRUCTURE_KEYS = ("heads", "intermediate_sizes")


def structure_of(model: nn.Module) -> Dict[str, List[int]]:
    """Per-layer head counts and FFN intermediate sizes, read off the modules:
    ``{"heads": [...], "intermediate_sizes": [...]}``."""
    layers = encoder_layers(model)
    return {"heads": [layer.num_heads for layer in layers],
            "intermediate_sizes": [layer.intermediate_size for layer in layers]}


def _new_linear(weight: torch.Tensor, bias: Optional[torch.Tensor], old: nn.Module) -> nn.Linear:
    """An ``nn.Linear`` holding ``weight``/``bias`` (no initialisation pass)."""
    out_features, in_features = weight.shape
    with warnings.catch_warnings():  # zero-sized layers (a removed FFN) warn about a no-op init
        warnings.simplefilter("ignore", UserWarning)
        lin = nn.Linear(in_features, out_features, bias=bias is not None, device="meta")
    lin.weight = nn.Parameter(weight, requires_grad=old.weight.requires_grad)
    if bias is not None:
        lin.bias = nn.Parameter(bias, requires_grad=old.bias.requires_grad)
    return lin


def _slice_linear(old: nn.Module, rows: Optional[torch.Tensor] = None, cols: Optional[torch.Tensor] = None,
                  col_scale: Optional[torch.Tensor] = None) -> nn.Module:
    """A smaller copy of ``old`` (``nn.Linear`` or ``MaskedLinear``) keeping output ``rows`` and
    input ``cols`` (None: all), with the kept input columns multiplied by ``col_scale``.

    A ``MaskedLinear`` keeps its kind, mask (a BlockMask/NMMask becomes its dense mask), scores,
    ``keep``, ``block_size`` and ``backend``; one left with no rows or columns (a removed FFN)
    becomes an ``nn.Linear``, which computes the same thing (its bias) without a mask."""
    if not isinstance(old, (nn.Linear, MaskedLinear)):
        raise TypeError(f"expected an nn.Linear or MaskedLinear, got {type(old).__name__}")
    if isinstance(old, MaskedLinear) and getattr(old, "criterion", None) is not None:
        # The criterion's mask would silently be replaced by the stored one: refuse instead.
        raise ValueError("cannot compact a MaskedLinear driven by a pruning criterion; fix its mask first "
                         "(set_mask(current mask) and remove the criterion)")

    def take(t: torch.Tensor) -> torch.Tensor:
        if rows is not None:
            t = t.index_select(0, rows.to(t.device))
        if cols is not None and t.dim() == 2:
            t = t.index_select(1, cols.to(t.device))
        return t.contiguous()

    weight = take(old.weight.detach())
    if col_scale is not None:
        weight = (weight.float() * col_scale.to(weight.device, torch.float32)).to(weight.dtype)
    bias = take(old.bias.detach()) if old.bias is not None else None
    if isinstance(old, MaskedLinear) and weight.numel() > 0:
        new = MaskedLinear(weight.shape[1], weight.shape[0], bias=bias is not None, block_size=old.block_size,
                           backend=old.backend, device="meta")
        new.weight = nn.Parameter(weight, requires_grad=old.weight.requires_grad)
        new.bias = nn.Parameter(bias, requires_grad=old.bias.requires_grad) if bias is not None else None
        new.mask = take(old.mask.detach())  # old.mask is the dense form of a BlockMask/NMMask too
        if old.scores is not None:
            new.scores = nn.Parameter(take(old.scores.detach()), requires_grad=old.scores.requires_grad)
        new.keep = old.keep
    else:
        new = _new_linear(weight, bias, old)
    new.train(old.training)
    return new


def _head_rows(heads: torch.Tensor, head_size: int) -> torch.Tensor:
    """Feature indices of the given heads (each head is ``head_size`` consecutive features)."""
    return (heads[:, None] * head_size + torch.arange(head_size, device=heads.device)).reshape(-1)


def _shrink_layer(layer: EncoderLayer, heads: torch.Tensor, neurons: torch.Tensor,
                  head_scale: Optional[torch.Tensor] = None, neuron_scale: Optional[torch.Tensor] = None) -> None:
    """Keep the given heads and neurons of ``layer`` (index tensors), folding optional gates into
    the attention output and FFN output columns."""
    rows = _head_rows(heads, layer.head_size)
    for role in ("query", "key", "value"):
        layer.set(role, _slice_linear(layer.get(role), rows=rows))
    scale = head_scale.repeat_interleave(layer.head_size) if head_scale is not None else None
    layer.set("attn_out", _slice_linear(layer.get("attn_out"), cols=rows, col_scale=scale))
    layer.set("ffn_in", _slice_linear(layer.get("ffn_in"), rows=neurons))
    layer.set("ffn_out", _slice_linear(layer.get("ffn_out"), cols=neurons, col_scale=neuron_scale))
    attention = layer.attention
    if hasattr(attention, "num_attention_heads"):
        attention.num_attention_heads = int(heads.numel())
    if hasattr(attention, "all_head_size"):
        attention.all_head_size = int(rows.numel())


def _record_structure(model: nn.Module) -> None:
    config = getattr(model, "config", None)
    if config is not None:
        config.capkit_structure = structure_of(model)


@torch.no_grad()
def compact_model(model: nn.Module, masks: StructuredMasks) -> nn.Module:
    """Physically remove the heads and neurons whose gate in ``masks`` is 0, in place.

    Gates other than 0 and 1 are folded into the kept input columns of the attention output and
    FFN output linears, so the compacted model computes what the gated model computed. Every
    layer must keep at least one head. The masks' hooks are removed (the masks no longer fit the
    model). Forward hooks registered on the replaced linears by others are not carried over.
    Returns ``model``, with ``model.config.capkit_structure`` set when it has a config.
    """
    if not isinstance(masks, StructuredMasks):
        raise TypeError(f"masks must be a StructuredMasks, got {type(masks).__name__}")
    layers = encoder_layers(model)
    masks.check_matches(layers)
    for layer, gate in zip(layers, masks.head_masks):
        if not bool((gate != 0).any()):
            raise ValueError(f"layer {layer.index} would have no attention head left; every layer needs one")
    masks.detach()
    for layer, head_gate, neuron_gate in zip(layers, masks.head_masks, masks.neuron_masks):
        head_gate, neuron_gate = head_gate.detach(), neuron_gate.detach()
        heads = (head_gate != 0).nonzero().squeeze(1)
        neurons = (neuron_gate != 0).nonzero().squeeze(1)
        head_scale = head_gate[heads] if bool((head_gate[heads] != 1).any()) else None
        neuron_scale = neuron_gate[neurons] if bool((neuron_gate[neurons] != 1).any()) else None
        _shrink_layer(layer, heads, neurons, head_scale, neuron_scale)
    _record_structure(model)
    return model


def _check_structure(structure, layers: List[EncoderLayer]) -> None:
    if not isinstance(structure, dict) or set(structure) != set(STRUCTURE_KEYS):
        got = sorted(structure) if isinstance(structure, dict) else type(structure).__name__
        raise ValueError(f"structure must be a dict with keys {list(STRUCTURE_KEYS)}, got {got}")
    limits = {"heads": (1, [layer.num_heads for layer in layers]),
              "intermediate_sizes": (0, [layer.intermediate_size for layer in layers])}
    for key, (low, highs) in limits.items():
        values = structure[key]
        if not isinstance(values, (list, tuple)) or len(values) != len(layers):
            raise ValueError(f"structure[{key!r}] must be a list with one entry per layer ({len(layers)}), "
                             f"got {values!r}")
        for i, (v, high) in enumerate(zip(values, highs)):
            if not isinstance(v, numbers.Integral) or isinstance(v, bool) or not low <= v <= high:
                raise ValueError(f"structure[{key!r}][{i}] must be an integer in [{low}, {high}], got {v!r}")


@torch.no_grad()
def shrink_to_structure(model: nn.Module, structure: Dict[str, List[int]]) -> nn.Module:
    """Resize ``model`` (freshly built from its config) to the per-layer sizes of ``structure``
    (``{"heads": [...], "intermediate_sizes": [...]}``, as :func:`structure_of` or
    ``config.capkit_structure`` give it), in place, so that the ``state_dict`` of a compacted model
    loads into it. The weights left are the first heads/neurons of each layer: only the shapes
    matter. Returns ``model``."""
    layers = encoder_layers(model)
    _check_structure(structure, layers)
    for layer, num_heads, num_neurons in zip(layers, structure["heads"], structure["intermediate_sizes"]):
        device = layer.get("query").weight.device
        _shrink_layer(layer, torch.arange(num_heads, device=device), torch.arange(num_neurons, device=device))
    _record_structure(model)
    return model
