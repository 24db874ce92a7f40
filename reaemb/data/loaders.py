"""Loaders: each turns one on-disk format into a :class:`RawData` (an interaction log with
timestamps plus one attribute record per item).

Formats:

- ``ml-100k``: MovieLens-100K as bundled in the ``recbole`` package (tab-separated atomic
  files ``ml-100k.inter`` / ``ml-100k.item``). The default, works offline.
- ``inter-json``: ``<Name>.inter.json`` (``{user: [item, ...]}`` in chronological order) and
  ``<Name>.item.json`` (``{item: {attribute: value}}``), e.g. Amazon Office and Yelp.
- ``amazon2014`` / ``amazon2018`` / ``amazon2023``: the raw Amazon review dumps as
  downloaded (reviews + metadata per category).
- ``yelp-raw``: the Yelp Open Dataset's ``review.json`` + ``business.json``.
"""

from __future__ import annotations

import ast
import gzip
import importlib.util
import io
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

from ..text import clean_attributes
from .errors import DataError

__all__ = [
    "RawData",
    "DATASETS",
    "DatasetSpec",
    "resolve_data_dir",
    "load_raw",
    "recbole_ml100k_dir",
    "load_ml100k",
    "load_inter_json",
    "load_amazon2014",
    "load_amazon2018",
    "load_amazon2023",
    "load_yelp_raw",
]


@dataclass
class RawData:
    """An interaction log before any filtering.

    Attributes:
        name: dataset name.
        interactions: one row per interaction, columns ``user`` (str), ``item`` (str),
            ``timestamp`` (float; for position-ordered formats the position), ``rating``
            (float, NaN when the format has none). Row order is file order.
        items: raw item id -> cleaned attribute record (``{attribute: text}``), attribute
            order as in the source.
        source_files: the files read (hashed into the prepared dataset's manifest).
    """

    name: str
    interactions: pd.DataFrame
    items: dict[str, dict[str, str]]
    source_files: list[Path] = field(default_factory=list)

    def stats(self) -> dict[str, int]:
        """Users, items (that occur in interactions) and interactions."""
        return {
            "users": int(self.interactions["user"].nunique()),
            "items": int(self.interactions["item"].nunique()),
            "interactions": int(len(self.interactions)),
        }


# ---------------------------------------------------------------------------------------
# helpers


def _require_file(path: Path, what: str) -> Path:
    if not path.exists():
        raise DataError(f"{what} not found", path=path)
    if path.is_dir():
        raise DataError(f"{what} is a directory, expected a file", path=path)
    if path.stat().st_size == 0:
        raise DataError(f"{what} is empty", path=path)
    return path


def _open_text(path: Path) -> io.TextIOBase:
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
    return open(path, encoding="utf-8")


def _iter_records(path: Path) -> Iterator[tuple[int, dict]]:
    """One JSON object per line (strict JSON, or the Python-literal lines of the Amazon 2014
    metadata). Yields ``(line_number, record)``; blank lines are skipped."""
    with _open_text(path) as fh:
        for lineno, line in enumerate(fh, start=1):
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                try:
                    rec = ast.literal_eval(line)
                except (ValueError, SyntaxError) as exc:
                    raise DataError(
                        f"line {lineno} is neither JSON nor a Python literal: {exc}", path=path
                    ) from None
            if not isinstance(rec, dict):
                raise DataError(f"line {lineno} is not a JSON object", path=path)
            yield lineno, rec


def _get(rec: dict, key: str, path: Path, lineno: int) -> object:
    if key not in rec or rec[key] is None or rec[key] == "":
        raise DataError(f"line {lineno} has no value for this field", path=path, field=key)
    return rec[key]


def _as_float(value: object, path: Path, field_name: str, lineno: int | str) -> float:
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise DataError(
            f"line {lineno}: expected a number, got {value!r}", path=path, field=field_name
        ) from None


def _frame(users: list, items: list, timestamps: list, ratings: list | None) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "user": pd.Series(users, dtype=str),
            "item": pd.Series(items, dtype=str),
            "timestamp": np.asarray(timestamps, dtype=np.float64),
            "rating": np.asarray(
                ratings if ratings is not None else [np.nan] * len(users), dtype=np.float64
            ),
        }
    )


# ---------------------------------------------------------------------------------------
# MovieLens-100K (recbole atomic files)


def recbole_ml100k_dir() -> Path:
    """The folder of the MovieLens-100K files inside the installed ``recbole`` package.

    ``recbole`` is installed with ``--no-deps`` and never imported (its ``__init__`` pulls in
    packages we do not need); we only locate its folder.
    """
    spec = importlib.util.find_spec("recbole")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            "the 'recbole' package (which carries MovieLens-100K) is not installed; "
            "run `pip install --no-deps recbole==1.2.1` or `make venv`"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "dataset_example" / "ml-100k"
    if not folder.is_dir():
        raise DataError("recbole is installed but has no dataset_example/ml-100k", path=folder)
    return folder


def _read_atomic(path: Path, required: dict[str, str]) -> pd.DataFrame:
    """Read a RecBole atomic file (tab-separated, header ``name:type``); ``required`` maps
    header names to the column names we use."""
    _require_file(path, "atomic file")
    try:
        df = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False, quoting=3)
    except pd.errors.EmptyDataError:
        raise DataError("file has no header", path=path) from None
    df.columns = [c.split(":")[0] for c in df.columns]
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise DataError(
            f"missing column(s) {missing}; found {list(df.columns)}", path=path, field=missing[0]
        )
    return df.rename(columns=required)[list(required.values())]


def load_ml100k(data_dir: Path | None = None) -> RawData:
    """MovieLens-100K with title, release year and genres as item text."""
    folder = Path(data_dir) if data_dir is not None else recbole_ml100k_dir()
    inter_path = folder / "ml-100k.inter"
    item_path = folder / "ml-100k.item"
    inter = _read_atomic(
        inter_path,
        {"user_id": "user", "item_id": "item", "rating": "rating", "timestamp": "timestamp"},
    )
    for col in ("user", "item"):
        bad = ~inter[col].str.fullmatch(r"\d+")
        if bad.any():
            row = int(np.flatnonzero(bad.to_numpy())[0])
            raise DataError(
                f"line {row + 2}: expected a numeric id, got {inter[col].iloc[row]!r}",
                path=inter_path,
                field=f"{col}_id",
            )
    for col in ("timestamp", "rating"):
        values = pd.to_numeric(inter[col], errors="coerce")
        bad = values.isna()
        if bad.any():
            row = int(np.flatnonzero(bad.to_numpy())[0]) + 2  # header is line 1
            raise DataError(
                f"line {row}: expected a number, got {inter[col].iloc[row - 2]!r}",
                path=inter_path,
                field=col,
            )
        inter[col] = values.astype(np.float64)
    items_df = _read_atomic(
        item_path,
        {"item_id": "item", "movie_title": "title", "release_year": "year", "class": "genres"},
    )
    items: dict[str, dict[str, str]] = {}
    for rec in items_df.itertuples(index=False):
        genres = ", ".join(rec.genres.split())
        items[rec.item] = clean_attributes({"title": rec.title, "year": rec.year, "genres": genres})
    return RawData("ml-100k", inter, items, [inter_path, item_path])


# ---------------------------------------------------------------------------------------
# <Name>.inter.json + <Name>.item.json


def load_inter_json(inter_path: Path, item_path: Path, name: str | None = None) -> RawData:
    """The ``*.inter.json`` / ``*.item.json`` pair. Sequences are in chronological order, so
    an item's position in its user's list is its timestamp."""
    inter_path, item_path = Path(inter_path), Path(item_path)
    _require_file(inter_path, "interaction file")
    _require_file(item_path, "item file")
    try:
        seqs = json.loads(inter_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"not valid JSON: {exc}", path=inter_path) from None
    if not isinstance(seqs, dict):
        raise DataError("expected an object {user_id: [item_id, ...]}", path=inter_path)
    users: list[str] = []
    items: list[str] = []
    stamps: list[int] = []
    for user, seq in seqs.items():
        if not isinstance(seq, list):
            raise DataError(f"user {user!r}: expected a list of item ids", path=inter_path)
        for pos, item in enumerate(seq):
            if isinstance(item, bool) or not (
                isinstance(item, int) or (isinstance(item, str) and item.strip().isdigit())
            ):
                raise DataError(
                    f"user {user!r}, position {pos}: item id {item!r} is not an integer id",
                    path=inter_path,
                    field="item_id",
                )
            users.append(str(user))
            items.append(str(item))
            stamps.append(pos)
    if not users:
        raise DataError("contains no interactions", path=inter_path)
    try:
        meta = json.loads(item_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"not valid JSON: {exc}", path=item_path) from None
    if not isinstance(meta, dict):
        raise DataError("expected an object {item_id: {attribute: value}}", path=item_path)
    records: dict[str, dict[str, str]] = {}
    for item, rec in meta.items():
        if not isinstance(rec, dict):
            raise DataError(f"item {item!r}: expected an attribute object", path=item_path)
        records[str(item)] = clean_attributes(rec)
    name = name or inter_path.name.removesuffix(".inter.json")
    return RawData(name, _frame(users, items, stamps, None), records, [inter_path, item_path])


# ---------------------------------------------------------------------------------------
# Amazon reviews (2014, 2018, 2023)


def _load_reviews(
    path: Path,
    user_key: str,
    item_key: str,
    rating_key: str,
    time_key: str,
    time_scale: float = 1.0,
) -> pd.DataFrame:
    _require_file(path, "review file")
    users, items, stamps, ratings = [], [], [], []
    for lineno, rec in _iter_records(path):
        users.append(str(_get(rec, user_key, path, lineno)))
        items.append(str(_get(rec, item_key, path, lineno)))
        stamps.append(_as_float(_get(rec, time_key, path, lineno), path, time_key, lineno) * time_scale)
        ratings.append(_as_float(rec.get(rating_key, np.nan), path, rating_key, lineno))
    if not users:
        raise DataError("contains no reviews", path=path)
    return _frame(users, items, stamps, ratings)


def _load_meta(
    path: Path, item_key: str, build: Callable[[dict], dict[str, object]]
) -> dict[str, dict[str, str]]:
    _require_file(path, "metadata file")
    out: dict[str, dict[str, str]] = {}
    for lineno, rec in _iter_records(path):
        out[str(_get(rec, item_key, path, lineno))] = clean_attributes(build(rec))
    return out


def _price(value: object) -> object:
    if isinstance(value, (int, float)) and value == value:
        return f"{float(value):.2f}"
    return value


def _categories_2014(value: object) -> object:
    # [["Office Products", "Office & School Supplies", ...], [...]]: keep unique names in order
    seen: list[str] = []
    for path in value if isinstance(value, list) else []:
        for name in path if isinstance(path, list) else [path]:
            if name and name not in seen:
                seen.append(str(name))
    return seen


def load_amazon2014(data_dir: Path, category: str) -> RawData:
    """Amazon reviews 2014 (McAuley et al.): ``reviews_<Cat>.json.gz`` (or the 5-core
    ``reviews_<Cat>_5.json.gz``) and ``meta_<Cat>.json.gz``."""
    data_dir = Path(data_dir)
    reviews = data_dir / f"reviews_{category}.json.gz"
    if not reviews.exists() and (data_dir / f"reviews_{category}_5.json.gz").exists():
        reviews = data_dir / f"reviews_{category}_5.json.gz"
    inter = _load_reviews(reviews, "reviewerID", "asin", "overall", "unixReviewTime")
    meta_path = data_dir / f"meta_{category}.json.gz"
    items = _load_meta(
        meta_path,
        "asin",
        lambda r: {
            "title": r.get("title"),
            "brand": r.get("brand"),
            "categories": _categories_2014(r.get("categories")),
            "price": _price(r.get("price")),
            "description": r.get("description"),
        },
    )
    return RawData(f"amazon2014-{category}", inter, items, [reviews, meta_path])


def load_amazon2018(data_dir: Path, category: str) -> RawData:
    """Amazon reviews 2018 (Ni et al.): ``<Cat>.json.gz`` (or ``<Cat>_5.json.gz``) and
    ``meta_<Cat>.json.gz``."""
    data_dir = Path(data_dir)
    reviews = data_dir / f"{category}.json.gz"
    if not reviews.exists() and (data_dir / f"{category}_5.json.gz").exists():
        reviews = data_dir / f"{category}_5.json.gz"
    inter = _load_reviews(reviews, "reviewerID", "asin", "overall", "unixReviewTime")
    meta_path = data_dir / f"meta_{category}.json.gz"
    items = _load_meta(
        meta_path,
        "asin",
        lambda r: {
            "title": r.get("title"),
            "brand": r.get("brand"),
            "categories": r.get("category"),
            "price": r.get("price"),
            "description": r.get("description"),
        },
    )
    return RawData(f"amazon2018-{category}", inter, items, [reviews, meta_path])


def load_amazon2023(data_dir: Path, category: str) -> RawData:
    """Amazon reviews 2023 (Hou et al.): ``<Cat>.jsonl`` and ``meta_<Cat>.jsonl`` (``.gz``
    accepted). Items are keyed by ``parent_asin``; timestamps are in milliseconds."""
    data_dir = Path(data_dir)

    def pick(stem: str) -> Path:
        plain = data_dir / f"{stem}.jsonl"
        return plain if plain.exists() or not (data_dir / f"{stem}.jsonl.gz").exists() else data_dir / f"{stem}.jsonl.gz"

    reviews = pick(category)
    inter = _load_reviews(reviews, "user_id", "parent_asin", "rating", "timestamp", 1e-3)
    meta_path = pick(f"meta_{category}")
    items = _load_meta(
        meta_path,
        "parent_asin",
        lambda r: {
            "title": r.get("title"),
            "brand": r.get("store"),
            "categories": r.get("categories") or r.get("main_category"),
            "price": _price(r.get("price")),
            "description": r.get("description"),
        },
    )
    return RawData(f"amazon2023-{category}", inter, items, [reviews, meta_path])


# ---------------------------------------------------------------------------------------
# Yelp Open Dataset


def _yelp_time(value: object, path: Path, lineno: int) -> float:
    try:
        dt = datetime.strptime(str(value), "%Y-%m-%d %H:%M:%S")
    except ValueError:
        raise DataError(
            f"line {lineno}: expected 'YYYY-MM-DD HH:MM:SS', got {value!r}", path=path, field="date"
        ) from None
    return dt.replace(tzinfo=timezone.utc).timestamp()


def load_yelp_raw(data_dir: Path) -> RawData:
    """The Yelp Open Dataset as downloaded: ``yelp_academic_dataset_review.json`` /
    ``review.json`` and ``..._business.json`` / ``business.json``. Item text: business name,
    categories, city."""
    data_dir = Path(data_dir)

    def pick(kind: str) -> Path:
        long = data_dir / f"yelp_academic_dataset_{kind}.json"
        return long if long.exists() else data_dir / f"{kind}.json"

    reviews = _require_file(pick("review"), "Yelp review file")
    users, items, stamps, ratings = [], [], [], []
    for lineno, rec in _iter_records(reviews):
        users.append(str(_get(rec, "user_id", reviews, lineno)))
        items.append(str(_get(rec, "business_id", reviews, lineno)))
        stamps.append(_yelp_time(_get(rec, "date", reviews, lineno), reviews, lineno))
        ratings.append(_as_float(rec.get("stars", np.nan), reviews, "stars", lineno))
    if not users:
        raise DataError("contains no reviews", path=reviews)
    business = pick("business")
    meta = _load_meta(
        business,
        "business_id",
        lambda r: {"title": r.get("name"), "categories": r.get("categories"), "city": r.get("city")},
    )
    return RawData("yelp-raw", _frame(users, items, stamps, ratings), meta, [reviews, business])


# ---------------------------------------------------------------------------------------
# registry


@dataclass(frozen=True)
class DatasetSpec:
    """A named dataset: how to load it and where its files are expected."""

    name: str
    description: str
    needs_data_dir: bool
    load: Callable[[Path | None], RawData]
    download: str = ""


def _shared(sub: str, stem: str) -> Callable[[Path | None], RawData]:
    def load(data_dir: Path | None) -> RawData:
        assert data_dir is not None
        folder = data_dir / sub if (data_dir / sub).is_dir() else data_dir
        return load_inter_json(folder / f"{stem}.inter.json", folder / f"{stem}.item.json", sub)

    return load


DATASETS: dict[str, DatasetSpec] = {
    "ml-100k": DatasetSpec(
        "ml-100k",
        "MovieLens-100K (bundled with the recbole package; title, year, genres)",
        False,
        lambda d: load_ml100k(None),
        "bundled; original at https://grouplens.org/datasets/movielens/100k/",
    ),
    "amazon-office": DatasetSpec(
        "amazon-office",
        "Amazon Office Products 2014, 5-core (Office.inter.json / Office.item.json)",
        True,
        _shared("amazon-office", "Office"),
        "https://cseweb.ucsd.edu/~jmcauley/datasets/amazon/links.html (Office Products 5-core)",
    ),
    "yelp": DatasetSpec(
        "yelp",
        "Yelp (S3-Rec preprocessing; Yelp.inter.json / Yelp.item.json)",
        True,
        _shared("yelp", "Yelp"),
        "https://www.yelp.com/dataset (Yelp Open Dataset)",
    ),
}

RAW_PREFIXES = {
    "amazon2014": (load_amazon2014, "https://cseweb.ucsd.edu/~jmcauley/datasets/amazon/links.html"),
    "amazon2018": (load_amazon2018, "https://nijianmo.github.io/amazon/index.html"),
    "amazon2023": (load_amazon2023, "https://amazon-reviews-2023.github.io/"),
}


def resolve_data_dir(data_dir: str | Path | None) -> Path | None:
    """The data directory: the argument, else ``$REAEMB_DATA_DIR``, else None."""
    value = data_dir if data_dir not in (None, "") else os.environ.get("REAEMB_DATA_DIR")
    return Path(value).expanduser() if value else None


def load_raw(name: str, data_dir: str | Path | None = None) -> RawData:
    """Load a dataset by name.

    Names: ``ml-100k`` (default, offline), ``amazon-office``, ``yelp`` (inter/item JSON in
    the data directory), ``amazon2014:<Category>``, ``amazon2018:<Category>``,
    ``amazon2023:<Category>``, ``yelp-raw``, or ``json:<Name>`` for any
    ``<Name>.inter.json`` / ``<Name>.item.json`` pair in the data directory.
    """
    directory = resolve_data_dir(data_dir)
    prefix, _, arg = name.partition(":")
    known = sorted(DATASETS) + [f"{p}:<Category>" for p in RAW_PREFIXES] + ["yelp-raw", "json:<Name>"]

    def need_dir() -> Path:
        if directory is None:
            raise DataError(
                f"dataset '{name}' is read from a data directory: pass data_dir=... or set "
                "REAEMB_DATA_DIR"
            )
        if not directory.is_dir():
            raise DataError("data directory does not exist", path=directory)
        return directory

    if name in DATASETS:
        spec = DATASETS[name]
        return spec.load(need_dir() if spec.needs_data_dir else directory)
    if prefix in RAW_PREFIXES and arg:
        return RAW_PREFIXES[prefix][0](need_dir(), arg)
    if name == "yelp-raw":
        return load_yelp_raw(need_dir())
    if prefix == "json" and arg:
        d = need_dir()
        return load_inter_json(d / f"{arg}.inter.json", d / f"{arg}.item.json", arg)
    raise DataError(f"unknown dataset '{name}'; known: {', '.join(known)}")
