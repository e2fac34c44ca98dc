"""Small transformers models for tests (random weights, odd sizes)."""
import torch
import transformers


def tiny_bert_config(**overrides) -> "transformers.BertConfig":
    kw = dict(vocab_size=61, hidden_size=24, num_hidden_layers=3, num_attention_heads=4,
              intermediate_size=37, max_position_embeddings=32, hidden_dropout_prob=0.0,
              attention_probs_dropout_prob=0.0, num_labels=3)
    kw.update(overrides)
    return transformers.BertConfig(**kw)


def tiny_bert(cls=transformers.BertForSequenceClassification, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    return cls(tiny_bert_config(**overrides)).eval()


def token_batch(config, batch: int = 3, seq: int = 9, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, config.vocab_size, (batch, seq), generator=g)
    attn = torch.ones(batch, seq, dtype=torch.long)
    attn[0, seq - 3:] = 0  # some padding
    return {"input_ids": ids, "attention_mask": attn}
