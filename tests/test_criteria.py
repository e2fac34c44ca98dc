"""Pruning criteria, the straight-through estimator, threshold caching, the cubic schedule and
the Pruner, against hand-computed cases and plain autograd."""

import pytest
import torch
import torch.nn.functional as F

from capkit.nn import MaskedLinear
from capkit.ops import BlockMask, NMMask
from capkit.pruning import (
    BlockMovement,
    CubicSchedule,
    Magnitude,
    Movement,
    NMMagnitude,
    NMMovement,
    Pruner,
    SoftMovement,
    kept_count,
    make_criterion,
    sparsity_report,
)

from _models import tiny_bert, token_batch


def _layer(out_f, in_f, crit, weight=None, backend="torch"):
    m = MaskedLinear(in_f, out_f, backend=backend)
    if weight is not None:
        with torch.no_grad():
            m.weight.copy_(weight)
    crit.attach(m)
    return m


def test_magnitude_hand_case():
    w = torch.tensor([[1.0, -5.0, 3.0, 0.5], [2.0, -0.1, 4.0, 6.0]])
    m = _layer(2, 4, Magnitude(), w)
    m.set_keep(0.5)
    expect = torch.tensor([[False, True, True, False], [False, False, True, True]])
    assert torch.equal(m.current_mask(), expect)
    assert m.scores is None


def test_movement_hand_case_and_straight_through_gradient():
    crit = Movement()
    m = _layer(3, 5, crit, torch.randn(3, 5))
    with torch.no_grad():
        m.scores.copy_(torch.arange(15.0).view(3, 5).flip(1))
    m.set_keep(0.2)  # 3 of 15
    with torch.no_grad():
        assert torch.equal(m.current_mask(), m.scores >= 12)
    x = torch.randn(4, 5)
    y = m(x)
    g = torch.randn_like(y)
    y.backward(g)
    # reference: W' = W * M with M constant; dS = dW' * W, dW = dW' * M
    mask = (m.scores >= 12).float()
    w_eff = (m.weight.detach() * mask).requires_grad_(True)
    F.linear(x, w_eff, m.bias.detach()).backward(g)
    torch.testing.assert_close(m.scores.grad, w_eff.grad * m.weight.detach())
    torch.testing.assert_close(m.weight.grad, w_eff.grad * mask)


def test_soft_movement_threshold_and_floor():
    crit = SoftMovement()
    m = _layer(20, 20, crit)
    with torch.no_grad():
        m.scores.copy_(torch.linspace(-3, 3, 400).view(20, 20))
    crit.set_tau(0.0)
    with torch.no_grad():
        assert bool(m.current_mask().all())
        crit.set_tau(0.5)  # sigmoid(S) > 0.5  <=>  S > 0
        assert torch.equal(m.current_mask(), m.scores > 0)
        crit.set_tau(0.99)  # logit = 4.6: nothing survives, so the floor keeps the top 0.5% (2)
        mask = m.current_mask()
        assert int(mask.sum()) == 2 and bool(mask.view(-1)[-2:].all())
    with pytest.raises(ValueError, match="tau"):
        crit.set_tau(1.0)
    reg = crit.regularization([m])
    torch.testing.assert_close(reg, torch.sigmoid(m.scores).mean())
    reg.backward()
    assert m.scores.grad is not None


def test_block_movement_gradient_is_the_block_sum():
    crit = BlockMovement(block_size=16)
    m = _layer(40, 33, crit, torch.randn(40, 33))  # ragged edge blocks: grid 3 x 3
    assert tuple(m.scores.shape) == (3, 3)
    with torch.no_grad():
        m.scores.copy_(torch.randn(3, 3))
    m.set_keep(4 / 9)
    with torch.no_grad():
        fixed = m.current_mask()
    assert isinstance(fixed, BlockMask) and fixed.layout.nnz_blocks == 4
    x = torch.randn(5, 33)
    y = m(x)
    g = torch.randn_like(y)
    y.backward(g)
    dense = fixed.to_dense().float()
    w_eff = (m.weight.detach() * dense).requires_grad_(True)
    F.linear(x, w_eff, m.bias.detach()).backward(g)
    per_elem = w_eff.grad * m.weight.detach()
    padded = torch.zeros(48, 48)
    padded[:40, :33] = per_elem
    expect = padded.view(3, 16, 3, 16).sum((1, 3))
    torch.testing.assert_close(m.scores.grad, expect, atol=1e-5, rtol=1e-5)


def test_nm_movement_and_magnitude():
    crit = NMMovement()
    m = _layer(6, 8, crit, torch.randn(6, 8))
    with torch.no_grad():
        m.scores.copy_(torch.randn(6, 8))
        fixed = m.current_mask()
    assert isinstance(fixed, NMMask)
    assert torch.equal(fixed.mask, NMMask.from_scores(m.scores).mask)
    x = torch.randn(3, 8)
    m(x).sum().backward()
    assert m.scores.grad is not None and m.scores.grad.shape == (6, 8)
    mag = _layer(4, 8, NMMagnitude(), torch.randn(4, 8))
    with torch.no_grad():
        assert torch.equal(mag.current_mask().mask, NMMask.from_scores(mag.weight.abs()).mask)
    with pytest.raises(ValueError, match="multiple of 4"):
        _layer(4, 6, NMMovement())


def test_global_scope_ranks_across_matrices():
    crit = Movement(scope="global")
    a, b = _layer(4, 5, crit), _layer(4, 5, crit)
    with torch.no_grad():
        a.scores.copy_(torch.randn(4, 5))
        b.scores.copy_(torch.randn(4, 5) + 10.0)  # b's scores all beat a's
    a.set_keep(0.5)
    b.set_keep(0.5)
    with torch.no_grad():
        assert int(a.current_mask().sum()) == 0 and int(b.current_mask().sum()) == 20
    b.set_keep(0.4)
    with pytest.raises(ValueError, match="one keep fraction"):
        with torch.no_grad():
            a.current_mask()


def test_thresholds_are_cached_until_scores_or_keep_change():
    crit = Movement()
    layers = [_layer(7, 9, crit) for _ in range(3)]
    opt = torch.optim.AdamW([l.scores for l in layers], lr=0.1)
    for l in layers:
        with torch.no_grad():
            l.scores.normal_()
        l.set_keep(0.3)
    x = torch.randn(2, 9)
    for l in layers:
        l(x)
    assert crit.group.recomputations == 1  # one batched selection for all three layers
    for l in layers:
        l(x).sum().backward()
    assert crit.group.recomputations == 1
    opt.step()  # scores change in place
    layers[0](x)
    assert crit.group.recomputations == 2
    layers[1].set_keep(0.5)
    layers[2](x)  # its own threshold is current: no selection
    assert crit.group.recomputations == 2
    layers[1](x)  # its keep changed: selected again, with the new fraction
    assert crit.group.recomputations == 3
    assert int(layers[1].current_mask().sum()) == kept_count(63, 0.5)
    assert int(layers[2].current_mask().sum()) == kept_count(63, 0.3)


def test_make_criterion_errors():
    with pytest.raises(ValueError, match="unknown pruning criterion 'topk'"):
        make_criterion("topk")
    with pytest.raises(ValueError, match="block_size"):
        BlockMovement(block_size=8)
    with pytest.raises(ValueError, match="scope"):
        Movement(scope="layer")
    assert isinstance(make_criterion("soft_movement"), SoftMovement)


def test_cubic_schedule_hand_values_and_state():
    s = CubicSchedule(initial=1.0, final=0.1, total_steps=100, warmup_steps=10, reg_lambda=100.0)
    assert s.value(0) == 1.0 and s.value(10) == 1.0
    assert s.value(81) == pytest.approx(0.1) and s.value(100) == pytest.approx(0.1)
    assert s.value(45) == pytest.approx(0.1 + 0.9 * 0.5 ** 3)
    assert s.regularization_weight(45) == pytest.approx(100.0 * s.value(45) / 0.1)
    values = [s.value(i) for i in range(101)]
    assert all(a >= b for a, b in zip(values, values[1:]))
    assert CubicSchedule.from_state_dict(s.state_dict()) == s
    with pytest.raises(ValueError, match="total_steps"):
        CubicSchedule(1.0, 0.1, total_steps=20, warmup_steps=10)
    with pytest.raises(ValueError, match="step must be >= 0"):
        s.value(-1)


@pytest.mark.parametrize("method", ["movement", "magnitude", "soft-movement", "block-movement", "nm-movement"])
def test_pruner_trains_a_tiny_bert(method):
    model = tiny_bert(hidden_size=32, intermediate_size=64, num_attention_heads=4)
    batch = token_batch(model.config)
    labels = torch.tensor([0, 2, 1])
    if method == "soft-movement":
        sched = CubicSchedule(0.0, 0.6, total_steps=12, warmup_steps=2, reg_lambda=1.0)
    elif method.startswith("nm"):
        sched = None
    else:
        sched = CubicSchedule(1.0, 0.25, total_steps=12, warmup_steps=2)
    pruner = Pruner(model, method, schedule=sched, block_size=16, backend="torch")
    params = [p for n, p in model.named_parameters() if not n.endswith("scores")]
    opt = torch.optim.AdamW([{"params": params, "lr": 1e-3},
                             {"params": pruner.score_parameters(), "lr": 1e-1, "weight_decay": 0.0}])
    model.train()
    for step in range(13):
        pruner.step(step)
        loss = F.cross_entropy(model(**batch).logits, labels) + pruner.regularization()
        opt.zero_grad()
        loss.backward()
        if method != "magnitude":
            assert all(s.grad is not None for s in pruner.score_parameters())
        opt.step()
    density = pruner.density()
    if method in ("movement", "magnitude"):
        assert density == pytest.approx(0.25, abs=0.01)
    elif method == "block-movement":
        assert 0.2 < density < 0.35
    elif method == "nm-movement":
        assert density == pytest.approx(0.5)
    model.eval()
    with torch.no_grad():
        before = model(**batch).logits
    pruner.finalize()
    assert not pruner.score_parameters()
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, before, atol=1e-5, rtol=1e-5)
    report = sparsity_report(model)
    assert report.sparsity == pytest.approx(1 - density, abs=1e-6)


def test_pruner_state_round_trip_and_errors():
    model = tiny_bert()
    sched = CubicSchedule(1.0, 0.1, total_steps=50, warmup_steps=5)
    p = Pruner(model, "movement", schedule=sched)
    p.step(30)
    state = p.state_dict()
    q = Pruner(tiny_bert(), "movement")
    q.load_state_dict(state)
    assert q.current_step == 30 and q.schedule == sched
    assert all(m.keep == pytest.approx(sched.value(30)) for m in q.modules.values())
    with pytest.raises(ValueError, match="method 'movement'"):
        Pruner(tiny_bert(), "magnitude").load_state_dict(state)
    with pytest.raises(ValueError, match="keep must be in"):
        Pruner(tiny_bert(), "movement", keep=1.5)
    with pytest.raises(ValueError, match="kept fraction"):
        Pruner(tiny_bert(), "movement", schedule=CubicSchedule(1.0, 0.0, 50, 5))


@pytest.mark.parametrize("scope", ["matrix", "global"])
def test_thresholds_follow_a_fused_optimizer(scope):
    # The fused AdamW writes parameters in place without bumping their version counters: the
    # thresholds must still follow the scores (a gradient marks them as changed).
    import copy

    crit = Movement(scope=scope)
    layers = [_layer(6, 10, crit) for _ in range(3)]
    for l in layers:
        with torch.no_grad():
            l.scores.normal_()
        l.set_keep(0.25)
    layers = copy.deepcopy(layers)  # copies drop tensor hooks: they must be watched again
    crit = layers[0].criterion
    opt = torch.optim.AdamW([l.scores for l in layers], lr=0.5, fused=True)
    x = torch.randn(4, 10)
    for _ in range(4):
        loss = sum((l(x) * torch.randn(4, 6)).sum() for l in layers)
        loss.backward()
        versions = [l.scores._version for l in layers]
        opt.step()
        opt.zero_grad()
        assert [l.scores._version for l in layers] == versions  # the hazard being tested
        with torch.no_grad():
            masks = [l.current_mask() for l in layers]
        if scope == "matrix":
            for l, m in zip(layers, masks):
                thr = l.scores.detach().flatten().kthvalue(60 - kept_count(60, 0.25) + 1).values
                assert torch.equal(m.bool(), l.scores.detach() >= thr)
        else:
            flat = torch.cat([l.scores.detach().flatten() for l in layers])
            thr = flat.kthvalue(flat.numel() - kept_count(flat.numel(), 0.25) + 1).values
            for l, m in zip(layers, masks):
                assert torch.equal(m.bool(), l.scores.detach() >= thr)


def test_folded_weight_check_follows_a_fused_optimizer():
    layer = MaskedLinear(8, 5, backend="torch")
    mask = torch.rand(5, 8) > 0.5
    layer.set_mask(mask)
    with torch.no_grad():
        layer.weight.mul_(mask)  # folded: inference may run the plain dense GEMM
    x = torch.randn(3, 8)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight * mask, layer.bias))
    opt = torch.optim.AdamW([layer.weight], lr=0.1, fused=True)
    layer.weight.sum().backward()  # a gradient on the pruned weights too
    opt.step()
    assert bool((layer.weight.detach()[~mask] != 0).any())
    with torch.no_grad():  # no longer folded: the mask must be applied again
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight * mask, layer.bias))


@pytest.mark.parametrize("scope", ["matrix", "global"])
def test_a_pass_over_the_layers_checks_each_layer_once(scope, monkeypatch):
    from capkit.nn._watch import ChangeWatch

    crit = Movement(scope=scope)
    layers = [_layer(4, 4, crit) for _ in range(12)]
    for l in layers:
        l.set_keep(0.5)
    x = torch.randn(2, 4)
    with torch.no_grad():
        for l in layers:
            l(x)
    calls = []
    real = ChangeWatch.changed
    mine = {id(w) for w in crit.group._watches.values()}  # the thresholds' watches, not the layers' own
    monkeypatch.setattr(ChangeWatch, "changed", lambda self, *a: (id(self) in mine and calls.append(1)) or real(self, *a))
    with torch.no_grad():
        for l in layers:
            l(x)
    assert len(calls) == len(layers)  # the full check for the layer asked only, not O(layers^2)
    assert crit.group.recomputations == 1
