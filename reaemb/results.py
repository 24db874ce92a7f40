"""The results table every later notebook and the README read:
``papermill_runs/<run>/results/metrics.csv`` in long form, one row per

    dataset, backbone, variant, seed, protocol, group, metric, value

Rows are added with :func:`append_metrics` (read, replace rows with the same key, write to a
temporary file and rename: a rerun never duplicates a row and an interruption never leaves a
half-written table). :func:`completed` tells a notebook which evaluations it may skip;
:func:`summary` gives mean ± std over seeds and :func:`to_markdown` renders it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from .io import atomic_write_text

__all__ = [
    "COLUMNS",
    "KEY",
    "read_metrics",
    "append_metrics",
    "completed",
    "drop_metrics",
    "summary",
    "pivot_summary",
    "to_markdown",
]

COLUMNS = ["dataset", "backbone", "variant", "seed", "protocol", "group", "metric", "value"]
KEY = COLUMNS[:-1]
RUN_KEY = ["dataset", "backbone", "variant", "seed"]


def _csv_path(target) -> Path:
    """A metrics.csv path from a path or a :class:`reaemb.runs.RunDir`."""
    return Path(target.metrics_csv) if hasattr(target, "metrics_csv") else Path(target)


def read_metrics(target) -> pd.DataFrame:
    """The metrics table (empty with the right columns when there is none yet)."""
    path = _csv_path(target)
    if not path.exists():
        return pd.DataFrame({c: pd.Series(dtype="float64" if c == "value" else ("int64" if c == "seed" else "object"))
                             for c in COLUMNS})
    df = pd.read_csv(path, dtype={"dataset": str, "backbone": str, "variant": str, "protocol": str,
                                  "group": str, "metric": str})
    missing = set(COLUMNS) - set(df.columns)
    if missing:
        raise ValueError(f"{path} lacks column(s) {sorted(missing)}")
    return df[COLUMNS]


def append_metrics(target, rows: pd.DataFrame) -> Path:
    """Add ``rows`` (columns :data:`COLUMNS`) to the table; rows with the same key
    (everything but ``value``) replace the old ones."""
    missing = set(COLUMNS) - set(rows.columns)
    if missing:
        raise ValueError(f"rows lack column(s) {sorted(missing)}")
    rows = rows[COLUMNS].copy()
    rows["seed"] = rows["seed"].astype(np.int64)
    if rows.duplicated(KEY).any():
        raise ValueError("rows repeat a (dataset, backbone, variant, seed, protocol, group, metric) key")
    path = _csv_path(target)
    old = read_metrics(path)
    if len(old):
        merged = old.merge(rows[KEY], on=KEY, how="left", indicator=True)
        old = old[(merged["_merge"] == "left_only").to_numpy()]
        table = pd.concat([old, rows], ignore_index=True)
    else:
        table = rows
    atomic_write_text(path, table.to_csv(index=False))
    return path


def completed(target, dataset: str, backbone: str, variant: str, seed: int,
              protocols: tuple[str, ...] = ("sampled100", "full")) -> bool:
    """Whether the table holds this evaluation for every protocol in ``protocols``."""
    df = read_metrics(target)
    hit = df[(df["dataset"] == dataset) & (df["backbone"] == backbone) & (df["variant"] == variant)
             & (df["seed"] == int(seed))]
    return set(protocols) <= set(hit["protocol"])


def drop_metrics(target, dataset: str, variant: str) -> int:
    """Remove every row of ``dataset`` / ``variant`` (all backbones and seeds); returns how
    many rows were removed."""
    path = _csv_path(target)
    df = read_metrics(path)
    hit = (df["dataset"] == dataset) & (df["variant"] == variant)
    if hit.any():
        atomic_write_text(path, df[~hit].to_csv(index=False))
    return int(hit.sum())


def summary(df: pd.DataFrame, metrics: list[str] | None = None, digits: int = 4) -> pd.DataFrame:
    """Mean and sample standard deviation over seeds per dataset / backbone / variant /
    protocol / group / metric, with ``n_seeds`` and a ``mean ± std`` string (std 0 for a
    single seed)."""
    if metrics is not None:
        df = df[df["metric"].isin(metrics)]
    keys = ["dataset", "backbone", "variant", "protocol", "group", "metric"]
    g = df.groupby(keys, sort=False)["value"]
    out = g.agg(mean="mean", std=lambda v: float(np.std(v, ddof=1)) if len(v) > 1 else 0.0, n_seeds="count").reset_index()
    out["mean ± std"] = [f"{m:.{digits}f} ± {s:.{digits}f}" for m, s in zip(out["mean"], out["std"])]
    return out


def pivot_summary(summ: pd.DataFrame, metrics: list[str] | None = None, groups: list[str] | None = None,
                  columns: tuple[str, ...] = ("metric",)) -> pd.DataFrame:
    """The summary as a table of ``mean ± std`` cells: one column per value of ``columns``
    (default: per metric), one row per remaining key (dataset, backbone, variant, protocol,
    group), in the paper's order of backbones and variants."""
    from .embeddings import VARIANT_ORDER

    if metrics is not None:
        summ = summ[summ["metric"].isin(metrics)]
    if groups is not None:
        summ = summ[summ["group"].isin(groups)]
    index = [k for k in ("dataset", "backbone", "variant", "protocol", "group", "metric") if k not in columns]
    table = summ.pivot_table(index=index, columns=list(columns), values="mean ± std", aggfunc="first", sort=False)
    rank = {
        "backbone": {b: i for i, b in enumerate(("sasrec", "gru4rec", "bert4rec"))},
        "variant": {v: i for i, v in enumerate(VARIANT_ORDER)},
        "protocol": {"sampled100": 0, "full": 1},
        "group": {g: i for i, g in enumerate(("all", "tail_items", "head_items", "tail_users", "head_users"))},
    }

    def key(row: tuple) -> tuple:
        out = []
        for name, value in zip(index, row):
            base = str(value).split("+")[0] if name == "variant" else value
            out += [rank.get(name, {}).get(base, 99), str(value)]
        return tuple(out)

    table = table.loc[sorted(table.index, key=key)]
    if list(columns) == ["metric"]:
        order = sorted(table.columns, key=lambda m: (m.split("@")[0] != "HR", int(m.split("@")[1]) if "@" in m else 0))
        table = table[order]
    return table


def to_markdown(table: pd.DataFrame) -> str:
    """A GitHub Markdown table of a (possibly multi-indexed) DataFrame."""
    flat = table.reset_index() if not isinstance(table.index, pd.RangeIndex) else table
    headers = [" ".join(str(p) for p in c) if isinstance(c, tuple) else str(c) for c in flat.columns]
    headers = [h.strip() for h in headers]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for row in flat.itertuples(index=False):
        lines.append("| " + " | ".join("" if (isinstance(v, float) and np.isnan(v)) else str(v) for v in row) + " |")
    return "\n".join(lines) + "\n"
