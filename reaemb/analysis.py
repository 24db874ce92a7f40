"""Intrinsic checks of item embedding tables (METHOD.md §6): do co-occurring items sit
closer than random pairs, and what are an item's nearest neighbours."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

__all__ = ["cooccurrence_cosine", "nearest_neighbours", "example_items", "intrinsic_table", "neighbours_table"]


def _unit(table: torch.Tensor | np.ndarray) -> np.ndarray:
    x = np.asarray(torch.as_tensor(table, dtype=torch.float32).cpu().numpy(), dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def cooccurrence_cosine(table: torch.Tensor | np.ndarray, dataset, n_pairs: int = 5000, seed: int = 0) -> dict:
    """Mean cosine of training co-occurring item pairs vs random distinct pairs.

    ``table`` has one row per item (row ``k`` = item ``k + 1``, as stored by
    :mod:`reaemb.embeddings`). Co-occurring pairs are drawn uniformly (without replacement
    when there are enough) from the upper triangle of ``dataset.cooccurrence`` (training
    part only); random pairs are uniform distinct item pairs. Returns ``cooc``, ``random``,
    ``gap`` (= cooc − random) and the pair counts.
    """
    x = _unit(table)
    if x.shape[0] != dataset.n_items:
        raise ValueError(f"table has {x.shape[0]} rows, the dataset {dataset.n_items} items")
    rng = np.random.default_rng(seed)
    upper = dataset.cooccurrence.tocoo()
    keep = (upper.row < upper.col) & (upper.row > 0)
    rows, cols = upper.row[keep], upper.col[keep]
    if len(rows) == 0:
        raise ValueError("the dataset has no co-occurring item pairs")
    pick = rng.choice(len(rows), size=min(n_pairs, len(rows)), replace=False)
    ci, cj = rows[pick] - 1, cols[pick] - 1
    ri = rng.integers(0, x.shape[0], size=n_pairs)
    rj = (ri + rng.integers(1, x.shape[0], size=n_pairs)) % x.shape[0]  # distinct from ri
    cooc = float(np.mean(np.sum(x[ci] * x[cj], axis=1)))
    rand = float(np.mean(np.sum(x[ri] * x[rj], axis=1)))
    return {"cooc": cooc, "random": rand, "gap": cooc - rand, "n_cooc_pairs": int(len(pick)), "n_random_pairs": int(n_pairs)}


def nearest_neighbours(table: torch.Tensor | np.ndarray, dataset, items: list[int], k: int = 5,
                       attribute: str = "title") -> dict[str, list[str]]:
    """Titles of the ``k`` nearest items (cosine) of each item in ``items`` (1-based ids),
    keyed by the query item's title."""
    x = _unit(table)
    out: dict[str, list[str]] = {}
    for item in items:
        sims = x @ x[item - 1]
        sims[item - 1] = -np.inf
        top = np.argsort(-sims)[:k] + 1
        name = dataset.item_attributes[item].get(attribute, str(item))
        out[name] = [dataset.item_attributes[j].get(attribute, str(j)) for j in top]
    return out


def example_items(dataset, n: int = 4, seed: int = 0) -> list[int]:
    """``n`` items to look at (1-based ids): the most interacted half (recognisable) and
    random tail items for the rest (where text should matter most), seeded."""
    counts = np.asarray(dataset.item_count[1:])
    n_head = (n + 1) // 2
    head = (np.argsort(-counts, kind="stable")[:n_head] + 1).tolist()
    tail = [i for i in np.flatnonzero(np.asarray(dataset.item_is_tail[1:])) + 1 if i not in head]
    rng = np.random.default_rng(seed)
    picked = rng.choice(tail, size=min(n - n_head, len(tail)), replace=False).tolist() if tail else []
    return head + [int(i) for i in picked]


def intrinsic_table(tables: dict[str, torch.Tensor | np.ndarray], dataset, n_pairs: int = 5000,
                    seed: int = 0) -> pd.DataFrame:
    """One row per variant: mean cosine of training co-occurring pairs, of random pairs, and
    the gap (:func:`cooccurrence_cosine`, same pairs for every variant)."""
    rows = [{"variant": name, **cooccurrence_cosine(table, dataset, n_pairs, seed)} for name, table in tables.items()]
    return pd.DataFrame(rows).set_index("variant")[["cooc", "random", "gap", "n_cooc_pairs", "n_random_pairs"]]


def neighbours_table(tables: dict[str, torch.Tensor | np.ndarray], dataset, items: list[int], k: int = 5,
                     attribute: str = "title") -> pd.DataFrame:
    """The ``k`` nearest neighbours (titles, ``; ``-joined) of each item under each variant:
    one row per (item, variant)."""
    found = {name: nearest_neighbours(table, dataset, items, k, attribute) for name, table in tables.items()}
    rows = []
    for item in items:
        query = dataset.item_attributes[item].get(attribute, str(item))
        for name in tables:
            rows.append({"item": query, "variant": name, "nearest": "; ".join(found[name][query])})
    return pd.DataFrame(rows).set_index(["item", "variant"])
