"""Scoring saved models on further labelled files: ``capkit-eval``, ``capkit-prune --eval-file``,
and ``benchmarks.accuracy --teacher / --eval-file``."""
import json

import pytest
import torch
import transformers

from capkit.cap.data import DataError, load_labelled_file

from _models import tiny_text_task


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_text_task(tmp_path_factory.mktemp("tiny_eval"))


def _save_teacher(tiny, path):
    torch.manual_seed(5)
    teacher = transformers.BertForSequenceClassification.from_pretrained(
        tiny / "model", num_labels=3, id2label={0: "fruit", 1: "vehicle", 2: "weather"},
        label2id={"fruit": 0, "vehicle": 1, "weather": 2})
    with torch.no_grad():
        teacher.classifier.weight.mul_(300.0)
    teacher.save_pretrained(path)
    transformers.AutoTokenizer.from_pretrained(tiny / "model").save_pretrained(path)
    return path


def _settings(tiny):
    return ["--model", str(tiny / "model"), "--train-file", str(tiny / "train.csv"), "--dev-file",
            str(tiny / "dev.csv"), "--epochs", "2", "--batch-size", "8", "--max-length", "16",
            "--extra-negatives", "16", "--learning-rate", "1e-3", "--save-every", "0", "--initial-warmup", "0.5",
            "--final-warmup", "0.5", "--sparsity", "0.75", "--device", "cpu", "--no-progress", "--no-tensorboard"]


def test_labelled_files_of_glue_tasks(tmp_path):
    tsv = tmp_path / "dev.tsv"
    tsv.write_text("sentence\tlabel\na fine film\t1\na dull one\t0\n")
    ds = load_labelled_file("sst2", tsv)
    assert [(e.text_a, e.label) for e in ds.examples] == [("a fine film", 1), ("a dull one", 0)]
    assert ds.task == "sst2"
    jsonl = tmp_path / "pairs.jsonl"
    jsonl.write_text('{"premise": "a", "hypothesis": "b", "label": "neutral"}\n')
    assert load_labelled_file("mnli", jsonl).examples[0].label == 1
    with pytest.raises(DataError, match="no column 'hypothesis'"):
        jsonl.write_text('{"premise": "a", "label": "neutral"}\n')
        load_labelled_file("mnli", jsonl)
    unlabelled = tmp_path / "test.tsv"
    unlabelled.write_text("sentence\tlabel\nsome text\t\n")
    with pytest.raises(DataError, match="without a label"):
        load_labelled_file("sst2", unlabelled)


def test_prune_eval_file_is_reported_and_capkit_eval_agrees(tiny, tmp_path, capsys):
    from capkit import evaluate
    from capkit.prune import config_from_args
    from capkit.cap.trainer import run

    teacher = _save_teacher(tiny, tmp_path / "teacher")
    out = tmp_path / "run"
    # the dev file doubles as the extra file: its scores must equal dev's
    cfg = config_from_args([*_settings(tiny), "--task", "text", "--teacher", str(teacher), "--output-dir", str(out),
                            "--eval-file", str(tiny / "dev.csv")])
    report = run(cfg)
    ef = report["eval_file"]
    assert ef["examples"] == report["dev_examples"] and ef["model"] == "sparse"
    assert ef["pruned"]["accuracy"] == pytest.approx(report["pruned"]["metrics"]["accuracy"])
    assert ef["dense"]["accuracy"] == pytest.approx(report["dense"]["metrics"]["accuracy"])
    assert "eval file" in capsys.readouterr().out
    assert f"pruned (sparse export) on {tiny / 'dev.csv'}" in (out / "report.md").read_text()
    # capkit-eval scores the saved export the same way
    assert evaluate.main([str(out / "model-sparse"), "--task", "text", "--file", str(tiny / "dev.csv"), "--json",
                          "--max-length", "16"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["metrics"]["accuracy"] == pytest.approx(ef["pruned"]["accuracy"])
    assert printed["examples"] == ef["examples"]
    # a bad file stops a run before training
    from capkit.cap.config import ConfigError

    with pytest.raises(ConfigError, match="eval_file must be an existing labelled file"):
        config_from_args([*_settings(tiny), "--task", "text", "--eval-file", str(tmp_path / "none.csv")]).resolved()


def test_capkit_eval_bad_arguments(tiny, tmp_path, capsys):
    from capkit import evaluate

    teacher = _save_teacher(tiny, tmp_path / "teacher")
    bad_columns = tmp_path / "bad.csv"
    bad_columns.write_text("review,label\nnice apple,fruit\n")
    unknown_label = tmp_path / "unknown.csv"
    unknown_label.write_text("text,label\nnice apple,vegetable\n")
    cases = [
        ([str(teacher), "--task", "text", "--file", str(tmp_path / "none.csv")], "--file: no such file"),
        ([str(tmp_path / "nowhere"), "--task", "text", "--file", str(bad_columns)], "MODEL_DIR: no such folder"),
        ([str(tmp_path), "--task", "text", "--file", str(bad_columns)], "MODEL_DIR: "),
        ([str(teacher), "--task", "sst3", "--file", str(bad_columns)], "--task: unknown task 'sst3'"),
        ([str(teacher), "--task", "text", "--file", str(bad_columns)], "--file: "),
        ([str(teacher), "--task", "text", "--file", str(unknown_label)], "--file: "),
        ([str(teacher), "--task", "sst2", "--file", str(bad_columns)], "--file: "),
        ([str(teacher), "--task", "squad", "--file", str(bad_columns)], "--task: squad does not fit"),
        ([str(teacher), "--task", "text", "--file", str(bad_columns), "--batch-size", "0"], "--batch-size: must be"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as exc:
            evaluate.main(argv)
        err = capsys.readouterr().err
        assert exc.value.code == 2, argv
        assert f"capkit-eval: error: {message}" in err, (argv, err)
    with pytest.raises(SystemExit) as exc:
        evaluate.main([str(teacher), "--file", str(bad_columns)])  # --task is required
    assert exc.value.code == 2


def test_accuracy_benchmark_with_one_teacher_and_an_eval_file(tiny, tmp_path):
    from benchmarks import accuracy

    teacher = _save_teacher(tiny, tmp_path / "given-teacher")
    res = tmp_path / "res"
    base = ["--tasks", "text", "--methods", "movement", "--seeds", "1", "2", "--teacher", str(teacher),
            "--out", str(res)]
    settings = [s for s in _settings(tiny) if s not in ("--no-progress", "--no-tensorboard")]
    assert accuracy.main([*base, "--", *settings]) == 0
    first = json.loads((res / "accuracy.json").read_text())
    runs = res / "accuracy_runs" / "text" / "teacher-given-teacher"
    assert sorted(p.name for p in runs.iterdir()) == ["seed-1", "seed-2"]
    assert not list(runs.glob("seed-*/teacher"))  # nothing fine-tuned per seed
    assert first["teacher"]["path"] == str(teacher.resolve())
    assert first["teacher"]["dev"]["text"]["main"] == first["rows"][0]["dense"]
    assert all(r["dense"] == first["rows"][0]["dense"] for r in first["rows"])  # one teacher, one dev score
    assert "eval_pruned" not in first["rows"][0]
    for seed in ("seed-1", "seed-2"):
        made_with = json.loads((runs / seed / "movement" / "bench_args.json").read_text())
        assert made_with[-2:] == ["--teacher", str(teacher.resolve())]
    # the finished runs are scored on an extra file from their exports, nothing retrained
    extra = tmp_path / "extra.csv"
    extra.write_text((tiny / "train.csv").read_text())
    assert accuracy.main([*base, "--eval-file", str(extra), "--", *settings]) == 0
    second = json.loads((res / "accuracy.json").read_text())
    assert [r["pruned"] for r in second["rows"]] == [r["pruned"] for r in first["rows"]]
    assert all(r["run_s"] is None and 0 <= r["eval_pruned"] <= 1 and 0 <= r["eval_dense"] <= 1
               for r in second["rows"])
    assert second["eval_file"] == str(extra) and second["groups"][0]["eval_pruned_mean"] is not None
    assert (runs / "seed-1" / "movement" / "eval_file.json").is_file()
    md = (res / "accuracy.md").read_text()
    assert "One teacher for every seed" in md and "eval pruned" in md
    # the same extra file scored by capkit-eval on the export gives the row's number
    from capkit.cap.evaluation import load_saved_model, score_file

    cached = json.loads((runs / "seed-1" / "movement" / "eval_file.json").read_text())
    model, tok = load_saved_model(runs / "seed-1" / "movement" / f"model-{cached['model']}")
    again = score_file(model, tok, "text", extra, max_length=16)
    assert again["metrics"]["main"] == pytest.approx(second["rows"][0]["eval_pruned"])
    with pytest.raises(SystemExit):
        accuracy.main([*base[:-2], "--teacher", str(tmp_path / "none"), "--out", str(res)])
    with pytest.raises(SystemExit):
        accuracy.main([*base, "--", *settings, "--eval-file", str(extra)])


def test_evaluation_leaves_the_training_rng_alone(tiny):
    """Scoring between epochs must not move the global RNG (the dropout masks of the training)."""
    from capkit.cap.data import encode, load_text_file
    from capkit.cap.evaluation import evaluate_model

    tok = transformers.AutoTokenizer.from_pretrained(tiny / "model")
    model = transformers.BertForSequenceClassification.from_pretrained(tiny / "model", num_labels=3).train()
    ds = load_text_file(tiny / "dev.csv", "text", "label")
    state = torch.get_rng_state()
    metrics = evaluate_model(model, ds, encode(ds, tok, 16), batch_size=7)
    assert torch.equal(state, torch.get_rng_state())
    assert model.training and 0 <= metrics["main"] <= 1
