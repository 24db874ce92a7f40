"""The CRRL policy over an LLM (tiny random Llama): the cached rollouts equal the two-pass
forward of LRCL, only the thought module learns, and a resumed run equals an uninterrupted one."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from reaemb.backbone import collate
from reaemb.crrl import CRRLConfig, build_anchors, crrl_step, sample_rollouts, train_crrl
from reaemb.crrl_llm import (
    LLMThoughtPolicy,
    build_crrl_variant,
    build_prefix_cache,
    crrl_evaluation,
)
from reaemb.runs import run_dir
from reaemb.thought import ThoughtAttention, ThoughtConfig, thought_forward

T, E, D = 48, 49, 32  # ids of <|Thought|> and EOS in the toy vocabulary; hidden size
N_ITEMS = 12


def _model(seed: int = 0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=50, hidden_size=D, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def _module(seed: int = 0):
    torch.manual_seed(seed)
    module = ThoughtAttention(ThoughtConfig(hidden_size=D))
    with torch.no_grad():
        module.scale.fill_(0.5)
    return module


def _prompts():
    rng = np.random.default_rng(0)
    return [rng.integers(1, 40, size=int(rng.integers(3, 9))).tolist() + [T, E] for _ in range(N_ITEMS)]


def _policy(model, module, cached: bool = True):
    prompts = _prompts()
    cache = build_prefix_cache(model, prompts, T, E, pad_id=0, batch_size=5, progress=False) if cached else None
    return LLMThoughtPolicy(model, module, cache, prompts, pad_id=0)


def _reference(model, module, items, noise=None):
    ids, mask = collate([_prompts()[i - 1] for i in items], 0, "left")
    with torch.no_grad():
        return thought_forward(model, module, ids, mask, thought_id=T, thought_noise=noise)


def _anchors():
    c = np.zeros((N_ITEMS + 1, N_ITEMS + 1), dtype=int)
    for i in range(1, N_ITEMS + 1):
        j = i % N_ITEMS + 1
        c[i, j] = c[j, i] = 3
    return build_anchors(sp.csr_matrix(c), n_negatives=4, seed=0)


def test_noise_free_embedding_equals_thought_forward():
    model, module = _model(), _module()
    policy = _policy(model, module)
    items = [3, 1, 7, 12]
    ref = _reference(model, module, items)
    states = policy.prefix_states(torch.tensor(items))
    with torch.no_grad():
        mu = policy.thought(states)
    torch.testing.assert_close(mu, ref.thought, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(policy.embed(states, mu), ref.embedding, atol=1e-5, rtol=1e-4)
    table = policy.catalogue_table(batch_size=5)
    assert table.shape == (N_ITEMS + 1, D) and torch.all(table[0] == 0)
    torch.testing.assert_close(table[torch.tensor(items)], ref.embedding, atol=1e-5, rtol=1e-4)
    # the cache-free policy (pass 1 per batch) gives the same table
    torch.testing.assert_close(_policy(model, module, cached=False).catalogue_table(batch_size=5), table,
                               atol=1e-5, rtol=1e-4)


def test_rollouts_equal_thought_forward_with_noise():
    model, module = _model(), _module()
    policy = _policy(model, module)
    items = [2, 5, 9]
    g = torch.Generator().manual_seed(1)
    eps = 0.3 * torch.randn(len(items), 3, D, generator=g)  # three rollouts per anchor
    states = policy.prefix_states(torch.tensor(items))
    with torch.no_grad():
        mu = policy.thought(states)
    emb = policy.embed(states, mu.unsqueeze(1) + eps)
    assert emb.shape == (len(items), 3, D)
    for k in range(3):
        ref = _reference(model, module, items, noise=eps[:, k])
        torch.testing.assert_close(emb[:, k], ref.embedding, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(emb[:, 0], emb[:, 1])  # the noise matters
    # rollouts are decoded in chunks when memory asks for it: same result
    policy.max_rollout_rows = 4
    torch.testing.assert_close(policy.embed(states, mu.unsqueeze(1) + eps), emb, atol=1e-6, rtol=1e-5)


def test_cached_and_uncached_policies_give_identical_rewards():
    model, module = _model(), _module()
    anchors = _anchors()
    cfg = CRRLConfig(num_generations=4, sigma=0.5)
    cached, fresh = _policy(model, module), _policy(model, module, cached=False)
    table = cached.catalogue_table()
    batch = anchors.subset(np.arange(6))
    a = sample_rollouts(cached, batch, table, cfg, step=3)
    b = sample_rollouts(fresh, batch, table, cfg, step=3)
    assert torch.equal(a.rewards, b.rewards)
    assert a.rewards.std() > 0  # the test would be empty if every rollout ranked the same


def test_only_the_thought_module_learns():
    model, module = _model(), _module()
    policy = _policy(model, module)
    llm_before = {k: v.clone() for k, v in model.state_dict().items()}
    mod_before = {k: v.clone() for k, v in module.state_dict().items()}
    anchors = _anchors()
    cfg = CRRLConfig(num_generations=6, sigma=0.5, learning_rate=1e-2)
    opt = torch.optim.Adam(module.parameters(), lr=cfg.learning_rate)
    crrl_step(policy, anchors.subset(np.arange(8)), policy.catalogue_table(), opt, cfg, step=0)
    assert all(not p.requires_grad and p.grad is None for p in model.parameters())
    assert all(torch.equal(v, llm_before[k]) for k, v in model.state_dict().items())
    grads = [p.grad for p in module.parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    assert any(not torch.equal(v, mod_before[k]) for k, v in module.state_dict().items())


def test_resume_equals_uninterrupted_with_the_llm_policy(tmp_path):
    model = _model()
    anchors = _anchors()
    cfg = CRRLConfig(num_generations=4, sigma=0.5, learning_rate=1e-2, steps=6, anchors_per_step=4,
                     checkpoint_every=2, candidate_refresh_every=3)

    def run(module, **kw):
        policy = _policy(model, module)
        return train_crrl(policy, module, anchors, policy.catalogue_table(), cfg, refresh_table=policy.catalogue_table,
                          evaluate=crrl_evaluation(anchors), progress=False, **kw), module

    hist_a, straight = run(_module())
    run(_module(), checkpoint_dir=tmp_path / "ck", stop_after=4)
    hist_b, resumed = run(_module(seed=5), checkpoint_dir=tmp_path / "ck")  # weights from the checkpoint
    assert [h["reward"] for h in hist_a] == [h["reward"] for h in hist_b]
    assert [h.get("eval_train_reward") for h in hist_a] == [h.get("eval_train_reward") for h in hist_b]
    assert "eval_train_first" in hist_a[0] and "eval_train_first" in hist_a[3] and "eval_train_first" not in hist_a[1]
    for p, q in zip(straight.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p, q)
    with pytest.raises(ValueError, match="different configuration"):
        policy = _policy(model, _module())
        train_crrl(policy, policy.module, anchors, policy.catalogue_table(), CRRLConfig(num_generations=4, sigma=0.2),
                   checkpoint_dir=tmp_path / "ck", progress=False)


def test_prefix_cache_rejects_bad_prompts_and_items():
    model = _model()
    with pytest.raises(ValueError, match="Thought"):
        build_prefix_cache(model, [[1, 2, 3, E, T]], T, E, progress=False)
    cache = build_prefix_cache(model, _prompts(), T, E, progress=False)
    assert cache.n_items == N_ITEMS and cache.nbytes > 0
    with pytest.raises(ValueError):
        cache.gather([0])


def test_crrl_variant_needs_the_lrcl_model(isolated_runs):
    with pytest.raises(FileNotFoundError, match="notebook 02"):
        build_crrl_variant(None, run_dir("empty"), None)
