"""The masked-linear benchmark on tiny inputs: result files carry every required field."""
import json

import pytest

from benchmarks import masked_linear as bench


def test_benchmark_writes_complete_results(tmp_path):
    rc = bench.main(["--device", "cpu", "--tokens", "8", "--shapes", "bert-ffn-in", "--sparsities", "0.0", "0.9",
                     "--kinds", "unstructured", "block", "--min-time", "0.01", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "masked_linear.json").read_text())
    machine = data["machine"]
    for key in ("device", "torch", "triton", "cuda", "git_commit", "date", "cpu", "torch_threads"):
        assert key in machine
    assert data["peaks"]["matmul_flops"] > 0 and data["peaks"]["copy_bytes_per_s"] > 0
    ops = {(r["backend"], r["op"]) for r in data["rows"]}
    assert {("dense", "forward"), ("masked", "forward"), ("masked", "forward+backward")} <= ops
    if bench.fast_backends(__import__("torch").device("cpu")):
        assert {("cpu", "forward"), ("cpu", "grad_input"), ("cpu", "grad_weight")} <= ops
    for r in data["rows"]:
        assert r["median_s"] > 0 and r["shape"] == "bert-ffn-in" and r["dtype"] == "float32"
    assert any(r["op"] == "layout_update" for r in data["rows"])
    assert (tmp_path / "masked_linear.md").read_text().startswith("# masked_linear on")
    assert rc == (1 if data["failures"] else 0)


def test_failure_is_reported_not_timed(tmp_path, monkeypatch):
    def broken(*a, **k):
        raise RuntimeError("kernel exploded")

    monkeypatch.setattr(bench.F, "linear", broken)
    rc = bench.main(["--device", "cpu", "--tokens", "4", "--shapes", "bert-ffn-in", "--sparsities", "0.5",
                     "--kinds", "block", "--min-time", "0.01", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "masked_linear.json").read_text())
    assert rc == 1
    assert any("kernel exploded" in f["error"] for f in data["failures"])
    assert not any(r["backend"] == "dense" and r["op"] == "forward" for r in data["rows"])


def test_dispatch_rules_stop_at_first_loss():
    rows = [{"backend": "cpu", "kind": "block", "op": "forward", "sparsity": 1 - d, "density": d,
             "speedup_vs_masked": s} for d, s in ((0.05, 4.0), (0.1, 3.0), (0.5, 0.9), (1.0, 1.2))]
    # Two shapes at 2:4: a loss on one of them means no rule.
    rows += [{"backend": "cpu", "kind": "nm", "op": "forward", "sparsity": 0.5, "density": 0.5,
              "speedup_vs_masked": s} for s in (1.2, 0.7)]
    rules = bench.dispatch_rules_from({"machine": {"device_type": "cpu"}, "dtype": "float32", "rows": rows})
    assert len(rules) == 1
    assert rules[0]["max_density"] == pytest.approx(0.101)
    assert rules[0]["mode"] == "inference" and rules[0]["mask_kind"] == "block"


def test_info_nce_benchmark_runs(tmp_path):
    from benchmarks import info_nce as bench_nce

    rc = bench_nce.main(["--device", "cpu", "--shapes", "4x64x16", "--min-time", "0.01", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "info_nce.json").read_text())
    ops = {(r["backend"], r["op"]) for r in data["rows"]}
    assert {("torch", "forward"), ("torch", "forward+backward"), ("cross_entropy", "forward+backward")} <= ops
    assert all(r["median_s"] > 0 and r["read_floor_s"] > 0 for r in data["rows"])
    from benchmarks.harness import cpu_peak_extra_bytes

    if cpu_peak_extra_bytes(lambda: None) is not None:  # Linux: peak memory on the CPU too
        assert all(r["peak_extra_bytes"] >= 0 for r in data["rows"])
    assert rc == (1 if any(not f["error"].startswith("skipped") for f in data["failures"]) else 0)
    with pytest.raises(SystemExit):
        bench_nce.main(["--shapes", "4x64"])


def test_sparse_inference_benchmark_runs(tmp_path):
    from benchmarks import sparse_inference as bench_si

    # --allocator default: the tuned allocator would change this test process for the tests after it
    rc = bench_si.main(["--quick", "--sparsities", "0.9", "--min-time", "0.01", "--out", str(tmp_path),
                        "--allocator", "default"])
    assert rc == 0
    result = json.loads((tmp_path / "sparse_inference_quick.json").read_text())
    assert result["machine"]["allocator"] == "C library defaults" and result["compiled"] is False
    assert "allocator: C library defaults" in (tmp_path / "sparse_inference_quick.md").read_text()
    kinds = {r["kind"] for r in result["rows"]}
    assert kinds == {"unstructured", "block32", "2:4"} and not result["failures"]
    for r in result["rows"]:
        assert r["sparse_ms"] > 0 and r["dense_ms"] > 0 and r["file_mb"] < r["dense_file_mb"]
    assert result["machine"]["torch"]
    from capkit.onnx_export import onnx_missing_reason

    if onnx_missing_reason() is None:  # ONNX Runtime baseline beside torch dense, version recorded
        assert result["onnxruntime"] and all(r["ort_ms"] > 0 and r["speedup_vs_ort"] > 0 for r in result["rows"])
    else:
        assert result["onnxruntime"] is None and "capkit[bench]" in result["onnxruntime_note"]
    assert (tmp_path / "sparse_inference_quick.md").read_text().startswith("# sparse exports")
    with pytest.raises(SystemExit):
        bench_si.main(["--sparsities", "1.0"])


def test_sparse_inference_compile_option_compiles_both_torch_models(tmp_path):
    """--compile: torch dense and every sparse export go through torch.compile (here a counting
    stand-in, so the test stays fast) and the result is filed under its own name and says so."""
    from unittest import mock

    from benchmarks import sparse_inference as bench_si

    compiled = []

    def fake_compile(model, *a, **k):
        compiled.append(type(model).__name__)
        return model

    with mock.patch.object(bench_si.torch, "compile", fake_compile):
        rc = bench_si.main(["--quick", "--sparsities", "0.9", "--min-time", "0.01", "--out", str(tmp_path),
                            "--allocator", "default", "--compile"])
    assert rc == 0
    # one dense model, one export per kind (unstructured, block32, 2:4)
    assert len(compiled) == 4
    result = json.loads((tmp_path / "sparse_inference_compiled_quick.json").read_text())
    assert result["compiled"] is True and "torch.compile" in result["baselines"]["torch"]
    assert "compiled with `torch.compile`" in (tmp_path / "sparse_inference_compiled_quick.md").read_text()
    assert not (tmp_path / "sparse_inference_quick.json").exists()


def test_mask_threshold_benchmark_runs(tmp_path):
    from benchmarks import mask_threshold as bench_mt

    rc = bench_mt.main(["--device", "cpu", "--quick", "--keeps", "0.1", "--min-time", "0.01", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "mask_threshold_quick.json").read_text())
    backends = {(r["scope"], r["backend"]) for r in data["rows"]}
    assert {("per-matrix", "sort (reference)"), ("per-matrix", "kthvalue"), ("global", "kthvalue")} <= backends
    assert rc == 0 and all(r["median_s"] > 0 for r in data["rows"])


def test_runner_collects_results_and_reports_failures(tmp_path, monkeypatch):
    import importlib.util

    import benchmarks.__main__ as runner
    from benchmarks import info_nce as bench_nce

    real = bench_nce.main
    # a tiny shape keeps the test fast; the runner's own arguments still reach the benchmark
    monkeypatch.setattr(bench_nce, "main", lambda argv: real(argv + ["--shapes", "4x64x16"]))
    monkeypatch.setattr(runner.importlib.import_module("benchmarks.mask_threshold"), "main",
                        lambda argv: (_ for _ in ()).throw(RuntimeError("kernel exploded")))
    rc = runner.main(["--quick", "--only", "info_nce", "--only", "mask_threshold", "--min-time", "0.01",
                      "--out", str(tmp_path)])
    assert rc == 1
    report = (tmp_path / "report_quick.md").read_text()
    assert "| info_nce | ok |" in report
    assert "failed: RuntimeError: kernel exploded" in report
    assert (tmp_path / "info_nce_quick.json").exists() and "## " in report
    # the report of a real (tiny) run: targets, plots from its results
    floor = "| InfoNCE at CAP's shape (32 × 4,200 × 768): within 2× of the keys' read floor | ≤ 2× | — |"
    assert floor in report  # the tiny shape is not CAP's: not judged
    assert "not measured: no mask_threshold results here" in report
    if importlib.util.find_spec("matplotlib"):
        assert "![InfoNCE against bank size](plots/info_nce_scaling_quick.png)" in report
        assert _is_png(tmp_path / "plots" / "info_nce_scaling_quick.png")
    with pytest.raises(SystemExit):
        runner.main(["--only", "nope"])


# ---------------------------------------------------------------- report: targets, accuracy, plots
def _machine(gpu=False):
    return {"device": "nvidia-h100" if gpu else "test-cpu-2c", "device_type": "cuda" if gpu else "cpu",
            "torch": "2.x", "triton": None, "cuda": "12" if gpu else None, "git_commit": "abc123",
            "date": "2026-01-01T00:00:00+00:00", "cpu": "test", "torch_threads": 2}


def _synthetic(folder, suffix="_quick", gpu=False, block90=4.0, floor=3.0, mem=None):
    """Small result files in the real format: block-90% forward speed-up ``block90``, InfoNCE at
    CAP's shape ``floor`` times its read floor, peak InfoNCE memory ``mem`` bytes (GPU)."""
    import json

    dtype, fast = ("bfloat16", "cuda") if gpu else ("float32", "cpu")
    ml = []
    for shape, (n, k) in (("bert-ffn-in", (3072, 768)), ("bert-ffn-out", (768, 3072))):
        for kind in ("unstructured", "block"):
            for sp in (0.0, 0.5, 0.9):
                base = {"shape": shape, "M": 4096, "N": n, "K": k, "kind": kind, "sparsity": sp, "density": 1 - sp,
                        "block_size": 32 if kind == "block" else None, "dtype": dtype}
                s = block90 if (kind == "block" and sp == 0.9) else 1.1
                ml += [dict(base, backend="dense", op="forward", median_s=1e-3, roofline_fraction=0.8),
                       dict(base, backend=fast, op="forward", median_s=1e-3 / s, roofline_fraction=0.5,
                            speedup_vs_dense=s, speedup_vs_masked=s),
                       dict(base, backend=fast, op="forward+backward", median_s=3e-3 / s, speedup_vs_dense=s,
                            speedup_vs_masked=s)]
    nce = []
    for b, m in ((32, 4200), (256, 65536)) + (((4096, 65536),) if gpu else ()):
        base = {"B": b, "M": m, "d": 768, "key_dtype": dtype, "read_floor_s": 1e-4}
        for op in ("forward", "forward+backward"):
            nce += [dict(base, backend="torch", op=op, median_s=1e-3),
                    dict(base, backend=fast, op=op, median_s=floor * 1e-4, speedup_vs_naive=1e-3 / (floor * 1e-4),
                         x_read_floor=floor, **({"peak_extra_bytes": mem} if mem is not None else {}))]
    files = {
        "masked_linear": {"dtype": dtype, "tokens": 4096, "block_size": 32, "rows": ml},
        "info_nce": {"key_dtype": dtype, "rows": nce},
        "mask_threshold": {"rows": [
            {"matrices": 72, "scope": "per-matrix", "keep": keep, "op": "threshold", "backend": b, "median_s": t,
             "x_read_floor": 10 * t, **({"speedup_vs_sort": 1.0 / t} if b != "sort (reference)" else {})}
            for keep in (0.5, 0.1) for b, t in (("sort (reference)", 1.0), ("kthvalue", 1 / 12))]},
        "structured_inference": {"dtype": "float32", "rows": [
            {"model": "bert-base", "batch": 1, "seq": 128, "fraction": f, "variant": "compacted" if f else "dense",
             "median_s": 0.1 / s, "roofline_fraction": 0.6, **({"speedup_vs_dense": s} if f else {})}
            for f, s in ((0.0, 1.0), (0.5, 2.0), (0.9, 6.0))]},
        "sparse_inference": {"model": "tiny", "rows": [
            {"kind": kind, "sparsity": sp, "batch": 1, "seq": 32, "dense_ms": 2.0, "sparse_ms": 2.0 / s, "speedup": s}
            for kind, sp, s in (("block32", 0.9, 3.0), ("block32", 0.95, 3.5), ("2:4", 0.5, 0.9))]},
    }
    for name, data in files.items():
        data = {"benchmark": name, "machine": _machine(gpu), "peaks": {}, "failures": [], **data}
        (folder / f"{name}{suffix}.json").write_text(json.dumps(data))
        (folder / f"{name}{suffix}.md").write_text(f"# {name} summary\n\nrows here\n")


def _report_json(folder, run="run1", dense=0.9, pruned=0.85):
    import json

    (folder / run).mkdir(parents=True)
    (folder / run / "report.json").write_text(json.dumps({
        "method": "cap-m", "model": "minilm", "task": "sst2", "device": "cpu",
        "dense": {"metrics": {"accuracy": dense, "main": dense}},
        "pruned": {"metrics": {"accuracy": pruned, "main": pruned}, "sparsity": 0.9},
        "latency": {"format": "sparse", "batch": 8, "seq": 64, "speedup": 2.5, "threads": 2}}))


def _is_png(path) -> bool:
    import struct

    data = path.read_bytes()
    width, height = struct.unpack(">II", data[16:24])  # the IHDR chunk comes first
    return data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR" and width > 100 and height > 100


def _target(rows, start):
    return next(r for r in rows if r["target"].startswith(start))


def test_targets_met_not_met_and_not_measured(tmp_path):
    from benchmarks import targets

    _synthetic(tmp_path, suffix="", block90=4.0, floor=3.0)
    results, problems = targets.load_results(tmp_path)
    assert not problems and set(results) == {"masked_linear", "info_nce", "mask_threshold", "structured_inference",
                                             "sparse_inference"}
    rows = targets.evaluate(results)
    cpu = _target(rows, "CPU: C++ masked-linear")
    assert (cpu["measured"], cpu["verdict"], cpu["margin"]) == ("4.00×", "met", "1.33× the goal")
    assert cpu["device"] == "test-cpu-2c" and "masked_linear.json" in cpu["source"]
    floor = _target(rows, "InfoNCE at CAP's shape")
    assert (floor["measured"], floor["verdict"], floor["margin"]) == ("3.00×", "**not met**", "1.50× the limit")
    thr = _target(rows, "Mask threshold")
    assert thr["verdict"] == "met" and thr["measured"] == "12.00×"
    assert _target(rows, "Structured")["verdict"] == "met"
    # GPU targets on a CPU: not judged, the nearest CPU figure labelled as such
    gpu = _target(rows, "Masked linear 768↔3072, 4096 tokens, bf16: 90% block-sparse (32/64) forward vs")
    assert gpu["verdict"].startswith("not measured on this device") and gpu["measured"] == "—"
    assert gpu["source"].startswith("nearest measured (not judged): 4.00×")
    assert _target(rows, "InfoNCE: no O(B·M)")["verdict"].startswith("not measured: no matching rows")
    assert _target(rows, "CAP-m training step")["verdict"] == "not measured: no train_step results here"

    # the training step: speed-up met, overhead not met by 5 pp; a small model is not BERT-base
    import json

    step = {"benchmark": "train_step", "machine": _machine(), "failures": [],
            "shape": {"layers": 12, "hidden": 768, "ffn": 3072, "batch": 32, "seq": 128},
            "rows": [{"variant": v, "step_ms": t} for v, t in (("capkit", 100.0), ("reference", 200.0), ("kd", 87.0))],
            "summary": {"speedup_vs_reference": 2.0, "overhead_vs_kd": 0.15}}
    (tmp_path / "train_step.json").write_text(json.dumps(step))
    step["shape"] = dict(step["shape"], layers=2, hidden=128)
    (tmp_path / "train_step_quick.json").write_text(json.dumps(step))
    rows = targets.evaluate(targets.load_results(tmp_path)[0])
    sp = _target(rows, "CAP-m training step, BERT-base, batch 32 × 128: vs")
    ov = _target(rows, "CAP-m training step, BERT-base, batch 32 × 128: overhead")
    assert (sp["verdict"], sp["measured"]) == ("met", "2.00×")
    assert (ov["verdict"], ov["measured"], ov["margin"]) == ("**not met**", "15.0%", "+5.0 pp")
    (tmp_path / "train_step.json").unlink()
    rows = targets.evaluate(targets.load_results(tmp_path)[0])
    ov = _target(rows, "CAP-m training step, BERT-base, batch 32 × 128: overhead")
    assert ov["verdict"] == "not measured at the target's shape / dtype" and ov["measured"] == "—"
    assert ov["source"].startswith("nearest measured (not judged): 15.0%; train_step_quick.json:")
    assert "2 layers × 128 hidden, batch 32 × 128 tokens" in ov["source"]
    # noise that spans the goal: the medians say met, the fastest steps say not met
    step["shape"] = dict(step["shape"], layers=12, hidden=768)
    step["rows"] = [{"variant": v, "step_ms": t, "min_ms": m}
                    for v, t, m in (("capkit", 100.0, 90.0), ("reference", 200.0, 190.0), ("kd", 95.0, 75.0))]
    step["summary"] = {"speedup_vs_reference": 2.0, "overhead_vs_kd": 100 / 95 - 1}
    (tmp_path / "train_step.json").write_text(json.dumps(step))
    rows = targets.evaluate(targets.load_results(tmp_path)[0])
    ov = _target(rows, "CAP-m training step, BERT-base, batch 32 × 128: overhead")
    assert ov["verdict"] == "not resolved (median 5.3%, fastest samples 20.0%)"
    assert _target(rows, "CAP-m training step, BERT-base, batch 32 × 128: vs")["verdict"] == "met"


def test_targets_on_gpu_results(tmp_path):
    from benchmarks import targets

    _synthetic(tmp_path, suffix="", gpu=True, block90=1.5, floor=1.8, mem=2**20)
    rows = targets.evaluate(targets.load_results(tmp_path)[0])
    fwd = _target(rows, "Masked linear 768↔3072, 4096 tokens, bf16: 90% block-sparse (32/64) forward vs")
    assert (fwd["verdict"], fwd["measured"], fwd["device"]) == ("**not met**", "1.50×", "nvidia-h100")
    assert _target(rows, "Masked linear 768↔3072, 4096 tokens, bf16: fused")["verdict"] == "met"
    mem = _target(rows, "InfoNCE: no O(B·M)")
    assert mem["verdict"] == "met" and "B 4096, M 65,536" in mem["source"]
    assert _target(rows, "InfoNCE at CAP's shape")["verdict"] == "met"
    assert _target(rows, "CPU: C++")["verdict"].startswith("not measured on this device")


def test_report_only_rebuilds_report_with_plots_targets_and_accuracy(tmp_path):
    pytest.importorskip("matplotlib")
    import re

    import benchmarks.__main__ as runner

    _synthetic(tmp_path, gpu=True, mem=2**20)  # GPU-like: peak memory and two batch sizes at one bank size
    _report_json(tmp_path)
    assert runner.main(["--report-only", "--out", str(tmp_path)]) == 0
    assert not (tmp_path / "report.md").exists()  # no full-run files: only the quick report
    report = (tmp_path / "report_quick.md").read_text()
    for section in ("## Targets", "## Accuracy", "## Plots", "## masked_linear summary"):
        assert section in report
    assert "| masked_linear | ok |" in report and "| train_step | no results file |" in report
    links = re.findall(r"!\[[^]]*\]\((plots/[^)]+\.png)\)", report)
    assert {f"plots/{n}_quick.png" for n in ("masked_linear_speedup", "info_nce_scaling", "roofline",
                                             "inference_speedup")} == set(links)
    assert all(_is_png(tmp_path / link) for link in links)
    assert "| run1 | sst2 | minilm | cap-m | 90.0% | accuracy |" in report
    assert "| 0.9000 | 0.8500 | 5.0 pp | 2.50× (sparse export, batch 8 × 64) | cpu, 2 threads |" in report
    # the full report is rebuilt from full-run files only when asked for and present
    assert runner.main(["--report-only", "--full", "--out", str(tmp_path)]) == 1


def test_report_survives_missing_benchmarks_fields_and_matplotlib(tmp_path, monkeypatch):
    import importlib.util
    import json

    import benchmarks.__main__ as runner
    from benchmarks import plots, targets

    _synthetic(tmp_path, suffix="")
    (tmp_path / "structured_inference.json").unlink()  # a missing benchmark
    (tmp_path / "sparse_inference.json").unlink()
    nce = json.loads((tmp_path / "info_nce.json").read_text())
    for r in nce["rows"]:
        del r["B"]  # a missing field
    (tmp_path / "info_nce.json").write_text(json.dumps(nce))
    (tmp_path / "broken.json").write_text("{not json")
    assert runner.main(["--report-only", "--full", "--out", str(tmp_path)]) == 0
    report = (tmp_path / "report.md").read_text()
    assert "| structured_inference | no results file |" in report
    assert "- skipped broken.json: unreadable" in report
    assert "could not evaluate: KeyError: 'B'" in report
    assert "not measured: no structured_inference results here" in report
    if importlib.util.find_spec("matplotlib"):
        assert "- Structured and sparse inference: speed-up against sparsity: skipped (no " in report
        assert "- InfoNCE against bank size: skipped (failed: KeyError" in report
        assert _is_png(tmp_path / "plots" / "masked_linear_speedup.png")
    # without matplotlib the report still renders and says how to get the plots
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)
    text = plots.plots_markdown(targets.load_results(tmp_path)[0], tmp_path, "")
    assert text == "Plots need matplotlib: `pip install capkit[bench]` (or `pip install matplotlib`)."
    assert runner.main(["--report-only", "--full", "--out", str(tmp_path)]) == 0
    assert "pip install capkit[bench]" in (tmp_path / "report.md").read_text()


def test_report_status_tells_failures_from_cases_not_run(tmp_path):
    import json

    import benchmarks.__main__ as runner

    _synthetic(tmp_path, suffix="")
    cases = {"masked_linear": ["not run (--collect)", "not run (--collect)"],
             "info_nce": ["not run (--collect)", "RuntimeError('boom')"],
             "mask_threshold": ["skipped: no GPU"]}
    for name, errors in cases.items():
        data = json.loads((tmp_path / f"{name}.json").read_text())
        data["failures"] = [{"error": e} for e in errors]
        (tmp_path / f"{name}.json").write_text(json.dumps(data))
    assert runner.main(["--report-only", "--full", "--out", str(tmp_path)]) == 0
    report = (tmp_path / "report.md").read_text()
    assert "| masked_linear | ok; 2 case(s) not run (see its section) |" in report
    assert "| info_nce | 1 failure(s) recorded (see its section); 1 case(s) not run (see its section) |" in report
    assert "| mask_threshold | ok |" in report


def test_accuracy_rows_read_pruning_reports(tmp_path):
    from benchmarks import targets

    _report_json(tmp_path, "a", dense=0.95, pruned=0.9)
    (tmp_path / "a" / "report.md").write_text("# report\n")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "report.json").write_text("[]")  # not a report: skipped with a line, not raised
    _report_json(tmp_path, "accuracy_runs/sst2/movement", dense=0.95, pruned=0.8)  # benchmarks.accuracy's runs
    _report_json(tmp_path, "accuracy_runs/sst2/seed-1/cap-m@0.9", dense=0.95, pruned=0.9)  # ... with seeds
    rows, problems = targets.accuracy_rows(tmp_path)
    assert [r["run"] for r in rows] == ["[a](a/report.md)", "accuracy_runs/sst2/movement",
                                        "accuracy_runs/sst2/seed-1/cap-m@0.9"]
    assert rows[1]["drop"] == "15.0 pp"
    assert (rows[0]["metric"], rows[0]["dense"], rows[0]["pruned"], rows[0]["drop"]) == ("accuracy", "0.9500",
                                                                                        "0.9000", "5.0 pp")
    assert len(problems) == 1 and problems[0].startswith("b/report.json")
    assert "No CAP pruning runs here" in targets.accuracy_markdown(tmp_path / "a")


def test_accuracy_targets_from_seeded_runs(tmp_path):
    import json

    from benchmarks import targets
    from benchmarks.accuracy import aggregate

    def rows(task, method, dense, pruned):
        return [{"task": task, "method": method, "seed": s, "model": "minilm", "train_examples": 100,
                 "dev_examples": 50, "dense": d, "pruned": p, "kept": p / d, "sparsity": 0.9, "speedup": None}
                for s, d, p in zip((1, 2, 3), dense, pruned)]

    runs = rows("sst2", "cap-m@0.9", (0.91, 0.91, 0.92), (0.88, 0.89, 0.90)) + \
        rows("sst2", "movement@0.9", (0.91, 0.91, 0.92), (0.80, 0.82, 0.81))
    groups, comparisons = aggregate(runs)
    capm = next(g for g in groups if g["method"] == "cap-m@0.9")
    assert capm["n"] == 3 and capm["pruned_mean"] == pytest.approx(0.89) and capm["pruned_std"] == pytest.approx(0.01)
    assert capm["kept_mean"] == pytest.approx((0.88 / 0.91 + 0.89 / 0.91 + 0.90 / 0.92) / 3)
    (c,) = comparisons
    assert (c["baseline"], c["margin"], c["spread"]) == ("movement@0.9", pytest.approx(0.08), pytest.approx(0.01))
    # seed by seed: cap-m 0.88, 0.89, 0.90 against movement 0.80, 0.82, 0.81
    assert c["paired_seeds"] == [1, 2, 3] and c["paired_diffs"] == pytest.approx([0.08, 0.07, 0.09])
    assert (c["paired_mean"], c["paired_std"]) == (pytest.approx(0.08), pytest.approx(0.01))
    from benchmarks.accuracy import summary_markdown

    text = summary_markdown({"machine": _machine(), "settings": [], "seeds": [1, 2, 3], "rows": [], "groups": [],
                             "comparisons": comparisons, "failures": []})
    assert ("Seed by seed (1, 2, 3): +8.0, +7.0, +9.0 points, mean 8.00 ± 1.00 (standard error 0.58); "
            "ahead on 3 of 3.") in text
    # a seed that only one method finished is left out of the pairs
    (c,) = aggregate(runs[:2] + runs[3:])[1]
    assert c["paired_seeds"] == [1, 2]

    def judged(runs):
        groups, comparisons = aggregate(runs)
        data = {"benchmark": "accuracy", "machine": _machine(), "rows": runs, "groups": groups,
                "comparisons": comparisons, "failures": []}
        (tmp_path / "accuracy.json").write_text(json.dumps(data))
        found = targets.evaluate(targets.load_results(tmp_path)[0])
        return _target(found, "Accuracy, SST-2 (≥ 3 seeds): cap-m at 90%"), _target(found, "Accuracy, SST-2 (≥ 3 "
                                                                                           "seeds): cap-m's margin")

    kept, margin = judged(runs)
    assert (kept["verdict"], kept["measured"]) == ("met", "97.4%")
    assert (margin["verdict"], margin["measured"]) == ("met", "8.00×")
    # an ablation is compared with its whole method, and never judged as cap-m itself
    ablated = rows("sst2", "cap-m@0.9+no-fic", (0.91, 0.91, 0.92), (0.85, 0.87, 0.86))
    comparisons = aggregate(runs + ablated)[1]
    abl = next(c for c in comparisons if c["method"] == "cap-m@0.9+no-fic")
    assert abl["baseline"] == "cap-m@0.9" and abl["paired_diffs"] == pytest.approx([-0.03, -0.02, -0.04])
    assert [c["baseline"] for c in comparisons if c["method"] == "cap-m@0.9"] == ["movement@0.9"]
    kept, margin = judged(ablated + runs)
    assert (kept["measured"], margin["measured"]) == ("97.4%", "8.00×")
    # a margin inside the seeds' spread, and too much lost: not met
    worse = rows("sst2", "cap-m@0.9", (0.91, 0.91, 0.92), (0.80, 0.85, 0.90)) + runs[3:]
    kept, margin = judged(worse)
    assert kept["verdict"] == margin["verdict"] == "**not met**" and margin["measured"] == "0.80×"
    # another task or a single seed is shown, not judged
    kept, margin = judged(rows("bbc_news", "cap-m@0.9", (0.9,), (0.88,)))
    assert kept["verdict"] == "not measured at the target's shape / dtype"
    assert kept["source"].startswith("nearest measured (not judged): 97.8%")
    assert margin["verdict"].startswith("not measured: no matching rows")


def test_default_results_folder_and_console_script(tmp_path):
    import tomllib
    from pathlib import Path

    import benchmarks.__main__ as runner

    repo = Path(runner.__file__).resolve().parents[1]
    assert runner.default_out("dev") == repo / "benchmarks" / "results" / "dev"  # the source checkout
    installed = tmp_path / "site-packages" / "benchmarks"
    installed.mkdir(parents=True)
    assert runner.default_out("dev", installed, cwd=repo / "capkit") == repo / "benchmarks" / "results" / "dev"
    assert runner.default_out("dev", installed, cwd=tmp_path) == tmp_path / "capkit-bench-results" / "dev"
    meta = tomllib.loads((repo / "pyproject.toml").read_text())
    assert meta["project"]["scripts"]["capkit-bench"] == "benchmarks.__main__:main"
    assert any(d.startswith("matplotlib") for d in meta["project"]["optional-dependencies"]["bench"])
    assert '"benchmarks"' in (repo / "setup.py").read_text()


def test_cpu_peak_memory_counts_what_a_call_allocates():
    # In a fresh process, as a benchmark runs (a long test session holds freed memory that a
    # new allocation may reuse without raising the resident high-water mark).
    import subprocess
    import sys
    from pathlib import Path

    code = ("import torch; from benchmarks.harness import cpu_peak_extra_bytes as p; "
            "print(p(lambda: torch.ones(8 * 2**20).sum()), p(lambda: None))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr
    big, nothing = out.stdout.split()
    if big == "None":
        pytest.skip("no /proc/self/clear_refs here")
    assert 28 * 2**20 <= int(big) <= 64 * 2**20  # 32 MiB, freed at once
    assert int(nothing) < 4 * 2**20


def test_step_bound_from_the_reference_phases():
    from benchmarks.targets import _step_bound

    phases = dict(teacher_forward=20.0, student_forward=20.0, contrastive=4.0, backward=40.0, optimizer=6.0)
    rows = [{"variant": "reference", "mask_update": 30.0, **phases}, {"variant": "capkit", "mask_update": 2.0}]
    text = _step_bound({"rows": rows})
    # 120 ms of reference phases, 30 of them the sort: 120 / (120 - 30 + 2) = 1.30x
    assert "25% of its phases" in text and "1.30×" in text
    assert _step_bound({"rows": rows[:1]}) == ""  # no capkit row: nothing to say


def test_cpu_timing_takes_a_median_of_several_calls_even_for_long_ones():
    import time

    import torch

    from benchmarks.harness import MIN_SAMPLES, time_fn

    calls = []

    def slow():
        calls.append(1)
        time.sleep(0.03)

    t = time_fn(slow, torch.device("cpu"), min_run_time=0.01)  # one call is longer than the budget
    assert t["n"] >= MIN_SAMPLES and len(calls) >= MIN_SAMPLES + 1  # + the warm-up call
    assert 0.025 < t["median_s"] < 0.5 and t["min_s"] <= t["median_s"]
