"""Host-side helpers shared by the Triton kernels: autotuning, shared-memory fitting, device."""

from __future__ import annotations

import contextlib
import os
from typing import Callable, List, Optional

import torch
import triton

# The interpreter has no autotuner and a high per-program cost: kernels get fixed tiles there.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# Conservative shared-memory budget used to prune configs: H100 allows 227 KiB per block, A100
# 163 KiB, consumer GPUs ~99 KiB; the estimates leave out Triton's own scratch, hence the margin.
SMEM_BUDGET = 200 * 1024


def smem_budget(device=None) -> int:
    """The pruning budget for ``device`` (default: the current CUDA device): :data:`SMEM_BUDGET`,
    or 7/8 of what the device lets one block opt in to, whichever is smaller."""
    if not torch.cuda.is_available():
        return SMEM_BUDGET
    props = torch.cuda.get_device_properties(torch.cuda.current_device() if device is None else device)
    optin = getattr(props, "shared_memory_per_block_optin", 0)
    return min(SMEM_BUDGET, optin * 7 // 8) if optin else SMEM_BUDGET


def autotuned(configs, key: List[str], prune: Callable):
    """``triton.autotune`` with an ``early_config_prune`` hook; a no-op under the interpreter."""
    if INTERPRET:
        return lambda fn: fn
    return triton.autotune(configs=configs, key=key, prune_configs_by={"early_config_prune": prune})


def fit_configs(configs, clamp: Callable[[dict], dict], smem_bytes: Callable[[dict, int], int],
                fallback: triton.Config, budget: Optional[int] = None) -> List[triton.Config]:
    """The configs with their tiles passed through ``clamp`` and their stages reduced (down to 2)
    until ``smem_bytes(tiles, stages)`` fits ``budget`` (default :func:`smem_budget`); configs that
    do not fit are dropped, duplicates removed, ``[fallback]`` when nothing is left."""
    budget = smem_budget() if budget is None else budget
    seen, out = set(), []
    for c in configs:
        meta = clamp(dict(c.kwargs))
        stages = c.num_stages
        while stages > 2 and smem_bytes(meta, stages) > budget:
            stages -= 1
        if smem_bytes(meta, stages) > budget:
            continue
        key = (tuple(sorted(meta.items())), c.num_warps, stages)
        if key in seen:
            continue
        seen.add(key)
        out.append(triton.Config(meta, num_warps=c.num_warps, num_stages=stages))
    return out or [fallback]


def on_device(t: torch.Tensor):
    """Context for launching on ``t``'s GPU: Triton launches on the current CUDA device (and its
    current stream) whatever device the tensor arguments are on."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()
