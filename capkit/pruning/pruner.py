"""``Pruner``: unstructured / semi-structured pruning of a BERT-family model in one object.

    pruner = Pruner(model, "movement", schedule=CubicSchedule(1.0, 0.1, total_steps, warmup))
    for step, batch in enumerate(loader):
        pruner.step(step)                    # kept fraction (or tau) for this step
        loss = task_loss(model(batch)) + pruner.regularization()
        ...
    pruner.finalize()                        # fixed masks, scores dropped: ready to export
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Union

import torch
from torch import nn

from capkit.nn import MaskedLinear, masked_modules, patch_model
from capkit.pruning.criteria import Criterion, SoftMovement, kept_fraction, make_criterion
from capkit.pruning.schedule import CubicSchedule

__all__ = ["Pruner"]


class Pruner:
    """Patches ``model`` (the six encoder linears of every layer, or ``targets``) and drives their
    masks with one criterion.

    method: ``magnitude``, ``movement``, ``soft-movement``, ``block-movement``, ``nm-movement``
    (2:4 from scores) or ``nm-magnitude`` (2:4 from |W|).
    schedule: a :class:`CubicSchedule` of the kept fraction (top-k methods) or of ``tau`` (soft
    movement, with its ``reg_lambda``); ``None`` keeps ``keep`` fixed (top-k) / ``tau`` = 0.
    scope: ``"matrix"`` (each matrix keeps its fraction) or ``"global"`` (one threshold for all).
    """

    def __init__(
        self,
        model: nn.Module,
        method: str = "movement",
        *,
        schedule: Optional[CubicSchedule] = None,
        keep: float = 1.0,
        targets: Union[str, Iterable[str]] = "all",
        scope: str = "matrix",
        block_size: int = 32,
        nm: tuple = (2, 4),
        selection: str = "auto",
        backend: str = "auto",
    ):
        if not (0.0 < keep <= 1.0):
            raise ValueError(f"keep must be in (0, 1], got {keep}")
        options: Dict[str, object] = {}
        key = method.replace("_", "-").lower()
        if key in ("magnitude", "movement", "block-movement"):
            options.update(scope=scope, method=selection)
        elif key == "soft-movement":
            options.update(method=selection)
        elif key in ("nm-movement", "nm-magnitude"):
            options.update(n=nm[0], m=nm[1])
        if key == "block-movement":
            options["block_size"] = block_size
        self.criterion: Criterion = make_criterion(method, **options)
        self.method = self.criterion.name
        if schedule is not None and not isinstance(schedule, CubicSchedule):
            raise TypeError(f"schedule must be a CubicSchedule or None, got {type(schedule).__name__}")
        if schedule is not None and isinstance(self.criterion, SoftMovement):
            if not (0.0 <= schedule.initial < 1.0 and 0.0 <= schedule.final < 1.0):
                raise ValueError("a soft-movement schedule runs tau within [0, 1)")
        elif schedule is not None and not (0.0 < schedule.final <= 1.0 and 0.0 < schedule.initial <= 1.0):
            raise ValueError(f"a {self.method} schedule runs the kept fraction within (0, 1], got "
                             f"{schedule.initial} -> {schedule.final}")
        self.schedule = schedule
        self.model = model
        patch_model(model, targets, backend=backend)
        self.modules: Dict[str, MaskedLinear] = masked_modules(model)
        if not self.modules:
            raise ValueError("no encoder linear was patched; check targets")
        for module in self.modules.values():
            self.criterion.attach(module)
        self.current_step = 0
        self._fixed_keep = keep
        self._apply(self._value(0))

    # -- schedule ------------------------------------------------------------------------------
    def _value(self, step: int) -> float:
        if self.schedule is not None:
            return self.schedule.value(step)
        return 0.0 if isinstance(self.criterion, SoftMovement) else self._fixed_keep

    def _apply(self, value: float) -> None:
        if isinstance(self.criterion, SoftMovement):
            self.criterion.set_tau(value)
        else:
            for m in self.modules.values():
                m.set_keep(value)

    def step(self, step: int) -> float:
        """Set the kept fraction (or tau) for optimisation step ``step``; returns it."""
        self.current_step = int(step)
        value = self._value(self.current_step)
        self._apply(value)
        return value

    def regularization(self) -> torch.Tensor:
        """Soft movement's ``lambda_t * mean_matrices(mean(sigmoid(S)))``; 0 for other methods."""
        if not isinstance(self.criterion, SoftMovement) or self.schedule is None:
            return torch.zeros((), device=next(iter(self.modules.values())).weight.device)
        weight = self.schedule.regularization_weight(self.current_step)
        return weight * self.criterion.regularization(list(self.modules.values()))

    # -- parameters ----------------------------------------------------------------------------
    def score_parameters(self) -> List[nn.Parameter]:
        """The learnable scores (give them their own learning rate and no weight decay)."""
        return [m.scores for m in self.modules.values() if m.scores is not None]

    def score_names(self) -> List[str]:
        return [f"{name}.scores" for name, m in self.modules.items() if m.scores is not None]

    # -- inspection ----------------------------------------------------------------------------
    def densities(self) -> Dict[str, float]:
        """Fraction of weights kept per patched matrix."""
        return {name: kept_fraction(m) for name, m in self.modules.items()}

    def density(self) -> float:
        """Fraction of weights kept over all patched matrices together."""
        kept = total = 0
        for m in self.modules.values():
            n = m.weight.numel()
            kept += kept_fraction(m) * n
            total += n
        return kept / total

    # -- state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Method, schedule and step (the scores live in the model's own state_dict)."""
        return {
            "method": self.method,
            "step": self.current_step,
            "keep": self._fixed_keep,
            "schedule": None if self.schedule is None else self.schedule.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("method") != self.method:
            raise ValueError(f"pruner state is for method {state.get('method')!r}, this pruner runs {self.method!r}")
        self.schedule = None if state["schedule"] is None else CubicSchedule.from_state_dict(state["schedule"])
        self._fixed_keep = state["keep"]
        self.step(state["step"])

    @torch.no_grad()
    def finalize(self) -> Dict[str, MaskedLinear]:
        """Freeze the current masks (bool, BlockMask or NMMask) into the layers, drop the scores
        and the criterion; the model is then ready for :func:`capkit.export.save`."""
        fixed_masks = [self.criterion.fixed_mask(m) for m in self.modules.values()]
        for m, fixed in zip(self.modules.values(), fixed_masks):
            m.criterion = None
            m.scores = None
            m.set_mask(fixed)
        return self.modules
