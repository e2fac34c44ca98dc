"""The end of a run: export the pruned model, measure it against the dense one, write
``report.json`` / ``report.md`` and print the summary."""
from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Dict, Optional

import torch

from capkit._io import atomic_write_text
from capkit.cap import distributed as dist

__all__ = ["measure_latency", "write_report"]


@torch.no_grad()
def measure_latency(model: torch.nn.Module, batch: Dict[str, torch.Tensor], repeats: int = 10) -> float:
    """Median seconds of one forward of ``model`` on ``batch`` (after two warm-up calls)."""
    model.eval()
    cuda = any(t.is_cuda for t in batch.values())
    times = []
    for i in range(repeats + 2):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        model(**batch)
        if cuda:
            torch.cuda.synchronize()
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _fmt(metrics: Optional[dict]) -> str:
    if not metrics:
        return "-"
    return ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k != "main" and isinstance(v, float))


def write_report(run) -> dict:
    import capkit
    from capkit.cap.banks import model_inputs, to_device
    from capkit.export import save

    cfg = run.cfg
    out: Path = run.out
    student = run._bare_student()
    pruned_metrics = run.evaluate(student)
    dense_metrics = run.evaluate(run.teacher) if run.teacher is not None else None
    sparsity = capkit.sparsity_report(student)
    summary = sparsity.to_dict()
    report = {
        "method": cfg.method, "model": cfg.model, "task": cfg.task,
        "train_examples": run.num_examples, "dev_examples": len(run.dev_enc),
        "dense": {"source": "teacher" if run.teacher is not None else None, "metrics": dense_metrics},
        "pruned": {"metrics": pruned_metrics, "sparsity": sparsity.sparsity,
                   "heads_left": summary["heads_left"], "neurons_left": summary["neurons_left"],
                   "parameters": sparsity.parameters, "nonzero_parameters": sparsity.nonzero_parameters},
        "train_seconds": None if run.train_seconds is None else round(run.train_seconds, 3),  # a tiny run takes ms
        "exports": {}, "history": run.history, "device": str(run.device),
        "torch": torch.__version__, "capkit": capkit.__version__,
    }
    if dist.is_main():
        for fmt in cfg.export_formats:
            path = out / f"model-{fmt}"
            save(student, path, format=fmt, tokenizer=run.tokenizer, overwrite=True,
                 extra={"method": cfg.method, "task": cfg.task, "metrics": pruned_metrics})
            size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
            report["exports"][fmt] = {"path": str(path), "bytes": size}
        fast = next((f for f in ("compact", "sparse") if f in report["exports"]), None)
        if fast is not None and run.teacher is not None:
            loaded = capkit.load(out / f"model-{fast}", device=run.device)
            loader = run._loader(run.dev_enc, cfg.eval_batch_size)
            batch = to_device(model_inputs(next(iter(loader))), run.device)
            t_dense = measure_latency(run.teacher, batch)
            t_fast = measure_latency(loaded, batch)
            report["latency"] = {"format": fast, "batch": int(batch["input_ids"].shape[0]),
                                 "seq": int(batch["input_ids"].shape[1]), "dense_ms": 1e3 * t_dense,
                                 "pruned_ms": 1e3 * t_fast, "speedup": t_dense / t_fast,
                                 "threads": torch.get_num_threads()}
            # the exported model must give the same predictions as the model it came from
            report["latency"]["export_matches"] = _same_predictions(student, loaded, batch)
        if getattr(run, "eval_file", None) is not None:
            # the exported model as a user loads it (the fast format when there is one), and the teacher
            scored = next((f for f in ("compact", "sparse", "dense") if f in report["exports"]), None)
            model = capkit.load(out / f"model-{scored}", device=run.device) if scored else student
            report["eval_file"] = {
                "file": str(cfg.eval_file), "examples": len(run.eval_file[0]), "model": scored or "in memory",
                "pruned": run.evaluate_file(model),
                "dense": run.evaluate_file(run.teacher) if run.teacher is not None else None}
        atomic_write_text(out / "report.md", _markdown(report, sparsity.table()))
        atomic_write_text(out / "report.json", json.dumps(report, indent=2, default=str))  # last: marks the run done
        _print_summary(report)
    return report


@torch.no_grad()
def _same_predictions(a, b, batch) -> bool:
    a.eval()
    b.eval()
    la = getattr(a(**batch), "logits", None)
    lb = getattr(b(**batch), "logits", None)
    if la is None or lb is None:
        return True
    return bool(torch.allclose(la.float(), lb.float(), atol=1e-3, rtol=1e-3))


def _markdown(report: dict, sparsity_table: str) -> str:
    lines = [f"# capkit-prune: {report['method']} on {report['task']}", "",
             f"model {report['model']}, {report['train_examples']} training / {report['dev_examples']} dev examples, "
             f"device {report['device']}, torch {report['torch']}, capkit {report['capkit']}"
             + (f", training {report['train_seconds']:.0f} s" if report.get("train_seconds") is not None else ""), "",
             "| model | metrics |", "|---|---|",
             f"| dense ({report['dense']['source'] or 'n/a'}) | {_fmt(report['dense']['metrics'])} |",
             f"| pruned | {_fmt(report['pruned']['metrics'])} |"]
    ef = report.get("eval_file")
    if ef:
        lines += [f"| dense on {ef['file']} | {_fmt(ef['dense'])} |",
                  f"| pruned ({ef['model']} export) on {ef['file']} | {_fmt(ef['pruned'])} |"]
    lines += ["",
             f"encoder sparsity {100 * report['pruned']['sparsity']:.2f}%, parameters "
             f"{report['pruned']['parameters']:,} ({report['pruned']['nonzero_parameters']:,} non-zero)", ""]
    lat = report.get("latency")
    if lat:
        lines += [f"latency ({lat['format']} export, batch {lat['batch']} x {lat['seq']} tokens, "
                  f"{lat['threads']} threads): dense {lat['dense_ms']:.1f} ms, pruned {lat['pruned_ms']:.1f} ms, "
                  f"speed-up {lat['speedup']:.2f}x", ""]
    for fmt, e in report["exports"].items():
        lines.append(f"- `{fmt}` export: {e['path']} ({e['bytes'] / 2**20:.1f} MiB)")
    lines += ["", "## Per layer", "", sparsity_table, ""]
    return "\n".join(lines)


def _print_summary(report: dict) -> None:
    main_dense = (report["dense"]["metrics"] or {}).get("main")
    print(f"\n== capkit-prune: {report['method']} on {report['task']} ==")
    if main_dense is not None:
        print(f"dense  (teacher): {_fmt(report['dense']['metrics'])}")
    print(f"pruned          : {_fmt(report['pruned']['metrics'])}")
    ef = report.get("eval_file")
    if ef:
        print(f"eval file       : {ef['file']} ({ef['examples']} examples)")
        if ef["dense"] is not None:
            print(f"  dense         : {_fmt(ef['dense'])}")
        print(f"  pruned        : {_fmt(ef['pruned'])}")
    print(f"sparsity        : {100 * report['pruned']['sparsity']:.2f}% of encoder weights")
    lat = report.get("latency")
    if lat:
        print(f"speed-up        : {lat['speedup']:.2f}x ({lat['format']} export, {lat['dense_ms']:.1f} -> "
              f"{lat['pruned_ms']:.1f} ms per batch of {lat['batch']})")
    for fmt, e in report["exports"].items():
        print(f"export ({fmt:7s}): {e['path']}")
