"""Inference latency of ``sparse`` exports against the dense model, in PyTorch and in ONNX Runtime.

BERT-family classifiers of the MiniLM-L6-H384 and BERT-base shapes (random weights from their
configs; latency does not depend on the values) are pruned by magnitude to 90% / 95% sparsity per
encoder linear, unstructured, in 32x32 blocks, and 2:4; each model is saved with
``capkit.export.save(..., format="sparse")``, loaded back with ``capkit.load`` (masked layers on
capkit's ops, ``backend="auto"``), and timed against two baselines of the dense model it came
from: torch dense (eager, ``inference_mode``) and ONNX Runtime dense (the model exported through
``torch.onnx``, CPU execution provider, ``intra_op_num_threads`` = torch's threads, one inter-op
thread, every graph optimisation). The two torch models run on the same inputs in interleaved
rounds, so they see the same machine; ONNX Runtime is timed in blocks of its own between them
(three parts, each torch rounds then an ONNX Runtime block, so a drifting load reaches both), with
its threads spinning between runs as it does by default (its best latency; interleaved call by
call, the spinning threads would slow the torch call after each of its runs). ONNX Runtime is optional
(``pip install capkit[bench]``): without it the benchmark says so and reports the torch baseline
alone. The file sizes of the exports are reported too.

Usage:
  python -m benchmarks.sparse_inference                        # MiniLM and BERT-base, 1x128 and 32x128
  python -m benchmarks.sparse_inference --models minilm        # one model
  python -m benchmarks.sparse_inference --quick                # a small BERT, 1x32 and 4x32
  python -m benchmarks.sparse_inference --compile              # both torch models via torch.compile
                                                               # (sparse_inference_compiled.json)
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Dict, List

import torch

from benchmarks.harness import (add_allocator_argument, allocator_text, apply_allocator, machine_info, markdown_table,
                                onnxruntime_info, ort_baseline_or_none, publish)
from benchmarks.structured_inference import time_interleaved

KINDS = ("unstructured", "block32", "2:4")
MODELS = ("minilm", "bert-base")


def _config(name: str):
    import transformers

    if name == "small":
        return transformers.BertConfig(hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                                       intermediate_size=512, vocab_size=1000)
    if name == "minilm":  # all-MiniLM-L6-v2's shape
        return transformers.BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                                       intermediate_size=1536)
    if name == "bert-base":
        return transformers.BertConfig()
    raise ValueError(f"unknown model {name!r}; choose one of {MODELS}")


def _model(name: str):
    import transformers

    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(_config(name)).eval()


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


def _torch_call(model, inputs):
    def run() -> None:
        with torch.inference_mode():
            model(**inputs)

    return run


def run(args) -> Dict:
    import capkit
    from capkit.export import save

    device = torch.device("cpu")
    rows: List[Dict] = []
    failures: List[Dict] = []
    shapes = [(1, 32), (4, 32)] if args.quick else args.shapes
    models = ["small"] if args.quick else args.models
    plans = [(k, s) for k in KINDS for s in ((0.5,) if k == "2:4" else args.sparsities)]
    ort = onnxruntime_info()
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None
    bar = tqdm(total=len(models) * len(plans), desc="sparse_inference", unit="model") if tqdm else None
    with tempfile.TemporaryDirectory() as tmp:
        for name in models:
            dense = _model(name)
            vocab = dense.config.vocab_size
            inputs = {}
            for b, sq in shapes:
                g = torch.Generator().manual_seed(b * 1000 + sq)
                ids = torch.randint(1, vocab, (b, sq), generator=g)
                inputs[(b, sq)] = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                                   "token_type_ids": torch.zeros_like(ids)}
            dense_dir = Path(tmp) / name / "dense"
            save(_model(name), dense_dir, format="dense")
            dense_bytes = sum(f.stat().st_size for f in dense_dir.glob("*.safetensors"))
            baseline = ort_baseline_or_none(dense, Path(tmp) / name / "onnx", failures, name=name)
            dense_run = torch.compile(dense) if args.compile else dense
            for kind, sparsity in plans:
                try:
                    model = _prune(_model(name), kind, sparsity)
                    out = Path(tmp) / name / f"{kind.replace(':', '_')}_{sparsity}"
                    save(model, out, format="sparse")
                    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
                    loaded = capkit.load(out)
                    report = capkit.sparsity_report(loaded)
                    loaded_run = torch.compile(loaded) if args.compile else loaded
                    for shape, inp in inputs.items():
                        fns = [_torch_call(dense_run, inp), _torch_call(loaded_run, inp)]
                        if args.compile:  # compile (and any recompile for this shape) before timing
                            for fn in fns:
                                fn()
                                fn()
                        # ONNX Runtime in blocks of its own between the rounds (its spinning threads slow the next call)
                        alone = [baseline.call(inp)] if baseline is not None else []
                        stats = time_interleaved(fns, device, args.min_time, args.repeats, alone=alone)
                        td, t = stats[0], stats[1]
                        row = {
                            "model": name, "kind": kind, "sparsity": round(report.sparsity, 4),
                            "batch": shape[0], "seq": shape[1], "dense_ms": td["median_s"] * 1e3,
                            "sparse_ms": t["median_s"] * 1e3, "speedup": td["median_s"] / t["median_s"],
                            "speedup_min": td["min_s"] / t["min_s"], "iqr_ms": t["iqr_s"] * 1e3, "n": t["n"],
                            "file_mb": size / 2**20, "dense_file_mb": dense_bytes / 2**20,
                        }
                        if baseline is not None:
                            to = stats[2]
                            row.update(ort_ms=to["median_s"] * 1e3, speedup_vs_ort=to["median_s"] / t["median_s"],
                                       speedup_vs_ort_min=to["min_s"] / t["min_s"])
                        rows.append(row)
                except Exception as exc:  # a failing case is reported, not hidden
                    failures.append({"model": name, "kind": kind, "sparsity": sparsity,
                                     "error": f"{type(exc).__name__}: {exc}"})
                if bar is not None:
                    bar.update(1)
    if bar is not None:
        bar.close()
    info = machine_info(device)
    info.update(ort)
    return {
        "benchmark": "sparse_inference", "machine": info, "quick": args.quick,
        "model": "BertForSequenceClassification, random weights of the "
                 + ("small shape" if args.quick else " / ".join(f"{m} shape" for m in models)),
        "compiled": bool(args.compile),
        "baselines": {"torch": "dense model, " + ("torch.compile (inductor)" if args.compile else "eager")
                               + ", inference_mode",
                      "onnxruntime": None if ort["onnxruntime"] is None else
                      "dense model via torch.onnx.export (opset 17), CPUExecutionProvider, intra-op threads = "
                      "torch threads, inter-op 1, ORT_ENABLE_ALL"},
        "onnxruntime": ort["onnxruntime"], "onnxruntime_note": ort.get("onnxruntime_note"),
        "dtype": "float32", "threads": torch.get_num_threads(), "rows": rows, "failures": failures,
    }


def summary_markdown(result: Dict) -> str:
    m = result["machine"]
    ort = result.get("onnxruntime")
    lines = [f"# sparse exports: inference latency ({m.get('device', 'cpu')}, "
             f"{result['dtype']}, {result['threads']} threads)", "",
             f"{result['model']}; torch {m.get('torch')}, onnxruntime {ort or 'not installed'}, "
             f"commit {m.get('git_commit')}, {m.get('date')}. `speedup`: torch dense / sparse export; "
             + ("both torch models compiled with `torch.compile` (inductor, default mode). " if result.get("compiled") else "")
             + f"`speedup_vs_ort`: ONNX Runtime dense / sparse export (medians; torch models in interleaved rounds, "
             f"ONNX Runtime in blocks of its own between them; "
             f"`_min`: from the fastest calls); {allocator_text(m)}.", ""]
    if result.get("onnxruntime_note"):
        lines += [f"Note: {result['onnxruntime_note']}", ""]
    cols = ["model", "kind", "sparsity", "batch", "seq", "dense_ms", "ort_ms", "sparse_ms", "speedup",
            "speedup_vs_ort", "speedup_min", "speedup_vs_ort_min", "n", "file_mb", "dense_file_mb"]
    lines.append(markdown_table(result["rows"], cols))
    for f in result["failures"]:
        lines.append(f"- FAILED {f.get('model')} {f.get('kind', '')} {f.get('sparsity', '')}: {f['error']}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a small BERT and short sequences")
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.9, 0.95])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    p.add_argument("--shapes", nargs="+", default=["1x128", "32x128"], help="BATCHxSEQ (default 1x128 32x128)")
    p.add_argument("--min-time", type=float, default=1.0, help="seconds of measurement per variant and shape")
    p.add_argument("--repeats", type=int, default=3, help="at least this many timed calls per variant and shape")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--compile", action="store_true",
                   help="time torch dense and the sparse export both through torch.compile (inductor)")
    add_allocator_argument(p)
    args = p.parse_args(argv)
    if not all(0.0 <= s < 1.0 for s in args.sparsities):
        p.error(f"--sparsities must lie in [0, 1), got {args.sparsities}")
    from benchmarks.structured_inference import _shape

    args.shapes = [_shape(t) if isinstance(t, str) else t for t in args.shapes]
    apply_allocator(args.allocator, torch.device("cpu"))
    result = run(args)
    name = "sparse_inference_compiled" if args.compile else "sparse_inference"
    publish(name, torch.device("cpu"), result, summary_markdown(result), args.quick, args.out)
    return 1 if result["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
