"""CAP's losses: task loss, knowledge distillation, and one contrastive module (PrC, SnC or FiC)
over a memory bank, built on the fused ``capkit.ops.info_nce``."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from capkit.cap.banks import MemoryBank
from capkit.ops import info_nce

__all__ = ["ContrastiveSettings", "contrastive_loss", "kd_loss", "task_loss"]


def task_loss(logits: torch.Tensor, labels: torch.Tensor, regression: bool = False) -> torch.Tensor:
    """Cross-entropy (classification) or mean squared error (regression, one output)."""
    if regression:
        return F.mse_loss(logits.view(-1).float(), labels.view(-1).float())
    return F.cross_entropy(logits.float(), labels.view(-1))


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 2.0,
            regression: bool = False) -> torch.Tensor:
    """``KL(softmax(t/T) || softmax(s/T)) * T^2``, batch mean (MSE to the teacher for regression)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if regression:
        return F.mse_loss(student_logits.float(), teacher_logits.float())
    t = temperature
    return F.kl_div(F.log_softmax(student_logits.float() / t, -1), F.softmax(teacher_logits.float() / t, -1),
                    reduction="batchmean") * (t * t)


@dataclass
class ContrastiveSettings:
    """Shared by the three modules: InfoNCE temperature, extra bank negatives per step (E),
    unsupervised and supervised weights, and the normalisation (``cap`` or ``mean``)."""

    temperature: float = 0.1
    extra_negatives: int = 4096
    unsup_weight: float = 0.1
    sup_weight: float = 10.0
    normalization: str = "cap"


def contrastive_loss(anchor: torch.Tensor, anchor_ids: torch.Tensor, anchor_labels: Optional[torch.Tensor],
                     batch_keys: torch.Tensor, batch_key_ids: torch.Tensor,
                     batch_key_labels: Optional[torch.Tensor], bank: MemoryBank,
                     settings: ContrastiveSettings, generator: Optional[torch.Generator] = None,
                     self_index: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One module's loss for a batch of anchors.

    Candidates: the detached student vectors of the batch (``batch_keys``: the whole global
    batch under data parallelism, each anchor's own copy at ``self_index`` left out), the bank's R
    vectors of every batch example, and min(E // R, N) sampled examples with all their R vectors.
    Unsupervised positives share the example id, supervised ones the label (when ``sup_weight``
    is non-zero and labels exist).
    """
    device = anchor.device
    key_dtype = bank.snapshots[0].dtype
    own_keys, own_ids = bank.keys_of(batch_key_ids)
    sampled = bank.sample(settings.extra_negatives, generator)
    extra_keys, extra_ids = bank.keys_of(sampled)
    keys = torch.cat([batch_keys.detach().to(key_dtype), own_keys, extra_keys], 0)
    key_ids = torch.cat([batch_key_ids, own_ids, extra_ids], 0)
    use_labels = settings.sup_weight != 0.0 and anchor_labels is not None and bank.labels is not None
    key_labels = None
    if use_labels:
        key_labels = torch.cat([batch_key_labels, bank.labels[own_ids], bank.labels[extra_ids]], 0)
    if self_index is None:
        self_index = torch.arange(anchor.shape[0], device=device)
    return info_nce(
        anchor, keys, anchor_ids, key_ids,
        query_labels=anchor_labels if use_labels else None, key_labels=key_labels,
        self_index=self_index, temperature=settings.temperature, unsup_weight=settings.unsup_weight,
        sup_weight=settings.sup_weight if use_labels else 0.0, normalization=settings.normalization,
    )
