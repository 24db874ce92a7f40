"""CRRL — collaborative reward reinforcement learning (METHOD.md §4).

GRPO on *embeddings*: the policy is the thought attention module. For an anchor item ``x`` it
proposes the thought vector ``μθ(x)``; a rollout is the action ``a = μθ(x) + σε`` (the first
rollout of each group noise-free), written into the ``<|Thought|>`` position; pass 2 turns it
into an item embedding; the reward is how high the anchor's most co-occurring item ranks among
candidates by dot product with that embedding.

Why a loop of our own and not ``trl.GRPOTrainer``: trl's trainer samples *text completions*
from a generating model and scores token log-probabilities; here the action is a continuous
vector, its log-probability is the Gaussian density ``log π(a|x) = −‖a − μθ(x)‖² / 2σ² + c``
(no tokens are generated at all), and the reward needs candidate embeddings, not text. We keep
trl's conventions where they fit: ``num_generations`` (G), the asymmetric clip
``epsilon``/``epsilon_high``, ``beta`` for the KL term, ``num_iterations`` PPO passes per batch,
and group-relative advantages ``(r − mean_group) / (std_group + ε)``.

The reference code instead normalises advantages over the batch (reward minus the batch mean of
noise-free rewards, divided by the batch L2 norm) and takes the ratio from LM-head token
log-probabilities, which does not depend on the sampled noise; the batch scheme is available as
``advantage="batch"`` for comparison, the surrogate ratio is not reproduced.

The LLM side enters through :class:`ThoughtPolicy` (pass 1 states, the thought vector, pass 2
embedding), so the optimisation here is tested on toy policies without a language model.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import scipy.sparse as sp
import torch

__all__ = [
    "CRRLConfig",
    "Anchors",
    "build_anchors",
    "validation_cooccurrence",
    "rank_reward",
    "cooccurrence_reward",
    "group_advantages",
    "batch_advantages",
    "gaussian_log_prob",
    "grpo_loss",
    "ThoughtPolicy",
    "Rollouts",
    "SIMILARITIES",
    "table_center",
    "anchor_scores",
    "first_rank_share",
    "table_reward",
    "rollout_noise",
    "sample_rollouts",
    "crrl_step",
    "train_crrl",
]


SIMILARITIES = ("dot", "centered")


@dataclass(frozen=True)
class CRRLConfig:
    """CRRL hyper-parameters (names follow trl's GRPOConfig where one exists).

    Attributes:
        num_generations: rollouts per anchor (G).
        sigma: standard deviation of the Gaussian policy on the thought vector.
        n_negatives: random never-co-occurring candidates per anchor.
        negative_fallback_share: for anchors with fewer than ``n_negatives`` never-co-occurring
            items (dense data), negatives are drawn from this share of the catalogue that
            co-occurs least with them (see :func:`build_anchors`); 0 skips such anchors.
        top_k_positives: 1 = the most co-occurring item; k > 1 weights the top k by count share.
        epsilon: lower clip of the probability ratio (1 − ε).
        epsilon_high: upper clip (1 + ε_high), DAPO-style asymmetric clipping.
        num_iterations: PPO passes over each batch of rollouts.
        beta: weight of the closed-form KL to the frozen LRCL module (0 = none).
        advantage: ``"group"`` (GRPO) or ``"batch"`` (the reference code's scheme).
        similarity: how candidates are scored against a rollout's embedding: ``"dot"`` (the
            method's dot product) or ``"centered"`` (dot product after subtracting the mean
            row of the candidate table from both, i.e. the dot product in the centred space
            that PCA hands to the recommenders). See the module docstring for why.
        learning_rate: Adam learning rate of the thought module.
        anchors_per_step: anchors per optimisation step.
        steps: optimisation steps.
        candidate_refresh_every: recompute the (noise-free) candidate embeddings every this
            many steps; between refreshes the table is the one computed with the module as it
            was at the last refresh.
        checkpoint_every: save state every this many steps (0 = only at the end).
        seed: seeds anchors' negatives, anchor order and rollout noise.
        eps: added to the group std.
    """

    num_generations: int = 8
    sigma: float = 0.1
    n_negatives: int = 9
    negative_fallback_share: float = 0.1
    top_k_positives: int = 1
    epsilon: float = 0.2
    epsilon_high: float = 0.28
    num_iterations: int = 2
    beta: float = 0.0
    advantage: str = "group"
    similarity: str = "centered"
    learning_rate: float = 1e-4
    anchors_per_step: int = 8
    steps: int = 50
    candidate_refresh_every: int = 10
    checkpoint_every: int = 10
    seed: int = 0
    eps: float = 1e-6

    def __post_init__(self) -> None:
        if self.num_generations < 2:
            raise ValueError("num_generations must be >= 2 (advantages are relative to the group)")
        if self.sigma <= 0:
            raise ValueError(f"sigma must be > 0, got {self.sigma}")
        if self.similarity not in SIMILARITIES:
            raise ValueError(f"similarity must be one of {SIMILARITIES}, got {self.similarity!r}")
        if self.advantage not in ("group", "batch"):
            raise ValueError(f"advantage must be 'group' or 'batch', got {self.advantage!r}")
        if self.n_negatives < 1 or self.top_k_positives < 1:
            raise ValueError("n_negatives and top_k_positives must be >= 1")
        if not 0.0 <= self.negative_fallback_share < 1.0:
            raise ValueError(f"negative_fallback_share must be in [0, 1), got {self.negative_fallback_share}")
        if self.steps < 0 or self.anchors_per_step < 1 or self.num_iterations < 1:
            raise ValueError("need steps >= 0, anchors_per_step >= 1 and num_iterations >= 1")

    def identity(self) -> dict:
        """Fields that must match for a checkpoint to be resumed (not steps/checkpointing)."""
        d = asdict(self)
        d.pop("steps")
        d.pop("checkpoint_every")
        return d


# ---------------------------------------------------------------------------------------
# anchors and candidates


@dataclass
class Anchors:
    """Anchor items with their candidates.

    Attributes:
        anchor: (A,) item indices.
        positives: (A, k) the k most co-occurring items (padded with 0 where fewer exist).
        weights: (A, k) each positive's share of the counts over the k (0 for padding).
        negatives: (A, n) items that never co-occur with the anchor (seeded), or, for anchors
            that co-occur with almost everything, items among the least co-occurring ones.
        n_skipped: items left out (no co-occurring item, or too few possible negatives).
        n_fallback: anchors whose negatives come from the least co-occurring items because
            fewer than n items never co-occur with them.
    """

    anchor: np.ndarray
    positives: np.ndarray
    weights: np.ndarray
    negatives: np.ndarray
    n_skipped: int
    n_fallback: int = 0

    def __len__(self) -> int:
        return len(self.anchor)

    @property
    def candidates(self) -> np.ndarray:
        """(A, k + n): positives first, then negatives."""
        return np.concatenate([self.positives, self.negatives], axis=1)

    def subset(self, idx: np.ndarray) -> Anchors:
        return Anchors(self.anchor[idx], self.positives[idx], self.weights[idx], self.negatives[idx],
                       self.n_skipped, self.n_fallback)


def build_anchors(
    cooccurrence: sp.csr_matrix,
    n_negatives: int = 9,
    top_k: int = 1,
    seed: int = 0,
    exclude: sp.csr_matrix | None = None,
    negative_fallback_share: float = 0.0,
) -> Anchors:
    """Anchors from a co-occurrence matrix (row/column 0 = padding).

    Every item with at least one co-occurring item is an anchor; its positives are its
    ``top_k`` most co-occurring items (ties: smaller index first), weighted by their share of
    the counts; its negatives are ``n_negatives`` distinct items drawn uniformly from those
    that never co-occur with it (in ``cooccurrence`` nor in ``exclude``), never itself.

    Dense data (the popular items of MovieLens co-occur with nearly every other item) leaves
    some anchors fewer than ``n_negatives`` never-co-occurring items. With
    ``negative_fallback_share = s > 0`` such an anchor draws its negatives from its least
    co-occurring items instead: the ``max(n_negatives, ceil(s · n_items))`` smallest counts
    (in ``cooccurrence + exclude``; ties at the cut included), never a positive, never itself;
    ``n_fallback`` counts these anchors. With ``s = 0`` they are skipped.
    """
    if not 0.0 <= negative_fallback_share < 1.0:
        raise ValueError(f"negative_fallback_share must be in [0, 1), got {negative_fallback_share}")
    c = cooccurrence.tocsr()
    n = c.shape[0] - 1
    seen = c if exclude is None else (c + exclude.tocsr()).tocsr()
    rng = np.random.default_rng(seed)
    pool_size = max(n_negatives, math.ceil(negative_fallback_share * n))
    anchors, positives, weights, negatives = [], [], [], []
    skipped = fallback = 0
    for item in range(1, n + 1):
        lo, hi = c.indptr[item], c.indptr[item + 1]
        cols, counts = c.indices[lo:hi], c.data[lo:hi]
        keep = (cols != 0) & (cols != item) & (counts > 0)
        cols, counts = cols[keep], counts[keep]
        if len(cols) == 0:
            skipped += 1
            continue
        order = np.lexsort((cols, -counts))[:top_k]
        pos = np.zeros(top_k, dtype=np.int64)
        w = np.zeros(top_k, dtype=np.float64)
        pos[: len(order)] = cols[order]
        w[: len(order)] = counts[order] / counts[order].sum()
        s_lo, s_hi = seen.indptr[item], seen.indptr[item + 1]
        seen_cols, seen_counts = seen.indices[s_lo:s_hi], seen.data[s_lo:s_hi]
        forbidden = set(seen_cols[seen_counts > 0].tolist()) | {0, item}
        n_free = n + 1 - len(forbidden)
        if n_free >= n_negatives:
            neg: list[int] = []
            while len(neg) < n_negatives:  # rejection sampling: forbidden sets are small
                for cand in rng.integers(1, n + 1, size=2 * n_negatives):
                    if int(cand) not in forbidden and int(cand) not in neg:
                        neg.append(int(cand))
                        if len(neg) == n_negatives:
                            break
        elif negative_fallback_share > 0 and n - 1 - len(set(pos.tolist()) - {0}) >= n_negatives:
            row = np.zeros(n + 1, dtype=np.float64)
            row[seen_cols] = seen_counts
            row[[0, item]] = np.inf
            row[pos[pos > 0]] = np.inf
            finite = np.isfinite(row)
            cut = np.sort(row[finite])[min(pool_size, int(finite.sum())) - 1]
            pool = np.flatnonzero(finite & (row <= cut))
            neg = rng.choice(pool, size=n_negatives, replace=False).tolist()
            fallback += 1
        else:
            skipped += 1
            continue
        anchors.append(item)
        positives.append(pos)
        weights.append(w)
        negatives.append(neg)
    if not anchors:
        raise ValueError(
            f"no anchor: {skipped} items have no co-occurring item or fewer than {n_negatives} "
            "never-co-occurring items (set negative_fallback_share > 0 for dense data)"
        )
    return Anchors(
        np.asarray(anchors, dtype=np.int64),
        np.stack(positives),
        np.stack(weights),
        np.asarray(negatives, dtype=np.int64),
        skipped,
        fallback,
    )


def validation_cooccurrence(dataset) -> sp.csr_matrix:
    """Held-out co-occurrence: ``V[i, j]`` counts users whose *validation* target is ``j``
    and whose training part contains ``i`` (symmetrised, zero diagonal). These pairs are
    never seen by training, which only uses the training parts."""
    rows, cols = [], []
    hist, targets = dataset.eval_split("valid")
    for h, t in zip(hist, targets, strict=True):
        uniq = np.unique(h)
        uniq = uniq[uniq != t]
        rows.append(uniq)
        cols.append(np.full(len(uniq), t))
    r = np.concatenate(rows) if rows else np.zeros(0, int)
    c = np.concatenate(cols) if cols else np.zeros(0, int)
    n = dataset.n_items + 1
    v = sp.coo_matrix((np.ones(len(r), dtype=np.int32), (r, c)), shape=(n, n)).tocsr()
    v = (v + v.T).tocsr()
    v.setdiag(0)
    v.eliminate_zeros()
    return v


# ---------------------------------------------------------------------------------------
# reward and advantages


def rank_reward(rank: torch.Tensor) -> torch.Tensor:
    """``1 / (1 + log2(rank + 2))``: rank 0 (first) gives 0.5, rank 1 gives 1/(1+log2 3)."""
    return 1.0 / (1.0 + torch.log2(rank.to(torch.float64) + 2.0))


def cooccurrence_reward(scores: torch.Tensor, n_positives: int, weights: torch.Tensor) -> torch.Tensor:
    """Reward of each rollout from candidate scores.

    Args:
        scores: (R, k + n) dot products of each rollout's embedding with its candidates,
            positives first.
        n_positives: k.
        weights: (R, k) count shares of the positives (rows sum to 1; 0 for padding).

    Each positive is ranked against the negatives only (rank = number of negatives scoring
    strictly higher), so several positives do not push each other down; the reward is the
    weighted sum of their rank rewards.
    """
    pos = scores[:, :n_positives]
    neg = scores[:, n_positives:]
    rank = (neg.unsqueeze(1) > pos.unsqueeze(2)).sum(-1)  # (R, k)
    return (rank_reward(rank) * weights.to(torch.float64)).sum(-1)


def group_advantages(rewards: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """GRPO: ``(r − mean_group) / (std_group + eps)`` over ``rewards`` of shape (A, G).
    Population std; a group whose rewards are all equal gets zero advantages."""
    mean = rewards.mean(dim=1, keepdim=True)
    std = rewards.std(dim=1, unbiased=False, keepdim=True)
    return (rewards - mean) / (std + eps)


def batch_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """The reference code's scheme: reward minus the batch mean of the noise-free rollouts'
    rewards (column 0), divided by the L2 norm over the batch."""
    centred = rewards - rewards[:, 0].mean()
    norm = centred.norm()
    return centred / norm if norm > 0 else centred


def gaussian_log_prob(action: torch.Tensor, mean: torch.Tensor, sigma: float) -> torch.Tensor:
    """``log N(action; mean, σ²I)`` summed over the last dimension, constant included."""
    d = action.shape[-1]
    return -((action - mean) ** 2).sum(-1) / (2 * sigma**2) - d * math.log(sigma * math.sqrt(2 * math.pi))


def grpo_loss(
    mu: torch.Tensor,
    actions: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    config: CRRLConfig,
    mu_ref: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict]:
    """Clipped policy-gradient loss for one batch.

    Args:
        mu: (A, d) current thought vectors (differentiable).
        actions: (A, G, d) sampled thought vectors.
        old_log_prob: (A, G) log-probabilities under the policy that sampled them.
        advantages: (A, G).
        mu_ref: (A, d) thought vectors of the frozen LRCL module (for ``beta > 0``).

    Returns the loss (to minimise) and diagnostics (ratio statistics, clip fraction, KL).
    """
    log_prob = gaussian_log_prob(actions, mu.unsqueeze(1), config.sigma)
    ratio = torch.exp(log_prob - old_log_prob)
    clipped = ratio.clamp(1 - config.epsilon, 1 + config.epsilon_high)
    surrogate = torch.minimum(ratio * advantages, clipped * advantages)
    loss = -surrogate.mean()
    kl = torch.zeros((), dtype=mu.dtype, device=mu.device)
    if mu_ref is not None:
        kl = ((mu - mu_ref.detach()) ** 2).sum(-1).mean() / (2 * config.sigma**2)
        if config.beta > 0:
            loss = loss + config.beta * kl
    info = {
        "ratio_mean": float(ratio.detach().mean()),
        "clip_fraction": float(((ratio < 1 - config.epsilon) | (ratio > 1 + config.epsilon_high)).float().mean()),
        "kl": float(kl.detach()),
    }
    return loss, info


# ---------------------------------------------------------------------------------------
# the policy interface


class ThoughtPolicy(Protocol):
    """What CRRL needs from the LLM side (implemented over the LRCL model)."""

    def prefix_states(self, items: torch.Tensor) -> object:
        """Pass 1 for ``items`` (no gradient): whatever pass 2 and the thought module need
        (hidden states, KV cache, masks)."""

    def thought(self, states: object) -> torch.Tensor:
        """μθ: (B, d) thought vectors from pass-1 states; differentiable in the module."""

    def embed(self, states: object, thoughts: torch.Tensor) -> torch.Tensor:
        """Pass 2 with ``thoughts`` (A, G, d) at the thought position: (A, G, D) item
        embeddings, G rollouts per anchor (no gradient needed: they only feed the reward)."""

    def parameters(self):
        """Trainable parameters (the thought attention module)."""


# ---------------------------------------------------------------------------------------
# training


def table_center(table: torch.Tensor, similarity: str) -> torch.Tensor | None:
    """What ``similarity`` subtracts from embeddings before the dot product: the mean of the
    table's item rows (row 0 = padding excluded) for ``"centered"``, None for ``"dot"``."""
    if similarity not in SIMILARITIES:
        raise ValueError(f"similarity must be one of {SIMILARITIES}, got {similarity!r}")
    return torch.as_tensor(table)[1:].mean(0) if similarity == "centered" else None


def anchor_scores(table: torch.Tensor, anchors: Anchors, similarity: str = "dot") -> torch.Tensor:
    """(A, k + n) scores of each anchor's row of ``table`` (rows = item indices) against the
    rows of its candidates, positives first (dot products, after centring for
    ``similarity="centered"``)."""
    table = torch.as_tensor(table, dtype=torch.float32)
    center = table_center(table, similarity)
    if center is not None:
        table = table - center
    anchor = table[torch.as_tensor(anchors.anchor)]
    cand = table[torch.as_tensor(anchors.candidates)]
    return torch.einsum("ad,acd->ac", anchor, cand)


def first_rank_share(table: torch.Tensor, anchors: Anchors, similarity: str = "dot") -> float:
    """Share of anchors whose (first) positive outranks all their negatives, scoring every
    candidate against the anchor's row of ``table`` (rows = item indices)."""
    scores = anchor_scores(table, anchors, similarity)
    k = anchors.positives.shape[1]
    return float((scores[:, k:] < scores[:, :1]).all(dim=1).float().mean())


def table_reward(table: torch.Tensor, anchors: Anchors, similarity: str = "dot") -> float:
    """Mean noise-free reward over ``anchors`` when every item is embedded by its row of
    ``table``: the reward of the policy's mean action, on all anchors at once."""
    k = anchors.positives.shape[1]
    scores = anchor_scores(table, anchors, similarity)
    return float(cooccurrence_reward(scores, k, torch.as_tensor(anchors.weights)).mean())


def _anchor_order(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, 7, epoch]).permutation(n)


def _batch_indices(step: int, n: int, size: int, seed: int) -> np.ndarray:
    """Anchors of ``step``: consecutive slices of a seeded permutation per epoch, so a
    resumed run sees exactly the batches an uninterrupted one would."""
    per_epoch = max(1, math.ceil(n / size))
    epoch, k = divmod(step, per_epoch)
    order = _anchor_order(n, seed, epoch)
    return order[k * size : (k + 1) * size]


@dataclass
class Rollouts:
    """One batch of rollouts (everything the clipped update needs).

    Attributes:
        states: the policy's pass-1 states of the anchors.
        mu: (A, d) thought vectors of the sampling policy.
        actions: (A, G, d) sampled thought vectors (column 0 noise-free).
        rewards: (A, G) float64 rewards.
        old_log_prob: (A, G) log-probabilities of the actions under the sampling policy.
    """

    states: object
    mu: torch.Tensor
    actions: torch.Tensor
    rewards: torch.Tensor
    old_log_prob: torch.Tensor


def rollout_noise(config: CRRLConfig, step: int, positions: np.ndarray, dim: int) -> torch.Tensor:
    """(A, G, d) standard normal noise, the first rollout of each group zero. The noise of an
    anchor depends only on (seed, step, its position in the step's batch), so a batch split
    over several processes draws what a single process would."""
    noise = torch.empty(len(positions), config.num_generations, dim)
    for row, pos in enumerate(positions):
        g = torch.Generator().manual_seed((int(config.seed) * 1_000_003 + step) * 1_009 + int(pos))
        noise[row] = torch.randn(config.num_generations, dim, generator=g)
    noise[:, 0] = 0.0
    return noise


@torch.no_grad()
def sample_rollouts(
    policy: ThoughtPolicy,
    batch: Anchors,
    table: torch.Tensor,
    config: CRRLConfig,
    step: int,
    positions: np.ndarray | None = None,
) -> Rollouts:
    """Pass 1, the thought vectors, G noisy actions per anchor, their embeddings and rewards
    against the candidates' rows of ``table`` (noise-free embeddings). ``positions``: the
    anchors' positions in the step's global batch (default 0..A-1), which seed their noise."""
    items = torch.as_tensor(batch.anchor)
    states = policy.prefix_states(items)
    mu = policy.thought(states)
    positions = np.arange(len(batch)) if positions is None else positions
    noise = rollout_noise(config, step, positions, mu.shape[1]).to(mu)
    actions = mu.unsqueeze(1) + config.sigma * noise
    emb = policy.embed(states, actions)  # (A, G, D)
    table = torch.as_tensor(table)
    cand = table[torch.as_tensor(batch.candidates)].to(emb)  # (A, C, D)
    center = table_center(table, config.similarity)
    if center is not None:
        emb, cand = emb - center.to(emb), cand - center.to(emb)
    scores = torch.einsum("agd,acd->agc", emb, cand)
    k = batch.positives.shape[1]
    w = torch.as_tensor(batch.weights).unsqueeze(1).expand(-1, config.num_generations, -1)
    rewards = cooccurrence_reward(scores.reshape(-1, scores.shape[-1]).cpu(), k, w.reshape(-1, k))
    rewards = rewards.reshape(len(batch), config.num_generations)
    old_log_prob = gaussian_log_prob(actions, mu.unsqueeze(1), config.sigma)
    return Rollouts(states, mu, actions, rewards, old_log_prob)


def crrl_step(
    policy: ThoughtPolicy,
    batch: Anchors,
    table: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    config: CRRLConfig,
    step: int,
    reference: ThoughtPolicy | None = None,
    positions: np.ndarray | None = None,
    sync_gradients=None,
) -> dict:
    """One CRRL step: rollouts, rewards, advantages, ``num_iterations`` clipped updates.

    ``sync_gradients(params)``, when given, runs between backward and the optimizer step
    (data parallelism: averages the gradients over processes)."""
    ro = sample_rollouts(policy, batch, table, config, step, positions)
    rewards = ro.rewards
    adv = group_advantages(rewards, config.eps) if config.advantage == "group" else batch_advantages(rewards)
    mu_ref = None
    if reference is not None:
        with torch.no_grad():
            mu_ref = reference.thought(reference.prefix_states(torch.as_tensor(batch.anchor)))
    params = [p for group in optimizer.param_groups for p in group["params"]]
    info: dict = {}
    for _ in range(config.num_iterations):
        mu = policy.thought(ro.states)
        loss, info = grpo_loss(mu, ro.actions, ro.old_log_prob.to(mu), adv.to(mu), config, mu_ref)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if sync_gradients is not None:
            sync_gradients(params)
        optimizer.step()
    return {
        "step": step,
        "reward": float(rewards.mean()),
        "reward_noise_free": float(rewards[:, 0].mean()),
        "first_rank": float((rewards[:, 0] >= 0.5 - 1e-9).double().mean()),
        "flat_groups": float((rewards.std(dim=1) == 0).double().mean()),
        "loss": float(loss.detach()),
        **info,
    }


def train_crrl(
    policy: ThoughtPolicy,
    module: torch.nn.Module,
    anchors: Anchors,
    table: torch.Tensor,
    config: CRRLConfig,
    *,
    refresh_table=None,
    evaluate=None,
    reference: ThoughtPolicy | None = None,
    checkpoint_dir: str | Path | None = None,
    stop_after: int | None = None,
    progress: bool = True,
    accelerator=None,
) -> list[dict]:
    """Train the thought module with GRPO; returns the per-step history.

    Args:
        policy: the :class:`ThoughtPolicy` (its trainable part is ``module``).
        module: the thought attention module (its parameters are optimised, its state saved).
        anchors: training anchors (:func:`build_anchors` on the training co-occurrence).
        table: (n_items + 1, D) noise-free candidate embeddings (e.g. the LRCL catalogue).
        refresh_table: callable returning a fresh table, called every
            ``config.candidate_refresh_every`` steps (None: the table stays fixed).
        evaluate: callable ``table -> dict`` run on the initial table and after every refresh;
            its values enter that step's record with the prefix ``eval_``.
        reference: the frozen LRCL policy, for the KL term.
        checkpoint_dir: saves every ``config.checkpoint_every`` steps and resumes from there
            (the configuration must match, steps and checkpointing aside).
        stop_after: stop after this many steps in this call (simulates an interruption).
        accelerator: an ``accelerate.Accelerator``; with several processes (``accelerate
            launch``) each step's anchors are split over the processes, gradients averaged,
            and only the main process writes checkpoints.

    Each record holds the step's mean reward over all rollouts (``reward``), over the
    noise-free rollouts (``reward_noise_free``), the share of noise-free rollouts ranking the
    positive first, the share of groups whose G rewards are all equal (no signal), the loss,
    ratio and clip statistics, and the step's seconds.
    """
    import time

    from tqdm.auto import tqdm

    from .checkpoint import load_checkpoint, optimizer_from_flat, optimizer_to_flat, save_checkpoint

    world = accelerator.num_processes if accelerator is not None else 1
    rank = accelerator.process_index if accelerator is not None else 0
    main = accelerator is None or accelerator.is_main_process
    torch.manual_seed(config.seed)
    optimizer = torch.optim.Adam(module.parameters(), lr=config.learning_rate)
    history: list[dict] = []
    start = 0
    table = torch.as_tensor(table, dtype=torch.float32).clone()
    if checkpoint_dir is not None and (ck := load_checkpoint(checkpoint_dir)) is not None:
        tensors, state = ck
        if state.get("config", config.identity()) != config.identity():
            raise ValueError(f"checkpoint {checkpoint_dir} was written with a different configuration; "
                             "delete it or use another folder")
        module.load_state_dict({k[len("module."):]: v for k, v in tensors.items() if k.startswith("module.")})
        optimizer_from_flat(optimizer, tensors, state["optimizer"])
        table = tensors["table"]
        history, start = state["history"], state["step"]

    def save(step: int) -> None:
        if checkpoint_dir is None:
            return
        if main:
            opt_t, opt_meta = optimizer_to_flat(optimizer)
            tensors = {f"module.{k}": v for k, v in module.state_dict().items()} | opt_t | {"table": table}
            save_checkpoint(checkpoint_dir, tensors, {"step": step, "history": history, "optimizer": opt_meta,
                                                      "config": config.identity()})
        if world > 1:
            accelerator.wait_for_everyone()

    def sync(params) -> None:
        for p in params:
            if p.grad is not None:
                p.grad = accelerator.reduce(p.grad, reduction="mean")

    def scalar_mean(value: float) -> float:
        if world == 1:
            return value
        return float(accelerator.reduce(torch.tensor([value], device=accelerator.device), reduction="mean"))

    end = config.steps if stop_after is None else min(config.steps, start + stop_after)
    bar = tqdm(range(start, end), desc="CRRL", disable=not (progress and main), initial=start, total=config.steps)
    for step in bar:
        t0 = time.perf_counter()
        extra: dict = {}
        if refresh_table is not None and config.candidate_refresh_every and step > 0 and step % config.candidate_refresh_every == 0:
            table = torch.as_tensor(refresh_table(), dtype=torch.float32)
            if evaluate is not None:
                extra = {f"eval_{k}": v for k, v in evaluate(table).items()}
        elif step == 0 and evaluate is not None:
            extra = {f"eval_{k}": v for k, v in evaluate(table).items()}
        idx = _batch_indices(step, len(anchors), config.anchors_per_step, config.seed)
        positions = np.arange(len(idx))[rank::world]
        record = crrl_step(policy, anchors.subset(idx[positions]), table, optimizer, config, step, reference,
                           positions=positions, sync_gradients=sync if world > 1 else None)
        if world > 1:
            record = {k: (scalar_mean(v) if isinstance(v, float) else v) for k, v in record.items()}
        record.update(extra)
        record["seconds"] = time.perf_counter() - t0
        history.append(record)
        bar.set_postfix(reward=f"{record['reward']:.3f}")
        if config.checkpoint_every and (step + 1) % config.checkpoint_every == 0:
            save(step + 1)
    if end > start:
        save(end)
    return history
