"""Modules built on capkit's ops, and the patching of transformers encoders."""
from capkit.nn.attention import cpu_attention, use_cpu_attention
from capkit.nn.fuse import GeluIntermediate, ResidualOutput, fuse_for_inference
from capkit.nn.fast_layer import use_fast_layers
from capkit.nn.info_nce import InfoNCE
from capkit.nn.masked_linear import MaskedLinear, prepared_masks
from capkit.nn.patch import (
    ROLES,
    UnsupportedModelError,
    encoder_layers,
    masked_modules,
    patch_model,
    unpatch,
)

__all__ = [
    "GeluIntermediate",
    "InfoNCE",
    "MaskedLinear",
    "ResidualOutput",
    "ROLES",
    "UnsupportedModelError",
    "cpu_attention",
    "encoder_layers",
    "fuse_for_inference",
    "masked_modules",
    "patch_model",
    "prepared_masks",
    "unpatch",
    "use_cpu_attention",
    "use_fast_layers",
]
