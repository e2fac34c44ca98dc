"""Accuracy runs: prune a model on tasks with several methods and seeds, and tabulate what each keeps.

For every task and seed, a dense teacher is fine-tuned once (the "dense" row and the KD / FiC
teacher of every method); then every method prunes the pre-trained model with that teacher,
exactly as ``capkit-prune`` does (a ``--block-size`` setting applies to the movement and
magnitude methods only). The seed picks the training subset (``--max-train-examples``),
the data order, dropout and negatives, so each seed is a whole repeat of the experiment.

A method is a ``capkit-prune --method`` name, optionally with its target: ``cap-m@0.9`` prunes
90% of the encoder weights, ``cap-f@0.5`` removes 50% of the heads and FFN neurons. Flags of that
method's own follow ``+`` for ablations: ``cap-m+no-fic`` (no FiC module), ``cap-m+sup-weight=0``
(no supervised term); each ablation is compared with its whole method. Every method
gets the same training budget: the ``--epochs`` setting. ``cap-f`` spreads it over its pruning
iterations (the default schedule 10%, 20%, ... up to its target, each iteration retraining for
epochs / iterations), unless ``--structured-epochs`` is set explicitly.

Per run: the task's main metric dense and pruned, the encoder sparsity reached and the speed-up
of the exported model (from the run's report). Per task and method over the seeds: mean ± sample
standard deviation, the fraction of the teacher's metric kept, cap-m's margin over movement
at the same target (and each ablation's against its whole method) against the seeds' spread,
also seed by seed.

Settings after ``--`` go to ``capkit-prune`` unchanged (model, data folder, sizes, ...):

  python -m benchmarks.accuracy --quick          # BBC News, a few hundred articles (minutes on a CPU)
  python -m benchmarks.accuracy                  # BBC News with capkit-prune's embedded-default settings
  python -m benchmarks.accuracy --tasks sst2 --seeds 1 2 3 \\
      --methods movement@0.9 cap-m@0.9 cap-f@0.5 cap-f@0.9 -- \\
      --data-dir glue/SST-2 --model minilm --max-train-examples 2000 --epochs 5

``--teacher PATH`` uses one fine-tuned teacher for every seed (no per-seed fine-tuning; its runs
live under ``<task>/teacher-<name>/``) and records it with its own dev metrics. ``--eval-file
PATH`` also scores every exported model and its teacher on a further labelled file (reported
beside dev; runs that finished before are scored from their exports, nothing is retrained).

Runs take long: each run's folder (``<out>/accuracy_runs/<task>/seed-<seed>/<method>``) keeps its
checkpoints, so starting the same command again resumes where it stopped; a finished run is read
back from its report, not run again. ``--collect`` trains nothing: it tabulates the finished runs
and lists the rest as not run.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from benchmarks.harness import RESULTS_DIR, device_slug, machine_info, markdown_table, publish

QUICK_SETTINGS = ["--model", "minilm", "--max-train-examples", "300", "--max-eval-examples", "200",
                  "--max-length", "48", "--epochs", "3", "--teacher-epochs", "3", "--block-size", "32",
                  "--sparsity", "0.7",
                  "--learning-rate", "1e-4", "--score-learning-rate", "0.1", "--extra-negatives", "512",
                  "--initial-warmup", "0.5", "--final-warmup", "0.5"]
RUN_ARGS = "bench_args.json"  # the capkit-prune arguments a run folder was made with


def embedded_default_flags() -> List[str]:
    """capkit-prune's embedded default (MiniLM on BBC News) as flags, less task, method and folder."""
    from capkit.prune import EMBEDDED_DEFAULT

    flags: List[str] = []
    for key, value in EMBEDDED_DEFAULT.items():
        if key not in ("task", "method", "output_dir"):
            flags += [f"--{key.replace('_', '-')}", str(value)]
    return flags


def variant_flags(spec: str) -> List[str]:
    """The capkit-prune flags of a spec's ``+`` parts, for ablations of one method:
    ``"cap-m@0.7+no-fic+sup-weight=0"`` -> ``["--no-fic", "--sup-weight", "0"]``."""
    flags: List[str] = []
    for part in spec.split("+")[1:]:
        key, eq, value = part.partition("=")
        if not key or (eq and not value):
            raise ValueError(f"--methods: {spec!r} has an empty '+' part; write e.g. cap-m+no-fic or "
                             f"cap-m+sup-weight=0")
        flags += [f"--{key}"] + ([value] if eq else [])
    return flags


def base_spec(spec: str) -> str:
    """A spec without its ``+`` ablation parts: ``"cap-m@0.7+no-fic"`` -> ``"cap-m@0.7"``."""
    return spec.split("+")[0]


def parse_method(spec: str) -> Tuple[str, Optional[float]]:
    """``"cap-f@0.5"`` -> ``("cap-f", 0.5)``; ``"movement"`` -> ``("movement", None)``; ``+`` ablation
    parts (:func:`variant_flags`) are left out."""
    from capkit.cap.config import METHODS

    name, _, target = base_spec(spec).partition("@")
    if name not in METHODS or name == "finetune":
        raise ValueError(f"--methods: unknown method {name!r} in {spec!r}; choose from "
                         f"{[m for m in METHODS if m != 'finetune']}, optionally with @<target>, e.g. cap-f@0.5")
    if not target:
        return name, None
    try:
        value = float(target)
    except ValueError:
        value = math.nan
    if not 0.0 < value < 1.0:
        raise ValueError(f"--methods: the target of {spec!r} must be a fraction in (0, 1), e.g. {name}@0.9")
    return name, value


def given_settings(settings: List[str]) -> Dict[str, object]:
    """The settings a capkit-prune argument list names explicitly, parsed by capkit-prune's own
    parser (later flags win; unset ones are absent). Exits with its message on a bad setting."""
    from capkit.prune import build_parser

    return vars(build_parser().parse_args(settings))


def method_flags(spec: str, settings: List[str]) -> List[str]:
    """capkit-prune flags of one method spec, with the same training budget as every other method."""
    from capkit.cap.config import METHODS, CAPConfig, takes_blocks

    name, target = parse_method(spec)
    given = given_settings(settings)
    flags = ["--method", name] + variant_flags(spec)
    if not takes_blocks(name) and given.get("block_size") not in (None, 0):
        flags += ["--block-size", "0"]  # blocks are for the top-k methods; the others run as they must
    if METHODS[name][0] != "structured":
        return flags + (["--sparsity", str(target)] if target is not None else [])
    if target is not None:  # the default schedule up to the target
        fractions = [f for f in CAPConfig().structured_fractions if f < target - 1e-9] + [target]
        flags += ["--structured-fractions", *map(str, fractions)]
    else:
        fractions = list(given.get("structured_fractions") or CAPConfig().structured_fractions)
    if given.get("epochs") is not None and given.get("structured_epochs") is None:
        flags += ["--structured-epochs", f"{float(given['epochs']) / len(fractions):.6g}"]
    return flags


def _point(report: Dict, metric: str) -> Optional[float]:
    value = report.get("metrics", {}).get(metric)
    return None if value is None else float(value)


def _row(task: str, seed: int, spec: str, report: Dict, seconds: Optional[float], teacher_seconds: Optional[float],
         out: Path, base: Path) -> Dict:
    dense, pruned = report["dense"], report["pruned"]
    d, p = _point(dense, "main"), _point(pruned, "main")
    latency = report.get("latency") or {}
    return {
        "task": task, "seed": seed, "method": spec, "model": report.get("model"),
        "train_examples": report.get("train_examples"), "dev_examples": report.get("dev_examples"),
        "dense": d, "pruned": p, "drop_points": None if d is None or p is None else 100 * (d - p),
        "kept": None if not d or p is None else p / d,
        "metrics_dense": dense.get("metrics"), "metrics_pruned": pruned.get("metrics"),
        "sparsity": pruned.get("sparsity"), "speedup": latency.get("speedup"),
        "latency_format": latency.get("format"),
        "train_s": report.get("train_seconds"),  # training time, as the run recorded it (resumes summed)
        "run_s": None if seconds is None else round(seconds, 1),  # this call's wall time (None: read back)
        "teacher_s": None if teacher_seconds is None else round(teacher_seconds, 3),
        "report": (out / "report.json").relative_to(base).as_posix(),
    }


def _main_of(metrics: Optional[Dict]) -> Optional[float]:
    return None if not metrics or metrics.get("main") is None else float(metrics["main"])


def _file_sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _run_settings(run_dir: Path) -> Dict:
    path = run_dir / "config.json"
    return json.loads(path.read_text()) if path.exists() else {}


def _score_saved(model_dir: Path, task: str, eval_file: Path, run_cfg: Dict) -> Dict:
    """Metrics of a saved model on the eval file, with the run's own sizes and columns."""
    from capkit.cap.evaluation import load_saved_model, score_file

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tokenizer = load_saved_model(model_dir, device=device)
    return score_file(model, tokenizer, task, eval_file, max_length=run_cfg.get("max_length"),
                      doc_stride=run_cfg.get("doc_stride", 128), batch_size=run_cfg.get("eval_batch_size", 64),
                      device=device, text_column=run_cfg.get("text_column", "text"),
                      text_pair_column=run_cfg.get("text_pair_column"),
                      label_column=run_cfg.get("label_column", "label"))["metrics"]


def eval_file_scores(out: Path, report: Dict, task: str, eval_file: Path, teacher: Path,
                     teacher_cache: Dict) -> Dict:
    """``{"pruned", "dense"}`` metrics on ``eval_file`` of a run's exported model and its teacher:
    from the run's report when it scored that file, else scored now from the exports (cached in
    ``<run>/eval_file.json``; the teacher once per teacher and file)."""
    key = {"file": str(eval_file.resolve()), "sha256": _file_sha256(eval_file)}
    recorded = report.get("eval_file") or {}
    if recorded.get("file") and Path(recorded["file"]).resolve() == eval_file.resolve():
        teacher_cache.setdefault((str(teacher), key["sha256"]), recorded.get("dense"))
        return {"pruned": recorded.get("pruned"), "dense": recorded.get("dense"), "model": recorded.get("model")}
    cache = out / "eval_file.json"
    scored = json.loads(cache.read_text()) if cache.exists() else {}
    run_cfg = _run_settings(out)
    if {k: scored.get(k) for k in key} != key:
        fmt = next((f for f in ("compact", "sparse", "dense") if f in report.get("exports", {})), None)
        if fmt is None:
            raise ValueError(f"{out}: no exported model to score on {eval_file}")
        from capkit._io import atomic_write_text

        scored = {**key, "model": fmt, "pruned": _score_saved(out / f"model-{fmt}", task, eval_file, run_cfg)}
        atomic_write_text(cache, json.dumps(scored, indent=2))
    tkey = (str(teacher), key["sha256"])
    if teacher_cache.get(tkey) is None:
        teacher_cache[tkey] = _score_saved(teacher, task, eval_file, run_cfg)
    return {"pruned": scored["pruned"], "dense": teacher_cache[tkey], "model": scored["model"]}


def _with_eval(row: Dict, scores: Optional[Dict]) -> Dict:
    if scores is None:
        return row
    d, p = _main_of(scores.get("dense")), _main_of(scores.get("pruned"))
    row.update({"eval_dense": d, "eval_pruned": p, "eval_kept": None if not d or p is None else p / d,
                "metrics_eval_dense": scores.get("dense"), "metrics_eval_pruned": scores.get("pruned"),
                "eval_model": scores.get("model")})
    return row


def _same_settings(recorded: List[str], made_with: List[str]) -> bool:
    """Whether two capkit-prune argument lists give the same settings (the same flags in another
    order do)."""
    if recorded == made_with:
        return True
    from capkit.prune import config_from_args

    try:
        out = ["--output-dir", "same"]
        return config_from_args(list(recorded) + out) == config_from_args(list(made_with) + out)
    except (SystemExit, ValueError, TypeError):
        return False


def _recorded(run_dir: Path) -> Dict:
    """The report a finished capkit-prune run wrote ({} when there is none)."""
    path = run_dir / "report.json"
    return json.loads(path.read_text()) if path.exists() else {}


def teacher_folder_name(teacher: Path) -> str:
    """``teacher-<folder name>``: where the runs with one given teacher live, per task."""
    import re

    return "teacher-" + (re.sub(r"[^A-Za-z0-9._-]+", "_", Path(teacher).resolve().name) or "given")


def run_task(task: str, seed: int, methods: List[str], settings: List[str], root: Path,
             base: Optional[Path] = None, collect: bool = False, teacher_path: Optional[Path] = None,
             eval_file: Optional[Path] = None, teacher_cache: Optional[Dict] = None
             ) -> Tuple[List[Dict], List[Dict]]:
    """The teacher and every method on one task and seed; returns (rows, failures).
    ``collect``: train nothing, read the finished runs and list the others as not run.
    ``teacher_path``: one given teacher for every seed (nothing fine-tuned). ``eval_file``: also
    score each exported model and its teacher on this labelled file."""
    from capkit._io import atomic_write_text
    from capkit.cap.trainer import CHECKPOINT, finetune_teacher, run
    from capkit.prune import config_from_args

    base = base or root.parent
    rows: List[Dict] = []
    failures: List[Dict] = []
    common = [*settings, "--task", task, "--seed", str(seed), "--no-progress", "--no-tensorboard"]
    teacher_cache = {} if teacher_cache is None else teacher_cache
    if teacher_path is not None:
        folder = root / task / teacher_folder_name(teacher_path) / f"seed-{seed}"
        teacher = Path(teacher_path).resolve()
    else:
        folder = root / task / f"seed-{seed}"
        teacher = folder / "teacher"
    teacher_seconds = None
    try:
        if teacher_path is None and not (teacher / "capkit.json").exists():
            if collect:
                return rows, [{"task": task, "seed": seed, "method": "teacher", "error": "not run (--collect)"}]
            print(f"[accuracy] {task}, seed {seed}: fine-tuning the dense teacher", flush=True)
            t0 = time.perf_counter()
            finetune_teacher(config_from_args(["finetune", *common, "--output-dir", str(folder)]), teacher)
            teacher_seconds = time.perf_counter() - t0
    except Exception as exc:  # no teacher: no run of this task and seed can be compared
        return rows, [{"task": task, "seed": seed, "method": "teacher", "error": repr(exc)[:300]}]
    # the teacher's training time as its run recorded it, like the methods' train_s
    if teacher_path is None:
        teacher_seconds = _recorded(folder / "teacher.run").get("train_seconds", teacher_seconds)
    for spec in methods:
        out = folder / spec
        # the settings, less the folders (a given teacher is part of them); the eval file changes no training
        made_with = [*common, *method_flags(spec, settings)] + ([] if teacher_path is None else ["--teacher", str(teacher)])
        argv = [*made_with, "--teacher", str(teacher), "--output-dir", str(out)]
        if eval_file is not None:
            argv += ["--eval-file", str(eval_file)]
        try:
            recorded = json.loads((out / RUN_ARGS).read_text()) if (out / RUN_ARGS).exists() else None
            if recorded is not None and not _same_settings(recorded, made_with):
                raise ValueError(f"{out} holds a run made with other settings ({' '.join(recorded)}); "
                                 f"remove it or pick another --out")
            if recorded is not None and (out / "report.json").exists():
                print(f"[accuracy] {task}, seed {seed}: {spec} finished before, reading its report", flush=True)
                report = _recorded(out)
                scores = None if eval_file is None else eval_file_scores(out, report, task, eval_file, teacher,
                                                                         teacher_cache)
                rows.append(_with_eval(_row(task, seed, spec, report, None, teacher_seconds, out, base), scores))
                continue
            if collect:
                failures.append({"task": task, "seed": seed, "method": spec, "error": "not run (--collect)"})
                continue
            print(f"[accuracy] {task}, seed {seed}: {spec}", flush=True)
            cfg = config_from_args(argv + (["--resume"] if (out / CHECKPOINT).exists() else []))
            out.mkdir(parents=True, exist_ok=True)
            atomic_write_text(out / RUN_ARGS, json.dumps(made_with))
            t0 = time.perf_counter()
            report = run(cfg)
            seconds = time.perf_counter() - t0
            scores = None if eval_file is None else eval_file_scores(out, report, task, eval_file, teacher,
                                                                     teacher_cache)
        except Exception as exc:  # reported, never replaced by a number
            failures.append({"task": task, "seed": seed, "method": spec, "error": repr(exc)[:300]})
            continue
        rows.append(_with_eval(_row(task, seed, spec, report, seconds, teacher_seconds, out, base), scores))
    return rows, failures


def given_teacher_record(teacher: Path, rows: List[Dict]) -> Dict:
    """The given teacher: its folder, its dev metrics as the runs measured them (per task), and the
    metrics it recorded itself when capkit fine-tuned it (None otherwise)."""
    manifest = Path(teacher) / "capkit.json"
    saved = None
    if manifest.is_file():
        saved = (json.loads(manifest.read_text()).get("extra") or {}).get("teacher_metrics")
    dev: Dict[str, Optional[Dict]] = {}
    for r in rows:
        if r.get("metrics_dense") and r["task"] not in dev:
            dev[r["task"]] = r["metrics_dense"]
    return {"path": str(Path(teacher).resolve()), "dev": dev, "saved_metrics": saved}


def _stats(values: List[Optional[float]]) -> Tuple[Optional[float], Optional[float]]:
    """Mean and sample standard deviation (None with fewer than two values) of the present values."""
    vals = [v for v in values if v is not None]
    if not vals:
        return None, None
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else None)


def aggregate(rows: List[Dict]) -> Tuple[List[Dict], List[Dict]]:
    """Per (task, method) over the seeds, and cap-m's margin over movement at the same target."""
    groups: Dict[Tuple[str, str], List[Dict]] = {}
    for r in rows:
        groups.setdefault((r["task"], r["method"]), []).append(r)
    out = []
    for (task, spec), rs in groups.items():
        g = {"task": task, "method": spec, "seeds": sorted(r["seed"] for r in rs), "n": len(rs),
             "model": rs[0].get("model"), "train_examples": rs[0].get("train_examples"),
             "dev_examples": rs[0].get("dev_examples")}
        for key in ("dense", "pruned", "kept", "sparsity", "speedup", "eval_dense", "eval_pruned", "eval_kept"):
            g[key + "_mean"], g[key + "_std"] = _stats([r.get(key) for r in rs])
        out.append(g)
    comparisons = []
    by_key = {(g["task"], g["method"]): g for g in out}
    for (task, spec), g in by_key.items():
        # an ablation against its whole method; cap-m against movement at the same target
        name, _, target = spec.partition("@")
        if "+" in spec:
            other = by_key.get((task, base_spec(spec)))
        else:
            other = by_key.get((task, "movement" + (f"@{target}" if target else ""))) if name == "cap-m" else None
        if other is None or g["pruned_mean"] is None or other["pruned_mean"] is None:
            continue
        spreads = [s for s in (g["pruned_std"], other["pruned_std"]) if s is not None]
        margin = g["pruned_mean"] - other["pruned_mean"]
        spread = max(spreads) if len(spreads) == 2 else None
        # the same seed shares its teacher, training subset and data order: compare seed by seed too
        base = {r["seed"]: r["pruned"] for r in groups[(task, other["method"])] if r.get("pruned") is not None}
        paired = sorted((r["seed"], r["pruned"] - base[r["seed"]]) for r in groups[(task, spec)]
                        if r.get("pruned") is not None and r["seed"] in base)
        diff_mean, diff_std = _stats([d for _, d in paired])
        ebase = {r["seed"]: r["eval_pruned"] for r in groups[(task, other["method"])] if r.get("eval_pruned") is not None}
        epaired = sorted((r["seed"], r["eval_pruned"] - ebase[r["seed"]]) for r in groups[(task, spec)]
                         if r.get("eval_pruned") is not None and r["seed"] in ebase)
        emean, estd = _stats([d for _, d in epaired])
        comparisons.append({"eval_paired_seeds": [seed for seed, _ in epaired],
                            "eval_paired_diffs": [d for _, d in epaired], "eval_paired_mean": emean,
                            "eval_paired_std": estd,"task": task, "method": spec, "baseline": other["method"], "n": min(g["n"], other["n"]),
                            "margin": margin, "spread": spread,
                            "margin_over_spread": None if not spread else margin / spread,
                            "paired_seeds": [seed for seed, _ in paired], "paired_diffs": [d for _, d in paired],
                            "paired_mean": diff_mean, "paired_std": diff_std})
    return out, comparisons


def _pm(mean: Optional[float], std: Optional[float], scale: float = 100.0, digits: int = 2) -> str:
    if mean is None:
        return "-"
    return f"{scale * mean:.{digits}f}" + ("" if std is None else f" ± {scale * std:.{digits}f}")


def summary_markdown(result: Dict) -> str:
    mi = result["machine"]
    lines = [f"# accuracy on {mi['device']}", "",
             f"torch {mi['torch']}, CUDA {mi.get('cuda')}, commit {mi.get('git_commit')}, {mi['date']}. "
             f"Main dev metric of each task (accuracy, or the task's GLUE metric), in %, of the dense teacher and "
             f"of the pruned model; mean ± sample standard deviation over the seeds {result.get('seeds')}; "
             f"'kept' is the pruned model's metric as a fraction of its own seed's teacher. Every method trains "
             f"for the same number of epochs (cap-f spreads them over its pruning iterations). "
             f"capkit-prune settings: `{' '.join(result['settings']) or '(defaults)'}`.", ""]
    t = result.get("teacher")
    if t:
        own = "; ".join(f"{task} dev {_pm(_main_of(m), None)}" for task, m in (t.get("dev") or {}).items()
                        if m is not None)
        saved = _main_of(t.get("saved_metrics"))
        lines += [f"One teacher for every seed: `{t['path']}`" + (f" ({own})" if own else "")
                  + ("" if saved is None else f"; {100 * saved:.2f} on the dev set it was trained against, as it "
                     f"recorded") + ". No teacher was fine-tuned per seed.", ""]
    if result.get("eval_file"):
        lines += [f"Also scored on `{result['eval_file']}` (columns 'eval dense' / 'eval pruned': the teacher and the "
                  f"exported model, main metric in %).", ""]
    groups = [{"task": g["task"], "method": g["method"], "seeds": g["n"], "train_examples": g["train_examples"],
               "dev_examples": g["dev_examples"], "dense": _pm(g["dense_mean"], g["dense_std"]),
               "pruned": _pm(g["pruned_mean"], g["pruned_std"]), "kept": _pm(g["kept_mean"], g["kept_std"], digits=1),
               "sparsity": _pm(g["sparsity_mean"], None, digits=1),
               "speed-up": "-" if g["speedup_mean"] is None else f"{g['speedup_mean']:.2f}×",
               "eval dense": _pm(g.get("eval_dense_mean"), g.get("eval_dense_std")),
               "eval pruned": _pm(g.get("eval_pruned_mean"), g.get("eval_pruned_std"))}
              for g in result.get("groups", [])]
    if groups:
        extra = ["eval dense", "eval pruned"] if result.get("eval_file") else []
        lines.append(markdown_table(groups, ["task", "method", "seeds", "train_examples", "dev_examples", "dense",
                                             "pruned", "kept", "sparsity", "speed-up", *extra]))
    for c in result.get("comparisons", []):
        verdict = ("seeds' spread not known (fewer than two seeds)" if c["spread"] is None else
                   f"{'larger' if c['margin'] > c['spread'] else 'not larger'} than the seeds' spread "
                   f"(larger standard deviation {100 * c['spread']:.2f} points)")
        lines += ["", f"- {c['task']}: {c['method']} − {c['baseline']} = {100 * c['margin']:+.2f} points over "
                      f"{c['n']} seed(s), {verdict}."]
        if c.get("paired_diffs"):
            diffs = ", ".join(f"{100 * d:+.1f}" for d in c["paired_diffs"])
            n = len(c["paired_diffs"])
            se = "" if c.get("paired_std") is None else f" (standard error {100 * c['paired_std'] / math.sqrt(n):.2f})"
            lines[-1] += (f" Seed by seed ({', '.join(map(str, c['paired_seeds']))}): {diffs} points, "
                          f"mean {_pm(c['paired_mean'], c['paired_std'], digits=2)}{se}; ahead on "
                          f"{sum(d > 0 for d in c['paired_diffs'])} of {n}.")
        if c.get("eval_paired_diffs"):
            diffs = ", ".join(f"{100 * d:+.1f}" for d in c["eval_paired_diffs"])
            lines[-1] += (f" On the eval file: {diffs} points, mean "
                          f"{_pm(c['eval_paired_mean'], c['eval_paired_std'], digits=2)}.")
    rows = [{**r, "dense": None if r["dense"] is None else 100 * r["dense"],
             "pruned": None if r["pruned"] is None else 100 * r["pruned"],
             "sparsity": None if r["sparsity"] is None else 100 * r["sparsity"]} for r in result["rows"]]
    lines += ["", "Each run:", "",
              markdown_table(rows, ["task", "seed", "method", "train_examples", "dense", "pruned", "drop_points",
                                    "sparsity", "speedup", "train_s", "report"])]
    if result["failures"]:
        lines += ["", "Not measured:", "", markdown_table(result["failures"], ["task", "seed", "method", "error"])]
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
    p.add_argument("--methods", nargs="+", default=["cap-m", "movement"],
                   help="methods, each optionally with its target: cap-m@0.9, cap-f@0.5, and capkit-prune flags of "
                        "its own after '+' for ablations: cap-m+no-fic, cap-m+sup-weight=0 (default: cap-m movement)")
    p.add_argument("--seeds", nargs="+", type=int, default=None,
                   help="seeds, each a whole repeat with its own training subset and teacher "
                        "(default: capkit-prune's --seed among the settings, else 42)")
    p.add_argument("--collect", action="store_true",
                   help="train nothing: tabulate the finished runs, list the others as not run")
    p.add_argument("--min-time", type=float, default=None, help="accepted for the runner; unused")
    p.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results/<device>/)")
    p.add_argument("--teacher", type=Path, default=None, metavar="PATH",
                   help="one fine-tuned teacher folder for every seed (no per-seed teacher fine-tuning)")
    p.add_argument("--eval-file", type=Path, default=None, metavar="PATH",
                   help="a further labelled file of the task: every exported model and its teacher are scored on it")
    args = p.parse_args(argv)
    if args.teacher is not None and not (args.teacher / "config.json").is_file():
        p.error(f"--teacher: {args.teacher} is not a model folder (no config.json)")
    if args.eval_file is not None and not args.eval_file.is_file():
        p.error(f"--eval-file: no such file {args.eval_file}")
    for flag in ("--teacher", "--eval-file"):
        if flag in settings:
            p.error(f"{flag}: give it before '--' (the benchmark's own option), not among the capkit-prune settings")
    try:
        for spec in args.methods:
            parse_method(spec)
            variant_flags(spec)
    except ValueError as exc:
        p.error(str(exc))
    tasks = args.tasks or ["bbc_news"]
    if args.quick:
        settings = QUICK_SETTINGS + settings  # later flags win
    elif args.tasks is None:
        settings = embedded_default_flags() + settings
    given = given_settings(settings)  # a bad capkit-prune setting stops here, before any training
    for spec in args.methods:
        given_settings(settings + variant_flags(spec))  # so does a bad ablation flag
    seeds = args.seeds or [int(given.get("seed", 42))]
    if len(set(seeds)) != len(seeds):
        p.error(f"--seeds: each seed once, got {seeds}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out = args.out or RESULTS_DIR / device_slug(device)
    root = out / ("accuracy_runs_quick" if args.quick else "accuracy_runs")
    info = machine_info(device)
    rows: List[Dict] = []
    failures: List[Dict] = []
    teacher_cache: Dict = {}
    for task in tasks:
        for seed in seeds:
            r, f = run_task(task, seed, args.methods, settings, root, out, collect=args.collect,
                            teacher_path=args.teacher, eval_file=args.eval_file, teacher_cache=teacher_cache)
            rows += r
            failures += f
    groups, comparisons = aggregate(rows)
    result = {"benchmark": "accuracy", "machine": info, "quick": args.quick, "tasks": tasks,
              "methods": args.methods, "seeds": seeds, "settings": settings, "rows": rows, "groups": groups,
              "comparisons": comparisons, "failures": failures,
              "teacher": None if args.teacher is None else given_teacher_record(args.teacher, rows),
              "eval_file": None if args.eval_file is None else str(args.eval_file)}
    publish("accuracy", device, result, summary_markdown(result), args.quick, out)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
