"""Mask kinds: block layouts from dense masks and grids, N:M masks."""
import pytest
import torch

from capkit.ops import BlockMask, NMMask, block_grid_to_layout, block_mask_to_layout


def brute_force_layout(mask, b):
    n, k = mask.shape
    nbr, nbc = -(-n // b), -(-k // b)
    rows, cols = [], []
    for r in range(nbr):
        for c in range(nbc):
            if mask[r * b:(r + 1) * b, c * b:(c + 1) * b].any():
                rows.append(r)
                cols.append(c)
    row_ptr = [0]
    for r in range(nbr):
        row_ptr.append(row_ptr[-1] + rows.count(r))
    csc = sorted(zip(cols, rows))
    col_ptr = [0]
    for c in range(nbc):
        col_ptr.append(col_ptr[-1] + cols.count(c))
    return row_ptr, cols, col_ptr, [r for _, r in csc]


@pytest.mark.parametrize("shape", [(1, 1), (7, 127), (127, 769), (64, 64), (100, 37)])
@pytest.mark.parametrize("b", [16, 32, 64, 128])
def test_layout_matches_brute_force(shape, b):
    # Sparse enough that whole blocks die, with odd edges.
    mask = torch.rand(*shape) > 0.995
    layout = block_mask_to_layout(mask, b)
    row_ptr, col_idx, col_ptr, row_idx = brute_force_layout(mask, b)
    assert layout.row_ptr.tolist() == row_ptr
    assert layout.col_idx.tolist() == col_idx
    assert layout.col_ptr.tolist() == col_ptr
    assert layout.row_idx.tolist() == row_idx
    for t in (layout.row_ptr, layout.col_idx, layout.col_ptr, layout.row_idx):
        assert t.dtype == torch.int32 and t.is_contiguous()
    # The dense mask of the layout covers the mask.
    assert bool((layout.dense_mask() | ~mask).all())


def test_grid_round_trip():
    grid = torch.rand(5, 7) > 0.5
    layout = block_grid_to_layout(grid, 32, (150, 200))
    assert torch.equal(layout.block_grid(), grid)
    assert layout.nnz_blocks == int(grid.sum())
    assert layout.block_density == pytest.approx(float(grid.float().mean()))
    with pytest.raises(ValueError, match="grid must have shape"):
        block_grid_to_layout(grid, 64, (150, 200))


def test_block_mask_keeps_element_mask_only_when_needed():
    grid = torch.rand(3, 4) > 0.5
    full = BlockMask.from_block_grid(grid, 16, (48, 64)).to_dense()
    bm = BlockMask.from_dense(full, 16)
    assert bm.mask is None  # pure block sparsity: no element mask to load
    partial = full & (torch.rand(48, 64) > 0.2)
    bm2 = BlockMask.from_dense(partial, 16)
    assert bm2.mask is not None and torch.equal(bm2.to_dense(), partial)
    soft = partial.float().requires_grad_()
    assert BlockMask.from_dense(soft, 16).mask is soft


def test_nm_from_scores_and_validation():
    scores = torch.randn(6, 16)
    nm = NMMask.from_scores(scores, 2, 4)
    groups = nm.mask.view(6, 4, 4)
    assert bool((groups.sum(-1) == 2).all())
    # The kept entries are the two largest of every group.
    kept = scores.view(6, 4, 4)[groups].view(6, 4, 2)
    dropped = scores.view(6, 4, 4)[~groups].view(6, 4, 2)
    assert bool((kept.min(-1).values >= dropped.max(-1).values).all())
    assert nm.density() == pytest.approx(0.5)
    with pytest.raises(ValueError, match="0 < n < m"):
        NMMask(nm.mask, 4, 4)


def test_block_mask_keeps_non_binary_float_factors():
    grid = torch.tensor([[True, False]])
    full = BlockMask.from_block_grid(grid, 16, (16, 32)).to_dense().float()
    assert BlockMask.from_dense(full, 16).mask is None
    scaled = full * 0.5
    bm = BlockMask.from_dense(scaled, 16)
    assert bm.mask is not None and torch.equal(bm.to_dense(), scaled)


@pytest.mark.parametrize("shape", [(7, 127), (33, 70)])
def test_partial_edge_blocks_count_as_full(shape):
    mask = torch.ones(*shape, dtype=torch.bool)
    bm = BlockMask.from_dense(mask, 32)
    assert bm.mask is None and bm.layout.nnz_blocks == (-(-shape[0] // 32)) * (-(-shape[1] // 32))


def test_hand_made_layout_is_checked_before_use():
    from capkit.ops import BlockLayout

    grid = torch.rand(4, 6) > 0.4
    grid[0, 0] = grid[0, 1] = True  # row 0 has two blocks, so swapping them breaks the order
    good = block_grid_to_layout(grid, 16, (60, 90))
    parts = lambda: [t.clone() for t in (good.row_ptr, good.col_idx, good.col_ptr, good.row_idx)]  # noqa: E731
    made = BlockLayout((60, 90), 16, *parts())
    assert not made.checked and BlockMask(made).layout.checked  # a correct hand-made layout is accepted
    assert torch.equal(BlockMask(made).to_dense(), BlockMask(good).to_dense())

    def broken(i, fix, match):
        p = parts()
        p[i] = fix(p[i])
        with pytest.raises(ValueError, match=match):
            BlockMask(BlockLayout((60, 90), 16, *p))

    broken(0, lambda t: t[:-1], "row_ptr must have 5 entries")
    broken(1, lambda t: t.long(), "col_idx must be a 1-D int32 tensor")
    broken(1, lambda t: torch.where(t == t.max(), torch.full_like(t, 6), t), r"col_idx must hold block columns in \[0, 6\)")
    broken(0, lambda t: torch.cat([t[:1] + 1, t[1:]]), "row_ptr must rise from 0")
    broken(1, lambda t: torch.cat([t[1:2], t[:1], t[2:]]), "same live blocks, each once, in ascending order")
    broken(3, lambda t: t[:-1], r"col_ptr must rise from 0 to len\(row_idx\)")
    with pytest.raises(ValueError, match="block_size must be one of"):
        BlockMask(BlockLayout((60, 90), 24, *parts()))
