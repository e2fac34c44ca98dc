"""What capkit knows about its tasks, without torch: the GLUE / SQuAD registry, the errors of
data and labels, and the check of a model's label order.

:mod:`capkit.cap.data` re-exports everything here; the command line imports this module alone,
so a mistake in a task name or a teacher's labels is reported before torch loads.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, List, Mapping, Sequence, Tuple, Union

__all__ = ["TASKS", "TaskSpec", "get_task", "DataError", "LabelOrderError", "check_label_order",
           "model_label_names"]


class DataError(ValueError):
    """Data that cannot be read as asked: a missing column, an unknown label, a malformed file,
    an unreachable hub."""


class LabelOrderError(ValueError):
    """A model's label names disagree with the data set's label order."""


# --------------------------------------------------------------------------------------------
# Task registry
# --------------------------------------------------------------------------------------------

_GLUE_FILES = {
    "train": "train.tsv", "validation": "dev.tsv", "test": "test.tsv",
}
_MNLI_FILES = {
    "train": "train.tsv",
    "validation_matched": "dev_matched.tsv", "validation_mismatched": "dev_mismatched.tsv",
    "test_matched": "test_matched.tsv", "test_mismatched": "test_mismatched.tsv",
}


@dataclass(frozen=True)
class TaskSpec:
    """What capkit knows about one task.

    Attributes:
        name: the task's name, also its ``datasets`` configuration name for GLUE.
        text_columns: the text columns in the Hugging Face layout (one, or two for pairs).
        label_names: label names in the canonical (Hugging Face) order; empty for regression
            and QA.
        metrics: names of the metrics :func:`capkit.cap.metrics.compute_metrics` reports.
        main_metric: the one metric that ranks models (the BERT paper's choice per task).
        dev_splits: evaluation splits; the first is the main one (MNLI: matched, mismatched).
        files: split name -> file name in the local folder (GLUE TSV, SQuAD JSON).
        glue_dir: the task's sub-folder name in the official GLUE download (``SST-2``).
        tsv_text_columns: text columns of the original GLUE TSV: header names, or positions for
            a file without header (CoLA).
        tsv_label_column: label column of the original GLUE TSV (name or position).
        tsv_header: whether the original GLUE train/dev TSVs start with a header row.
        is_regression: one real-valued output (STS-B).
        is_qa: extractive question answering (SQuAD).
        hub_path: positional arguments of ``datasets.load_dataset``.
    """

    name: str
    text_columns: Tuple[str, ...]
    label_names: Tuple[str, ...]
    metrics: Tuple[str, ...]
    main_metric: str
    dev_splits: Tuple[str, ...]
    files: Mapping[str, str]
    glue_dir: str
    tsv_text_columns: Tuple[Union[str, int], ...] = ()
    tsv_label_column: Union[str, int, None] = "label"
    tsv_header: bool = True
    is_regression: bool = False
    is_qa: bool = False
    hub_path: Tuple[str, ...] = ()

    @property
    def num_labels(self) -> int:
        """Outputs of a sequence-classification head: 1 for regression, 0 for QA."""
        return 1 if self.is_regression else len(self.label_names)

    @property
    def dev_split(self) -> str:
        """The main evaluation split."""
        return self.dev_splits[0]

    @property
    def is_pair(self) -> bool:
        """Whether examples are sentence pairs."""
        return len(self.text_columns) == 2

    @property
    def splits(self) -> Tuple[str, ...]:
        """Every split the task has."""
        return tuple(self.files)


def _glue(name, text_columns, label_names, metrics, main, glue_dir, tsv_text, tsv_label,
          **kw) -> TaskSpec:
    files = _MNLI_FILES if name == "mnli" else _GLUE_FILES
    dev = tuple(s for s in files if s.startswith("validation"))
    return TaskSpec(name=name, text_columns=text_columns, label_names=label_names,
                    metrics=metrics, main_metric=main, dev_splits=dev, files=dict(files),
                    glue_dir=glue_dir, tsv_text_columns=tsv_text, tsv_label_column=tsv_label,
                    hub_path=("glue", name), **kw)


_ACC = ("accuracy",)
_ACC_F1 = ("accuracy", "f1")
_NLI2 = ("entailment", "not_entailment")

#: The tasks :func:`load_task` knows, by name.
TASKS: Dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        # CoLA's train/dev TSVs have no header: source, label, original label, sentence.
        _glue("cola", ("sentence",), ("unacceptable", "acceptable"), ("matthews_correlation",),
              "matthews_correlation", "CoLA", (3,), 1, tsv_header=False),
        _glue("sst2", ("sentence",), ("negative", "positive"), _ACC, "accuracy", "SST-2",
              ("sentence",), "label"),
        _glue("mrpc", ("sentence1", "sentence2"), ("not_equivalent", "equivalent"), _ACC_F1, "f1",
              "MRPC", ("#1 String", "#2 String"), "Quality"),
        _glue("stsb", ("sentence1", "sentence2"), (), ("pearson", "spearman"), "spearman",
              "STS-B", ("sentence1", "sentence2"), "score", is_regression=True),
        _glue("qqp", ("question1", "question2"), ("not_duplicate", "duplicate"), _ACC_F1, "f1",
              "QQP", ("question1", "question2"), "is_duplicate"),
        # MNLI's TSVs carry parses and the annotators' labels; gold_label is the label.
        _glue("mnli", ("premise", "hypothesis"), ("entailment", "neutral", "contradiction"), _ACC,
              "accuracy", "MNLI", ("sentence1", "sentence2"), "gold_label"),
        _glue("qnli", ("question", "sentence"), _NLI2, _ACC, "accuracy", "QNLI",
              ("question", "sentence"), "label"),
        _glue("rte", ("sentence1", "sentence2"), _NLI2, _ACC, "accuracy", "RTE",
              ("sentence1", "sentence2"), "label"),
        TaskSpec(name="squad", text_columns=("question", "context"), label_names=(),
                 metrics=("exact_match", "f1"), main_metric="f1", dev_splits=("validation",),
                 files={"train": "train-v1.1.json", "validation": "dev-v1.1.json"},
                 glue_dir="SQuAD", tsv_label_column=None, is_qa=True, hub_path=("squad",)),
    )
}


def get_task(task: str) -> TaskSpec:
    """The :class:`TaskSpec` of ``task`` (case-insensitive; ``sst-2``/``sts-b`` accepted)."""
    if not isinstance(task, str):
        raise TypeError(f"task must be a task name (str), got {type(task).__name__}")
    key = task.lower().replace("-", "")
    if key not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    return TASKS[key]


# --------------------------------------------------------------------------------------------
# Label order
# --------------------------------------------------------------------------------------------

def model_label_names(model_config) -> List[str]:
    """A model config's label names in id order (from id2label, else label2id); [] when it has none."""
    id2label = getattr(model_config, "id2label", None) or {}
    names = {int(i): str(n) for i, n in id2label.items()}
    if not names:
        label2id = getattr(model_config, "label2id", None) or {}
        names = {int(i): str(n) for n, i in label2id.items()}
    return [names[i] for i in sorted(names)]


def _normal_label(name: str) -> str:
    return re.sub(r"[\s\-]+", "_", name.strip().lower())


def check_label_order(dataset_label_names: Sequence[str], model_config) -> None:
    """Raise :class:`LabelOrderError` when a (teacher) model's label names disagree with the
    data set's label order.

    Names compare case-insensitively, with spaces and dashes taken as underscores. A model
    whose names are all generic (``LABEL_0``, ``LABEL_1``...) says nothing about its order and
    passes; its number of labels must still match. Regression (no label names) checks nothing.
    """
    dataset_label_names = [str(n) for n in dataset_label_names]
    if not dataset_label_names:
        return
    model_names = model_label_names(model_config)
    num_labels = len(model_names) or getattr(model_config, "num_labels", None)
    if num_labels != len(dataset_label_names):
        raise LabelOrderError(f"the model has {num_labels} labels, the data set "
                              f"{len(dataset_label_names)} ({dataset_label_names})")
    if all(re.fullmatch(r"LABEL_\d+", n) for n in model_names):
        return
    ours = [_normal_label(n) for n in dataset_label_names]
    theirs = [_normal_label(n) for n in model_names]
    if ours == theirs:
        return
    if sorted(ours) == sorted(theirs):
        model_order = [dataset_label_names[ours.index(n)] for n in theirs]
        raise LabelOrderError(
            f"label order differs: the model's id2label is {model_names}, the data set's "
            f"labels are {dataset_label_names}; renumber the data to the model's order with "
            f"dataset.with_label_order({model_order})")
    raise LabelOrderError(f"label names differ: the model's id2label is {model_names}, the "
                          f"data set's labels are {dataset_label_names}")
