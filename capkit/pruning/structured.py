"""Structured pruning (CAP-f): attention heads and FFN intermediate neurons.

A :class:`StructuredMasks` holds one gate per head and one per FFN neuron of every encoder layer.
Attached to a model, it scales the input of each layer's attention output linear (one gate per
head, over that head's ``head_size`` features: the same as scaling the head's context) and the
input of its FFN output linear (one gate per neuron). A gate of 0 removes the unit from the
computation; :func:`capkit.pruning.compact.compact_model` then removes it physically.

One CAP-f iteration: :func:`compute_importance` (first-order importance ``|dL/dgate|`` summed over
the training set with the full training loss, each layer's scores divided by their L2 norm), then
:func:`prune_step` (rank all live units globally, prune the least important until the requested
fraction of the original units is gone), at the fractions :func:`iterative_fractions` lists.
"""
from __future__ import annotations

import functools
import math
import numbers
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn
from tqdm import tqdm

from capkit.nn.patch import EncoderLayer, encoder_layers

__all__ = ["StructuredMasks", "compute_importance", "iterative_fractions", "prune_step"]


def _check_gate_list(name: str, masks: Sequence[torch.Tensor], min_size: int) -> List[torch.Tensor]:
    if isinstance(masks, torch.Tensor) or not isinstance(masks, Sequence):
        raise TypeError(f"{name} must be a list of 1-D tensors (one per layer), got {type(masks).__name__}")
    out = []
    for i, m in enumerate(masks):
        if not isinstance(m, torch.Tensor) or m.dim() != 1:
            got = f"shape {tuple(m.shape)}" if isinstance(m, torch.Tensor) else type(m).__name__
            raise ValueError(f"{name}[{i}] must be a 1-D tensor, got {got}")
        if m.numel() < min_size:
            raise ValueError(f"{name}[{i}] must have at least {min_size} entries, got {m.numel()}")
        if not m.dtype.is_floating_point:
            m = m.float()
        if not bool(torch.isfinite(m).all()):
            raise ValueError(f"{name}[{i}] must be finite")
        out.append(m.detach().clone())
    return out


class StructuredMasks:
    """Per-layer gates of attention heads (``head_masks[l]``: one per head of layer ``l``) and FFN
    neurons (``neuron_masks[l]``: one per intermediate neuron). A unit is alive while its gate is
    non-zero; gates other than 0 and 1 scale the unit's output.

    ``original_num_heads`` / ``original_num_neurons`` are the totals over all layers before any
    compaction (default: the sizes of the masks); :meth:`sparsity` and :func:`prune_step` count
    against them, so pruning can go on after a model was compacted.

    Use :meth:`ones` to create the masks of a model, :meth:`attach` (or ``with masks.attach(model):``)
    to apply them, :meth:`detach` to remove them.
    """

    def __init__(
        self,
        head_masks: Sequence[torch.Tensor],
        neuron_masks: Sequence[torch.Tensor],
        *,
        original_num_heads: Optional[int] = None,
        original_num_neurons: Optional[int] = None,
    ):
        heads = _check_gate_list("head_masks", head_masks, min_size=1)
        neurons = _check_gate_list("neuron_masks", neuron_masks, min_size=0)
        if not heads:
            raise ValueError("head_masks must have one entry per layer, got an empty list")
        if len(heads) != len(neurons):
            raise ValueError(
                f"head_masks and neuron_masks must cover the same layers, got {len(heads)} and {len(neurons)}"
            )
        self.head_masks: List[torch.Tensor] = heads
        self.neuron_masks: List[torch.Tensor] = neurons
        current_heads = sum(m.numel() for m in heads)
        current_neurons = sum(m.numel() for m in neurons)
        self.original_num_heads = self._check_original("original_num_heads", original_num_heads, current_heads)
        self.original_num_neurons = self._check_original("original_num_neurons", original_num_neurons,
                                                         current_neurons)
        self._hooks: List[torch.utils.hooks.RemovableHandle] = []
        self._model: Optional[nn.Module] = None

    @staticmethod
    def _check_original(name: str, value: Optional[int], current: int) -> int:
        if value is None:
            return current
        if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < current:
            raise ValueError(f"{name} must be an integer >= the units the masks hold ({current}), got {value!r}")
        return int(value)

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def ones(cls, model: nn.Module, *, device=None) -> "StructuredMasks":
        """All-ones masks (nothing pruned) sized to the layers of ``model`` as they are now.

        On a compacted model (``model.config.capkit_structure`` set) the original totals are read
        from the config (``num_attention_heads`` and ``intermediate_size`` per layer)."""
        layers = encoder_layers(model)
        device = layers[0].get("query").weight.device if device is None else torch.device(device)
        heads = [torch.ones(layer.num_heads, device=device) for layer in layers]
        neurons = [torch.ones(layer.intermediate_size, device=device) for layer in layers]
        config = getattr(model, "config", None)
        original_heads = original_neurons = None
        if config is not None and getattr(config, "capkit_structure", None):
            original_heads = config.num_attention_heads * len(layers)
            original_neurons = config.intermediate_size * len(layers)
        return cls(heads, neurons, original_num_heads=original_heads, original_num_neurons=original_neurons)

    @property
    def num_layers(self) -> int:
        return len(self.head_masks)

    @property
    def device(self) -> torch.device:
        return self.head_masks[0].device

    def _tensors(self) -> List[torch.Tensor]:
        return self.head_masks + self.neuron_masks

    def to(self, device) -> "StructuredMasks":
        """Move the gates to ``device`` (in place; attached hooks follow). Returns ``self``."""
        device = torch.device(device)
        for masks in (self.head_masks, self.neuron_masks):
            for i, m in enumerate(masks):
                if m.device != device:
                    masks[i] = m.detach().to(device).requires_grad_(m.requires_grad)
        return self

    def requires_grad_(self, requires_grad: bool = True) -> "StructuredMasks":
        """Make the gates leaves that receive gradients (for importance). Returns ``self``."""
        for m in self._tensors():
            m.requires_grad_(requires_grad)
        return self

    # -- applying the gates ---------------------------------------------------------------------
    def check_matches(self, layers: Sequence[EncoderLayer]) -> None:
        """Raise ValueError unless there is one mask per layer and each has the layer's size."""
        if len(layers) != self.num_layers:
            raise ValueError(f"masks cover {self.num_layers} layers but the model has {len(layers)}")
        for layer, h, n in zip(layers, self.head_masks, self.neuron_masks):
            if h.numel() != layer.num_heads or n.numel() != layer.intermediate_size:
                raise ValueError(
                    f"layer {layer.index} has {layer.num_heads} heads and {layer.intermediate_size} neurons, "
                    f"the masks have {h.numel()} and {n.numel()}"
                )

    @property
    def attached_to(self) -> Optional[nn.Module]:
        """The model whose layers the gates are applied to, or None."""
        return self._model

    def attach(self, model: nn.Module) -> "StructuredMasks":
        """Apply the gates to ``model`` through forward pre-hooks on each layer's attention output
        and FFN output linears (``nn.Linear`` or ``MaskedLinear``). The hooks read the current mask
        tensors on every forward. Returns ``self``, so ``with masks.attach(model): ...`` detaches on
        exit."""
        if self._model is not None:
            raise RuntimeError("these masks are already attached to a model; call detach() first")
        layers = encoder_layers(model)
        self.check_matches(layers)
        for i, layer in enumerate(layers):
            self._hooks.append(layer.get("attn_out").register_forward_pre_hook(
                functools.partial(self._gate_input, self.head_masks, i, layer.head_size)))
            self._hooks.append(layer.get("ffn_out").register_forward_pre_hook(
                functools.partial(self._gate_input, self.neuron_masks, i, 1)))
        self._model = model
        return self

    @staticmethod
    def _gate_input(masks: List[torch.Tensor], index: int, repeat: int, module: nn.Module, args: Tuple):
        x = args[0]
        gate = masks[index]
        if repeat > 1:
            gate = gate.repeat_interleave(repeat)  # one gate per head, over its head_size features
        return (x * gate.to(x.dtype),) + tuple(args[1:])

    def detach(self) -> None:
        """Remove the hooks (no-op when not attached)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        self._model = None

    def __enter__(self) -> "StructuredMasks":
        return self

    def __exit__(self, *exc) -> None:
        self.detach()

    # -- state ------------------------------------------------------------------------------------
    def state_dict(self) -> Dict:
        return {
            "head_masks": [m.detach().clone() for m in self.head_masks],
            "neuron_masks": [m.detach().clone() for m in self.neuron_masks],
            "original_num_heads": self.original_num_heads,
            "original_num_neurons": self.original_num_neurons,
        }

    def load_state_dict(self, state: Dict) -> None:
        """Copy gates saved by :meth:`state_dict` into these masks (same layers and sizes)."""
        missing = {"head_masks", "neuron_masks", "original_num_heads", "original_num_neurons"} - set(state)
        if missing:
            raise KeyError(f"state is missing {sorted(missing)}")
        loaded = StructuredMasks(state["head_masks"], state["neuron_masks"],
                                 original_num_heads=state["original_num_heads"],
                                 original_num_neurons=state["original_num_neurons"])
        if [m.shape for m in loaded._tensors()] != [m.shape for m in self._tensors()]:
            raise ValueError(
                f"state holds masks of sizes heads={[m.numel() for m in loaded.head_masks]}, "
                f"neurons={[m.numel() for m in loaded.neuron_masks]}; these masks have "
                f"heads={[m.numel() for m in self.head_masks]}, neurons={[m.numel() for m in self.neuron_masks]}"
            )
        with torch.no_grad():
            for dst, src in zip(self._tensors(), loaded._tensors()):
                dst.copy_(src)
        self.original_num_heads = loaded.original_num_heads
        self.original_num_neurons = loaded.original_num_neurons

    # -- counts -------------------------------------------------------------------------------------
    def num_heads_left(self) -> List[int]:
        """Live (non-zero) heads of every layer."""
        return [int((m != 0).sum()) for m in self.head_masks]

    def num_neurons_left(self) -> List[int]:
        """Live (non-zero) FFN neurons of every layer."""
        return [int((m != 0).sum()) for m in self.neuron_masks]

    def sparsity(self) -> Dict[str, float]:
        """Fractions of the original heads and neurons that are removed: ``{"heads", "neurons"}``."""
        return {
            "heads": 1.0 - sum(self.num_heads_left()) / self.original_num_heads,
            "neurons": 1.0 - sum(self.num_neurons_left()) / max(1, self.original_num_neurons),
        }

    def __repr__(self) -> str:
        s = self.sparsity()
        return (f"StructuredMasks(layers={self.num_layers}, heads_left={self.num_heads_left()}, "
                f"neurons_left={self.num_neurons_left()}, sparsity=heads {s['heads']:.3f} / "
                f"neurons {s['neurons']:.3f}, attached={self._model is not None})")


# ------------------------------------------------------------------------------------------------
# Importance
# ------------------------------------------------------------------------------------------------
def _to_device(batch, device: torch.device):
    """``batch`` with every tensor inside (mappings, lists, tuples, named tuples) on ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        moved = {k: _to_device(v, device) for k, v in batch.items()}
        try:
            return type(batch)(moved)  # dict subclasses, transformers' BatchEncoding
        except TypeError:
            return moved
    if isinstance(batch, (list, tuple)):
        moved = [_to_device(v, device) for v in batch]
        return type(batch)(*moved) if hasattr(batch, "_fields") else type(batch)(moved)
    return batch


def _normalise_per_layer(scores: List[torch.Tensor]) -> List[torch.Tensor]:
    # Each layer's vector divided by its L2 norm; an all-zero (or empty) vector stays as it is.
    out = []
    for s in scores:
        norm = torch.linalg.vector_norm(s)
        out.append(s / torch.where(norm > 0, norm, torch.ones_like(norm)))
    return out


def compute_importance(
    model: nn.Module,
    data_loader: Iterable,
    loss_fn: Callable[[nn.Module, object], torch.Tensor],
    masks: StructuredMasks,
    *,
    device=None,
    progress: bool = True,
) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
    """First-order importance of every head and FFN neuron: ``sum over batches of |dL/dgate|``.

    For each batch of ``data_loader`` (its tensors moved to ``device``, default the device of the
    model's first parameter; the masks move there too), ``loss = loss_fn(model, batch)`` must be a
    scalar tensor computed by ``model`` (any loss: the CAP loop passes its full training loss).
    Scores are summed per batch, so they scale with the number of batches, not their size (the
    per-layer normalisation removes the scale). The model runs in eval mode with ``masks`` attached
    (they are attached for the call if they are not already); the previous train/eval mode of
    every module and the masks' ``requires_grad`` are restored afterwards. Gradients are taken
    with ``torch.autograd.grad`` with respect to the gates only, so the ``.grad`` of the model's
    parameters is never touched.

    Returns ``(head_scores, neuron_scores)``: one float32 tensor per layer (on the masks' device),
    each divided by its L2 norm (heads and neurons separately; an all-zero layer stays zero).
    """
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be a callable (model, batch) -> scalar loss, got {type(loss_fn).__name__}")
    if not isinstance(masks, StructuredMasks):
        raise TypeError(f"masks must be a StructuredMasks, got {type(masks).__name__}")
    if masks.attached_to is not None and masks.attached_to is not model:
        raise ValueError("masks are attached to another model; detach them first")
    if device is None:
        device = next(model.parameters()).device
    device = torch.device(device)
    masks.to(device)
    attach_here = masks.attached_to is None
    modes = [(m, m.training) for m in model.modules()]
    grad_flags = [t.requires_grad for t in masks._tensors()]
    head_sum = [torch.zeros_like(m, dtype=torch.float32) for m in masks.head_masks]
    neuron_sum = [torch.zeros_like(m, dtype=torch.float32) for m in masks.neuron_masks]
    batches = 0
    try:
        model.eval()
        if attach_here:
            masks.attach(model)
        masks.requires_grad_(True)
        gates = masks._tensors()
        total = len(data_loader) if hasattr(data_loader, "__len__") else None
        for batch in tqdm(data_loader, total=total, desc="importance", unit="batch", disable=not progress):
            with torch.enable_grad():
                loss = loss_fn(model, _to_device(batch, device))
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1 or not loss.requires_grad:
                raise ValueError(
                    "loss_fn must return a scalar tensor computed by the model with gradient enabled, got "
                    + (f"a tensor of shape {tuple(loss.shape)} (requires_grad={loss.requires_grad})"
                       if isinstance(loss, torch.Tensor) else type(loss).__name__)
                )
            grads = torch.autograd.grad(loss.reshape(()), gates, allow_unused=True)
            for acc, g in zip(head_sum + neuron_sum, grads):
                if g is not None:
                    acc.add_(g.detach().abs().float())
            batches += 1
    finally:
        if attach_here:
            masks.detach()
        for t, flag in zip(masks._tensors(), grad_flags):
            t.requires_grad_(flag)
        for module, mode in modes:
            module.training = mode
    if batches == 0:
        raise ValueError("data_loader yielded no batch")
    return _normalise_per_layer(head_sum), _normalise_per_layer(neuron_sum)


# ------------------------------------------------------------------------------------------------
# Pruning
# ------------------------------------------------------------------------------------------------
def _check_fraction(fraction) -> float:
    if not isinstance(fraction, numbers.Real) or isinstance(fraction, bool) or not 0.0 <= fraction < 1.0:
        raise ValueError(f"fraction must be a number in [0, 1), got {fraction!r}")
    return float(fraction)


def _check_scores(name: str, scores: Sequence[torch.Tensor], masks: List[torch.Tensor]) -> List[torch.Tensor]:
    if isinstance(scores, torch.Tensor) or not isinstance(scores, Sequence):
        raise TypeError(f"{name} must be a list with one tensor per layer, got {type(scores).__name__}")
    if len(scores) != len(masks):
        raise ValueError(f"{name} must have one tensor per layer ({len(masks)}), got {len(scores)}")
    out = []
    for i, (s, m) in enumerate(zip(scores, masks)):
        if not isinstance(s, torch.Tensor) or tuple(s.shape) != tuple(m.shape):
            got = tuple(s.shape) if isinstance(s, torch.Tensor) else type(s).__name__
            raise ValueError(f"{name}[{i}] must be a tensor of shape {tuple(m.shape)} (the layer's mask), got {got}")
        s = s.detach().float().cpu()
        if not bool(torch.isfinite(s).all()):
            raise ValueError(f"{name}[{i}] must be finite")
        out.append(s)
    return out


def _prune_lowest(masks: List[torch.Tensor], scores: List[torch.Tensor], original_total: int, fraction: float,
                  keep_one_per_layer: bool) -> List[torch.Tensor]:
    """New masks with the lowest-scoring live units zeroed until ``fraction`` of ``original_total``
    units are gone (fewer when one unit per layer must stay)."""
    target_removed = math.floor(fraction * original_total + 0.5)
    sizes = [m.numel() for m in masks]
    flat = torch.cat([m.detach().float().cpu() for m in masks])
    live = (flat != 0).nonzero().squeeze(1)
    to_remove = target_removed - (original_total - live.numel())
    if to_remove > 0:
        # Stable ascending order: ties go to the lower layer and index first.
        order = live[torch.sort(torch.cat(scores)[live], stable=True).indices]
        if keep_one_per_layer:
            layer_of = torch.repeat_interleave(torch.arange(len(masks)), torch.tensor(sizes)).tolist()
            left = [int((m != 0).sum()) for m in masks]
            chosen = []
            for pos in order.tolist():
                if len(chosen) == to_remove:
                    break
                if left[layer_of[pos]] > 1:  # the last live unit of a layer (its most important) stays
                    left[layer_of[pos]] -= 1
                    chosen.append(pos)
            order = torch.tensor(chosen, dtype=torch.long)
        flat[order[:to_remove]] = 0.0
    return [part.to(device=m.device, dtype=m.dtype) for part, m in zip(flat.split(sizes), masks)]


def prune_step(
    masks: StructuredMasks,
    head_scores: Sequence[torch.Tensor],
    neuron_scores: Sequence[torch.Tensor],
    fraction: float,
) -> StructuredMasks:
    """New masks in which ``fraction`` of all original heads and of all original neurons are
    removed (the same percentage for both; counts round to the nearest unit).

    Units are ranked globally across layers by their (per-layer normalised) scores; the lowest
    among those still alive are pruned. Pruned units stay pruned (never revived) and live gates
    keep their values. At least one head per layer stays, the most important of those still alive
    there, so at high fractions slightly fewer heads than requested may go; a layer may lose all
    its neurons. ``masks`` is left unchanged and the result is not attached to any model.
    """
    if not isinstance(masks, StructuredMasks):
        raise TypeError(f"masks must be a StructuredMasks, got {type(masks).__name__}")
    fraction = _check_fraction(fraction)
    hs = _check_scores("head_scores", head_scores, masks.head_masks)
    ns = _check_scores("neuron_scores", neuron_scores, masks.neuron_masks)
    heads = _prune_lowest(masks.head_masks, hs, masks.original_num_heads, fraction, keep_one_per_layer=True)
    neurons = _prune_lowest(masks.neuron_masks, ns, masks.original_num_neurons, fraction, keep_one_per_layer=False)
    return StructuredMasks(heads, neurons, original_num_heads=masks.original_num_heads,
                           original_num_neurons=masks.original_num_neurons)


def iterative_fractions(start: float = 0.1, stop: float = 0.9, step: float = 0.1) -> List[float]:
    """Fractions of units removed at each structured-pruning iteration: ``start, start + step, ...``
    up to and including ``stop`` (``[0.1, 0.2, ..., 0.9]`` by default), each in [0, 1)."""
    for name, value in (("start", start), ("stop", stop), ("step", step)):
        if not isinstance(value, numbers.Real) or isinstance(value, bool) or not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
    if not 0.0 <= start < 1.0:
        raise ValueError(f"start must be in [0, 1), got {start}")
    if not start <= stop < 1.0:
        raise ValueError(f"stop must be in [start, 1) = [{start}, 1), got {stop}")
    if step <= 0.0:
        raise ValueError(f"step must be > 0, got {step}")
    count = math.floor((stop - start) / step + 1e-9) + 1
    return [round(start + i * step, 10) for i in range(count)]
