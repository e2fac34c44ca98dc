"""Sentence representations for CAP's contrastive modules, read off a model's forward.

``cls`` (default): for a sequence classifier the BERT pooler output ``tanh(W h_CLS + b)``; for the
student's anchor, the classifier's input (the pooled vector after the classifier's dropout), so the
anchor is exactly what the classifier saw. Models without a pooler (question answering) use the
raw last-layer [CLS] state. ``mean``: the masked mean of the last layer's token states.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

__all__ = ["REPRESENTATIONS", "RepresentationTap"]

REPRESENTATIONS = ("cls", "mean")


class RepresentationTap:
    """Hooks on a transformers model that keep the representation of the last forward.

    Use as a context manager or call :meth:`remove`. ``anchor()`` is the student's view (with the
    classifier's dropout, when the model has a plain linear classifier on the pooled vector);
    ``vector()`` the plain representation (banks, teacher).
    """

    def __init__(self, model: nn.Module, kind: str = "cls"):
        if kind not in REPRESENTATIONS:
            raise ValueError(f"representation must be one of {REPRESENTATIONS}, got {kind!r}")
        self.kind = kind
        base = getattr(model, "base_model", model)
        self._handles = [base.register_forward_hook(self._on_base, with_kwargs=True)]
        classifier = getattr(model, "classifier", None)
        if kind == "cls" and isinstance(classifier, nn.Linear):
            self._handles.append(classifier.register_forward_pre_hook(self._on_classifier))
        self._last_hidden: Optional[torch.Tensor] = None
        self._pooled: Optional[torch.Tensor] = None
        self._mask: Optional[torch.Tensor] = None
        self._classifier_input: Optional[torch.Tensor] = None

    def _on_base(self, module, args, kwargs, output):
        self._last_hidden = output[0] if isinstance(output, tuple) else output.last_hidden_state
        self._pooled = getattr(output, "pooler_output", None)
        if isinstance(output, tuple) and len(output) > 1 and self._pooled is None:
            self._pooled = output[1] if output[1] is not None and output[1].dim() == 2 else None
        mask = kwargs.get("attention_mask")
        self._mask = mask if mask is not None else (args[1] if len(args) > 1 else None)
        self._classifier_input = None

    def _on_classifier(self, module, args):
        x = args[0]
        if x.dim() == 2:
            self._classifier_input = x

    def vector(self) -> torch.Tensor:
        """[B, hidden] representation of the last forward (no dropout beyond the model's own)."""
        if self._last_hidden is None:
            raise RuntimeError("no forward has run through this model since the tap was attached")
        if self.kind == "mean":
            h = self._last_hidden
            if self._mask is None:
                return h.mean(1)
            m = self._mask.to(h.dtype).unsqueeze(-1)
            return (h * m).sum(1) / m.sum(1).clamp_min(1.0)
        if self._pooled is not None:
            return self._pooled
        return self._last_hidden[:, 0]

    def anchor(self) -> torch.Tensor:
        """The student's anchor: the classifier's input when there is one, else :meth:`vector`."""
        if self._classifier_input is not None:
            return self._classifier_input
        return self.vector()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> "RepresentationTap":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()
