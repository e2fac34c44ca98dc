"""``capkit-prune`` / ``python -m capkit.prune``: prune a pre-trained model on a task with CAP.

    capkit-prune                                  # the embedded default (MiniLM on BBC News)
    capkit-prune --model bert-base-uncased --task mnli --data-dir glue/MNLI --method cap-m
    capkit-prune --config run.yaml --sparsity 0.97   # flags override the config file
    capkit-prune finetune --model bert-base-uncased --task rte   # a dense teacher only
    capkit-prune --output-dir runs/x --resume     # continue an interrupted run
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Dict, List, Optional, Tuple

from capkit.cap.config import LEGACY_SETTINGS, METHODS, CAPConfig, ConfigError, load_config_file, takes_blocks

__all__ = ["EMBEDDED_DEFAULT", "build_parser", "config_from_args", "main"]

# What `capkit-prune` with no model and no task runs: the real pre-trained MiniLM-L6-H384 on
# the real BBC News articles (both installed with capkit), sized to finish in minutes on two CPU
# cores: 1,000 training articles cut to 64 tokens, 32x32 block movement pruning to 90%, so the
# exported model runs on the block-sparse kernels. Five epochs at learning rate 3e-4 were chosen
# by measured runs: 3 epochs at 1e-4 left 7.4 points below the teacher, these settings 1.6.
EMBEDDED_DEFAULT: Dict[str, object] = {
    "model": "minilm", "task": "bbc_news", "method": "cap-m", "block_size": 32, "sparsity": 0.9,
    "epochs": 5.0, "teacher_epochs": 2, "max_length": 64, "max_train_examples": 1000,
    "batch_size": 32, "learning_rate": 3e-4, "score_learning_rate": 1e-1, "extra_negatives": 1024,
    "initial_warmup": 1.0, "final_warmup": 1.0, "output_dir": "capkit-output/minilm-bbc_news-cap-m",
}

_HELP = {
    "model": "pre-trained model: a local folder, a Hugging Face hub name, or 'minilm' (the embedded MiniLM-L6-H384)",
    "task": "GLUE task (cola, sst2, mrpc, stsb, qqp, mnli, qnli, rte), squad, bbc_news (embedded), or text (your own file)",
    "data_dir": "folder with the task's files in GLUE TSV / SQuAD JSON layout (default: the Hugging Face hub, needs `datasets`)",
    "train_file": "task text: training CSV/TSV/JSONL file",
    "dev_file": "task text: held-out CSV/TSV/JSONL file for evaluation",
    "text_column": "task text: column holding the text",
    "text_pair_column": "task text: column holding the second text of a pair",
    "label_column": "task text: column holding the label",
    "method": "cap-m (movement + CAP), cap-soft (soft movement + CAP), cap-f (heads/neurons + CAP, then compaction), "
              "or the baselines magnitude, movement, soft-movement (no contrastive terms), finetune (dense)",
    "output_dir": "where checkpoints, logs, exports and the report go",
    "teacher": "fine-tuned teacher (folder or hub name); without it, and with KD or FiC on, one is fine-tuned first",
    "teacher_epochs": "epochs of that teacher fine-tuning",
    "epochs": "training epochs (cap-f: see --structured-epochs)",
    "batch_size": "examples per optimiser step and process (before --grad-accum)",
    "eval_batch_size": "examples per batch when evaluating and encoding banks",
    "max_length": "tokens per example",
    "doc_stride": "question answering: context tokens shared by consecutive windows of a long context",
    "learning_rate": "peak learning rate of the weights (linear warm-up, then linear decay)",
    "score_learning_rate": "learning rate of the pruning scores (no weight decay)",
    "weight_decay": "AdamW weight decay of the weights",
    "warmup_ratio": "fraction of the steps in learning-rate warm-up; also the unit w of the sparsity schedule",
    "grad_clip": "gradient norm clip (0: off)",
    "grad_accum": "batches per optimiser step",
    "sparsity": "final fraction of encoder-linear weights pruned (top-k methods)",
    "block_size": "prune whole blocks of this size (16/32/64/128) so the model runs on block-sparse kernels; "
                  "0: single weights (movement and magnitude only)",
    "initial_warmup": "sparsity schedule: steps at the initial value, in units of w",
    "final_warmup": "sparsity schedule: steps at the final value, in units of w",
    "soft_threshold": "soft movement: final threshold tau of sigmoid(scores)",
    "reg_lambda": "soft movement: final weight of the L1 term",
    "global_topk": "one top-k threshold over all matrices instead of one per matrix",
    "freeze_embeddings": "keep the embeddings (word, position, type, their LayerNorm) at their pre-trained values; "
                         "on for the unstructured methods as in movement pruning's code, off for cap-f and finetune",
    "structured_fractions": "cap-f: fractions of heads and neurons removed, one pruning iteration each",
    "structured_epochs": "cap-f: retraining epochs per iteration",
    "ce_weight": "weight of the task loss",
    "kd_weight": "weight of knowledge distillation from the teacher",
    "kd_temperature": "distillation temperature",
    "contrastive_temperature": "InfoNCE temperature of PrC/SnC/FiC",
    "extra_negatives": "bank vectors sampled as extra candidates per step and module (E)",
    "unsup_weight": "weight of the unsupervised (same example) contrastive term",
    "sup_weight": "weight of the supervised (same label) contrastive term",
    "representation": "sentence vector: cls (pooler output / [CLS]) or mean (masked mean of the last layer)",
    "normalization": "cap (the reference's double normalisation) or mean (per-anchor mean)",
    "prc": "contrastive module with the pre-trained model's bank",
    "snc": "contrastive module with the student's snapshots",
    "fic": "contrastive module with the teacher's bank",
    "kd": "knowledge distillation from the teacher",
    "teacher_logits": "KD targets: cache (the teacher runs once over the training set before training, in eval mode, "
                      "so its logits are those a per-step forward gives) or live (a teacher forward every step); "
                      "question answering always runs live",
    "seed": "random seed (data order, dropout, negatives)",
    "device": "auto, cpu, cuda or cuda:N",
    "bf16": "bf16 autocast (default: on for CUDA)",
    "save_every": "optimiser steps between checkpoints (also at every epoch end and on Ctrl-C; 0: epoch ends only)",
    "resume": "continue the run in --output-dir from its checkpoint",
    "max_train_examples": "use a random subset of this many training examples",
    "max_eval_examples": "use a random subset of this many evaluation examples",
    "eval_file": "a further labelled file to score the exported model and the teacher on, reported beside dev "
                 "(GLUE: a TSV in the task's GLUE layout, or CSV/JSONL with its column names and 'label'; SQuAD: "
                 "v1.1 JSON; text: the --text-column/--label-column of the training file)",
    "export_formats": "formats of the final model (dense, compact, sparse)",
    "tensorboard": "also log to TensorBoard when it is installed",
    "progress": "progress bars",
    "num_workers": "data-loader worker processes",
    "compile": "train with torch.compile (the student's forward and backward; masks are computed ahead of each "
               "step, so the graph does not break at the pruned layers); off by default: on the 2-core Xeon CPU "
               "a compiled CAP-m step measured 0.98x eager (no gain; "
               "benchmarks/results/intel-r-xeon-r-processor-2c/train_step_compile_quick.md), not yet measured on a GPU",
}


def _describe_default(name: str, value) -> str:
    if value is None:
        return "the method's published value"
    return repr(value)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="capkit-prune", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Settings left unset take the published defaults of the method and task "
               "(cap-algorithm: unstructured GLUE w_ce 0.1, w_kd 0.9, T 2, tau 0.1, E 4096, w_u 0.1, w_s 10).")
    p.add_argument("command", nargs="?", choices=("prune", "finetune"), default="prune",
                   help="prune (default) or finetune (train a dense teacher only)")
    p.add_argument("--config", metavar="FILE", help="YAML or JSON file of settings (flags override it)")
    defaults = CAPConfig()
    for f in dataclasses.fields(CAPConfig):
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        help_text = f"{_HELP[f.name]} (default: {_describe_default(f.name, default)})"
        kwargs = dict(dest=f.name, default=argparse.SUPPRESS, help=help_text)
        if f.name == "method":
            p.add_argument(flag, choices=list(METHODS), **kwargs)
        elif f.name in ("prc", "snc", "fic", "kd", "bf16", "global_topk", "freeze_embeddings", "tensorboard",
                        "progress", "resume", "compile"):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
        elif f.name in ("structured_fractions",):
            p.add_argument(flag, type=float, nargs="+", metavar="F", **kwargs)
        elif f.name == "teacher_logits":
            p.add_argument(flag, choices=("cache", "live"), **kwargs)
        elif f.name in ("export_formats",):
            p.add_argument(flag, nargs="+", choices=("dense", "compact", "sparse"), **kwargs)
        else:
            kind = _field_type(f.name, default)
            p.add_argument(flag, type=kind, metavar=f.name.upper(), **kwargs)
    return p


_FLOATS = {"epochs", "learning_rate", "weight_decay", "initial_warmup", "final_warmup", "structured_epochs",
           "kd_temperature", "contrastive_temperature", "unsup_weight", "sup_weight"}
_INTS = {"batch_size", "max_length", "block_size", "max_train_examples", "max_eval_examples"}


def _field_type(name: str, default):
    if name in _FLOATS:
        return float
    if name in _INTS:
        return int
    if isinstance(default, bool):  # pragma: no cover - booleans are handled above
        return bool
    if isinstance(default, int):
        return int
    if isinstance(default, float):
        return float
    return str


def config_from_args(argv: Optional[List[str]] = None) -> CAPConfig:
    """Settings = embedded default (when no model/task is named) < config file < flags."""
    return _parse(argv)[0]


def _parse(argv: Optional[List[str]]) -> Tuple[CAPConfig, Dict[str, str]]:
    """The run's settings, and the config file each setting read from it came from."""
    args = build_parser().parse_args(argv)
    values = vars(args)
    command = values.pop("command")
    config_file = values.pop("config")
    settings: Dict[str, object] = {}
    from_file: Dict[str, str] = {}
    if config_file:
        settings.update(load_config_file(config_file))
        from_file = {name: config_file for name in settings if name not in values}
    settings.update(values)
    if settings.get("resume"):
        # continue with the run's own settings; flags given now must agree with them
        import json
        from pathlib import Path

        saved = Path(str(settings.get("output_dir", CAPConfig.output_dir))) / "config.json"
        if saved.exists():
            try:
                base = {**LEGACY_SETTINGS, **json.loads(saved.read_text())}
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise ConfigError.of("resume", f"cannot read the run's settings in {saved} ({exc})") from exc
            base.update(settings)
            # where the run lives now: a run folder may have been moved or copied since it started
            base["output_dir"] = str(settings.get("output_dir", CAPConfig.output_dir))
            settings = base
    if "model" not in settings and "task" not in settings:
        base = dict(EMBEDDED_DEFAULT)
        if not takes_blocks(settings.get("method", base["method"])):
            del base["block_size"]  # blocks are the default of the top-k methods only (cap-f prunes heads)
        base.update(settings)
        settings = base
        print("[capkit-prune] no --model/--task given: running the embedded default, the pre-trained MiniLM-L6-H384 "
              "on BBC News (see `capkit-prune --help` to prune your own model)", file=sys.stderr)
    if settings.get("block_size") == 0:  # --block-size 0: unstructured (overrides a config file's blocks)
        settings["block_size"] = None
    if command == "finetune":
        settings["method"] = "finetune"
        settings["block_size"] = None  # a dense teacher has no blocks
        settings.setdefault("kd", False)
        for module in ("prc", "snc", "fic"):
            settings.setdefault(module, False)
    try:
        cfg = CAPConfig.from_dict(settings)
    except ConfigError as exc:
        if exc.setting == "config" and not config_file:
            raise ConfigError(str(exc), setting="resume") from exc  # unknown names in a saved config.json
        raise
    return cfg, from_file


def _argument(setting: str, from_file: Dict[str, str]) -> str:
    flag = "--" + setting.replace("_", "-")
    if setting in from_file:
        return f"{flag} ({setting} in {from_file[setting]})"
    return flag


def _usage_error(exc: Exception, from_file: Dict[str, str]) -> int:
    """One line for a user's mistake, as argparse prints its own: ``capkit-prune: error: --flag: ...``."""
    setting = getattr(exc, "setting", None)
    if setting is None:
        print(f"capkit-prune: error: {exc}", file=sys.stderr)
    else:
        print(f"capkit-prune: error: {_argument(setting, from_file)}: {exc.problem}", file=sys.stderr)
    return 2


def main(argv: Optional[List[str]] = None) -> int:
    from_file: Dict[str, str] = {}
    try:
        cfg, from_file = _parse(argv)
        resolved = cfg.resolved()  # bad settings fail here, before anything is loaded
        from capkit.cap.checks import check_inputs

        check_inputs(resolved)  # and missing folders, files and columns: still no torch imported
    except ConfigError as exc:
        return _usage_error(exc, from_file)
    from capkit.cap.data import DataError, LabelOrderError
    from capkit.cap.trainer import run

    try:
        run(cfg)
    except (ConfigError, DataError, LabelOrderError) as exc:
        return _usage_error(exc, from_file)
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
