"""capkit.export.save / capkit.load round trips of every format, and bad checkpoints."""
import json

import pytest
import torch
import transformers

import capkit
from capkit.export import CheckpointError, load, save
from capkit.nn import MaskedLinear, masked_modules, patch_model
from capkit.ops import BlockMask, NMMask
from capkit.pruning import Pruner, sparsity_report

from _models import tiny_bert, token_batch


def _masked(kind):
    model = tiny_bert(hidden_size=32, intermediate_size=64)
    patch_model(model)
    g = torch.Generator().manual_seed(3)
    for m in masked_modules(model).values():
        shape = tuple(m.weight.shape)
        if kind == "unstructured":
            m.set_mask(torch.rand(shape, generator=g) > 0.8)
        elif kind == "block":
            grid = torch.rand(shape[0] // 16, shape[1] // 16, generator=g) > 0.5
            m.set_mask(BlockMask.from_block_grid(grid, 16, shape))
        elif kind == "nm":
            m.set_mask(NMMask.from_scores(torch.randn(shape, generator=g)))
    return model


def _out(model, batch):
    with torch.no_grad():
        return model(**batch).logits


@pytest.mark.parametrize("kind", ["unstructured", "block", "nm"])
@pytest.mark.parametrize("fmt", ["dense", "sparse"])
def test_round_trip_keeps_outputs_and_masks(tmp_path, kind, fmt):
    model = _masked(kind)
    batch = token_batch(model.config)
    expect = _out(model, batch)
    save(model, tmp_path / "ckpt", format=fmt)
    loaded = capkit.load(tmp_path / "ckpt")
    torch.testing.assert_close(_out(loaded, batch), expect, atol=1e-5, rtol=1e-5)
    for name, m in masked_modules(loaded).items():
        orig = masked_modules(model)[name]
        assert isinstance(m, MaskedLinear)
        want = orig.current_mask()
        got = m.current_mask()
        assert type(got) is type(want)
        dense = lambda x: (x.to_dense() if hasattr(x, "to_dense") else x).bool()
        assert torch.equal(dense(got), dense(want))
    assert sparsity_report(loaded).sparsity == pytest.approx(sparsity_report(model).sparsity)


def test_sparse_format_is_smaller_than_dense(tmp_path):
    model = _masked("unstructured")
    save(model, tmp_path / "d", format="dense")
    save(model, tmp_path / "s", format="sparse")
    enc = lambda p: sum(f.stat().st_size for f in p.iterdir() if f.suffix == ".safetensors")
    assert enc(tmp_path / "s") < enc(tmp_path / "d")


def test_dense_checkpoint_loads_without_capkit(tmp_path):
    model = _masked("unstructured")
    batch = token_batch(model.config)
    expect = _out(model, batch)
    save(model, tmp_path / "d", format="dense")
    plain = transformers.BertForSequenceClassification.from_pretrained(tmp_path / "d").eval()
    assert not masked_modules(plain)
    torch.testing.assert_close(_out(plain, batch), expect, atol=1e-5, rtol=1e-5)


def test_compact_round_trip(tmp_path):
    from capkit.pruning import StructuredMasks, compact_model

    model = tiny_bert()
    batch = token_batch(model.config)
    masks = StructuredMasks.ones(model)
    # drop head 1 of layer 0 and 10 neurons of layer 2
    masks.head_masks[0][1] = 0.0
    masks.neuron_masks[2][:10] = 0.0
    with masks.attach(model):
        expect = _out(model, batch)
    compact_model(model, masks)
    torch.testing.assert_close(_out(model, batch), expect, atol=1e-5, rtol=1e-5)
    save(model, tmp_path / "c", format="compact")
    loaded = load(tmp_path / "c")
    torch.testing.assert_close(_out(loaded, batch), expect, atol=1e-5, rtol=1e-5)
    assert sum(p.numel() for p in loaded.parameters()) == sum(p.numel() for p in model.parameters())
    assert loaded.bert.encoder.layer[0].attention.self.query.out_features == 3 * 6
    assert loaded.bert.encoder.layer[2].intermediate.dense.out_features == 27


def test_pruner_output_round_trips(tmp_path):
    model = tiny_bert(hidden_size=32, intermediate_size=64)
    p = Pruner(model, "block-movement", block_size=16, keep=0.5)
    with torch.no_grad():
        for s in p.score_parameters():
            s.normal_()
    p.finalize()
    batch = token_batch(model.config)
    save(model, tmp_path / "s", format="sparse")
    loaded = load(tmp_path / "s")
    torch.testing.assert_close(_out(loaded, batch), _out(model, batch), atol=1e-5, rtol=1e-5)
    assert all(isinstance(m.current_mask(), BlockMask) for m in masked_modules(loaded).values())


def test_atomic_save_and_overwrite(tmp_path, monkeypatch):
    model = _masked("unstructured")
    target = tmp_path / "ckpt"
    save(model, target, format="sparse")
    before = sorted(p.name for p in target.iterdir())
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save(model, target, format="dense")
    # a failure half-way leaves the old checkpoint intact and no temporary folder behind
    import capkit.export as ex

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(ex, "_encode", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        save(model, target, format="sparse", overwrite=True)
    assert sorted(p.name for p in target.iterdir()) == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]
    monkeypatch.undo()
    save(model, target, format="dense", overwrite=True)
    assert json.loads((target / "capkit.json").read_text())["format"] == "dense"


def test_bad_checkpoints(tmp_path):
    model = _masked("unstructured")
    save(model, tmp_path / "s", format="sparse")
    with open(tmp_path / "s" / "sparse.safetensors", "r+b") as fh:
        fh.seek(200)
        fh.write(b"\x00garbage\x00")
    with pytest.raises(CheckpointError, match="damaged"):
        load(tmp_path / "s")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load(tmp_path / "nothing")
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "weights.bin").write_bytes(b"abc")
    with pytest.raises(CheckpointError, match="no config.json"):
        load(tmp_path / "foreign")
    save(model, tmp_path / "m", format="dense")
    (tmp_path / "m" / "capkit.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load(tmp_path / "m")
    with pytest.raises(ValueError, match="format must be one of"):
        save(model, tmp_path / "x", format="bogus")
    with pytest.raises(TypeError, match="PreTrainedModel"):
        save(torch.nn.Linear(2, 2), tmp_path / "y")


def test_plain_transformers_folder_loads(tmp_path):
    model = tiny_bert()
    model.save_pretrained(tmp_path / "hf")
    loaded = load(tmp_path / "hf")
    batch = token_batch(model.config)
    torch.testing.assert_close(_out(loaded, batch), _out(model, batch))


# ---------------------------------------------------------------------------------------------
# ONNX: the file loads in ONNX Runtime and gives the PyTorch model's logits
# ---------------------------------------------------------------------------------------------
def _onnx_or_skip():
    from capkit.onnx_export import onnx_missing_reason

    reason = onnx_missing_reason()
    if reason is not None:
        pytest.skip(f"ONNX export tests need onnx and onnxruntime: {reason}")


def _onnx_logits(folder, batch):
    from capkit.onnx_export import ort_session, run_onnx

    return run_onnx(ort_session(folder / "model.onnx", threads=1), batch)


def _compact_model():
    from capkit.pruning import StructuredMasks, compact_model

    model = tiny_bert()
    masks = StructuredMasks.ones(model)
    masks.head_masks[0][1] = 0.0
    masks.neuron_masks[2][:10] = 0.0
    compact_model(model, masks)
    return model


@pytest.mark.parametrize("source", ["dense-unstructured", "dense-block", "compact"])
def test_onnx_export_matches_pytorch_in_onnxruntime(tmp_path, source):
    _onnx_or_skip()
    model = _compact_model() if source == "compact" else _masked(source.split("-")[1])
    path = save(model, tmp_path / "o", format="onnx")
    manifest = json.loads((path / "capkit.json").read_text())
    assert manifest["format"] == "onnx" and set(manifest["files"]) >= {"model.onnx", "config.json"}
    assert manifest["onnx"]["check"]["max_abs_diff"] < 1e-4
    for b, s in ((1, 5), (4, 13)):  # dynamic batch and sequence axes, padding included
        batch = token_batch(model.config, batch=b, seq=s, seed=b)
        batch["token_type_ids"] = torch.zeros_like(batch["input_ids"])
        diff = (_onnx_logits(path, batch) - _out(model, batch)).abs().max().item()
        assert diff < 1e-4, f"max abs diff {diff:.2e} between ONNX Runtime and PyTorch"
    with pytest.raises(CheckpointError, match="ONNX export"):
        load(path)


def test_capkit_export_command_converts_a_run_folder(tmp_path, capsys):
    _onnx_or_skip()
    from capkit.export import main

    model = _masked("unstructured")
    save(model, tmp_path / "run" / "model-dense", format="dense")
    save(model, tmp_path / "run" / "model-sparse", format="sparse")
    assert main([str(tmp_path / "run"), "--format", "onnx"]) == 0
    batch = token_batch(model.config)
    batch["token_type_ids"] = torch.zeros_like(batch["input_ids"])
    for name in ("model-dense-onnx", "model-sparse-onnx"):
        diff = (_onnx_logits(tmp_path / "run" / name, batch) - _out(model, batch)).abs().max().item()
        assert diff < 1e-4
    assert "max abs diff" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main([str(tmp_path / "nothing-here")])
