"""The cubic sparsity schedule of movement pruning, as a small object that saves and restores."""
from __future__ import annotations

from dataclasses import asdict, dataclass
__all__ = ["CubicSchedule"]


@dataclass
class CubicSchedule:
    """A value (kept fraction for top-k criteria, ``tau`` for soft movement) that stays at
    ``initial`` for the first ``initial_warmup * warmup_steps`` steps, at ``final`` for the last
    ``final_warmup * warmup_steps`` steps, and in between follows
    ``final + (initial - final) * (1 - progress)**3``.

    ``reg_lambda`` (soft movement's L1 weight at the end) follows the same curve:
    ``lambda_t = reg_lambda * value_t / final``.
    """

    initial: float
    final: float
    total_steps: int
    warmup_steps: int
    initial_warmup: float = 1.0
    final_warmup: float = 2.0
    reg_lambda: float = 0.0

    def __post_init__(self):
        for name in ("total_steps", "warmup_steps"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {v!r}")
        for name in ("initial_warmup", "final_warmup"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.total_steps <= self.ramp_start or self.ramp_end <= self.ramp_start:
            raise ValueError(
                f"total_steps ({self.total_steps}) must exceed (initial_warmup + final_warmup) * "
                f"warmup_steps = ({self.initial_warmup} + {self.final_warmup}) * {self.warmup_steps} "
                f"so that the schedule has room to ramp; lower warmup_steps or the warm-up multiples"
            )

    @property
    def ramp_start(self) -> float:
        return self.initial_warmup * self.warmup_steps

    @property
    def ramp_end(self) -> float:
        return self.total_steps - self.final_warmup * self.warmup_steps

    def value(self, step: int) -> float:
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        if step <= self.ramp_start:
            return self.initial
        if step > self.ramp_end:
            return self.final
        remaining = 1.0 - (step - self.ramp_start) / (self.ramp_end - self.ramp_start)
        return self.final + (self.initial - self.final) * remaining ** 3

    def regularization_weight(self, step: int) -> float:
        if self.reg_lambda == 0.0:
            return 0.0
        if self.final == 0:
            raise ValueError("reg_lambda needs a non-zero final value to scale by")
        return self.reg_lambda * self.value(step) / self.final

    def state_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_state_dict(cls, state: dict) -> "CubicSchedule":
        return cls(**state)
