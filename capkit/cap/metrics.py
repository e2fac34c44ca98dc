"""Evaluation metrics of the CAP tasks, in plain numpy (no scipy or sklearn needed).

Every metric returns a float in [0, 1] (correlations in [-1, 1]); SQuAD's EM/F1 are fractions
too, not percentages. :func:`compute_metrics` reports every metric of a task plus ``"main"``.
"""
from __future__ import annotations

import collections
import re
import string
from typing import Callable, Dict, Sequence, Tuple

import numpy as np

from capkit.cap.data import TASKS, get_task

__all__ = [
    "accuracy", "f1_score", "matthews_corrcoef", "pearson", "spearman", "normalize_answer",
    "squad_exact_match", "squad_f1", "task_metrics", "compute_metrics",
]

#: Metrics of the data sets that are not in ``TASKS``: BBC News and users' own files.
CLASSIFICATION_METRICS = ("accuracy", "macro_f1")


def _pair(predictions, references, name: str) -> Tuple[np.ndarray, np.ndarray]:
    predictions = np.asarray(predictions)
    references = np.asarray(references)
    if predictions.ndim != 1 or references.ndim != 1:
        raise ValueError(f"{name}: predictions and references must be 1-D, got shapes "
                         f"{predictions.shape} and {references.shape}")
    if len(predictions) != len(references):
        raise ValueError(f"{name}: {len(predictions)} predictions for {len(references)} "
                         f"references")
    if len(references) == 0:
        raise ValueError(f"{name}: no examples")
    return predictions, references


def accuracy(predictions, references) -> float:
    """Fraction of predictions equal to the reference."""
    predictions, references = _pair(predictions, references, "accuracy")
    return float(np.mean(predictions == references))


def _binary_f1(predictions: np.ndarray, references: np.ndarray, positive) -> float:
    true_pos = np.sum((predictions == positive) & (references == positive))
    predicted = np.sum(predictions == positive)
    actual = np.sum(references == positive)
    # F1 = 2TP / (predicted + actual); 0 when there is no positive at all (as sklearn).
    return float(2 * true_pos / (predicted + actual)) if predicted + actual else 0.0


def f1_score(predictions, references, *, average: str = "binary", pos_label=1) -> float:
    """F1 of class ``pos_label`` (``average="binary"``), or the unweighted mean of the F1 of
    every class present in predictions or references (``average="macro"``)."""
    predictions, references = _pair(predictions, references, "f1_score")
    if average == "binary":
        return _binary_f1(predictions, references, pos_label)
    if average == "macro":
        classes = np.union1d(predictions, references)
        return float(np.mean([_binary_f1(predictions, references, c) for c in classes]))
    raise ValueError(f"average must be 'binary' or 'macro', got {average!r}")


def matthews_corrcoef(predictions, references) -> float:
    """Matthews correlation coefficient (multi-class form; 0 when undefined)."""
    predictions, references = _pair(predictions, references, "matthews_corrcoef")
    classes, codes = np.unique(np.concatenate([references, predictions]), return_inverse=True)
    n = len(references)
    confusion = np.zeros((len(classes), len(classes)), dtype=np.float64)
    np.add.at(confusion, (codes[:n], codes[n:]), 1.0)
    true_counts = confusion.sum(axis=1)
    pred_counts = confusion.sum(axis=0)
    correct = np.trace(confusion)
    covariance = correct * n - true_counts @ pred_counts
    scale = (n * n - pred_counts @ pred_counts) * (n * n - true_counts @ true_counts)
    return float(covariance / np.sqrt(scale)) if scale > 0 else 0.0


def pearson(predictions, references) -> float:
    """Pearson correlation; 0 when either side is constant (undefined correlation)."""
    x, y = _pair(predictions, references, "pearson")
    x = x.astype(np.float64) - np.mean(x)
    y = y.astype(np.float64) - np.mean(y)
    scale = np.sqrt(np.dot(x, x) * np.dot(y, y))
    return float(np.dot(x, y) / scale) if scale > 0 else 0.0


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n, ties sharing the mean of their ranks."""
    order = np.argsort(values, kind="mergesort")
    sorted_values = values[order]
    # Start of each run of equal values, and its mean rank.
    starts = np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1]])
    ends = np.r_[starts[1:], len(values)]
    mean_rank = (starts + ends + 1) / 2.0
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = np.repeat(mean_rank, ends - starts)
    return ranks


def spearman(predictions, references) -> float:
    """Spearman rank correlation (Pearson of the average ranks); 0 when a side is constant."""
    x, y = _pair(predictions, references, "spearman")
    return pearson(_average_ranks(x.astype(np.float64)), _average_ranks(y.astype(np.float64)))


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """The official SQuAD normalisation: lower case, drop punctuation, drop the articles
    a/an/the, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def _token_f1(prediction: str, truth: str) -> float:
    pred_tokens = normalize_answer(prediction).split()
    true_tokens = normalize_answer(truth).split()
    same = sum((collections.Counter(pred_tokens) & collections.Counter(true_tokens)).values())
    if same == 0:
        return 0.0
    precision = same / len(pred_tokens)
    recall = same / len(true_tokens)
    return 2 * precision * recall / (precision + recall)


def _squad_pairs(predictions: Sequence[str], references: Sequence[Sequence[str]], name: str):
    if len(predictions) != len(references):
        raise ValueError(f"{name}: {len(predictions)} predictions for {len(references)} "
                         f"references")
    if not references:
        raise ValueError(f"{name}: no examples")
    for i, truths in enumerate(references):
        if isinstance(truths, str) or not truths:
            raise ValueError(f"{name}: references[{i}] must be a non-empty list of gold "
                             f"answers, got {truths!r}")
    return zip(predictions, references)


def squad_exact_match(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Share of predictions equal, after :func:`normalize_answer`, to one of their gold
    answers (``references[i]`` is the list of gold answers of example i)."""
    pairs = _squad_pairs(predictions, references, "squad_exact_match")
    return float(np.mean([max(normalize_answer(p) == normalize_answer(t) for t in truths)
                          for p, truths in pairs]))


def squad_f1(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Mean over examples of the best token-overlap F1 against any gold answer."""
    pairs = _squad_pairs(predictions, references, "squad_f1")
    return float(np.mean([max(_token_f1(p, t) for t in truths) for p, truths in pairs]))


_CLASSIFICATION: Dict[str, Callable[..., float]] = {
    "accuracy": accuracy,
    "f1": f1_score,
    "macro_f1": lambda p, r: f1_score(p, r, average="macro"),
    "matthews_correlation": matthews_corrcoef,
}
_REGRESSION: Dict[str, Callable[..., float]] = {"pearson": pearson, "spearman": spearman}
_QA: Dict[str, Callable[..., float]] = {"exact_match": squad_exact_match, "f1": squad_f1}


def task_metrics(task: str) -> Tuple[Tuple[str, ...], str]:
    """(metric names, main metric) of a task: a ``TASKS`` name, ``"bbc_news"`` or
    ``"text_classification"``."""
    if task in ("bbc_news", "text_classification"):
        return CLASSIFICATION_METRICS, "accuracy"
    spec = get_task(task)
    return spec.metrics, spec.main_metric


def compute_metrics(task: str, predictions, references) -> Dict[str, float]:
    """Every metric of ``task`` plus ``"main"`` (the task's main metric).

    Args:
        task: a ``TASKS`` name, ``"bbc_news"`` or ``"text_classification"`` (the ``task`` of
            a :class:`capkit.cap.data.TextDataset`).
        predictions: classification: class ids, or logits (n x classes, arg-maxed here);
            regression: floats (n, or n x 1); SQuAD: answer texts.
        references: the labels (class ids or floats); SQuAD: per example the list of gold
            answers. Unlabelled data (None or -1 labels, e.g. a GLUE test split) is an error.
    """
    names, main = task_metrics(task)
    is_qa = task in TASKS and TASKS[task].is_qa
    is_regression = task in TASKS and TASKS[task].is_regression
    if references is None or any(r is None for r in references):
        raise ValueError(f"{task}: references have no labels (unlabelled data, such as a test "
                         f"split, cannot be scored)")
    if is_qa:
        table = _QA
    else:
        references = np.asarray(references)
        if not is_regression and np.any(references == -1):
            raise ValueError(f"{task}: references contain -1 (the label of unlabelled test "
                             f"rows); metrics need labels")
        predictions = np.asarray(predictions)
        if is_regression:
            table = _REGRESSION
            predictions = predictions.astype(np.float64).reshape(len(predictions), -1)
            if predictions.shape[1] != 1:
                raise ValueError(f"{task}: regression predictions must be n or n x 1, got "
                                 f"shape {predictions.shape}")
            predictions = predictions[:, 0]
        else:
            table = _CLASSIFICATION
            if predictions.ndim == 2:
                predictions = predictions.argmax(axis=1)
    results = {name: table[name](predictions, references) for name in names}
    results["main"] = results[main]
    return results
