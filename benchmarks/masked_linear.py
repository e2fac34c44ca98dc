"""Benchmark of ``capkit.ops.masked_linear``: forward, input gradient and weight gradient timed
separately, per mask kind and sparsity, against what a user would otherwise run.

Baselines (same process, same inputs):
  dense      dense ``F.linear(x, W)`` / ``dy @ W`` / ``dy^T @ x`` (cuBLAS / MKL)
  masked     ``F.linear(x, W * M)`` with autograd (what pruning code runs; includes ``W * M``)
  bsr        PyTorch BSR (``W*M`` as ``to_sparse_bsr``) forward, block masks, where supported
  semi24     PyTorch semi-structured 2:4 forward (CUDA, fp16/bf16), where supported

Unstructured masks on the CPU also time the CSR kernel (``cpu-csr``): inference forward with the
format built once, the format build itself, and forward / input gradient with the format rebuilt
every call (what a training step with a changing weight would pay).

Usage:
  python -m benchmarks.masked_linear                 # CPU fp32 (or CUDA bf16 when present)
  python -m benchmarks.masked_linear --quick         # fewer tokens and points, a minute or two
  python -m benchmarks.masked_linear --update-dispatch-table   # write capkit/ops/dispatch_table.json
"""
from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path
from typing import Dict, List

import torch
import torch.nn.functional as F

from benchmarks.harness import machine_info, markdown_table, measure_peaks, publish, roofline_fraction, time_fn
from capkit._io import atomic_write_text
from capkit.ops import BlockMask, NMMask, backend_status, masked_linear
from capkit.ops._backends import TABLE_PATH, get_backend
from capkit.ops.sparse_format import csr_linear, pack_csr

SHAPES = {
    # name: (out_features N, in_features K); tokens M come from --tokens
    "bert-ffn-in": (3072, 768),
    "bert-ffn-out": (768, 3072),
    "large-ffn-in": (4096, 1024),
}


def make_mask(kind: str, sparsity: float, n: int, k: int, block: int, device):
    if kind == "unstructured":
        return torch.rand(n, k, device=device) >= sparsity
    if kind == "block":
        grid = torch.rand(-(-n // block), -(-k // block), device=device) >= sparsity
        return BlockMask.from_block_grid(grid, block, (n, k))
    if kind == "nm":
        return NMMask.from_scores(torch.randn(n, k, device=device), 2, 4)
    raise ValueError(kind)


def dense_of(mask) -> torch.Tensor:
    return mask.to_dense() if isinstance(mask, (BlockMask, NMMask)) else mask


def fast_backends(device: torch.device) -> List[str]:
    status = backend_status(device)
    names = ["cpu"] if device.type == "cpu" else ["triton", "cuda"]
    return [b for b in names if status[b] is None]


def run(args) -> Dict:
    device = torch.device(args.device)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    torch.manual_seed(0)
    info = machine_info(device)
    peaks = measure_peaks(device)
    backends = fast_backends(device)
    if not backends:
        print(f"no fast backend of capkit is usable on {device}: {backend_status(device)}", file=sys.stderr)
    rows: List[Dict] = []
    failures: List[Dict] = []
    elem = torch.finfo(dtype).bits // 8
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None

    plan = []
    for shape in args.shapes:
        for kind in args.kinds:
            for sp in ([0.5] if kind == "nm" else args.sparsities):
                plan.append((shape, kind, sp))
    bar = tqdm(plan, desc="masked_linear", unit="case") if tqdm else plan

    for shape, kind, sp in bar:
        n, k = SHAPES[shape]
        m = args.tokens
        x = torch.randn(m, k, device=device, dtype=dtype)
        w = torch.randn(n, k, device=device, dtype=dtype)
        dy = torch.randn(m, n, device=device, dtype=dtype)
        bias = torch.randn(n, device=device, dtype=dtype)
        mask = make_mask(kind, sp, n, k, args.block_size, device)
        dense_mask = dense_of(mask)
        density = float(dense_mask.float().mean())
        base = {"shape": shape, "M": m, "N": n, "K": k, "kind": kind, "sparsity": sp, "density": density,
                "block_size": args.block_size if kind == "block" else None, "dtype": str(dtype)[6:]}

        def record(backend, op, fn, flops, bytes_moved, **extra):
            try:
                t = time_fn(fn, device, args.min_time)
            except Exception as exc:  # a failing benchmark reports the failure, not a number
                failures.append({**base, "backend": backend, "op": op, "error": repr(exc)[:300]})
                return None
            row = {**base, "backend": backend, "op": op, **t,
                   "roofline_fraction": roofline_fraction(t["median_s"], flops, bytes_moved, peaks), **extra}
            rows.append(row)
            return t["median_s"]

        full_flops = 2 * m * n * k
        io_fwd = (m * k + m * n + n * k) * elem
        # Dense baselines.
        t_dense_f = record("dense", "forward", lambda: F.linear(x, w, bias), full_flops, io_fwd)
        t_dense_dx = record("dense", "grad_input", lambda: dy @ w, full_flops, io_fwd)
        t_dense_dw = record("dense", "grad_weight", lambda: dy.t() @ x, full_flops, io_fwd)
        # What pruning code runs: W * M materialised, then a dense GEMM, autograd for the backward.
        wm = w.detach().clone().requires_grad_()
        xm = x.detach().clone().requires_grad_()
        mm = dense_mask.to(dtype)

        def ref_fwd():
            with torch.no_grad():
                return F.linear(xm, wm * mm, bias)

        def ref_fwd_bwd():
            y = F.linear(xm, wm * mm, bias)
            y.backward(dy)

        t_ref_f = record("masked", "forward", ref_fwd, full_flops, io_fwd)
        t_ref_fb = record("masked", "forward+backward", ref_fwd_bwd, 3 * full_flops, 3 * io_fwd)
        live_flops = full_flops * density
        io_live = (m * k + m * n + n * k * density) * elem
        for b in backends:
            impl = get_backend(b)
            layout = mask.layout if isinstance(mask, BlockMask) else None
            kmask = None if isinstance(mask, BlockMask) and mask.mask is None else dense_mask.view(torch.uint8)

            def fwd():
                with torch.no_grad():
                    return masked_linear(x, w, mask, bias, backend=b)

            tf = record(b, "forward", fwd, live_flops, io_live)
            tdx = record(b, "grad_input", lambda: impl.grad_input(dy, w, kmask, layout), live_flops, io_live)
            tdw = record(b, "grad_weight", lambda: impl.grad_weight(dy, x, w, kmask, layout, True, False),
                         live_flops, io_live)
            for op, t, tdense, tref in (("forward", tf, t_dense_f, t_ref_f), ("grad_input", tdx, t_dense_dx, None),
                                        ("grad_weight", tdw, t_dense_dw, None)):
                if t is None:
                    continue
                row = next(r for r in reversed(rows) if r["backend"] == b and r["op"] == op)
                row["speedup_vs_dense"] = tdense / t if tdense else None
                if tref:
                    row["speedup_vs_masked"] = tref / t
            if None not in (tf, tdx, tdw):
                total = tf + tdx + tdw
                rows.append({**base, "backend": b, "op": "forward+backward", "median_s": total,
                             "speedup_vs_masked": t_ref_fb / total if t_ref_fb else None,
                             "speedup_vs_dense": (t_dense_f + t_dense_dx + t_dense_dw) / total
                             if None not in (t_dense_f, t_dense_dx, t_dense_dw) else None})
        if kind == "unstructured" and "cpu" in backends:
            packed = pack_csr(w, dense_mask)
            dense_mask_t = dense_mask.t().contiguous()
            w_t = w.t().contiguous()
            for op, fn, tdense, tref in (
                    ("forward", lambda: csr_linear(x, packed, bias), t_dense_f, t_ref_f),
                    ("forward+format", lambda: csr_linear(x, pack_csr(w, dense_mask), bias), t_dense_f, t_ref_f),
                    ("grad_input+format", lambda: csr_linear(dy, pack_csr(w_t, dense_mask_t)), t_dense_dx, None)):
                t = record("cpu-csr", op, fn, live_flops, io_live)
                if t is not None:
                    rows[-1]["speedup_vs_dense"] = tdense / t if tdense else None
                    if tref:
                        rows[-1]["speedup_vs_masked"] = tref / t
            record("cpu-csr", "format_update", lambda: pack_csr(w, dense_mask), 0, n * k)
        if kind == "block":
            # Cost of turning a dense mask into the block layout (on the device), per update.
            record("capkit", "layout_update", lambda: BlockMask.from_dense(dense_mask, args.block_size), 0,
                   n * k)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    w_bsr = (w * mm).to_sparse_bsr((args.block_size, args.block_size))
                    tb = record("torch-bsr", "forward", lambda: F.linear(x, w_bsr, bias), live_flops, io_live)
                    if tb and t_dense_f:
                        rows[-1]["speedup_vs_dense"] = t_dense_f / tb
                except Exception as exc:
                    failures.append({**base, "backend": "torch-bsr", "op": "forward", "error": repr(exc)[:300]})
        if kind == "nm" and device.type == "cuda":
            try:
                from torch.sparse import to_sparse_semi_structured

                w_ss = to_sparse_semi_structured((w * mm).contiguous())
                tss = record("torch-semi24", "forward", lambda: F.linear(x, w_ss, bias), live_flops, io_live)
                if tss and t_dense_f:
                    rows[-1]["speedup_vs_dense"] = t_dense_f / tss
            except Exception as exc:
                failures.append({**base, "backend": "torch-semi24", "op": "forward", "error": repr(exc)[:300]})

    return {"benchmark": "masked_linear", "machine": info, "peaks": peaks, "dtype": str(dtype)[6:],
            "tokens": args.tokens, "block_size": args.block_size, "rows": rows, "failures": failures}


def dispatch_rules_from(result: Dict) -> List[Dict]:
    """Rules for backend="auto": a fast backend is chosen for a mask kind and mode only up to the
    highest density at which it beat the masked baseline at every measured sparsity above it."""
    rules = []
    dev_type = result["machine"]["device_type"]
    kinds = {"unstructured": "dense", "block": "block", "nm": "nm"}
    for backend in sorted({r["backend"] for r in result["rows"]} & {"cpu", "cuda", "triton"}):
        for kind, kind_name in kinds.items():
            for mode, op in (("inference", "forward"), ("training", "forward+backward")):
                # Group the shapes measured at each sparsity: a sparsity counts as a win only if
                # the backend won on every shape there (density: the highest measured in the group).
                groups: Dict[float, List] = {}
                for r in result["rows"]:
                    if r["backend"] == backend and r["kind"] == kind and r["op"] == op:
                        groups.setdefault(r["sparsity"], []).append((r["density"], r.get("speedup_vs_masked") or 0.0))
                if not groups:
                    continue
                pts = sorted((max(d for d, _ in g), min(s for _, s in g)) for g in groups.values())
                max_density = None
                for density, speedup in pts:  # sparsest first; stop at the first loss
                    if speedup < 1.0:
                        break
                    max_density = density
                if max_density is None:
                    continue
                rule = {"device": dev_type, "dtype": result["dtype"], "mask_kind": kind_name, "mode": mode,
                        "backend": backend, "max_density": round(max_density + 1e-3, 4),
                        "measured_speedups": {f"{d:.3f}": round(s, 2) for d, s in pts}}
                if kind_name == "nm" or max_density >= pts[-1][0]:
                    rule.pop("max_density")  # wins everywhere it was measured
                rules.append(rule)
    # The CSR kernel for unstructured CPU inference: up to the highest density at which it beat the
    # dense GEMM on every shape (inference only; see csr_rule_from for why training stays dense).
    csr = csr_rule_from(result)
    if csr is not None:
        rules.append(csr)
    return rules


def csr_rule_from(result: Dict):
    groups: Dict[float, List] = {}
    for r in result["rows"]:
        if r["backend"] == "cpu-csr" and r["op"] == "forward":
            groups.setdefault(r["sparsity"], []).append((r["density"], r.get("speedup_vs_dense") or 0.0))
    if not groups:
        return None
    pts = sorted((max(d for d, _ in g), min(s for _, s in g)) for g in groups.values())
    max_density = None
    for density, speedup in pts:
        if speedup < 1.0:
            break
        max_density = density
    if max_density is None:
        return None
    return {"device": result["machine"]["device_type"], "dtype": result["dtype"], "mask_kind": "unstructured",
            "mode": "inference", "backend": "cpu", "kernel": "csr", "max_density": round(max_density + 1e-3, 4),
            "measured_speedups_vs_dense": {f"{d:.3f}": round(s, 2) for d, s in pts}}


def update_dispatch_table(result: Dict, path: Path) -> None:
    """Replace the rules of this device type and dtype in capkit/ops/dispatch_table.json."""
    rules = dispatch_rules_from(result)
    table = json.loads(TABLE_PATH.read_text()) if TABLE_PATH.exists() else {"rules": []}
    dev_type, dtype = result["machine"]["device_type"], result["dtype"]
    # Rules of mask kinds this result did not measure are kept (e.g. a run of --kinds unstructured
    # leaves the block rules alone).
    kinds = {"unstructured": "dense", "block": "block", "nm": "nm"}
    measured = {kinds[r["kind"]] for r in result["rows"] if r["kind"] in kinds}
    if any(r["backend"] == "cpu-csr" for r in result["rows"]):
        measured.add("unstructured")
    kept = [r for r in table.get("rules", []) if not (r["device"] == dev_type and r["dtype"] == dtype
                                                      and r.get("mask_kind") in measured)]
    source_key = f"{dev_type}/{dtype}"
    if not {"dense", "block", "nm"} <= measured:  # a partial run: its own source entry
        source_key += ":" + ",".join(sorted(measured))
    root = Path(__file__).resolve().parents[1]
    path = Path(path).resolve()
    table = {
        "about": "Rules for backend='auto', written by `python -m benchmarks.masked_linear "
                 "--update-dispatch-table` from measured results; first match wins, else the torch reference.",
        "sources": {**table.get("sources", {}), source_key: {
            "device": result["machine"]["device"], "commit": result["machine"].get("git_commit"),
            "date": result["machine"]["date"],
            "file": str(path.relative_to(root)) if path.is_relative_to(root) else str(path)}},
        "rules": kept + rules,
    }
    atomic_write_text(TABLE_PATH, json.dumps(table, indent=1) + "\n")
    print(f"dispatch table: {len(rules)} rule(s) for {dev_type}/{dtype} written to {TABLE_PATH}")


def summary_markdown(result: Dict) -> str:
    mi = result["machine"]
    head = (f"# masked_linear on {mi['device']}\n\n"
            f"torch {mi['torch']}, triton {mi.get('triton')}, CUDA {mi.get('cuda')}, capkit {mi.get('capkit')}, "
            f"commit {mi.get('git_commit')}, {mi['date']}, {mi['torch_threads']} threads, dtype {result['dtype']}, "
            f"{result['tokens']} tokens.\n\nPeaks measured here: matmul "
            f"{result['peaks']['matmul_flops'] / 1e9:.0f} GFLOP/s ({result['peaks']['matmul_dtype']}), copy "
            f"{result['peaks']['copy_bytes_per_s'] / 1e9:.1f} GB/s.\n\n")
    rows = [dict(r, ms=r["median_s"] * 1e3) for r in result["rows"] if r["op"] != "layout_update"]
    cols = ["shape", "kind", "sparsity", "backend", "op", "ms", "speedup_vs_dense", "speedup_vs_masked",
            "roofline_fraction"]
    text = head + markdown_table(rows, cols)
    lay = [dict(r, ms=r["median_s"] * 1e3) for r in result["rows"] if r["op"] == "layout_update"]
    if lay:
        text += "\n\nDense mask -> block layout conversion (per update):\n\n" + markdown_table(
            lay, ["shape", "sparsity", "block_size", "ms"])
    if result["failures"]:
        text += "\n\nFailed measurements:\n\n" + markdown_table(result["failures"],
                                                                 ["shape", "kind", "sparsity", "backend", "op", "error"])
    return text + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tokens", type=int, default=None, help="rows of x (default 4096; 1024 with --quick)")
    p.add_argument("--shapes", nargs="+", default=None, choices=sorted(SHAPES))
    p.add_argument("--kinds", nargs="+", default=["unstructured", "block", "nm"],
                   choices=["unstructured", "block", "nm"])
    p.add_argument("--sparsities", nargs="+", type=float, default=None)
    p.add_argument("--block-size", type=int, default=32)
    p.add_argument("--min-time", type=float, default=None, help="seconds of measurement per point")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results/<device>)")
    p.add_argument("--update-dispatch-table", action="store_true",
                   help=f"write the rules for backend='auto' measured here into {TABLE_PATH.name}")
    p.add_argument("--dispatch-from", type=Path, default=None, metavar="RESULT_JSON",
                   help="only rewrite the backend='auto' rules from an existing result file")
    args = p.parse_args(argv)
    if args.dispatch_from is not None:
        update_dispatch_table(json.loads(args.dispatch_from.read_text()), args.dispatch_from)
        return 0
    if args.quick:
        args.tokens = args.tokens or 1024
        args.shapes = args.shapes or ["bert-ffn-in", "bert-ffn-out"]
        args.sparsities = args.sparsities or [0.0, 0.5, 0.9]
        args.min_time = args.min_time or 0.2
    args.tokens = args.tokens or 4096
    args.shapes = args.shapes or list(SHAPES)
    args.sparsities = args.sparsities or [0.0, 0.5, 0.75, 0.9, 0.95]
    args.min_time = args.min_time or 0.5
    for s in args.sparsities:
        if not 0.0 <= s < 1.0:
            p.error(f"--sparsities must lie in [0, 1), got {s}")

    result = run(args)
    path = publish("masked_linear", torch.device(args.device), result, summary_markdown(result), args.quick, args.out)
    if args.update_dispatch_table:
        update_dispatch_table(result, path)
    return 0 if not result["failures"] else 1


if __name__ == "__main__":
    sys.exit(main())
