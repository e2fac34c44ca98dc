"""capkit.nn.MaskedLinear as a drop-in for nn.Linear."""
import pytest
import torch
from torch import nn

from capkit.nn import MaskedLinear
from capkit.ops import BlockMask, NMMask


def test_all_ones_mask_equals_linear():
    lin = nn.Linear(24, 10)
    ml = MaskedLinear.from_linear(lin)
    x = torch.randn(3, 5, 24)
    torch.testing.assert_close(ml(x), lin(x), atol=1e-5, rtol=1e-5)
    assert ml.weight is lin.weight  # shares parameters


@pytest.mark.parametrize("backend", ["torch", "auto", "cpu"])
def test_mask_and_fold(backend):
    from capkit.ops import backend_status

    if backend_status(torch.device("cpu"))[backend if backend != "auto" else "torch"] is not None:
        pytest.skip("backend unavailable")
    ml = MaskedLinear(40, 12, backend=backend)
    mask = torch.rand(12, 40) > 0.5
    ml.set_mask(mask)
    x = torch.randn(7, 40)
    lin = ml.to_linear()
    assert type(lin) is nn.Linear
    torch.testing.assert_close(ml(x), lin(x), atol=1e-5, rtol=1e-5)
    assert torch.count_nonzero(lin.weight[~mask]) == 0


def test_block_size_uses_block_layout_and_tracks_mask_changes():
    ml = MaskedLinear(64, 64, block_size=32)
    grid = torch.tensor([[True, False], [False, False]])
    ml.set_mask(BlockMask.from_block_grid(grid, 32, (64, 64)).to_dense())
    m = ml.current_mask()
    assert isinstance(m, BlockMask) and m.layout.nnz_blocks == 1 and m.mask is None
    ml.mask[40, 40] = True  # in-place edit must be seen
    m2 = ml.current_mask()
    assert m2.layout.nnz_blocks == 2
    x = torch.randn(3, 64)
    torch.testing.assert_close(ml(x), ml.to_linear()(x), atol=1e-5, rtol=1e-5)


def test_structured_masks():
    ml = MaskedLinear(16, 8)
    ml.set_mask(NMMask.from_scores(torch.randn(8, 16)))
    assert isinstance(ml.current_mask(), NMMask)
    x = torch.randn(2, 16)
    torch.testing.assert_close(ml(x), ml.to_linear()(x), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"shape \(8, 16\), got \(16, 8\)"):
        ml.set_mask(torch.ones(16, 8))


def test_scores_get_straight_through_gradient():
    ml = MaskedLinear(20, 6, backend="torch")
    ml.init_scores(keep=0.25, init=torch.randn(6, 20))
    x = torch.randn(4, 20)
    y = ml(x)
    mask = ml.current_mask().detach()
    assert int(mask.sum()) == 30  # 25% of 120
    dy = torch.randn_like(y)
    y.backward(dy)
    expect = (dy.t() @ x) * ml.weight.detach()
    torch.testing.assert_close(ml.scores.grad, expect, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ml.weight.grad, (dy.t() @ x) * mask, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="keep must be in"):
        ml.set_keep(0.0)


def test_inference_with_a_folded_mask_uses_the_dense_gemm(monkeypatch):
    import capkit.nn.masked_linear as mlmod

    ml = MaskedLinear(16, 8, backend="torch")
    mask = torch.rand(8, 16) > 0.5
    ml.set_mask(mask)
    x = torch.randn(3, 16)
    calls = []
    real = mlmod.masked_linear
    monkeypatch.setattr(mlmod, "masked_linear", lambda *a, **k: calls.append(1) or real(*a, **k))
    with torch.no_grad():
        want = ml.to_linear()(x)
        torch.testing.assert_close(ml(x), want)  # weight not folded yet: the op applies the mask
        assert calls == [1]
        ml.weight.mul_(mask)                      # folded (what capkit.load gives)
        torch.testing.assert_close(ml(x), want)
        assert calls == [1]
        ml.weight[~mask] += 1.0                   # unfolded again: detected through the version
        ml(x)
        assert calls == [1, 1]
    ml(x).sum().backward()                        # training always runs the op
    assert calls == [1, 1, 1]
