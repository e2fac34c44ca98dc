"""ONNX export of pruned models (``capkit.export.save(model, path, format="onnx")``).

The model is exported as the plain transformers model it is equivalent to: masked linears folded
into ``nn.Linear`` (zeros in place of pruned weights), compacted layers at their smaller sizes.
Inputs ``input_ids``, ``attention_mask`` (and ``token_type_ids`` where the model has them), all
int64 ``[batch, sequence]`` with both axes dynamic; one output, the model's first (``logits`` for
task heads, ``last_hidden_state`` for a bare encoder). After writing, the file is loaded in ONNX
Runtime and its output compared with the PyTorch model's on a random batch; the largest absolute
difference goes into ``capkit.json``.

Needs ``onnx`` and ``onnxruntime`` (``pip install capkit[onnx]``); ``import capkit`` does not.
"""
from __future__ import annotations

import copy
import inspect
import os
import warnings
from pathlib import Path
from typing import Dict, Optional, Union

import torch
from torch import nn

__all__ = ["ONNX_FILE", "export_onnx", "onnx_missing_reason", "ort_session", "run_onnx"]

ONNX_FILE = "model.onnx"
OPSET = 17


def onnx_missing_reason() -> Optional[str]:
    """None when onnx and onnxruntime import; else what is missing and how to install it."""
    missing = []
    for name in ("onnx", "onnxruntime"):
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        return f"{' and '.join(missing)} not installed (pip install 'capkit[onnx]')"
    return None


class _FirstOutput(nn.Module):
    """Positional int64 inputs -> the model's first output, the signature the ONNX graph gets."""

    def __init__(self, model: nn.Module, names):
        super().__init__()
        self.model, self.names = model, tuple(names)

    def forward(self, *inputs):
        out = self.model(**dict(zip(self.names, inputs)), return_dict=True)
        return out[0]


def _input_names(model: nn.Module):
    params = inspect.signature(model.forward).parameters
    names = ["input_ids", "attention_mask"]
    if "token_type_ids" in params and getattr(model.config, "type_vocab_size", 0):
        names.append("token_type_ids")
    return names


def example_inputs(model: nn.Module, batch: int = 2, seq: int = 16, seed: int = 0) -> Dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    vocab = int(model.config.vocab_size)
    ids = torch.randint(1, vocab, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[1:, seq - seq // 4:] = 0  # padding in all but the first sequence
    inputs = {"input_ids": ids, "attention_mask": mask}
    if "token_type_ids" in _input_names(model):
        inputs["token_type_ids"] = torch.zeros(batch, seq, dtype=torch.long)
    return inputs


def plain_copy(model: nn.Module) -> nn.Module:
    """A CPU fp32 copy of ``model`` with every MaskedLinear folded into an nn.Linear, eval mode,
    eager attention (exported as plain MatMul/Softmax that every ONNX runtime has)."""
    from capkit.nn import unpatch

    plain = unpatch(copy.deepcopy(model).cpu().float()).eval()
    for p in plain.parameters():
        p.requires_grad_(False)
    if hasattr(plain.config, "_attn_implementation"):
        try:
            plain.config._attn_implementation = "eager"
            for m in plain.modules():
                if hasattr(m, "config") and m.config is not plain.config and hasattr(m.config, "_attn_implementation"):
                    m.config._attn_implementation = "eager"
        except Exception:  # older/newer transformers without a settable attention choice: keep the default
            pass
    return plain


def export_graph(model: nn.Module, file: Union[str, os.PathLike], opset: int = OPSET) -> list:
    """Write ``model`` (a plain transformers model, see :func:`plain_copy`) to ``file``; returns the
    input names."""
    names = _input_names(model)
    inputs = example_inputs(model)
    axes = {n: {0: "batch", 1: "sequence"} for n in names}
    axes["output"] = {0: "batch"} if _output_rank(model, inputs) == 2 else {0: "batch", 1: "sequence"}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(_FirstOutput(model, names), tuple(inputs[n] for n in names), str(file),
                          input_names=names, output_names=["output"], dynamic_axes=axes, opset_version=opset,
                          dynamo=False, do_constant_folding=True)
    return names


def _output_rank(model, inputs) -> int:
    with torch.no_grad():
        return _FirstOutput(model, list(inputs))(*inputs.values()).dim()


def ort_session(file: Union[str, os.PathLike], threads: Optional[int] = None):
    """An ONNX Runtime CPU session: ``threads`` intra-op threads (default torch's), one inter-op,
    all graph optimisations."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = int(threads or torch.get_num_threads())
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(file), sess_options=so, providers=["CPUExecutionProvider"])


def run_onnx(session, inputs: Dict[str, torch.Tensor]) -> torch.Tensor:
    names = [i.name for i in session.get_inputs()]
    out = session.run(None, {n: inputs[n].cpu().numpy() for n in names})[0]
    return torch.from_numpy(out)


def max_abs_diff(model: nn.Module, file: Union[str, os.PathLike], inputs: Dict[str, torch.Tensor]) -> float:
    """Largest |ONNX Runtime - PyTorch| of the first output on ``inputs``."""
    session = ort_session(file, threads=1)
    names = [i.name for i in session.get_inputs()]
    with torch.no_grad():
        ref = _FirstOutput(model, names)(*(inputs[n] for n in names)).float()
    return float((run_onnx(session, inputs) - ref).abs().max())


def export_onnx(model: nn.Module, folder: Path, *, opset: int = OPSET) -> Dict:
    """Write ``model.onnx`` and ``config.json`` into ``folder`` (which exists); returns the manifest
    fields: inputs, opset, and the check against the PyTorch model."""
    reason = onnx_missing_reason()
    if reason is not None:
        raise RuntimeError(f"ONNX export needs onnx and onnxruntime: {reason}")
    plain = plain_copy(model)
    file = Path(folder) / ONNX_FILE
    names = export_graph(plain, file, opset)
    plain.config.save_pretrained(folder)
    inputs = example_inputs(plain, batch=3, seq=11, seed=1)  # other sizes than at export: dynamic axes
    diff = max_abs_diff(plain, file, inputs)
    return {"onnx": {"file": ONNX_FILE, "inputs": names, "output": "output", "opset": opset,
                     "check": {"max_abs_diff": diff, "batch": 3, "seq": 11,
                               "onnxruntime": __import__("onnxruntime").__version__}}}
