"""Unstructured-sparse weights in a compressed format for the CPU inference kernel.

A weight ``W [out, in]`` with a fixed 0/1 mask is stored once as CSR by output row within panels
of ``PANEL`` input features (:class:`CSRWeight`: int32 pointers and column indices, the kept
values; panels for wide inputs, so that a panel of the transposed input stays cached while every
row reads it); the C++ kernel ``capkit._C`` ``csr_linear_forward`` then computes
``x @ (W * M)^T + bias`` reading only the kept weights, so a pruned entry (NaN included) is never
read. The format is built once per weight and mask (at load, or at the first call after either
changed) and cached, never per call. Eager calls and ``torch.compile`` graphs both reach it: the
``capkit::masked_linear`` custom op makes the same choice when a compiled graph runs it.

Which densities go to this kernel is measured, not guessed: ``dispatch_table.json`` holds a rule
``{"mask_kind": "unstructured", "mode": "inference", "backend": "cpu", "max_density": ...}``
written by ``python -m benchmarks.masked_linear --update-dispatch-table``. Training keeps the
dense kernels (the measurements are in the benchmark's results).
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Optional

import torch

from capkit.ops._backends import dispatch_rules, get_backend

__all__ = ["PANEL", "CSRWeight", "csr_linear", "csr_max_density", "csr_applies", "packed_for_mask", "pack_csr",
           "block_csr_applies", "packed_for_block_mask"]


# Input features per panel. Measured on a 2-core Xeon (AVX-512), 10% density, 1 thread: panels
# of 256 beat plain CSR by 5-25% at K = 768 and 3072 and lost at K = 384, where plain CSR is
# used (smaller panels, 64 or 128, lost everywhere: the partial sums go to memory too often).
PANEL = 256
MIN_PANELLED_K = 3 * PANEL


def default_panel(in_features: int) -> int:
    return PANEL if in_features >= MIN_PANELLED_K else in_features


@dataclass
class CSRWeight:
    """``W * M`` of a ``[out_features, in_features]`` weight as CSR by output row within panels of
    ``panel`` input features (CPU, fp32): the kept weights of row ``n`` in panel ``p`` are
    ``ptr[p * out + n] : ptr[p * out + n + 1]``."""

    ptr: torch.Tensor  # int32 [n_panels * out + 1]
    col_idx: torch.Tensor  # int32 [nnz], increasing within a row and panel
    values: torch.Tensor  # float32 [nnz]
    shape: tuple
    panel: int
    # uint8 [out // 4]: 1 where rows 4g .. 4g + 3 keep the same columns (the kernel then reads each
    # input row once for the four); None: no such groups known
    row_quads: Optional[torch.Tensor] = None

    @property
    def nnz(self) -> int:
        return int(self.col_idx.numel())

    @property
    def density(self) -> float:
        n = self.shape[0] * self.shape[1]
        return self.nnz / n if n else 1.0

    def to_dense(self) -> torch.Tensor:
        out_f = self.shape[0]
        segments = torch.arange(self.ptr.numel() - 1) % max(out_f, 1)
        rows = torch.repeat_interleave(segments, (self.ptr[1:] - self.ptr[:-1]).long())
        w = torch.zeros(self.shape, dtype=self.values.dtype)
        w[rows, self.col_idx.long()] = self.values
        return w


def pack_csr(weight: torch.Tensor, mask: torch.Tensor, panel: Optional[int] = None) -> CSRWeight:
    """Panelled CSR of ``weight`` where ``mask`` is nonzero (the mask's zeros are not stored);
    ``panel`` input features per panel (default :func:`default_panel`; 0: plain CSR)."""
    if weight.dim() != 2 or tuple(mask.shape) != tuple(weight.shape):
        raise ValueError(f"weight and mask must be 2-D of one shape, got {tuple(weight.shape)} and {tuple(mask.shape)}")
    out_f, in_f = weight.shape
    if out_f * in_f >= 2**31:
        raise ValueError("pack_csr: the weight has too many elements for int32 indices")
    panel = default_panel(in_f) if panel is None else int(panel)
    panel = panel if 0 < panel < in_f else max(in_f, 1)
    n_panels = -(-in_f // panel) if in_f else 1
    with torch.no_grad():
        keep = (mask != 0).cpu()
        w = weight.detach().cpu().to(torch.float32)
        idx = keep.nonzero()  # row-major: rows ascending, columns ascending within a row
        values = w[keep]
        rows, cols = idx[:, 0], idx[:, 1]
        segment = (cols // panel) * out_f + rows  # (panel, row) of each kept weight
        if n_panels > 1:
            segment, order = torch.sort(segment, stable=True)
            cols, values = cols[order], values[order]
        counts = torch.bincount(segment, minlength=n_panels * out_f) if idx.numel() else \
            torch.zeros(n_panels * out_f, dtype=torch.long)
        ptr = torch.zeros(n_panels * out_f + 1, dtype=torch.int32)
        ptr[1:] = counts.cumsum(0)
        return CSRWeight(ptr, cols.to(torch.int32).contiguous(), values.contiguous(), (out_f, in_f), panel,
                         row_quads(keep))


def row_quads(keep: torch.Tensor) -> torch.Tensor:
    """``[rows // 4]`` uint8: 1 where the four rows ``4g .. 4g + 3`` of the boolean ``keep`` are
    equal (masks pruned in blocks of four rows or more, e.g. 32 x 32 blocks, give whole groups)."""
    g = keep.shape[0] // 4
    rows = keep[: 4 * g].reshape(g, 4, keep.shape[1])
    return (rows == rows[:, :1]).flatten(1).all(1).to(torch.uint8).contiguous()


def tensor_version(t: torch.Tensor) -> int:
    """``t._version``, the counter of in-place writes, or -1 for a tensor made under
    ``torch.inference_mode`` (e.g. a model loaded inside it), which keeps none: writes to such a
    tensor (possible only in inference mode) cannot be seen, so caches built from it stay."""
    return -1 if t.is_inference() else t._version


ACTIVATIONS = (None, "gelu")


def layer_norm_fits(layer_norm, out_features: int) -> bool:
    """Whether the kernel can apply ``layer_norm`` (an ``nn.LayerNorm``) to a layer's outputs: over
    exactly the ``out_features`` outputs, with fp32 CPU parameters (or none)."""
    if not isinstance(layer_norm, torch.nn.LayerNorm) or tuple(layer_norm.normalized_shape) != (out_features,):
        return False
    # the parameter dict, not nn.Module.__getattr__: this runs on every fused inference call
    params = layer_norm._parameters
    return all(p is None or (p.dtype == torch.float32 and p.is_cpu) for p in (params.get("weight"), params.get("bias")))


def layer_norm_args(layer_norm: Optional[torch.nn.LayerNorm]) -> tuple:
    """``(weight, bias, eps)`` of ``layer_norm`` as :func:`csr_kernel_call` takes them (detached;
    None for absent parameters; ``(None, None, 1e-5)`` without a LayerNorm)."""
    if layer_norm is None:
        return None, None, 1e-5
    p = layer_norm._parameters
    w, b = p.get("weight"), p.get("bias")
    return None if w is None else w.detach(), None if b is None else b.detach(), float(layer_norm.eps)


def csr_linear(x: torch.Tensor, packed: CSRWeight, bias: Optional[torch.Tensor] = None,
               activation: Optional[str] = None, residual: Optional[torch.Tensor] = None,
               layer_norm: Optional[torch.nn.LayerNorm] = None) -> torch.Tensor:
    """``x @ (W * M)^T + bias`` with the C++ kernel; ``x [..., in]`` fp32 on the CPU, no autograd.
    Applied inside the kernel, on each output tile while it is still in cache: either
    ``activation="gelu"``, the exact (erf) GELU (a BERT feed-forward's first layer and its
    activation in one pass), or ``residual``, a tensor of the output's shape added to it, and/or
    ``layer_norm``, an ``nn.LayerNorm`` over the outputs applied last (a BERT sub-layer's dense,
    residual connection and LayerNorm in one pass)."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"csr_linear: activation must be None or 'gelu', got {activation!r}")
    out_f, in_f = packed.shape
    if x.dim() == 0 or x.shape[-1] != in_f:
        raise ValueError(f"csr_linear: x's last dimension must be the weight's in_features ({in_f}), "
                         f"got x of shape {tuple(x.shape)}")
    if activation is not None and (residual is not None or layer_norm is not None):
        raise ValueError("csr_linear: activation cannot be combined with residual or layer_norm")
    if layer_norm is not None and not layer_norm_fits(layer_norm, out_f):
        raise ValueError(f"csr_linear: layer_norm must be an nn.LayerNorm over the {out_f} outputs with fp32 CPU "
                         f"parameters, got {layer_norm!r}")
    lead = x.shape[:-1]
    if residual is not None:
        if tuple(residual.shape) != (*lead, out_f):
            raise ValueError(f"csr_linear: residual must have the output's shape {(*lead, out_f)}, "
                             f"got {tuple(residual.shape)}")
        residual = residual.reshape(-1, out_f)
    y = csr_kernel_call(x.reshape(-1, in_f), packed, bias, 1 if activation == "gelu" else 0, residual,
                        layer_norm is not None, *layer_norm_args(layer_norm))
    return y.view(*lead, out_f)


def csr_kernel_call(x2d: torch.Tensor, packed: CSRWeight, bias: Optional[torch.Tensor], activation: int = 0,
                    residual: Optional[torch.Tensor] = None, layer_norm: bool = False,
                    ln_weight: Optional[torch.Tensor] = None, ln_bias: Optional[torch.Tensor] = None,
                    ln_eps: float = 1e-5) -> torch.Tensor:
    """The C++ kernel on a 2-D ``x`` and ``residual`` (made contiguous here): ``activation`` 0
    (none) or 1 (GELU), the LayerNorm's parameters as tensors. No other checks (the kernel checks
    shapes and dtypes itself)."""
    c = _contiguous
    return torch.ops.capkit.csr_linear_forward(x2d.contiguous(), packed.ptr, packed.col_idx, packed.values, c(bias),
                                               packed.shape[0], packed.panel, activation, c(residual), layer_norm,
                                               c(ln_weight), c(ln_bias), ln_eps, packed.row_quads)


def _contiguous(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if t is None else t.contiguous()


_MAX_DENSITY: dict = {}  # dtype name -> (the rules list it was read from, max density)


def csr_max_density(dtype: torch.dtype = torch.float32) -> float:
    """Highest mask density at which the measured table sends CPU inference to the CSR kernel
    (0 without such a rule: the dense kernels then run). Read once per table and dtype: this is
    asked on every sparse forward."""
    name = str(dtype).replace("torch.", "")
    rules = dispatch_rules()
    hit = _MAX_DENSITY.get(name)
    if hit is not None and hit[0] is rules:
        return hit[1]
    value = 0.0
    for rule in rules:
        if (rule.get("device") == "cpu" and rule.get("dtype") == name and rule.get("mask_kind") == "unstructured"
                and rule.get("mode", "inference") == "inference" and rule.get("backend") == "cpu"):
            value = float(rule.get("max_density") or 0.0)
            break
    _MAX_DENSITY[name] = (rules, value)
    return value


def _eligible_call(x: torch.Tensor, weight: torch.Tensor, bias, backend: str) -> bool:
    """Inference (no autograd) on CPU fp32 on a backend that may use C++, outside tracing."""
    if torch.compiler.is_compiling():
        return False
    if backend not in ("auto", "cpu"):
        return False
    if x.device.type != "cpu" or x.dtype != torch.float32 or weight.dtype != torch.float32:
        return False
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias)):
        return False
    if torch.is_autocast_enabled("cpu"):
        return False
    return get_backend("cpu").unavailable_reason(x.device) is None


def _fixed_01(mask) -> bool:
    return (isinstance(mask, torch.Tensor) and mask.dtype in (torch.bool, torch.uint8)
            and not mask.requires_grad)


def _eligible(x: torch.Tensor, weight: torch.Tensor, mask, bias, backend: str) -> bool:
    """Inference (no autograd) on CPU fp32 with a fixed 0/1 mask, on a backend that may use C++;
    never while torch.compile traces (the format is built and cached per weight, outside any graph:
    a compiled graph reaches the kernel through the ``capkit::masked_linear`` op, which asks again
    with the real tensors when it runs)."""
    return _fixed_01(mask) and _eligible_call(x, weight, bias, backend)


def _density(mask: torch.Tensor) -> float:
    state = (mask.data_ptr(), tensor_version(mask))
    cached = getattr(mask, "_capkit_density", None)
    if cached is None or cached[0] != state:
        cached = (state, float(torch.count_nonzero(mask)) / max(1, mask.numel()))
        mask._capkit_density = cached
    return cached[1]


def csr_applies(x: torch.Tensor, weight: torch.Tensor, mask, bias=None, backend: str = "auto") -> bool:
    """Whether ``masked_linear(x, weight, mask, bias, backend=backend)`` runs the CSR kernel."""
    return _eligible(x, weight, mask, bias, backend) and _density(mask) <= csr_max_density(x.dtype)


def _count_gradient(t: torch.Tensor) -> None:
    t._capkit_gradients = getattr(t, "_capkit_gradients", 0) + 1


def gradient_count(t: torch.Tensor) -> int:
    """How many gradients a leaf tensor that requires grad has received since it was first asked
    about here (a post-accumulate-grad hook counts them; 0 for other tensors). Part of the state
    that cached packs compare: the fused optimisers (``AdamW(fused=True)``) write a parameter in
    place without bumping its version counter, but only after it received a gradient."""
    if not (t.requires_grad and t.is_leaf):
        return getattr(t, "_capkit_gradients", 0)
    handle_id = getattr(t, "_capkit_gradient_hook", None)
    hooks = getattr(t, "_post_accumulate_grad_hooks", None)
    if handle_id is None or hooks is None or handle_id not in hooks:  # never hooked, or a copy without hooks
        t._capkit_gradient_hook = t.register_post_accumulate_grad_hook(_count_gradient).id
    return getattr(t, "_capkit_gradients", 0)


def _cached_pack(holder, weight: torch.Tensor, state: tuple, dense_mask) -> CSRWeight:
    """The CSR cached on ``holder`` (a mask tensor or a block layout) for this weight object and
    ``state``; otherwise ``pack_csr(weight, dense_mask())``, cached there. The weight's storage,
    version and gradient count (see :func:`gradient_count`) are part of the state."""
    state = (weight.data_ptr(), tensor_version(weight), gradient_count(weight)) + state
    cached = getattr(holder, "_capkit_csr", None)
    if cached is not None and cached[0]() is weight and cached[1] == state:
        return cached[2]
    packed = pack_csr(weight, dense_mask())
    holder._capkit_csr = (weakref.ref(weight), state, packed)
    return packed


def packed_for_mask(weight: torch.Tensor, mask: torch.Tensor) -> CSRWeight:
    """The CSR of ``weight * mask``, cached on the mask tensor and rebuilt only when the weight
    (another tensor, or written in place) or the mask changed."""
    return _cached_pack(mask, weight, (mask.data_ptr(), tensor_version(mask)), lambda: mask)


def block_csr_applies(x: torch.Tensor, weight: torch.Tensor, layout, element_mask=None, bias=None,
                      backend: str = "auto") -> bool:
    """Whether a block mask (``layout``, with an optional fixed 0/1 element mask inside its live
    blocks) runs the CSR kernel in inference: at block densities within the same measured
    threshold, from the second call with the same layout on (a fixed mask: an export, a frozen
    model). The CSR kernel reads any pattern, and beat the block-sparse kernel on 32 x 32
    block masks at 10% kept on the 2-core Xeon, at every BERT layer shape measured (e.g. 56 against
    95 us at 384 x 384 and 128 tokens, 14.5 against 21.3 ms at 3072 -> 768 and 4096 tokens)."""
    if element_mask is not None and not _fixed_01(element_mask):
        return False
    if not (_eligible_call(x, weight, bias, backend) and layout.block_density <= csr_max_density(x.dtype)):
        return False
    # Only a layout seen before: the block kernels pack their live blocks in C++ on each call,
    # while building the CSR costs several passes over the whole weight in Python, which a mask
    # made afresh for every forward (a pruning criterion's, e.g. evaluation during training)
    # would pay on each call.
    if getattr(layout, "_capkit_seen", False):
        return True
    layout._capkit_seen = True
    return False


def packed_for_block_mask(weight: torch.Tensor, layout, element_mask=None) -> CSRWeight:
    """The CSR of ``weight`` inside the live blocks of ``layout`` (and where ``element_mask`` is
    nonzero, if given), cached on the layout and rebuilt only when the weight, the layout's
    tensors or the element mask changed."""
    state = (tuple((t.data_ptr(), tensor_version(t)) for t in (layout.row_ptr, layout.col_idx)),
             None if element_mask is None else (element_mask.data_ptr(), tensor_version(element_mask)))

    return _cached_pack(layout, weight, state, lambda: block_dense_mask(layout, element_mask))


def block_dense_mask(layout, element_mask=None) -> torch.Tensor:
    """The 0/1 mask of a block layout's live blocks, and of ``element_mask`` inside them."""
    dense = layout.dense_mask()
    return dense if element_mask is None else dense & (element_mask != 0)
