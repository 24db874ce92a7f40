"""The metric implementation on hand-made score matrices (ties included), the sampled
negatives, the groups, and the long results table."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import write_inter_json
from reaemb.data import DataConfig, prepare
from reaemb.evaluation import (
    EvalSet,
    build_eval_set,
    compute_ranks,
    metrics_table,
    rank_metrics,
    sample_negatives_for_user,
    target_rank,
)
from reaemb.results import (
    append_metrics,
    completed,
    pivot_summary,
    read_metrics,
    summary,
    to_markdown,
)


def test_target_rank_counts_ties_pessimistically():
    scores = torch.tensor([[0.9, 0.5, 0.5, 0.1],
                           [0.9, 0.5, 0.5, 0.1],
                           [0.9, 0.5, 0.5, 0.1],
                           [1.0, 1.0, 1.0, 1.0]])
    target = torch.tensor([0, 1, 3, 2])
    # row 0: nothing above 0.9; row 1: 0.9 above and the tied 0.5 counts as ahead;
    # row 2: everything ahead; row 3: all tied, so the target is last
    assert target_rank(scores, target).tolist() == [0, 2, 3, 3]
    valid = torch.tensor([[True, True, True, True], [False, True, True, True],
                          [True, True, False, True], [True, True, True, False]])
    assert target_rank(scores, target, valid).tolist() == [0, 1, 2, 2]
    with pytest.raises(ValueError, match="NaN"):
        target_rank(torch.tensor([[float("nan"), 1.0]]), torch.tensor([1]))
    with pytest.raises(ValueError):
        target_rank(scores, torch.tensor([0, 1]))


def test_hr_and_ndcg_by_hand():
    hr, ndcg = rank_metrics(np.array([0, 1, 4, 5, 9, 10]), 5)
    assert hr.tolist() == [1, 1, 1, 0, 0, 0]
    assert ndcg == pytest.approx([1.0, 1 / math.log2(3), 1 / math.log2(6), 0, 0, 0])
    hr10, ndcg10 = rank_metrics(np.array([9, 10]), 10)
    assert hr10.tolist() == [1, 0] and ndcg10 == pytest.approx([1 / math.log2(11), 0])


class FixedScores(torch.nn.Module):
    """A 'model' returning a fixed score matrix for users in order."""

    def __init__(self, scores: torch.Tensor):
        super().__init__()
        self.scores = scores
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.cursor = 0

    def score_all(self, seq: torch.Tensor) -> torch.Tensor:
        out = self.scores[self.cursor : self.cursor + len(seq)].clone()
        self.cursor += len(seq)
        return out


def _eval_set(histories, targets, negatives, groups=None) -> EvalSet:
    ptr = np.cumsum([0] + [len(h) for h in histories])
    n = len(targets)
    return EvalSet(
        split="test",
        histories=torch.zeros(n, 3, dtype=torch.int64),
        targets=torch.tensor(targets),
        negatives=torch.tensor(negatives),
        history_ptr=torch.tensor(ptr),
        history_items=torch.tensor([i for h in histories for i in h], dtype=torch.int64),
        groups=groups or {"all": np.ones(n, dtype=bool)},
    )


def test_compute_ranks_both_protocols_and_history_mask():
    # 6 items (columns 1..6), column 0 is padding and must never count
    scores = torch.tensor([
        [9.0, 0.1, 0.5, 0.9, 0.3, 0.7, 0.2],   # user 0: target 2 (0.5); above it: 4 (0.9), 5 (0.7)
        [9.0, 0.6, 0.6, 0.1, 0.2, 0.3, 0.9],   # user 1: target 1 (0.6) tied with item 2; item 6 above
    ])
    es = _eval_set(histories=[[3, 5], [6]], targets=[2, 1], negatives=[[1, 4, 0], [3, 4, 5]])
    ranks = compute_ranks(FixedScores(scores), es, batch_size=1)
    # sampled: user 0 vs {1, 4} (0 = missing negative): nothing above -> 0; user 1 vs {3,4,5}: 0
    assert ranks["sampled100"].tolist() == [0, 0]
    assert ranks["full"].tolist() == [2, 2]
    masked = compute_ranks(FixedScores(scores), es, mask_history=True, batch_size=2)
    # history items 3 and 5 of user 0 and 6 of user 1 no longer count
    assert masked["full"].tolist() == [0, 1]
    assert masked["sampled100"].tolist() == [0, 0]
    with pytest.raises(ValueError, match="unknown protocol"):
        compute_ranks(FixedScores(scores), es, protocols=("sampled50",))


def test_metrics_table_groups():
    ranks = {"full": np.array([0, 3, 12])}
    groups = {"all": np.array([True, True, True]), "tail_items": np.array([False, True, True])}
    t = metrics_table(ranks, groups, ks=(5,)).set_index(["group", "metric"])["value"]
    assert t[("all", "HR@5")] == pytest.approx(2 / 3)
    assert t[("tail_items", "HR@5")] == pytest.approx(1 / 2)
    assert t[("tail_items", "NDCG@5")] == pytest.approx((1 / math.log2(5)) / 2)


@pytest.fixture
def small(tmp_path):
    # 30 items, 12 users; user u sees items (u .. u + 9) mod 30; item popularity uneven
    seqs = {str(u): [str((u + j) % 30) for j in range(10 + (u % 3))] for u in range(12)}
    items = {str(i): {"title": f"item {i}"} for i in range(30)}
    write_inter_json(tmp_path / "src", "Small", seqs, items)
    return prepare(DataConfig(dataset="json:Small", data_dir=str(tmp_path / "src"), user_core=5, item_core=1),
                   tmp_path / "data")


def test_sampled_negatives_avoid_history_and_target(small):
    es = build_eval_set(small, "test", max_length=8, seed=3, n_negatives=15)
    for u in range(small.n_users):
        neg = es.negatives[u].numpy()
        neg = neg[neg > 0]
        seq = set(small.sequence(u).tolist())
        assert len(neg) == len(set(neg.tolist())) == min(15, small.n_items - len(seq))
        assert not seq & set(neg.tolist())
        assert int(es.targets[u]) in seq
    again = build_eval_set(small, "test", max_length=8, seed=3, n_negatives=15)
    assert torch.equal(es.negatives, again.negatives)
    other = build_eval_set(small, "test", max_length=8, seed=4, n_negatives=15)
    assert not torch.equal(es.negatives, other.negatives)
    # a complement smaller than asked: all of it, once each
    seq = np.arange(1, 28)
    neg = sample_negatives_for_user(seq, 30, seed=0, user=0, split="test", n=100)
    assert sorted(neg.tolist()) == [28, 29, 30]
    # large complements go through rejection sampling: still distinct and outside the sequence
    neg = sample_negatives_for_user(np.array([5, 6]), 10_000, seed=0, user=1, split="valid", n=100)
    assert len(set(neg.tolist())) == 100 and not {5, 6} & set(neg.tolist())


def test_eval_set_histories_and_groups(small):
    es = build_eval_set(small, "valid", max_length=4, seed=0)
    hist, targets = small.eval_split("valid")
    assert es.histories.shape == (small.n_users, 4)
    assert es.histories[0].tolist() == list(hist[0][-4:])
    assert es.targets.tolist() == targets.tolist()
    assert np.array_equal(es.groups["tail_items"], small.item_is_tail[targets])
    assert np.array_equal(es.groups["head_items"], ~small.item_is_tail[targets])
    assert np.array_equal(es.groups["tail_users"], small.user_is_tail)
    assert np.array_equal(es.groups["tail_users"] | es.groups["head_users"], np.ones(small.n_users, bool))
    lo, hi = es.history_ptr[2], es.history_ptr[3]
    assert es.history_items[lo:hi].tolist() == list(hist[2])


def _rows(seed: int, value: float, variant: str = "id") -> pd.DataFrame:
    return pd.DataFrame({"dataset": "toy", "backbone": "sasrec", "variant": variant, "seed": seed,
                         "protocol": ["full", "sampled100"], "group": "all", "metric": "NDCG@10",
                         "value": [value, value + 0.5]})


def test_results_append_replace_completed_summary(tmp_path):
    path = tmp_path / "results" / "metrics.csv"
    assert read_metrics(path).empty
    append_metrics(path, _rows(0, 0.1))
    append_metrics(path, _rows(1, 0.3))
    append_metrics(path, _rows(1, 0.2))  # replaces seed 1, no duplicate rows
    df = read_metrics(path)
    assert len(df) == 4 and list(df.columns) == ["dataset", "backbone", "variant", "seed", "protocol",
                                                 "group", "metric", "value"]
    assert completed(path, "toy", "sasrec", "id", 1)
    assert not completed(path, "toy", "sasrec", "id", 2)
    assert not completed(path, "toy", "gru4rec", "id", 0)
    s = summary(df).set_index("protocol")
    assert s.loc["full", "mean"] == pytest.approx(0.15)
    assert s.loc["full", "std"] == pytest.approx(np.std([0.1, 0.2], ddof=1))
    assert s.loc["full", "n_seeds"] == 2
    assert s.loc["full", "mean ± std"] == "0.1500 ± 0.0707"
    md = to_markdown(pivot_summary(summary(df)))
    assert md.splitlines()[0] == "| dataset | backbone | variant | protocol | group | NDCG@10 |"
    assert md.splitlines()[2] == "| toy | sasrec | id | sampled100 | all | 0.6500 ± 0.0707 |"
    wide = pivot_summary(summary(df), columns=("protocol", "metric"))
    assert list(wide.columns) == [("full", "NDCG@10"), ("sampled100", "NDCG@10")]
    with pytest.raises(ValueError, match="lack"):
        append_metrics(path, _rows(0, 0.1).drop(columns="value"))
    with pytest.raises(ValueError, match="repeat"):
        append_metrics(path, pd.concat([_rows(0, 0.1), _rows(0, 0.2)]))
