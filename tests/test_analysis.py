"""Embedding-structure measures (notebook 06) on hand-made tables."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import scipy.sparse as sp

from reaemb.analysis import (
    category_silhouette,
    cooccurrence_cosine,
    item_categories,
    knn_cooccurrence_overlap,
)


def _dataset(n_items: int, pairs: dict[tuple[int, int], int], attributes=None):
    c = sp.lil_matrix((n_items + 1, n_items + 1), dtype=np.int64)
    for (i, j), n in pairs.items():
        c[i, j] = c[j, i] = n
    return SimpleNamespace(n_items=n_items, cooccurrence=c.tocsr(),
                           item_attributes=[{}] + (attributes or [{} for _ in range(n_items)]))


def test_knn_overlap_by_hand():
    # nearest neighbours (k=1): 1->2, 2->1, 3->4, 4->3
    table = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    # top co-occurring (k=1): 1->3 (2 users beat 1), 2->1, 3->1; item 4 co-occurs with nothing
    ds = _dataset(4, {(1, 3): 2, (1, 2): 1})
    # item 1: {2} vs {3} -> 0; item 2: {1} vs {1} -> 1; item 3: {4} vs {1} -> 0; item 4 skipped
    assert knn_cooccurrence_overlap(table, ds, k=1, center=False) == pytest.approx(1 / 3)
    # k=2: item 1: kNN {2 (0.99), 4 (0.11)}, cooc {3, 2} -> 1/2
    # item 2: kNN {1,4}; cooc {1} -> 1/min(2,1) = 1; item 3: kNN {4,2}; cooc {1} -> 0
    assert knn_cooccurrence_overlap(table, ds, k=2, center=False) == pytest.approx((0.5 + 1 + 0) / 3)


def test_centring_removes_a_shared_offset():
    # rows e1, -e1, e2, -e2 plus a shared offset (10, 10): the mean row is the offset, so the
    # centred cosine of the co-occurring pair (1, 2) is -1; raw, it is cos((11,10), (9,10)).
    base = np.array([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]])
    table = base + 10.0
    ds = _dataset(4, {(1, 2): 3})
    centred = cooccurrence_cosine(table, ds, n_pairs=1, seed=0)
    assert centred["cooc"] == pytest.approx(-1.0)
    raw = cooccurrence_cosine(table, ds, n_pairs=1, seed=0, center=False)
    assert raw["cooc"] == pytest.approx((11 * 9 + 10 * 10) / (np.hypot(11, 10) * np.hypot(9, 10)))
    assert raw["cooc"] > 0.99
    # neighbourhoods: centred, item 1's nearest other item is 3 or 4 (cosine 0), never its
    # opposite 2; the overlap with the co-occurrence graph {1: 2, 2: 1} is therefore 0
    assert knn_cooccurrence_overlap(table, ds, k=1) == pytest.approx(0.0)
    assert knn_cooccurrence_overlap(base, ds, k=1, center=False) == pytest.approx(0.0)


def test_knn_overlap_errors():
    ds = _dataset(3, {})
    with pytest.raises(ValueError, match="no item has a co-occurring"):
        knn_cooccurrence_overlap(np.eye(3), ds, k=1)
    with pytest.raises(ValueError, match="k must be"):
        knn_cooccurrence_overlap(np.eye(3), ds, k=3)
    with pytest.raises(ValueError, match="rows"):
        knn_cooccurrence_overlap(np.eye(4), ds, k=1)


def test_category_silhouette_by_hand():
    # cosine distances: d(a,b) = 0.4, d(a,c) = 1, d(b,c) = 0.2
    table = np.array([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0], [5.0, 5.0]])
    labels = np.array(["A", "A", "B", "other"], dtype=object)
    # s(a) = (1 - 0.4) / 1 = 0.6; s(b) = (0.2 - 0.4) / 0.4 = -0.5; s(c) = 0 (alone in B)
    assert category_silhouette(table, labels, center=False) == pytest.approx((0.6 - 0.5 + 0.0) / 3)
    with pytest.raises(ValueError, match="two categories"):
        category_silhouette(table, np.array(["A", "A", "other", "other"], dtype=object))


def test_item_categories_levels_top_and_other():
    attrs = [{"genres": "Drama, Comedy"}, {"genres": "Drama"}, {"genres": "Comedy, Action"},
             {"title": "no genre"}, {"genres": "Horror"}]
    ds = _dataset(5, {}, attrs)
    assert item_categories(ds).tolist() == ["Drama", "Drama", "Comedy", "other", "Horror"]
    assert item_categories(ds, level=1).tolist() == ["Comedy", "Drama", "Action", "other", "Horror"]
    # only the 2 most frequent labels kept (Drama 2, then Comedy/Horror 1 each: first by name)
    assert item_categories(ds, top=2).tolist() == ["Drama", "Drama", "Comedy", "other", "other"]
    with pytest.raises(ValueError, match="category fields"):
        item_categories(_dataset(2, {}, [{"title": "x"}, {"title": "y"}]))
