"""capkit's ops as PyTorch custom ops: opcheck, and torch.compile through them without graph breaks."""
import json
import os

import pytest
import torch
import torch._dynamo
import torch._dynamo.testing
from torch.library import opcheck

from capkit.nn import MaskedLinear, patch_model, prepared_masks
from capkit.ops import BlockMask, NMMask, info_nce, masked_linear
from capkit.ops._backends import get_backend
from capkit.ops._library import CUSTOM_OPS, layout_tensors
from capkit.ops.info_nce import _STREAMING
from capkit.pruning import Pruner

from _models import tiny_bert, tiny_text_task, token_batch

CPU = torch.device("cpu")
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def _usable(name):
    return get_backend(name).unavailable_reason(CPU) is None


ML_BACKENDS = [b for b in ("torch", "cpu", "triton") if _usable(b)]
NCE_BACKENDS = [b for b in ("cpu", "triton") if _STREAMING[b].unavailable_reason(CPU) is None]


def test_every_op_is_registered_with_a_fake_kernel():
    for name in CUSTOM_OPS:
        ns, op = name.split("::")
        packet = getattr(getattr(torch.ops, ns), op)
        assert torch._C._dispatch_has_kernel_for_dispatch_key(packet.default.name(), "Meta") or \
            torch._C._dispatch_has_computed_kernel_for_dispatch_key(packet.default.name(), "Meta"), name


def _mask_case(kind, n, k, gen):
    """(mask argument of masked_linear, what the op receives: dense mask, layout, kind name)."""
    dense = torch.rand(n, k, generator=gen) > 0.4
    if kind == "none":
        return None, None, None, "none"
    if kind == "bool":
        return dense, dense, None, "dense"
    if kind == "float":
        m = torch.rand(n, k, generator=gen).requires_grad_()
        return m, m, None, "dense"
    if kind == "block":
        bm = BlockMask.from_dense(dense, 16)
        return bm, bm.mask, bm.layout, "block"
    nm = NMMask.from_scores(torch.randn(n, k, generator=gen))
    return nm, nm.mask, None, "nm"


@pytest.mark.parametrize("backend", ML_BACKENDS)
@pytest.mark.parametrize("kind", ["none", "bool", "float", "block", "nm"])
@pytest.mark.parametrize("bias", [True, False])
def test_opcheck_masked_linear(backend, kind, bias):
    gen = torch.Generator().manual_seed(3)
    n, k, rows = 40, 36, 7
    _, dense, layout, kind_name = _mask_case(kind, n, k, gen)
    x = torch.randn(rows, k, generator=gen, requires_grad=True)
    w = torch.randn(n, k, generator=gen, requires_grad=True)
    b = torch.randn(n, generator=gen, requires_grad=True) if bias else None
    args = (x, w, dense, b, *layout_tensors(layout), kind_name, True, backend)
    opcheck(torch.ops.capkit.masked_linear.default, args)
    g = torch.randn(rows, n, generator=gen)
    dense = dense.detach() if dense is not None else None  # the backward ops are not differentiated
    lists = (*layout_tensors(layout), kind_name, backend)
    opcheck(torch.ops.capkit.masked_linear_dx.default, (g, w.detach(), dense, *lists))
    need_m = dense is not None and dense.dtype.is_floating_point
    opcheck(torch.ops.capkit.masked_linear_dw.default, (g, x.detach(), w.detach(), dense, *lists, True, need_m))


@pytest.mark.parametrize("backend", NCE_BACKENDS)
@pytest.mark.parametrize("labels", [False, True])
@pytest.mark.parametrize("scaled", [False, True])
def test_opcheck_info_nce_stats(backend, labels, scaled):
    gen = torch.Generator().manual_seed(4)
    b, m, d = 6, 45, 20
    qs = torch.randn(b, d, generator=gen, requires_grad=True)
    keys = torch.randn(m, d, generator=gen)
    scale = torch.rand(m, generator=gen) + 0.5 if scaled else None
    qid, kid = torch.arange(b), torch.randint(0, b, (m,), generator=gen)
    qlab = torch.randint(0, 3, (b,), generator=gen) if labels else None
    klab = torch.randint(0, 3, (m,), generator=gen) if labels else None
    self_index = torch.tensor([0, -1, 5, 9, -1, 44])
    opcheck(torch.ops.capkit.info_nce_stats.default, (qs, keys, scale, qid, kid, qlab, klab, self_index, backend))
    stats = torch.ops.capkit.info_nce_stats(qs.detach(), keys, scale, qid, kid, qlab, klab, self_index, backend)
    coef = torch.randn(b, 3, generator=gen)
    opcheck(torch.ops.capkit.info_nce_stats_backward.default,
            (qs.detach(), keys, scale, qid, kid, qlab, klab, self_index, stats[:, 0].contiguous(), coef, backend))


def _compiled(fn):
    """``fn`` compiled with fullgraph=True (a graph break is an error) and a frame counter."""
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    return torch.compile(fn, backend=counter, fullgraph=True), counter


@pytest.mark.parametrize("backend", ["auto"] + ML_BACKENDS)
@pytest.mark.parametrize("kind", ["bool", "float", "block", "nm"])
def test_compiled_masked_linear_matches_eager(backend, kind):
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(5)
    mask, *_ = _mask_case(kind, 48, 40, gen)
    x = torch.randn(3, 5, 40, generator=gen, requires_grad=True)
    w = torch.randn(48, 40, generator=gen, requires_grad=True)
    b = torch.randn(48, generator=gen, requires_grad=True)

    def f(x, w, b):
        return masked_linear(x, w, mask, b, backend=backend)

    cf, counter = _compiled(f)
    inputs = [x, w, b] + ([mask] if kind == "float" else [])
    y_c = cf(x, w, b)
    g_c = torch.autograd.grad(y_c.square().sum(), inputs)
    y_e = f(x, w, b)
    g_e = torch.autograd.grad(y_e.square().sum(), inputs)
    torch.testing.assert_close(y_c, y_e)
    for a, e in zip(g_c, g_e):
        torch.testing.assert_close(a, e)
    assert counter.frame_count == 1


@pytest.mark.parametrize("backend", ["auto"] + NCE_BACKENDS)
def test_compiled_info_nce_matches_eager(backend):
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(6)
    q = torch.randn(8, 16, generator=gen, requires_grad=True)
    keys = torch.randn(70, 16, generator=gen)
    qid, kid = torch.arange(8), torch.randint(0, 8, (70,), generator=gen)
    qlab, klab = torch.randint(0, 2, (8,), generator=gen), torch.randint(0, 2, (70,), generator=gen)
    si = torch.tensor([0, 3, -1, 7, 9, -1, 60, 2])

    def f(q):
        return info_nce(q, keys, qid, kid, query_labels=qlab, key_labels=klab, self_index=si, unsup_weight=0.1,
                        sup_weight=10.0, backend=backend)

    cf, counter = _compiled(f)
    loss_c = cf(q)
    (g_c,) = torch.autograd.grad(loss_c, q)
    loss_e = f(q)
    (g_e,) = torch.autograd.grad(loss_e, q)
    ref = info_nce(q, keys, qid, kid, query_labels=qlab, key_labels=klab, self_index=si, unsup_weight=0.1,
                   sup_weight=10.0, backend="torch")
    (g_ref,) = torch.autograd.grad(ref, q)
    torch.testing.assert_close(loss_c, loss_e)
    torch.testing.assert_close(g_c, g_e)
    torch.testing.assert_close(loss_c, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g_c, g_ref, rtol=1e-4, atol=1e-5)
    assert counter.frame_count == 1


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _fixed_masks(model, kind):
    gen = torch.Generator().manual_seed(7)
    for m in model.modules():
        if isinstance(m, MaskedLinear):
            shape = (m.out_features, m.in_features)
            if kind == "bool":
                m.set_mask(torch.rand(shape, generator=gen) > 0.5)
            elif kind == "block":
                m.set_mask(BlockMask.from_dense(torch.rand(shape, generator=gen) > 0.5, 16))
            else:
                m.set_mask(NMMask.from_scores(torch.randn(shape, generator=gen)))


@pytest.mark.parametrize("kind", ["bool", "block", "nm", "movement", "block-movement"])
def test_compiled_patched_bert_forward_and_backward_match_eager(kind):
    torch._dynamo.reset()
    kw = dict(hidden_size=32, intermediate_size=48)  # N:M needs in_features divisible by 4
    model = tiny_bert(**kw).train()
    model.config.problem_type = "single_label_classification"  # else the first labelled forward sets it
    if kind in ("movement", "block-movement"):
        pruner = Pruner(model, kind, keep=0.6, block_size=16)
        with torch.no_grad():  # scores that are not all equal, so the top-k is a real choice
            for p in pruner.score_parameters():
                p.copy_(torch.randn_like(p))
    else:
        patch_model(model)
        _fixed_masks(model, kind)
    batch = token_batch(model.config)
    labels = torch.tensor([0, 2, 1])
    compiled, counter = _compiled(model)

    def step(forward, keep):
        if kind in ("movement", "block-movement"):
            for m in pruner.modules.values():
                m.set_keep(keep)
        model.zero_grad(set_to_none=True)
        with prepared_masks(model):
            out = forward(**batch, labels=labels)
        out.loss.backward()
        return out.logits.detach(), _grads(model)

    for keep in (0.6, 0.45):  # a new kept fraction is new mask values, not a new graph
        logits_c, grads_c = step(compiled, keep)
        logits_e, grads_e = step(model, keep)
        torch.testing.assert_close(logits_c, logits_e, rtol=1e-5, atol=1e-5)
        assert grads_c.keys() == grads_e.keys()
        for name in grads_e:
            torch.testing.assert_close(grads_c[name], grads_e[name], rtol=1e-4, atol=1e-5, msg=name)
        if kind in ("movement", "block-movement"):
            assert any(n.endswith("scores") and g.abs().sum() > 0 for n, g in grads_c.items())
    assert counter.frame_count == 1


def test_compiled_inference_of_a_pruned_bert_matches_eager():
    torch._dynamo.reset()
    model = tiny_bert()
    patch_model(model)
    _fixed_masks(model, "bool")
    batch = token_batch(model.config)
    compiled, counter = _compiled(model)
    with torch.no_grad():
        torch.testing.assert_close(compiled(**batch).logits, model(**batch).logits, rtol=1e-5, atol=1e-5)
    assert counter.frame_count == 1


def test_cap_step_under_compile_matches_eager(tmp_path):
    from capkit.cap.config import CAPConfig
    from capkit.cap.trainer import CAPRun

    torch._dynamo.reset()
    tiny = tiny_text_task(tmp_path / "tiny")
    # No dropout: a compiled graph draws its random numbers differently from eager mode.
    config = json.loads((tiny / "model" / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (tiny / "model" / "config.json").write_text(json.dumps(config))

    def run(out, compile_):
        cfg = CAPConfig(model=str(tiny / "model"), task="text", train_file=str(tiny / "train.csv"),
                        dev_file=str(tiny / "dev.csv"), output_dir=str(out), epochs=1.0, batch_size=16,
                        max_length=16, teacher_epochs=1, extra_negatives=8, learning_rate=1e-3, progress=False,
                        tensorboard=False, save_every=0, initial_warmup=0.5, final_warmup=0.5, sparsity=0.5,
                        export_formats=["dense"], compile=compile_)
        report = CAPRun(cfg).fit()
        log = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
        return report, [r for r in log if r["kind"] == "train"]

    report_c, log_c = run(tmp_path / "compiled", True)
    report_e, log_e = run(tmp_path / "eager", False)
    assert len(log_c) == len(log_e) > 0
    for a, b in zip(log_c, log_e):
        for part in ("loss", "ce", "kd", "prc", "fic", "snc"):
            if part in b:
                assert a[part] == pytest.approx(b[part], rel=1e-3, abs=1e-4), part
    assert {"prc", "fic"} <= set(log_c[-1])
    assert report_c["pruned"]["sparsity"] == pytest.approx(report_e["pruned"]["sparsity"])
