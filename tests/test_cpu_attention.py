"""capkit's CPU attention kernel against the float64 reference (both of its paths, masks of every
form, strided inputs, both thread schedules), its argument checks, and the transformers attention
function that capkit.load installs: same logits as SDPA, the kernel on inference calls only,
autograd and compile."""
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

from capkit._ext import build_info, load_extension
from capkit.nn import attention as A

pytestmark = pytest.mark.skipif("attention_vectorised" not in build_info(),
                                reason="capkit._C (the C++ CPU kernels) is not built")


def reference(q, k, v, mask, scale):
    """float64 softmax(q k^T scale + mask) v as [B, Sq, H, D]; rows with every key removed give 0."""
    s = torch.einsum("bhid,bhjd->bhij", q.double(), k.double()) * scale
    if mask is not None:
        s = s + (torch.where(mask, 0.0, float("-inf")) if mask.dtype == torch.bool else mask.double())
    dead = torch.isinf(s).all(-1, keepdim=True) & (s < 0).all(-1, keepdim=True)
    p = torch.softmax(s.masked_fill(dead, 0.0), -1).masked_fill(dead, 0.0)
    return torch.einsum("bhij,bhjd->bihd", p, v.double())


@pytest.fixture(params=["vectorised", "plain"])
def path(request):
    ext = load_extension()
    if request.param == "vectorised" and not build_info()["attention_vectorised"]:
        pytest.skip("no AVX-512 on this CPU")
    ext._attention_force_plain(request.param == "plain")
    yield request.param
    ext._attention_force_plain(False)


def _qkv(b, h, sq, sk, d, g, layout="model"):
    if layout == "model":  # the transposed views of [B, S, H, D] projections a model hands over
        return tuple(torch.randn(b, s, h, d, generator=g).transpose(1, 2) for s in (sq, sk, sk))
    return tuple(torch.randn(b, h, s, d, generator=g) for s in (sq, sk, sk))


# (B, H, Sq, Sk, D): MiniLM and BERT-base heads, partial 16-key and 16-feature vectors, one query
# and one key, more than 64 features (two register tiles), fewer heads than threads (row parts)
SHAPES = [(1, 12, 128, 128, 32), (2, 12, 40, 40, 64), (2, 3, 5, 7, 19), (1, 2, 1, 1, 1), (3, 4, 33, 65, 64),
          (1, 1, 9, 200, 130), (1, 1, 70, 17, 8)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("mask_kind", ["none", "padding", "full float", "broadcast rows", "strided"])
@pytest.mark.parametrize("threads", [1, 3])
def test_kernel_matches_reference(path, shape, mask_kind, threads):
    b, h, sq, sk, d = shape
    g = torch.Generator().manual_seed(sq * 31 + sk + d)
    q, k, v = _qkv(b, h, sq, sk, d, g, "model" if d % 2 else "plain")
    if mask_kind == "none":
        mask = None
    elif mask_kind == "padding":  # bool, [B, 1, 1, Sk], what a padded batch gives
        mask = torch.rand(b, 1, 1, sk, generator=g) > 0.3
        mask[..., 0] = True
    elif mask_kind == "full float":
        mask = torch.randn(b, h, sq, sk, generator=g)
        mask[:, :, 0, : sk // 2] = float("-inf")
    elif mask_kind == "broadcast rows":
        mask = torch.randn(1, 1, sq, sk, generator=g)
    else:  # a transposed view: the key dimension is not contiguous
        mask = torch.randn(b, h, sk, sq, generator=g).transpose(-1, -2)
    scale = 0.7 / d ** 0.5
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        y = A.cpu_attention(q, k, v, mask, scale)
    finally:
        torch.set_num_threads(before)
    assert y.shape == (b, sq, h, d) and y.is_contiguous()
    torch.testing.assert_close(y.double(), reference(q, k, v, mask, scale), atol=2e-6, rtol=1e-5)


def test_kernel_agrees_with_torch_sdpa_and_removed_rows_give_zeros(path):
    g = torch.Generator().manual_seed(3)
    q, k, v = _qkv(2, 4, 6, 21, 16, g)
    mask = torch.rand(2, 1, 6, 21, generator=g) > 0.4
    mask[1, 0, 2] = False  # a query with every key removed
    y = A.cpu_attention(q, k, v, mask)  # default scale 1 / sqrt(D)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2)
    torch.testing.assert_close(y, expected, atol=2e-6, rtol=1e-5)
    assert torch.equal(y[1, 2], torch.zeros(4, 16))
    empty = A.cpu_attention(q, k[:, :, :0], v[:, :, :0])  # no keys at all
    assert empty.shape == (2, 6, 4, 16) and not empty.any()


def test_inputs_with_a_strided_feature_dimension_are_copied():
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 2, 16, 5, generator=g).transpose(-1, -2) for _ in range(3))  # [1, 2, 5, 16], stride 5
    torch.testing.assert_close(A.cpu_attention(q, k, v).double(), reference(q, k, v, None, 16 ** -0.5),
                               atol=2e-6, rtol=1e-5)


def test_argument_errors():
    q = torch.randn(1, 2, 3, 4)
    with pytest.raises(ValueError, match="q must be a 4-D"):
        A.cpu_attention(q[0], q, q)
    with pytest.raises(TypeError, match="k must be a float32 CPU"):
        A.cpu_attention(q, q.double(), q)
    with pytest.raises(ValueError, match="mask must be a 4-D"):
        A.cpu_attention(q, q, q, torch.zeros(3, 3))
    op = torch.ops.capkit.attention_forward
    with pytest.raises(RuntimeError, match="k must be"):
        op(q, torch.randn(1, 2, 3, 5), torch.randn(1, 2, 3, 5), None, 1.0)
    with pytest.raises(RuntimeError, match="v must have k's shape"):
        op(q, q, torch.randn(1, 2, 4, 4), None, 1.0)
    with pytest.raises(RuntimeError, match="broadcastable"):
        op(q, q, q, torch.zeros(1, 1, 2, 3), 1.0)
    with pytest.raises(RuntimeError, match="stride 1"):
        op(q, q, torch.randn(1, 2, 4, 3).transpose(-1, -2), None, 1.0)


def _bert(**overrides):
    from _models import tiny_bert

    return tiny_bert(**overrides)


needs_vector_path = pytest.mark.skipif(not build_info().get("attention_vectorised"), reason="no AVX-512 on this CPU")


@needs_vector_path
def test_use_cpu_attention_gives_sdpa_logits_on_the_kernel():
    from _models import token_batch

    model, ref = _bert(), _bert()
    assert model.config._attn_implementation == "sdpa"
    assert A.use_cpu_attention(model)
    assert model.config._attn_implementation == A.ATTENTION_NAME and ref.config._attn_implementation == "sdpa"
    batch = token_batch(model.config)  # with padding
    with torch.no_grad(), mock.patch.object(A, "cpu_attention", wraps=A.cpu_attention) as kernel:
        got = model(**batch).logits
    assert kernel.call_count == model.config.num_hidden_layers
    with torch.no_grad():
        torch.testing.assert_close(got, ref(**batch).logits, atol=1e-5, rtol=1e-5)


@needs_vector_path
def test_training_calls_go_to_sdpa_and_differentiate():
    from _models import token_batch

    model, ref = _bert(attention_probs_dropout_prob=0.1), _bert(attention_probs_dropout_prob=0.1)
    A.use_cpu_attention(model)
    batch = token_batch(model.config)
    with mock.patch.object(A, "cpu_attention", wraps=A.cpu_attention) as kernel:
        for m in (model, ref):
            m.eval()
            m(**batch).logits.square().sum().backward()  # autograd on: SDPA
        model.train()
        torch.manual_seed(0)
        with torch.no_grad():
            model(**batch)  # dropout active: SDPA
    assert kernel.call_count == 0
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, atol=1e-6, rtol=1e-5, msg=name)


def test_use_cpu_attention_leaves_other_implementations():
    model = _bert(attn_implementation="eager")
    assert model.config._attn_implementation == "eager"
    assert not A.use_cpu_attention(model)
    assert model.config._attn_implementation == "eager"
    with pytest.raises(TypeError, match="nn.Module"):
        A.use_cpu_attention("model")


@needs_vector_path
def test_compiled_model_keeps_the_kernel():
    import torch._dynamo
    import torch._dynamo.testing
    from _models import token_batch

    torch._dynamo.reset()
    model, ref = _bert(), _bert()
    A.use_cpu_attention(model)
    batch = token_batch(model.config)
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    with torch.no_grad():
        got = torch.compile(model, backend=counter, fullgraph=True)(**batch).logits
        torch.testing.assert_close(got, ref(**batch).logits, atol=1e-5, rtol=1e-5)
    nodes = [str(n.target) for gm in counter.graphs for n in gm.graph.nodes]
    assert sum(n.startswith("capkit.attention_forward") for n in nodes) == model.config.num_hidden_layers


@needs_vector_path
def test_capkit_load_installs_the_attention(tmp_path):
    import capkit
    from capkit.export import save
    from capkit.nn import patch_model

    model = _bert()
    patch_model(model)
    save(model, tmp_path / "m", format="sparse")
    loaded = capkit.load(tmp_path / "m")
    assert loaded.config._attn_implementation == A.ATTENTION_NAME
