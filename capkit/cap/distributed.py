"""Data parallelism for the CAP loop (``torchrun``; NCCL on GPUs, gloo on CPUs).

Everything degrades to single-process no-ops when ``torch.distributed`` is not initialised, so
the trainer calls these helpers unconditionally.
"""
from __future__ import annotations

import os
from typing import List, Optional, Tuple

import torch
import torch.distributed as td

__all__ = [
    "all_gather_object",
    "all_reduce_sum",
    "barrier",
    "destroy",
    "gather_batch",
    "init_from_env",
    "is_distributed",
    "is_main",
    "local_rank",
    "rank",
    "world_size",
]

_OWNED = False  # whether init_from_env created the process group (and so destroys it)


def is_distributed() -> bool:
    return td.is_available() and td.is_initialized() and td.get_world_size() > 1


def rank() -> int:
    return td.get_rank() if is_distributed() else 0


def world_size() -> int:
    return td.get_world_size() if is_distributed() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def is_main() -> bool:
    return rank() == 0


def init_from_env() -> None:
    """Join the process group that ``torchrun`` describes (WORLD_SIZE > 1); no-op otherwise."""
    global _OWNED
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or (td.is_available() and td.is_initialized()):
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank())
    td.init_process_group(backend)
    _OWNED = True


def destroy() -> None:
    global _OWNED
    if _OWNED and td.is_initialized():
        td.destroy_process_group()
    _OWNED = False


def barrier() -> None:
    if is_distributed():
        td.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if is_distributed():
        td.all_reduce(t, op=td.ReduceOp.SUM)
    return t


def all_gather_object(obj) -> List:
    if not is_distributed():
        return [obj]
    out: List = [None] * world_size()
    td.all_gather_object(out, obj)
    return out


def _gather_padded(t: torch.Tensor, sizes: List[int]) -> torch.Tensor:
    """Concatenate ``t`` (first dimension may differ per rank) from all ranks, in rank order."""
    longest = max(sizes)
    pad = torch.zeros((longest - t.shape[0],) + tuple(t.shape[1:]), dtype=t.dtype, device=t.device)
    chunks = [torch.empty((longest,) + tuple(t.shape[1:]), dtype=t.dtype, device=t.device) for _ in sizes]
    td.all_gather(chunks, torch.cat([t, pad]))
    return torch.cat([c[:n] for c, n in zip(chunks, sizes)])


def gather_batch(vectors: torch.Tensor, ids: torch.Tensor, labels: Optional[torch.Tensor]
                 ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], torch.Tensor]:
    """The in-batch candidates of a step: detached vectors, ids and labels of the whole global
    batch (all ranks), and where each local anchor's own copy sits (``self_index``)."""
    local = torch.arange(vectors.shape[0], device=vectors.device)
    if not is_distributed():
        return vectors, ids, labels, local
    size = torch.tensor([vectors.shape[0]], device=vectors.device)
    sizes_t = [torch.zeros_like(size) for _ in range(world_size())]
    td.all_gather(sizes_t, size)
    sizes = [int(s) for s in sizes_t]
    offset = sum(sizes[: rank()])
    keys = _gather_padded(vectors.contiguous(), sizes)
    key_ids = _gather_padded(ids.contiguous(), sizes)
    key_labels = None if labels is None else _gather_padded(labels.contiguous(), sizes)
    return keys, key_ids, key_labels, local + offset
