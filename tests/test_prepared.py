"""Prepared datasets: build once, reuse on the same config, round-trip through the files,
nothing half-written on error."""

from __future__ import annotations

import numpy as np
import pytest

import reaemb.data.prepared as prepared_mod
from conftest import write_inter_json
from reaemb.data import DataConfig, DataError, load_prepared, prepare

# items 0..5; user sequences chosen so that the split and co-occurrence are easy to check
SEQS = {"7": [0, 1, 2, 3, 4], "3": [1, 2, 1, 5, 0], "5": [2, 3, 4, 0, 1]}
ITEMS = {str(i): {"title": f"item {i}", "genre": "g" + str(i % 2)} for i in range(6)}


@pytest.fixture
def toy(tmp_path):
    write_inter_json(tmp_path / "src", "Toy", SEQS, ITEMS)
    return DataConfig(dataset="json:Toy", data_dir=str(tmp_path / "src"), user_core=5, item_core=1)


def test_split_and_mapping(toy, tmp_path):
    ds = prepare(toy, tmp_path / "data")
    assert ds.n_users == 3 and ds.n_items == 6
    assert list(ds.user_ids) == ["3", "5", "7"]  # numeric order of raw ids
    assert list(ds.item_ids) == ["", "0", "1", "2", "3", "4", "5"]  # 0 is padding
    # raw user "3": items 1 2 1 5 0 -> indices 2 3 2 6 1
    assert list(ds.sequence(0)) == [2, 3, 2, 6, 1]
    assert list(ds.train_sequence(0)) == [2, 3, 2]
    hist, tgt = ds.eval_split("valid")
    assert list(hist[0]) == [2, 3, 2] and tgt[0] == 6
    hist, tgt = ds.eval_split("test")
    assert list(hist[0]) == [2, 3, 2, 6] and tgt[0] == 1
    assert ds.attributes(1) == {"title": "item 0", "genre": "g0"}
    with pytest.raises(ValueError):
        ds.eval_split("train")


def test_cooccurrence_from_training_part(toy, tmp_path):
    ds = prepare(toy, tmp_path / "data")
    c = ds.cooccurrence.toarray()
    # training parts (indices): user "3": {2,3}; user "5": {3,4,5}; user "7": {1,2,3}
    assert c[2, 3] == 2 and c[3, 4] == 1 and c[3, 5] == 1 and c[1, 2] == 1 and c[1, 3] == 1
    assert c[4, 5] == 1 and c[2, 4] == 0
    assert c[6].sum() == 0  # raw item 5 only ever appears as a validation target
    np.testing.assert_array_equal(c, c.T)
    assert np.all(np.diag(c) == 0)


def test_groups(toy, tmp_path):
    ds = prepare(toy, tmp_path / "data")
    assert not ds.item_is_tail[0]
    # total counts of raw items 0..5: 3, 4, 3, 2, 2, 1. Shares below t: t=4 -> 5/6 (closest
    # to 0.8), so only raw item 1 (index 2) is a head item.
    assert ds.item_threshold == 4
    assert list(np.flatnonzero(~ds.item_is_tail[1:]) + 1) == [2]
    assert ds.stats["tail_items"]["share"] == pytest.approx(5 / 6, abs=1e-4)
    assert np.array_equal(ds.user_is_tail, ds.train_lengths < ds.user_threshold)


def test_reuse_same_config_and_round_trip(toy, tmp_path, monkeypatch):
    first = prepare(toy, tmp_path / "data")
    calls = []
    monkeypatch.setattr(prepared_mod, "preprocess", lambda *a, **k: calls.append(1))
    second = prepare(toy, tmp_path / "data")
    assert calls == [] and second.path == first.path
    np.testing.assert_array_equal(second.flat, first.flat)
    np.testing.assert_array_equal(second.offsets, first.offsets)
    np.testing.assert_array_equal(second.timestamps, first.timestamps)
    assert (second.cooccurrence != first.cooccurrence).nnz == 0
    assert second.item_attributes == first.item_attributes
    assert second.stats == first.stats
    # another config gets another folder
    monkeypatch.undo()
    other = prepare(toy, tmp_path / "data", user_core=4)
    assert other.path != first.path


def test_damaged_prepared_copy_is_detected(toy, tmp_path):
    ds = prepare(toy, tmp_path / "data")
    (ds.path / "items.parquet").write_bytes(b"garbage")
    with pytest.raises(DataError, match="manifest hash"):
        load_prepared(ds.path)
    rebuilt = prepare(toy, tmp_path / "data")  # rebuilds instead of using the damaged copy
    assert load_prepared(rebuilt.path).n_items == 6


def test_error_leaves_nothing_behind(toy, tmp_path):
    root = tmp_path / "data"
    with pytest.raises(DataError, match="k-core"):
        prepare(toy, root, user_core=6)
    assert not root.exists() or list(root.iterdir()) == []


def test_interrupted_write_leaves_nothing_behind(toy, tmp_path, monkeypatch):
    root = tmp_path / "data"

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(prepared_mod.sp, "save_npz", boom)
    with pytest.raises(KeyboardInterrupt):
        prepare(toy, root)
    assert list(root.iterdir()) == []


def test_prepare_into_run_directory(toy, isolated_runs):
    ds = prepare(toy, run="toy-run")
    assert ds.path.parent == isolated_runs / "runs" / "toy-run" / "data"
    assert (ds.path / "manifest.json").exists()
