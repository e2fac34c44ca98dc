"""Inference fusions on the CSR kernel against the float64 reference: the GELU and the residual sum
applied inside the kernel, MaskedLinear's cached decision for repeated calls (and everything that
must undo it), and fuse_for_inference on transformers blocks, including capkit.load."""
import math
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

from capkit.nn import GeluIntermediate, MaskedLinear, ResidualOutput, fuse_for_inference, patch_model, unpatch
from capkit.ops import backend_status
from capkit.ops import sparse_format
from capkit.ops.sparse_format import csr_linear, pack_csr

pytestmark = pytest.mark.skipif(backend_status(torch.device("cpu"))["cpu"] is not None,
                                reason="capkit._C (the C++ CPU kernels) is not built")


def tol(k):
    return 16 * 2e-6 * math.sqrt(k) + 2e-6


def reference_gelu(x, w, m, b):
    wm = torch.where(m, w.double(), torch.zeros((), dtype=torch.float64))
    return F.gelu(F.linear(x.double(), wm, None if b is None else b.double()))


@pytest.fixture
def csr_threshold():
    with mock.patch.object(sparse_format, "csr_max_density", lambda dtype=torch.float32: 0.3):
        yield


# (tokens, in, out): one token, a partial tile, the shared-buffer and tile-per-thread schedules,
# several panels
@pytest.mark.parametrize("shape", [(1, 7, 19), (5, 40, 33), (64, 24, 70), (130, 100, 50), (577, 45, 300),
                                   (1000, 3, 129)])
@pytest.mark.parametrize("threads", [1, 3])
def test_gelu_in_the_kernel_matches_reference(shape, threads):
    m_, k, n = shape
    g = torch.Generator().manual_seed(m_ * 7 + k)
    x, w, b = torch.randn(m_, k, generator=g) * 2, torch.randn(n, k, generator=g), torch.randn(n, generator=g)
    mask = torch.rand(n, k, generator=g) < 0.2
    mask[0] = False  # an empty row: gelu(bias)
    w[~mask] = float("nan")  # never read
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        y = csr_linear(x, pack_csr(w, mask), b, activation="gelu")
    finally:
        torch.set_num_threads(before)
    assert y.shape == (m_, n)
    torch.testing.assert_close(y.double(), reference_gelu(x, w, mask, b), atol=tol(k), rtol=1e-6)


def test_gelu_in_the_kernel_over_the_whole_range():
    """A 1 x 1 identity weight turns the kernel into the activation alone: compare it with the
    float64 GELU from -12 to 12 (both tails, the sign change, the vector body and its scalar tail)."""
    z = torch.linspace(-12, 12, 10007)[:, None]
    one = pack_csr(torch.ones(1, 1), torch.ones(1, 1, dtype=torch.bool))
    y = csr_linear(z, one, None, activation="gelu")[:, 0].double()
    ref = F.gelu(z[:, 0].double())
    assert (y - ref).abs().max().item() < 1e-6
    assert torch.isnan(csr_linear(torch.tensor([[float("nan")]]), one, None, activation="gelu")).all()


def test_activation_argument_is_checked():
    p = pack_csr(torch.randn(3, 4), torch.ones(3, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="activation"):
        csr_linear(torch.randn(2, 4), p, None, activation="relu")
    with pytest.raises(RuntimeError, match="activation"):
        torch.ops.capkit.csr_linear_forward(torch.randn(2, 4), p.ptr, p.col_idx, p.values, None, 3, p.panel, 2)
    with pytest.raises(ValueError, match="activation"):
        MaskedLinear(4, 3)(torch.randn(2, 4), activation="tanh")
    with pytest.raises(ValueError, match="in_features"):  # a wrong width must not be reshaped silently
        csr_linear(torch.randn(3, 8), p, None)


def test_repeated_calls_check_the_input_width(csr_threshold):
    lin = _sparse_layer()
    with torch.no_grad():
        lin(torch.randn(4, 40))
        with pytest.raises(ValueError, match="in_features"):
            lin(torch.randn(4, 80))  # 80 = 2 x 40: a bare reshape would pass


def _sparse_layer(k=40, n=31, density=0.1, seed=0):
    torch.manual_seed(seed)
    lin = MaskedLinear(k, n)
    lin.set_mask(torch.rand(n, k) < density)
    return lin


def test_masked_linear_activation_on_every_path(csr_threshold):
    """forward(x, activation="gelu") is gelu(forward(x)) whichever path runs: the CSR kernel
    (inference), the dense GEMM (a mask too dense for it), and training with autograd."""
    x = torch.randn(2, 9, 40)
    for density in (0.1, 0.9):
        lin = _sparse_layer(density=density)
        with torch.no_grad():
            plain = lin(x)
            fused = lin(x, activation="gelu")
            again = lin(x, activation="gelu")  # the cached decision
        assert (lin._csr_plan is not None) == (density < 0.3)
        torch.testing.assert_close(fused, F.gelu(plain), atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(again, fused)
    lin = _sparse_layer()
    xg = x.clone().requires_grad_()
    lin(xg, activation="gelu").square().sum().backward()
    ref_x = x.clone().requires_grad_()
    ref_w = lin.weight.detach().clone().requires_grad_()
    F.gelu(F.linear(ref_x, ref_w * lin.mask, lin.bias.detach())).square().sum().backward()
    torch.testing.assert_close(xg.grad, ref_x.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lin.weight.grad, ref_w.grad * lin.mask, atol=1e-5, rtol=1e-5)


def test_repeated_inference_skips_the_eligibility_check(csr_threshold):
    lin = _sparse_layer()
    x = torch.randn(6, 40)
    with torch.no_grad(), mock.patch("capkit.nn.masked_linear.csr_applies",
                                     wraps=sparse_format.csr_applies) as check:
        first = lin(x)
        for _ in range(3):
            torch.testing.assert_close(lin(x), first)
    assert check.call_count == 1


def _expected(lin, x):
    return F.linear(x.double(), lin.weight.detach().double() * lin.mask,
                    None if lin.bias is None else lin.bias.detach().double())


def test_cached_decision_follows_every_change(csr_threshold):
    """The shortcut for repeated calls must give way whenever the weight, bias, mask, backend,
    mode or input kind changes: each change below is checked against the reference."""
    lin = _sparse_layer()
    x = torch.randn(6, 40)
    with torch.no_grad():
        lin(x)
        lin.weight.mul_(2.0)  # in place
        torch.testing.assert_close(lin(x).double(), _expected(lin, x), atol=2 * tol(40), rtol=0)
        lin.weight = torch.nn.Parameter(torch.randn(31, 40))  # replaced
        torch.testing.assert_close(lin(x).double(), _expected(lin, x), atol=2 * tol(40), rtol=0)
        lin.bias.add_(1.0)
        torch.testing.assert_close(lin(x).double(), _expected(lin, x), atol=2 * tol(40), rtol=0)
        lin.set_mask(torch.rand(31, 40) < 0.1)  # a new mask
        torch.testing.assert_close(lin(x).double(), _expected(lin, x), atol=2 * tol(40), rtol=0)
        lin.mask[0, :] = True  # the mask edited in place
        torch.testing.assert_close(lin(x).double(), _expected(lin, x), atol=2 * tol(40), rtol=0)
        lin.backend = "torch"
        with mock.patch("capkit.nn.masked_linear.csr_linear") as kernel:
            torch.testing.assert_close(lin(x).double(), _expected(lin, x), atol=2 * tol(40), rtol=0)
        assert kernel.call_count == 0
        lin.backend = "auto"
        lin(x)
        with pytest.raises(TypeError, match="dtype"):  # another dtype: the full checks, not the fp32 kernel
            lin(x.double())
    # gradients enabled and an input that needs them: autograd, not the kernel
    xg = x.clone().requires_grad_()
    lin(xg).sum().backward()
    assert xg.grad is not None
    # a fused optimiser writes the weight without a version bump: the gradient hook catches it
    lin.zero_grad()
    opt = torch.optim.SGD(lin.parameters(), lr=0.5)
    lin(torch.randn(3, 40)).sum().backward()
    with torch.no_grad():
        lin(x)
    opt.step()
    with torch.no_grad():
        torch.testing.assert_close(lin(x).double(), _expected(lin, x), atol=2 * tol(40), rtol=0)


def _pruned_tiny_bert(hidden_act="gelu"):
    from _models import tiny_bert

    model = tiny_bert(hidden_act=hidden_act)
    patch_model(model)
    g = torch.Generator().manual_seed(5)
    for m in model.modules():
        if isinstance(m, MaskedLinear):
            m.set_mask(torch.rand(m.out_features, m.in_features, generator=g) < 0.15)
    return model


def _kernel_calls(kernel, kind):
    if kind == "gelu":
        return [c for c in kernel.call_args_list if "gelu" in c.args[3:4] or c.kwargs.get("activation") == "gelu"]
    return [c for c in kernel.call_args_list
            if (len(c.args) > 4 and c.args[4] is not None) or c.kwargs.get("residual") is not None]


def test_fuse_for_inference_replaces_blocks_and_keeps_outputs(csr_threshold):
    from _models import token_batch

    model = _pruned_tiny_bert()
    layers = model.config.num_hidden_layers
    batch = token_batch(model.config)
    keys = list(model.state_dict())
    with torch.no_grad():
        before = model(**batch).logits
    assert fuse_for_inference(model) == {"gelu": layers, "residual": 2 * layers}
    assert fuse_for_inference(model) == {"gelu": 0, "residual": 0}  # already fused
    assert list(model.state_dict()) == keys
    gelu_blocks = [m for m in model.modules() if isinstance(m, GeluIntermediate)]
    assert len(gelu_blocks) == layers
    with torch.no_grad(), mock.patch("capkit.nn.masked_linear.csr_linear", wraps=csr_linear) as kernel:
        after = model(**batch).logits
    assert len(_kernel_calls(kernel, "gelu")) == layers
    assert len(_kernel_calls(kernel, "residual")) == 2 * layers
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)
    # training still flows through the fused blocks
    model.train()
    model(**batch).logits.sum().backward()
    assert gelu_blocks[0].dense.weight.grad is not None
    # back to plain layers: the blocks run the separate steps
    model.eval()
    unpatch(model)
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, before, atol=1e-5, rtol=1e-5)


def test_residual_in_the_kernel_matches_reference():
    g = torch.Generator().manual_seed(11)
    for m_, k, n in [(1, 7, 19), (5, 40, 33), (130, 100, 50), (577, 45, 300)]:
        x, w, b = torch.randn(m_, k, generator=g), torch.randn(n, k, generator=g), torch.randn(n, generator=g)
        r = torch.randn(m_, n, generator=g)
        mask = torch.rand(n, k, generator=g) < 0.2
        w[~mask] = float("nan")
        y = csr_linear(x, pack_csr(w, mask), b, residual=r)
        ref = F.linear(x.double(), torch.where(mask, w.double(), torch.zeros((), dtype=torch.float64)), b.double())
        torch.testing.assert_close(y.double(), ref + r.double(), atol=tol(k), rtol=0)
    p = pack_csr(torch.randn(3, 4), torch.ones(3, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="residual"):
        csr_linear(torch.randn(2, 4), p, None, residual=torch.randn(2, 4))
    with pytest.raises(ValueError, match="combined"):
        csr_linear(torch.randn(2, 4), p, None, activation="gelu", residual=torch.randn(2, 3))
    with pytest.raises(RuntimeError, match="residual"):
        torch.ops.capkit.csr_linear_forward(torch.randn(2, 4), p.ptr, p.col_idx, p.values, None, 3, p.panel, 0,
                                            torch.randn(3, 3))


def test_masked_linear_residual_on_every_path(csr_threshold):
    x = torch.randn(2, 9, 40)
    r = torch.randn(2, 9, 31)
    for density in (0.1, 0.9):
        lin = _sparse_layer(density=density)
        with torch.no_grad():
            expected = lin(x) + r
            torch.testing.assert_close(lin(x, residual=r), expected, atol=1e-6, rtol=1e-6)
            torch.testing.assert_close(lin(x, residual=r), expected, atol=1e-6, rtol=1e-6)  # cached decision
            torch.testing.assert_close(lin(x, residual=r[:, :1]), lin(x) + r[:, :1])  # broadcast: the plain sum
    with pytest.raises(ValueError, match="combined"):
        lin(x, activation="gelu", residual=r)


def test_residual_output_keeps_dropout_in_training():
    torch.manual_seed(0)
    block = ResidualOutput(_sparse_layer(), torch.nn.LayerNorm(31), torch.nn.Dropout(0.5))
    h, inp = torch.randn(4, 40), torch.randn(4, 31)
    block.train()
    torch.manual_seed(1)
    got = block(h, inp)
    torch.manual_seed(1)
    expected = block.LayerNorm(block.dropout(block.dense(h)) + inp)
    torch.testing.assert_close(got, expected)
    with pytest.raises(TypeError, match="LayerNorm"):
        ResidualOutput(_sparse_layer(), torch.nn.Identity(), torch.nn.Dropout(0.1))


def test_fuse_leaves_other_activations():
    model = _pruned_tiny_bert(hidden_act="gelu_new")  # the tanh form: not what the kernel computes
    assert fuse_for_inference(model)["gelu"] == 0
    with pytest.raises(TypeError, match="model"):
        fuse_for_inference("model")
    with pytest.raises(ValueError, match="intermediate_act_fn"):
        GeluIntermediate(MaskedLinear(4, 8), torch.nn.ReLU())


def test_loaded_sparse_export_runs_the_fused_gelu(tmp_path, csr_threshold):
    import capkit
    from capkit.export import save
    from _models import token_batch

    model = _pruned_tiny_bert()
    batch = token_batch(model.config)
    with torch.no_grad():
        expected = model(**batch).logits
    save(model, tmp_path / "sparse", format="sparse")
    loaded = capkit.load(tmp_path / "sparse")
    assert sum(isinstance(m, GeluIntermediate) for m in loaded.modules()) == model.config.num_hidden_layers
    assert sum(isinstance(m, ResidualOutput) for m in loaded.modules()) == 2 * model.config.num_hidden_layers
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, expected, atol=1e-5, rtol=1e-5)
    save(loaded, tmp_path / "again", format="sparse")  # a fused model saves like any other
    with torch.no_grad():
        torch.testing.assert_close(capkit.load(tmp_path / "again")(**batch).logits, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("element", [False, True])
def test_block_masks_reuse_the_csr_decision_and_follow_fused_optimiser_updates(element, monkeypatch):
    """A fixed block mask reaches the CSR kernel from its layout's second call on (the op counts
    the sightings), then through the module's own cache and shortcut, with the fusions; a fused
    optimiser (which writes the weight without a version bump) must not leave a stale CSR behind."""
    from capkit.ops import BlockMask

    monkeypatch.setattr(sparse_format, "csr_max_density", lambda dtype=torch.float32: 1.0)
    torch.manual_seed(4)
    lin = MaskedLinear(64, 48)
    grid = torch.rand(3, 4) < 0.4
    grid[0, 0] = True
    block = BlockMask.from_block_grid(grid, 16, (48, 64))
    if element:
        block = BlockMask(block.layout, torch.rand(48, 64) < 0.7)
    lin.set_mask(block)
    dense = lin.dense_mask()
    x, r = torch.randn(5, 64), torch.randn(5, 48)

    def expected():
        return F.linear(x.double(), lin.weight.detach().double() * dense, lin.bias.detach().double())

    with torch.no_grad(), mock.patch("capkit.nn.masked_linear.csr_linear", wraps=csr_linear) as kernel:
        first = lin(x)  # first sighting: the block kernels
        assert kernel.call_count == 0 and lin._csr_plan is None
        torch.testing.assert_close(lin(x).double(), expected(), atol=tol(64), rtol=0)
        assert kernel.call_count == 1 and lin._csr_plan is not None
        torch.testing.assert_close(lin(x, activation="gelu").double(), F.gelu(expected()), atol=tol(64), rtol=0)
        torch.testing.assert_close(lin(x, residual=r).double(), expected() + r.double(), atol=tol(64), rtol=0)
        assert kernel.call_count == 3
    torch.testing.assert_close(first.double(), expected(), atol=tol(64), rtol=0)
    opt = torch.optim.AdamW([lin.weight], lr=0.5, fused=True)
    lin(torch.randn(3, 64)).sum().backward()
    opt.step()
    with torch.no_grad():
        torch.testing.assert_close(lin(x).double(), expected(), atol=tol(64), rtol=0)


def _reference_layer_norm(y, ln):
    w = None if ln.weight is None else ln.weight.detach().double()
    b = None if ln.bias is None else ln.bias.detach().double()
    return F.layer_norm(y, ln.normalized_shape, w, b, ln.eps)


@pytest.mark.parametrize("shape", [(1, 7, 19), (5, 40, 70), (16, 24, 33), (3, 20, 64), (130, 100, 50), (200, 32, 96),
                                   (577, 45, 300)])  # 64 and 96 outputs: the vector path (16 floats a step)
@pytest.mark.parametrize("threads", [1, 3])
def test_layer_norm_in_the_kernel_matches_reference(shape, threads):
    """dense + residual + LayerNorm in one kernel call, on both schedules (a token's rows in one
    task, or split over tasks and normalised afterwards), with and without the affine parameters."""
    m_, k, n = shape
    g = torch.Generator().manual_seed(n + k)
    x, w, b = torch.randn(m_, k, generator=g), torch.randn(n, k, generator=g), torch.randn(n, generator=g)
    r = torch.randn(m_, n, generator=g)
    mask = torch.rand(n, k, generator=g) < 0.2
    w[~mask] = float("nan")
    packed = pack_csr(w, mask)
    lin = F.linear(x.double(), torch.where(mask, w.double(), torch.zeros((), dtype=torch.float64)), b.double())
    norms = [torch.nn.LayerNorm(n, eps=1e-12), torch.nn.LayerNorm(n, elementwise_affine=False),
             torch.nn.LayerNorm(n, bias=False)]
    with torch.no_grad():
        norms[0].weight.normal_(generator=g)
        norms[0].bias.normal_(generator=g)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        for ln in norms:
            for res in (r, None):
                y = csr_linear(x, packed, b, residual=res, layer_norm=ln)
                ref = _reference_layer_norm(lin + (0 if res is None else res.double()), ln)
                torch.testing.assert_close(y.double(), ref, atol=2e-5, rtol=1e-5)
    finally:
        torch.set_num_threads(before)


def test_layer_norm_arguments_are_checked():
    p = pack_csr(torch.randn(3, 4), torch.ones(3, 4, dtype=torch.bool))
    x = torch.randn(2, 4)
    with pytest.raises(ValueError, match="layer_norm"):
        csr_linear(x, p, None, layer_norm=torch.nn.LayerNorm(4))  # over 4, not the 3 outputs
    with pytest.raises(ValueError, match="combined"):
        csr_linear(x, p, None, activation="gelu", layer_norm=torch.nn.LayerNorm(3))
    op = torch.ops.capkit.csr_linear_forward
    with pytest.raises(RuntimeError, match="layer_norm"):
        op(x, p.ptr, p.col_idx, p.values, None, 3, p.panel, 0, None, False, torch.ones(3))
    with pytest.raises(RuntimeError, match="ln_bias"):
        op(x, p.ptr, p.col_idx, p.values, None, 3, p.panel, 0, None, True, None, torch.ones(5))


def test_masked_linear_layer_norm_on_every_path(csr_threshold):
    x, r = torch.randn(2, 9, 40), torch.randn(2, 9, 31)
    ln = torch.nn.LayerNorm(31)
    with torch.no_grad():
        ln.weight.uniform_(0.5, 1.5)
        ln.bias.normal_()
        for density in (0.1, 0.9):
            lin = _sparse_layer(density=density)
            expected = ln(lin(x) + r)
            for _ in range(2):  # the second call takes the cached decision
                torch.testing.assert_close(lin(x, residual=r, layer_norm=ln), expected, atol=2e-5, rtol=1e-5)
            torch.testing.assert_close(lin(x, layer_norm=ln), ln(lin(x)), atol=2e-5, rtol=1e-5)
            other = torch.nn.LayerNorm((9, 31))  # over two dimensions, not the kernel's case: applied after
            torch.testing.assert_close(lin(x, residual=r, layer_norm=other), other(lin(x) + r))


def test_fused_blocks_compile_in_one_graph(csr_threshold):
    """torch.compile of a fused model: one frame, the same logits as eager (the graph runs the
    layers through the capkit::masked_linear op and the steps after them)."""
    import torch._dynamo
    import torch._dynamo.testing
    from _models import token_batch

    torch._dynamo.reset()
    model = _pruned_tiny_bert()
    fuse_for_inference(model)
    batch = token_batch(model.config)
    with torch.no_grad():
        eager = model(**batch).logits
        counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
        compiled = torch.compile(model, backend=counter, fullgraph=True)
        for _ in range(2):
            torch.testing.assert_close(compiled(**batch).logits, eager, atol=1e-5, rtol=1e-5)
    assert counter.frame_count == 1


def _step_reference(x, w, m, b, step, r, ln):
    wm = w.double() if m is None else torch.where(m, w.double(), torch.zeros((), dtype=torch.float64))
    y = F.linear(x.double(), wm, b.double())
    if step == "gelu":
        return F.gelu(y)
    if step in ("residual", "residual+ln"):
        y = y + r.double()
    if step in ("ln", "residual+ln"):
        y = F.layer_norm(y, (y.shape[-1],), ln.weight.double(), ln.bias.double(), ln.eps)
    return y


def _step_args(step, r, ln):
    return {"activation": "gelu" if step == "gelu" else None,
            "residual": r if step in ("residual", "residual+ln") else None,
            "layer_norm": ln if step in ("ln", "residual+ln") else None}


@pytest.mark.parametrize("kind", ["sparse bool", "dense bool", "block", "nm", "none"])
@pytest.mark.parametrize("step", ["gelu", "residual", "residual+ln", "ln"])
def test_fused_op_matches_reference_on_every_mask_kind(csr_threshold, kind, step):
    """capkit::masked_linear_fused (what a compiled MaskedLinear calls with steps after it): the
    layer and the step against float64, on the CSR kernel (sparse bool, block from its second call)
    and on the paths that apply the step after the layer (denser mask, N:M, no mask)."""
    from capkit.ops import BlockMask, NMMask
    from capkit.ops.masked_linear import masked_linear_with_steps

    g = torch.Generator().manual_seed(11)
    n, k = 48, 40
    x, w, b = torch.randn(2, 5, k, generator=g), torch.randn(n, k, generator=g), torch.randn(n, generator=g)
    r = torch.randn(2, 5, n, generator=g)
    ln = torch.nn.LayerNorm(n)
    with torch.no_grad():
        ln.weight.uniform_(0.5, 1.5)
        ln.bias.normal_()
    if kind == "sparse bool":
        mask = dense = torch.rand(n, k, generator=g) < 0.15
    elif kind == "dense bool":
        mask = dense = torch.rand(n, k, generator=g) < 0.8
    elif kind == "block":
        grid = torch.tensor([[1, 0, 0], [0, 0, 1], [0, 0, 0]], dtype=torch.bool)  # 2 of 9 blocks live
        live = grid.repeat_interleave(16, 0).repeat_interleave(16, 1)[:n, :k]
        mask = BlockMask.from_dense(live & (torch.rand(n, k, generator=g) < 0.5), 16)
        dense = mask.to_dense().bool()
    elif kind == "nm":
        mask = NMMask.from_scores(torch.randn(n, k, generator=g))
        dense = mask.to_dense().bool()
    else:
        mask = dense = None
    expected = _step_reference(x, w, dense, b, step, r, ln)
    with torch.no_grad(), mock.patch.object(sparse_format, "csr_kernel_call", wraps=sparse_format.csr_kernel_call) as kernel:
        for _ in range(2):
            y = masked_linear_with_steps(x, w, mask, b, "auto", **_step_args(step, r, ln))
            assert y.shape == (2, 5, n)
            torch.testing.assert_close(y.double(), expected, atol=1e-5, rtol=1e-5)
    # the CSR kernel with the step inside: both calls on the sparse bool mask, the second on the
    # block layout (the first one marks it seen, and the plain layer then runs on the kernel too)
    with_step = [a for a in (c.args for c in kernel.call_args_list) if a[3] == 1 or a[4] is not None or a[5]]
    assert len(with_step) == {"sparse bool": 2, "block": 1}.get(kind, 0)
    assert kernel.call_count == {"sparse bool": 2, "block": 2}.get(kind, 0)


def test_opcheck_masked_linear_fused():
    from torch.library import opcheck

    g = torch.Generator().manual_seed(4)
    n, k = 24, 20
    x, w, b = torch.randn(6, k, generator=g), torch.randn(n, k, generator=g), torch.randn(n, generator=g)
    r, lw, lb = torch.randn(6, n, generator=g), torch.rand(n, generator=g) + 0.5, torch.randn(n, generator=g)
    mask = torch.rand(n, k, generator=g) < 0.15
    op = torch.ops.capkit.masked_linear_fused.default
    lists = (None, None, None, None, 0)
    for m, kind in ((mask, "dense"), (None, "none")):
        opcheck(op, (x, w, m, b, *lists, kind, "auto", 1, None, False, None, None, 1e-5))
        opcheck(op, (x, w, m, b, *lists, kind, "auto", 0, r, True, lw, lb, 1e-6))
        opcheck(op, (x, w, m, None, *lists, kind, "torch", 0, None, True, None, None, 1e-5))
    with pytest.raises(ValueError, match="activation"):
        op(x, w, mask, b, *lists, "dense", "auto", 2, None, False, None, None, 1e-5)


def test_compiled_fused_model_runs_the_steps_in_the_kernel(csr_threshold):
    """torch.compile of a fused model, autograd off: every GELU and residual + LayerNorm block is a
    capkit::masked_linear_fused node, and when the graph runs the CSR kernel applies the steps; the
    logits match the unfused model."""
    import torch._dynamo
    import torch._dynamo.testing
    from _models import token_batch

    torch._dynamo.reset()
    model = _pruned_tiny_bert()
    batch = token_batch(model.config)
    with torch.no_grad():
        unfused = model(**batch).logits
        counts = fuse_for_inference(model)
        counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
        compiled = torch.compile(model, backend=counter, fullgraph=True)
        compiled(**batch)  # compiles
        with mock.patch.object(sparse_format, "csr_kernel_call", wraps=sparse_format.csr_kernel_call) as kernel:
            logits = compiled(**batch).logits
    torch.testing.assert_close(logits, unfused, atol=1e-5, rtol=1e-5)
    assert counter.frame_count == 1
    nodes = [str(n.target) for gm in counter.graphs for n in gm.graph.nodes]
    assert nodes.count("capkit.masked_linear_fused") == counts["gelu"] + counts["residual"]
    calls = [c.args for c in kernel.call_args_list]
    assert sum(a[3] == 1 for a in calls) == counts["gelu"]
    assert sum(a[4] is not None and a[5] for a in calls) == counts["residual"]


def test_compiled_fused_model_with_autograd_keeps_the_plain_op(csr_threshold):
    """With autograd on the compiled fused model differentiates: no fused node, the steps after
    the layer, and the same loss and gradients as eager."""
    import torch._dynamo
    import torch._dynamo.testing
    from _models import token_batch

    torch._dynamo.reset()
    model = _pruned_tiny_bert()
    fuse_for_inference(model)
    model.eval()
    batch = token_batch(model.config)
    eager_loss = model(**batch).logits.square().sum()
    eager_loss.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    loss = torch.compile(model, backend=counter, fullgraph=True)(**batch).logits.square().sum()
    loss.backward()
    torch.testing.assert_close(loss, eager_loss, atol=1e-5, rtol=1e-5)
    assert expected and all(torch.allclose(p.grad, expected[n], atol=1e-5, rtol=1e-4)
                            for n, p in model.named_parameters() if n in expected)
    assert "capkit.masked_linear_fused" not in [str(n.target) for gm in counter.graphs for n in gm.graph.nodes]


@pytest.mark.parametrize("kind", ["bool", "block"])
def test_a_model_loaded_under_inference_mode_runs(tmp_path, kind, monkeypatch):
    """Tensors made under torch.inference_mode keep no version counter: a model loaded inside it
    (its weights and masks are such tensors) must still run, on the CSR kernel, with the fusions."""
    import capkit
    from capkit.export import save
    from capkit.ops import BlockMask
    from _models import token_batch

    monkeypatch.setattr(sparse_format, "csr_max_density", lambda dtype=torch.float32: 1.0)
    model = _pruned_tiny_bert()
    if kind == "block":
        g = torch.Generator().manual_seed(2)
        for m in model.modules():
            if isinstance(m, MaskedLinear):
                grid = torch.rand(-(-m.out_features // 16), -(-m.in_features // 16), generator=g) < 0.4
                grid[0, 0] = True
                m.set_mask(BlockMask.from_block_grid(grid, 16, (m.out_features, m.in_features)))
    batch = token_batch(model.config)
    with torch.no_grad():
        expected = model(**batch).logits
    save(model, tmp_path / "sparse", format="sparse")
    with torch.inference_mode(), mock.patch("capkit.nn.masked_linear.csr_linear", wraps=csr_linear) as kernel:
        loaded = capkit.load(tmp_path / "sparse")
        for _ in range(3):
            torch.testing.assert_close(loaded(**batch).logits, expected, atol=1e-5, rtol=1e-5)
    assert kernel.call_count > 0


@pytest.mark.parametrize("kind", ["bool", "block"])
def test_functional_csr_cache_sees_fused_optimiser_updates(kind, monkeypatch):
    """masked_linear on a raw weight tensor caches its CSR on the mask (or layout). AdamW with
    fused=True writes the weight in place without a version bump; the gradient the weight received
    before must still invalidate the cache (it did not: the kernel ran the old weight)."""
    from capkit.ops import BlockMask, masked_linear

    monkeypatch.setattr(sparse_format, "csr_max_density", lambda dtype=torch.float32: 0.5)
    g = torch.Generator().manual_seed(0)
    w = torch.randn(32, 48, generator=g, requires_grad=True)
    dense = torch.rand(32, 48, generator=g) < 0.2
    if kind == "block":
        grid = torch.tensor([[1, 0, 0], [0, 0, 1]], dtype=torch.bool)  # 2 of 6 blocks live
        live = grid.repeat_interleave(16, 0).repeat_interleave(16, 1)
        mask = BlockMask.from_dense(live & dense, 16)
        dense = mask.to_dense().bool()
    else:
        mask = dense
    x = torch.randn(5, 48, generator=g)
    with mock.patch.object(sparse_format, "csr_kernel_call", wraps=sparse_format.csr_kernel_call) as kernel:
        with torch.no_grad():
            for _ in range(2):  # a block layout reaches the CSR kernel from its second call
                before = masked_linear(x, w, mask)
        assert kernel.call_count >= 1
        opt = torch.optim.AdamW([w], lr=0.5, fused=True)
        masked_linear(x, w, mask).sum().backward()
        version = w._version
        opt.step()
        assert w._version == version  # the case at hand: no version bump
        with torch.no_grad():
            after = masked_linear(x, w, mask)
            calls = kernel.call_count
    expected = F.linear(x.double(), torch.where(dense, w.detach().double(), torch.zeros((), dtype=torch.float64)))
    assert calls >= 2 and not torch.allclose(before, after)
    torch.testing.assert_close(after.double(), expected, atol=1e-5, rtol=1e-5)
