"""Leave-one-out evaluation: the one place where HR and NDCG are computed (METHOD.md §5).

Two protocols side by side, on the same trained model:

- ``sampled100`` — the papers' protocol: the target is ranked against 100 negatives drawn
  uniformly, without replacement, from the items **not** in the user's full sequence. The
  negatives are fixed by ``(seed, user, split)``, so every method evaluated with a seed sees
  the same negatives. A user whose sequence leaves fewer than 100 other items gets all of them.
- ``full`` — ranking over the whole catalogue (padding excluded). History items are not masked
  by default (as in the papers' full-ranking tables); ``mask_history=True`` masks them (the
  target itself is never masked).

**Rank and ties.** The rank of the target is the number of *other* candidates whose score is
greater than **or equal to** the target's (pessimistic: a tie ranks the target below the tied
items; rank 0 = first). A model that scores everything alike therefore gets no credit.
``HR@k = [rank < k]``, ``NDCG@k = [rank < k] / log2(rank + 2)`` (one relevant item).

**Groups.** ``all``; ``tail_items`` / ``head_items``: users whose evaluation target is a tail /
head item (``dataset.item_is_tail``); ``tail_users`` / ``head_users`` by ``dataset.user_is_tail``.

Scoring is vectorised: batches of users are scored against the whole item table in one matrix
product on the model's device, and ranks are counted there.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

__all__ = [
    "PROTOCOLS",
    "GROUPS",
    "KS",
    "N_NEGATIVES",
    "EvalSet",
    "build_eval_set",
    "sample_negatives_for_user",
    "target_rank",
    "rank_metrics",
    "compute_ranks",
    "metrics_table",
    "evaluate",
]

PROTOCOLS = ("sampled100", "full")
GROUPS = ("all", "tail_items", "head_items", "tail_users", "head_users")
KS = (5, 10, 20)
N_NEGATIVES = 100
_SPLIT_CODE = {"valid": 0, "test": 1}


@dataclass
class EvalSet:
    """Everything needed to evaluate one split, built once and reused every epoch.

    Attributes:
        split: ``valid`` or ``test``.
        histories: ``(U, L)`` left-padded histories (last ``L`` items).
        targets: ``(U,)`` target item per user.
        negatives: ``(U, 100)`` sampled negatives; 0 marks a missing one (short complement).
        history_ptr, history_items: CSR of each user's full history (for ``mask_history``).
        groups: boolean mask per group name over users.
    """

    split: str
    histories: torch.Tensor
    targets: torch.Tensor
    negatives: torch.Tensor
    history_ptr: torch.Tensor
    history_items: torch.Tensor
    groups: dict[str, np.ndarray]

    @property
    def n_users(self) -> int:
        return int(self.targets.shape[0])


def sample_negatives_for_user(
    sequence: np.ndarray, n_items: int, seed: int, user: int, split: str, n: int = N_NEGATIVES
) -> np.ndarray:
    """``n`` distinct items from ``1..n_items`` outside ``sequence`` (all of them when fewer
    exist), fixed by ``(seed, user, split)``."""
    rng = np.random.default_rng([seed, user, _SPLIT_CODE[split]])
    seen = np.unique(sequence)
    n_free = n_items - len(seen[(seen >= 1) & (seen <= n_items)])
    if n_free <= n:
        free = np.setdiff1d(np.arange(1, n_items + 1), seen)
        return rng.permutation(free)
    if n_free > 4 * n:  # rejection is cheap when the complement is large
        picked: list[int] = []
        taken: set[int] = set()
        seen_set = set(seen.tolist())
        while len(picked) < n:
            for c in rng.integers(1, n_items + 1, size=2 * n).tolist():
                if c not in seen_set and c not in taken:
                    taken.add(c)
                    picked.append(c)
                    if len(picked) == n:
                        break
        return np.asarray(picked, dtype=np.int64)
    free = np.setdiff1d(np.arange(1, n_items + 1), seen)
    return rng.choice(free, size=n, replace=False)


def build_eval_set(dataset, split: str, max_length: int, seed: int = 0, n_negatives: int = N_NEGATIVES) -> EvalSet:
    """The :class:`EvalSet` of ``split`` (``valid`` or ``test``) of a prepared dataset."""
    from .srs import left_pad

    histories, targets = dataset.eval_split(split)
    n_users = len(targets)
    negatives = np.zeros((n_users, n_negatives), dtype=np.int64)
    for u in range(n_users):
        neg = sample_negatives_for_user(dataset.sequence(u), dataset.n_items, seed, u, split, n_negatives)
        negatives[u, : len(neg)] = neg
    lengths = np.array([len(h) for h in histories])
    ptr = np.zeros(n_users + 1, dtype=np.int64)
    np.cumsum(lengths, out=ptr[1:])
    flat = np.concatenate(histories).astype(np.int64) if n_users else np.zeros(0, np.int64)
    item_tail = dataset.item_is_tail[targets]
    user_tail = np.asarray(dataset.user_is_tail, dtype=bool)
    groups = {
        "all": np.ones(n_users, dtype=bool),
        "tail_items": item_tail,
        "head_items": ~item_tail,
        "tail_users": user_tail,
        "head_users": ~user_tail,
    }
    return EvalSet(
        split=split,
        histories=left_pad(histories, max_length),
        targets=torch.as_tensor(targets, dtype=torch.int64),
        negatives=torch.from_numpy(negatives),
        history_ptr=torch.from_numpy(ptr),
        history_items=torch.from_numpy(flat),
        groups=groups,
    )


# ---------------------------------------------------------------------------------------
# ranks and metrics


def target_rank(scores: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Pessimistic 0-based rank of column ``target[b]`` in row ``b`` of ``scores``: the number
    of other candidates (``valid`` ones, if given) scoring greater than or equal to it."""
    if scores.ndim != 2 or target.shape != scores.shape[:1]:
        raise ValueError(f"scores must be (B, C) and target (B,), got {tuple(scores.shape)} and {tuple(target.shape)}")
    if torch.isnan(scores).any():
        raise ValueError("scores contain NaN")
    t = scores.gather(1, target[:, None])
    ahead = scores >= t
    if valid is not None:
        ahead &= valid
    ahead.scatter_(1, target[:, None], False)
    return ahead.sum(1)


def rank_metrics(rank: torch.Tensor | np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-user ``(HR@k, NDCG@k)`` from 0-based ranks."""
    r = np.asarray(rank, dtype=np.float64)
    hit = r < k
    return hit.astype(np.float64), np.where(hit, 1.0 / np.log2(r + 2.0), 0.0)


def _batches(n: int, size: int):
    for start in range(0, n, size):
        yield start, min(n, start + size)


@torch.no_grad()
def compute_ranks(
    model,
    eval_set: EvalSet,
    *,
    protocols: tuple[str, ...] = PROTOCOLS,
    mask_history: bool = False,
    batch_size: int = 512,
    device: torch.device | str | None = None,
) -> dict[str, np.ndarray]:
    """0-based pessimistic rank of every user's target under each protocol.

    ``model.score_all(histories)`` must return ``(B, n_items + 1)`` scores (column 0 =
    padding, excluded). Batches run on ``device`` (default: the model's).
    """
    unknown = set(protocols) - set(PROTOCOLS)
    if unknown:
        raise ValueError(f"unknown protocol(s) {sorted(unknown)}; choose from {PROTOCOLS}")
    if device is None:
        device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = {p: [] for p in protocols}
    for a, b in _batches(eval_set.n_users, batch_size):
        scores = model.score_all(eval_set.histories[a:b].to(device)).float()
        targets = eval_set.targets[a:b].to(device)
        if "sampled100" in protocols:
            cand = torch.cat([targets[:, None], eval_set.negatives[a:b].to(device)], dim=1)
            sub = scores.gather(1, cand)
            out["sampled100"].append(target_rank(sub, torch.zeros_like(targets), cand != 0).cpu())
        if "full" in protocols:
            scores[:, 0] = float("-inf")
            if mask_history:
                lo, hi = eval_set.history_ptr[a], eval_set.history_ptr[b]
                items = eval_set.history_items[lo:hi].to(device)
                rows = torch.repeat_interleave(
                    torch.arange(b - a, device=device), (eval_set.history_ptr[a + 1 : b + 1] - eval_set.history_ptr[a:b]).to(device)
                )
                keep = scores.gather(1, targets[:, None])
                scores[rows, items] = float("-inf")
                scores.scatter_(1, targets[:, None], keep)
            valid = torch.ones_like(scores, dtype=torch.bool)
            valid[:, 0] = False
            out["full"].append(target_rank(scores, targets, valid).cpu())
    if was_training:
        model.train()
    return {p: torch.cat(v).numpy().astype(np.int64) for p, v in out.items()}


def metrics_table(ranks: dict[str, np.ndarray], groups: dict[str, np.ndarray], ks: tuple[int, ...] = KS) -> pd.DataFrame:
    """Long table ``protocol, group, metric, value`` (plus ``users``, the group size) from
    per-user ranks."""
    rows = []
    for protocol, rank in ranks.items():
        for group, members in groups.items():
            r = rank[members]
            for k in ks:
                hr, ndcg = rank_metrics(r, k)
                for metric, values in ((f"HR@{k}", hr), (f"NDCG@{k}", ndcg)):
                    value = float(values.mean()) if len(values) else float("nan")
                    rows.append((protocol, group, metric, value, int(members.sum())))
    return pd.DataFrame(rows, columns=["protocol", "group", "metric", "value", "users"])


def evaluate(
    model,
    eval_set: EvalSet,
    *,
    protocols: tuple[str, ...] = PROTOCOLS,
    mask_history: bool = False,
    ks: tuple[int, ...] = KS,
    batch_size: int = 512,
    device: torch.device | str | None = None,
) -> pd.DataFrame:
    """HR@k and NDCG@k for every protocol and group (see the module docstring)."""
    ranks = compute_ranks(model, eval_set, protocols=protocols, mask_history=mask_history,
                          batch_size=batch_size, device=device)
    return metrics_table(ranks, eval_set.groups, ks)
