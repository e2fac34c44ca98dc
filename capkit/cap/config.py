"""Every setting of a CAP run, with the published defaults (``cap-algorithm.md`` §5–7).

Settings left at ``None`` take the default of the method and task (unstructured vs structured,
GLUE vs SQuAD) when :meth:`CAPConfig.resolved` runs; the resolved values are written to the run's
``config.json`` so a run can be repeated exactly.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from capkit.cap.tasks import TASKS

__all__ = ["LEGACY_SETTINGS", "METHODS", "TASK_NAMES", "CAPConfig", "ConfigError", "canonical_task",
           "load_config_file", "takes_blocks"]

#: Every task capkit-prune runs: the GLUE tasks and SQuAD, the embedded BBC News, a user's own file.
TASK_NAMES = (*TASKS, "bbc_news", "text")

# method -> (pruning kind, contrastive modules on by default)
METHODS = {
    "cap-m": ("movement", True),
    "cap-soft": ("soft-movement", True),
    "cap-f": ("structured", True),
    "magnitude": ("magnitude", False),
    "movement": ("movement", False),
    "soft-movement": ("soft-movement", False),
    "finetune": ("none", False),          # dense fine-tuning (the teacher)
}

BLOCK_KINDS = ("movement", "magnitude")  # the pruning kinds that can keep whole blocks (block_size)


def takes_blocks(method: str) -> bool:
    """Whether ``method`` can prune in blocks (``block_size``): the top-k movement and magnitude methods."""
    return METHODS[method][0] in BLOCK_KINDS


# Settings added after runs had been saved, with the behaviour those runs had: a run's saved
# config.json / checkpoint without them resumes as it started.
LEGACY_SETTINGS: Dict[str, Any] = {"teacher_logits": "live", "freeze_embeddings": False}


class ConfigError(ValueError):
    """A setting has a value that cannot work; the message names it.

    ``setting`` is the name of the setting to blame (``data_dir``) when there is one, and
    ``problem`` what is wrong with it; the command line prints the two as ``--data-dir: <problem>``.
    """

    def __init__(self, message: str, *, setting: Optional[str] = None, problem: Optional[str] = None):
        super().__init__(message)
        self.setting = setting
        self.problem = message if problem is None else problem

    @classmethod
    def of(cls, setting: str, problem: str) -> "ConfigError":
        """The error of one setting: ``"<setting>: <problem>"``."""
        return cls(f"{setting}: {problem}", setting=setting, problem=problem)


def canonical_task(task: str) -> str:
    """The name capkit uses for ``task``: case, dashes and underscores aside (``SST-2`` -> ``sst2``,
    ``bbc-news`` -> ``bbc_news``); a name it does not know comes back unchanged."""
    def key(name: str) -> str:
        return name.lower().replace("-", "").replace("_", "")

    return next((name for name in TASK_NAMES if key(name) == key(task)), task)


@dataclass
class CAPConfig:
    # what to prune, on what
    model: str = "minilm"                 # path, hub name, or "minilm" (the embedded MiniLM)
    task: str = "bbc_news"                # GLUE task, "squad", "bbc_news", or "text" (own file)
    data_dir: Optional[str] = None        # local GLUE TSV / SQuAD JSON folder (else the hub)
    train_file: Optional[str] = None      # task "text": CSV / JSONL file
    dev_file: Optional[str] = None
    text_column: str = "text"
    text_pair_column: Optional[str] = None
    label_column: str = "label"
    method: str = "cap-m"
    output_dir: str = "capkit-output"
    teacher: Optional[str] = None         # fine-tuned teacher; None: fine-tune one when needed
    teacher_epochs: int = 3
    # optimisation
    epochs: Optional[float] = None
    batch_size: Optional[int] = None
    eval_batch_size: int = 64
    max_length: Optional[int] = None
    doc_stride: int = 128                 # QA: context tokens shared by consecutive windows
    learning_rate: Optional[float] = None
    score_learning_rate: float = 1e-2
    weight_decay: Optional[float] = None
    warmup_ratio: float = 0.1
    grad_clip: float = 1.0
    grad_accum: int = 1
    # unstructured pruning
    sparsity: float = 0.9                 # final fraction of encoder-linear weights pruned
    block_size: Optional[int] = None      # prune whole blocks (movement methods)
    initial_warmup: Optional[float] = None
    final_warmup: Optional[float] = None
    soft_threshold: float = 0.1           # soft movement: final tau
    reg_lambda: float = 190.0             # soft movement: final L1 weight
    global_topk: bool = False
    freeze_embeddings: Optional[bool] = None  # default: on for the unstructured methods, off for cap-f / finetune
    # structured pruning (cap-f)
    structured_fractions: List[float] = field(default_factory=lambda: [round(0.1 * i, 1) for i in range(1, 10)])
    structured_epochs: Optional[float] = None
    # losses
    ce_weight: float = 0.1
    kd_weight: float = 0.9
    kd_temperature: Optional[float] = None
    contrastive_temperature: Optional[float] = None
    extra_negatives: int = 4096
    unsup_weight: Optional[float] = None
    sup_weight: Optional[float] = None
    representation: str = "cls"
    normalization: str = "cap"
    prc: Optional[bool] = None
    snc: Optional[bool] = None
    fic: Optional[bool] = None
    kd: bool = True
    teacher_logits: str = "cache"         # KD: "cache" (one teacher pass before training) or "live" (every step)
    # run
    seed: int = 42
    device: str = "auto"
    bf16: Optional[bool] = None           # autocast in bf16 (default: on for CUDA)
    save_every: int = 500                 # optimiser steps between checkpoints (0: only at epoch ends)
    resume: bool = False
    max_train_examples: Optional[int] = None
    max_eval_examples: Optional[int] = None
    eval_file: Optional[str] = None       # a further labelled file: the exported model and the teacher are scored on it
    export_formats: Optional[List[str]] = None
    tensorboard: bool = True
    progress: bool = True
    num_workers: int = 0
    compile: bool = False                 # torch.compile the student's training forward

    # ------------------------------------------------------------------------------------------
    @property
    def pruning_kind(self) -> str:
        return METHODS[self.method][0]

    @property
    def structured(self) -> bool:
        return self.pruning_kind == "structured"

    @property
    def is_qa(self) -> bool:
        return self.task == "squad"

    def resolved(self) -> "CAPConfig":
        """A copy with every ``None`` replaced by the method's and task's default, validated."""
        c = dataclasses.replace(self)
        if c.method not in METHODS:
            raise ConfigError(f"method must be one of {', '.join(METHODS)}, got {c.method!r}", setting="method",
                              problem=f"must be one of {', '.join(METHODS)}, got {c.method!r}")
        if isinstance(c.task, str):
            c.task = canonical_task(c.task)
        contrastive = METHODS[c.method][1]
        qa, st = c.is_qa, c.structured
        defaults = {
            "epochs": 2.0 if st else 10.0,
            "batch_size": 16 if (st or qa) else 32,
            "max_length": 384 if qa else 128,
            # structured GLUE retrains at 2e-5; structured SQuAD and every unstructured script use 3e-5
            "learning_rate": 2e-5 if (st and not qa) else 3e-5,
            "weight_decay": 0.01 if st else 0.0,
            "initial_warmup": 1.0 if qa else 2.0,
            "final_warmup": 2.0 if qa else 3.0,
            "structured_epochs": 2.0,
            "kd_temperature": 1.0 if st else 2.0,
            "contrastive_temperature": 0.3 if (st and qa) else 0.1,
            "unsup_weight": 0.3 if st else (0.5 if qa else 0.1),
            "sup_weight": 0.0 if qa else (3.0 if st else 10.0),
            "prc": contrastive, "snc": contrastive, "fic": contrastive,
            # movement pruning's code (which CAP's unstructured code forks) keeps the embeddings at their
            # pre-trained values; structured CAP and plain fine-tuning train them
            "freeze_embeddings": not st and c.pruning_kind != "none",
            "bf16": False,  # the trainer turns it on for CUDA devices when left at None
        }
        for name, value in defaults.items():
            if getattr(c, name) is None and name != "bf16":
                setattr(c, name, value)
        if c.export_formats is None:
            c.export_formats = ["dense", "compact"] if st else ["dense", "sparse"]
        c.validate()
        return c

    def validate(self) -> None:
        def need(cond: bool, name: str, expected: str):
            if not cond:
                problem = f"must be {expected}, got {getattr(self, name)!r}"
                raise ConfigError(f"{name} {problem}", setting=name, problem=problem)

        if not (isinstance(self.task, str) and canonical_task(self.task) in TASK_NAMES):
            raise ConfigError.of("task", f"unknown task {self.task!r}; expected one of {', '.join(TASK_NAMES)}")

        need(self.method in METHODS, "method", f"one of {', '.join(METHODS)}")
        need(0.0 <= self.sparsity < 1.0, "sparsity", "in [0, 1)")
        need(self.epochs is None or self.epochs > 0, "epochs", "> 0")
        need(self.batch_size is None or self.batch_size >= 1, "batch_size", ">= 1")
        need(self.eval_batch_size >= 1, "eval_batch_size", ">= 1")
        need(self.grad_accum >= 1, "grad_accum", ">= 1")
        need(self.max_length is None or self.max_length >= 8, "max_length", ">= 8")
        need(self.doc_stride >= 0, "doc_stride", ">= 0")
        need(self.learning_rate is None or self.learning_rate > 0, "learning_rate", "> 0")
        need(self.score_learning_rate > 0, "score_learning_rate", "> 0")
        need(0.0 <= self.warmup_ratio < 1.0, "warmup_ratio", "in [0, 1)")
        need(self.extra_negatives >= 0, "extra_negatives", ">= 0")
        need(self.contrastive_temperature is None or self.contrastive_temperature > 0,
             "contrastive_temperature", "> 0")
        need(self.kd_temperature is None or self.kd_temperature > 0, "kd_temperature", "> 0")
        need(self.representation in ("cls", "mean"), "representation", "'cls' or 'mean'")
        need(self.normalization in ("cap", "mean"), "normalization", "'cap' or 'mean'")
        need(self.teacher_logits in ("cache", "live"), "teacher_logits", "'cache' or 'live'")
        need(0.0 <= self.soft_threshold < 1.0, "soft_threshold", "in [0, 1)")
        need(self.block_size in (None, 16, 32, 64, 128), "block_size", "None or one of 16, 32, 64, 128")
        need(self.block_size is None or takes_blocks(self.method), "block_size",
             "None (--block-size 0) for soft-movement and structured methods")
        need(self.save_every >= 0, "save_every", ">= 0")
        need(self.teacher_epochs >= 0, "teacher_epochs", ">= 0")
        need(all(0.0 < f < 1.0 for f in self.structured_fractions) and
             list(self.structured_fractions) == sorted(set(self.structured_fractions)),
             "structured_fractions", "increasing fractions in (0, 1)")
        need(self.task != "text" or self.train_file is not None, "train_file", "a CSV/TSV/JSONL file for task 'text'")
        need(self.max_train_examples is None or self.max_train_examples >= 1, "max_train_examples", ">= 1")
        need(self.max_eval_examples is None or self.max_eval_examples >= 1, "max_eval_examples", ">= 1")
        if self.eval_file is not None:
            need(Path(self.eval_file).is_file(), "eval_file", "an existing labelled file")
        if self.export_formats is not None:
            bad = [f for f in self.export_formats if f not in ("dense", "compact", "sparse")]
            need(not bad, "export_formats", "a list of dense, compact, sparse")

    # ------------------------------------------------------------------------------------------
    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Dict[str, Any]) -> "CAPConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ConfigError(f"unknown setting(s) {unknown}; see `capkit-prune --help` for the valid ones",
                              setting="config")
        return cls(**values)


def load_config_file(path: str) -> Dict[str, Any]:
    """Settings from a YAML or JSON file (keys as in :class:`CAPConfig`, dashes allowed)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError.of("config", f"no such file {path}" if not p.exists() else f"{path} is not a file")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError.of("config", f"cannot read {path} ({exc})") from exc
    if p.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError as exc:  # pragma: no cover - PyYAML ships with transformers' deps
            raise ConfigError.of("config", "reading a YAML config needs PyYAML: `pip install pyyaml` (or use JSON)") from exc
        try:
            values = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise ConfigError.of("config", f"{path} is not valid YAML: {exc}".replace("\n", " ")) from exc
    else:
        try:
            values = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError.of("config", f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(values, dict):
        raise ConfigError.of("config", f"{path} must hold a mapping of settings (name: value)")
    return {str(k).replace("-", "_"): v for k, v in values.items()}
