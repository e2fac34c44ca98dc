"""Run capkit's benchmarks with one command and collect their results into one report.

  python -m benchmarks --quick                  # every benchmark on small shapes (minutes on 2 cores)
  python -m benchmarks --full                   # the full shapes
  python -m benchmarks --quick --only info_nce --only mask_threshold
  python -m benchmarks --quick --out /tmp/bench # results and report.md there
  python -m benchmarks --report-only            # rebuild the reports from the JSON files in --out
  capkit-bench --quick                          # the same runner, installed with capkit[bench]

Each benchmark writes its own ``<name>[_quick].json`` / ``.md`` (device, versions, commit,
shapes, medians) to ``--out`` (default ``benchmarks/results/<device>/`` of the repository, else
``./capkit-bench-results/<device>/``); this runner adds ``report[_quick].md``: one row per
benchmark (ok, or the failure and why), the performance targets met or not, the accuracy of the
CAP pruning runs kept in the folder (``*/report.json``), plots (``plots/*.png``, needs
matplotlib) and each benchmark's own summary. A benchmark that fails is reported as failed,
never as a number. ``--report-only`` runs nothing: it rebuilds the reports from the result
files already there (e.g. results brought back from a GPU machine).
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

from benchmarks import plots, targets
from benchmarks.harness import device_slug, machine_info, markdown_table
from capkit._io import atomic_write_text

# name -> what it measures (the modules are benchmarks/<name>.py, each with a main(argv))
BENCHMARKS: Dict[str, str] = {
    "masked_linear": "masked linear forward / dx / dweight per mask kind and sparsity",
    "info_nce": "streaming multi-positive InfoNCE forward / backward and memory",
    "mask_threshold": "top-k mask thresholds of all BERT-base matrices against a full sort",
    "structured_inference": "compacted structured models at 50/70/90% against the dense model",
    "sparse_inference": "sparse exports (unstructured, block, 2:4) against the dense model",
    "train_step": "one CAP-m training step: capkit vs the reference's way vs plain KD, by phase",
    "accuracy": "dense vs pruned accuracy of capkit-prune runs (teacher once per task)",
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


def default_out(device_name: str, package_dir: Path = Path(__file__).resolve().parent,
                cwd: Optional[Path] = None) -> Path:
    """``benchmarks/results/<device>`` of the source checkout this runs from; from an installed copy,
    that of the capkit repository the current directory is in, else ``./capkit-bench-results/<device>``."""
    root = package_dir.parent
    if (root / "pyproject.toml").is_file() and (root / "capkit").is_dir():
        return package_dir / "results" / device_name
    cwd = Path.cwd() if cwd is None else cwd
    for d in (cwd, *cwd.parents):
        if (d / "benchmarks" / "results").is_dir() and (d / "pyproject.toml").is_file():
            return d / "benchmarks" / "results" / device_name
    return cwd / "capkit-bench-results" / device_name


def write_report(rows: List[Dict], out: Path, quick: bool, mi: Dict, rebuilt: bool = False) -> Path:
    """``report[_quick].md``: status rows, targets, accuracy, plots, then each benchmark's summary."""
    suffix = "_quick" if quick else ""
    results, problems = targets.load_results(out)
    versions = (f"torch {mi.get('torch')}, triton {mi.get('triton')}, CUDA {mi.get('cuda')}, "
                f"commit {mi.get('git_commit')}")
    kind = "quick" if quick else "full"
    intro = (f"Rebuilt with `--report-only` from the {kind}-run result files in this folder; the newest is from "
             f"{mi.get('date')} ({versions})." if rebuilt else f"{kind} run, {versions}, {mi.get('date')}.")
    cols = ["benchmark", "status", "date", "measures"] if rebuilt else ["benchmark", "status", "seconds", "measures"]
    lines = [f"# capkit benchmarks on {mi.get('device')}", "", intro, "", markdown_table(rows, cols), ""]
    lines += [f"- skipped {p}" for p in problems] + ([""] if problems else [])
    lines += ["## Targets", "", targets.targets_markdown(results), "",
              "## Accuracy", "", targets.accuracy_markdown(out), "",
              "## Plots", "", plots.plots_markdown(results, out, suffix), ""]
    for row in rows:
        md = out / f"{row['benchmark']}{suffix}.md"
        if (row["status"] == "ok" or rebuilt) and md.exists():
            text = md.read_text().strip()
            lines += ["#" + text if text.startswith("# ") else text, ""]  # one level down
    path = out / ("report" + suffix + ".md")
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def report_only(out: Path, kinds: List[bool]) -> int:
    """Rebuild ``report[_quick].md`` of each kind (quick / full) that has result files in ``out``."""
    results, _ = targets.load_results(out) if out.is_dir() else ({}, [])
    written = []
    for quick in kinds:
        suffix = "_quick" if quick else ""
        mine = {s[: len(s) - len(suffix)]: d for s, d in results.items() if s.endswith("_quick") == quick}
        if not mine:
            continue
        names = list(BENCHMARKS) + sorted(set(mine) - set(BENCHMARKS))
        rows = []
        for name in names:
            data = mine.get(name)
            errors = [str(f.get("error", "")) for f in (data or {}).get("failures", [])]
            # "skipped" (not applicable here) and "not run" (left out on purpose, e.g. --collect) are no failures
            failed = [e for e in errors if not e.startswith(("skipped", "not run"))]
            not_run = sum(e.startswith("not run") for e in errors)
            status = ("no results file" if data is None else
                      f"{len(failed)} failure(s) recorded (see its section)" if failed else "ok")
            if data is not None and not_run:
                status += f"; {not_run} case(s) not run (see its section)"
            rows.append({"benchmark": name, "status": status, "measures": BENCHMARKS.get(name, ""),
                         "date": (data or {}).get("machine", {}).get("date", "")})
        newest = max((d.get("machine", {}) for d in mine.values()), key=lambda m: str(m.get("date", "")))
        written.append(write_report(rows, out, quick, newest, rebuilt=True))
    if not written:
        print(f"no result files in {out}; nothing to report", file=sys.stderr)
        return 1
    for path in written:
        print(f"report: {path}")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    prog = "capkit-bench" if Path(sys.argv[0]).name == "capkit-bench" else "python -m benchmarks"
    p = argparse.ArgumentParser(prog=prog, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="small shapes (the default)")
    mode.add_argument("--full", action="store_true", help="the full shapes")
    p.add_argument("--only", action="append", choices=list(BENCHMARKS), metavar="NAME",
                   help=f"run only this benchmark (repeatable): {', '.join(BENCHMARKS)}")
    p.add_argument("--min-time", type=float, default=None, help="seconds of measurement per point")
    p.add_argument("--out", type=Path, default=None,
                   help="results folder (default benchmarks/results/<device>/, or ./capkit-bench-results/<device>/ "
                        "outside the repository)")
    p.add_argument("--report-only", action="store_true",
                   help="run nothing: rebuild report[_quick].md (targets, accuracy, plots) from the result files "
                        "in --out; both reports unless --quick or --full is given")
    args = p.parse_args(argv)
    if args.report_only and args.only:
        p.error("--report-only runs nothing: --only does not apply")
    quick = not args.full
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out = args.out or default_out(device_slug(device))
    if args.report_only:
        return report_only(out, [True] if args.quick else [False] if args.full else [True, False])
    out.mkdir(parents=True, exist_ok=True)
    names = args.only or list(BENCHMARKS)
    try:
        from tqdm import tqdm

        it = tqdm(names, desc="benchmarks", unit="benchmark")
    except ImportError:  # pragma: no cover
        it = names
    rows = [run_one(name, quick, out, args.min_time) for name in it]
    report = write_report(rows, out, quick, machine_info(device))
    print(markdown_table(rows, ["benchmark", "status", "seconds"]))
    print(f"report: {report}")
    return 0 if all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
