"""Gather the ``result.json`` rows of a sweep (one per job) into one table."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd

from data_modules.atomic import write_text_atomic


def _override_items(overrides: list[str]) -> dict[str, str]:
    items = {}
    for o in overrides:
        key, sep, value = o.partition("=")
        if sep and not key.startswith("hydra"):
            items[key.lstrip("+~")] = value
    return items


def collect_sweep(sweep_dir: str | os.PathLike, metrics: list[str] | None = None) -> pd.DataFrame:
    """One row per job under ``sweep_dir``: its overrides, steps, cells/s and metrics (all, or ``metrics``)."""
    sweep_dir = Path(sweep_dir)
    paths = sorted(sweep_dir.rglob("result.json"))
    if not paths:
        raise FileNotFoundError(
            f"no result.json under {sweep_dir}: is it a sweep dir (outputs/<task>/multiruns/<time>)?"
        )
    results = [json.loads(p.read_text()) for p in paths]
    overrides = [_override_items(r.get("overrides", [])) for r in results]
    # keep the overrides that vary between jobs: those are the sweep's axes
    keys = list(dict.fromkeys(k for o in overrides for k in o))
    if len(results) > 1:
        keys = [k for k in keys if len({o.get(k) for o in overrides}) > 1]
    rows = []
    for path, result, items in zip(paths, results, overrides, strict=True):
        row = {"job": str(path.parent.relative_to(sweep_dir))}
        row.update({k: items.get(k) for k in keys})
        row["steps"] = result.get("steps")
        row["cells_per_s"] = result.get("cells_per_s")
        for name, value in sorted(result.get("metrics", {}).items()):
            if metrics is None or name in metrics:
                row[name] = value
        rows.append(row)
    return pd.DataFrame(rows)


def write_sweep_tables(table: pd.DataFrame, out_prefix: str | os.PathLike) -> tuple[Path, Path]:
    """``<prefix>.csv`` and ``<prefix>.md`` (written atomically)."""
    out_prefix = Path(out_prefix)
    out_prefix.parent.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = out_prefix.with_suffix(".csv"), out_prefix.with_suffix(".md")
    write_text_atomic(csv_path, table.to_csv(index=False))
    write_text_atomic(md_path, to_markdown(table))
    return csv_path, md_path


def to_markdown(table: pd.DataFrame) -> str:
    def fmt(v) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return "" if v is None else str(v)

    cols = list(table.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines) + "\n"
