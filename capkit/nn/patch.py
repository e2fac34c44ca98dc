"""Find the prunable linears of BERT-family encoders and swap them for :class:`MaskedLinear`.

Every supported architecture is described by where its encoder layers live and what its six
prunable linears are called inside one layer. Everything else in capkit (criteria, structured
masks, compaction, export) goes through :func:`encoder_layers`, so adding an architecture means
adding one :class:`Architecture` entry here.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Union

from torch import nn

from capkit.nn.masked_linear import MaskedLinear

__all__ = [
    "ROLES",
    "Architecture",
    "EncoderLayer",
    "UnsupportedModelError",
    "encoder_layers",
    "find_architecture",
    "masked_modules",
    "patch_model",
    "unpatch",
]

# The six prunable linears of one encoder layer, in the order the design lists them.
ROLES = ("query", "key", "value", "attn_out", "ffn_in", "ffn_out")

# Names a user may write for a role (the transformers attribute names included).
_ALIASES = {
    "q": "query", "query": "query",
    "k": "key", "key": "key",
    "v": "value", "value": "value",
    "attn_out": "attn_out", "attention_output": "attn_out", "attention.output": "attn_out",
    "attention.output.dense": "attn_out", "o": "attn_out",
    "ffn_in": "ffn_in", "intermediate": "ffn_in", "intermediate.dense": "ffn_in", "fc1": "ffn_in",
    "ffn_out": "ffn_out", "output": "ffn_out", "output.dense": "ffn_out", "fc2": "ffn_out",
}


class UnsupportedModelError(TypeError):
    """The model is not a BERT-family encoder capkit knows how to prune."""


@dataclass(frozen=True)
class Architecture:
    name: str
    layers_path: str            # attribute path from the base model to the ModuleList of layers
    roles: Dict[str, str]       # role -> attribute path inside one layer

    def matches(self, base: nn.Module) -> bool:
        layers = _get_path(base, self.layers_path, None)
        if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
            return False
        return all(_get_path(layers[0], p, None) is not None for p in self.roles.values())


_BERT_ROLES = {
    "query": "attention.self.query",
    "key": "attention.self.key",
    "value": "attention.self.value",
    "attn_out": "attention.output.dense",
    "ffn_in": "intermediate.dense",
    "ffn_out": "output.dense",
}

# BERT, RoBERTa, MiniLM (a BERT), ELECTRA, XLM-R, CamemBERT share this layout.
ARCHITECTURES: List[Architecture] = [
    Architecture("bert", "encoder.layer", _BERT_ROLES),
]


def _get_path(obj, path: str, default=...):
    for part in path.split("."):
        if not hasattr(obj, part):
            if default is ...:
                raise AttributeError(path)
            return default
        obj = getattr(obj, part)
    return obj


def _set_path(obj, path: str, value) -> None:
    parent_path, _, last = path.rpartition(".")
    parent = _get_path(obj, parent_path) if parent_path else obj
    setattr(parent, last, value)


def _base_model(model: nn.Module) -> nn.Module:
    base = getattr(model, "base_model", None)
    return base if isinstance(base, nn.Module) else model


def find_architecture(model: nn.Module) -> Architecture:
    """The :class:`Architecture` entry of ``model``, or a clear error."""
    if not isinstance(model, nn.Module):
        raise UnsupportedModelError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    base = _base_model(model)
    for arch in ARCHITECTURES:
        if arch.matches(base):
            return arch
    kind = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
    raise UnsupportedModelError(
        f"unsupported architecture {kind!r}: capkit prunes BERT-family encoders (BERT, RoBERTa, "
        f"MiniLM, ELECTRA, XLM-R) whose layers live at <base_model>.encoder.layer and contain "
        f"{', '.join(_BERT_ROLES.values())}"
    )


class EncoderLayer:
    """Handle on one encoder layer: its prunable linears by role, and its head geometry."""

    def __init__(self, index: int, module: nn.Module, arch: Architecture, prefix: str, head_size: int):
        self.index = index
        self.module = module
        self.arch = arch
        self.prefix = prefix          # qualified name of the layer inside the full model
        self.head_size = head_size

    def get(self, role: str) -> nn.Module:
        return _get_path(self.module, self.arch.roles[role])

    def set(self, role: str, new: nn.Module) -> None:
        _set_path(self.module, self.arch.roles[role], new)

    def qualified_name(self, role: str) -> str:
        return f"{self.prefix}.{self.arch.roles[role]}"

    @property
    def attention(self) -> nn.Module:
        """The self-attention module (holds query/key/value)."""
        return _get_path(self.module, self.arch.roles["query"].rpartition(".")[0])

    @property
    def num_heads(self) -> int:
        """Heads this layer has now (after compaction it may be fewer than the config says)."""
        return self.get("query").out_features // self.head_size

    @property
    def intermediate_size(self) -> int:
        return self.get("ffn_in").out_features

    def __repr__(self) -> str:
        return f"EncoderLayer({self.index}, heads={self.num_heads}, intermediate={self.intermediate_size})"


def encoder_layers(model: nn.Module) -> List[EncoderLayer]:
    """The encoder layers of a supported model, in order."""
    arch = find_architecture(model)
    base = _base_model(model)
    layers = _get_path(base, arch.layers_path)
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "num_attention_heads", None):
        head_size = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    else:  # a bare encoder without config: read it off the attention module
        head_size = getattr(layers[0].attention.self, "attention_head_size")
    base_prefix = next((n for n, m in model.named_modules() if m is base), "")
    prefix = f"{base_prefix}.{arch.layers_path}" if base_prefix else arch.layers_path
    return [EncoderLayer(i, layer, arch, f"{prefix}.{i}", head_size) for i, layer in enumerate(layers)]


def _resolve_targets(layers: Sequence[EncoderLayer], targets) -> List[tuple]:
    """(layer, role) pairs selected by ``targets``: role names/aliases or fnmatch patterns over
    qualified module names. Each entry must select something."""
    if targets is None or targets == "all":
        return [(layer, role) for layer in layers for role in ROLES]
    if isinstance(targets, str):
        targets = [targets]
    targets = list(targets)
    if not targets:
        raise ValueError("targets must name at least one linear (or be 'all')")
    chosen = []
    for t in targets:
        if not isinstance(t, str):
            raise TypeError(f"targets entries must be strings, got {type(t).__name__}")
        role = _ALIASES.get(t)
        if role is not None:
            hits = [(layer, role) for layer in layers]
        else:
            hits = [(layer, r) for layer in layers for r in ROLES
                    if fnmatch.fnmatchcase(layer.qualified_name(r), t)]
        if not hits:
            raise ValueError(
                f"target {t!r} matches no prunable linear; use a role ({', '.join(ROLES)}), "
                f"'all', or a pattern over names such as {layers[0].qualified_name('query')!r}"
            )
        chosen.extend(h for h in hits if h not in chosen)
    order = {(layer.index, r): i for i, (layer, r) in enumerate((l, r) for l in layers for r in ROLES)}
    return sorted(chosen, key=lambda lr: order[(lr[0].index, lr[1])])


def patch_model(
    model: nn.Module,
    targets: Union[str, Iterable[str], None] = "all",
    *,
    block_size: Optional[int] = None,
    backend: str = "auto",
) -> nn.Module:
    """Replace the selected encoder linears of ``model`` by :class:`MaskedLinear` in place.

    ``targets``: ``"all"`` (the six linears of every layer), or a list of roles
    (``query``, ``key``, ``value``, ``attn_out``, ``ffn_in``, ``ffn_out``; the transformers names
    such as ``intermediate`` work too) or fnmatch patterns over qualified module names
    (``"bert.encoder.layer.0.*"``). Embeddings, pooler and task heads are never touched. Weights
    and biases are shared with the original linears (no copy). Already patched linears are left
    as they are. Returns ``model``.
    """
    layers = encoder_layers(model)
    for layer, role in _resolve_targets(layers, targets):
        current = layer.get(role)
        if isinstance(current, MaskedLinear):
            continue
        if not isinstance(current, nn.Linear):
            raise UnsupportedModelError(
                f"{layer.qualified_name(role)} is a {type(current).__name__}, expected nn.Linear"
            )
        layer.set(role, MaskedLinear.from_linear(current, block_size=block_size, backend=backend))
    return model


def masked_modules(model: nn.Module) -> Dict[str, MaskedLinear]:
    """Qualified name -> MaskedLinear for every patched linear, in layer/role order."""
    out = {}
    for layer in encoder_layers(model):
        for role in ROLES:
            m = layer.get(role)
            if isinstance(m, MaskedLinear):
                out[layer.qualified_name(role)] = m
    return out


def unpatch(model: nn.Module) -> nn.Module:
    """Fold every :class:`MaskedLinear` back into a plain ``nn.Linear`` holding ``weight * mask``
    (zeros in place of pruned weights), giving a standard transformers model. In place; returns
    ``model``."""
    for layer in encoder_layers(model):
        for role in ROLES:
            m = layer.get(role)
            if isinstance(m, MaskedLinear):
                lin = m.to_linear()
                lin.weight.requires_grad_(m.weight.requires_grad)
                if lin.bias is not None and m.bias is not None:
                    lin.bias.requires_grad_(m.bias.requires_grad)
                layer.set(role, lin)
    return model
