"""Atomic writes: the target holds the old content or the new, never a part, and no stray files."""
import pytest
import torch

from capkit._io import atomic_torch_save, atomic_write, atomic_write_text


def test_atomic_write_text_replaces_whole(tmp_path):
    path = tmp_path / "report.json"
    atomic_write_text(path, "old")
    atomic_write_text(path, "new")
    assert path.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["report.json"]


def test_failed_write_keeps_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "report.json"
    path.write_text("old")

    def half_then_fail(tmp):
        tmp.write_text("ne")
        raise KeyboardInterrupt  # Ctrl-C in the middle of writing

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, half_then_fail)
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["report.json"]


def test_atomic_torch_save_round_trip(tmp_path):
    state = {"step": 3, "w": torch.randn(4, 5)}
    atomic_torch_save(state, tmp_path / "checkpoint.pt")
    back = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert back["step"] == 3 and torch.equal(back["w"], state["w"])
