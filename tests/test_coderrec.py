"""CoderRec: the RQ-VAE (rotation trick by hand, reconstruction falls, seeded codes, exact
resume, collisions and code usage by hand), the item prompt and last-token embeddings, the
small model's inputs, cross-scale training on a tiny random Llama (gradient reaches the small
model through the thought, exact resume) and inference that never calls the LLM."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import CYCLE_ITEMS, cyclic_dataset, tiny_backbone
from reaemb.backbone import decoder_of, last_hidden_state
from reaemb.coderrec import (
    BACKBONE,
    VARIANT,
    CoderRecConfig,
    artifacts_fingerprint,
    attach_llm,
    build_small_model,
    cross_scale_train,
    item_prompt_text,
    last_token_embeddings,
    prepare_artifacts,
    train_and_evaluate_coderrec,
)
from reaemb.evaluation import build_eval_set, compute_ranks
from reaemb.results import read_metrics
from reaemb.rqvae import (
    RQVAE,
    RQVAEConfig,
    code_usage,
    collision_stats,
    fit_rqvae,
    resolve_collisions,
    rotate_to,
    semantic_ids,
)
from reaemb.runs import run_dir

N_ITEMS = CYCLE_ITEMS


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def cyclic(tmp_path):
    return cyclic_dataset(tmp_path, genres=True)


def toy_table(n: int = 120, dim: int = 24, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g) @ torch.randn(6, dim, generator=g) * 3 + 2


TOY_RQ = RQVAEConfig(latent_dim=8, hidden=(32,), levels=3, codebook_size=8, epochs=40, batch_size=32, seed=0)


def small_config(**kw) -> CoderRecConfig:
    base = dict(hidden_size=16, max_length=8, dropout=0.0, batch_size=8, max_epochs=3, patience=3, cross_steps=4,
                cross_batch_size=4, cross_max_history=5, cross_lr=1e-3, cross_small_lr=1e-3, eval_every=2,
                learning_rate=1e-2, lora_r=2, lora_alpha=4, seed=0)
    return CoderRecConfig(**{**base, **kw})


# --------------------------------------------------------------------------- RQ-VAE


def test_rotation_trick_by_hand():
    z = torch.tensor([[1.0, 0.0]], requires_grad=True)
    q = torch.tensor([[0.0, 2.0]])
    out = rotate_to(z, q)
    torch.testing.assert_close(out, q)  # forward value is the quantized vector
    out.backward(torch.tensor([[1.0, 0.0]]))
    # R rotates (1,0) onto (0,1): R = [[0,-1],[1,0]]; s = |q|/|z| = 2; dL/dz = (sR)^T g = (0, -2)
    torch.testing.assert_close(z.grad, torch.tensor([[0.0, -2.0]]))
    # a vector already aligned with q is only scaled
    z2 = torch.tensor([[3.0, 0.0]], requires_grad=True)
    rotate_to(z2, torch.tensor([[6.0, 0.0]])).sum().backward()
    torch.testing.assert_close(z2.grad, torch.tensor([[2.0, 2.0]]))  # R = I, s = 2, g = (1, 1)


def test_rqvae_reconstruction_falls_and_codes_are_seeded():
    table = toy_table()
    a = fit_rqvae(table, TOY_RQ, progress=False)
    recon = [h["recon"] for h in a.history]
    assert recon[-1] < 0.6 * recon[0]
    codes = semantic_ids(a.model, table)
    assert codes.shape == (120, 3) and codes.dtype == torch.int64
    assert int(codes.min()) >= 0 and int(codes.max()) < 8
    b = fit_rqvae(table, TOY_RQ, progress=False)
    assert torch.equal(codes, semantic_ids(b.model, table))
    assert torch.equal(codes, semantic_ids(a.model, table))  # inference is deterministic too
    other = fit_rqvae(table, replace(TOY_RQ, seed=1), progress=False)
    assert not torch.equal(codes, semantic_ids(other.model, table))


def test_straight_through_variant_also_trains():
    table = toy_table()
    r = fit_rqvae(table, replace(TOY_RQ, rotation_trick=False), progress=False)
    assert r.history[-1]["recon"] < 0.6 * r.history[0]["recon"]


def test_rqvae_resume_equals_uninterrupted(tmp_path):
    table = toy_table()
    config = replace(TOY_RQ, epochs=20)
    straight = fit_rqvae(table, config, progress=False)
    fit_rqvae(table, config, progress=False, checkpoint_dir=tmp_path / "rq", stop_after=10)  # interrupted
    resumed = fit_rqvae(table, config, progress=False, checkpoint_dir=tmp_path / "rq")
    strip = lambda h: [{k: v for k, v in e.items() if k != "seconds"} for e in h]  # noqa: E731
    assert strip(resumed.history) == strip(straight.history)
    for (name, x), (_, y) in zip(straight.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(x, y), name
    with pytest.raises(ValueError, match="another config"):
        fit_rqvae(table, replace(config, beta=0.5), progress=False, checkpoint_dir=tmp_path / "rq")


def test_dead_codes_are_restarted_onto_residuals():
    table = toy_table()
    model = RQVAE(24, TOY_RQ)
    model.set_standardisation(table)
    with torch.no_grad():
        model.codebooks[0] = model.codebooks[0][:1].expand(8, -1)  # 8 copies: argmax takes code 0
    assert set(semantic_ids(model, table)[:, 0].tolist()) == {0}
    moved = model.restart_dead_codes(table, torch.Generator().manual_seed(0))
    assert moved[0] == 7
    assert len(set(semantic_ids(model, table)[:, 0].tolist())) > 1
    r = fit_rqvae(table, replace(TOY_RQ, epochs=10), progress=False)
    assert all(h["restarted"] == 0 for h in r.history[8:])  # no restarts in the last 20 % of epochs


def test_soft_latent_of_one_hot_codes_is_the_quantized_latent():
    model = RQVAE(24, TOY_RQ)
    model.set_standardisation(toy_table())
    z = model.encoder(model.standardise(toy_table()[:5]))
    zq, codes, _ = model.quantize(z)
    probs = F.one_hot(codes, TOY_RQ.codebook_size).float()
    torch.testing.assert_close(model.soft_latent(probs), zq)
    with pytest.raises(ValueError, match="code probabilities"):
        model.soft_latent(probs[:, :2])


def test_collisions_and_usage_by_hand():
    codes = torch.tensor([[1, 2, 3], [1, 2, 3], [0, 2, 3], [1, 2, 3], [0, 2, 3], [4, 4, 4]])
    sem = resolve_collisions(codes)
    assert sem[:, -1].tolist() == [0, 1, 0, 2, 1, 0]
    assert len({tuple(r) for r in sem.tolist()}) == 6
    assert collision_stats(codes) == {"items": 6, "unique": 3, "colliding_items": 3, "colliding_groups": 2,
                                      "max_group": 3}
    usage = code_usage(codes, 8)
    # level 0: codes 1,1,0,1,0,4 -> p = (2/6, 3/6, 1/6)
    p = np.array([2, 3, 1]) / 6
    assert usage[0]["used"] == 3
    assert usage[0]["perplexity"] == pytest.approx(math.exp(-(p * np.log(p)).sum()))
    # level 1: codes 2,2,2,2,2,4 -> p = (5/6, 1/6)
    q = np.array([5, 1]) / 6
    assert usage[1]["perplexity"] == pytest.approx(math.exp(-(q * np.log(q)).sum()))
    assert code_usage(torch.zeros(5, 1, dtype=torch.long), 8)[0]["perplexity"] == pytest.approx(1.0)
    with pytest.raises(ValueError):
        resolve_collisions(torch.tensor([1, 2, 3]))


# --------------------------------------------------------------------------- item embeddings


def test_item_prompt_text():
    assert item_prompt_text({"title": "Toy Story", "genres": "Animation, Comedy", "price": ""}) == \
        "Title: Toy Story; Genres: Animation, Comedy;"
    assert item_prompt_text({"release_year": "1995"}) == "Release year: 1995;"


def test_last_token_embeddings_are_each_texts_last_hidden_state():
    bb = tiny_backbone()
    texts = ["Title: Toy Story; Genres: Comedy;", "Title: Heat;", "Title: A much longer title of a film; Genres: Drama;"]
    table = last_token_embeddings(bb, texts, batch_size=2, progress=False)
    for row, text in enumerate(texts):
        ids = torch.tensor([bb.tokenizer(text)["input_ids"]])
        with torch.no_grad():
            h = last_hidden_state(bb.model, ids, torch.ones_like(ids))[0, -1]
        torch.testing.assert_close(table[row], h, atol=1e-5, rtol=1e-4)


# --------------------------------------------------------------------------- small model


def test_small_model_item_vectors_are_id_plus_code_embeddings(cyclic):
    sem = resolve_collisions(torch.randint(0, 8, (cyclic.n_items, 3), generator=torch.Generator().manual_seed(0)))
    model = build_small_model(cyclic.n_items, small_config(), sem, 8, 3)
    table = model.item_table()
    item = 7
    expected = model.items.embedding.weight[item] + sum(
        emb.weight[sem[item - 1, level]] for level, emb in enumerate(model.items.levels))
    torch.testing.assert_close(table[item], expected)
    assert torch.equal(table[0], torch.zeros(16))
    assert model.code_logits(torch.zeros(2, 16)).shape == (2, 3, 8)
    # small-model CE = item CE + code CE, each a cross-entropy computed here by hand
    seq = torch.tensor([[0, 3, 4, 5]])
    parts = model.losses(seq)
    h = model.encode(seq[:, :-1], model.items.table())[0, 1:]
    logits = h @ model.items.table().T
    logits[:, 0] = float("-inf")
    torch.testing.assert_close(parts["item_ce"], F.cross_entropy(logits, torch.tensor([4, 5])))
    code_t = sem[torch.tensor([3, 4])][:, :3]  # items 4, 5 are rows 3, 4
    torch.testing.assert_close(parts["code_ce"], F.cross_entropy(model.code_logits(h).reshape(-1, 8),
                                                                 code_t.reshape(-1)))


# --------------------------------------------------------------------------- cross-scale


def _cross_setup(cyclic, config):
    table = toy_table(cyclic.n_items, 24, seed=3)
    rq = fit_rqvae(table, replace(TOY_RQ, epochs=5), progress=False).model
    sem = resolve_collisions(semantic_ids(rq, table))
    small = build_small_model(cyclic.n_items, config, sem, 8, 3)
    llm = attach_llm(tiny_backbone(), table, rq, config)
    return table, rq, sem, small, llm


def test_llm_losses_reach_the_small_model_through_the_thought(cyclic):
    config = small_config()
    _, _, _, small, llm = _cross_setup(cyclic, config)
    seq = torch.tensor([[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]])
    h = small.encode(seq[:, :-1], small.items.table(), last_only=True)[:, -1]
    probs = F.gumbel_softmax(small.code_logits(h), tau=1.0, dim=-1)
    out = llm(seq[:, :-1], probs, thought_tokens=2)
    assert out.shape == (2, 32)
    parts = llm.losses(out, seq[:, -1])
    (parts["llm_ce"] + parts["mse"]).backward()
    assert small.code_head.weight.grad.abs().sum() > 0
    lora = [p for n, p in llm.named_parameters() if "lora_" in n]
    assert lora and all(p.requires_grad for p in lora)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in lora)
    assert all(not p.requires_grad for p in llm.rqvae.parameters())
    base = [p for n, p in llm.model.named_parameters() if "lora_" not in n]
    assert all(not p.requires_grad for p in base)


def test_cross_scale_resume_equals_uninterrupted_and_inference_skips_llm(cyclic, tmp_path):
    config = small_config(cross_steps=4, eval_every=2)
    valid = build_eval_set(cyclic, "valid", config.max_length, 0)
    _, _, _, small_a, llm_a = _cross_setup(cyclic, config)
    calls = []
    for module in (llm_a, decoder_of(llm_a.model), llm_a.model.get_input_embeddings()):
        module.register_forward_hook(lambda *args: calls.append(1))
    r1 = cross_scale_train(small_a, llm_a, cyclic, config, valid_set=valid, progress=False)
    assert len(r1.history) == 4 and calls
    assert [v["step"] for v in r1.valid] == [0, 2, 4]
    assert all(np.isfinite(h["llm_ce"]) and np.isfinite(h["mse"]) for h in r1.history)

    # inference: the small model alone; the LLM is never called
    calls.clear()
    ranks = compute_ranks(small_a, build_eval_set(cyclic, "test", config.max_length, 0), device="cpu")
    assert not calls and set(ranks) == {"sampled100", "full"}

    ck = tmp_path / "cross"
    _, _, _, small_b, llm_b = _cross_setup(cyclic, config)
    cross_scale_train(small_b, llm_b, cyclic, config, valid_set=valid, progress=False, checkpoint_dir=ck,
                      stop_after=2)  # interrupted after the first validation
    _, _, _, small_c, llm_c = _cross_setup(cyclic, config)
    r3 = cross_scale_train(small_c, llm_c, cyclic, config, valid_set=valid, progress=False, checkpoint_dir=ck)
    strip = lambda h: [{k: v for k, v in e.items() if k != "seconds"} for e in h]  # noqa: E731
    assert strip(r3.history) == strip(r1.history)
    assert r3.valid == r1.valid and r3.best_step == r1.best_step
    for (name, x), (_, y) in zip(small_a.state_dict().items(), small_c.state_dict().items()):
        torch.testing.assert_close(x, y, msg=name)
    with pytest.raises(ValueError, match="another config"):
        _, _, _, small_d, llm_d = _cross_setup(cyclic, replace(config, gumbel_tau=0.5))
        cross_scale_train(small_d, llm_d, cyclic, replace(config, gumbel_tau=0.5), valid_set=valid,
                          progress=False, checkpoint_dir=ck)


def test_run_writes_metrics_once_and_reuses_artifacts(cyclic, isolated_runs):
    run = run_dir("coder")
    loads = []

    def load_llm():
        loads.append(1)
        return tiny_backbone()

    rq = replace(TOY_RQ, epochs=5)
    art = prepare_artifacts(run, cyclic, load_llm, rq, progress=False)
    assert art.table.shape == (cyclic.n_items, 32) and art.sem_ids.shape == (cyclic.n_items, 4)
    assert len({tuple(r) for r in art.sem_ids.tolist()}) == cyclic.n_items
    assert art.collisions["colliding_items"] == cyclic.n_items - art.collisions["unique"]
    assert len(art.usage) == 3 and len(loads) == 1
    again = prepare_artifacts(run, cyclic, lambda: pytest.fail("the LLM must not load again"), rq, progress=False)
    assert torch.equal(again.sem_ids, art.sem_ids) and torch.equal(again.table, art.table)

    log = train_and_evaluate_coderrec(run, cyclic, art, 0, small_config(cross_steps=2), load_llm, device="cpu",
                                      progress=False)
    assert not log["skipped"] and log["cross_steps"] == 2
    df = read_metrics(run)
    assert set(df["backbone"]) == {BACKBONE} and set(df["variant"]) == {VARIANT}
    assert set(df["protocol"]) == {"sampled100", "full"}
    assert set(df["group"]) == {"all", "tail_items", "head_items", "tail_users", "head_users"}
    assert len(df) == 2 * 5 * 6
    skipped = train_and_evaluate_coderrec(run, cyclic, art, 0, small_config(), load_llm, progress=False)
    assert skipped["skipped"] and len(read_metrics(run)) == len(df)
    # a skipped seed still brings its histories back (for the notebook's plots)
    assert skipped["pretrain_history"] == log["pretrain_history"]
    assert skipped["cross_history"] == log["cross_history"] and skipped["cross_valid"] == log["cross_valid"]
    assert (art.folder / "embeddings" / "coderrec-last" / "manifest.json").exists()
    assert not (run.embeddings / "coderrec-last").exists()  # not a variant for notebook 04
    # rebuilt artifacts (another item table): the old rows and per-seed checkpoints are
    # dropped and the seed is trained again
    changed = replace(art, table=art.table + 1.0)
    assert artifacts_fingerprint(changed) != artifacts_fingerprint(art)
    redo = train_and_evaluate_coderrec(run, cyclic, changed, 0, small_config(cross_steps=2), load_llm,
                                       device="cpu", progress=False)
    assert not redo["skipped"] and len(read_metrics(run)) == len(df)
    assert train_and_evaluate_coderrec(run, cyclic, changed, 0, small_config(), load_llm, progress=False)["skipped"]


def test_config_validation():
    with pytest.raises(ValueError, match="cross_steps"):
        CoderRecConfig(cross_steps=-1)
    with pytest.raises(ValueError, match="gumbel_tau"):
        CoderRecConfig(gumbel_tau=0)
    with pytest.raises(ValueError, match="codebook_size"):
        RQVAEConfig(codebook_size=0)
