"""Fused ops of capkit, each a ``torch.autograd.Function`` behind a backend dispatch."""
from capkit.ops._backends import BACKENDS, backend_status, choose_backend
from capkit.ops.info_nce import info_nce, info_nce_reference
from capkit.ops.masked_linear import masked_linear
from capkit.ops.masks import (
    BLOCK_SIZES,
    BlockLayout,
    BlockMask,
    NMMask,
    block_grid_to_layout,
    block_mask_to_layout,
)

__all__ = [
    "BACKENDS",
    "BLOCK_SIZES",
    "BlockLayout",
    "BlockMask",
    "NMMask",
    "backend_status",
    "block_grid_to_layout",
    "block_mask_to_layout",
    "choose_backend",
    "info_nce",
    "info_nce_reference",
    "masked_linear",
]
