"""Outputs of a task or benchmark: JSON, text, h5ad, markdown tables (figures: :mod:`.figures`).
Every file is written to a temporary name and renamed into place."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from data_modules.atomic import atomic_path, write_json_atomic, write_text_atomic


def write_json(obj, path) -> Path:
    return write_json_atomic(path, obj, indent=2)


def write_text(text: str, path) -> Path:
    return write_text_atomic(path, text)


def write_h5ad(adata, path) -> Path:
    with atomic_path(path, ".h5ad") as tmp:
        adata.write_h5ad(tmp)
    return Path(path)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    def fmt(v):
        return f"{v:.3f}" if isinstance(v, float) else ("-" if v is None else str(v))

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def mean_std(values: Sequence[float]) -> str:
    """ "0.812 ± 0.010" (sample std; just the mean for one value)."""
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], dtype=np.float64)
    if len(v) == 0:
        return "-"
    return f"{v.mean():.3f}" if len(v) == 1 else f"{v.mean():.3f} ± {v.std(ddof=1):.3f}"
