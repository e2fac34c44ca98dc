"""capkit's Triton kernels, installed as ``capkit.kernels``.

In a checkout, this folder is also reachable as a top-level package named ``kernels`` whenever
the repository root is on ``sys.path`` (``python -m ...`` or pytest started there). That name
belongs to the Hugging Face ``kernels`` distribution, which ``transformers`` (5.x) imports
when it is installed. Imported under that name, this module hands ``sys.modules["kernels"]``
to the installed distribution (the import system returns whatever that entry holds once this
file has run), or fails as a missing module would, so ``transformers`` works from a checkout.
"""

if __name__ == "kernels":
    import importlib.machinery as _machinery
    import importlib.util as _util
    import os as _os
    import sys as _sys

    def _load_distribution():
        root = _os.path.realpath(_os.path.dirname(_os.path.dirname(_os.path.abspath(__file__))))
        for entry in _sys.path:
            try:
                if _os.path.realpath(_os.path.abspath(entry or _os.getcwd())) == root:
                    continue
            except (OSError, TypeError, ValueError):
                continue
            spec = _machinery.PathFinder.find_spec("kernels", [entry])
            if spec is not None and spec.loader is not None:
                return spec
        return None

    # (on an error below, the import system removes sys.modules["kernels"] whichever module it holds)
    _spec = _load_distribution()
    if _spec is None:
        raise ModuleNotFoundError(
            "No module named 'kernels' (the repository's kernels/ folder is capkit.kernels, not a "
            "top-level package)", name="kernels")
    _module = _util.module_from_spec(_spec)
    _sys.modules["kernels"] = _module
    _spec.loader.exec_module(_module)
