"""Long-tail tables and paired comparisons over a hand-made metrics table."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from reaemb.longtail import group_table, load_metrics, paired_comparison, tail_degradation


def _rows(variant, seed, values, backbone="SASRec"):
    return [{"dataset": "toy", "backbone": backbone, "variant": variant, "seed": seed, "protocol": "full",
             "group": g, "metric": "NDCG@10", "value": v} for g, v in values.items()]


def _table():
    rows = []
    rows += _rows("id", 0, {"all": 0.10, "head_items": 0.20, "tail_items": 0.05})
    rows += _rows("id", 1, {"all": 0.12, "head_items": 0.22, "tail_items": 0.07})
    rows += _rows("crrl", 0, {"all": 0.14, "head_items": 0.20, "tail_items": 0.10})
    rows += _rows("crrl", 1, {"all": 0.16, "head_items": 0.24, "tail_items": 0.12})
    return pd.DataFrame(rows)


def test_group_table_mean_std_and_order():
    t = group_table(_table())
    assert t["variant"].tolist() == ["id", "crrl"]  # the paper's order, not alphabetical
    idr = t.iloc[0]
    assert idr["all mean"] == pytest.approx(0.11)
    assert idr["all std"] == pytest.approx(math.sqrt(2 * 0.01**2))  # ddof 1 over two seeds
    assert idr["seeds"] == 2
    one = group_table(_table().query("seed == 0")).iloc[0]
    assert one["seeds"] == 1 and one["all mean"] == pytest.approx(0.10) and math.isnan(one["all std"])
    with pytest.raises(ValueError, match="no rows"):
        group_table(_table(), protocol="sampled100")


def test_tail_degradation_by_hand():
    d = tail_degradation(_table()).set_index("variant")
    assert d.loc["id", "item_gap"] == pytest.approx(0.21 - 0.06)
    assert d.loc["crrl", "item_gap"] == pytest.approx(0.22 - 0.11)
    assert d.loc["crrl", "item_gap_rel"] == pytest.approx(0.11 / 0.22)
    assert "user_gap" not in d.columns  # no user groups in this table


def test_paired_comparison_by_hand():
    rows = []
    for seed, (a, b) in enumerate([(0.2, 0.1), (0.4, 0.2), (0.6, 0.3)]):
        rows += _rows("crrl", seed, {"all": a})
        rows += _rows("scft", seed, {"all": b})
    out = paired_comparison(pd.DataFrame(rows)).iloc[0]
    assert out["baseline"] == "scft" and out["pairs"] == 3 and out["wins"] == 3
    assert out["mean_diff"] == pytest.approx(0.2)
    # diffs 0.1, 0.2, 0.3: t = 0.2 / (0.1 / sqrt 3), 2 dof; Student-t cdf for 2 dof in closed form
    t = 0.2 / (0.1 / math.sqrt(3))
    p = 2 * (1 - (0.5 + t / (2 * math.sqrt(2 + t * t))))
    assert out["t_test_p"] == pytest.approx(p, rel=1e-6)


def test_load_metrics_checks(tmp_path):
    with pytest.raises(FileNotFoundError, match="notebook 04"):
        load_metrics(tmp_path)
    _table().drop(columns="seed").to_csv(tmp_path / "metrics.csv", index=False)
    with pytest.raises(ValueError, match="seed"):
        load_metrics(tmp_path)
    df = pd.concat([_table(), _table().assign(value=1.0)])  # a re-run: the last value wins
    df.to_csv(tmp_path / "metrics.csv", index=False)
    assert load_metrics(tmp_path)["value"].eq(1.0).all()


def test_results_page_names_missing_datasets_and_formats_mean_std(tmp_path):
    from reaemb.report import write_results

    (tmp_path / "toy" / "results").mkdir(parents=True)
    _table().to_csv(tmp_path / "toy" / "results" / "metrics.csv", index=False)
    (tmp_path / "yelp.yaml").write_text("run: yelp\ndataset: yelp\nnote: >\n  LLM stages not run:\n  too slow on CPU.\n")
    (tmp_path / "toy.yaml").write_text("run: toy\ndataset: toy\nnote: ID models only.\n")
    text = write_results(tmp_path).read_text()
    assert "**Missing: ml-100k** — no metrics. The run was not executed" in text
    assert "**Missing: yelp** — no metrics. LLM stages not run: too slow on CPU." in text
    assert "**Scope of this run:** ID models only." in text
    assert "## toy" in text and "0.1100 ± 0.0141" in text  # id: mean 0.11, std sqrt(2)·0.01
    assert "LRCL+CRRL vs each variant" in text
