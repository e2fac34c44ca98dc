"""The CAP pruning loop: data, memory banks, losses, the trainer and its report.

``capkit.cap.run(CAPConfig(...))`` is what ``capkit-prune`` runs."""
from capkit.cap.config import METHODS, CAPConfig, ConfigError


def run(cfg: CAPConfig) -> dict:
    """Run CAP as configured (see :class:`CAPConfig`); returns the report."""
    from capkit.cap.trainer import run as _run

    return _run(cfg)


__all__ = ["METHODS", "CAPConfig", "ConfigError", "run"]
