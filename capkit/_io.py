"""Files written whole or not at all: a temporary file next to the target, flushed to disk,
then renamed over it, so a crash or Ctrl-C never leaves a half-written checkpoint, report or
result file behind (a reader sees the old file or the new one)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Union

PathLike = Union[str, "os.PathLike[str]"]


def atomic_write(path: PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` to fill a temporary file beside ``path``, then move it into place."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def atomic_write_text(path: PathLike, text: str) -> Path:
    """``Path(path).write_text(text)``, atomically."""
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def atomic_torch_save(obj, path: PathLike) -> Path:
    """``torch.save(obj, path)``, atomically."""
    import torch

    return atomic_write(path, lambda tmp: torch.save(obj, tmp))
