"""The fast inference forward of BERT-family layers (capkit.nn.use_fast_layers, used by
capkit.load): the same outputs as the layer's own forward, taken only where every step runs on
capkit's CPU kernels, and the layer's own forward on every other call."""
import copy
import pickle
from unittest import mock

import pytest
import torch

from capkit.nn import MaskedLinear, fuse_for_inference, patch_model, use_cpu_attention, use_fast_layers
from capkit.nn import fast_layer
from capkit.nn.attention import cpu_attention_available
from capkit.ops import backend_status
from capkit.ops import sparse_format

pytestmark = pytest.mark.skipif(backend_status(torch.device("cpu"))["cpu"] is not None
                                or not cpu_attention_available(),
                                reason="capkit._C with the vectorised CPU attention is not available")


@pytest.fixture(autouse=True)
def csr_threshold():
    with mock.patch.object(sparse_format, "csr_max_density", lambda dtype=torch.float32: 0.3):
        yield


def _models(**overrides):
    """(plain: the pruned model on its modules' own forwards, fast: a copy with fast layers)."""
    from _models import tiny_bert

    model = tiny_bert(**overrides)
    patch_model(model)
    g = torch.Generator().manual_seed(5)
    for m in model.modules():
        if isinstance(m, MaskedLinear):
            mask = torch.rand(m.out_features, m.in_features, generator=g) < 0.15
            mask[0] = False  # an empty row
            m.set_mask(mask)
    with torch.no_grad():  # transformers starts biases at 0 and LayerNorms at 1 / 0: make them count
        for name, p in model.named_parameters():
            if name.endswith("bias") or "LayerNorm" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.5)
    fuse_for_inference(model)
    assert use_cpu_attention(model)
    fast = copy.deepcopy(model)
    assert use_fast_layers(fast) == model.config.num_hidden_layers
    return model, fast


def _batch(config, **kw):
    from _models import token_batch

    return token_batch(config, **kw)


def _run_counter():
    return mock.patch.object(fast_layer, "_run", wraps=fast_layer._run)


@pytest.mark.parametrize("shape", [(3, 9), (1, 1), (2, 17)])
def test_fast_layers_match_the_layers_own_forward(shape):
    plain, fast = _models()
    batch = _batch(plain.config, batch=shape[0], seq=shape[1])
    batch["attention_mask"][-1, :] = 1  # one sequence without padding
    with torch.inference_mode():
        expected = plain(**batch).logits
        first = fast(**batch).logits  # first call: the layers' own forward (it sets up the CSR decisions)
        with _run_counter() as run:
            again = fast(**batch).logits
    assert run.call_count == plain.config.num_hidden_layers
    torch.testing.assert_close(first, expected, atol=0, rtol=0)
    torch.testing.assert_close(again, expected, atol=1e-6, rtol=1e-5)


def test_fast_layers_match_the_float64_model():
    plain, fast = _models()
    batch = _batch(plain.config)
    ref = copy.deepcopy(plain)
    for m in ref.modules():
        if isinstance(m, MaskedLinear):
            m.backend = "torch"
    ref = ref.double()
    ref.config._attn_implementation = "eager"
    with torch.inference_mode():
        fast(**batch)
        y = fast(**batch).logits
        expected = ref(**batch).logits
    torch.testing.assert_close(y.double(), expected, atol=1e-5, rtol=1e-5)


def test_fast_layers_keep_class_state_and_pickling():
    from transformers.modeling_layers import GradientCheckpointingLayer
    from transformers.models.bert.modeling_bert import BertLayer

    plain, fast = _models()
    assert list(fast.state_dict()) == list(plain.state_dict())
    layer = fast.bert.encoder.layer[0]
    assert isinstance(layer, BertLayer) and isinstance(layer, GradientCheckpointingLayer)
    assert type(layer).__name__ == "BertLayer"
    assert use_fast_layers(fast) == 0  # already there
    batch = _batch(plain.config)
    with torch.inference_mode():
        fast(**batch)
        expected = fast(**batch).logits
    for clone in (pickle.loads(pickle.dumps(fast)), copy.deepcopy(fast)):
        assert all(isinstance(x, fast_layer._FastLayer) for x in clone.bert.encoder.layer)
        with torch.inference_mode():
            clone(**batch)
            with _run_counter() as run:
                torch.testing.assert_close(clone(**batch).logits, expected, atol=1e-6, rtol=1e-5)
        assert run.call_count == plain.config.num_hidden_layers
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        use_fast_layers("model")


def _no_fast_calls(fast, batch, expected, **kw):
    with _run_counter() as run:
        out = fast(**batch, **kw)
        torch.testing.assert_close(out.logits, expected, atol=1e-6, rtol=1e-5)
    assert run.call_count == 0
    return out


def test_calls_the_fast_path_does_not_take_run_the_layers_own_forward():
    plain, fast = _models()
    batch = _batch(plain.config)
    with torch.inference_mode():
        expected = plain(**batch).logits
        fast(**batch)
    with torch.no_grad():
        fast(**batch)
        with _run_counter() as run:
            fast(**batch)
        assert run.call_count == plain.config.num_hidden_layers  # no_grad is inference too
    # autograd on
    _no_fast_calls(fast, batch, expected)
    with torch.inference_mode():
        # attentions and hidden states asked for: transformers records them with hooks
        out = _no_fast_calls(fast, batch, expected, output_attentions=True, output_hidden_states=True)
        ref = plain(**batch, output_attentions=True, output_hidden_states=True)
        assert len(out.hidden_states) == len(ref.hidden_states) == plain.config.num_hidden_layers + 1
        for a, b in zip(out.hidden_states, ref.hidden_states):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
        # hidden states alone are recorded around each layer: the fast path still runs
        with _run_counter() as run:
            out = fast(**batch, output_hidden_states=True)
        assert run.call_count == plain.config.num_hidden_layers
        for a, b in zip(out.hidden_states, ref.hidden_states, strict=True):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
        # a hook on a module inside a layer
        seen = []
        handle = fast.bert.encoder.layer[1].intermediate.register_forward_hook(lambda m, i, o: seen.append(o.shape))
        try:
            with _run_counter() as run:
                torch.testing.assert_close(fast(**batch).logits, expected, atol=1e-6, rtol=1e-5)
        finally:
            handle.remove()
        assert len(seen) == 1 and run.call_count == plain.config.num_hidden_layers - 1
        # the attention switched back to transformers' SDPA
        fast.config._attn_implementation = "sdpa"
        try:
            _no_fast_calls(fast, batch, expected)
        finally:
            fast.config._attn_implementation = plain.config._attn_implementation
        # a linear layer denser than the CSR kernel takes
        layer = fast.bert.encoder.layer[2]
        layer.output.dense.set_mask(torch.ones_like(layer.output.dense.mask))
        plain.bert.encoder.layer[2].output.dense.set_mask(torch.ones_like(layer.output.dense.mask))
        dense_expected = plain(**batch).logits
        with _run_counter() as run:
            for _ in range(2):
                torch.testing.assert_close(fast(**batch).logits, dense_expected, atol=1e-6, rtol=1e-5)
        assert run.call_count == 2 * (plain.config.num_hidden_layers - 1)
    fast.train()
    with torch.no_grad():
        _no_fast_calls(fast, batch, dense_expected)


def test_a_weight_written_in_place_is_seen():
    plain, fast = _models()
    batch = _batch(plain.config)
    with torch.inference_mode():
        fast(**batch)
        fast(**batch)
    for model in (plain, fast):
        with torch.no_grad():
            model.bert.encoder.layer[0].intermediate.dense.weight.mul_(3.0)
            model.bert.encoder.layer[1].attention.self.value.bias.add_(1.0)
            model.bert.encoder.layer[2].output.LayerNorm.weight.mul_(0.5)
    with torch.inference_mode():
        expected = plain(**batch).logits
        for _ in range(2):
            torch.testing.assert_close(fast(**batch).logits, expected, atol=1e-6, rtol=1e-5)


def test_gradient_checkpointing_still_trains():
    plain, fast = _models()
    fast.gradient_checkpointing_enable()
    assert all(layer.gradient_checkpointing for layer in fast.bert.encoder.layer)
    fast.train()
    batch = _batch(plain.config)
    plain.train()
    fast(**batch).logits.square().sum().backward()
    plain(**batch).logits.square().sum().backward()
    for (n, p), q in zip(fast.named_parameters(), plain.parameters()):
        if q.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4, msg=n)


def test_capkit_load_gives_fast_layers(tmp_path):
    import capkit
    from capkit.export import save

    plain, _ = _models()
    save(plain, tmp_path / "s", format="sparse")
    loaded = capkit.load(tmp_path / "s")
    assert all(isinstance(x, fast_layer._FastLayer) for x in loaded.bert.encoder.layer)
    batch = _batch(plain.config)
    with torch.inference_mode():
        expected = plain(**batch).logits
        loaded(**batch)
        with _run_counter() as run:
            torch.testing.assert_close(loaded(**batch).logits, expected, atol=1e-6, rtol=1e-5)
    assert run.call_count == plain.config.num_hidden_layers


def _compiled_graph_ops(fast, batch):
    """Compile ``fast`` (aot_eager, one graph) and return (its logits, the op names in the graph)."""
    import torch._dynamo

    torch._dynamo.reset()
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(fast, backend=backend, fullgraph=True)
    out = [compiled(**batch).logits for _ in range(2)]
    torch.testing.assert_close(out[0], out[1], atol=0, rtol=0)
    targets = [str(n.target) for g in graphs for n in g.graph.nodes if n.op == "call_function"]
    return out[1], targets, len(graphs)


def test_compiled_fast_model_has_one_node_per_layer():
    """Under torch.compile each fast layer is one capkit::encoder_layer_fused node (which sends
    the layer to the C++ layer op when the graph runs), in one graph, with the outputs of the
    layers' own forwards."""
    plain, fast = _models()
    batch = _batch(plain.config)
    with torch.no_grad():
        expected = plain(**batch).logits
        got, targets, n_graphs = _compiled_graph_ops(fast, batch)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert n_graphs == 1
    assert sum("encoder_layer_fused" in t for t in targets) == plain.config.num_hidden_layers
    assert not any("masked_linear" in t for t in targets)


def test_compiled_layer_node_runs_its_steps_when_a_linear_is_too_dense():
    """A linear too dense for the CSR kernel: the node runs the six masked-linear steps and the
    attention kernel one by one when the graph runs, and gives the same outputs."""
    plain, fast = _models()
    for model in (plain, fast):
        dense_mask = torch.ones_like(model.bert.encoder.layer[0].intermediate.dense.mask)
        model.bert.encoder.layer[0].intermediate.dense.set_mask(dense_mask)
    batch = _batch(plain.config)
    with torch.no_grad():
        expected = plain(**batch).logits
        with mock.patch.object(torch.ops.capkit, "encoder_layer_forward",
                               wraps=torch.ops.capkit.encoder_layer_forward) as layer_op:
            got, targets, _ = _compiled_graph_ops(fast, batch)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert sum("encoder_layer_fused" in t for t in targets) == plain.config.num_hidden_layers
    # two compiled calls: the C++ layer op for every layer but the first
    assert layer_op.call_count == 2 * (plain.config.num_hidden_layers - 1)


def _reference_layer(x, mask, heads, scale, weights, biases, ln1, ln2):
    """The encoder layer in float64 PyTorch: weights are the six dense (already masked) matrices."""
    x = x.double()
    lin = [(w.double(), None if b is None else b.double()) for w, b in zip(weights, biases)]

    def dense(t, i):
        return torch.nn.functional.linear(t, *lin[i])

    def norm(t, ln):
        w, b, eps = ln
        return torch.nn.functional.layer_norm(t, (t.shape[-1],), None if w is None else w.double(),
                                              None if b is None else b.double(), eps)

    bsz, s, h = x.shape
    split = lambda t: t.view(bsz, s, heads, h // heads).transpose(1, 2)  # noqa: E731
    q, k, v = (split(dense(x, i)) for i in range(3))
    scores = q @ k.transpose(-1, -2) * scale
    if mask is not None:
        scores = scores + mask.double()
    ctx = (scores.softmax(-1) @ v).transpose(1, 2).reshape(bsz, s, h)
    a = norm(dense(ctx, 3) + x, ln1)
    f = torch.nn.functional.gelu(dense(a, 4))
    return norm(dense(f, 5) + a, ln2)


def _layer_op_args(hidden, inter, heads, density=0.2, seed=0, bias=True, affine=True):
    g = torch.Generator().manual_seed(seed)
    shapes = [(hidden, hidden)] * 4 + [(inter, hidden), (hidden, inter)]
    weights, packs = [], []
    for n, k in shapes:
        w = torch.randn(n, k, generator=g) / k ** 0.5
        mask = torch.rand(n, k, generator=g) < density
        mask[0] = False  # an empty row
        w_nan = w.masked_fill(~mask, float("nan"))  # pruned entries are never read
        packs.append(sparse_format.pack_csr(w_nan, mask))
        weights.append(w * mask)
    biases = [torch.randn(n, generator=g) if bias else None for n, _ in shapes]
    ln = [((torch.randn(hidden, generator=g) if affine else None), (torch.randn(hidden, generator=g) if affine else None),
           eps) for eps in (1e-12, 1e-5)]
    return weights, packs, biases, ln


def _call_layer_op(x, mask, heads, scale, packs, biases, ln):
    return torch.ops.capkit.encoder_layer_forward(
        x, mask, heads, scale, [p.ptr for p in packs], [p.col_idx for p in packs], [p.values for p in packs], biases,
        [p.shape[0] for p in packs], [p.panel for p in packs], [p.row_quads for p in packs], *ln[0], *ln[1])


@pytest.mark.parametrize("bsz,seq,hidden,heads,inter", [(1, 1, 32, 4, 48), (2, 13, 48, 3, 100), (3, 70, 64, 4, 130)])
@pytest.mark.parametrize("mask_kind", ["none", "keys", "full"])
@pytest.mark.parametrize("bias_affine", [True, False])
def test_encoder_layer_op_matches_the_reference(bsz, seq, hidden, heads, inter, mask_kind, bias_affine):
    weights, packs, biases, ln = _layer_op_args(hidden, inter, heads, seed=seq, bias=bias_affine, affine=bias_affine)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(bsz, seq, hidden, generator=g)
    mask = None
    if mask_kind == "keys":  # padding: [B, 1, 1, S] broadcast over heads and queries
        mask = torch.zeros(bsz, 1, 1, seq)
        mask[-1, ..., seq // 2 + 1:] = float("-inf")
    elif mask_kind == "full":
        mask = torch.randn(bsz, heads, seq, seq, generator=g)
    scale = (hidden // heads) ** -0.5
    with torch.inference_mode():
        y = _call_layer_op(x, mask, heads, scale, packs, biases, ln)
    ref = _reference_layer(x, mask, heads, scale, weights, biases, ln[0], ln[1])
    assert y.shape == x.shape and y.dtype == torch.float32
    torch.testing.assert_close(y.double(), ref, atol=2e-4, rtol=1e-4)


def test_encoder_layer_op_rejects_bad_arguments():
    weights, packs, biases, ln = _layer_op_args(32, 48, 4)
    x = torch.randn(1, 5, 32)
    with pytest.raises(RuntimeError, match="takes 6 linear layers"):
        _call_layer_op(x, None, 4, 1.0, packs[:5], biases[:5], ln)
    with pytest.raises(RuntimeError, match="must divide the hidden size"):
        _call_layer_op(x, None, 5, 1.0, packs, biases, ln)
    with pytest.raises(RuntimeError, match=r"contiguous \[batch, positions, hidden\]"):
        _call_layer_op(x[0], None, 4, 1.0, packs, biases, ln)
    with pytest.raises(RuntimeError, match="must have 32 outputs"):
        _call_layer_op(x, None, 4, 1.0, [packs[4]] + packs[1:], biases, ln)


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("panel", [None, 40])
def test_encoder_layer_op_equals_its_kernel_calls_one_by_one(threads, panel):
    """The op's fused feed-forward pass (the hidden activations kept in the tile buffers) gives the
    same floats as the separate CSR calls, on both schedules (a tile per thread, and row chunks for
    fewer tiles than threads) and with panels."""
    from capkit.nn.attention import cpu_attention

    hidden, inter, heads = 32, 100, 4
    weights, packs, biases, ln = _layer_op_args(hidden, inter, heads, seed=3)
    if panel is not None:  # panelled CSR for every linear (the feed-forward output reads 3 panels)
        packs = [sparse_format.pack_csr(w, w != 0, panel=panel) for w in weights]
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        for tokens in (1, 3, 16, 40, 64, 129):
            x = torch.randn(1, tokens, hidden)
            call = lambda inp, i, *steps: sparse_format.csr_kernel_call(inp, packs[i], biases[i], *steps)  # noqa: E731
            with torch.inference_mode():
                got = _call_layer_op(x, None, heads, 0.3, packs, biases, ln)
                x2 = x.view(tokens, hidden)
                q, k, v = (call(x2, i).view(1, tokens, heads, -1).transpose(1, 2) for i in range(3))
                ctx = cpu_attention(q, k, v, None, 0.3).view(tokens, hidden)
                a = call(ctx, 3, 0, x2, True, *ln[0])
                want = call(call(a, 4, 1), 5, 0, a, True, *ln[1])
            torch.testing.assert_close(got.view(tokens, hidden), want, atol=0, rtol=0)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("too_dense", [False, True])
def test_opcheck_encoder_layer_node(too_dense):
    from torch.library import opcheck

    plain, fast = _models()
    layer = fast.bert.encoder.layer[1]
    if too_dense:  # the node's step-by-step path
        layer.output.dense.set_mask(torch.ones_like(layer.output.dense.mask))
    hidden = torch.randn(2, 7, plain.config.hidden_size)
    mask = torch.zeros(2, 1, 1, 7)
    mask[1, ..., 4:] = float("-inf")
    with torch.no_grad():
        parts = fast_layer._traced_parts(layer, hidden, mask, (), {})
        assert parts is not None
        args = fast_layer._layer_node_args(parts, hidden, mask)
        opcheck(torch.ops.capkit.encoder_layer_fused.default, args)
        own = layer._capkit_base.forward(layer, hidden, mask)  # the layer's own forward
        own = own[0] if isinstance(own, tuple) else own
        torch.testing.assert_close(torch.ops.capkit.encoder_layer_fused(*args), own, atol=1e-5, rtol=1e-5)
