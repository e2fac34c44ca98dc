"""Accuracy runs: prune a model on tasks with several methods and tabulate what each keeps.

For every task, a dense teacher is fine-tuned once (the "dense" row and the KD / FiC teacher of
every method); then every method prunes the pre-trained model with that teacher, exactly as
``capkit-prune`` does. Each row: the task's main metric dense and pruned, the drop in points,
the encoder sparsity reached and the speed-up of the exported model (from the run's report).

Settings after ``--`` go to ``capkit-prune`` unchanged (model, data folder, sizes, ...):

  python -m benchmarks.accuracy --quick          # BBC News, a few hundred articles (minutes on a CPU)
  python -m benchmarks.accuracy                  # BBC News with capkit-prune's embedded-default settings
  python -m benchmarks.accuracy --tasks sst2 rte --methods cap-m movement -- \\
      --data-dir /path/to/glue --model /path/to/bert-base-uncased --sparsity 0.9

Runs take long: each run's folder (``<out>/accuracy_runs/<task>/<method>``) keeps its
checkpoints, so starting the same command again resumes where it stopped.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch

from benchmarks.harness import RESULTS_DIR, device_slug, machine_info, markdown_table, publish

QUICK_SETTINGS = ["--model", "minilm", "--max-train-examples", "300", "--max-eval-examples", "200",
                  "--max-length", "48", "--epochs", "3", "--teacher-epochs", "3", "--block-size", "32",
                  "--sparsity", "0.7",
                  "--learning-rate", "1e-4", "--score-learning-rate", "0.1", "--extra-negatives", "512",
                  "--initial-warmup", "0.5", "--final-warmup", "0.5"]


def embedded_default_flags() -> List[str]:
    """capkit-prune's embedded default (MiniLM on BBC News) as flags, less task, method and folder."""
    from capkit.prune import EMBEDDED_DEFAULT

    flags: List[str] = []
    for key, value in EMBEDDED_DEFAULT.items():
        if key not in ("task", "method", "output_dir"):
            flags += [f"--{key.replace('_', '-')}", str(value)]
    return flags


def _point(report: Dict, metric: str) -> Optional[float]:
    value = report.get("metrics", {}).get(metric)
    return None if value is None else float(value)


def run_task(task: str, methods: List[str], settings: List[str], root: Path) -> (List[Dict], List[Dict]):
    """The teacher and every method on one task; returns (rows, failures)."""
    from capkit.cap.trainer import finetune_teacher, run
    from capkit.prune import config_from_args

    rows: List[Dict] = []
    failures: List[Dict] = []
    base = [*settings, "--task", task, "--no-progress", "--no-tensorboard"]
    teacher = root / task / "teacher"
    try:
        t0 = time.perf_counter()
        if not (teacher / "capkit.json").exists():
            print(f"[accuracy] {task}: fine-tuning the dense teacher", flush=True)
            finetune_teacher(config_from_args(["finetune", *base, "--output-dir", str(root / task)]), teacher)
        teacher_seconds = time.perf_counter() - t0
    except Exception as exc:  # no teacher: no run of this task can be compared
        return rows, [{"task": task, "method": "teacher", "error": repr(exc)[:300]}]
    for method in methods:
        print(f"[accuracy] {task}: {method}", flush=True)
        out = root / task / method
        argv = [*base, "--method", method, "--teacher", str(teacher), "--output-dir", str(out)]
        if (out / "config.json").exists():
            argv.append("--resume")
        try:
            t0 = time.perf_counter()
            report = run(config_from_args(argv))
            seconds = time.perf_counter() - t0
        except Exception as exc:  # reported, never replaced by a number
            failures.append({"task": task, "method": method, "error": repr(exc)[:300]})
            continue
        dense, pruned = report["dense"], report["pruned"]
        metric = "main"
        d, p = _point(dense, metric), _point(pruned, metric)
        latency = report.get("latency") or {}
        rows.append({
            "task": task, "method": method, "model": report.get("model"),
            "train_examples": report.get("train_examples"), "dev_examples": report.get("dev_examples"),
            "dense": d, "pruned": p, "drop_points": None if d is None or p is None else 100 * (d - p),
            "metrics_dense": dense.get("metrics"), "metrics_pruned": pruned.get("metrics"),
            "sparsity": pruned.get("sparsity"), "speedup": latency.get("speedup"),
            "latency_format": latency.get("format"), "run_s": round(seconds, 1),
            "teacher_s": round(teacher_seconds, 1), "report": str((out / "report.json").relative_to(root.parent)),
        })
    return rows, failures


def summary_markdown(result: Dict) -> str:
    mi = result["machine"]
    lines = [f"# accuracy on {mi['device']}", "",
             f"torch {mi['torch']}, CUDA {mi.get('cuda')}, commit {mi.get('git_commit')}, {mi['date']}. "
             f"Main dev metric of each task (accuracy, or the task's GLUE metric) of the dense teacher and of "
             f"the pruned model; drop in points; speed-up of the exported model from its run's report. "
             f"capkit-prune settings: `{' '.join(result['settings']) or '(defaults)'}`.", ""]
    rows = [{**r, "dense": None if r["dense"] is None else 100 * r["dense"],
             "pruned": None if r["pruned"] is None else 100 * r["pruned"],
             "sparsity": None if r["sparsity"] is None else 100 * r["sparsity"]} for r in result["rows"]]
    lines.append(markdown_table(rows, ["task", "method", "train_examples", "dense", "pruned", "drop_points",
                                       "sparsity", "speedup", "run_s"]))
    if result["failures"]:
        lines += ["", "Not measured:", "", markdown_table(result["failures"], ["task", "method", "error"])]
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    settings: List[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, settings = argv[:cut], argv[cut + 1:]
    p = argparse.ArgumentParser(prog="python -m benchmarks.accuracy", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="BBC News, 300 articles, teacher 3 epochs, pruning to 70%% in 3 epochs")
    p.add_argument("--tasks", nargs="+", default=None,
                   help="tasks (capkit-prune --task); default bbc_news with capkit-prune's embedded-default settings")
    p.add_argument("--methods", nargs="+", default=["cap-m", "movement"], help="methods (default: cap-m movement)")
    p.add_argument("--min-time", type=float, default=None, help="accepted for the runner; unused")
    p.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results/<device>/)")
    args = p.parse_args(argv)
    from capkit.cap.config import METHODS

    unknown = [m for m in args.methods if m not in METHODS or m == "finetune"]
    if unknown:
        p.error(f"--methods: unknown {unknown}; choose from {[m for m in METHODS if m != 'finetune']}")
    tasks = args.tasks or ["bbc_news"]
    if args.quick:
        settings = QUICK_SETTINGS + settings  # later flags win
    elif args.tasks is None:
        settings = embedded_default_flags() + settings
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out = args.out or RESULTS_DIR / device_slug(device)
    root = out / ("accuracy_runs_quick" if args.quick else "accuracy_runs")
    info = machine_info(device)
    rows: List[Dict] = []
    failures: List[Dict] = []
    for task in tasks:
        r, f = run_task(task, args.methods, settings, root)
        rows += r
        failures += f
    result = {"benchmark": "accuracy", "machine": info, "quick": args.quick, "tasks": tasks,
              "methods": args.methods, "settings": settings, "rows": rows, "failures": failures}
    publish("accuracy", device, result, summary_markdown(result), args.quick, out)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
