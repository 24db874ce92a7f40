"""Loaders on small fixture files written here, the real bundled ml-100k, and clear errors on
bad input."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from conftest import shared_data_dir, write_inter_json
from reaemb.data import DataError, describe, load_raw
from reaemb.data.loaders import load_ml100k

# five users, four items; enough for a 3-core on users
SEQS = {"u1": ["A", "B", "C"], "u2": ["B", "C", "D"], "u3": ["A", "C", "D"]}


def _gz_lines(path: Path, lines: list[str]) -> None:
    with gzip.open(path, "wt", encoding="utf-8") as fh:
        fh.write("\n".join(lines) + "\n")


def _reviews(user_key, item_key, rating_key, time_key, scale=1):
    out = []
    for u, seq in SEQS.items():
        for t, i in enumerate(seq):
            # file order is NOT chronological: later reviews come first
            out.append({user_key: u, item_key: i, rating_key: 5.0, time_key: (100 - t) * scale})
    return out


def test_amazon2014_reviews_and_python_literal_meta(tmp_path):
    _gz_lines(tmp_path / "reviews_Toy.json.gz", [json.dumps(r) for r in _reviews("reviewerID", "asin", "overall", "unixReviewTime")])
    meta = [repr({"asin": i, "title": f"Item {i}", "categories": [["Office", "Pens"]], "price": 2.5}) for i in "ABCD"]
    _gz_lines(tmp_path / "meta_Toy.json.gz", meta)
    raw = load_raw("amazon2014:Toy", tmp_path)
    assert raw.stats() == {"users": 3, "items": 4, "interactions": 9}
    assert raw.items["A"] == {"title": "Item A", "categories": "Office, Pens", "price": "2.50"}
    stats = describe("amazon2014:Toy", tmp_path, user_core=3, item_core=1)
    assert stats["processed"]["interactions"] == 9


def test_amazon2018(tmp_path):
    _gz_lines(tmp_path / "Toy.json.gz", [json.dumps(r) for r in _reviews("reviewerID", "asin", "overall", "unixReviewTime")])
    meta = [json.dumps({"asin": i, "title": f"Item {i}", "category": ["Office"], "brand": "X", "description": ["Nice", "pen"]}) for i in "ABCD"]
    _gz_lines(tmp_path / "meta_Toy.json.gz", meta)
    raw = load_raw("amazon2018:Toy", tmp_path)
    assert raw.items["B"] == {"title": "Item B", "brand": "X", "categories": "Office", "description": "Nice, pen"}


def test_amazon2023_uses_parent_asin_and_ms_timestamps(tmp_path):
    rows = _reviews("user_id", "parent_asin", "rating", "timestamp", scale=1000)
    (tmp_path / "Toy.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    meta = [json.dumps({"parent_asin": i, "title": f"Item {i}", "store": "S", "categories": [], "main_category": "Office", "price": None}) for i in "ABCD"]
    (tmp_path / "meta_Toy.jsonl").write_text("\n".join(meta))
    raw = load_raw("amazon2023:Toy", tmp_path)
    assert raw.interactions["timestamp"].max() == 100.0
    assert raw.items["C"] == {"title": "Item C", "brand": "S", "categories": "Office"}


def test_amazon_chronological_order_after_preprocessing(tmp_path):
    _gz_lines(tmp_path / "Toy.json.gz", [json.dumps(r) for r in _reviews("reviewerID", "asin", "overall", "unixReviewTime")])
    _gz_lines(tmp_path / "meta_Toy.json.gz", [json.dumps({"asin": i, "title": i}) for i in "ABCD"])
    from reaemb.data import DataConfig, preprocess

    ds = preprocess(load_raw("amazon2018:Toy", tmp_path), DataConfig(dataset="x", user_core=3, item_core=1))
    # u1 reviewed A, B, C at times 100, 99, 98: chronological order is C, B, A
    assert [ds.item_ids[i] for i in ds.sequence(0)] == ["C", "B", "A"]


def test_yelp_raw(tmp_path):
    rows = []
    for u, seq in SEQS.items():
        for t, i in enumerate(seq):
            rows.append({"review_id": f"{u}{t}", "user_id": u, "business_id": i, "stars": 4, "date": f"2019-01-0{t + 1} 10:00:00"})
    (tmp_path / "review.json").write_text("\n".join(json.dumps(r) for r in rows))
    biz = [json.dumps({"business_id": i, "name": f"Cafe {i}", "categories": "Coffee, Bakery", "city": "Austin"}) for i in "ABCD"]
    (tmp_path / "business.json").write_text("\n".join(biz))
    raw = load_raw("yelp-raw", tmp_path)
    assert raw.stats()["interactions"] == 9
    assert raw.items["D"] == {"title": "Cafe D", "categories": "Coffee, Bakery", "city": "Austin"}
    bad = dict(rows[0], date="yesterday")
    (tmp_path / "review.json").write_text(json.dumps(bad))
    with pytest.raises(DataError, match="date"):
        load_raw("yelp-raw", tmp_path)


def test_inter_json_pair(tmp_path):
    write_inter_json(tmp_path, "Toy", {"0": [0, 1, 2], "1": [2, 1, 0]}, {str(i): {"title": f"t{i}"} for i in range(3)})
    raw = load_raw("json:Toy", tmp_path)
    assert raw.stats() == {"users": 2, "items": 3, "interactions": 6}
    assert list(raw.interactions["timestamp"][:3]) == [0, 1, 2]


# ---- bad input ------------------------------------------------------------------------


def test_unknown_dataset_and_missing_data_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("REAEMB_DATA_DIR", raising=False)
    with pytest.raises(DataError, match="unknown dataset 'nope'"):
        load_raw("nope")
    with pytest.raises(DataError, match="REAEMB_DATA_DIR"):
        load_raw("amazon-office")
    with pytest.raises(DataError, match="does not exist"):
        load_raw("amazon-office", tmp_path / "missing")


def test_empty_file(tmp_path):
    (tmp_path / "Toy.inter.json").write_text("")
    (tmp_path / "Toy.item.json").write_text("{}")
    with pytest.raises(DataError, match=r"Toy\.inter\.json.*empty"):
        load_raw("json:Toy", tmp_path)


def test_missing_field_names_file_and_field(tmp_path):
    rows = _reviews("reviewerID", "asin", "overall", "unixReviewTime")
    del rows[2]["asin"]
    _gz_lines(tmp_path / "Toy.json.gz", [json.dumps(r) for r in rows])
    with pytest.raises(DataError) as err:
        load_raw("amazon2018:Toy", tmp_path)
    assert "Toy.json.gz" in str(err.value) and "'asin'" in str(err.value) and "line 3" in str(err.value)


def test_non_numeric_ids_and_values(tmp_path):
    write_inter_json(tmp_path, "Toy", {"0": [0, "abc"]}, {"0": {"title": "x"}})
    with pytest.raises(DataError, match="item_id"):
        load_raw("json:Toy", tmp_path)
    folder = tmp_path / "ml"
    folder.mkdir()
    (folder / "ml-100k.inter").write_text("user_id:token\titem_id:token\trating:float\ttimestamp:float\n1\t2\t3\tnoon\n")
    (folder / "ml-100k.item").write_text("item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n2\tX\t1990\tDrama\n")
    with pytest.raises(DataError, match=r"ml-100k\.inter.*'timestamp'"):
        load_ml100k(folder)
    (folder / "ml-100k.inter").write_text("user_id:token\titem_id:token\trating:float\ttimestamp:float\nbob\t2\t3\t1\n")
    with pytest.raises(DataError, match="user_id"):
        load_ml100k(folder)


def test_missing_columns(tmp_path):
    (tmp_path / "ml-100k.inter").write_text("user_id:token\titem_id:token\n1\t2\n")
    with pytest.raises(DataError, match="missing column"):
        load_ml100k(tmp_path)


def test_items_without_text(tmp_path):
    items = {"0": {"title": "a"}, "1": {"title": ""}, "3": {"title": "d"}}  # "2" has no record
    write_inter_json(tmp_path, "Toy", {"0": [0, 1, 2, 3, 0], "1": [0, 1, 2, 3, 3]}, items)
    with pytest.raises(DataError) as err:
        describe("json:Toy", tmp_path, user_core=3, item_core=1)
    msg = str(err.value)
    assert "Toy.item.json" in msg and "no text" in msg and "'1'" in msg and "'2'" in msg
    stats = describe("json:Toy", tmp_path, user_core=3, item_core=1, missing_text="drop")
    assert stats["processed"]["items"] == 2 and stats["processed"]["interactions"] == 6


def test_kcore_to_nothing(tmp_path):
    write_inter_json(tmp_path, "Toy", {"0": [0, 1]}, {"0": {"title": "a"}, "1": {"title": "b"}})
    with pytest.raises(DataError, match="k-core.*left no interactions"):
        describe("json:Toy", tmp_path)


# ---- real data ------------------------------------------------------------------------


def test_ml100k_describe_counts():
    stats = describe("ml-100k")
    assert stats["raw"] == {"users": 943, "items": 1682, "interactions": 100000}
    p = stats["processed"]
    assert p["sequence_length"]["min"] >= 5
    assert 0.77 <= stats["tail_items"]["share"] <= 0.83


@pytest.mark.parametrize(
    "name,expected",
    [("amazon-office", (4905, 2420, 53258)), ("yelp", (30431, 20033, 316354))],
)
def test_shared_datasets_raw_counts(name, expected):
    data_dir = shared_data_dir()
    if data_dir is None or not (data_dir / name).is_dir():
        pytest.skip("shared datasets not available (set REAEMB_DATA_DIR)")
    raw = load_raw(name, data_dir)
    assert tuple(raw.stats().values()) == expected
