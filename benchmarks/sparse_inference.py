"""Inference latency of ``sparse`` exports against the dense model.

A BERT-base-shaped classifier (random weights from ``BertConfig()``; latency does not depend on
the values) is pruned by magnitude to 90% / 95% sparsity per encoder linear, unstructured, in
32x32 blocks, and 2:4; each model is saved with ``capkit.export.save(..., format="sparse")``,
loaded back with ``capkit.load`` (masked layers on capkit's ops, ``backend="auto"``), and timed
against the dense model it came from. The file sizes of the exports are reported too.

Usage:
  python -m benchmarks.sparse_inference           # BERT-base, batch 1 and 32, seq 128
  python -m benchmarks.sparse_inference --quick   # a small BERT, batch 1 and 4, seq 32
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Dict, List

import torch

from benchmarks.harness import machine_info, markdown_table, publish, time_fn

KINDS = ("unstructured", "block32", "2:4")


def _model(quick: bool):
    import transformers

    if quick:
        cfg = transformers.BertConfig(hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=512, vocab_size=1000)
    else:
        cfg = transformers.BertConfig()
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(cfg).eval()


def _prune(model, kind: str, sparsity: float):
    from capkit.pruning import Pruner

    if kind == "2:4":
        pruner = Pruner(model, "nm-magnitude")
    elif kind == "block32":
        # magnitude of each 32x32 block: block scores initialised to the blocks' L1 norms
        pruner = Pruner(model, "block-movement", block_size=32, keep=1.0 - sparsity)
        with torch.no_grad():
            for m, s in zip(pruner.modules.values(), pruner.score_parameters()):
                w = m.weight.detach().abs()
                s.copy_(torch.nn.functional.avg_pool2d(w[None, None], 32, ceil_mode=True)[0, 0])
    else:
        pruner = Pruner(model, "magnitude", keep=1.0 - sparsity)
    pruner.finalize()
    return model


def run(args) -> Dict:
    import capkit
    from capkit.export import save

    device = torch.device("cpu")
    rows: List[Dict] = []
    failures: List[Dict] = []
    shapes = [(1, 32), (4, 32)] if args.quick else [(1, 128), (32, 128)]
    plans = [(k, s) for k in KINDS for s in ((0.5,) if k == "2:4" else args.sparsities)]
    dense = _model(args.quick)
    vocab = dense.config.vocab_size
    inputs = {shape: torch.randint(1, vocab, shape) for shape in shapes}
    with tempfile.TemporaryDirectory() as tmp:
        dense_dir = Path(tmp) / "dense"
        save(_model(args.quick), dense_dir, format="dense")
        dense_bytes = sum(f.stat().st_size for f in dense_dir.glob("*.safetensors"))
        try:
            from tqdm import tqdm
            plans_iter = tqdm(plans, desc="sparse_inference", unit="model")
        except ImportError:  # pragma: no cover
            plans_iter = plans
        for kind, sparsity in plans_iter:
            try:
                model = _prune(_model(args.quick), kind, sparsity)
                out = Path(tmp) / f"{kind.replace(':', '_')}_{sparsity}"
                save(model, out, format="sparse")
                size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
                loaded = capkit.load(out)
                report = capkit.sparsity_report(loaded)
                for shape, ids in inputs.items():
                    with torch.inference_mode():
                        # dense and sparse timed back to back, so both see the same machine state
                        td = time_fn(lambda: dense(input_ids=ids), device, args.min_time)
                        t = time_fn(lambda: loaded(input_ids=ids), device, args.min_time)
                    rows.append({
                        "kind": kind, "sparsity": round(report.sparsity, 4), "batch": shape[0], "seq": shape[1],
                        "dense_ms": td["median_s"] * 1e3, "sparse_ms": t["median_s"] * 1e3,
                        "speedup": td["median_s"] / t["median_s"],
                        "iqr_ms": t["iqr_s"] * 1e3, "file_mb": size / 2**20, "dense_file_mb": dense_bytes / 2**20,
                    })
            except Exception as exc:  # a failing case is reported, not hidden
                failures.append({"kind": kind, "sparsity": sparsity, "error": f"{type(exc).__name__}: {exc}"})
    return {
        "benchmark": "sparse_inference", "machine": machine_info(device), "quick": args.quick,
        "model": "BertForSequenceClassification " + ("(small)" if args.quick else "(BERT-base shape, random)"),
        "dtype": "float32", "threads": torch.get_num_threads(), "rows": rows, "failures": failures,
    }


def summary_markdown(result: Dict) -> str:
    m = result["machine"]
    lines = [f"# sparse exports: inference latency ({m.get('device_name', m.get('cpu', 'cpu'))}, "
             f"{result['dtype']}, {result['threads']} threads)", "",
             f"{result['model']}; torch {m.get('torch')}, commit {m.get('git_commit')}.", "",
             markdown_table(result["rows"], ["kind", "sparsity", "batch", "seq", "dense_ms", "sparse_ms",
                                             "speedup", "file_mb", "dense_file_mb"])]
    for f in result["failures"]:
        lines.append(f"- FAILED {f['kind']} {f['sparsity']}: {f['error']}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a small BERT and short sequences")
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.9, 0.95])
    p.add_argument("--min-time", type=float, default=1.0)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if not all(0.0 <= s < 1.0 for s in args.sparsities):
        p.error(f"--sparsities must lie in [0, 1), got {args.sparsities}")
    result = run(args)
    publish("sparse_inference", torch.device("cpu"), result, summary_markdown(result), args.quick, args.out)
    return 1 if result["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
