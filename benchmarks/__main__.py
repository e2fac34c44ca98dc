"""Run capkit's benchmarks with one command and collect their results into one report.

  python -m benchmarks --quick                  # every benchmark on small shapes (minutes on 2 cores)
  python -m benchmarks --full                   # the full shapes
  python -m benchmarks --quick --only info_nce --only mask_threshold
  python -m benchmarks --quick --out /tmp/bench # results and report.md there

Each benchmark writes its own ``<name>[_quick].json`` / ``.md`` (device, versions, commit,
shapes, medians) to ``--out`` (default ``benchmarks/results/<device>/``); this runner adds
``report.md`` with one row per benchmark (ok, or the failure and why) followed by each
benchmark's own summary. A benchmark that fails is reported as failed, never as a number.
"""
from __future__ import annotations

import argparse
import importlib
import sys
import time
import traceback
from pathlib import Path
from typing import Dict, List, Optional

import torch

from benchmarks.harness import RESULTS_DIR, device_slug, machine_info, markdown_table

# name -> what it measures (the modules are benchmarks/<name>.py, each with a main(argv))
BENCHMARKS: Dict[str, str] = {
    "masked_linear": "masked linear forward / dx / dweight per mask kind and sparsity",
    "info_nce": "streaming multi-positive InfoNCE forward / backward and memory",
    "mask_threshold": "top-k mask thresholds of all BERT-base matrices against a full sort",
    "structured_inference": "compacted structured models at 50/70/90% against the dense model",
    "sparse_inference": "sparse exports (unstructured, block, 2:4) against the dense model",
}


def run_one(name: str, quick: bool, out: Path, min_time: Optional[float]) -> Dict:
    """Run one benchmark's ``main``; returns its status row (never raises)."""
    argv = ["--out", str(out)] + (["--quick"] if quick else [])
    if min_time is not None:
        argv += ["--min-time", str(min_time)]
    t0 = time.perf_counter()
    try:
        rc = importlib.import_module(f"benchmarks.{name}").main(argv)
        status = "ok" if rc in (0, None) else f"failed (exit code {rc}; see its results file)"
    except SystemExit as exc:  # argparse errors
        status = f"failed (exit {exc.code})"
    except Exception as exc:  # a crashing benchmark is reported, the others still run
        traceback.print_exc()
        status = f"failed: {type(exc).__name__}: {exc}"
    return {"benchmark": name, "status": status, "seconds": round(time.perf_counter() - t0, 1),
            "measures": BENCHMARKS[name]}


def write_report(rows: List[Dict], out: Path, quick: bool, device: torch.device) -> Path:
    mi = machine_info(device)
    lines = [f"# capkit benchmarks on {mi['device']}", "",
             f"{'quick' if quick else 'full'} run, torch {mi['torch']}, triton {mi.get('triton')}, "
             f"CUDA {mi.get('cuda')}, commit {mi.get('git_commit')}, {mi['date']}.", "",
             markdown_table(rows, ["benchmark", "status", "seconds", "measures"]), ""]
    suffix = "_quick" if quick else ""
    for row in rows:
        md = out / f"{row['benchmark']}{suffix}.md"
        if row["status"] == "ok" and md.exists():
            text = md.read_text().strip()
            lines += ["#" + text if text.startswith("# ") else text, ""]  # one level down
    path = out / ("report" + suffix + ".md")
    path.write_text("\n".join(lines) + "\n")
    return path


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="small shapes (the default)")
    mode.add_argument("--full", action="store_true", help="the full shapes")
    p.add_argument("--only", action="append", choices=list(BENCHMARKS), metavar="NAME",
                   help=f"run only this benchmark (repeatable): {', '.join(BENCHMARKS)}")
    p.add_argument("--min-time", type=float, default=None, help="seconds of measurement per point")
    p.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results/<device>/)")
    args = p.parse_args(argv)
    quick = not args.full
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out = args.out or RESULTS_DIR / device_slug(device)
    out.mkdir(parents=True, exist_ok=True)
    names = args.only or list(BENCHMARKS)
    try:
        from tqdm import tqdm

        it = tqdm(names, desc="benchmarks", unit="benchmark")
    except ImportError:  # pragma: no cover
        it = names
    rows = [run_one(name, quick, out, args.min_time) for name in it]
    report = write_report(rows, out, quick, device)
    print(markdown_table(rows, ["benchmark", "status", "seconds"]))
    print(f"report: {report}")
    return 0 if all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
