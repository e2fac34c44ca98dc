"""``sparsity_report``: what is left of a pruned model, per matrix and overall."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List

import torch
from torch import nn

from capkit.nn import ROLES, MaskedLinear, encoder_layers
from capkit.ops import BlockMask

__all__ = ["SparsityReport", "sparsity_report"]


@dataclass
class SparsityReport:
    matrices: List[dict] = field(default_factory=list)   # one row per encoder linear
    layers: List[dict] = field(default_factory=list)     # heads / neurons per layer
    parameters: int = 0                                  # parameters of the model as it is stored
    nonzero_parameters: int = 0                          # ... of which are not pruned away
    encoder_weights: int = 0                             # weights of the original encoder linears
    encoder_weights_kept: int = 0

    @property
    def sparsity(self) -> float:
        """Fraction of the original encoder linears' weights that are gone (masked or removed)."""
        return 1.0 - self.encoder_weights_kept / self.encoder_weights if self.encoder_weights else 0.0

    def to_dict(self) -> dict:
        return {
            "sparsity": self.sparsity,
            "encoder_weights": self.encoder_weights,
            "encoder_weights_kept": self.encoder_weights_kept,
            "parameters": self.parameters,
            "nonzero_parameters": self.nonzero_parameters,
            "heads_left": sum(l["heads"] for l in self.layers),
            "heads_total": sum(l["heads_original"] for l in self.layers),
            "neurons_left": sum(l["neurons"] for l in self.layers),
            "neurons_total": sum(l["neurons_original"] for l in self.layers),
            "layers": self.layers,
            "matrices": self.matrices,
        }

    def table(self) -> str:
        """Markdown: one row per layer (heads, neurons, sparsity of each linear), then totals."""
        head = "| layer | heads | neurons | " + " | ".join(ROLES) + " |"
        sep = "|" + "---|" * (3 + len(ROLES))
        rows = [head, sep]
        by_layer: Dict[int, Dict[str, dict]] = {}
        for m in self.matrices:
            by_layer.setdefault(m["layer"], {})[m["role"]] = m
        for l in self.layers:
            cells = []
            for role in ROLES:
                m = by_layer.get(l["layer"], {}).get(role)
                cells.append(f"{100 * m['sparsity']:.1f}%" if m else "-")
            rows.append(f"| {l['layer']} | {l['heads']}/{l['heads_original']} | "
                        f"{l['neurons']}/{l['neurons_original']} | " + " | ".join(cells) + " |")
        d = self.to_dict()
        rows.append("")
        rows.append(f"encoder linears: {100 * self.sparsity:.2f}% sparse "
                    f"({self.encoder_weights_kept:,} of {self.encoder_weights:,} weights kept); "
                    f"heads {d['heads_left']}/{d['heads_total']}, neurons {d['neurons_left']}/{d['neurons_total']}; "
                    f"parameters {self.parameters:,} stored, {self.nonzero_parameters:,} non-zero")
        return "\n".join(rows)

    def __str__(self) -> str:
        return self.table()


def _kept_mask(module: nn.Module) -> torch.Tensor:
    if isinstance(module, MaskedLinear):
        return (module.dense_mask() != 0) & (module.weight.detach() != 0)
    return module.weight.detach() != 0


@torch.no_grad()
def sparsity_report(model: nn.Module) -> SparsityReport:
    """Per-matrix and overall sparsity of the encoder linears (masked weights and weights removed
    by compaction both count as pruned), heads and neurons left per layer, parameter counts."""
    layers = encoder_layers(model)
    config = getattr(model, "config", None)
    hidden = getattr(config, "hidden_size", None) or layers[0].get("query").in_features
    heads0 = getattr(config, "num_attention_heads", None) or layers[0].num_heads
    inter0 = getattr(config, "intermediate_size", None) or layers[0].intermediate_size
    head_dim = layers[0].head_size
    original = {
        "query": hidden * heads0 * head_dim, "key": hidden * heads0 * head_dim,
        "value": hidden * heads0 * head_dim, "attn_out": heads0 * head_dim * hidden,
        "ffn_in": hidden * inter0, "ffn_out": inter0 * hidden,
    }
    report = SparsityReport()
    for layer in layers:
        report.layers.append({
            "layer": layer.index, "heads": layer.num_heads, "heads_original": heads0,
            "neurons": layer.intermediate_size, "neurons_original": inter0,
        })
        for role in ROLES:
            module = layer.get(role)
            kept = int(_kept_mask(module).sum())
            total = original[role]
            report.matrices.append({
                "name": layer.qualified_name(role), "layer": layer.index, "role": role,
                "shape": list(module.weight.shape), "kept": kept, "original": total,
                "sparsity": 1.0 - kept / total,
                "kind": _mask_kind(module),
            })
            report.encoder_weights += total
            report.encoder_weights_kept += kept
    seen = set()  # tied parameters (shared embeddings) count once
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if name == "scores" or id(p) in seen:
                continue
            seen.add(id(p))
            report.parameters += p.numel()
            if isinstance(module, MaskedLinear) and name == "weight":
                report.nonzero_parameters += int(_kept_mask(module).sum())
            else:
                report.nonzero_parameters += int(torch.count_nonzero(p))
    return report


def _mask_kind(module: nn.Module) -> str:
    if not isinstance(module, MaskedLinear):
        return "dense"
    if module.criterion is not None:
        return module.criterion.name
    if module._structured is not None:
        return "block" if isinstance(module._structured, BlockMask) else "n:m"
    return "block" if module.block_size is not None else "unstructured"
