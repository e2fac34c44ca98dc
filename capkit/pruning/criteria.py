"""Pruning criteria: how each :class:`~capkit.nn.MaskedLinear` turns its weights or scores into a
mask on every forward.

A criterion object is shared by all the layers one :class:`~capkit.pruning.Pruner` manages. For
the top-k criteria it owns a :class:`ThresholdGroup`, which finds the thresholds of all layers in
one batched selection (never a sort) and only when the scores (or weights) or the kept fraction
changed since the last time, so gradient accumulation and evaluation reuse them.

While training, masks built from scores are floating 0/1 tensors carrying the straight-through
estimator: ``masked_linear`` returns ``dmask = (dy^T x) * W`` and the estimator hands it to the
scores unchanged (per block, the block's sum). Without a gradient (evaluation, export) the same
masks come back as bool tensors, :class:`~capkit.ops.BlockMask` or :class:`~capkit.ops.NMMask`, so
capkit's sparse kernels can skip the pruned weights.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from capkit.nn._watch import ChangeWatch
from capkit.ops import BlockMask, NMMask
from capkit.pruning.topk import global_topk_threshold, topk_thresholds

__all__ = [
    "CRITERIA",
    "BlockMovement",
    "Criterion",
    "Magnitude",
    "Movement",
    "NMMagnitude",
    "NMMovement",
    "SoftMovement",
    "ThresholdGroup",
    "kept_fraction",
    "make_criterion",
]

# Soft movement's floor: a matrix never keeps fewer than this fraction of its weights.
SOFT_MOVEMENT_FLOOR = 0.005


class _StraightThrough(torch.autograd.Function):
    """Forward: the 0/1 ``keep`` tensor as ``dtype``; backward: the gradient passes to ``source``
    unchanged (the estimator of movement pruning; the sigmoid of soft movement is not
    differentiated either)."""

    @staticmethod
    def forward(ctx, source: torch.Tensor, keep: torch.Tensor, dtype: torch.dtype):
        return keep.to(dtype)

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None


def _straight_through(source: torch.Tensor, keep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return _StraightThrough.apply(source, keep, dtype)


class ThresholdGroup:
    """Top-k thresholds of a set of layers, recomputed in one batch when their inputs changed.

    ``scope="matrix"``: each layer keeps its own ``keep`` fraction; ``"global"``: one threshold
    over all layers together, so layers end up with different densities (all layers must then
    share the same ``keep``). A layer's input changed when its keep fraction did or when its
    scores (weights, for magnitude) were replaced, written in place or received a gradient
    (:class:`capkit.nn._watch.ChangeWatch`: fused optimisers do not bump version counters).
    """

    def __init__(self, criterion: "Criterion", scope: str = "matrix", method: str = "auto"):
        if scope not in ("matrix", "global"):
            raise ValueError(f"scope must be 'matrix' or 'global', got {scope!r}")
        self.criterion = criterion
        self.scope = scope
        self.method = method
        self.modules: List[torch.nn.Module] = []
        # keyed by the modules themselves (not id()), so that a deepcopy of the model maps them
        self._watches: Dict[torch.nn.Module, ChangeWatch] = {}
        self._thresholds: Dict[torch.nn.Module, torch.Tensor] = {}
        self.recomputations = 0  # how often a selection actually ran (tests and benchmarks read it)

    def add(self, module) -> None:
        self.modules.append(module)
        self._watches[module] = ChangeWatch()
        self._thresholds.pop(module, None)

    def _changed(self, module) -> bool:
        return self._watches[module].changed(self.criterion.source(module), self.criterion.keep_of(module))

    def _seen(self, module) -> None:
        self._watches[module].seen(self.criterion.source(module), self.criterion.keep_of(module))

    def threshold(self, module) -> torch.Tensor:
        if self.scope == "matrix":
            # Each threshold depends on its own layer only: check that layer (O(1) per forward);
            # when it changed, recompute every changed layer in one batch, so after an optimiser
            # step the first layer's forward selects for all and the others find theirs current.
            if self._changed(module) or module not in self._thresholds:
                self._recompute_matrix()
            return self._thresholds[module]
        # One threshold for all: this layer gets the full check, the others the cheap one (no
        # gradient, no version bump, same keep), so a forward through L layers costs O(L) checks each.
        if (module not in self._thresholds or self._changed(module)
                or not all(w.unchanged_since_seen(self.criterion.keep_of(m)) for m, w in self._watches.items())):
            self._recompute_global()
        return self._thresholds[module]

    @torch.no_grad()
    def _recompute_matrix(self) -> None:
        stale = [m for m in self.modules if self._changed(m) or m not in self._thresholds]
        values = [self.criterion.selection_values(m) for m in stale]
        thrs = topk_thresholds(values, [self.criterion.keep_of(m) for m in stale], method=self.method)
        for i, m in enumerate(stale):
            self._thresholds[m] = thrs[i]
            self._seen(m)
        self.recomputations += 1

    @torch.no_grad()
    def _recompute_global(self) -> None:
        values = [self.criterion.selection_values(m) for m in self.modules]
        keeps = [self.criterion.keep_of(m) for m in self.modules]
        if len(set(keeps)) != 1:
            raise ValueError(f"a global threshold needs one keep fraction for all layers, got {sorted(set(keeps))}")
        thr = global_topk_threshold(values, keeps[0], method=self.method)
        self._thresholds = {m: thr for m in self.modules}
        for m in self.modules:
            self._seen(m)
        self.recomputations += 1


class Criterion:
    """Base class. ``uses_scores``: the criterion learns a score tensor per layer."""

    name = "criterion"
    uses_scores = True
    topk = True  # the mask keeps the top `keep` fraction of selection_values

    def __init__(self, *, scope: str = "matrix", method: str = "auto"):
        self.group = ThresholdGroup(self, scope=scope, method=method) if self.topk else None

    # -- set-up ---------------------------------------------------------------------------------
    def score_shape(self, module) -> Tuple[int, int]:
        return (module.out_features, module.in_features)

    def attach(self, module) -> None:
        """Give ``module`` this criterion (and zero scores if it learns scores)."""
        if self.uses_scores:
            shape = self.score_shape(module)
            existing = getattr(module, "scores", None)
            if existing is None or tuple(existing.shape) != shape:
                module.scores = torch.nn.Parameter(torch.zeros(shape, device=module.weight.device, dtype=torch.float32))
        module.criterion = self
        if self.group is not None:
            self.group.add(module)

    # -- what the threshold is computed on -----------------------------------------------------
    def source(self, module) -> torch.Tensor:
        """The tensor whose changes invalidate the threshold."""
        return module.scores if self.uses_scores else module.weight

    def selection_values(self, module) -> torch.Tensor:
        return self.source(module).detach()

    def keep_of(self, module) -> float:
        return float(module.keep)

    # -- masks ---------------------------------------------------------------------------------
    def keep_tensor(self, module) -> torch.Tensor:
        """Bool tensor (shape of ``selection_values``) of what is kept."""
        return self.selection_values(module) >= self.group.threshold(module)

    def needs_gradient(self, module) -> bool:
        return self.uses_scores and torch.is_grad_enabled() and module.scores.requires_grad

    def mask(self, module):
        """The mask ``masked_linear`` uses in this forward."""
        keep = self.keep_tensor(module)
        if self.needs_gradient(module):
            return _straight_through(module.scores, keep, module.weight.dtype)
        return self.fixed_mask(module, keep)

    def fixed_mask(self, module, keep: Optional[torch.Tensor] = None):
        """The mask without gradient: bool tensor, or a BlockMask when the layer has a block size."""
        keep = self.keep_tensor(module) if keep is None else keep
        if module.block_size is not None:
            return BlockMask.from_dense(keep, module.block_size)
        return keep


class Magnitude(Criterion):
    """Keep the ``keep`` fraction of weights with the largest |W| per matrix (no scores)."""

    name = "magnitude"
    uses_scores = False

    def selection_values(self, module) -> torch.Tensor:
        return module.weight.detach().abs()


class Movement(Criterion):
    """Keep the ``keep`` fraction of highest scores (per matrix, or globally); scores learn
    ``dL/dS = (dL/dW') * W`` through the straight-through estimator."""

    name = "movement"


class SoftMovement(Criterion):
    """``mask = sigmoid(S) > tau`` with one global ``tau`` (no kept fraction is set directly), and
    a floor: a matrix keeps at least its top 0.5% of scores. Add :meth:`regularization` (the L1
    term) to the loss."""

    name = "soft-movement"
    topk = True  # only for the floor

    def __init__(self, *, method: str = "auto"):
        super().__init__(scope="matrix", method=method)
        self.tau = 0.0

    def keep_of(self, module) -> float:
        return SOFT_MOVEMENT_FLOOR  # the floor's top-k

    def set_tau(self, tau: float) -> None:
        if not (0.0 <= tau < 1.0):
            raise ValueError(f"tau must be in [0, 1), got {tau}")
        self.tau = float(tau)

    def keep_tensor(self, module) -> torch.Tensor:
        s = module.scores.detach()
        if self.tau <= 0.0:
            above = torch.ones_like(s, dtype=torch.bool)  # sigmoid(S) > 0 always
        else:
            above = s > math.log(self.tau / (1.0 - self.tau))  # sigmoid(S) > tau
        # The floor without a host sync: when fewer than ~0.5% survive, the top 0.5% are added
        # (when more survive they already contain the top 0.5%).
        return above | (s >= self.group.threshold(module))

    def regularization(self, modules: Sequence[torch.nn.Module]) -> torch.Tensor:
        """Mean over matrices of mean(sigmoid(S)): the L1 term (differentiable in S)."""
        terms = [torch.sigmoid(m.scores).mean() for m in modules]
        return torch.stack(terms).mean()


class BlockMovement(Criterion):
    """Movement pruning with one score per ``block_size`` x ``block_size`` block: whole blocks are
    kept or pruned, so the pruned model runs on the block-sparse kernels."""

    name = "block-movement"

    def __init__(self, block_size: int = 32, *, scope: str = "matrix", method: str = "auto"):
        from capkit.ops import BLOCK_SIZES

        if block_size not in BLOCK_SIZES:
            raise ValueError(f"block_size must be one of {BLOCK_SIZES}, got {block_size}")
        super().__init__(scope=scope, method=method)
        self.block_size = block_size

    def score_shape(self, module) -> Tuple[int, int]:
        b = self.block_size
        return (-(-module.out_features // b), -(-module.in_features // b))

    def attach(self, module) -> None:
        super().attach(module)
        module.block_size = self.block_size

    def _expand(self, grid: torch.Tensor, module) -> torch.Tensor:
        b = self.block_size
        return grid.repeat_interleave(b, 0)[: module.out_features].repeat_interleave(b, 1)[:, : module.in_features]

    def mask(self, module):
        keep = self.keep_tensor(module)  # block grid
        if self.needs_gradient(module):
            # repeat_interleave's backward sums each block's gradient into its score.
            return self._expand(_straight_through(module.scores, keep, module.weight.dtype), module)
        return self.fixed_mask(module, keep)

    def fixed_mask(self, module, keep: Optional[torch.Tensor] = None):
        grid = self.keep_tensor(module) if keep is None else keep
        return BlockMask.from_block_grid(grid, self.block_size, (module.out_features, module.in_features))


class NMMovement(Criterion):
    """N:M (2:4 by default) masks from scores: in every group of ``m`` inputs the ``n`` highest
    scores are kept; straight-through gradient to the scores."""

    name = "nm-movement"
    topk = False

    def __init__(self, n: int = 2, m: int = 4):
        if not (0 < n < m):
            raise ValueError(f"N:M pattern needs 0 < n < m, got n={n}, m={m}")
        super().__init__()
        self.n, self.m = n, m

    def attach(self, module) -> None:
        if module.in_features % self.m != 0:
            raise ValueError(
                f"an {self.n}:{self.m} pattern needs in_features to be a multiple of {self.m}, got {module.in_features}"
            )
        super().attach(module)

    def keep_tensor(self, module) -> torch.Tensor:
        return NMMask.from_scores(self.selection_values(module), self.n, self.m).mask

    def fixed_mask(self, module, keep: Optional[torch.Tensor] = None):
        keep = self.keep_tensor(module) if keep is None else keep
        return NMMask(keep, self.n, self.m)


class NMMagnitude(NMMovement):
    """N:M masks from |W| (one-shot 2:4 magnitude pruning; no scores)."""

    name = "nm-magnitude"
    uses_scores = False

    def selection_values(self, module) -> torch.Tensor:
        return module.weight.detach().abs()


CRITERIA = {
    c.name: c for c in (Magnitude, Movement, SoftMovement, BlockMovement, NMMovement, NMMagnitude)
}


def make_criterion(name: str, **options) -> Criterion:
    """A criterion by name (``magnitude``, ``movement``, ``soft-movement``, ``block-movement``,
    ``nm-movement``, ``nm-magnitude``) with its options."""
    key = name.replace("_", "-").lower()
    if key not in CRITERIA:
        raise ValueError(f"unknown pruning criterion {name!r}; choose one of {', '.join(CRITERIA)}")
    return CRITERIA[key](**options)


def kept_fraction(module) -> float:
    """Fraction of the layer's weights its current mask keeps."""
    return float((module.dense_mask() != 0).float().mean())

