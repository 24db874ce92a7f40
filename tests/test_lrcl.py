"""SCFT / LRCL training: the loss by hand, the temperature clamp, resume equals an
uninterrupted run, checkpoints of another configuration are refused, variants are built,
skipped and rebuilt in a run directory."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import reaemb.backbone as backbone_mod
from conftest import tiny_backbone, write_inter_json
from reaemb.data import DataConfig, prepare
from reaemb.embeddings import load_item_embeddings
from reaemb.lrcl import (
    ItemEncoder,
    LRCLConfig,
    build_encoder,
    build_llm_variant,
    build_optimizer,
    contrastive_loss,
    infonce_loss,
    soft_clip_loss,
    train_contrastive,
    training_step,
)
from reaemb.runs import run_dir

# --------------------------------------------------------------------------- losses by hand


def _softmax(a: np.ndarray) -> np.ndarray:
    e = np.exp(a - a.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _soft_clip_numpy(x: np.ndarray, y: np.ndarray, tau: float) -> float:
    logits = x @ y.T / tau
    targets = _softmax((x @ x.T + y @ y.T) / (2 * tau))
    rows = -(targets * np.log(_softmax(logits))).sum(1).mean()
    cols = -(targets.T * np.log(_softmax(logits.T))).sum(1).mean()
    return 0.5 * (rows + cols)


X3 = np.array([[1.0, 0.0], [0.6, 0.8], [0.0, -1.0]])
Y3 = np.array([[0.8, 0.6], [0.0, 1.0], [-0.6, -0.8]])


def test_soft_clip_loss_matches_numpy_on_3x2():
    for tau in (0.5, 1.0, 0.07):
        got = soft_clip_loss(torch.tensor(X3), torch.tensor(Y3), tau)
        assert float(got) == pytest.approx(_soft_clip_numpy(X3, Y3, tau), rel=1e-10)


def test_soft_clip_loss_closed_form_2x2():
    # X = Y = I, tau = 1: logits = I, targets = softmax(I) = [e, 1] / (1 + e) per row, so the
    # loss is log(1 + e) - e / (1 + e) (both directions equal).
    eye = torch.eye(2, dtype=torch.float64)
    expected = math.log(1 + math.e) - math.e / (1 + math.e)
    assert float(soft_clip_loss(eye, eye, 1.0)) == pytest.approx(expected, rel=1e-12)
    assert expected == pytest.approx(0.58220, abs=1e-5)


def test_soft_targets_are_symmetric_not_identity():
    # The targets are soft: identical embeddings for all items give uniform targets, and
    # the loss is then log(batch) whatever tau is.
    x = torch.ones(3, 2, dtype=torch.float64) / math.sqrt(2)
    for tau in (0.1, 1.0):
        assert float(soft_clip_loss(x, x, tau)) == pytest.approx(math.log(3), rel=1e-12)


def test_infonce_by_hand():
    eye = torch.eye(2, dtype=torch.float64)
    # logits = I: each row's positive has probability e / (1 + e).
    assert float(infonce_loss(eye, eye, 1.0)) == pytest.approx(math.log(1 + math.e) - 1, rel=1e-12)
    logits = X3 @ Y3.T / 0.5
    rows = -np.log(np.diag(_softmax(logits))).mean()
    cols = -np.log(np.diag(_softmax(logits.T))).mean()
    got = infonce_loss(torch.tensor(X3), torch.tensor(Y3), 0.5)
    assert float(got) == pytest.approx(0.5 * (rows + cols), rel=1e-10)


def test_centring_removes_a_shared_direction():
    # Centring subtracts the mean of all 2B rows, (0.3, 0.1) for X3/Y3; the loss then equals
    # soft_clip on the normalised centred rows (computed in float32 by contrastive_loss), and
    # adding one vector to every row leaves it unchanged.
    x, y = torch.tensor(X3), torch.tensor(Y3)
    mean = (X3.sum(0) + Y3.sum(0)) / 6
    assert mean == pytest.approx(np.array([1.8 / 6, 0.6 / 6]))
    xc, yc = X3 - mean, Y3 - mean
    xc, yc = xc / np.linalg.norm(xc, axis=1, keepdims=True), yc / np.linalg.norm(yc, axis=1, keepdims=True)
    config = LRCLConfig(center=True, tau_init=0.5)
    got = contrastive_loss(x, y, torch.tensor(0.5, dtype=torch.float64), config)
    assert float(got) == pytest.approx(_soft_clip_numpy(xc, yc, 0.5), rel=1e-6)
    shift = torch.tensor([40.0, -25.0], dtype=torch.float64)
    shifted = contrastive_loss(x + shift, y + shift, torch.tensor(0.5, dtype=torch.float64), config)
    assert float(shifted) == pytest.approx(float(got), rel=1e-5)
    # without centring the shared direction dominates: almost identical rows, loss near log(3)
    plain = LRCLConfig(center=False, tau_init=0.5)
    dominated = contrastive_loss(x + shift, y + shift, torch.tensor(0.5, dtype=torch.float64), plain)
    assert float(dominated) == pytest.approx(math.log(3), abs=1e-3)
    assert abs(float(dominated) - float(got)) > 0.1


def test_tau_is_clamped_in_the_loss():
    x, y = torch.tensor(X3), torch.tensor(Y3)
    for fn in (soft_clip_loss, infonce_loss):
        tau = torch.tensor(1e-6, dtype=torch.float64, requires_grad=True)
        low = fn(x, y, tau, tau_min=1e-3)
        assert float(low) == pytest.approx(float(fn(x, y, 1e-3, tau_min=1e-3)), rel=1e-12)
        (grad,) = torch.autograd.grad(low, tau)
        assert float(grad) == 0.0  # below the clamp tau gets no gradient


def test_tau_stays_at_least_tau_min_after_an_optimizer_step():
    # Both views identical: a lower tau always lowers the InfoNCE loss, so a large Adam step
    # drives tau far below tau_min (to about 0.05 - 0.5); the clamp holds it at tau_min.
    bb = tiny_backbone()
    config = LRCLConfig(method="scft", loss="infonce", lr=0.5, tau_init=0.05, tau_min=0.05, lora_dropout=0.0,
                        batch_size=3)
    encoder = build_encoder(bb, config).train()
    optimizer = build_optimizer(encoder, config)
    views = [bb.prompt_ids(t) for t in ("title is A", "title is Bee; year is 1990", "title is Sea")]
    for _ in range(2):
        training_step(encoder, encoder, optimizer, views + views, config)
        assert float(encoder.tau) == pytest.approx(0.05, abs=1e-7)
    # the same step without the clamp would have left tau below tau_min
    encoder.tau.data.fill_(0.2)
    emb = encoder(prompts=views + views)
    loss = infonce_loss(torch.nn.functional.normalize(emb[:3], dim=-1),
                        torch.nn.functional.normalize(emb[3:], dim=-1), encoder.tau)
    (grad,) = torch.autograd.grad(loss, encoder.tau)
    assert float(grad) > 0


def test_config_rejects_bad_values():
    with pytest.raises(ValueError):
        LRCLConfig(method="sft")
    with pytest.raises(ValueError):
        LRCLConfig(loss="mse")
    with pytest.raises(ValueError):
        LRCLConfig(batch_size=1)
    with pytest.raises(ValueError):
        LRCLConfig(tau_init=1e-4, tau_min=1e-3)


# --------------------------------------------------------------------------- resume


def _attributes(n: int = 12) -> list[dict]:
    genres = ["Comedy", "Drama", "Action", "Horror"]
    return [{}] + [{"title": f"Movie {i}", "year": str(1990 + i), "genres": f"{genres[i % 4]}, {genres[(i + 1) % 4]}"}
                   for i in range(1, n + 1)]


def _trained_state(encoder: ItemEncoder) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in encoder.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("method", ["scft", "lrcl"])
def test_resume_equals_uninterrupted(method, tmp_path):
    config = LRCLConfig(method=method, steps=4, batch_size=3, lr=1e-2, checkpoint_every=2, seed=3)
    straight = train_contrastive(tiny_backbone(), _attributes(), config, tmp_path / "a", progress=False)
    first = train_contrastive(tiny_backbone(), _attributes(), config, tmp_path / "b", progress=False, stop_after=2)
    assert len(first.history) == 2
    assert json.loads((tmp_path / "b" / "latest" / "state.json").read_text())["step"] == 2
    resumed = train_contrastive(tiny_backbone(), _attributes(), config, tmp_path / "b", progress=False)
    assert resumed.resumed_from == 2
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in straight.history]
    assert [h["tau"] for h in resumed.history] == [h["tau"] for h in straight.history]
    a, b = _trained_state(straight.encoder), _trained_state(resumed.encoder)
    assert a.keys() == b.keys() and any("lora" in k for k in a)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)
    # the run really trained: LoRA B matrices moved away from their zero initialisation
    assert any(float(v.abs().sum()) > 0 for k, v in a.items() if "lora_B" in k)
    # ... and the checkpoint on disk is the final state
    adapter = load_file(str(tmp_path / "b" / "latest" / "adapter" / "adapter_model.safetensors"))
    assert len(adapter) > 0


def test_checkpoint_of_another_configuration_is_refused(tmp_path):
    config = LRCLConfig(method="scft", steps=2, batch_size=3, checkpoint_every=1)
    train_contrastive(tiny_backbone(), _attributes(), config, tmp_path, progress=False, stop_after=1)
    with pytest.raises(ValueError, match="different configuration"):
        train_contrastive(tiny_backbone(), _attributes(), LRCLConfig(method="scft", steps=2, batch_size=3, lr=1e-3),
                          tmp_path, progress=False)


def test_step_seeding_makes_runs_repeatable(tmp_path):
    config = LRCLConfig(method="lrcl", steps=2, batch_size=3, lr=1e-2, checkpoint_every=0)
    a = train_contrastive(tiny_backbone(), _attributes(), config, None, progress=False)
    b = train_contrastive(tiny_backbone(), _attributes(), config, None, progress=False)
    c = train_contrastive(tiny_backbone(), _attributes(), LRCLConfig(**{**config.__dict__, "seed": 1}), None,
                          progress=False)
    assert a.losses == b.losses and a.losses != c.losses


# --------------------------------------------------------------------------- variants in a run


@pytest.fixture
def toy_dataset(tmp_path):
    genres = ["Comedy", "Drama", "Action"]
    items = {str(i): {"title": f"Movie {i}", "genres": genres[i % 3]} for i in range(8)}
    rng = np.random.default_rng(0)
    seqs = {str(u): [int(x) for x in rng.choice(8, size=6, replace=False)] for u in range(10)}
    write_inter_json(tmp_path / "src", "Toy", seqs, items)
    return prepare(DataConfig(dataset="json:Toy", data_dir=str(tmp_path / "src"), user_core=5, item_core=1),
                   tmp_path / "data")


def test_build_llm_variant_builds_skips_and_rebuilds(toy_dataset, isolated_runs, monkeypatch):
    loads = []

    def fake_load(config):
        loads.append(config)
        return tiny_backbone()

    monkeypatch.setattr(backbone_mod, "load_backbone", fake_load)
    run = run_dir("toy")
    bb_config = backbone_mod.BackboneConfig(model="tiny")
    config = LRCLConfig(steps=2, batch_size=3, checkpoint_every=1)
    for variant in ("inference", "scft", "lrcl"):
        out = build_llm_variant(variant, toy_dataset, run, bb_config, config, batch_size=4, progress=False)
        assert not out["skipped"] and out["n_items"] == toy_dataset.n_items
        table, manifest = load_item_embeddings(run.embeddings / variant, toy_dataset)
        assert table.shape == (toy_dataset.n_items, 32) and torch.isfinite(table).all()
        assert len(out["history"]) == (0 if variant == "inference" else 2)
        assert (run.results / f"llm_{variant}.json").exists()
    assert (run.root / "models" / "lrcl" / "thought" / "thought.safetensors").exists()
    assert len(loads) == 3
    # same settings: skipped, summary returned from disk
    again = build_llm_variant("lrcl", toy_dataset, run, bb_config, config, progress=False)
    assert again["skipped"] and [h["loss"] for h in again["history"]] == [h["loss"] for h in out["history"]]
    assert len(loads) == 3
    # more steps, same training configuration: continues from the checkpoint at step 2
    more = build_llm_variant("lrcl", toy_dataset, run, bb_config, LRCLConfig(steps=3, batch_size=3, checkpoint_every=1),
                             progress=False)
    assert not more["skipped"] and len(more["history"]) == 3
    assert more["history"][:2] == out["history"]
    # another learning rate: the old checkpoint is discarded and the variant rebuilt from step 0
    other = build_llm_variant("lrcl", toy_dataset, run, bb_config,
                              LRCLConfig(steps=2, batch_size=3, lr=1e-3, checkpoint_every=1), progress=False)
    assert not other["skipped"] and len(other["history"]) == 2
    with pytest.raises(ValueError):
        build_llm_variant("crrl", toy_dataset, run, bb_config, config)


def test_crrl_is_retrained_when_the_lrcl_model_changes(toy_dataset, isolated_runs, monkeypatch):
    from reaemb.crrl import CRRLConfig
    from reaemb.crrl_llm import build_crrl_variant

    monkeypatch.setattr(backbone_mod, "load_backbone", lambda config: tiny_backbone())
    run = run_dir("toy-crrl")
    bb_config = backbone_mod.BackboneConfig(model="tiny")
    build_llm_variant("lrcl", toy_dataset, run, bb_config, LRCLConfig(steps=1, batch_size=3), progress=False)
    crrl = CRRLConfig(steps=1, anchors_per_step=2, num_generations=2, candidate_refresh_every=1,
                      negative_fallback_share=0.5, n_negatives=2)
    first = build_crrl_variant(toy_dataset, run, bb_config, crrl, progress=False)
    assert not first["skipped"] and first["lrcl_fingerprint"] is not None
    assert build_crrl_variant(toy_dataset, run, bb_config, crrl, progress=False)["skipped"]
    # another LRCL model (another learning rate): CRRL starts over from it
    build_llm_variant("lrcl", toy_dataset, run, bb_config, LRCLConfig(steps=1, batch_size=3, lr=1e-2), progress=False)
    again = build_crrl_variant(toy_dataset, run, bb_config, crrl, progress=False)
    assert not again["skipped"] and again["lrcl_fingerprint"] != first["lrcl_fingerprint"]
    # another CRRL configuration: retrained too
    other = build_crrl_variant(toy_dataset, run, bb_config, CRRLConfig(**{**crrl.__dict__, "sigma": 0.5}),
                               progress=False)
    assert not other["skipped"]
