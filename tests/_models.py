"""Small transformers models for tests (random weights, odd sizes)."""
import csv
import random
from pathlib import Path

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


WORDS = {0: ["apple", "banana", "pear", "plum"], 1: ["car", "truck", "bus", "train"], 2: ["sun", "rain", "snow", "wind"]}
NOISE = ["the", "a", "of", "and", "is", "big", "small", "red", "blue", "old"]


def _write_texts(path, n, seed):
    rng = random.Random(seed)
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["text", "label"])
        for i in range(n):
            label = i % 3
            words = rng.sample(WORDS[label], 2) + rng.sample(NOISE, 4)
            rng.shuffle(words)
            w.writerow([" ".join(words), ["fruit", "vehicle", "weather"][label]])


def tiny_text_task(root):
    """A tiny BERT (``root/model``, its own WordPiece vocabulary) and a 3-class text task
    (``root/train.csv``, ``root/dev.csv``) that it can learn in a few steps; returns ``root``."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + sorted({w for ws in WORDS.values() for w in ws} | set(NOISE))
    (root / "vocab.txt").write_text("\n".join(vocab) + "\n")
    if int(transformers.__version__.split(".")[0]) >= 5:  # 5.x takes the vocabulary itself ...
        tok = transformers.BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)})
    else:  # ... 4.x its file (5.x ignores a vocab_file argument and maps every word to [UNK])
        tok = transformers.BertTokenizerFast(vocab_file=str(root / "vocab.txt"))
    ids = tok("apple car sun")["input_ids"]
    if tok.unk_token_id in ids or len(ids) != 5:
        raise RuntimeError(f"the tiny tokenizer does not know its own words: {ids}")
    cfg = transformers.BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=32, hidden_dropout_prob=0.1,
                                  attention_probs_dropout_prob=0.1)
    torch.manual_seed(0)
    transformers.BertModel(cfg).save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    _write_texts(root / "train.csv", 48, 0)
    _write_texts(root / "dev.csv", 24, 1)
    return root
