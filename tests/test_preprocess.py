"""Preprocessing steps against results worked out by hand on toy logs."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from reaemb.data import (
    DataError,
    chronological_sequences,
    cooccurrence_counts,
    filter_rating,
    kcore,
    leave_one_out,
    remap_ids,
    share_threshold,
)


def log(rows: list[tuple[str, str]], ts: list[float] | None = None) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "user": [u for u, _ in rows],
            "item": [i for _, i in rows],
            "timestamp": ts if ts is not None else list(range(len(rows))),
            "rating": [5.0] * len(rows),
        }
    )


def test_kcore_is_iterative():
    # users >= 3, items >= 2. Pass 1 drops u3 (2 rows) and items e, f (1 row each); that
    # leaves u4 with only d, and d with one row: pass 2 drops both. A single pass keeps them.
    rows = [("u1", "a"), ("u1", "b"), ("u1", "c"), ("u2", "a"), ("u2", "b"), ("u2", "c"),
            ("u3", "a"), ("u3", "d"), ("u4", "d"), ("u4", "e"), ("u4", "f")]
    out = kcore(log(rows), user_core=3, item_core=2)
    assert sorted(zip(out["user"], out["item"])) == sorted(rows[:6])


def test_kcore_result_satisfies_both_thresholds_and_counts_repeats():
    rows = [("u1", "a")] * 3 + [("u2", "a"), ("u2", "b"), ("u2", "b")]
    out = kcore(log(rows), user_core=3, item_core=2)
    # u1 has 3 rows (repeats count), u2 has 3; a has 4, b has 2: nothing removed.
    assert len(out) == 6
    out = kcore(log(rows), user_core=3, item_core=3)
    # b (2 rows) goes, then u2 has 1 row and goes; a keeps 3 rows from u1.
    assert list(zip(out["user"], out["item"])) == [("u1", "a")] * 3


def test_kcore_can_empty_and_rejects_bad_thresholds():
    assert kcore(log([("u", "a")]), 5, 3).empty
    with pytest.raises(ValueError):
        kcore(log([("u", "a")]), 0, 3)


def test_rating_filter():
    df = log([("u", "a"), ("u", "b")])
    df["rating"] = [3.0, 4.0]
    assert list(filter_rating(df, 4)["item"]) == ["b"]
    assert len(filter_rating(df, None)) == 2
    df["rating"] = np.nan
    with pytest.raises(DataError, match="no ratings"):
        filter_rating(df, 4)


def test_remap_reserves_zero_and_orders_numerically():
    codes, vocab = remap_ids(np.array(["10", "9", "10", "100"]), start=1)
    assert list(vocab) == ["9", "10", "100"]  # numeric, not lexicographic
    assert list(codes) == [2, 1, 2, 3]
    codes, vocab = remap_ids(np.array(["b", "a"]), start=0)
    assert list(vocab) == ["a", "b"] and list(codes) == [1, 0]


def test_chronological_order_breaks_ties_by_file_order():
    users = np.array([1, 0, 0, 0, 1])
    items = np.array([7, 3, 1, 2, 8])
    ts = np.array([5.0, 5.0, 5.0, 1.0, 5.0])
    offsets, flat = chronological_sequences(users, items, ts, n_users=2)
    assert list(offsets) == [0, 3, 5]
    # user 0: item 2 (t=1), then items 3 and 1 tie at t=5 and keep file order
    assert list(flat[:3]) == [2, 3, 1]
    assert list(flat[3:]) == [7, 8]


def test_leave_one_out_positions():
    offsets = np.array([0, 5, 8])
    split = leave_one_out(offsets)
    assert list(split["train_end"]) == [3, 6]
    assert list(split["valid_pos"]) == [3, 6]
    assert list(split["test_pos"]) == [4, 7]
    with pytest.raises(DataError, match=">= 3"):
        leave_one_out(np.array([0, 2]))


def test_cooccurrence_counts_training_part_only():
    # user 0: 1 2 3 | valid 4 | test 5 ; user 1: 2 3 2 | valid 6 | test 1
    flat = np.array([1, 2, 3, 4, 5, 2, 3, 2, 6, 1])
    offsets = np.array([0, 5, 10])
    c = cooccurrence_counts(offsets, flat, leave_one_out(offsets)["train_end"], n_items=6)
    expected = np.zeros((7, 7), dtype=int)
    for i, j, n in [(1, 2, 1), (1, 3, 1), (2, 3, 2)]:
        expected[i, j] = expected[j, i] = n
    np.testing.assert_array_equal(c.toarray(), expected)
    # a count over full sequences would give C[1,2] = 2 and non-empty rows 4, 5, 6
    assert c[1, 2] == 1 and c[4].nnz == 0 and c[6].nnz == 0


def test_share_threshold_by_hand():
    values = np.array([1, 1, 2, 3, 10])
    assert share_threshold(values, 0.8) == (10, 0.8)  # 4 of 5 values are < 10
    assert share_threshold(values, 0.5) == (2, 0.4)  # 0.4 and 0.6 tie: smaller threshold
    assert share_threshold(np.array([4, 4, 4]), 0.8) == (5, 1.0)
    with pytest.raises(ValueError):
        share_threshold(values, 1.0)
