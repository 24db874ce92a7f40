"""Long-tail analysis and method comparisons over ``results/metrics.csv`` (METHOD.md §5–6).

Every evaluation appends long-form rows ``dataset, backbone, variant, seed, protocol, group,
metric, value`` to ``<run>/results/metrics.csv``; this module only reads that table:

* :func:`group_table` — mean ± std over seeds per backbone × variant × group;
* :func:`tail_degradation` — head minus tail (items and users), absolute and relative: the
  gap that LRCL is claimed to shrink;
* :func:`paired_comparison` — a target variant against each baseline, paired over
  (backbone, seed) runs that share their seed (same sampled negatives, same data order).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from .embeddings import VARIANT_ORDER
from .results import COLUMNS, KEY, read_metrics

__all__ = [
    "COLUMNS",
    "GROUPS",
    "VARIANT_LABELS",
    "load_metrics",
    "group_table",
    "tail_degradation",
    "paired_comparison",
]

GROUPS = ["all", "head_items", "tail_items", "head_users", "tail_users"]
VARIANT_LABELS = {"id": "ID only", "inference": "LLM (inference)", "scft": "SCFT (LLMEmb)",
                  "lrcl": "LRCL", "crrl": "LRCL+CRRL",
                  "coderrec": "CoderRec"}


def load_metrics(path: str | Path) -> pd.DataFrame:
    """Read a ``metrics.csv`` (or the ``results/`` folder holding it); checks the columns.
    Repeated rows of the same key (a re-run evaluation) keep the last value."""
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.csv"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: run notebook 04 (SRS evaluation) first")
    return read_metrics(path).drop_duplicates(KEY, keep="last").reset_index(drop=True)


def _variant_sort(df: pd.DataFrame) -> pd.DataFrame:
    order = {v: i for i, v in enumerate(VARIANT_ORDER)}
    return df.assign(_o=df["variant"].map(lambda v: order.get(v, 99))).sort_values(
        ["dataset", "backbone", "_o", "variant"]).drop(columns="_o")


def group_table(df: pd.DataFrame, metric: str = "NDCG@10", protocol: str = "full") -> pd.DataFrame:
    """Rows: dataset × backbone × variant; columns: each group's ``mean`` and ``std`` over
    seeds (std with ddof 1; NaN for one seed) and the number of seeds."""
    from .results import summary

    sub = df[(df["metric"] == metric) & (df["protocol"] == protocol)]
    if sub.empty:
        raise ValueError(f"no rows for metric {metric!r} and protocol {protocol!r}")
    summ = summary(sub)  # the one mean / std (ddof 1) over seeds, as every other table
    summ["std"] = summ["std"].where(summ["n_seeds"] > 1)  # no spread from a single seed
    wide = (summ.rename(columns={"n_seeds": "count"})
            .set_index(["dataset", "backbone", "variant", "group"])[["mean", "std", "count"]].unstack("group"))
    groups = [g for g in GROUPS if g in sub["group"].unique()]
    out = pd.DataFrame(index=wide.index)
    for g in groups:
        out[f"{g} mean"] = wide[("mean", g)]
        out[f"{g} std"] = wide[("std", g)]
    out["seeds"] = wide[("count", groups[0])].astype(int)
    return _variant_sort(out.reset_index()).reset_index(drop=True)


def tail_degradation(df: pd.DataFrame, metric: str = "NDCG@10", protocol: str = "full") -> pd.DataFrame:
    """Head minus tail, per dataset × backbone × variant, averaged over seeds: ``item_gap`` =
    head items − tail items, ``item_gap_rel`` = that gap / head items, and the same for users.
    Smaller gaps mean less long-tail degradation."""
    t = group_table(df, metric, protocol)
    out = t[["dataset", "backbone", "variant"]].copy()
    for kind in ("items", "users"):
        head, tail = t.get(f"head_{kind} mean"), t.get(f"tail_{kind} mean")
        if head is None or tail is None:
            continue
        out[f"head_{kind}"] = head
        out[f"tail_{kind}"] = tail
        out[f"{kind[:-1]}_gap"] = head - tail
        out[f"{kind[:-1]}_gap_rel"] = (head - tail) / head.where(head != 0)
    return out


def paired_comparison(df: pd.DataFrame, target: str = "crrl", metric: str = "NDCG@10",
                      protocol: str = "full", group: str = "all") -> pd.DataFrame:
    """``target`` against every other variant of the same dataset, paired over the
    (backbone, seed) runs both have: mean difference (target − baseline), how many pairs the
    target wins, a paired t-test and a Wilcoxon signed-rank test (two-sided p-values; NaN
    when there are fewer than 2 pairs or all differences are 0)."""
    from scipy import stats

    sub = df[(df["metric"] == metric) & (df["protocol"] == protocol) & (df["group"] == group)]
    rows = []
    for dataset, d in sub.groupby("dataset"):
        wide = d.pivot_table(index=["backbone", "seed"], columns="variant", values="value")
        if target not in wide.columns:
            continue
        for base in [v for v in wide.columns if v != target]:
            pair = wide[[target, base]].dropna()
            diff = (pair[target] - pair[base]).to_numpy()
            n = len(diff)
            t_p = w_p = float("nan")
            if n >= 2 and np.any(diff != 0):
                t_p = float(stats.ttest_rel(pair[target], pair[base]).pvalue)
                w_p = float(stats.wilcoxon(diff).pvalue)
            rows.append({"dataset": dataset, "target": target, "baseline": base, "pairs": n,
                         "target_mean": float(pair[target].mean()) if n else float("nan"),
                         "baseline_mean": float(pair[base].mean()) if n else float("nan"),
                         "mean_diff": float(diff.mean()) if n else float("nan"),
                         "wins": int((diff > 0).sum()), "t_test_p": t_p, "wilcoxon_p": w_p})
    out = pd.DataFrame(rows)
    if out.empty:
        return out
    order = {v: i for i, v in enumerate(VARIANT_ORDER)}
    out["_o"] = out["baseline"].map(lambda v: order.get(v, 99))
    return out.sort_values(["dataset", "_o", "baseline"]).drop(columns="_o").reset_index(drop=True)
