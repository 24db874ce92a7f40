"""CRRL maths on hand-made inputs and a toy policy (no language model needed)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from conftest import write_inter_json
from reaemb.crrl import (
    CRRLConfig,
    anchor_scores,
    build_anchors,
    cooccurrence_reward,
    first_rank_share,
    gaussian_log_prob,
    group_advantages,
    grpo_loss,
    rank_reward,
    rollout_noise,
    table_reward,
    train_crrl,
    validation_cooccurrence,
)
from reaemb.data import DataConfig, prepare


def test_rank_reward_by_hand():
    r = rank_reward(torch.tensor([0, 1, 2, 6]))
    expected = [0.5, 1 / (1 + math.log2(3)), 1 / 3, 1 / 4]
    assert r.tolist() == pytest.approx(expected)


def test_cooccurrence_reward_ties_and_weights():
    # one positive: negatives 0.9 > 0.5, 0.5 ties (not strictly higher), 0.1 -> rank 1
    s = torch.tensor([[0.5, 0.9, 0.5, 0.1]])
    assert cooccurrence_reward(s, 1, torch.tensor([[1.0]])).item() == pytest.approx(1 / (1 + math.log2(3)))
    # two positives weighted 0.75 / 0.25: first ranks 0, second ranks 2 (both negatives above)
    s = torch.tensor([[0.9, 0.1, 0.5, 0.3]])
    got = cooccurrence_reward(s, 2, torch.tensor([[0.75, 0.25]])).item()
    assert got == pytest.approx(0.75 * 0.5 + 0.25 * (1 / 3))


def test_group_advantages_zero_mean_unit_scale():
    r = torch.tensor([[0.5, 0.25, 0.25, 0.5], [0.3, 0.3, 0.3, 0.3]], dtype=torch.float64)
    a = group_advantages(r)
    assert torch.allclose(a.mean(1), torch.zeros(2, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(a[0], torch.tensor([1.0, -1.0, -1.0, 1.0], dtype=torch.float64), atol=1e-5)
    assert torch.all(a[1] == 0)  # equal rewards carry no signal


def test_gaussian_log_prob_by_hand():
    a, mu = torch.tensor([1.0, 0.0]), torch.zeros(2)
    expected = -1.0 / (2 * 0.25) - 2 * math.log(0.5 * math.sqrt(2 * math.pi))
    assert gaussian_log_prob(a, mu, 0.5).item() == pytest.approx(expected)
    ref = torch.distributions.Normal(mu, 0.5).log_prob(a).sum()
    assert gaussian_log_prob(a, mu, 0.5).item() == pytest.approx(ref.item())


def test_policy_gradient_matches_finite_differences():
    """On μθ = θ with reward r(a) = −‖a − t‖², the clipped-loss gradient at ratio 1 (times
    the group std that the advantages divide by) estimates ∇E[r]; compare with central finite
    differences of the Monte-Carlo expected reward (common random numbers)."""
    torch.manual_seed(0)
    cfg = CRRLConfig(sigma=0.3, num_generations=4000)
    theta0 = torch.tensor([0.4, -0.2], dtype=torch.float64)
    target = torch.tensor([1.0, 0.5], dtype=torch.float64)
    eps = torch.randn(1, cfg.num_generations, 2, dtype=torch.float64)

    def reward(a):
        return -((a - target) ** 2).sum(-1)

    actions = theta0 + cfg.sigma * eps
    r = reward(actions)
    adv = group_advantages(r)
    theta = theta0.clone().requires_grad_(True)
    old = gaussian_log_prob(actions, theta0.unsqueeze(0).unsqueeze(0), cfg.sigma)
    loss, _ = grpo_loss(theta.unsqueeze(0), actions, old, adv, cfg)
    loss.backward()
    pg = -theta.grad * r.std(unbiased=False)

    h = 1e-3
    fd = torch.zeros(2, dtype=torch.float64)
    for i in range(2):
        e = torch.zeros(2, dtype=torch.float64)
        e[i] = h
        fd[i] = (reward(theta0 + e + cfg.sigma * eps).mean() - reward(theta0 - e + cfg.sigma * eps).mean()) / (2 * h)
    assert torch.allclose(fd, -2 * (theta0 - target), atol=0.05)  # the analytic gradient
    cos = torch.dot(pg, fd) / (pg.norm() * fd.norm())
    assert cos > 0.95
    assert 0.7 < (pg.norm() / fd.norm()).item() < 1.4


def test_clip_stops_the_gradient_outside_the_trust_region():
    cfg = CRRLConfig(sigma=0.1, num_generations=2)
    actions = torch.tensor([[[1.0], [1.0]]])
    old = gaussian_log_prob(actions, torch.zeros(1, 1, 1), 0.1)
    mu = torch.tensor([[0.5]], requires_grad=True)  # moved far towards the action: ratio >> 1.28
    loss, info = grpo_loss(mu, actions, old, torch.tensor([[1.0, 1.0]]), cfg)
    loss.backward()
    assert info["clip_fraction"] == 1.0 and mu.grad.abs().item() == 0.0


def test_build_anchors():
    c = np.zeros((6, 6), dtype=int)
    for i, j, n in [(1, 2, 3), (1, 3, 5), (2, 3, 1)]:
        c[i, j] = c[j, i] = n
    a = build_anchors(sp.csr_matrix(c), n_negatives=2, top_k=2, seed=0)
    assert list(a.anchor) == [1, 2, 3] and a.n_skipped == 2  # items 4 and 5 never co-occur
    assert list(a.positives[0]) == [3, 2] and a.weights[0].tolist() == pytest.approx([5 / 8, 3 / 8])
    for anchor, negs in zip(a.anchor, a.negatives, strict=True):
        assert len(set(negs)) == 2 and anchor not in negs and 0 not in negs
        assert all(c[anchor, n] == 0 for n in negs)
    b = build_anchors(sp.csr_matrix(c), n_negatives=2, top_k=2, seed=0)
    np.testing.assert_array_equal(a.negatives, b.negatives)  # seeded


def test_validation_cooccurrence_uses_only_validation_targets(tmp_path):
    seqs = {"0": [0, 1, 2, 3, 4], "1": [1, 2, 0, 5, 3]}
    items = {str(i): {"title": str(i)} for i in range(6)}
    write_inter_json(tmp_path, "T", seqs, items)
    ds = prepare(DataConfig(dataset="json:T", data_dir=str(tmp_path), item_core=1), tmp_path / "d")
    v = validation_cooccurrence(ds).toarray()
    # user 0: validation target raw 3 (index 4), history raw 0,1,2 (1,2,3)
    # user 1: validation target raw 5 (index 6), history raw 1,2,0 (2,3,1)
    assert v[4, 1] == v[4, 2] == v[4, 3] == 1 and v[6, 1] == v[6, 2] == v[6, 3] == 1
    assert v[1, 2] == 0  # a training pair is not a validation pair
    # training co-occurrence never contains validation or test positions
    assert ds.cooccurrence[4].nnz == 0 and ds.cooccurrence[6].nnz == 0


class ToyPolicy(torch.nn.Module):
    """States: fixed item features; thought: a linear map of them; embedding: the thought."""

    def __init__(self, features: torch.Tensor, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.features = features
        self.module = torch.nn.Linear(features.shape[1], features.shape[1])

    def prefix_states(self, items):
        return self.features[items]

    def thought(self, states):
        return self.module(states)

    def embed(self, states, thoughts):
        return thoughts


def _toy_problem():
    g = torch.Generator().manual_seed(0)
    n, d = 30, 8
    table = torch.nn.functional.normalize(torch.randn(n + 1, d, generator=g), dim=-1)
    c = np.zeros((n + 1, n + 1), dtype=int)
    for i in range(1, n + 1):
        j = i % n + 1
        c[i, j] = c[j, i] = 2
    anchors = build_anchors(sp.csr_matrix(c), n_negatives=9, seed=0)
    features = torch.randn(n + 1, d, generator=g)
    return table, anchors, features


def test_training_raises_the_reward_on_a_toy_policy():
    table, anchors, features = _toy_problem()
    policy = ToyPolicy(features)
    cfg = CRRLConfig(sigma=0.3, learning_rate=0.03, steps=120, anchors_per_step=10, checkpoint_every=0)
    hist = train_crrl(policy, policy.module, anchors, table, cfg, progress=False)
    first = np.mean([h["reward"] for h in hist[:15]])
    last = np.mean([h["reward"] for h in hist[-15:]])
    assert last > first + 0.03, (first, last)


def test_first_rank_share_by_hand():
    table = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [-1.0, 0.0]])
    c = np.zeros((5, 5), dtype=int)
    c[1, 2] = c[2, 1] = 1  # anchors 1 and 2, each other's positive
    anchors = build_anchors(sp.csr_matrix(c), n_negatives=2, seed=0)
    # negatives of both are items 3 and 4; 1·2 = 0.9 beats 1·3 = 0, 1·4 = -1;
    # 2·1 = 0.9 beats 2·3 = 0.1 and 2·4 = -0.9
    assert first_rank_share(table, anchors) == 1.0
    table[3] = torch.tensor([2.0, 0.0])  # item 3 now outranks the positive for both anchors
    assert first_rank_share(table, anchors) == 0.0


def test_resume_equals_uninterrupted(tmp_path):
    table, anchors, features = _toy_problem()
    cfg = CRRLConfig(sigma=0.3, learning_rate=0.03, steps=12, anchors_per_step=10, checkpoint_every=5)
    straight = ToyPolicy(features)
    hist_a = train_crrl(straight, straight.module, anchors, table, cfg, progress=False)
    interrupted = ToyPolicy(features)
    train_crrl(interrupted, interrupted.module, anchors, table, cfg, checkpoint_dir=tmp_path / "ck", stop_after=7, progress=False)
    resumed = ToyPolicy(features, seed=123)  # fresh weights: everything must come from the checkpoint
    hist_b = train_crrl(resumed, resumed.module, anchors, table, cfg, checkpoint_dir=tmp_path / "ck", progress=False)
    assert [h["reward"] for h in hist_a] == [h["reward"] for h in hist_b]
    for p, q in zip(straight.module.parameters(), resumed.module.parameters(), strict=True):
        assert torch.equal(p, q)


def test_bad_config():
    with pytest.raises(ValueError):
        CRRLConfig(num_generations=1)
    with pytest.raises(ValueError):
        CRRLConfig(advantage="token")


def test_dense_cooccurrence_falls_back_to_the_least_co_occurring_items():
    # 6 items, every pair co-occurs: no item has a never-co-occurring partner
    n = 6
    c = np.zeros((n + 1, n + 1), dtype=int)
    for i in range(1, n + 1):
        for j in range(1, n + 1):
            if i != j:
                c[i, j] = i + j  # item 1's counts: 3, 4, 5, 6, 7 with items 2..6
    with pytest.raises(ValueError, match="negative_fallback_share"):
        build_anchors(sp.csr_matrix(c), n_negatives=2, seed=0)
    a = build_anchors(sp.csr_matrix(c), n_negatives=2, seed=0, negative_fallback_share=0.3)
    assert a.n_fallback == n and a.n_skipped == 0
    # pool = max(2, ceil(0.3 * 6)) = 2 least co-occurring: for item 1, items 2 and 3 (counts 3, 4);
    # its positive is item 6 (count 7)
    row = list(a.anchor).index(1)
    assert a.positives[row, 0] == 6 and sorted(a.negatives[row]) == [2, 3]
    # item 6: positive 5 (count 11); least co-occurring 1 and 2 (counts 7, 8)
    row = list(a.anchor).index(6)
    assert a.positives[row, 0] == 5 and sorted(a.negatives[row]) == [1, 2]
    # a wider pool never includes the anchor or its positive
    b = build_anchors(sp.csr_matrix(c), n_negatives=3, seed=1, negative_fallback_share=0.9)
    for anchor, pos, negs in zip(b.anchor, b.positives[:, 0], b.negatives, strict=True):
        assert anchor not in negs and pos not in negs and len(set(negs)) == 3


def test_centered_scores_by_hand():
    # every row shares a large component along x; the item-specific part lies along y
    table = torch.tensor([[0.0, 0.0], [10.0, 1.0], [9.0, 1.0], [12.0, -1.0], [11.0, -1.0]])
    c = np.zeros((5, 5), dtype=int)
    c[1, 2] = c[2, 1] = 1
    anchors = build_anchors(sp.csr_matrix(c), n_negatives=2, seed=0)
    row = list(anchors.anchor).index(1)  # candidates of item 1: positive 2, negatives {3, 4}
    # dot: 1·2 = 91 loses to 1·3 = 119 and 1·4 = 109
    assert first_rank_share(table, anchors.subset(np.array([row]))) == 0.0
    # centred (mean of rows 1..4 = (10.5, 0)): 1 -> (-0.5, 1), 2 -> (-1.5, 1), 3 -> (1.5, -1), 4 -> (0.5, -1)
    scores = anchor_scores(table, anchors.subset(np.array([row])), "centered")[0]
    negs = anchors.negatives[row]
    expected = {2: 0.75 + 1, 3: -0.75 - 1, 4: -0.25 - 1}
    assert scores[0].item() == pytest.approx(expected[2])
    assert [s.item() for s in scores[1:]] == pytest.approx([expected[int(j)] for j in negs])
    assert first_rank_share(table, anchors, "centered") == 1.0
    assert table_reward(table, anchors, "centered") == pytest.approx(0.5)
    assert table_reward(table, anchors, "dot") < 0.5


def test_rollout_noise_is_split_invariant():
    cfg = CRRLConfig(num_generations=4)
    whole = rollout_noise(cfg, step=3, positions=np.arange(6), dim=5)
    assert torch.all(whole[:, 0] == 0) and torch.all(whole[:, 1:] != 0)
    torch.testing.assert_close(rollout_noise(cfg, 3, np.array([1, 3, 5]), 5), whole[1::2])
    assert not torch.equal(rollout_noise(cfg, 4, np.arange(6), 5), whole)  # a new step, new noise
