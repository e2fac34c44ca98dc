"""Change detection for cached values derived from a parameter (mask thresholds, the check that a
weight is already masked).

The version counter alone misses updates: the fused optimisers (``torch.optim.AdamW(...,
fused=True)``) write parameters in place without bumping ``_version``. A parameter that learns is
updated after it receives a gradient, so a post-accumulate-grad hook marks it as possibly changed;
together with the storage pointer and version (replacement, other in-place writes) that covers
every update an optimiser makes.
"""
from __future__ import annotations

from typing import Hashable, Optional

import torch

from capkit.ops.sparse_format import tensor_version

__all__ = ["ChangeWatch"]


class ChangeWatch:
    """``changed(t, extra)`` is True until ``seen(t, extra)`` records the current state, and
    again after ``t`` is replaced, written in place (version bump) or receives a gradient."""

    def __init__(self) -> None:
        self._tensor: Optional[torch.Tensor] = None
        self._handle = None
        self._state = None
        self._grad_since = True

    def _on_grad(self, _tensor) -> None:
        self._grad_since = True

    def _watch(self, t: torch.Tensor) -> None:
        hooks = getattr(t, "_post_accumulate_grad_hooks", None)
        hooked = self._handle is not None and hooks is not None and self._handle.id in hooks
        if t is self._tensor and (hooked or not t.requires_grad):
            return
        # a new tensor, or one copied without its hooks (deepcopy drops them)
        if self._handle is not None and self._tensor is not t:
            self._handle.remove()
        self._tensor, self._handle, self._grad_since = t, None, True
        if t.requires_grad and t.is_leaf:
            self._handle = t.register_post_accumulate_grad_hook(self._on_grad)

    def changed(self, t: torch.Tensor, extra: Hashable = None) -> bool:
        self._watch(t)
        return self._grad_since or self._state != (t.data_ptr(), tensor_version(t), extra)

    def seen(self, t: torch.Tensor, extra: Hashable = None) -> None:
        self._watch(t)
        self._state = (t.data_ptr(), tensor_version(t), extra)
        self._grad_since = False

    def unchanged_since_seen(self, extra: Hashable = None) -> bool:
        """The cheap half of ``not changed()``: the tensor last seen had no gradient and no
        version bump since, and ``extra`` is the same (replacement and lost hooks are not checked)."""
        t, state = self._tensor, self._state
        return (t is not None and not self._grad_since and state is not None and state[1] == tensor_version(t)
                and state[2] == extra)

    def __getstate__(self):  # hooks do not travel: a copy starts unknown and watches again
        return {"_tensor": None, "_handle": None, "_state": None, "_grad_since": True}
