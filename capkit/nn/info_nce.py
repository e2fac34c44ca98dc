"""``InfoNCE``: module form of :func:`capkit.ops.info_nce` holding CAP's loss settings."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from capkit.ops.info_nce import info_nce

__all__ = ["InfoNCE"]


class InfoNCE(nn.Module):
    """Multi-positive InfoNCE with fixed temperature, term weights and normalisation.

    ``forward(query, keys, query_ids, key_ids, query_labels=None, key_labels=None, self_index=None)``
    returns the scalar loss; keys may be stored in fp16/bf16 (accumulation stays fp32).
    """

    def __init__(self, temperature: float = 0.1, unsup_weight: float = 1.0, sup_weight: float = 0.0,
                 normalization: str = "cap", normalize: bool = True, backend: str = "auto"):
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        if normalization not in ("cap", "mean"):
            raise ValueError(f"normalization must be 'cap' or 'mean', got {normalization!r}")
        self.temperature = float(temperature)
        self.unsup_weight = float(unsup_weight)
        self.sup_weight = float(sup_weight)
        self.normalization = normalization
        self.normalize = normalize
        self.backend = backend

    def forward(self, query: torch.Tensor, keys: torch.Tensor, query_ids: torch.Tensor, key_ids: torch.Tensor,
                query_labels: Optional[torch.Tensor] = None, key_labels: Optional[torch.Tensor] = None,
                self_index: Optional[torch.Tensor] = None) -> torch.Tensor:
        sup = self.sup_weight if query_labels is not None else 0.0
        return info_nce(query, keys, query_ids, key_ids, query_labels=query_labels, key_labels=key_labels,
                        self_index=self_index, temperature=self.temperature, unsup_weight=self.unsup_weight,
                        sup_weight=sup, normalization=self.normalization, normalize=self.normalize,
                        backend=self.backend)

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, unsup_weight={self.unsup_weight}, sup_weight={self.sup_weight}, "
                f"normalization={self.normalization!r}, normalize={self.normalize}, backend={self.backend!r}")
