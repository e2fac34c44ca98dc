"""Loads the compiled extension ``capkit._C`` once; capkit works without it (with a warning)."""
from __future__ import annotations

import functools
import warnings
from typing import Optional


@functools.lru_cache(maxsize=None)
def load_extension():
    """Return the ``capkit._C`` module, or None (after one warning) when it cannot be imported."""
    import torch  # noqa: F401  (the extension links against libtorch, which torch loads)

    try:
        from capkit import _C  # type: ignore[attr-defined]
    except ImportError as exc:
        warnings.warn(
            f"capkit's compiled extension is not available ({exc}); the 'cpu' and 'cuda' backends are "
            "disabled and capkit falls back to its PyTorch reference. Reinstall with "
            "`pip install --no-build-isolation .` to build it.",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
    _register_fake_kernels()
    return _C


def _register_fake_kernels() -> None:
    """Output shapes of the C++ ops that models call directly, for torch.compile and torch.export."""
    import torch

    def attention(q, k, v, mask, scale):  # capkit::attention_forward -> [B, Sq, H, D]
        return q.new_empty((q.shape[0], q.shape[2], q.shape[1], q.shape[3]))

    def encoder_layer(x, mask, heads, scale, *weights_and_norms):  # capkit::encoder_layer_forward -> x's shape
        return x.new_empty(x.shape)

    if hasattr(torch.ops.capkit, "attention_forward"):
        torch.library.register_fake("capkit::attention_forward")(attention)
    if hasattr(torch.ops.capkit, "encoder_layer_forward"):
        torch.library.register_fake("capkit::encoder_layer_forward")(encoder_layer)


@functools.lru_cache(maxsize=None)
def extension_error() -> Optional[str]:
    try:
        from capkit import _C  # noqa: F401
    except ImportError as exc:
        return str(exc)
    return None


def build_info() -> dict:
    ext = load_extension()
    return dict(ext.build_info()) if ext is not None else {}
