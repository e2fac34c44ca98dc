"""Benchmark of ``capkit.ops.info_nce``: forward and backward timed separately, and peak memory
(CUDA: the caching allocator's peak; CPU: the resident high-water mark of one warm call),
against the naive PyTorch path (``mm`` + ``log_softmax`` + masked means, what CAP's reference
code runs) and, with one positive per query, ``F.cross_entropy`` on materialised logits.

Shapes: small banks (B x M x d = 4 x 64 x 32, 8 x 800 x 128, 16 x 2,000 x 384: where
``backend="auto"`` must also be right), CAP's (B = 32 queries, M = 4,200 keys, d = 768; a
training step makes three such calls) and large banks (B in {256, 4096}, M in {65,536, 1,048,576}) where the device has the memory.

Usage:
  python -m benchmarks.info_nce            # CPU fp32 (or CUDA with bf16 keys when present)
  python -m benchmarks.info_nce --quick    # small banks, CAP's shape and one large bank
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Dict, List

import torch
import torch.nn.functional as F

from benchmarks.harness import cpu_peak_extra_bytes, machine_info, markdown_table, measure_peaks, publish, time_fn
from capkit.ops.info_nce import _STREAMING, info_nce

CAP_SHAPE = (32, 4200, 768)
# small banks: where backend="auto" must also pick the faster path
SMALL = [(4, 64, 32), (8, 800, 128), (16, 2000, 384)]
LARGE = [(256, 65536, 768), (4096, 65536, 768), (256, 1048576, 768), (4096, 1048576, 768)]


def make_inputs(b, m, d, device, key_dtype, labels=True):
    q = torch.randn(b, d, device=device, requires_grad=True)
    k = torch.randn(m, d, device=device).to(key_dtype)
    kid = torch.arange(m, device=device) % max(1, m // 2)  # two keys per id
    qid = torch.randint(0, max(1, m // 2), (b,), device=device)
    qlab = torch.randint(0, 3, (b,), device=device) if labels else None
    klab = torch.randint(0, 3, (m,), device=device) if labels else None
    return q, k, qid, kid, qlab, klab


def run(args) -> Dict:
    device = torch.device(args.device)
    key_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    elem = torch.finfo(key_dtype).bits // 8
    info = machine_info(device)
    peaks = measure_peaks(device)
    backends = [n for n, impl in _STREAMING.items() if impl.unavailable_reason(device) is None]
    if device.type == "cpu":
        backends = [b for b in backends if b != "triton"]  # the interpreter is not a timing target
    rows: List[Dict] = []
    failures: List[Dict] = []
    shapes = args.shapes or SMALL + [CAP_SHAPE] + [s for s in LARGE if s in args.large]
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None
    plan = shapes
    for shape in (tqdm(plan, desc="info_nce", unit="shape") if tqdm else plan):
        b, m, d = shape
        torch.manual_seed(0)
        try:
            q, k, qid, kid, qlab, klab = make_inputs(b, m, d, device, key_dtype)
        except RuntimeError as exc:
            failures.append({"B": b, "M": m, "d": d, "backend": "-", "op": "inputs", "error": repr(exc)[:300]})
            continue
        base = {"B": b, "M": m, "d": d, "key_dtype": str(key_dtype)[6:]}
        read_floor = m * d * elem / peaks["copy_bytes_per_s"]  # memory traffic of reading the keys once
        kw = dict(query_labels=qlab, key_labels=klab, temperature=0.1, unsup_weight=0.1, sup_weight=10.0)

        def measure(backend, op, fn):
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats(device)
                base_mem = torch.cuda.memory_allocated(device)
            try:
                t = time_fn(fn, device, args.min_time)
            except Exception as exc:  # out of memory and the like: report, do not invent a number
                failures.append({**base, "backend": backend, "op": op, "error": repr(exc)[:300]})
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                return None
            row = {**base, "backend": backend, "op": op, **t, "read_floor_s": read_floor}
            if device.type == "cuda":
                row["peak_extra_bytes"] = torch.cuda.max_memory_allocated(device) - base_mem
            else:  # the process's resident high-water mark over one more (warm) call
                extra = cpu_peak_extra_bytes(fn)
                if extra is not None:
                    row["peak_extra_bytes"] = extra
            rows.append(row)
            return t["median_s"]

        def fwd(backend):
            def f():
                with torch.no_grad():
                    return info_nce(q, k, qid, kid, backend=backend, **kw)
            return f

        def fwd_bwd(backend):
            def f():
                q.grad = None
                info_nce(q, k, qid, kid, backend=backend, **kw).backward()
            return f

        naive = b * m <= args.max_naive_elems
        t_ref_f = measure("torch", "forward", fwd("torch")) if naive else None
        t_ref_fb = measure("torch", "forward+backward", fwd_bwd("torch")) if naive else None
        if not naive:
            failures.append({**base, "backend": "torch", "op": "forward",
                             "error": f"skipped: B*M = {b * m} logits exceed --max-naive-elems"})
        for backend in backends:
            tf = measure(backend, "forward", fwd(backend))
            tfb = measure(backend, "forward+backward", fwd_bwd(backend))
            for op, t, tref in (("forward", tf, t_ref_f), ("forward+backward", tfb, t_ref_fb)):
                if t is not None:
                    row = next(r for r in reversed(rows) if r["backend"] == backend and r["op"] == op)
                    row["speedup_vs_naive"] = tref / t if tref else None
                    row["x_read_floor"] = t / read_floor
        if naive:
            # One positive per query: the usual fused-CE comparison point.
            target = torch.randint(0, m, (b,), device=device)

            def ce():
                q.grad = None
                logits = F.normalize(q, dim=1) @ F.normalize(k.float(), dim=1).t() / 0.1
                F.cross_entropy(logits, target).backward()

            measure("cross_entropy", "forward+backward", ce)
    return {"benchmark": "info_nce", "machine": info, "peaks": peaks, "key_dtype": str(key_dtype)[6:],
            "rows": rows, "failures": failures}


def summary_markdown(result: Dict) -> str:
    mi = result["machine"]
    head = (f"# info_nce on {mi['device']}\n\ntorch {mi['torch']}, triton {mi.get('triton')}, CUDA {mi.get('cuda')}, "
            f"commit {mi.get('git_commit')}, {mi['date']}, {mi['torch_threads']} threads, keys "
            f"{result['key_dtype']}. Read floor = time to read the keys once at the measured copy bandwidth "
            f"({result['peaks']['copy_bytes_per_s'] / 1e9:.1f} GB/s).\n\n")
    rows = [dict(r, ms=r["median_s"] * 1e3, floor_ms=r["read_floor_s"] * 1e3,
                 peak_MiB=(r["peak_extra_bytes"] / 2**20 if "peak_extra_bytes" in r else "")) for r in result["rows"]]
    text = head + markdown_table(rows, ["B", "M", "d", "backend", "op", "ms", "speedup_vs_naive", "floor_ms",
                                        "x_read_floor", "peak_MiB"])
    if result["failures"]:
        text += "\n\nNot measured:\n\n" + markdown_table(result["failures"], ["B", "M", "backend", "op", "error"])
    return text + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="small banks, CAP's shape and B=256, M=65536 only")
    p.add_argument("--min-time", type=float, default=0.5)
    p.add_argument("--max-naive-elems", type=float, default=None,
                   help="largest B*M for the naive path (default: 2**28 on GPU, 2**25 on CPU)")
    p.add_argument("--shapes", nargs="+", default=None, metavar="BxMxD",
                   help="shapes to run instead of the defaults, e.g. 32x4200x768")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if args.shapes:
        try:
            args.shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes]
            assert all(len(s) == 3 and min(s) > 0 for s in args.shapes)
        except (ValueError, AssertionError):
            p.error(f"--shapes entries must look like 32x4200x768, got {args.shapes}")
    cuda = args.device.startswith("cuda")
    if args.max_naive_elems is None:
        args.max_naive_elems = 2**28 if cuda else 2**25
    args.large = LARGE[:1] if args.quick or not cuda else LARGE
    result = run(args)
    publish("info_nce", torch.device(args.device), result, summary_markdown(result), args.quick, args.out)
    real_failures = [f for f in result["failures"] if not f["error"].startswith("skipped")]
    return 1 if real_failures else 0


if __name__ == "__main__":
    sys.exit(main())
