"""``MaskedLinear``: a drop-in for ``nn.Linear`` whose weight is multiplied by a mask inside the
fused op (``capkit.ops.masked_linear``), never materialised."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional, Union

import torch
from torch import nn

from capkit.nn._watch import ChangeWatch
from capkit.ops import BlockMask, NMMask, masked_linear
from capkit.ops._backends import apply_mask, effective_mask
from capkit.ops.masked_linear import masked_linear_with_steps
from capkit.ops.sparse_format import (CSRWeight, block_csr_applies, block_dense_mask, csr_applies, csr_linear,
                                      layer_norm_fits, pack_csr, tensor_version)

__all__ = ["MaskedLinear", "TopKStraightThrough", "prepared_masks"]


class TopKStraightThrough(torch.autograd.Function):
    """0/1 mask keeping the ``keep`` fraction of highest scores; the gradient passes to the scores
    unchanged (straight-through estimator of movement pruning)."""

    @staticmethod
    def forward(ctx, scores: torch.Tensor, keep: float) -> torch.Tensor:
        n = scores.numel()
        k = max(1, min(n, int(round(keep * n))))
        flat = scores.detach().reshape(-1).float()
        # k-th largest = (n - k + 1)-th smallest; a selection, not a sort.
        threshold = flat.kthvalue(n - k + 1).values
        return (scores >= threshold).to(scores.dtype)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def _mask_state(mask) -> tuple:
    """Storage and version of a fixed mask's tensors: a change to any of them invalidates what
    was built from the mask."""
    if isinstance(mask, BlockMask):
        tensors = (mask.layout.row_ptr, mask.layout.col_idx) + (() if mask.mask is None else (mask.mask,))
        return tuple((t.data_ptr(), tensor_version(t)) for t in tensors)
    return (mask.data_ptr(), tensor_version(mask))


class MaskedLinear(nn.Module):
    """``y = x @ (weight * mask)^T + bias``.

    The mask is one of: a dense 0/1 buffer (``set_mask``), a :class:`BlockMask` or
    :class:`NMMask` (``set_mask``), or learnable ``scores`` with a kept fraction ``keep``
    (``init_scores``), in which case the top-``keep`` scores form the mask and the scores get the
    straight-through gradient ``(dy^T x) * weight``. ``block_size`` turns a dense mask into a
    block layout so that all-zero blocks are skipped.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        block_size: Optional[int] = None,
        backend: str = "auto",
        device=None,
        dtype=None,
    ):
        super().__init__()
        if in_features <= 0 or out_features <= 0:
            raise ValueError(f"in_features and out_features must be positive, got {in_features}, {out_features}")
        self.in_features = in_features
        self.out_features = out_features
        self.block_size = block_size
        self.backend = backend
        factory = {"device": device, "dtype": dtype}
        ref = nn.Linear(in_features, out_features, bias=bias, **factory)
        self.weight = nn.Parameter(ref.weight.detach())
        self.bias = nn.Parameter(ref.bias.detach()) if bias else None
        self.register_buffer("mask", torch.ones(out_features, in_features, dtype=torch.bool, device=self.weight.device))
        self.scores: Optional[nn.Parameter] = None
        self.keep: float = 1.0
        self._structured: Optional[Union[BlockMask, NMMask]] = None
        self._block_cache = None  # (mask version, BlockMask)
        # A pruning criterion (capkit.pruning) that computes the mask from scores or weights on
        # every forward; it takes precedence over ``mask``/``scores`` when set.
        self.criterion = None
        self._prefolded_watch = ChangeWatch()
        self._prefolded = False
        self._csr_watch = ChangeWatch()
        self._csr: Optional[CSRWeight] = None
        # (mask, its version, bias, its version, backend, packed weight): what the last call that
        # went to the CSR kernel used, so that the next one with the same fixed mask, weight and
        # bias goes straight there (see _csr_plan_holds).
        self._csr_plan = None
        # The mask of the next forward(s), computed ahead by :func:`capkit.nn.prepared_masks`
        # (so that a compiled forward reads a tensor instead of tracing the criterion's caches).
        self._prepared = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, **kwargs) -> "MaskedLinear":
        """Wrap an existing ``nn.Linear`` (its parameters are shared, not copied)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        m = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                device=linear.weight.device, dtype=linear.weight.dtype, **kwargs)
        m.weight = linear.weight
        m.bias = linear.bias
        return m

    def set_mask(self, mask: Union[torch.Tensor, BlockMask, NMMask]) -> None:
        """Use a fixed mask (dense 0/1 tensor, BlockMask or NMMask)."""
        shape = (self.out_features, self.in_features)
        if isinstance(mask, (BlockMask, NMMask)):
            if tuple(mask.shape) != shape:
                raise ValueError(f"mask must have shape {shape}, got {tuple(mask.shape)}")
            self._structured = mask
            self.mask = mask.to_dense().to(torch.bool).to(self.weight.device)
        else:
            if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != shape:
                got = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
                raise ValueError(f"mask must be a tensor of shape {shape}, got {got}")
            self._structured = None
            self.mask = (mask != 0).to(self.weight.device)
        self._block_cache = None

    def init_scores(self, keep: float = 1.0, init: Optional[torch.Tensor] = None) -> None:
        """Switch to learnable scores (movement pruning); ``keep`` is the kept fraction."""
        self.set_keep(keep)
        data = torch.zeros_like(self.weight, dtype=torch.float32) if init is None else init.detach().float().clone()
        self.scores = nn.Parameter(data)

    def set_keep(self, keep: float) -> None:
        if not (0.0 < keep <= 1.0):
            raise ValueError(f"keep must be in (0, 1], got {keep}")
        self.keep = float(keep)

    def current_mask(self):
        """The mask the forward uses (a tensor, BlockMask or NMMask)."""
        prepared = getattr(self, "_prepared", None)  # absent in modules pickled by older versions
        if prepared is not None:
            return prepared
        if self.criterion is not None:
            return self.criterion.mask(self)
        if self.scores is not None:
            return TopKStraightThrough.apply(self.scores, self.keep).to(self.weight.dtype)
        if self._structured is not None:
            return self._structured
        if self.block_size is not None:
            version = (self.mask.data_ptr(), tensor_version(self.mask))
            if self._block_cache is None or self._block_cache[0] != version:
                self._block_cache = (version, BlockMask.from_dense(self.mask, self.block_size))
            return self._block_cache[1]
        return self.mask

    def dense_mask(self) -> torch.Tensor:
        """The current mask as a dense tensor of the weight's shape, without gradient."""
        with torch.no_grad():
            m = self.current_mask()
        return (m.to_dense() if isinstance(m, (BlockMask, NMMask)) else m).detach()

    def effective_weight(self) -> torch.Tensor:
        return apply_mask(self.weight.detach(), effective_mask(self.weight, self.dense_mask(), None))

    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` holding ``weight * mask`` (zeros in place of pruned weights)."""
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            lin.weight.copy_(self.effective_weight())
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin

    def _weight_already_masked(self, mask) -> bool:
        """Whether ``weight`` is zero wherever ``mask`` is (true for models loaded from an
        export); checked again only when the weight or the mask may have changed."""
        dense = mask.to_dense() if isinstance(mask, NMMask) else mask
        mask_state = (dense.data_ptr(), tensor_version(dense))
        if self._prefolded_watch.changed(self.weight, mask_state):
            self._prefolded = not bool(((self.weight.detach() != 0) & (dense == 0)).any())
            self._prefolded_watch.seen(self.weight, mask_state)
        return self._prefolded

    def packed_weight(self, mask: Union[torch.Tensor, BlockMask, None] = None) -> CSRWeight:
        """The CSR of ``weight * mask`` (a 0/1 tensor, or a BlockMask: its live blocks and element
        mask) for the CPU inference kernel, built once and rebuilt only after the weight or the mask
        changed (the weight watched for fused-optimiser updates too)."""
        mask = self.mask if mask is None else mask
        state = _mask_state(mask)
        if self._csr is None or self._csr_watch.changed(self.weight, state):
            if isinstance(mask, BlockMask):
                self._csr = pack_csr(self.weight, block_dense_mask(mask.layout, mask.mask))
            else:
                self._csr = pack_csr(self.weight, mask)
            self._csr_watch.seen(self.weight, state)
        return self._csr

    def _fixed_mask_source(self):
        """What current_mask() returns when the mask is fixed (a set tensor or block mask), without
        building anything; None when a criterion, scores or prepared masks decide it."""
        # plain attribute reads and the parameter/buffer dicts (nn.Module.__getattr__ is slow):
        # this runs on every inference call of the CSR kernel
        if getattr(self, "_prepared", None) is not None or self.criterion is not None or self.scores is not None:
            return None
        if self._structured is not None:
            return self._structured
        mask = self._buffers.get("mask")
        if self.block_size is not None:
            cache = self._block_cache
            return cache[1] if cache is not None and cache[0] == (mask.data_ptr(), tensor_version(mask)) else None
        return mask

    def _csr_plan_holds(self, x: torch.Tensor) -> bool:
        """Whether this call may reuse the last CSR call's decision and packed weight: inference
        without autograd on CPU fp32, outside tracing and autocast, with the same fixed mask, weight
        and bias (objects and versions; the weight watched like ``packed_weight`` does). A handful
        of attribute reads instead of the full eligibility check, which cost 17 of the 66 us a call
        took at 384 x 384, 128 tokens and 10% kept on a 2-core Xeon."""
        if torch.compiler.is_compiling():  # first: a graph must not trace the checks below
            return False
        if torch.is_grad_enabled():
            return False
        if x.dtype != torch.float32 or not x.is_cpu or torch.is_autocast_enabled("cpu"):
            return False
        return self._csr_plan_current()

    def _csr_plan_current(self) -> bool:
        """The module half of :meth:`_csr_plan_holds`: a last CSR decision exists and the mask,
        weight and bias it was made for are unchanged (the caller has checked the call: no
        autograd, CPU fp32 input, no tracing or autocast)."""
        plan = self.__dict__.get("_csr_plan")  # absent in modules pickled by older versions
        if plan is None:
            return False
        source, state, bias = plan[0], plan[1], plan[2]
        params = self._parameters
        return (self._fixed_mask_source() is source and _mask_state(source) == state
                and params.get("bias") is bias and (bias is None or tensor_version(bias) == plan[3])
                and self.backend == plan[4] and params.get("weight") is self._csr_watch._tensor
                and self._csr_watch.unchanged_since_seen(state))

    def _remember_csr_call(self, mask, packed: CSRWeight) -> None:
        bias = self.bias
        self._csr_plan = ((mask, _mask_state(mask), bias, None if bias is None else tensor_version(bias), self.backend, packed)
                          if self._fixed_mask_source() is mask else None)

    def forward(self, x: torch.Tensor, activation: Optional[str] = None,
                residual: Optional[torch.Tensor] = None, layer_norm: Optional[nn.LayerNorm] = None) -> torch.Tensor:
        """``x @ (weight * mask)^T + bias``, then either ``activation`` (None, or ``"gelu"``: the
        exact, erf GELU) or ``+ residual`` (a tensor of the output's shape) and/or ``layer_norm``
        (an ``nn.LayerNorm`` applied last). The CSR inference kernel applies them inside the
        kernel; other paths add the steps after the layer."""
        if activation is not None and activation != "gelu":
            raise ValueError(f"MaskedLinear: activation must be None or 'gelu', got {activation!r}")
        if activation is not None and (residual is not None or layer_norm is not None):
            raise ValueError("MaskedLinear: activation cannot be combined with residual or layer_norm")
        if residual is not None and (residual.dtype != torch.float32 or not residual.is_cpu
                                     or residual.shape != (*x.shape[:-1], self.out_features)):
            y = self.forward(x) + residual  # not the kernel's case: the plain sum (broadcast included)
            return y if layer_norm is None else layer_norm(y)
        if layer_norm is not None and not layer_norm_fits(layer_norm, self.out_features):
            y = self.forward(x, residual=residual)
            return layer_norm(y)
        if self._csr_plan_holds(x):
            return csr_linear(x, self._csr_plan[5], self.bias, activation, residual, layer_norm)
        y, applied = self._linear(x, activation, residual, layer_norm)
        if applied:
            return y
        if activation == "gelu":
            return torch.nn.functional.gelu(y)
        if residual is not None:
            y = y + residual
        return y if layer_norm is None else layer_norm(y)

    def _linear(self, x: torch.Tensor, activation: Optional[str], residual: Optional[torch.Tensor] = None,
                layer_norm: Optional[nn.LayerNorm] = None):
        """The layer's output and whether the steps after it (``activation``, ``residual``,
        ``layer_norm``) are already applied."""
        mask = self.current_mask()
        if torch.compiler.is_compiling():
            # Traced by torch.compile: one custom-op call (the pre-folded shortcut keeps a cache
            # keyed on tensor storage, which a graph cannot hold). The op itself sends sparse
            # enough inference to the CSR kernel when the graph runs; with steps after the layer
            # and autograd off, the op that applies them there too.
            steps = activation is not None or residual is not None or layer_norm is not None
            if (steps and not torch.is_grad_enabled() and not torch.is_autocast_enabled(x.device.type)
                    and x.dtype == self.weight.dtype and not (isinstance(mask, torch.Tensor) and mask.requires_grad)):
                return masked_linear_with_steps(x, self.weight, mask, self.bias, self.backend, activation, residual,
                                                layer_norm), True
            return masked_linear(x, self.weight, mask, self.bias, backend=self.backend), False
        if (isinstance(mask, torch.Tensor) and csr_applies(x, self.weight, mask, self.bias, self.backend)) or (
                # a block layout goes to the CSR kernel from its second sighting on, and the
                # sightings are counted by the op below: ask only once it has seen this one
                isinstance(mask, BlockMask) and getattr(mask.layout, "_capkit_seen", False)
                and block_csr_applies(x, self.weight, mask.layout, mask.mask, self.bias, self.backend)):
            packed = self.packed_weight(mask)
            self._remember_csr_call(mask, packed)
            return csr_linear(x, packed, self.bias, activation, residual, layer_norm), True
        # Inference with an unstructured mask too dense for the CSR kernel, or an N:M mask, already
        # folded into the weight: the dense GEMM is the fastest measured path, so run it without
        # re-applying the mask (block masks go to the block-sparse kernels).
        if (not torch.is_grad_enabled() and not isinstance(mask, BlockMask)
                and not (isinstance(mask, torch.Tensor) and mask.dtype.is_floating_point)
                and self._weight_already_masked(mask)):
            return torch.nn.functional.linear(x, self.weight, self.bias), False
        return masked_linear(x, self.weight, mask, self.bias, backend=self.backend), False

    def extra_repr(self) -> str:
        if self.criterion is not None:
            kind = f"criterion={self.criterion.name}"
        else:
            kind = "scores" if self.scores is not None else (type(self._structured).__name__ if self._structured else "dense")
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, mask={kind}, block_size={self.block_size}, backend={self.backend}")


@contextmanager
def prepared_masks(model: nn.Module) -> Iterator[None]:
    """Compute the mask of every :class:`MaskedLinear` in ``model`` now, in eager mode, and have
    the forwards inside the block use it.

    For ``torch.compile``: a pruning criterion finds its top-k thresholds with caches keyed on
    tensor versions, which a graph cannot hold; computed ahead, each layer's mask reaches the
    compiled forward as an ordinary tensor input (the straight-through gradient still flows from
    the mask to the scores). Grad mode at entry decides, as in a plain forward, whether the masks
    carry that gradient. The masks are dropped when the block ends.
    """
    modules = [m for m in model.modules() if isinstance(m, MaskedLinear)]
    try:
        for m in modules:
            m._prepared = None
            m._prepared = m.current_mask()
        yield
    finally:
        for m in modules:
            m._prepared = None
