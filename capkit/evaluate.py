"""``capkit-eval`` / ``python -m capkit.evaluate``: score a saved model on a labelled file.

    capkit-eval runs/x/model-sparse --task sst2 --file SST-2/dev.tsv
    capkit-eval runs/x/model-dense --task text --file held_out.csv --text-column review --json

The model folder is one capkit wrote (``model-dense``, ``model-sparse``, ``model-compact``, a
teacher) or a plain transformers checkpoint with its tokenizer. Prints the task's metrics; the
exit status is 2 for a bad argument, with the argument named.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import List, Optional

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    from capkit.cap.data import TASKS

    p = argparse.ArgumentParser(prog="capkit-eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_dir", metavar="MODEL_DIR", help="folder of the saved model (with its tokenizer)")
    p.add_argument("--task", required=True,
                   help=f"task of the file: {', '.join(TASKS)}, or text (a classifier's own CSV/TSV/JSONL file)")
    p.add_argument("--file", required=True,
                   help="labelled file: GLUE TSV layout (or CSV/JSONL with the task's columns and 'label'), "
                        "SQuAD v1.1 JSON, or for --task text a CSV/TSV/JSONL file")
    p.add_argument("--text-column", default="text", help="--task text: column of the text (default: text)")
    p.add_argument("--text-pair-column", default=None, help="--task text: column of the second text of a pair")
    p.add_argument("--label-column", default="label", help="--task text: column of the label (default: label)")
    p.add_argument("--max-length", type=int, default=None, help="tokens per example (default: 128; SQuAD 384)")
    p.add_argument("--doc-stride", type=int, default=128, help="SQuAD: context tokens shared by windows")
    p.add_argument("--batch-size", type=int, default=64, help="examples per batch (default: 64)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    from capkit.cap.data import TASKS, DataError, LabelOrderError

    p = build_parser()
    args = p.parse_args(argv)
    if args.task not in TASKS and args.task not in ("text", "bbc_news"):
        p.error(f"--task: unknown task {args.task!r}; choose from {', '.join([*TASKS, 'text'])}")
    path = Path(args.file)
    if not path.is_file():
        p.error(f"--file: no such file {args.file}")
    if not Path(args.model_dir).is_dir():
        p.error(f"MODEL_DIR: no such folder {args.model_dir}")
    if args.max_length is not None and args.max_length < 8:
        p.error(f"--max-length: must be >= 8, got {args.max_length}")
    if args.batch_size < 1:
        p.error(f"--batch-size: must be >= 1, got {args.batch_size}")
    import torch

    try:
        device = torch.device(args.device)
    except RuntimeError as exc:
        p.error(f"--device: {exc}")
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error(f"--device: {args.device} asked for, but torch sees no CUDA device")

    from capkit.cap.evaluation import load_saved_model, score_file
    from capkit.export import CheckpointError

    try:
        model, tokenizer = load_saved_model(args.model_dir, device=device)
    except (CheckpointError, FileNotFoundError, OSError) as exc:
        p.error(f"MODEL_DIR: {exc}")
    qa = args.task == "squad"
    if qa != ("QuestionAnswering" in type(model).__name__):
        p.error(f"--task: {args.task} does not fit the model in {args.model_dir} ({type(model).__name__})")
    try:
        result = score_file(model, tokenizer, args.task, path, max_length=args.max_length,
                            doc_stride=args.doc_stride, batch_size=args.batch_size, device=device,
                            text_column=args.text_column, text_pair_column=args.text_pair_column,
                            label_column=args.label_column)
    except LabelOrderError as exc:
        p.error(f"--task: the model's labels do not fit {args.task}: {exc}")
    except (DataError, ValueError, FileNotFoundError) as exc:
        p.error(f"--file: {exc}")
    result["model"] = str(args.model_dir)
    result["task"] = args.task
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        metrics = ", ".join(f"{k} {v:.4f}" for k, v in result["metrics"].items()
                            if k != "main" and isinstance(v, float))
        print(f"{args.model_dir} on {args.file} ({result['examples']} examples, task {args.task}): {metrics}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
