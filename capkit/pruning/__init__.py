"""Pruning: what to prune (criteria, schedules, structured importance) and turning the result
into a smaller, faster model (compaction, export).

Names load from their submodules on first use, so importing one part does not import the rest.
"""
import importlib

_EXPORTS = {
    "compact": ["compact_model", "shrink_to_structure", "structure_of"],
    "criteria": ["CRITERIA", "BlockMovement", "Criterion", "Magnitude", "Movement", "NMMagnitude",
                 "NMMovement", "SoftMovement", "ThresholdGroup", "kept_fraction", "make_criterion"],
    "pruner": ["Pruner"],
    "report": ["SparsityReport", "sparsity_report"],
    "schedule": ["CubicSchedule"],
    "structured": ["StructuredMasks", "compute_importance", "iterative_fractions", "prune_step"],
    "topk": ["global_topk_threshold", "kept_count", "kth_largest", "topk_thresholds"],
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_WHERE)


def __getattr__(name):
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'capkit.pruning' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"capkit.pruning.{module}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
