"""capkit: contrastive pruning of pre-trained language models, with sparse kernels that make
the pruned models really smaller and faster."""
from capkit._version import __version__

__all__ = ["__version__", "ops", "nn", "pruning", "export", "load", "sparsity_report", "tune_cpu_allocator"]


def __getattr__(name):
    # Submodules load on first use so `import capkit` stays light.
    import importlib

    if name in ("ops", "nn", "pruning", "export"):
        return importlib.import_module(f"capkit.{name}")
    if name == "load":
        return importlib.import_module("capkit.export").load
    if name == "tune_cpu_allocator":
        return importlib.import_module("capkit.runtime").tune_cpu_allocator
    if name == "sparsity_report":
        return importlib.import_module("capkit.pruning.report").sparsity_report
    raise AttributeError(f"module 'capkit' has no attribute {name!r}")
