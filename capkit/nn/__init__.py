"""Modules built on capkit's ops."""
from capkit.nn.masked_linear import MaskedLinear

__all__ = ["MaskedLinear"]
