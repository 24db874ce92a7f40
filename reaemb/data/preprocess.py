"""Preprocessing steps, each a pure function on arrays or frames (METHOD.md §1).

Order used by :func:`reaemb.data.prepare`: rating filter → drop/complain about items without
text → iterative k-core → id remapping (0 = padding) → chronological order with a stable
tie-break → leave-one-out split → training-only co-occurrence → long-tail groups.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .errors import DataError

__all__ = [
    "filter_rating",
    "kcore",
    "remap_ids",
    "chronological_sequences",
    "leave_one_out",
    "cooccurrence_counts",
    "share_threshold",
]


def filter_rating(inter: pd.DataFrame, min_rating: float | None) -> pd.DataFrame:
    """Keep interactions with ``rating >= min_rating`` (None keeps all). The papers' "ratings
    > 3" on 1–5 stars is ``min_rating=4``."""
    if min_rating is None:
        return inter
    if inter["rating"].isna().all():
        raise DataError("a rating filter was asked for, but this dataset has no ratings", field="rating")
    return inter[inter["rating"] >= min_rating]


def kcore(inter: pd.DataFrame, user_core: int = 5, item_core: int = 3) -> pd.DataFrame:
    """Iterative k-core: drop users with fewer than ``user_core`` interactions and items with
    fewer than ``item_core``, repeatedly, until both hold for every remaining row.

    Repeated (user, item) interactions each count. Row order is kept.
    """
    if user_core < 1 or item_core < 1:
        raise ValueError(f"k-core thresholds must be >= 1, got users {user_core}, items {item_core}")
    df = inter
    while True:
        ucount = df.groupby("user", sort=False)["item"].transform("size")
        icount = df.groupby("item", sort=False)["user"].transform("size")
        keep = (ucount >= user_core) & (icount >= item_core)
        if bool(keep.all()):
            return df
        df = df[keep.to_numpy()]
        if df.empty:
            return df


def _natural_order(raw: np.ndarray) -> np.ndarray:
    """Sorted unique raw ids: numerically when all are integers, else as strings."""
    uniq = pd.unique(raw)
    try:
        keys = np.array([int(x) for x in uniq])
        return uniq[np.argsort(keys, kind="stable")]
    except ValueError:
        return np.sort(uniq.astype(str))


def remap_ids(raw: np.ndarray, start: int) -> tuple[np.ndarray, np.ndarray]:
    """Map raw ids to ``start, start+1, ...`` in natural order of the raw ids.

    Returns ``(codes, vocabulary)`` where ``vocabulary[code - start]`` is the raw id.
    Items use ``start=1`` so that 0 stays free for padding; users use ``start=0``.
    """
    vocab = _natural_order(np.asarray(raw))
    index = pd.Index(vocab)
    codes = index.get_indexer(raw)
    return codes.astype(np.int64) + start, vocab.astype(str)


def chronological_sequences(
    users: np.ndarray, items: np.ndarray, timestamps: np.ndarray, n_users: int
) -> tuple[np.ndarray, np.ndarray]:
    """Each user's items in time order, ties broken by input (file) order.

    Returns ``(offsets, flat)``: user ``u``'s sequence is ``flat[offsets[u]:offsets[u+1]]``.
    """
    order = np.lexsort((np.arange(len(users)), timestamps, users))
    flat = np.asarray(items)[order].astype(np.int32)
    counts = np.bincount(np.asarray(users)[order], minlength=n_users)
    offsets = np.zeros(n_users + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    return offsets, flat


def leave_one_out(offsets: np.ndarray) -> dict[str, np.ndarray]:
    """Leave-one-out positions for every user: the last item is the test target, the one
    before it the validation target, the rest training.

    Returns arrays indexed by user: ``train_end`` (exclusive end of the training part in the
    flat array), ``valid_pos``, ``test_pos``. Requires every user to have ≥ 3 items.
    """
    lengths = np.diff(offsets)
    if (lengths < 3).any():
        u = int(np.flatnonzero(lengths < 3)[0])
        raise DataError(
            f"user index {u} has {int(lengths[u])} interaction(s); leave-one-out needs >= 3 "
            "(raise user_core)"
        )
    return {
        "train_end": offsets[1:] - 2,
        "valid_pos": offsets[1:] - 2,
        "test_pos": offsets[1:] - 1,
    }


def cooccurrence_counts(
    offsets: np.ndarray, flat: np.ndarray, train_end: np.ndarray, n_items: int
) -> sp.csr_matrix:
    """Item co-occurrence over the *training part* of each sequence only.

    ``C[i, j]`` is the number of users whose training sequence contains both ``i`` and ``j``
    (``i != j``); repeats inside one sequence count once. Symmetric, zero diagonal, shape
    ``(n_items + 1, n_items + 1)`` (row 0 is padding and empty).

    The reference code counts over full sequences, which leaks validation and test items into
    the reward; here those positions never contribute.
    """
    n_users = len(offsets) - 1
    starts = offsets[:-1]
    lengths = np.maximum(train_end - starts, 0)
    rows = np.repeat(np.arange(n_users), lengths)
    first = np.repeat(np.cumsum(lengths) - lengths, lengths)
    pos = np.arange(int(lengths.sum())) - first + np.repeat(starts, lengths)
    cols = np.asarray(flat)[pos]
    b = sp.coo_matrix(
        (np.ones(len(rows), dtype=np.int32), (rows, cols)), shape=(n_users, n_items + 1)
    ).tocsr()  # sums repeated (user, item) pairs...
    b.data[:] = 1  # ...which we turn back into presence
    c = (b.T @ b).tocsr()
    c.setdiag(0)
    c.eliminate_zeros()
    c.sort_indices()
    return c.astype(np.int32)


def share_threshold(values: np.ndarray, share: float) -> tuple[int, float]:
    """The integer threshold ``t`` for which the share of ``values < t`` is closest to
    ``share`` (ties: the smaller ``t``). Returns ``(t, achieved_share)``.

    Used for tail items (total interaction count, ~80 % tail) and tail users (training
    sequence length).
    """
    if not 0.0 < share < 1.0:
        raise ValueError(f"share must be in (0, 1), got {share}")
    values = np.asarray(values)
    if values.size == 0:
        raise ValueError("no values to threshold")
    candidates = np.unique(np.concatenate([values, [values.max() + 1]]))
    shares = np.searchsorted(np.sort(values), candidates, side="left") / values.size
    best = int(np.argmin(np.abs(shares - share)))
    return int(candidates[best]), float(shares[best])
