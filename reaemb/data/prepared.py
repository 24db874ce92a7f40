"""Prepared datasets: the output of preprocessing, written once into the run directory in
open formats (parquet, npz, JSON) and reloaded by every later notebook.

Folder ``<run>/data/<dataset>-<key>/`` where ``key`` hashes the config and the source files'
contents, so the same config on the same files is reused, never recomputed::

    manifest.json        config, source hashes, file hashes, statistics
    interactions.parquet user, item, timestamp (chronological per user)
    items.parquet        item, raw_id, count, is_tail, attributes (JSON)
    users.parquet        user, raw_id, train_length, is_tail
    cooccurrence.npz     training-only item co-occurrence (scipy sparse CSR)
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..io import atomic_dir, sha256_file, sha256_json
from .errors import DataError
from .loaders import RawData, load_raw
from .preprocess import (
    chronological_sequences,
    cooccurrence_counts,
    filter_rating,
    kcore,
    leave_one_out,
    remap_ids,
    share_threshold,
)

__all__ = [
    "DataConfig",
    "PreparedDataset",
    "preprocess",
    "prepare",
    "load_prepared",
    "describe",
    "stats_table",
]

FORMAT_VERSION = 1


@dataclass(frozen=True)
class DataConfig:
    """Everything that decides a prepared dataset.

    Attributes:
        dataset: a name understood by :func:`reaemb.data.load_raw` (``ml-100k``,
            ``amazon-office``, ``yelp``, ``amazon2023:<Cat>``, ...).
        data_dir: folder of the data files (None: ``$REAEMB_DATA_DIR``; ml-100k needs none).
        min_rating: keep interactions rated at least this (None: keep all).
        user_core: k-core minimum interactions per user (≥ 3 for leave-one-out).
        item_core: k-core minimum interactions per item.
        tail_item_share: target share of tail items (count below a threshold).
        tail_user_share: target share of tail users (training length below a threshold).
        missing_text: items with no text: ``"error"`` (default) or ``"drop"`` their interactions.
    """

    dataset: str = "ml-100k"
    data_dir: str | None = None
    min_rating: float | None = None
    user_core: int = 5
    item_core: int = 3
    tail_item_share: float = 0.8
    tail_user_share: float = 0.8
    missing_text: str = "error"

    def __post_init__(self) -> None:
        if self.user_core < 3:
            raise ValueError(f"user_core must be >= 3 for leave-one-out, got {self.user_core}")
        if self.item_core < 1:
            raise ValueError(f"item_core must be >= 1, got {self.item_core}")
        if self.missing_text not in ("error", "drop"):
            raise ValueError(f"missing_text must be 'error' or 'drop', got {self.missing_text!r}")

    def key_fields(self) -> dict:
        """The fields that change the result (the data directory does not: the source files'
        hashes stand for it)."""
        d = asdict(self)
        d.pop("data_dir")
        return d


@dataclass
class PreparedDataset:
    """A preprocessed dataset with a leave-one-out split.

    Items are numbered ``1..n_items`` (0 is padding); users ``0..n_users-1``. User ``u``'s
    chronological sequence is ``flat[offsets[u]:offsets[u+1]]``; its last item is the test
    target, the one before the validation target, the rest the training part.
    """

    config: DataConfig
    user_ids: np.ndarray  # raw id per user index
    item_ids: np.ndarray  # raw id per item index; [0] = "" (padding)
    offsets: np.ndarray
    flat: np.ndarray
    timestamps: np.ndarray
    item_attributes: list[dict[str, str]]  # [0] = {} (padding)
    item_count: np.ndarray  # interactions per item in the filtered data; [0] = 0
    item_threshold: int
    user_threshold: int
    cooccurrence: sp.csr_matrix
    stats: dict = field(default_factory=dict)
    path: Path | None = None

    # -- sizes -----------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.config.dataset

    @property
    def n_users(self) -> int:
        return len(self.offsets) - 1

    @property
    def n_items(self) -> int:
        return len(self.item_ids) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    # -- split -----------------------------------------------------------------------------
    def sequence(self, user: int) -> np.ndarray:
        """The full chronological sequence of ``user``."""
        return self.flat[self.offsets[user] : self.offsets[user + 1]]

    def train_sequence(self, user: int) -> np.ndarray:
        """The training part: all but the last two items."""
        return self.flat[self.offsets[user] : self.offsets[user + 1] - 2]

    def train_sequences(self) -> list[np.ndarray]:
        """Training parts of all users (index = user)."""
        return [self.train_sequence(u) for u in range(self.n_users)]

    def eval_split(self, split: str) -> tuple[list[np.ndarray], np.ndarray]:
        """``(histories, targets)`` for ``"valid"`` (history = training part, target = the
        second-to-last item) or ``"test"`` (history = everything but the last item)."""
        end = self.offsets[1:]
        if split == "valid":
            cut = end - 2
        elif split == "test":
            cut = end - 1
        else:
            raise ValueError(f"split must be 'valid' or 'test', got {split!r}")
        histories = [self.flat[s:c] for s, c in zip(self.offsets[:-1], cut, strict=True)]
        return histories, self.flat[cut].astype(np.int64)

    # -- long-tail groups -------------------------------------------------------------------
    @property
    def item_is_tail(self) -> np.ndarray:
        """Boolean per item index (padding False): total count below ``item_threshold``."""
        tail = self.item_count < self.item_threshold
        tail[0] = False
        return tail

    @property
    def train_lengths(self) -> np.ndarray:
        return self.lengths - 2

    @property
    def user_is_tail(self) -> np.ndarray:
        """Boolean per user: training length below ``user_threshold``."""
        return self.train_lengths < self.user_threshold

    # -- text --------------------------------------------------------------------------------
    def attributes(self, item: int) -> dict[str, str]:
        """Attribute record of item index ``item`` (1-based)."""
        if not 1 <= item <= self.n_items:
            raise IndexError(f"item index must be in 1..{self.n_items}, got {item}")
        return self.item_attributes[item]


# ---------------------------------------------------------------------------------------
# building


def _sequence_stats(lengths: np.ndarray) -> dict:
    q = np.quantile(lengths, [0.0, 0.25, 0.5, 0.75, 0.9, 1.0])
    return {
        "min": int(q[0]),
        "q25": float(q[1]),
        "median": float(q[2]),
        "q75": float(q[3]),
        "q90": float(q[4]),
        "max": int(q[5]),
        "mean": round(float(lengths.mean()), 3),
    }


def _text_file(raw: RawData) -> str:
    return str(raw.source_files[-1]) if raw.source_files else raw.name


def preprocess(raw: RawData, config: DataConfig) -> PreparedDataset:
    """Apply the preprocessing pipeline to a loaded dataset (in memory; writes nothing)."""
    inter = filter_rating(raw.interactions, config.min_rating)
    if inter.empty:
        raise DataError(f"no interactions left after the rating filter (min_rating={config.min_rating})")

    has_text = inter["item"].map(lambda i: bool(raw.items.get(i)))
    if not has_text.all():
        missing = pd.unique(inter.loc[~has_text, "item"])
        if config.missing_text == "error":
            shown = ", ".join(repr(m) for m in missing[:5])
            raise DataError(
                f"{len(missing)} item(s) that occur in interactions have no text (e.g. {shown}); "
                "fix the item file or use missing_text='drop'",
                path=_text_file(raw),
                field="attributes",
            )
        inter = inter[has_text.to_numpy()]

    inter = kcore(inter, config.user_core, config.item_core)
    if inter.empty:
        raise DataError(
            f"k-core filtering (users >= {config.user_core}, items >= {config.item_core}) "
            f"left no interactions in dataset '{raw.name}'; lower the thresholds"
        )

    users, user_vocab = remap_ids(inter["user"].to_numpy(), start=0)
    items, item_vocab = remap_ids(inter["item"].to_numpy(), start=1)
    n_users, n_items = len(user_vocab), len(item_vocab)
    offsets, flat = chronological_sequences(users, items, inter["timestamp"].to_numpy(), n_users)
    order = np.lexsort((np.arange(len(users)), inter["timestamp"].to_numpy(), users))
    timestamps = inter["timestamp"].to_numpy()[order]

    split = leave_one_out(offsets)
    cooc = cooccurrence_counts(offsets, flat, split["train_end"], n_items)
    item_count = np.bincount(flat, minlength=n_items + 1).astype(np.int64)
    item_threshold, item_share = share_threshold(item_count[1:], config.tail_item_share)
    train_len = np.diff(offsets) - 2
    user_threshold, user_share = share_threshold(train_len, config.tail_user_share)

    attrs: list[dict[str, str]] = [{}] + [raw.items[i] for i in item_vocab]
    prepared = PreparedDataset(
        config=config,
        user_ids=user_vocab,
        item_ids=np.concatenate([[""], item_vocab]).astype(str),
        offsets=offsets,
        flat=flat,
        timestamps=timestamps,
        item_attributes=attrs,
        item_count=item_count,
        item_threshold=item_threshold,
        user_threshold=user_threshold,
        cooccurrence=cooc,
    )
    prepared.stats = {
        "dataset": raw.name,
        "raw": raw.stats(),
        "processed": {
            "users": n_users,
            "items": n_items,
            "interactions": int(len(flat)),
            "density": round(len(flat) / (n_users * n_items), 6),
            "sequence_length": _sequence_stats(np.diff(offsets)),
        },
        "tail_items": {
            "threshold": item_threshold,
            "rule": f"total interactions < {item_threshold}",
            "share": round(item_share, 4),
            "count": int((item_count[1:] < item_threshold).sum()),
        },
        "tail_users": {
            "threshold": user_threshold,
            "rule": f"training length < {user_threshold}",
            "share": round(user_share, 4),
            "count": int((train_len < user_threshold).sum()),
        },
        "cooccurrence": {"pairs": int(cooc.nnz // 2), "source": "training part only"},
    }
    return prepared


# ---------------------------------------------------------------------------------------
# storage


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-") or "dataset"


def _write(prepared: PreparedDataset, folder: Path, manifest: dict) -> None:
    n = prepared.n_users
    user_col = np.repeat(np.arange(n, dtype=np.int32), np.diff(prepared.offsets))
    pd.DataFrame(
        {"user": user_col, "item": prepared.flat.astype(np.int32), "timestamp": prepared.timestamps}
    ).to_parquet(folder / "interactions.parquet", index=False)
    pd.DataFrame(
        {
            "item": np.arange(1, prepared.n_items + 1, dtype=np.int32),
            "raw_id": prepared.item_ids[1:],
            "count": prepared.item_count[1:],
            "is_tail": prepared.item_is_tail[1:],
            "attributes": [json.dumps(a, ensure_ascii=False) for a in prepared.item_attributes[1:]],
        }
    ).to_parquet(folder / "items.parquet", index=False)
    pd.DataFrame(
        {
            "user": np.arange(n, dtype=np.int32),
            "raw_id": prepared.user_ids,
            "train_length": prepared.train_lengths,
            "is_tail": prepared.user_is_tail,
        }
    ).to_parquet(folder / "users.parquet", index=False)
    sp.save_npz(folder / "cooccurrence.npz", prepared.cooccurrence, compressed=True)
    manifest["files"] = {
        p.name: sha256_file(p) for p in sorted(folder.iterdir()) if p.name != "manifest.json"
    }
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def load_prepared(folder: str | Path, verify: bool = True) -> PreparedDataset:
    """Reload a prepared dataset written by :func:`prepare`. With ``verify``, every file's
    hash is checked against the manifest."""
    folder = Path(folder)
    manifest_path = folder / "manifest.json"
    if not manifest_path.exists():
        raise DataError("not a prepared dataset (no manifest.json)", path=folder)
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("format_version") != FORMAT_VERSION:
        raise DataError(f"unsupported format_version {manifest.get('format_version')}", path=manifest_path)
    if verify:
        for name, digest in manifest["files"].items():
            if not (folder / name).exists() or sha256_file(folder / name) != digest:
                raise DataError("file is missing or does not match its manifest hash", path=folder / name)
    config = DataConfig(**manifest["config"])
    inter = pd.read_parquet(folder / "interactions.parquet")
    items = pd.read_parquet(folder / "items.parquet")
    users = pd.read_parquet(folder / "users.parquet")
    n_users = len(users)
    counts = np.bincount(inter["user"].to_numpy(), minlength=n_users)
    offsets = np.zeros(n_users + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    return PreparedDataset(
        config=config,
        user_ids=users["raw_id"].to_numpy().astype(str),
        item_ids=np.concatenate([[""], items["raw_id"].to_numpy().astype(str)]),
        offsets=offsets,
        flat=inter["item"].to_numpy().astype(np.int32),
        timestamps=inter["timestamp"].to_numpy(),
        item_attributes=[{}] + [json.loads(a) for a in items["attributes"]],
        item_count=np.concatenate([[0], items["count"].to_numpy()]).astype(np.int64),
        item_threshold=int(manifest["stats"]["tail_items"]["threshold"]),
        user_threshold=int(manifest["stats"]["tail_users"]["threshold"]),
        cooccurrence=sp.load_npz(folder / "cooccurrence.npz").tocsr(),
        stats=manifest["stats"],
        path=folder,
    )


def prepare(
    config: DataConfig | None = None,
    data_root: str | Path | None = None,
    *,
    run: str | None = None,
    force: bool = False,
    **overrides,
) -> PreparedDataset:
    """Prepare (or reuse) a dataset in a run's ``data/`` folder.

    Args:
        config: the :class:`DataConfig` (default ml-100k); keyword ``overrides`` replace fields.
        data_root: where prepared datasets live (default: the run's ``data/`` folder).
        run: run name, used when ``data_root`` is not given.
        force: rebuild even if a prepared copy with the same key exists.

    The folder name carries a hash of the config and of the source files' contents: the
    same inputs give the same folder, which is reused. The folder is built under a temporary
    name and renamed into place, so an error or interruption leaves nothing half-written.
    """
    from ..runs import run_dir  # local: runs imports nothing from data

    config = config or DataConfig()
    if overrides:
        config = DataConfig(**{**asdict(config), **overrides})
    raw = load_raw(config.dataset, config.data_dir)
    sources = [{"name": p.name, "sha256": sha256_file(p), "bytes": p.stat().st_size} for p in raw.source_files]
    key = sha256_json({"config": config.key_fields(), "sources": sources, "v": FORMAT_VERSION})[:12]
    if data_root is None:
        if run is None:
            raise ValueError("give either data_root or run")
        data_root = run_dir(run).data
    folder = Path(data_root) / f"{_slug(config.dataset)}-{key}"
    if folder.exists() and not force:
        try:
            return load_prepared(folder)
        except DataError:
            pass  # damaged: rebuild below
    prepared = preprocess(raw, config)  # raises before anything is written
    manifest = {
        "format_version": FORMAT_VERSION,
        "key": key,
        "config": asdict(config),
        "sources": sources,
        "stats": prepared.stats,
    }
    with atomic_dir(folder) as tmp:
        _write(prepared, tmp, manifest)
    prepared.path = folder
    return prepared


def describe(dataset: str, data_dir: str | Path | None = None, **config_fields) -> dict:
    """Statistics before and after preprocessing, computed in memory (nothing is written)."""
    config = DataConfig(dataset=dataset, data_dir=None if data_dir is None else str(data_dir), **config_fields)
    raw = load_raw(config.dataset, config.data_dir)
    return preprocess(raw, config).stats


def stats_table(stats: dict) -> pd.DataFrame:
    """The statistics of :func:`describe` / ``PreparedDataset.stats`` as a two-column table
    (raw and after preprocessing side by side)."""
    raw, proc = stats["raw"], stats["processed"]
    seq = proc["sequence_length"]
    rows = [
        ("users", raw["users"], proc["users"]),
        ("items", raw["items"], proc["items"]),
        ("interactions", raw["interactions"], proc["interactions"]),
        ("density", "", f"{proc['density']:.4f}"),
        ("sequence length min / median / mean / max", "",
         f"{seq['min']} / {seq['median']:g} / {seq['mean']:.1f} / {seq['max']}"),
        ("tail items (share)", "", f"{stats['tail_items']['rule']} ({stats['tail_items']['share']:.1%})"),
        ("tail users (share)", "", f"{stats['tail_users']['rule']} ({stats['tail_users']['share']:.1%})"),
        ("co-occurring item pairs (training part)", "", stats["cooccurrence"]["pairs"]),
    ]
    return pd.DataFrame(rows, columns=["statistic", "raw", "after preprocessing"]).set_index("statistic")
