"""Mask kinds understood by :func:`capkit.ops.masked_linear`.

* a dense mask tensor of the weight's shape (bool, uint8 or floating point);
* :class:`BlockMask`: a block layout (square blocks of 16/32/64/128) listing the live blocks of
  every block row (CSR) and block column (CSC), optionally with an element mask inside the live
  blocks. Kernels skip dead blocks entirely;
* :class:`NMMask`: an N:M pattern (2:4 by default) along the input dimension.

All conversions run on the mask's own device with torch ops (no host round trip except the
size of the live-block list, which a compaction needs).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Tuple

import torch

BLOCK_SIZES = (16, 32, 64, 128)

__all__ = [
    "BLOCK_SIZES",
    "BlockLayout",
    "BlockMask",
    "NMMask",
    "block_grid_to_layout",
    "block_mask_to_layout",
    "check_dense_mask",
]


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def check_dense_mask(mask: torch.Tensor, weight_shape: Tuple[int, int], name: str = "mask") -> None:
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, BlockMask or NMMask, got {type(mask).__name__}")
    if tuple(mask.shape) != tuple(weight_shape):
        raise ValueError(f"{name} must have the weight's shape {tuple(weight_shape)}, got {tuple(mask.shape)}")
    if not (mask.dtype in (torch.bool, torch.uint8) or mask.dtype.is_floating_point):
        raise TypeError(f"{name} must be bool, uint8 or floating point, got {mask.dtype}")


@dataclass
class BlockLayout:
    """Live blocks of a ``[N, K]`` weight's block grid ``[ceil(N/b), ceil(K/b)]``.

    ``row_ptr``/``col_idx`` is the CSR of the grid (live block columns of each block row, ascending),
    ``col_ptr``/``row_idx`` its CSC. All int32, on the weight's device.
    """

    shape: Tuple[int, int]
    block_size: int
    row_ptr: torch.Tensor
    col_idx: torch.Tensor
    col_ptr: torch.Tensor
    row_idx: torch.Tensor
    # set once :meth:`check` passed (layouts built by block_grid_to_layout are right by construction)
    checked: bool = field(default=False, repr=False, compare=False)

    def check(self) -> "BlockLayout":
        """Raise ValueError unless the lists describe one valid block grid; the kernels index
        with them unchecked, so a hand-made layout is checked once, before its first use."""
        if self.checked:
            return self
        _check_block_size(self.block_size)
        if len(self.shape) != 2 or any(int(d) < 0 for d in self.shape):
            raise ValueError(f"layout shape must be two sizes >= 0, got {self.shape}")
        nbr, nbc = self.grid_shape
        lists = {"row_ptr": self.row_ptr, "col_idx": self.col_idx, "col_ptr": self.col_ptr, "row_idx": self.row_idx}
        for name, t in lists.items():
            if not isinstance(t, torch.Tensor) or t.dtype != torch.int32 or t.dim() != 1:
                got = f"{t.dtype} with {t.dim()} dims" if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"layout {name} must be a 1-D int32 tensor, got {got}")
            if t.device != self.row_ptr.device:
                raise ValueError(f"layout {name} is on {t.device} but row_ptr is on {self.row_ptr.device}")
        for ptr, idx, n_ptr, n_idx, bound in (("row_ptr", "col_idx", nbr, "columns", nbc),
                                              ("col_ptr", "row_idx", nbc, "rows", nbr)):
            p, i = lists[ptr], lists[idx]
            if p.numel() != n_ptr + 1:
                raise ValueError(f"layout {ptr} must have {n_ptr + 1} entries for a {nbr}x{nbc} block grid, "
                                 f"got {p.numel()}")
            if int(p[0]) != 0 or int(p[-1]) != i.numel() or bool((p[1:] < p[:-1]).any()):
                raise ValueError(f"layout {ptr} must rise from 0 to len({idx}) = {i.numel()}")
            if i.numel() and (int(i.min()) < 0 or int(i.max()) >= bound):
                raise ValueError(f"layout {idx} must hold block {n_idx} in [0, {bound})")
        if self.col_idx.numel() != self.row_idx.numel():
            raise ValueError(f"layout col_idx and row_idx list {self.col_idx.numel()} and {self.row_idx.numel()} "
                             f"blocks: they must describe the same blocks")
        rebuilt = block_grid_to_layout(self.block_grid(), self.block_size, self.shape)
        if not all(torch.equal(a, b) for a, b in zip(lists.values(), (rebuilt.row_ptr, rebuilt.col_idx,
                                                                      rebuilt.col_ptr, rebuilt.row_idx))):
            raise ValueError("layout CSR and CSC lists must describe the same live blocks, each once, "
                             "in ascending order")
        self.checked = True
        return self

    @property
    def grid_shape(self) -> Tuple[int, int]:
        return (_cdiv(self.shape[0], self.block_size), _cdiv(self.shape[1], self.block_size))

    @property
    def nnz_blocks(self) -> int:
        return int(self.col_idx.numel())

    @property
    def block_density(self) -> float:
        nbr, nbc = self.grid_shape
        return self.nnz_blocks / max(1, nbr * nbc)

    @property
    def device(self) -> torch.device:
        return self.row_ptr.device

    def block_grid(self) -> torch.Tensor:
        """Boolean ``[nbr, nbc]`` grid of live blocks."""
        nbr, nbc = self.grid_shape
        grid = torch.zeros(nbr, nbc, dtype=torch.bool, device=self.device)
        counts = (self.row_ptr[1:] - self.row_ptr[:-1]).long()
        rows = torch.repeat_interleave(torch.arange(nbr, device=self.device), counts)
        grid[rows, self.col_idx.long()] = True
        return grid

    def dense_mask(self) -> torch.Tensor:
        """Boolean ``[N, K]`` mask that is true inside live blocks."""
        b = self.block_size
        grid = self.block_grid()
        full = grid.repeat_interleave(b, 0).repeat_interleave(b, 1)
        return full[: self.shape[0], : self.shape[1]].contiguous()

    def to(self, device) -> "BlockLayout":
        return BlockLayout(
            self.shape,
            self.block_size,
            *(t.to(device) for t in (self.row_ptr, self.col_idx, self.col_ptr, self.row_idx)),
            checked=self.checked,
        )


def _check_block_size(block_size: int) -> None:
    if block_size not in BLOCK_SIZES:
        raise ValueError(f"block_size must be one of {BLOCK_SIZES}, got {block_size!r}")


def block_grid_to_layout(grid: torch.Tensor, block_size: int, shape: Tuple[int, int]) -> BlockLayout:
    """Build the CSR/CSC block lists from a boolean grid of live blocks (on the grid's device)."""
    _check_block_size(block_size)
    shape = (int(shape[0]), int(shape[1]))
    expected = (_cdiv(shape[0], block_size), _cdiv(shape[1], block_size))
    if grid.dim() != 2 or tuple(grid.shape) != expected:
        raise ValueError(
            f"grid must have shape {expected} for a weight of shape {shape} and block_size {block_size}, "
            f"got {tuple(grid.shape)}"
        )
    grid = grid.to(torch.bool)
    dev = grid.device
    zero = torch.zeros(1, dtype=torch.int32, device=dev)
    # nonzero() lists (row, col) in row-major order: the CSR order; on the transpose, the CSC order.
    rc = grid.nonzero()
    cr = grid.t().nonzero()
    row_ptr = torch.cat([zero, grid.sum(1, dtype=torch.int32).cumsum(0, dtype=torch.int32)])
    col_ptr = torch.cat([zero, grid.sum(0, dtype=torch.int32).cumsum(0, dtype=torch.int32)])
    return BlockLayout(
        shape,
        block_size,
        row_ptr.contiguous(),
        rc[:, 1].to(torch.int32).contiguous(),
        col_ptr.contiguous(),
        cr[:, 1].to(torch.int32).contiguous(),
        checked=True,
    )


def _block_counts(mask: torch.Tensor, block_size: int) -> torch.Tensor:
    """Number of nonzeros in every block of ``mask`` (one reduction, on the mask's device)."""
    n, k = mask.shape
    nbr, nbc = _cdiv(n, block_size), _cdiv(k, block_size)
    # A bool mask is read as bytes (no comparison pass); other masks are compared with zero.
    m = mask.view(torch.uint8) if mask.dtype == torch.bool else (mask != 0).view(torch.uint8)
    if nbr * block_size != n or nbc * block_size != k:
        m = torch.nn.functional.pad(m, (0, nbc * block_size - k, 0, nbr * block_size - n))
    return m.reshape(nbr, block_size, nbc, block_size).sum(dim=(1, 3), dtype=torch.int32)


def _block_capacity(shape: Tuple[int, int], block_size: int, device) -> torch.Tensor:
    """Number of weight elements in every block (edge blocks are partial)."""
    n, k = shape
    rows = torch.full((_cdiv(n, block_size),), block_size, dtype=torch.int32, device=device)
    cols = torch.full((_cdiv(k, block_size),), block_size, dtype=torch.int32, device=device)
    rows[-1] = n - (rows.numel() - 1) * block_size
    cols[-1] = k - (cols.numel() - 1) * block_size
    return rows[:, None] * cols[None, :]


def block_mask_to_layout(mask: torch.Tensor, block_size: int) -> BlockLayout:
    """Layout of the blocks of ``mask`` that hold at least one nonzero (computed on mask's device)."""
    _check_block_size(block_size)
    if mask.dim() != 2:
        raise ValueError(f"mask must be 2-D, got shape {tuple(mask.shape)}")
    return block_grid_to_layout(_block_counts(mask, block_size) > 0, block_size, tuple(mask.shape))


class BlockMask:
    """A block-sparse mask: a :class:`BlockLayout` plus an optional element mask.

    Without an element mask every element of a live block is kept (pure block sparsity, the
    fastest case). With one, the element mask applies inside live blocks and dead blocks are
    skipped; a floating element mask that requires grad receives the straight-through gradient.
    """

    def __init__(self, layout: BlockLayout, mask: Optional[torch.Tensor] = None):
        if not isinstance(layout, BlockLayout):
            raise TypeError(f"layout must be a BlockLayout, got {type(layout).__name__}")
        layout.check()
        if mask is not None:
            check_dense_mask(mask, layout.shape)
            if mask.device != layout.device:
                raise ValueError(f"mask is on {mask.device} but the layout is on {layout.device}")
        self.layout = layout
        self.mask = mask

    @classmethod
    def from_dense(cls, mask: torch.Tensor, block_size: int, keep_element_mask: Optional[bool] = None) -> "BlockMask":
        """Block layout of a dense mask. ``keep_element_mask=None`` keeps the element mask only if
        some live block is not entirely kept (or the mask needs a gradient)."""
        if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
            raise ValueError("mask must be a 2-D tensor")
        check_dense_mask(mask, tuple(mask.shape))
        _check_block_size(block_size)
        counts = _block_counts(mask.detach(), block_size)
        layout = block_grid_to_layout(counts > 0, block_size, tuple(mask.shape))
        if keep_element_mask is None:
            # The element mask is needed unless every live block is entirely kept.
            partial = (counts > 0) & (counts < _block_capacity(tuple(mask.shape), block_size, mask.device))
            keep_element_mask = bool(mask.requires_grad) or bool(partial.any())
            if not keep_element_mask and mask.dtype.is_floating_point:
                keep_element_mask = not bool(((mask == 0) | (mask == 1)).all())  # non-binary factors
        return cls(layout, mask if keep_element_mask else None)

    @classmethod
    def from_block_grid(cls, grid: torch.Tensor, block_size: int, shape: Tuple[int, int]) -> "BlockMask":
        return cls(block_grid_to_layout(grid, block_size, shape))

    @property
    def shape(self) -> Tuple[int, int]:
        return self.layout.shape

    @property
    def block_size(self) -> int:
        return self.layout.block_size

    @property
    def device(self) -> torch.device:
        return self.layout.device

    def to_dense(self) -> torch.Tensor:
        """The effective mask as a dense tensor (bool unless the element mask is floating)."""
        dense = self.layout.dense_mask()
        if self.mask is None:
            return dense
        if self.mask.dtype.is_floating_point:
            return self.mask * dense.to(self.mask.dtype)
        return (self.mask != 0) & dense

    def density(self) -> float:
        return float((self.to_dense() != 0).float().mean()) if self.mask is not None else self.layout.block_density

    def __repr__(self) -> str:
        return (
            f"BlockMask(shape={self.shape}, block_size={self.block_size}, "
            f"live_blocks={self.layout.nnz_blocks}, element_mask={self.mask is not None})"
        )


class NMMask:
    """N:M structured sparsity along the input dimension: in every group of ``m`` consecutive
    inputs of a row at most ``n`` weights are kept (2:4 by default)."""

    def __init__(self, mask: torch.Tensor, n: int = 2, m: int = 4):
        if not (0 < n < m):
            raise ValueError(f"N:M pattern needs 0 < n < m, got n={n}, m={m}")
        if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
            raise ValueError("mask must be a 2-D tensor")
        if mask.shape[1] % m != 0:
            raise ValueError(f"an {n}:{m} mask needs the input dimension ({mask.shape[1]}) to be a multiple of {m}")
        counts = (mask != 0).view(mask.shape[0], -1, m).sum(-1)
        if bool((counts > n).any()):
            raise ValueError(f"mask is not {n}:{m} sparse: some group of {m} keeps more than {n} weights")
        self.mask = mask
        self.n, self.m = n, m

    @classmethod
    def from_scores(cls, scores: torch.Tensor, n: int = 2, m: int = 4) -> "NMMask":
        """Keep the ``n`` highest scores of every group of ``m`` (ties broken by position)."""
        if scores.dim() != 2 or scores.shape[1] % m != 0:
            raise ValueError(f"scores must be 2-D with the input dimension a multiple of {m}, got {tuple(scores.shape)}")
        groups = scores.detach().reshape(scores.shape[0], -1, m)
        top = groups.topk(n, dim=-1).indices
        keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, top, True)
        return cls(keep.view_as(scores), n, m)

    @property
    def shape(self) -> Tuple[int, int]:
        return tuple(self.mask.shape)

    def to_dense(self) -> torch.Tensor:
        return self.mask

    def density(self) -> float:
        return float((self.mask != 0).float().mean())

    def __repr__(self) -> str:
        return f"NMMask({self.n}:{self.m}, shape={self.shape})"
