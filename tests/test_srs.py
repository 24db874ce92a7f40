"""Sequential recommenders: the frozen-table input (every item keeps its row, the table never
trains), padding invariance, each backbone overfitting a tiny set, determinism and exact
resume, the experiment grid writing metrics.csv."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import CYCLE_ITEMS, cyclic_dataset
from reaemb.embeddings import save_item_embeddings
from reaemb.evaluation import EvalSet, compute_ranks
from reaemb.results import read_metrics
from reaemb.runs import run_dir
from reaemb.srs import BACKBONES, SRSConfig, build_model, left_pad, pca_table
from reaemb.training import alignment_loss, fit, length_buckets, run_grid, teacher_table

N_ITEMS = CYCLE_ITEMS


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def cyclic(tmp_path):
    return cyclic_dataset(tmp_path)


def tiny(backbone: str, **kw) -> SRSConfig:
    base = dict(backbone=backbone, hidden_size=32, max_length=8, num_layers=2, num_heads=2, dropout=0.0,
                batch_size=4, learning_rate=1e-2, max_epochs=40, patience=40, pca_dim=8, adapter_hidden=16,
                mask_prob=0.3, seed=0)
    return SRSConfig(**{**base, **kw})


def test_config_validation():
    with pytest.raises(ValueError, match="backbone"):
        SRSConfig(backbone="caser")
    with pytest.raises(ValueError, match="divisible"):
        SRSConfig(hidden_size=30, num_heads=4)
    with pytest.raises(ValueError, match="dropout"):
        SRSConfig(dropout=1.0)
    assert SRSConfig().hidden_size == 128 and SRSConfig().max_length == 200 and SRSConfig().dropout == 0.5


def test_pca_table_keeps_every_item_and_puts_padding_first():
    rng = np.random.default_rng(0)
    table = rng.normal(size=(6, 20)).astype(np.float32)
    table[-1] += 5.0  # the last item is far from the others: it must not become zero
    reduced, info = pca_table(table, dim=512)
    assert reduced.shape == (7, 6) and info["pca_dim"] == 6  # min(512, n_items=6, dim=20)
    assert torch.count_nonzero(reduced[0]) == 0
    assert torch.count_nonzero(reduced[1:], dim=1).min() > 0
    # distances between items are preserved up to the one scale factor
    d = np.linalg.norm(table[:, None] - table[None], axis=-1)
    r = torch.cdist(reduced[1:], reduced[1:]).numpy() * info["scale"]
    np.testing.assert_allclose(r, d, rtol=1e-4, atol=1e-4)
    assert pca_table(rng.normal(size=(50, 12)), dim=8)[1]["pca_dim"] == 8
    with pytest.raises(ValueError, match="non-finite"):
        pca_table(np.full((3, 4), np.nan))


def test_left_pad_and_buckets():
    padded = left_pad([np.array([1, 2, 3]), np.array([4]), np.array([5, 6, 7, 8, 9])], 4)
    assert padded.tolist() == [[0, 1, 2, 3], [0, 0, 0, 4], [6, 7, 8, 9]]
    lengths = torch.tensor([5, 1, 9, 3, 7, 2, 8])
    batches = length_buckets(lengths, 2, torch.Generator().manual_seed(0), bucket=4)
    assert sorted(torch.cat(batches).tolist()) == list(range(7))
    assert all(len(b) <= 2 for b in batches)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_representation_ignores_padding(backbone):
    torch.manual_seed(0)
    model = build_model(N_ITEMS, tiny(backbone, dropout=0.3), torch.randn(N_ITEMS, 12)).eval()
    short = torch.tensor([[3, 4, 5]])
    padded = torch.tensor([[0, 0, 0, 0, 3, 4, 5]])
    np.testing.assert_allclose(model.score_all(short), model.score_all(padded), rtol=1e-5, atol=1e-5)


def training_eval_set(ds, length: int) -> EvalSet:
    """Each user's last training item as the target of the training items before it: the
    set a model that overfits its training data ranks perfectly."""
    train = ds.train_sequences()
    histories, targets = [t[:-1] for t in train], np.array([t[-1] for t in train])
    n = len(train)
    return EvalSet("valid", left_pad(histories, length), torch.as_tensor(targets, dtype=torch.int64),
                   torch.zeros(n, 1, dtype=torch.int64),
                   torch.as_tensor(np.cumsum([0] + [len(h) for h in histories])),
                   torch.as_tensor(np.concatenate(histories), dtype=torch.int64), {"all": np.ones(n, bool)})


@pytest.mark.parametrize("backbone", BACKBONES)
def test_last_position_shortcut_equals_full_encoding(backbone):
    torch.manual_seed(0)
    model = build_model(N_ITEMS, tiny(backbone, dropout=0.3)).eval()
    seq = torch.tensor([[0, 0, 3, 4, 5, 31 if backbone == "bert4rec" else 6], [1, 2, 3, 4, 5, 6]])
    table = model.items.table()
    full = model.encode(seq, table)[:, -1]
    np.testing.assert_allclose(model.encode(seq, table, last_only=True)[:, -1].detach(), full.detach(),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("frozen", [False, True])
def test_backbone_overfits_tiny_set(cyclic, backbone, frozen):
    table = torch.randn(N_ITEMS, 48, generator=torch.Generator().manual_seed(1)) if frozen else None
    config = tiny(backbone, learning_rate=3e-3 if backbone == "bert4rec" else 5e-3, max_epochs=150, patience=150,
                  pca_dim=24)
    model = build_model(cyclic.n_items, config, table)
    before = model.items.frozen.clone() if frozen else None
    train_set = training_eval_set(cyclic, 8)
    result = fit(model, cyclic, valid_set=train_set, progress=False, device="cpu")
    losses = [h["loss"] for h in result.history]
    assert np.mean(losses[-10:]) < 0.6 * losses[0]
    # BCE never uses a user's own items as negatives, so they are not pushed down: the target
    # must be first among the items outside the history (for all but a rare user: with one
    # sampled negative per step, an item may still tie near the top after 150 epochs)
    ranks = compute_ranks(model, train_set, protocols=("full",), mask_history=True)["full"]
    assert (ranks == 0).mean() >= 0.9 and ranks.max() <= 2, ranks
    if frozen:
        assert torch.equal(model.items.frozen, before)  # the frozen table never changes
        assert all(not n.startswith("items.frozen") for n, _ in model.named_parameters())


def test_deterministic_and_resume_equals_uninterrupted(cyclic, tmp_path):
    config = tiny("sasrec", dropout=0.3, max_epochs=6, patience=6)
    straight = build_model(cyclic.n_items, config)
    r1 = fit(straight, cyclic, progress=False, device="cpu")
    again = build_model(cyclic.n_items, config)
    r2 = fit(again, cyclic, progress=False, device="cpu")
    strip = lambda h: [{k: v for k, v in e.items() if "seconds" not in k} for e in h]  # noqa: E731
    assert strip(r1.history) == strip(r2.history)

    ck = tmp_path / "ck"
    first = build_model(cyclic.n_items, config)
    fit(first, cyclic, progress=False, device="cpu", checkpoint_dir=ck, stop_after=2)  # interrupted
    resumed = build_model(cyclic.n_items, config)
    r3 = fit(resumed, cyclic, progress=False, device="cpu", checkpoint_dir=ck)
    assert strip(r3.history) == strip(r1.history)
    for (name, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name
    # a finished run is reloaded, not retrained
    done = build_model(cyclic.n_items, config)
    r4 = fit(done, cyclic, progress=False, device="cpu", checkpoint_dir=ck)
    assert strip(r4.history) == strip(r1.history)
    assert all(torch.equal(a, b) for a, b in zip(straight.state_dict().values(), done.state_dict().values()))
    with pytest.raises(ValueError, match="another config"):
        fit(build_model(cyclic.n_items, replace(config, hidden_size=16)), cyclic, progress=False,
            device="cpu", checkpoint_dir=ck)


def test_alignment_loss_and_its_errors(cyclic):
    a = torch.eye(4)
    assert alignment_loss(a, a, tau=0.1) < alignment_loss(a, a.flip(0), tau=0.1)
    model = build_model(cyclic.n_items, tiny("sasrec", align_alpha=0.5, max_epochs=2), torch.randn(N_ITEMS, 16))
    with pytest.raises(ValueError, match="align_target"):
        fit(model, cyclic, progress=False, device="cpu")
    target = torch.randn(cyclic.n_items + 1, 32)
    result = fit(model, cyclic, progress=False, device="cpu", align_target=target)
    assert result.epochs_run == 2


def test_run_grid_writes_metrics_and_skips_finished(cyclic, isolated_runs):
    run = run_dir("grid")
    table = torch.randn(cyclic.n_items, 16, generator=torch.Generator().manual_seed(2))
    save_item_embeddings(run.embeddings, "lrcl", table, cyclic)
    config = tiny("sasrec", max_epochs=3, patience=3, align_alpha=0.1)
    log = run_grid(run, cyclic, backbones=["sasrec", "gru4rec"], variants=["id", "lrcl"], seeds=[0],
                   config=config, progress=False, device="cpu")
    df = read_metrics(run)
    assert set(df["variant"]) == {"id", "lrcl+align"}
    assert set(df["protocol"]) == {"sampled100", "full"}
    assert set(df["group"]) == {"all", "tail_items", "head_items", "tail_users", "head_users"}
    assert len(df) == 4 * 2 * 5 * 6  # models x protocols x groups x (HR, NDCG at 5, 10, 20)
    assert not log["skipped"].any()
    assert (run.results / "ranks" / f"{cyclic.name}_sasrec_id_seed0" / "ranks.npz").exists()
    assert teacher_table(run, cyclic, 0, config).shape == (cyclic.n_items + 1, 32)
    again = run_grid(run, cyclic, backbones=["sasrec", "gru4rec"], variants=["id", "lrcl"], seeds=[0],
                     config=config, progress=False, device="cpu")
    assert again["skipped"].all()
    assert len(read_metrics(run)) == len(df)
    with pytest.raises(FileNotFoundError, match="notebook 02"):
        run_grid(run, cyclic, backbones=["sasrec"], variants=["scft"], seeds=[0], config=config,
                 progress=False, device="cpu")


def test_run_grid_retrains_a_variant_whose_table_changed(cyclic, isolated_runs):
    run = run_dir("stale")
    config = tiny("sasrec", max_epochs=2, patience=2)
    first = torch.randn(cyclic.n_items, 16, generator=torch.Generator().manual_seed(3))
    save_item_embeddings(run.embeddings, "lrcl", first, cyclic)
    kw = dict(backbones=["sasrec"], seeds=[0], config=config, progress=False, device="cpu")
    run_grid(run, cyclic, variants=["id", "lrcl"], **kw)
    before = read_metrics(run)
    # same table: everything skipped, nothing removed
    assert run_grid(run, cyclic, variants=["id", "lrcl"], **kw)["skipped"].all()
    # a rebuilt, different table: the lrcl model is retrained from scratch (its old checkpoint
    # would otherwise be resumed), the id model is left alone
    save_item_embeddings(run.embeddings, "lrcl", torch.randn(cyclic.n_items, 16), cyclic)
    log = run_grid(run, cyclic, variants=["id", "lrcl"], **kw).set_index("variant")
    assert bool(log.loc["id", "skipped"]) and not bool(log.loc["lrcl", "skipped"])
    after = read_metrics(run)
    assert len(after) == len(before)
    key = ["protocol", "group", "metric"]
    old = before[before["variant"] == "lrcl"].set_index(key)["value"]
    new = after[after["variant"] == "lrcl"].set_index(key)["value"]
    assert not np.allclose(old.sort_index().to_numpy(), new.sort_index().to_numpy(), equal_nan=True)
    same_id = before[before["variant"] == "id"].set_index(key)["value"].sort_index()
    assert np.allclose(same_id.to_numpy(), after[after["variant"] == "id"].set_index(key)["value"].sort_index(),
                       equal_nan=True)


def test_parallel_grid_equals_sequential_grid(cyclic, isolated_runs):
    """Two worker processes write the same rows, ranks and input fingerprints as one process
    (every model is seeded on its own), with more seeds for ``id`` than for ``lrcl``."""
    table = torch.randn(cyclic.n_items, 16, generator=torch.Generator().manual_seed(4))
    seeds = {"id": [0, 1], "lrcl": [1]}
    kw = dict(backbones=["sasrec", "gru4rec"], variants=["id", "lrcl"], seeds=seeds,
              config=tiny("sasrec", max_epochs=2, patience=2), progress=False, device="cpu")
    rows, logs = {}, {}
    for name, workers in (("seq", 1), ("par", 2)):
        run = run_dir(name)
        save_item_embeddings(run.embeddings, "lrcl", table, cyclic)
        logs[name] = run_grid(run, cyclic, workers=workers, **kw)
        rows[name] = read_metrics(run).sort_values(["backbone", "variant", "seed", "protocol", "group", "metric"])
        assert (run.results / "ranks" / f"{cyclic.name}_gru4rec_lrcl_seed1" / "ranks.npz").exists()
    assert len(logs["par"]) == 6 and not logs["par"]["skipped"].any()
    assert sorted(zip(rows["par"]["variant"], rows["par"]["seed"])) == sorted(zip(rows["seq"]["variant"],
                                                                                  rows["seq"]["seed"]))
    assert set(zip(rows["par"]["variant"], rows["par"]["seed"])) == {("id", 0), ("id", 1), ("lrcl", 1)}
    pd.testing.assert_frame_equal(rows["par"].reset_index(drop=True), rows["seq"].reset_index(drop=True))
    key = ["backbone", "variant", "seed"]
    pd.testing.assert_frame_equal(logs["par"][key], logs["seq"][key])  # same order as the sequential log
    assert (run_dir("par").results / "srs_inputs.json").read_text() == \
        (run_dir("seq").results / "srs_inputs.json").read_text()
    # finished models are skipped by the parallel grid too
    assert run_grid(run_dir("par"), cyclic, workers=2, **kw)["skipped"].all()


def test_run_grid_argument_errors(cyclic, isolated_runs):
    kw = dict(backbones=["sasrec"], config=tiny("sasrec", max_epochs=1), progress=False, device="cpu")
    with pytest.raises(ValueError, match="workers"):
        run_grid(run_dir("bad"), cyclic, variants=["id"], seeds=[0], workers=0, **kw)
    with pytest.raises(ValueError, match="seeds given for"):
        run_grid(run_dir("bad"), cyclic, variants=["id"], seeds={"lrcl": [0]}, **kw)
