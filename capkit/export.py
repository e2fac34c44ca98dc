"""Save pruned models in a form that is really smaller and faster, and load them back.

Formats (``capkit.export.save(model, path, format=...)``):

- ``dense``: a standard ``transformers`` checkpoint with zeros in place of pruned weights
  (``AutoModel...from_pretrained(path)`` loads it without capkit).
- ``compact``: for structured pruning: the compacted model (pruned heads and neurons physically
  removed), safetensors plus a config that records every layer's size.
- ``sparse``: every masked encoder linear stored by its layout: unstructured masks as a bitmap plus
  the kept values, block masks as the block CSR that capkit's kernels read (row pointers, column
  indices, the live blocks), N:M masks as the kept values plus their positions in each group.
- ``onnx``: ``model.onnx``, the equivalent plain model (masks folded, compacted layers at their
  sizes) for ONNX Runtime and other ONNX runtimes, checked against the PyTorch model on save
  (see :mod:`capkit.onnx_export`; needs ``capkit[onnx]``). :func:`load` does not read it back.

Every format writes ``capkit.json`` (format, model class, layer layouts, a SHA-256 of every file),
so :func:`load` restores the model with its masks and checks the files are intact. A save goes to
a temporary folder next to ``path`` and is renamed into place, so a crash never leaves half a
checkpoint.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, Optional, Union

import numpy as np
import torch
from torch import nn

from capkit._version import __version__
from capkit.nn import (MaskedLinear, encoder_layers, fuse_for_inference, masked_modules, patch_model, use_cpu_attention,
                       use_fast_layers)
from capkit.ops import BlockMask, NMMask, block_grid_to_layout

__all__ = ["FORMATS", "CheckpointError", "load", "save"]

FORMATS = ("dense", "compact", "sparse", "onnx")
MANIFEST = "capkit.json"
WEIGHTS = "model.safetensors"
SPARSE_WEIGHTS = "sparse.safetensors"


class CheckpointError(ValueError):
    """A checkpoint folder that is not a capkit/transformers checkpoint, or is damaged."""


# ---------------------------------------------------------------------------------------------
# atomic folder writes
# ---------------------------------------------------------------------------------------------
@contextmanager
def _atomic_folder(path: Path, overwrite: bool):
    """Yield a temporary folder next to ``path``; on success it replaces ``path`` by renames."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"path {str(path)!r} exists and is not a folder")
    if path.exists() and any(path.iterdir()) and not overwrite:
        raise FileExistsError(f"path {str(path)!r} is not empty; pass overwrite=True to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        _fsync_folder(tmp)
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.rename(path, old / "x")
            os.rename(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _fsync_folder(folder: Path) -> None:
    for f in folder.iterdir():
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# layouts of one masked linear
# ---------------------------------------------------------------------------------------------
def _fixed_mask(module: MaskedLinear):
    with torch.no_grad():
        m = module.current_mask()
    if isinstance(m, (BlockMask, NMMask)):
        return m
    return m.detach() != 0


def _layout_info(module: MaskedLinear, m) -> dict:
    """How the layer's fixed mask ``m`` (from :func:`_fixed_mask`) is stored."""
    if isinstance(m, BlockMask):
        info = {"kind": "block", "block_size": m.block_size}
        if m.mask is not None:  # elements pruned inside live blocks too
            info["kind"] = "block+unstructured"
        return info
    if isinstance(m, NMMask):
        return {"kind": "nm", "n": m.n, "m": m.m}
    if module.block_size is not None:
        return {"kind": "block+unstructured", "block_size": module.block_size}
    return {"kind": "unstructured"}


def _encode(name: str, module: MaskedLinear, m, info: dict) -> Dict[str, torch.Tensor]:
    w = module.weight.detach().cpu().contiguous()
    if info["kind"] == "block":
        b = m.block_size
        layout = m.layout.to("cpu")
        rows, cols = w.shape
        padded = torch.zeros(-(-rows // b) * b, -(-cols // b) * b, dtype=w.dtype)
        padded[:rows, :cols] = w
        tiles = padded.view(padded.shape[0] // b, b, padded.shape[1] // b, b).permute(0, 2, 1, 3)
        block_rows = torch.repeat_interleave(
            torch.arange(layout.grid_shape[0]), (layout.row_ptr[1:] - layout.row_ptr[:-1]).long())
        blocks = tiles[block_rows, layout.col_idx.long()].contiguous()
        return {f"{name}.row_ptr": layout.row_ptr.contiguous(), f"{name}.col_idx": layout.col_idx.contiguous(),
                f"{name}.blocks": blocks}
    if info["kind"] == "nm":
        n, mm = m.n, m.m
        keep = m.mask.cpu().view(w.shape[0], -1, mm)
        # positions of the kept weights inside each group, in increasing order
        pos = torch.sort(keep.to(torch.int8).argsort(dim=-1, descending=True, stable=True)[..., :n], dim=-1).values
        values = torch.gather(w.view(w.shape[0], -1, mm), -1, pos)
        return {f"{name}.values": values.reshape(w.shape[0], -1).contiguous(),
                f"{name}.positions": pos.to(torch.uint8).reshape(w.shape[0], -1).contiguous()}
    dense = (m.to_dense() if isinstance(m, BlockMask) else m).cpu().bool()
    bits = np.packbits(dense.reshape(-1).numpy())
    return {f"{name}.bitmap": torch.from_numpy(bits), f"{name}.values": w[dense].contiguous()}


def _decode(name: str, info: dict, shape, tensors: Dict[str, torch.Tensor], dtype):
    """(dense weight, mask for MaskedLinear.set_mask) from the stored layout."""
    rows, cols = shape
    try:
        if info["kind"] == "block":
            b = int(info["block_size"])
            grid_shape = (-(-rows // b), -(-cols // b))
            row_ptr, col_idx, blocks = (tensors[f"{name}.{k}"] for k in ("row_ptr", "col_idx", "blocks"))
            grid = torch.zeros(grid_shape, dtype=torch.bool)
            block_rows = torch.repeat_interleave(torch.arange(grid_shape[0]), (row_ptr[1:] - row_ptr[:-1]).long())
            grid[block_rows, col_idx.long()] = True
            padded = torch.zeros(grid_shape[0], grid_shape[1], b, b, dtype=dtype)
            padded[block_rows, col_idx.long()] = blocks.to(dtype)
            weight = padded.permute(0, 2, 1, 3).reshape(grid_shape[0] * b, grid_shape[1] * b)[:rows, :cols]
            return weight.contiguous(), BlockMask(block_grid_to_layout(grid, b, (rows, cols)))
        if info["kind"] == "nm":
            n, mm = int(info["n"]), int(info["m"])
            values, pos = tensors[f"{name}.values"], tensors[f"{name}.positions"].long()
            weight = torch.zeros(rows, cols // mm, mm, dtype=dtype)
            weight.scatter_(-1, pos.view(rows, -1, n), values.view(rows, -1, n).to(dtype))
            keep = torch.zeros(rows, cols // mm, mm, dtype=torch.bool)
            keep.scatter_(-1, pos.view(rows, -1, n), True)
            return weight.view(rows, cols), NMMask(keep.view(rows, cols), n, mm)
        bits, values = tensors[f"{name}.bitmap"], tensors[f"{name}.values"]
        dense = torch.from_numpy(np.unpackbits(bits.numpy(), count=rows * cols).astype(bool)).view(rows, cols)
        weight = torch.zeros(rows, cols, dtype=dtype)
        weight[dense] = values.to(dtype)
        if info["kind"] == "block+unstructured":
            return weight, BlockMask.from_dense(dense, int(info["block_size"]))
        return weight, dense
    except (KeyError, RuntimeError, ValueError) as exc:
        raise CheckpointError(f"sparse layout of {name!r} is damaged or incomplete: {exc}") from exc


# ---------------------------------------------------------------------------------------------
# save
# ---------------------------------------------------------------------------------------------
def _plain_state_dict(model: nn.Module, fold: bool = True) -> Dict[str, torch.Tensor]:
    """The state dict of the equivalent plain transformers model: masked weights folded (zeros in
    place of pruned weights), masks and scores left out. ``fold=False`` gives the model's own
    tensors under those names instead (no copies: loading writes into them)."""
    masked = {id(m): name for name, m in model.named_modules() if isinstance(m, MaskedLinear)}
    out = {}
    for mod_name, module in model.named_modules():
        prefix = f"{mod_name}." if mod_name else ""
        if id(module) in masked:
            out[prefix + "weight"] = module.effective_weight() if fold else module.weight.detach()
            if module.bias is not None:
                out[prefix + "bias"] = module.bias.detach()
            continue
        for n, p in module.named_parameters(recurse=False):
            out[prefix + n] = p.detach()
        for n, b in module.named_buffers(recurse=False):
            if n in module._non_persistent_buffers_set:
                continue
            out[prefix + n] = b.detach()
    return out


@contextmanager
def quiet_transformers():
    """transformers' load reports and progress bars off while capkit loads or saves a model: a
    run says what matters in its own words."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _check_model(model) -> None:
    if not isinstance(model, nn.Module) or not hasattr(model, "save_pretrained") or not hasattr(model, "config"):
        raise TypeError(f"model must be a transformers PreTrainedModel, got {type(model).__name__}")
    encoder_layers(model)  # raises for unsupported architectures


def save(model: nn.Module, path: Union[str, os.PathLike], format: str = "dense", *,
         tokenizer=None, overwrite: bool = False, extra: Optional[dict] = None) -> Path:
    """Write ``model`` to the folder ``path`` in ``format`` (``dense``, ``compact``, ``sparse`` or ``onnx``),
    atomically. ``tokenizer`` is saved alongside when given; ``extra`` (JSON-serialisable) is
    recorded in the manifest. Returns the folder."""
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    _check_model(model)
    from safetensors.torch import save_file

    from capkit.pruning.compact import structure_of

    path = Path(path)
    structure = structure_of(model)
    modules = masked_modules(model)
    fixed = {name: _fixed_mask(m) for name, m in modules.items()}
    layers = {name: _layout_info(m, fixed[name]) for name, m in modules.items()}
    manifest = {
        "format": format,
        "capkit_version": __version__,
        "model_class": type(model).__name__,
        "structure": structure,
        "layers": layers,
    }
    if extra is not None:
        manifest["extra"] = extra
    with _atomic_folder(path, overwrite) as tmp:
        plain = _plain_state_dict(model)
        config = model.config
        previous = getattr(config, "capkit_structure", None)
        config.capkit_structure = structure
        try:
            if format == "onnx":
                from capkit.onnx_export import export_onnx

                manifest["layers"] = {}  # folded into the graph's weights
                manifest.update(export_onnx(model, tmp))
            elif format == "sparse":
                sparse: Dict[str, torch.Tensor] = {}
                for name, module in modules.items():
                    sparse.update(_encode(name, module, fixed[name], layers[name]))
                    del plain[name + ".weight"]
                save_file({k: v.contiguous() for k, v in sparse.items()}, str(tmp / SPARSE_WEIGHTS))
                with quiet_transformers():
                    model.save_pretrained(tmp, state_dict=plain)
            else:
                if format == "compact":
                    manifest["layers"] = {}  # pruned weights inside kept units are stored as zeros
                with quiet_transformers():
                    model.save_pretrained(tmp, state_dict=plain)
        finally:
            if previous is None:
                del config.capkit_structure
            else:
                config.capkit_structure = previous
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        manifest["files"] = {f.name: _sha256(f) for f in sorted(tmp.iterdir()) if f.is_file()}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return path


# ---------------------------------------------------------------------------------------------
# load
# ---------------------------------------------------------------------------------------------
def _read_manifest(path: Path) -> Optional[dict]:
    f = path / MANIFEST
    if not f.exists():
        return None
    try:
        manifest = json.loads(f.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{f} is not valid JSON: {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("format") not in FORMATS:
        raise CheckpointError(f"{f} is not a capkit manifest (format must be one of {FORMATS})")
    for name, digest in manifest.get("files", {}).items():
        file = path / name
        if not file.exists():
            raise CheckpointError(f"checkpoint {str(path)!r} is incomplete: {name} is missing")
        if _sha256(file) != digest:
            raise CheckpointError(f"checkpoint {str(path)!r} is damaged: {name} does not match its checksum")
    return manifest


def _model_class(config, manifest: Optional[dict]):
    import transformers

    name = (manifest or {}).get("model_class") or (getattr(config, "architectures", None) or [None])[0]
    cls = getattr(transformers, name, None) if name else None
    if cls is None:
        raise CheckpointError(f"unknown model class {name!r} in the checkpoint")
    return cls


def load(path: Union[str, os.PathLike], *, device: Union[str, torch.device] = "cpu",
         backend: str = "auto") -> nn.Module:
    """Load a folder written by :func:`save` (any format) or a plain transformers checkpoint, in
    eval mode. Masked layers come back as :class:`~capkit.nn.MaskedLinear` with their masks (block
    and N:M layouts included), so inference runs on capkit's sparse kernels; compacted models
    come back with their smaller layers."""
    import transformers

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint folder {str(path)!r} does not exist")
    if not (path / "config.json").exists():
        raise CheckpointError(f"{str(path)!r} is not a model checkpoint (no config.json)")
    manifest = _read_manifest(path)
    try:
        config = transformers.AutoConfig.from_pretrained(path)
    except Exception as exc:  # transformers raises many kinds for a bad config
        raise CheckpointError(f"cannot read the config of {str(path)!r}: {exc}") from exc
    if manifest is not None and manifest["format"] == "onnx":
        raise CheckpointError(f"{str(path)!r} is an ONNX export: run it with ONNX Runtime "
                              "(capkit.onnx_export.ort_session), or load a dense/compact/sparse export")
    cls = _model_class(config, manifest)
    if manifest is None:
        with quiet_transformers():
            return cls.from_pretrained(path).to(device).eval()

    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from capkit.pruning.compact import shrink_to_structure

    structure = manifest.get("structure")
    model = cls(config)
    if structure:
        shrink_to_structure(model, structure)
    try:
        state = load_file(str(path / WEIGHTS))
        sparse = load_file(str(path / SPARSE_WEIGHTS)) if manifest["format"] == "sparse" else {}
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"cannot read the weights of {str(path)!r}: {exc}") from exc
    layers = manifest.get("layers", {})
    if layers:
        patch_model(model, list(layers), backend=backend)
    modules = masked_modules(model)
    for name, info in layers.items():
        module = modules.get(name)
        if module is None:
            raise CheckpointError(f"layer {name!r} in the manifest does not exist in {cls.__name__}")
        if manifest["format"] == "sparse":
            weight, mask = _decode(name, info, tuple(module.weight.shape), sparse, module.weight.dtype)
            state[name + ".weight"] = weight
        else:  # dense: zeros in place; rebuild the mask from them and the recorded layout
            w = state.get(name + ".weight")
            if w is None:
                raise CheckpointError(f"{name}.weight is missing from {WEIGHTS}")
            mask = _mask_from_zeros(w, info)
        module.set_mask(mask)
        if info.get("block_size"):
            module.block_size = int(info["block_size"])
    targets = _plain_state_dict(model, fold=False)
    expected = targets.keys()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    # transformers drops tied weights (e.g. an MLM decoder tied to the embeddings) from the file
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise CheckpointError(
            f"weights of {str(path)!r} do not fit {cls.__name__}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    with torch.no_grad():
        for key, value in state.items():
            target = targets[key]
            if tuple(target.shape) != tuple(value.shape):
                raise CheckpointError(f"{key} has shape {tuple(value.shape)} in the file but {tuple(target.shape)} in the model")
            target.copy_(value)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    model = model.to(device).eval()
    _prepack_unstructured(model)
    fuse_for_inference(model)
    if torch.device(device).type == "cpu" and use_cpu_attention(model):
        use_fast_layers(model)
    return model


def _prepack_unstructured(model: nn.Module) -> None:
    """Build the CSR of every unstructured layer that CPU inference will run on the sparse kernel,
    once, at load (not at the first forward)."""
    from capkit.ops.sparse_format import csr_applies

    for module in masked_modules(model).values():
        mask = module.current_mask()
        if not isinstance(mask, torch.Tensor):
            continue
        probe = torch.empty(0, module.in_features, dtype=module.weight.dtype, device=module.weight.device)
        with torch.no_grad():
            if csr_applies(probe, module.weight, mask, module.bias, module.backend):
                module.packed_weight(mask)


def _mask_from_zeros(weight: torch.Tensor, info: dict):
    keep = weight != 0
    kind = info.get("kind")
    if kind == "block":
        return BlockMask.from_dense(keep, int(info["block_size"]), keep_element_mask=False)
    if kind == "block+unstructured":
        return BlockMask.from_dense(keep, int(info["block_size"]))
    if kind == "nm":
        return NMMask(keep, int(info["n"]), int(info["m"]))
    return keep


# ---------------------------------------------------------------------------------------------
# command line: capkit-export RUN_DIR --format onnx
# ---------------------------------------------------------------------------------------------
RUN_EXPORTS = ("model-compact", "model-dense", "model-sparse")


def export_sources(folder: Path):
    """The model folders to convert: a capkit-prune output folder's exports, or the folder itself."""
    folder = Path(folder)
    found = [folder / n for n in RUN_EXPORTS if (folder / n / "config.json").exists()]
    if found:
        return found
    if (folder / "config.json").exists():
        return [folder]
    raise FileNotFoundError(f"{str(folder)!r} holds neither a model (config.json) nor the exports of a "
                            f"capkit-prune run ({', '.join(RUN_EXPORTS)})")


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(
        prog="capkit-export",
        description="Convert saved capkit models to another format, e.g. ONNX for ONNX Runtime. RUN_DIR is a "
                    "capkit-prune output folder (its model-compact/, model-dense/ and model-sparse/ are "
                    "converted, each to <name>-<format>/ beside it) or one saved model folder (written to "
                    "<folder>-<format>/, or --out).")
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    p.add_argument("--format", default="onnx", choices=FORMATS)
    p.add_argument("--out", type=Path, default=None, help="output folder (only when RUN_DIR is one model)")
    p.add_argument("--overwrite", action="store_true", help="replace existing output folders")
    args = p.parse_args(argv)
    try:
        sources = export_sources(args.run_dir)
    except FileNotFoundError as exc:
        p.error(str(exc))
    if args.out is not None and len(sources) > 1:
        p.error("--out needs RUN_DIR to be a single model folder")
    for src in sources:
        dst = args.out or src.with_name(f"{src.name}-{args.format}")
        model = load(src)
        tokenizer = None
        if (src / "tokenizer_config.json").exists():
            import transformers

            tokenizer = transformers.AutoTokenizer.from_pretrained(src)
        save(model, dst, format=args.format, tokenizer=tokenizer, overwrite=args.overwrite,
             extra={"source": str(src)})
        line = f"{src} -> {dst}"
        if args.format == "onnx":
            check = json.loads((dst / MANIFEST).read_text())["onnx"]["check"]
            line += f" (ONNX Runtime vs PyTorch: max abs diff {check['max_abs_diff']:.2e})"
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
