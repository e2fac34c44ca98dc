"""Modules built on capkit's ops."""
from capkit.nn.info_nce import InfoNCE
from capkit.nn.masked_linear import MaskedLinear

__all__ = ["InfoNCE", "MaskedLinear"]
