"""Intrinsic checks of item embedding tables (METHOD.md §6): do co-occurring items sit
closer than random pairs, and what are an item's nearest neighbours."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

__all__ = [
    "cooccurrence_cosine",
    "nearest_neighbours",
    "item_categories",
    "knn_cooccurrence_overlap",
    "category_silhouette",
    "embedding_structure",
    "umap_2d",
    "example_items",
    "intrinsic_table",
    "neighbours_table",
]


def _unit(table: torch.Tensor | np.ndarray, center: bool = True) -> np.ndarray:
    """Rows of ``table`` (centred on the mean row first when ``center``) scaled to unit norm.

    Centring is the default of every measure here: mean-pooled LLM embeddings share one
    dominant direction (random item pairs of SmolLM2 on ml-100k have cosine 0.99), which
    swamps raw cosines; the sequential recommenders see the tables centred too (the PCA in
    front of their adapter)."""
    x = np.asarray(torch.as_tensor(table, dtype=torch.float32).cpu().numpy(), dtype=np.float64)
    if center:
        x = x - x.mean(0, keepdims=True)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def cooccurrence_cosine(table: torch.Tensor | np.ndarray, dataset, n_pairs: int = 5000, seed: int = 0,
                        center: bool = True) -> dict:
    """Mean cosine of training co-occurring item pairs vs random distinct pairs.

    ``table`` has one row per item (row ``k`` = item ``k + 1``, as stored by
    :mod:`reaemb.embeddings`). Co-occurring pairs are drawn uniformly (without replacement
    when there are enough) from the upper triangle of ``dataset.cooccurrence`` (training
    part only); random pairs are uniform distinct item pairs. Returns ``cooc``, ``random``,
    ``gap`` (= cooc − random) and the pair counts. ``center``: cosines of the centred table.
    """
    x = _unit(table, center)
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
                       attribute: str = "title", center: bool = True) -> dict[str, list[str]]:
    """Titles of the ``k`` nearest items (cosine, of the centred table when ``center``) of
    each item in ``items`` (1-based ids), keyed by the query item's title."""
    x = _unit(table, center)
    out: dict[str, list[str]] = {}
    for item in items:
        sims = x @ x[item - 1]
        sims[item - 1] = -np.inf
        top = np.argsort(-sims)[:k] + 1
        name = dataset.item_attributes[item].get(attribute, str(item))
        out[name] = [dataset.item_attributes[j].get(attribute, str(j)) for j in top]
    return out


# ---------------------------------------------------------------------------------------
# embedding structure (notebook 06)

CATEGORY_FIELDS = ("genres", "categories", "category", "description")


def item_categories(dataset, field: str | None = None, level: int = 0, top: int = 8) -> np.ndarray:
    """One category label per item (row ``k`` = item ``k + 1``) for colouring and silhouette.

    The label is the ``level``-th comma-separated value of ``field`` (default: the first of
    ``genres``, ``categories``, ``category``, ``description`` that the items carry; an item
    with fewer levels uses its last value). Only the ``top`` most frequent labels are kept;
    the rest, and items without the field, become ``"other"``.
    """
    attrs = dataset.item_attributes[1:]
    if field is None:
        present = [f for f in CATEGORY_FIELDS if any(a.get(f) for a in attrs)]
        if not present:
            raise ValueError(f"items carry none of the category fields {CATEGORY_FIELDS}; pass field=")
        field = present[0]
    labels = []
    for a in attrs:
        parts = [p.strip() for p in str(a.get(field, "")).split(",") if p.strip()]
        labels.append(parts[min(level, len(parts) - 1)] if parts else "other")
    labels = np.asarray(labels, dtype=object)
    values, counts = np.unique(labels[labels != "other"], return_counts=True)
    keep = set(values[np.argsort(-counts, kind="stable")[:top]])
    return np.asarray([lab if lab in keep else "other" for lab in labels], dtype=object)


def knn_cooccurrence_overlap(table: torch.Tensor | np.ndarray, dataset, k: int = 10, center: bool = True) -> float:
    """Mean over items with co-occurring items of ``|kNN(i) ∩ topcooc(i)| / min(k, |cooc(i)|)``.

    ``kNN(i)``: the ``k`` nearest other items by cosine; ``topcooc(i)``: the ``k`` items
    co-occurring most often with ``i`` in the training part (ties broken by item index).
    1 means the embedding's neighbourhoods are the co-occurrence graph's; a random table
    scores about ``k / n_items``. ``center``: neighbours in the centred table.
    """
    x = _unit(table, center)
    n = x.shape[0]
    if n != dataset.n_items:
        raise ValueError(f"table has {n} rows, the dataset {dataset.n_items} items")
    if not 1 <= k < n:
        raise ValueError(f"k must be in 1..{n - 1}, got {k}")
    cooc = dataset.cooccurrence.tocsr()
    scores = []
    for start in range(0, n, 512):
        sims = x[start : start + 512] @ x.T
        rows = np.arange(start, min(start + 512, n))
        sims[rows - start, rows] = -np.inf
        knn = np.argpartition(-sims, k, axis=1)[:, :k] + 1  # item ids
        for r, item in enumerate(rows + 1):
            row = cooc[item]
            if row.nnz == 0:
                continue
            order = np.lexsort((row.indices, -row.data))[:k]
            top = set(row.indices[order].tolist())
            scores.append(len(top.intersection(knn[r].tolist())) / min(k, len(top)))
    if not scores:
        raise ValueError("no item has a co-occurring item")
    return float(np.mean(scores))


def category_silhouette(table: torch.Tensor | np.ndarray, labels: np.ndarray, center: bool = True) -> float:
    """Silhouette score (cosine distance, of the centred table when ``center``) of the items
    grouped by ``labels``, ``"other"`` left out: near 1, categories form tight separate
    clusters; near 0 or below, they mix."""
    from sklearn.metrics import silhouette_score

    x = _unit(table, center)
    keep = np.asarray(labels) != "other"
    if len(np.unique(np.asarray(labels)[keep])) < 2:
        raise ValueError("need at least two categories besides 'other'")
    return float(silhouette_score(x[keep], np.asarray(labels)[keep], metric="cosine"))


def embedding_structure(table: torch.Tensor | np.ndarray, dataset, labels: np.ndarray, k: int = 10,
                        seed: int = 0, center: bool = True) -> dict:
    """The three numbers notebook 06 reports for a table: co-occurring vs random cosine, kNN
    overlap with the co-occurrence graph, category silhouette (all on the centred table when
    ``center``), plus the raw random-pair cosine (the table's anisotropy)."""
    cos = cooccurrence_cosine(table, dataset, seed=seed, center=center)
    raw = cooccurrence_cosine(table, dataset, seed=seed, center=False)
    return {"cooc_cosine": cos["cooc"], "random_cosine": cos["random"], "cosine_gap": cos["gap"],
            f"knn{k}_cooc_overlap": knn_cooccurrence_overlap(table, dataset, k, center),
            "category_silhouette": category_silhouette(table, labels, center),
            "raw_random_cosine": raw["random"]}


def umap_2d(table: torch.Tensor | np.ndarray, seed: int = 0, n_neighbors: int = 15, min_dist: float = 0.1) -> np.ndarray:
    """2-D UMAP (umap-learn, cosine metric) of an embedding table; seeded (single-threaded
    then, as umap-learn requires for reproducibility)."""
    import umap

    x = _unit(table).astype(np.float32)
    reducer = umap.UMAP(n_components=2, n_neighbors=min(n_neighbors, len(x) - 1), min_dist=min_dist,
                        metric="cosine", random_state=seed)
    return reducer.fit_transform(x)


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
                    seed: int = 0, center: bool = True) -> pd.DataFrame:
    """One row per variant: mean cosine of training co-occurring pairs, of random pairs, and
    the gap (:func:`cooccurrence_cosine`, same pairs for every variant, centred tables when
    ``center``), plus ``raw_random``: the random pairs' cosine without centring (anisotropy)."""
    rows = [{"variant": name, **cooccurrence_cosine(table, dataset, n_pairs, seed, center),
             "raw_random": cooccurrence_cosine(table, dataset, n_pairs, seed, False)["random"]}
            for name, table in tables.items()]
    return pd.DataFrame(rows).set_index("variant")[["cooc", "random", "gap", "raw_random", "n_cooc_pairs",
                                                    "n_random_pairs"]]


def neighbours_table(tables: dict[str, torch.Tensor | np.ndarray], dataset, items: list[int], k: int = 5,
                     attribute: str = "title", center: bool = True) -> pd.DataFrame:
    """The ``k`` nearest neighbours (titles, ``; ``-joined) of each item under each variant:
    one row per (item, variant)."""
    found = {name: nearest_neighbours(table, dataset, items, k, attribute, center) for name, table in tables.items()}
    rows = []
    for item in items:
        query = dataset.item_attributes[item].get(attribute, str(item))
        for name in tables:
            rows.append({"item": query, "variant": name, "nearest": "; ".join(found[name][query])})
    return pd.DataFrame(rows).set_index(["item", "variant"])
