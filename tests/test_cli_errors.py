"""A user's mistakes on the command line or in a config file: one line
``capkit-prune: error: <argument>: <what was wrong>`` and exit status 2, never a traceback.

Each case runs the real command (``python -m capkit.prune``) in a fresh process. The model and
teacher folders hold a config.json alone: every mistake is found before any weights load (most
before torch is imported), so a case costs a fraction of a second.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _model(folder: Path, **config) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    values = {"model_type": "bert", "max_position_embeddings": 512, "hidden_size": 32}
    values.update(config)
    (folder / "config.json").write_text(json.dumps(values))
    return folder


def _csv(path: Path, header: str = "text,label", rows=("apple pear,fruit", "car bus,vehicle")) -> Path:
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


@pytest.fixture
def files(tmp_path):
    """A model folder (config only), a teacher with other labels, and train/dev CSV files."""
    return {
        "model": _model(tmp_path / "model"),
        "teacher": _model(tmp_path / "teacher", id2label={"0": "negative", "1": "positive"}),
        "train": _csv(tmp_path / "train.csv"),
        "dev": _csv(tmp_path / "dev.csv"),
        "root": tmp_path,
    }


def _text_args(files, **over):
    args = {"--model": files["model"], "--task": "text", "--train-file": files["train"],
            "--dev-file": files["dev"], "--max-length": "32", "--output-dir": files["root"] / "run"}
    args.update(over)
    out = []
    for flag, value in args.items():
        if value is not None:
            out += [flag, str(value)]
    return out


def _fails(argv, argument, *words, cwd=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "capkit.prune", "--no-progress", *map(str, argv)],
                          capture_output=True, text=True, cwd=cwd or ROOT, env=env, timeout=120)
    err = proc.stderr.strip()
    assert proc.returncode == 2, err
    assert "Traceback" not in err, err
    last = err.splitlines()[-1]
    assert last.startswith(f"capkit-prune: error: {argument}"), err
    assert len([line for line in err.splitlines() if line.startswith("capkit-prune: error")]) == 1, err
    for word in words:
        assert word in last, err
    return last


def test_unknown_task_lists_every_task(files):
    last = _fails(["--task", "no-such-task"], "--task:", "'no-such-task'")
    for task in ("sst2", "mnli", "squad", "bbc_news", "text"):
        assert task in last


def test_unknown_method_in_a_config_file(files):
    (files["root"] / "run.yaml").write_text("method: cap-x\ntask: rte\n")
    _fails(["--config", files["root"] / "run.yaml"], "--method (method in", "run.yaml", "cap-m", "'cap-x'")


def test_unknown_setting_and_missing_config_file(files):
    (files["root"] / "run.json").write_text(json.dumps({"task": "rte", "sparsty": 0.9}))
    _fails(["--config", files["root"] / "run.json"], "--config:", "sparsty")
    _fails(["--config", files["root"] / "nope.yaml"], "--config:", "no such file")


def test_missing_model_folder_is_not_a_hub_name(files):
    _fails(_text_args(files, **{"--model": "/nonexistent"}), "--model:", "no such folder /nonexistent")


def test_unknown_hub_model(files):
    # a name that could be a hub id, with the hub out of reach (HF_HUB_OFFLINE): found when the tokenizer loads
    _fails(_text_args(files, **{"--model": "no-such-model-xyz"}), "--model:", "not a local folder",
           "Hugging Face hub")


def test_a_setting_from_a_config_file_is_named_with_the_file(files):
    (files["root"] / "run.yaml").write_text("task: sst2\ndata-dir: /nonexistent\n")
    _fails(["--config", files["root"] / "run.yaml", "--model", files["model"]], "--data-dir (data_dir in",
           "run.yaml): no such folder /nonexistent")


def test_model_folder_without_config(files):
    (files["root"] / "empty").mkdir()
    _fails(_text_args(files, **{"--model": files["root"] / "empty"}), "--model:", "no config.json")
    (files["root"] / "empty" / "config.json").write_text("{not json")
    _fails(_text_args(files, **{"--model": files["root"] / "empty"}), "--model:", "cannot read", "config.json")


def test_missing_data_folder(files):
    _fails(["--model", files["model"], "--task", "sst2", "--data-dir", "/nonexistent"], "--data-dir:",
           "no such folder /nonexistent")


def test_data_folder_without_the_task_files(files):
    (files["root"] / "glue").mkdir()
    (files["root"] / "glue" / "train.tsv").write_text("sentence\tlabel\nnice\t1\n")
    _fails(["--model", files["model"], "--task", "sst2", "--data-dir", files["root"] / "glue",
            "--max-length", "32"], "--data-dir:", "dev.tsv")


def test_text_file_with_the_wrong_suffix(files):
    (files["root"] / "notes.txt").write_text("text,label\na,b\n")
    _fails(_text_args(files, **{"--train-file": files["root"] / "notes.txt"}), "--train-file:", "notes.txt",
           ".csv, .tsv or .jsonl")


def test_missing_text_file(files):
    _fails(_text_args(files, **{"--train-file": "notes.csv"}), "--train-file:", "no such file notes.csv",
           cwd=files["root"])


def test_missing_dev_file(files):
    _fails(_text_args(files, **{"--dev-file": None}), "--dev-file:", "held-out")


def test_text_file_without_the_column(files):
    _fails(_text_args(files, **{"--text-column": "review"}), "--text-column:", "'review'", "['text', 'label']")
    jsonl = files["root"] / "train.jsonl"
    jsonl.write_text(json.dumps({"text": "a", "stars": 1}) + "\n")
    _fails(_text_args(files, **{"--train-file": jsonl}), "--label-column:", "'label'", "--train-file")


def test_unreadable_text_file(files):
    bad = files["root"] / "latin1.csv"
    bad.write_bytes("text,label\ncaf\xe9,fruit\n".encode("latin-1"))
    _fails(_text_args(files, **{"--dev-file": bad}), "--dev-file:", "not UTF-8")


def test_empty_data_set(files):
    _fails(_text_args(files, **{"--train-file": _csv(files["root"] / "head.csv", rows=())}), "--train-file:",
           "no examples")


def test_missing_teacher_folder(files):
    _fails(_text_args(files, **{"--teacher": files["root"] / "no-teacher"}), "--teacher:", "no such folder")


def test_teacher_without_labels(files):
    _fails(_text_args(files, **{"--teacher": files["model"]}), "--teacher:", "no labels")


def test_teacher_whose_labels_differ(files):
    # the data's labels are fruit and vehicle: found after reading the data, before any model loads
    _fails(_text_args(files, **{"--teacher": files["teacher"]}), "--teacher:", "label names differ", "fruit")


def test_a_model_with_another_classifier(files):
    # a fine-tuned 3-label classifier as --model for 2-label data: its head cannot be loaded
    other = _model(files["root"] / "clf3", architectures=["BertForSequenceClassification"],
                   id2label={"0": "a", "1": "b", "2": "c"})
    _fails(_text_args(files, **{"--model": other}), "--model:", "3 output(s)", "the data has 2")


def test_sequence_length_beyond_the_model(files):
    short = _model(files["root"] / "short", max_position_embeddings=64)
    _fails(_text_args(files, **{"--model": short, "--max-length": "100"}), "--max-length:", "100 tokens",
           "64 positions")
    roberta = _model(files["root"] / "roberta", model_type="roberta", max_position_embeddings=514, pad_token_id=1)
    _fails(_text_args(files, **{"--model": roberta, "--max-length": "513"}), "--max-length:", "512 positions")


def test_resume_without_a_checkpoint(files):
    (files["root"] / "run").mkdir()
    _fails(_text_args(files) + ["--resume"], "--resume:", "no checkpoint.pt")


def test_a_checkpoint_without_resume(files):
    (files["root"] / "run").mkdir()
    (files["root"] / "run" / "checkpoint.pt").write_bytes(b"x")
    _fails(_text_args(files), "--output-dir:", "--resume")


def test_the_first_checks_do_not_import_torch():
    code = ("import sys; from capkit.prune import main; import capkit.cap.checks; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=60)


def test_internal_errors_keep_their_traceback(files, monkeypatch):
    from capkit import prune
    from capkit.cap import trainer

    def broken(cfg):
        raise RuntimeError("a bug, not a usage error")

    monkeypatch.setattr(trainer, "run", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        prune.main(_text_args(files))


def test_task_names_are_those_the_data_module_knows():
    from capkit.cap.config import TASK_NAMES, CAPConfig
    from capkit.cap.data import TASKS

    assert set(TASK_NAMES) == set(TASKS) | {"bbc_news", "text"}
    assert CAPConfig(task="SST-2").resolved().task == "sst2"
    assert CAPConfig(task="bbc-news").resolved().task == "bbc_news"
