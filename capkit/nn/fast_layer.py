"""A lean inference forward for BERT-family encoder layers whose linears run on the CSR kernel.

Once pruning has made a layer's linear layers cheap, the Python around them becomes a large part of
a CPU forward: transformers' module tree (attention, self-attention, the attention interface, the
output blocks, the feed-forward chunking) and capkit's per-module checks cost roughly 0.4 ms per
layer on the 2-core Xeon, against roughly 0.9 ms for the six sparse linear layers and the attention
of one 128-token MiniLM sequence (90% unstructured; scratch profile and A/B under outside load).
:func:`use_fast_layers` (``capkit.load`` calls it) gives every such layer a forward that, when the
whole layer can run on capkit's CPU kernels, checks that once and then runs the layer in one C++
call (``capkit::encoder_layer_forward``): the three projections in one pass over the input, the
attention kernel, the attention output with its residual sum and LayerNorm, and the feed-forward
block (GELU, residual sum, LayerNorm) in one pass whose hidden activations stay in the threads'
caches. Every other call (training, autograd, tracing, hooks on a sub-module,
cross-attention or a cache, a mask or dtype the kernels do not take, a linear layer that is not on
the CSR kernel) runs the layer's own forward unchanged, and so gives exactly what it gave before.

The layer keeps its class's behaviour: its class becomes a subclass of the original (``isinstance``,
the state dict, gradient checkpointing and every attribute are unchanged), and it pickles and
deep-copies as such.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import nn

from capkit.nn import attention as attn
from capkit.nn.fuse import GeluIntermediate, ResidualOutput
from capkit.nn.masked_linear import MaskedLinear
from capkit.ops.sparse_format import layer_norm_args

__all__ = ["fast_layer_applies", "use_fast_layers"]

_CLASSES: Dict[type, type] = {}
# keyword arguments a BERT layer's own forward passes on without effect on its output
# (hidden states are recorded by hooks around each layer)
_IGNORED = frozenset({"position_ids", "output_hidden_states"})


def _layer_shape(layer: nn.Module) -> bool:
    """Whether ``layer`` has the structure of a transformers BERT-family encoder layer after
    :func:`~capkit.nn.fuse_for_inference`: ``attention.self`` with query/key/value MaskedLinears,
    ``attention.output`` and ``output`` as :class:`ResidualOutput`, ``intermediate`` as
    :class:`GeluIntermediate`, no chunked feed-forward, not a decoder."""
    attention = getattr(layer, "attention", None)
    sa = getattr(attention, "self", None)
    if sa is None or not all(isinstance(getattr(sa, n, None), MaskedLinear) for n in ("query", "key", "value")):
        return False
    if not all(hasattr(sa, n) for n in ("num_attention_heads", "attention_head_size", "scaling", "config")):
        return False
    return (isinstance(getattr(attention, "output", None), ResidualOutput)
            and isinstance(getattr(layer, "intermediate", None), GeluIntermediate)
            and isinstance(getattr(layer, "output", None), ResidualOutput)
            and getattr(layer, "chunk_size_feed_forward", 0) == 0 and not getattr(layer, "is_decoder", False)
            and not getattr(sa, "is_causal", False))


def _new_fast_layer(base: type) -> nn.Module:
    """Unpickling: an empty instance of the fast subclass of ``base`` (its state is set after)."""
    cls = _fast_class(base)
    return cls.__new__(cls)


class _FastLayer:
    """Mixed in before a BERT-family layer class; see the module docstring."""

    _capkit_base: type = nn.Module
    _capkit_annotated_returns: Optional[str] = None  # "tensor" where the base forward is annotated so

    def forward(self, hidden_states, attention_mask=None, *args, **kwargs):
        if torch.compiler.is_compiling():
            returns = self.__dict__.get("_capkit_returns") or type(self)._capkit_annotated_returns
            parts = _traced_parts(self, hidden_states, attention_mask, args, kwargs) if returns else None
            if parts is not None:
                y = _traced_run(parts, hidden_states, attention_mask)
                return (y,) if returns == "tuple" else y
            return super().forward(hidden_states, attention_mask, *args, **kwargs)
        parts = fast_layer_applies(self, hidden_states, attention_mask, args, kwargs)
        if parts is None:
            out = super().forward(hidden_states, attention_mask, *args, **kwargs)
            if self.__dict__.get("_capkit_returns") is None and not torch.compiler.is_compiling():
                # what the layer returns (a tensor, or a 1-tuple in older transformers): the fast path returns the same
                self.__dict__["_capkit_returns"] = "tuple" if isinstance(out, tuple) and len(out) == 1 else (
                    "tensor" if isinstance(out, torch.Tensor) else None)
            return out
        y = _run(parts, hidden_states, attention_mask)
        return (y,) if self.__dict__.get("_capkit_returns") == "tuple" else y

    def __reduce_ex__(self, protocol):
        state = dict(self.__getstate__())
        state.pop("_capkit_parts", None)  # looked up again after loading
        return _new_fast_layer, (self._capkit_base,), state


def _fast_class(base: type) -> type:
    cls = _CLASSES.get(base)
    if cls is None:
        annotated = getattr(getattr(base, "forward", None), "__annotations__", {}).get("return")
        cls = type(base.__name__, (_FastLayer, base), {
            "_capkit_base": base, "__module__": base.__module__, "__qualname__": base.__qualname__,
            "_capkit_annotated_returns": "tensor" if annotated is torch.Tensor else None})
        _CLASSES[base] = cls
    return cls


_NO_COLLECTOR = object()


def _collector():
    """transformers' active output collector (a dict of what the running call records: hidden
    states, attentions), None outside a model call, or ``_NO_COLLECTOR`` where transformers has no
    output-capturing hooks. Those hooks, once installed by a call that asked for hidden states or
    attentions, stay on their modules and act only in a call that asks for their output again."""
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:  # pragma: no cover - another transformers version
        return _NO_COLLECTOR
    return _active_collector.get()


def _inert(hook, collector) -> bool:
    """Whether ``hook`` is transformers' output-capturing hook and records nothing in this call."""
    if collector is _NO_COLLECTOR or not getattr(hook, "__qualname__", "").endswith(
            "install_output_capuring_hook.<locals>.output_capturing_hook"):
        return False
    if collector is None:
        return True
    try:
        key = hook.__closure__[hook.__code__.co_freevars.index("key")].cell_contents
    except (AttributeError, ValueError, TypeError, IndexError):
        return False
    return key not in collector


def _hooks_inert(modules) -> bool:
    """No forward hooks that would act, global or on ``modules`` (those under a layer; the layer's
    own run around this forward, as for any module)."""
    from torch.nn.modules import module as module_mod

    if (module_mod._global_forward_hooks or module_mod._global_forward_pre_hooks
            or getattr(module_mod, "_global_forward_hooks_always_called", None)):
        return False
    collector = _NO_COLLECTOR
    asked = False
    for m in modules:
        if m._forward_pre_hooks:
            return False
        if m._forward_hooks:
            if not asked:
                collector, asked = _collector(), True
            if not all(_inert(h, collector) for h in m._forward_hooks.values()):
                return False
    return True


def _submodules(layer: nn.Module) -> list:
    """Every module under ``layer`` (not the layer itself), by a walk over ``_modules``."""
    out, stack = [], list(layer._modules.values())
    while stack:
        m = stack.pop()
        if m is not None:
            out.append(m)
            stack.extend(m._modules.values())
    return out


def _find_parts(layer: nn.Module):
    """The layer's structure as the fast path uses it, or None where it is not the fused BERT
    layer with six MaskedLinears: ``(self-attention, the six linears, the two LayerNorms, every
    module under the layer, the (container, name, module) links that lead to them, the modules
    whose training mode the layer's own forward reads)``."""
    mods = layer._modules
    att, inter, out = mods.get("attention"), mods.get("intermediate"), mods.get("output")
    if att is None:
        return None
    sa, ao = att._modules.get("self"), att._modules.get("output")
    if not (isinstance(ao, ResidualOutput) and isinstance(inter, GeluIntermediate) and isinstance(out, ResidualOutput)
            and sa is not None):
        return None
    sm = sa._modules
    linears = (sm.get("query"), sm.get("key"), sm.get("value"), ao._modules.get("dense"), inter._modules.get("dense"),
               out._modules.get("dense"))
    if not all(type(m) is MaskedLinear for m in linears):
        return None
    ln1, ln2 = ao._modules.get("LayerNorm"), out._modules.get("LayerNorm")
    if not (isinstance(ln1, nn.LayerNorm) and isinstance(ln2, nn.LayerNorm)):
        return None
    subs = _submodules(layer)
    links = tuple((m._modules, name, child) for m in [layer] + subs for name, child in m._modules.items())
    moded = tuple([sa] + [m for m in subs if isinstance(m, nn.Dropout)])  # what the layer's forward reads .training of
    return sa, linears, ln1, ln2, tuple(subs), links, moded


def _links_hold(links) -> bool:
    for container, name, child in links:
        if container.get(name) is not child:
            return False
    return True


def _fits(ln: nn.LayerNorm, h: int) -> bool:
    if ln.normalized_shape != (h,):
        return False
    for p in ln._parameters.values():
        if p is not None and (p.dtype is not torch.float32 or not p.is_cpu):
            return False
    return True


def _call_fits(hidden_states, attention_mask, args, kwargs) -> bool:
    """The call's side of both fast paths: no extra positional argument, keyword arguments without
    effect, fp32 CPU 3-D hidden states outside autocast, a 4-D CPU mask or none."""
    if any(a is not None for a in args):
        return False
    if kwargs:
        for key, value in kwargs.items():
            if key not in _IGNORED and value is not None and value is not False:
                return False
    if not isinstance(hidden_states, torch.Tensor) or hidden_states.dim() != 3 or hidden_states.dtype != torch.float32 \
            or not hidden_states.is_cpu or torch.is_autocast_enabled("cpu"):
        return False
    return attention_mask is None or (isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 4
                                      and attention_mask.is_cpu)


def _modules_fit(found, h: int, impl) -> bool:
    """The modules' side of both fast paths, for the parts ``_find_parts`` found, hidden size ``h``
    and the config's attention implementation ``impl``: capkit's CPU attention, eval modes where
    the layer's forward reads them, no acting hook, the heads and the LayerNorms over ``h``."""
    sa, _, ln1, ln2, subs, _, moded = found
    if impl != attn.ATTENTION_NAME or not attn._available:
        return False
    if any(m.training for m in moded) or not _hooks_inert(subs):
        return False
    return sa.num_attention_heads * sa.attention_head_size == h and _fits(ln1, h) and _fits(ln2, h)


def fast_layer_applies(layer: nn.Module, hidden_states, attention_mask=None, args=(), kwargs=None):
    """``(self-attention, the six linear layers, the two LayerNorms)`` (the linears: query, key,
    value, attention output, feed-forward in, feed-forward out) when a call of ``layer`` with these
    arguments can take the fast path, else None. The conditions are those of each step's own
    kernel path (see the module docstring); the first call of a layer always runs its own forward,
    which sets up each linear layer's CSR decision. The structure (which modules the layer holds)
    is looked up once and then confirmed on each call, link by link; everything that can change
    between calls without changing the structure (modes, hooks, parameters and their versions,
    the attention implementation) is checked on every call."""
    if torch.is_grad_enabled() or torch.compiler.is_compiling() or layer.training:
        return None
    d = layer.__dict__
    if d.get("_capkit_returns") is None or not _call_fits(hidden_states, attention_mask, args, kwargs):
        return None
    found = d.get("_capkit_parts")
    if found is None or not _links_hold(found[5]):
        found = _find_parts(layer)
        d["_capkit_parts"] = found
        if found is None:
            return None
    sa, linears, ln1, ln2 = found[:4]
    config = sa.__dict__.get("config")
    cd = getattr(config, "__dict__", {})
    impl = cd["_attn_implementation_internal"] if "_attn_implementation_internal" in cd else getattr(
        config, "_attn_implementation", None)  # the config's own attribute: its property costs ~3 us
    h = hidden_states.shape[-1]
    if not _modules_fit(found, h, impl):
        return None
    for m in linears:
        if not m._csr_plan_current():
            return None
    q, k, v, o, i, f = (m._csr_plan[5].shape for m in linears)
    if not (q[1] == k[1] == v[1] == o[1] == i[1] == h and q[0] == k[0] == v[0] == o[0] == f[0] == h
            and i[0] == f[1]):
        return None
    return sa, linears, ln1, ln2


def _traced_parts(layer: nn.Module, hidden_states, attention_mask, args, kwargs):
    """Under torch.compile: the layer's parts when its call can be one ``capkit::encoder_layer_fused``
    node, else None (the layer's own forward is traced). The same conditions as
    :func:`fast_layer_applies` that a graph can be specialised on (modes, structure, dtypes, the
    attention implementation, hooks); each linear's mask goes to the node, which makes the CSR
    choice when the graph runs."""
    if torch.is_grad_enabled() or layer.training or not _call_fits(hidden_states, attention_mask, args, kwargs):
        return None
    found = _find_parts(layer)
    if found is None:
        return None
    sa, linears, ln1, ln2 = found[:4]
    if not _modules_fit(found, hidden_states.shape[-1], getattr(sa.config, "_attn_implementation", None)):
        return None
    if any(m.weight.dtype != torch.float32 or not m.weight.is_cpu for m in linears):
        return None
    return sa, linears, ln1, ln2


def _traced_run(parts, hidden_states: torch.Tensor, attention_mask: Optional[torch.Tensor]) -> torch.Tensor:
    return torch.ops.capkit.encoder_layer_fused(*_layer_node_args(parts, hidden_states, attention_mask))


def _layer_node_args(parts, hidden_states: torch.Tensor, attention_mask: Optional[torch.Tensor]) -> tuple:
    """The arguments of ``capkit::encoder_layer_fused`` for a layer's parts."""
    from capkit.ops._library import layout_tensors
    from capkit.ops.masked_linear import _split_mask

    sa, linears, ln1, ln2 = parts
    weights, masks, biases, layouts, kinds = [], [], [], [], []
    for m in linears:
        dense, layout, kind = _split_mask(m.current_mask(), m.weight.shape, m.weight.device)
        weights.append(m.weight)
        masks.append(dense)
        biases.append(m.bias)
        layouts.append(layout_tensors(layout))
        kinds.append(kind)
    lns = [layer_norm_args(ln) for ln in (ln1, ln2)]
    return (hidden_states, attention_mask, sa.num_attention_heads, float(sa.scaling), weights, masks, biases,
            [t[0] for t in layouts], [t[1] for t in layouts], [t[2] for t in layouts], [t[3] for t in layouts],
            [t[4] for t in layouts], ",".join(kinds), ",".join(m.backend for m in linears),
            [ln[0] for ln in lns], [ln[1] for ln in lns], [ln[2] for ln in lns])


def _run(parts, hidden_states: torch.Tensor, attention_mask: Optional[torch.Tensor]) -> torch.Tensor:
    """The layer in one call of ``capkit::encoder_layer_forward`` (the three projections, the
    attention kernel, and the three CSR calls with their GELU / residual + LayerNorm steps)."""
    sa, linears, ln1, ln2 = parts
    packs = [m._csr_plan[5] for m in linears]
    return torch.ops.capkit.encoder_layer_forward(
        hidden_states.contiguous(), attn.additive_mask(attention_mask), sa.num_attention_heads, float(sa.scaling),
        [p.ptr for p in packs], [p.col_idx for p in packs], [p.values for p in packs],
        [m._parameters.get("bias") for m in linears], [p.shape[0] for p in packs], [p.panel for p in packs],
        [p.row_quads for p in packs], *layer_norm_args(ln1), *layer_norm_args(ln2))


def use_fast_layers(model: nn.Module) -> int:
    """Give every BERT-family encoder layer of ``model`` (after
    :func:`~capkit.nn.fuse_for_inference`, with MaskedLinear projections) the fast inference
    forward, in place; returns how many layers got it (layers that have it already are not
    counted). The model's outputs are unchanged on every path."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"use_fast_layers: model must be an nn.Module, got {type(model).__name__}")
    n = 0
    for module in model.modules():
        if isinstance(module, _FastLayer) or not _layer_shape(module):
            continue
        module.__class__ = _fast_class(type(module))
        n += 1
    return n
