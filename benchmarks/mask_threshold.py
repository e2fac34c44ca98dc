"""Benchmark of mask thresholds (``capkit.pruning.topk``) for all 72 score matrices of BERT-base.

Movement pruning keeps the top ``keep`` fraction of every score matrix. The reference code found
each threshold by sorting the whole matrix on every forward: that is the baseline here (sort each
flattened matrix, take the k-th value), against capkit's selection methods: ``kthvalue`` (one
``torch.kthvalue`` per matrix) and, on CUDA, ``radix`` (the batched Triton radix select). Also
one global threshold over all matrices together (baseline: sort of the concatenation). capkit's
times include its input checks (the NaN check among them); the ``torch.cat`` that the torch
methods need for a global threshold is also timed alone. Scores are random fp32.

Shapes: 12 layers x {query, key, value, attn_out: 768x768; ffn_in: 3072x768; ffn_out: 768x3072}
(84.9 M scores); ``--quick``: 2 layers at 1/8 of the width.

Usage:
  python -m benchmarks.mask_threshold            # this device, keep in {0.5, 0.1, 0.03}
  python -m benchmarks.mask_threshold --quick    # tiny shapes (a smoke test)

On a CPU one sort of all 72 matrices takes seconds: ``--min-time 10`` gives several samples.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Callable, Dict, List

import torch

from benchmarks.harness import machine_info, markdown_table, measure_peaks, publish, time_fn
from capkit.ops._backends import get_backend
from capkit.pruning.topk import global_topk_threshold, kept_count, topk_thresholds

KEEPS = (0.5, 0.1, 0.03)
MATRICES = (("query", 768, 768), ("key", 768, 768), ("value", 768, 768), ("attn_out", 768, 768),
            ("ffn_in", 3072, 768), ("ffn_out", 768, 3072))
LAYERS = 12


def bert_base_shapes(quick: bool) -> List[tuple]:
    div, layers = (8, 2) if quick else (1, LAYERS)
    return [(n // div, k // div) for _ in range(layers) for _, n, k in MATRICES]


def sort_thresholds(scores: List[torch.Tensor], keep: float) -> torch.Tensor:
    """The reference's way: sort every matrix, take the k-th largest."""
    return torch.stack([torch.sort(s.flatten(), descending=True).values[kept_count(s.numel(), keep) - 1]
                        for s in scores])


def sort_global_threshold(scores: List[torch.Tensor], keep: float) -> torch.Tensor:
    flat = torch.cat([s.flatten() for s in scores])
    return torch.sort(flat, descending=True).values[kept_count(flat.numel(), keep) - 1]


def methods_for(device: torch.device) -> List[str]:
    """capkit methods timed here: the interpreter is no timing target, so radix only on CUDA."""
    fast = ["kthvalue"]
    if device.type == "cuda" and get_backend("triton").unavailable_reason(device) is None:
        fast.append("radix")
    return fast


def run(args) -> Dict:
    device = torch.device(args.device)
    load_before = os.getloadavg()  # other work on a shared machine skews CPU timings: record it
    info = machine_info(device)
    peaks = measure_peaks(device)
    torch.manual_seed(0)
    shapes = bert_base_shapes(args.quick)
    scores = [torch.randn(*s, device=device) for s in shapes]
    numel = sum(s.numel() for s in scores)
    read_floor = numel * 4 / peaks["copy_bytes_per_s"]  # reading every score once
    methods = methods_for(device)
    rows: List[Dict] = []
    failures: List[Dict] = []

    def measure(base: Dict, backend: str, fn: Callable[[], object]):
        try:
            t = time_fn(fn, device, args.min_time)
        except Exception as exc:  # report, do not invent a number
            failures.append({**base, "backend": backend, "error": repr(exc)[:300]})
            return None
        rows.append({**base, "backend": backend, **t, "ms": t["median_s"] * 1e3,
                     "x_read_floor": t["median_s"] / read_floor})
        return t["median_s"]

    base_info = {"matrices": len(scores), "numel": numel, "dtype": "float32"}
    measure({**base_info, "scope": "global", "keep": "-", "op": "concat"},
            "torch.cat", lambda: torch.cat([s.flatten() for s in scores]))
    for keep in args.keeps:
        for scope, baseline, capkit_fn in (("per-matrix", sort_thresholds, topk_thresholds),
                                           ("global", sort_global_threshold, global_topk_threshold)):
            base = {**base_info, "scope": scope, "keep": keep, "op": "threshold"}
            t_sort = measure(base, "sort (reference)", lambda: baseline(scores, keep))
            for method in methods:
                t = measure(base, method, lambda: capkit_fn(scores, keep, method=method))
                if t is not None:
                    rows[-1]["speedup_vs_sort"] = t_sort / t if t_sort else None
    return {"benchmark": "mask_threshold", "machine": info, "peaks": peaks, "quick": args.quick,
            "load_average": {"before": load_before, "after": os.getloadavg()}, "shapes": shapes, "rows": rows,
            "failures": failures}


def summary_markdown(result: Dict) -> str:
    mi = result["machine"]
    first = result["rows"][0] if result["rows"] else {"matrices": "?", "numel": 0}
    head = (f"# mask_threshold on {mi['device']}\n\ntorch {mi['torch']}, triton {mi.get('triton')}, "
            f"CUDA {mi.get('cuda')}, commit {mi.get('git_commit')}, {mi['date']}, {mi['torch_threads']} threads. "
            f"Top-k thresholds of {first['matrices']} random fp32 score matrices ({first['numel']} scores"
            f"{', quick shapes' if result['quick'] else ', BERT-base'}) per training step: times in ms, "
            f"speed-up against sorting every matrix (the reference). Read floor = reading every score once "
            f"at the measured copy bandwidth ({result['peaks']['copy_bytes_per_s'] / 1e9:.1f} GB/s). "
            f"1-minute load average {result['load_average']['before'][0]:.2f} before, "
            f"{result['load_average']['after'][0]:.2f} after.\n\n")
    text = head + markdown_table(result["rows"], ["scope", "keep", "op", "backend", "ms", "speedup_vs_sort",
                                                  "x_read_floor"])
    if result["failures"]:
        text += "\n\nNot measured:\n\n" + markdown_table(result["failures"], ["scope", "keep", "backend", "error"])
    return text + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="2 layers at 1/8 of BERT-base's width")
    p.add_argument("--keeps", type=float, nargs="+", default=list(KEEPS), help="kept fractions, in (0, 1]")
    p.add_argument("--min-time", type=float, default=0.5)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if not all(0 < f <= 1 for f in args.keeps):
        p.error(f"--keeps must lie in (0, 1], got {args.keeps}")
    result = run(args)
    publish("mask_threshold", torch.device(args.device), result, summary_markdown(result), args.quick, args.out)
    return 1 if result["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
