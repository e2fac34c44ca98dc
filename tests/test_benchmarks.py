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
    assert rc == (1 if any(not f["error"].startswith("skipped") for f in data["failures"]) else 0)
    with pytest.raises(SystemExit):
        bench_nce.main(["--shapes", "4x64"])


def test_sparse_inference_benchmark_runs(tmp_path):
    from benchmarks import sparse_inference as bench_si

    rc = bench_si.main(["--quick", "--sparsities", "0.9", "--min-time", "0.01", "--out", str(tmp_path)])
    assert rc == 0
    result = json.loads((tmp_path / "sparse_inference_quick.json").read_text())
    kinds = {r["kind"] for r in result["rows"]}
    assert kinds == {"unstructured", "block32", "2:4"} and not result["failures"]
    for r in result["rows"]:
        assert r["sparse_ms"] > 0 and r["dense_ms"] > 0 and r["file_mb"] < r["dense_file_mb"]
    assert result["machine"]["torch"]
    assert (tmp_path / "sparse_inference_quick.md").read_text().startswith("# sparse exports")
    with pytest.raises(SystemExit):
        bench_si.main(["--sparsities", "1.0"])


def test_mask_threshold_benchmark_runs(tmp_path):
    from benchmarks import mask_threshold as bench_mt

    rc = bench_mt.main(["--device", "cpu", "--quick", "--keeps", "0.1", "--min-time", "0.01", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "mask_threshold_quick.json").read_text())
    backends = {(r["scope"], r["backend"]) for r in data["rows"]}
    assert {("per-matrix", "sort (reference)"), ("per-matrix", "kthvalue"), ("global", "kthvalue")} <= backends
    assert rc == 0 and all(r["median_s"] > 0 for r in data["rows"])


def test_runner_collects_results_and_reports_failures(tmp_path, monkeypatch):
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
    with pytest.raises(SystemExit):
        runner.main(["--only", "nope"])
