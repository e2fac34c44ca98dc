"""The end-to-end training-step benchmark on a tiny BERT: every variant timed with its phases,
capkit's step computing the same loss as the reference's way, failures reported."""
import json

import pytest

pytest.importorskip("transformers")

from benchmarks import train_step as bench  # noqa: E402

TINY = ["--device", "cpu", "--layers", "1", "--hidden", "32", "--heads", "2", "--ffn", "64", "--batch", "4",
        "--seq", "8", "--bank-examples", "64", "--negatives", "32", "--vocab", "100", "--steps", "1",
        "--warmup", "0"]


def test_train_step_results_are_complete(tmp_path):
    rc = bench.main(TINY + ["--out", str(tmp_path)])
    data = json.loads((tmp_path / "train_step.json").read_text())
    assert rc == 0 and data["failures"] == []
    assert {r["variant"] for r in data["rows"]} == set(bench.DEFAULT_VARIANTS)
    for row in data["rows"]:
        assert row["step_ms"] > 0 and row["dtype"] == "float32"
        assert all(row[p] >= 0 for p in bench.PHASES)
    kd = next(r for r in data["rows"] if r["variant"] == "kd")
    assert kd["contrastive"] < 1.0 and kd["mask_update"] < 1.0  # plain KD has neither
    summary = data["summary"]
    assert summary["speedup_vs_reference"] > 0 and "overhead_vs_kd" in summary
    # same weights, batch, dropout and negatives: the fused path computes the reference's loss
    assert summary["loss_rel_diff"] < 1e-5
    for key in ("device", "torch", "git_commit", "date"):
        assert key in data["machine"]
    assert data["shape"]["layers"] == 1 and data["shape"]["batch"] == 4
    md = (tmp_path / "train_step.md").read_text()
    assert md.startswith("# train_step on") and "target >= 1.5x" in md


def test_train_step_teacher_logits_cached_or_live(tmp_path):
    runs = {}
    for mode in ("cache", "live"):
        assert bench.main(TINY + ["--teacher-logits", mode, "--out", str(tmp_path / mode)]) == 0
        runs[mode] = json.loads((tmp_path / mode / "train_step.json").read_text())
        assert runs[mode]["shape"]["teacher_logits"] == mode
        assert f"teacher logits {bench._TEACHER_TEXT[mode]}" in (tmp_path / mode / "train_step.md").read_text()
    # the cached rows are the teacher's logits of the batch: the same loss as the live forward
    assert runs["cache"]["summary"]["first_loss"] == pytest.approx(runs["live"]["summary"]["first_loss"], rel=1e-6)
    assert runs["cache"]["summary"]["loss_rel_diff"] < 1e-5


def test_train_step_failure_is_reported(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("reference loss exploded")

    monkeypatch.setattr(bench, "info_nce_reference", broken)
    rc = bench.main(TINY + ["--variants", "capkit", "reference", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "train_step.json").read_text())
    assert rc == 1
    assert [r["variant"] for r in data["rows"]] == ["capkit"]
    assert "reference loss exploded" in data["failures"][0]["error"]
    assert "speedup_vs_reference" not in data["summary"]


def test_train_step_rejects_bad_arguments(capsys):
    with pytest.raises(SystemExit):
        bench.main(["--device", "cpu", "--hidden", "30", "--heads", "4"])
    assert "--hidden (30) must be a multiple of --heads (4)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.main(["--device", "cpu", "--keep", "0"])


def test_accuracy_runs_are_tabulated_and_resume(tmp_path):
    from _models import tiny_text_task

    from benchmarks import accuracy

    task = tiny_text_task(tmp_path / "task")
    settings = ["--model", str(task / "model"), "--train-file", str(task / "train.csv"), "--dev-file",
                str(task / "dev.csv"), "--epochs", "2", "--batch-size", "8", "--max-length", "16",
                "--teacher-epochs", "1", "--extra-negatives", "16", "--learning-rate", "1e-3", "--save-every", "0",
                "--initial-warmup", "0.5", "--final-warmup", "0.5", "--sparsity", "0.75", "--device", "cpu"]
    argv = ["--tasks", "text", "--methods", "cap-m", "magnitude@0.5", "--out", str(tmp_path / "res"), "--", *settings]
    assert accuracy.main(argv) == 0
    data = json.loads((tmp_path / "res" / "accuracy.json").read_text())
    assert data["failures"] == [] and [r["method"] for r in data["rows"]] == ["cap-m", "magnitude@0.5"]
    assert [r["seed"] for r in data["rows"]] == [42, 42] and data["seeds"] == [42]
    for row in data["rows"]:
        assert 0 <= row["dense"] <= 1 and 0 <= row["pruned"] <= 1
        assert row["drop_points"] == pytest.approx(100 * (row["dense"] - row["pruned"]))
        target = 0.5 if row["method"] == "magnitude@0.5" else 0.75  # the method's own target wins
        assert row["sparsity"] == pytest.approx(target, abs=0.02)
        assert row["kept"] == pytest.approx(row["pruned"] / row["dense"])
        report = json.loads((tmp_path / "res" / row["report"]).read_text())  # relative to the results folder
        assert report["pruned"]["metrics"]["main"] == row["pruned"]  # the table repeats the run's report
    assert [g["n"] for g in data["groups"]] == [1, 1] and data["comparisons"] == []
    teacher = tmp_path / "res" / "accuracy_runs" / "text" / "seed-42" / "teacher" / "capkit.json"
    stamp = teacher.stat().st_mtime_ns
    # a second call reuses the teacher and resumes the finished runs to the same numbers
    assert accuracy.main(argv) == 0
    again = json.loads((tmp_path / "res" / "accuracy.json").read_text())
    assert teacher.stat().st_mtime_ns == stamp
    assert [r["pruned"] for r in again["rows"]] == [r["pruned"] for r in data["rows"]]
    assert all(r["run_s"] is None for r in again["rows"])  # read back from the finished runs' reports
    # training times come from the runs' reports, the same whether run now or read back
    assert all(r["train_s"] > 0 and r["teacher_s"] > 0 for r in data["rows"])
    assert [r["train_s"] for r in again["rows"]] == [r["train_s"] for r in data["rows"]]
    assert again["rows"][0]["teacher_s"] == data["rows"][0]["teacher_s"]
    # --collect tabulates what is finished and lists what is not, training nothing
    assert accuracy.main(argv[:4] + ["cap-soft", "--collect", *argv[5:]]) == 1
    got = json.loads((tmp_path / "res" / "accuracy.json").read_text())
    assert [r["method"] for r in got["rows"]] == ["cap-m"]
    assert got["failures"] == [{"task": "text", "seed": 42, "method": "cap-soft", "error": "not run (--collect)"}]
    assert not (tmp_path / "res" / "accuracy_runs" / "text" / "seed-42" / "cap-soft").exists()
    # the same folder with other settings is refused, not mixed into the table; magnitude@0.5
    # keeps its own target (the method's @0.5 wins over the common flag), so its settings are
    # the same and its finished run is read back
    assert accuracy.main(argv + ["--sparsity", "0.6"]) == 1
    after = json.loads((tmp_path / "res" / "accuracy.json").read_text())
    clash = after["failures"]
    assert [f["method"] for f in clash] == ["cap-m"] and "other settings" in clash[0]["error"]
    assert [r["method"] for r in after["rows"]] == ["magnitude@0.5"]


def test_accuracy_run_settings_compare_regardless_of_flag_order():
    from benchmarks.accuracy import _same_settings

    a = ["--model", "minilm", "--epochs", "3", "--max-train-examples", "300", "--no-progress"]
    b = ["--model", "minilm", "--max-train-examples", "300", "--no-progress", "--epochs", "3"]
    assert _same_settings(a, b)
    assert not _same_settings(a, ["--model", "minilm", "--epochs", "4", "--max-train-examples", "300",
                                  "--no-progress"])
    assert not _same_settings(a, ["--no-such-flag"])


def test_accuracy_reports_a_failing_run(tmp_path):
    from benchmarks import accuracy

    rc = accuracy.main(["--tasks", "text", "--out", str(tmp_path), "--", "--model", str(tmp_path / "none"),
                        "--train-file", str(tmp_path / "missing.csv"), "--dev-file", str(tmp_path / "missing.csv")])
    data = json.loads((tmp_path / "accuracy.json").read_text())
    assert rc == 1 and data["rows"] == [] and data["failures"][0]["method"] == "teacher"
    with pytest.raises(SystemExit):
        accuracy.main(["--methods", "finetune"])
    with pytest.raises(SystemExit):  # an ablation flag capkit-prune does not know stops before any training
        accuracy.main(["--methods", "cap-m+no-such-module", "--out", str(tmp_path / "x")])
    assert not (tmp_path / "x").exists()


def test_accuracy_method_specs_share_one_budget():
    from benchmarks.accuracy import method_flags, parse_method

    settings = ["--epochs", "5", "--block-size", "32"]
    assert method_flags("cap-m@0.9", settings) == ["--method", "cap-m", "--sparsity", "0.9"]
    assert method_flags("movement", settings) == ["--method", "movement"]
    # cap-f: the default schedule up to its target, the same 5 epochs spread over its iterations, no blocks
    assert method_flags("cap-f@0.5", settings) == ["--method", "cap-f", "--block-size", "0", "--structured-fractions",
                                                   "0.1", "0.2", "0.3", "0.4", "0.5", "--structured-epochs", "1"]
    flags = method_flags("cap-f@0.9", settings)
    assert flags[flags.index("--structured-epochs") + 1] == "0.555556" and flags.count("--structured-fractions") == 1
    assert method_flags("cap-f@0.45", ["--epochs", "3"])[2:] == ["--structured-fractions", "0.1", "0.2", "0.3", "0.4",
                                                                 "0.45", "--structured-epochs", "0.6"]
    assert method_flags("cap-f", ["--epochs", "4", "--structured-fractions", "0.3", "0.6", "--seed", "1"]) == \
        ["--method", "cap-f", "--structured-epochs", "2"]
    assert method_flags("cap-soft", settings) == ["--method", "cap-soft", "--block-size", "0"]
    assert parse_method("cap-f@0.5") == ("cap-f", 0.5)
    # ablations: flags of one method's own after '+'
    assert method_flags("cap-m@0.7+no-fic+sup-weight=0", settings) == \
        ["--method", "cap-m", "--no-fic", "--sup-weight", "0", "--sparsity", "0.7"]
    assert parse_method("cap-m@0.7+no-fic") == ("cap-m", 0.7)
    for bad in ("cap-m++no-fic", "cap-m+sup-weight="):
        with pytest.raises(ValueError, match=r"empty '\+' part"):
            method_flags(bad, settings)
    for bad, says in (("cap-x", "unknown method"), ("cap-m@1.5", r"a fraction in \(0, 1\)"), ("cap-m@x", "fraction"),
                      ("finetune", "unknown method")):
        with pytest.raises(ValueError, match=says):
            parse_method(bad)


def test_train_step_compiled_variant(tmp_path):
    rc = bench.main(TINY + ["--variants", "capkit", "capkit-compiled", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "train_step.json").read_text())
    assert rc == 0 and data["failures"] == []
    assert {r["variant"] for r in data["rows"]} == {"capkit", "capkit-compiled"}
    assert data["summary"]["compiled_speedup_vs_eager"] > 0
    assert "torch.compile against eager" in (tmp_path / "train_step.md").read_text()
