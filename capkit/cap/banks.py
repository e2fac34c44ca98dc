"""Memory banks of CAP: one vector per training example (row = example id) per view.

- PrC: the pre-trained model's representations, encoded before the first update.
- FiC: the fine-tuned teacher's, encoded once before training.
- SnC: the student's own at earlier sparsity levels; a snapshot is appended at each later epoch
  (unstructured) or pruning iteration (structured), so it holds R vectors per example.

Banks live on the training device (16-bit keys when the model trains in 16 bits; the loss
accumulates in fp32) and are encoded in eval mode.
"""
from __future__ import annotations

from typing import Iterable, List, Optional, Tuple

import torch
from torch import nn

from capkit.cap.representations import RepresentationTap

__all__ = ["MemoryBank", "encode_representations", "model_inputs", "to_device"]


def to_device(batch: dict, device) -> dict:
    """The batch with its tensors on ``device``."""
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


_MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def model_inputs(batch: dict) -> dict:
    """The keys of a batch that a transformers encoder takes."""
    return {k: batch[k] for k in _MODEL_INPUTS if k in batch}


@torch.no_grad()
def encode_representations(model: nn.Module, loader: Iterable[dict], num_examples: int, *,
                           kind: str = "cls", device=None, dtype: torch.dtype = torch.float32,
                           progress: bool = True, desc: str = "encoding", partial: bool = False,
                           logits: bool = False):
    """[num_examples, hidden] representations of every example of ``loader`` in eval mode, row
    ``example_id``. Every example id in ``[0, num_examples)`` must occur, unless ``partial``
    (one rank's share under data parallelism: the rows it did not see stay zero).

    With ``logits``, returns ``(representations, logits)``: the model's output logits of the same
    forward too, [num_examples, num_labels] in fp32 (a sequence classifier's or regressor's)."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    out: Optional[torch.Tensor] = None
    out_logits: Optional[torch.Tensor] = None
    seen = torch.zeros(num_examples, dtype=torch.bool, device=device)
    try:
        from tqdm.auto import tqdm

        it = tqdm(loader, desc=desc, unit="batch", leave=False, disable=not progress)
    except ImportError:  # pragma: no cover
        it = loader
    with RepresentationTap(model, kind) as tap:
        for batch in it:
            batch = to_device(batch, device)
            result = model(**model_inputs(batch))
            vec = tap.vector().float()
            if out is None:
                out = torch.zeros(num_examples, vec.shape[-1], device=device, dtype=dtype)
            ids = batch["example_id"]
            if int(ids.min()) < 0 or int(ids.max()) >= num_examples:
                raise ValueError(f"example_id outside [0, {num_examples}) in the data loader")
            out[ids] = vec.to(dtype)
            if logits:
                lg = result.logits.float()
                if out_logits is None:
                    out_logits = torch.zeros(num_examples, lg.shape[-1], device=device, dtype=torch.float32)
                out_logits[ids] = lg
            seen[ids] = True
    model.train(was_training)
    if out is None or (not partial and not bool(seen.all())):
        missing = int((~seen).sum())
        raise ValueError(f"the data loader did not cover every example: {missing} of {num_examples} missing")
    return (out, out_logits) if logits else out


class MemoryBank:
    """R snapshots of [N, d] vectors and the examples' labels (None for tasks without labels)."""

    def __init__(self, name: str, labels: Optional[torch.Tensor] = None):
        self.name = name
        self.snapshots: List[torch.Tensor] = []
        self.labels = labels

    @property
    def num_snapshots(self) -> int:
        return len(self.snapshots)

    @property
    def num_examples(self) -> int:
        return self.snapshots[0].shape[0] if self.snapshots else 0

    def add(self, vectors: torch.Tensor) -> None:
        if vectors.dim() != 2:
            raise ValueError(f"bank vectors must be [examples, dim], got {tuple(vectors.shape)}")
        if self.snapshots and tuple(vectors.shape) != tuple(self.snapshots[0].shape):
            raise ValueError(f"snapshot shape {tuple(vectors.shape)} differs from the bank's {tuple(self.snapshots[0].shape)}")
        if self.labels is not None and self.labels.shape[0] != vectors.shape[0]:
            raise ValueError(f"bank has {self.labels.shape[0]} labels but {vectors.shape[0]} vectors")
        self.snapshots.append(vectors.detach())
        self._stacked = None

    def _stack(self) -> torch.Tensor:
        if getattr(self, "_stacked", None) is None:
            self._stacked = torch.stack(self.snapshots, 0)  # [R, N, d]
        return self._stacked

    def keys_of(self, example_ids: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """All R vectors of the given examples: keys [len * R, d], their example ids."""
        stacked = self._stack()
        keys = stacked[:, example_ids].reshape(-1, stacked.shape[-1])
        ids = example_ids.repeat(stacked.shape[0])
        return keys, ids

    def sample(self, extra: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Ids of min(extra // R, N) examples drawn uniformly without replacement."""
        if not self.snapshots:
            raise RuntimeError(f"bank {self.name!r} is empty")
        count = min(extra // self.num_snapshots, self.num_examples)
        device = self.snapshots[0].device
        perm = torch.randperm(self.num_examples, generator=generator, device="cpu")[:count]
        return perm.to(device)

    def state_dict(self) -> dict:
        return {"name": self.name, "snapshots": [s for s in self.snapshots], "labels": self.labels}

    @classmethod
    def from_state_dict(cls, state: dict, device=None) -> "MemoryBank":
        labels = state["labels"]
        bank = cls(state["name"], None if labels is None else labels.to(device))
        for s in state["snapshots"]:
            bank.add(s.to(device))
        return bank
