"""capkit: contrastive pruning of pre-trained language models, with sparse kernels that make
the pruned models really smaller and faster."""
from capkit._version import __version__

__all__ = ["__version__", "ops", "nn"]


def __getattr__(name):
    # Submodules load on first use so `import capkit` stays light.
    if name in ("ops", "nn"):
        import importlib

        return importlib.import_module(f"capkit.{name}")
    raise AttributeError(f"module 'capkit' has no attribute {name!r}")
