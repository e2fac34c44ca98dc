"""Scoring a model on a labelled data set: the dev evaluation of a run, ``--eval-file``, and
``capkit-eval``."""
from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Dict, Optional, Tuple, Union

import torch
from torch import nn

__all__ = ["evaluate_model", "load_saved_model", "score_file"]


@torch.no_grad()
def evaluate_model(model: nn.Module, dataset, encoded, *, device: Union[str, torch.device] = "cpu",
                   batch_size: int = 64, bf16: bool = False) -> Dict[str, float]:
    """The task's metrics (``main`` included) of ``model`` on ``dataset`` (its features ``encoded``),
    in eval mode; the model's mode is restored afterwards."""
    from capkit.cap.banks import model_inputs, to_device
    from capkit.cap.data import squad_postprocess
    from capkit.cap.metrics import compute_metrics

    device = torch.device(device)
    was_training = model.training
    model.eval()
    # a private generator: starting a loader must not draw from the global RNG (the training's dropout)
    loader = torch.utils.data.DataLoader(encoded, batch_size=batch_size, shuffle=False, collate_fn=encoded.collate,
                                         generator=torch.Generator().manual_seed(0))
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
    preds, starts, ends = [], [], []
    try:
        for batch in loader:
            batch = to_device(batch, device)
            with autocast:
                out = model(**model_inputs(batch))
            if dataset.task == "squad":
                starts.extend(out.start_logits.float().cpu())
                ends.extend(out.end_logits.float().cpu())
            else:
                preds.append(out.logits.float().cpu())
    finally:
        model.train(was_training)
    if dataset.task == "squad":
        answers = squad_postprocess(starts, ends, encoded, dataset)
        return compute_metrics(dataset.task, answers, [list(ex.answers) for ex in dataset.examples])
    logits = torch.cat(preds)
    refs = [ex.label for ex in dataset.examples]
    predictions = logits.view(-1).numpy() if dataset.is_regression else logits.numpy()
    return compute_metrics(dataset.task, predictions, refs)


def load_saved_model(model_dir: Union[str, Path], *, device: Union[str, torch.device] = "cpu"
                     ) -> Tuple[nn.Module, object]:
    """(model, tokenizer) of a folder written by capkit (any export format) or a plain
    transformers checkpoint with its tokenizer."""
    import transformers

    import capkit

    model = capkit.load(model_dir, device=device)
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(model_dir))
    except Exception as exc:  # transformers raises many kinds for a folder without a tokenizer
        raise FileNotFoundError(f"{model_dir} has no tokenizer files ({type(exc).__name__}: {exc})") from exc
    return model, tokenizer


def model_label_names(model: nn.Module) -> Optional[Tuple[str, ...]]:
    """The label order of a classifier (its id2label), None when it has none."""
    id2label = getattr(model.config, "id2label", None) or {}
    if not id2label:
        return None
    return tuple(str(id2label[i]) for i in sorted(id2label, key=int))


def score_file(model: nn.Module, tokenizer, task: str, path: Union[str, Path], *, max_length: Optional[int] = None,
               doc_stride: int = 128, batch_size: int = 64, device: Union[str, torch.device] = "cpu",
               text_column: str = "text", text_pair_column: Optional[str] = None, label_column: str = "label",
               bf16: bool = False) -> Dict[str, object]:
    """Metrics of ``model`` on a labelled file of ``task``:
    ``{"file", "examples", "metrics"}``. The file's labels are checked against the model's label
    order (GLUE tasks) or mapped through it (own text files)."""
    from capkit.cap.data import TASKS, check_label_order, encode, load_labelled_file

    qa = task == "squad"
    names = None if qa or task in TASKS else model_label_names(model)
    dataset = load_labelled_file(task, path, text_column=text_column, text_pair_column=text_pair_column,
                                 label_column=label_column, label_names=names)
    if not qa and not dataset.is_regression:
        check_label_order(dataset.label_names, model.config)
    if max_length is None:
        max_length = 384 if qa else 128
    encoded = encode(dataset, tokenizer, max_length, stride=doc_stride)
    metrics = evaluate_model(model, dataset, encoded, device=device, batch_size=batch_size, bf16=bf16)
    return {"file": str(path), "examples": len(dataset), "metrics": metrics}
