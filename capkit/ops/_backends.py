"""Backends of the masked linear op and the choice among them.

Every backend implements the same three functions on 2-D contiguous inputs:

* ``forward(x, weight, mask, bias, layout)``           -> ``x @ (weight * mask)^T + bias``
* ``grad_input(grad_out, weight, mask, layout)``       -> ``grad_out @ (weight * mask)``
* ``grad_weight(grad_out, x, weight, mask, layout, need_weight_grad, need_mask_grad)``
  -> ``(G * mask, G * weight)`` with ``G = grad_out^T @ x`` (None where not asked for)

``mask`` reaches a backend as None, a uint8 0/1 tensor, or a tensor of the weight's dtype;
``layout`` is None or a :class:`~capkit.ops.masks.BlockLayout` (dead blocks count as zero).
The ``torch`` backend is the reference that defines the meaning; the others are tested against it.
"""
from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Dict, List, Optional

import torch

from capkit._ext import extension_error, load_extension
from capkit.ops.masks import BlockLayout

BACKENDS = ("torch", "triton", "cuda", "cpu")


def _layout_mask(layout: BlockLayout) -> torch.Tensor:
    cached = getattr(layout, "_dense_mask_cache", None)
    if cached is None:
        cached = layout.dense_mask()
        layout._dense_mask_cache = cached  # the layout's tensors never change after construction
    return cached


def effective_mask(weight: torch.Tensor, mask: Optional[torch.Tensor], layout: Optional[BlockLayout]):
    """The mask the op applies, as a bool tensor (0/1 masks) or the weight's dtype (float masks)."""
    m = None
    if mask is not None:
        m = mask.to(weight.dtype) if mask.dtype.is_floating_point else mask != 0
    if layout is not None:
        lm = _layout_mask(layout)
        if m is None:
            m = lm
        elif m.dtype == torch.bool:
            m = m & lm
        else:
            m = m * lm.to(m.dtype)
    return m


def apply_mask(t: torch.Tensor, m: Optional[torch.Tensor]) -> torch.Tensor:
    # A pruned entry of a 0/1 mask contributes exactly nothing, even where t is not finite.
    if m is None:
        return t
    if m.dtype == torch.bool:
        return torch.where(m, t, torch.zeros((), dtype=t.dtype, device=t.device))
    return t * m.to(t.dtype)


class TorchBackend:
    """Pure-PyTorch reference (materialises ``weight * mask``)."""

    name = "torch"

    def unavailable_reason(self, device: torch.device) -> Optional[str]:
        return None

    def unsupported_reason(self, x, weight, mask) -> Optional[str]:
        return None

    def forward(self, x, weight, mask, bias, layout):
        w = apply_mask(weight, effective_mask(weight, mask, layout))
        return torch.nn.functional.linear(x, w, bias)

    def grad_input(self, grad_out, weight, mask, layout):
        return grad_out @ apply_mask(weight, effective_mask(weight, mask, layout))

    def grad_weight(self, grad_out, x, weight, mask, layout, need_weight_grad, need_mask_grad):
        g = grad_out.t() @ x
        dw = apply_mask(g, effective_mask(weight, mask, layout)).to(weight.dtype) if need_weight_grad else None
        dm = (g * weight).to(mask.dtype) if need_mask_grad else None
        return dw, dm


def _layout_args(layout: Optional[BlockLayout], transpose: bool):
    if layout is None:
        return None, None, 0
    if transpose:
        return layout.col_ptr, layout.row_idx, layout.block_size
    return layout.row_ptr, layout.col_idx, layout.block_size


def _none_if_empty(t: torch.Tensor, wanted: bool):
    return t if wanted else None


class ExtensionBackend:
    """The compiled kernels of ``capkit._C`` (C++ on CPU, CUDA C++ on GPUs)."""

    def __init__(self, name: str, device_type: str):
        self.name = name
        self.device_type = device_type

    def unavailable_reason(self, device: torch.device) -> Optional[str]:
        ext = load_extension()
        if ext is None:
            return f"the compiled extension capkit._C is not importable ({extension_error()})"
        if device.type != self.device_type:
            return f"backend '{self.name}' runs on {self.device_type} tensors, got tensors on {device}"
        if self.device_type == "cuda" and not ext.build_info().get("cuda", False):
            return "capkit._C was built without CUDA kernels (no nvcc or a CPU-only torch at build time)"
        return None

    def unsupported_reason(self, x, weight, mask) -> Optional[str]:
        if self.device_type == "cpu" and x.dtype != torch.float32:
            return f"backend 'cpu' supports float32 inputs, got {x.dtype}"
        if self.device_type == "cuda" and x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            return f"backend 'cuda' supports float32/float16/bfloat16 inputs, got {x.dtype}"
        return None

    def forward(self, x, weight, mask, bias, layout):
        ptr, idx, b = _layout_args(layout, transpose=False)
        return torch.ops.capkit.masked_linear_forward(x, weight, mask, bias, ptr, idx, b)

    def grad_input(self, grad_out, weight, mask, layout):
        ptr, idx, b = _layout_args(layout, transpose=True)
        return torch.ops.capkit.masked_linear_grad_input(grad_out, weight, mask, ptr, idx, b)

    def grad_weight(self, grad_out, x, weight, mask, layout, need_weight_grad, need_mask_grad):
        ptr, idx, b = _layout_args(layout, transpose=False)
        dw, dm = torch.ops.capkit.masked_linear_grad_weight(
            grad_out, x, weight, mask, ptr, idx, b, need_weight_grad, need_mask_grad
        )
        return _none_if_empty(dw, need_weight_grad), _none_if_empty(dm, need_mask_grad)


class TritonBackend:
    """Triton kernels from ``capkit.kernels.masked_linear`` (GPU; CPU only under TRITON_INTERPRET=1)."""

    name = "triton"

    @functools.cached_property
    def _module(self):
        from capkit.kernels import masked_linear as mod

        return mod

    def unavailable_reason(self, device: torch.device) -> Optional[str]:
        try:
            import triton  # noqa: F401
        except ImportError as exc:
            return f"triton is not installed ({exc})"
        if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            return "Triton kernels need a GPU (or TRITON_INTERPRET=1 set before import, for testing on CPU)"
        if device.type not in ("cpu", "cuda"):
            return f"Triton kernels do not run on {device.type} tensors"
        return None

    def unsupported_reason(self, x, weight, mask) -> Optional[str]:
        if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            return f"backend 'triton' supports float32/float16/bfloat16 inputs, got {x.dtype}"
        if x.device.type == "cpu" and x.dtype == torch.bfloat16:
            return "the Triton interpreter has no bfloat16"
        return None

    def forward(self, x, weight, mask, bias, layout):
        ptr, idx, b = _layout_args(layout, transpose=False)
        return self._module.masked_linear_forward(x, weight, mask, bias, ptr, idx, b)

    def grad_input(self, grad_out, weight, mask, layout):
        ptr, idx, b = _layout_args(layout, transpose=True)
        return self._module.masked_linear_grad_input(grad_out, weight, mask, ptr, idx, b)

    def grad_weight(self, grad_out, x, weight, mask, layout, need_weight_grad, need_mask_grad):
        ptr, idx, b = _layout_args(layout, transpose=False)
        return self._module.masked_linear_grad_weight(
            grad_out, x, weight, mask, ptr, idx, b, need_weight_grad, need_mask_grad
        )


_BACKENDS = {
    "torch": TorchBackend(),
    "triton": TritonBackend(),
    "cuda": ExtensionBackend("cuda", "cuda"),
    "cpu": ExtensionBackend("cpu", "cpu"),
}


def get_backend(name: str):
    try:
        return _BACKENDS[name]
    except KeyError:
        raise ValueError(f"backend must be one of {('auto',) + BACKENDS}, got {name!r}") from None


def backend_status(device: torch.device) -> Dict[str, Optional[str]]:
    """Map of backend name -> None when usable on ``device``, else the reason it is not."""
    return {name: b.unavailable_reason(device) for name, b in _BACKENDS.items()}


# ---------------------------------------------------------------------------------------------
# "auto": a table of rules measured by benchmarks/masked_linear.py (see dispatch_table.json).

TABLE_PATH = Path(__file__).with_name("dispatch_table.json")


@functools.lru_cache(maxsize=None)
def dispatch_rules() -> List[dict]:
    if not TABLE_PATH.exists():
        return []
    with open(TABLE_PATH) as f:
        return json.load(f).get("rules", [])


def choose_backend(device: torch.device, dtype: torch.dtype, mask_kind: str, block_density: Optional[float],
                   training: bool) -> str:
    """First rule that matches and whose backend is usable here; the reference otherwise."""
    mode = "training" if training else "inference"
    dtype_name = str(dtype).replace("torch.", "")
    for rule in dispatch_rules():
        if rule.get("device") != device.type or rule.get("dtype") != dtype_name:
            continue
        if rule.get("mask_kind") != mask_kind or rule.get("mode", mode) != mode:
            continue
        max_density = rule.get("max_density")
        if max_density is not None and (block_density is None or block_density > max_density):
            continue
        if _BACKENDS[rule["backend"]].unavailable_reason(device) is None:
            return rule["backend"]
    return "torch"
