"""Figures shared by the notebooks. Each function draws one figure, saves it as PNG and
PDF when given a path stem, and returns the matplotlib Figure."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from .data.prepared import PreparedDataset

__all__ = ["save_figure", "item_popularity_plot", "crrl_reward_plot"]


def save_figure(fig: plt.Figure, stem: str | Path) -> list[Path]:
    """Save ``fig`` as ``<stem>.png`` (150 dpi) and ``<stem>.pdf``; returns the paths."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [stem.with_suffix(".png"), stem.with_suffix(".pdf")]
    fig.savefig(paths[0], dpi=150, bbox_inches="tight", metadata={"Software": None})
    fig.savefig(paths[1], bbox_inches="tight", metadata={"CreationDate": None, "Producer": None})
    return paths


def item_popularity_plot(ds: PreparedDataset, stem: str | Path | None = None) -> plt.Figure:
    """The long tail: item interaction counts in decreasing order (log scale), tail items
    shaded, the tail threshold marked."""
    counts = np.sort(ds.item_count[1:])[::-1]
    rank = np.arange(1, len(counts) + 1)
    tail = counts < ds.item_threshold
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    ax.fill_between(rank, counts, where=~tail, color="tab:blue", alpha=0.35, step="mid", label="head items")
    ax.fill_between(rank, counts, where=tail, color="tab:orange", alpha=0.35, step="mid", label="tail items")
    ax.plot(rank, counts, color="black", lw=0.8)
    ax.axhline(ds.item_threshold, color="tab:red", ls="--", lw=1,
               label=f"threshold: {ds.item_threshold} interactions")
    ax.set_yscale("log")
    ax.set_xlabel("item rank by popularity")
    ax.set_ylabel("interactions")
    share = 100 * tail.mean()
    ax.set_title(f"{ds.name}: {ds.n_items:,} items, {share:.1f}% tail items "
                 f"hold {100 * counts[tail].sum() / counts.sum():.1f}% of interactions")
    ax.legend(frameon=False)
    fig.tight_layout()
    if stem is not None:
        save_figure(fig, stem)
    return fig


def _moving_average(values: np.ndarray, window: int) -> np.ndarray:
    window = max(1, min(window, len(values)))
    kernel = np.ones(window) / window
    head = np.cumsum(values[: window - 1]) / np.arange(1, window)  # the first points: what exists
    return np.concatenate([head, np.convolve(values, kernel, mode="valid")])


def crrl_reward_plot(history: list[dict], evaluations: list[dict], stem: str | Path | None = None,
                     window: int = 10) -> plt.Figure:
    """CRRL training: left, the mean reward of each step's rollouts (faint) and its moving
    average over ``window`` steps, with the noise-free reward of all training anchors at each
    candidate refresh; right, the share of anchors whose positive ranks first, on training
    anchors and on validation anchors (never trained on), at each refresh."""
    steps = np.array([h["step"] for h in history]) + 1
    reward = np.array([h["reward"] for h in history])
    ev_steps = [e["step"] for e in evaluations]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    ax1.plot(steps, reward, color="tab:blue", alpha=0.25, lw=0.8, label="rollouts of the step")
    ax1.plot(steps, _moving_average(reward, window), color="tab:blue", lw=1.6, label=f"moving average ({window} steps)")
    ax1.plot(ev_steps, [e["train_reward"] for e in evaluations], "o-", color="black", ms=3, lw=1,
             label="all training anchors, noise-free")
    ax1.set_xlabel("step")
    ax1.set_ylabel("reward 1 / (1 + log2(rank + 2))")
    ax1.legend(frameon=False, fontsize=8)
    ax2.plot(ev_steps, [e["train_first"] for e in evaluations], "o-", ms=3, label="training anchors")
    if evaluations and "valid_first" in evaluations[0]:
        ax2.plot(ev_steps, [e["valid_first"] for e in evaluations], "s--", ms=3, label="validation anchors")
    ax2.set_xlabel("step")
    ax2.set_ylabel("share with the positive ranked first")
    ax2.legend(frameon=False, fontsize=8)
    fig.tight_layout()
    if stem is not None:
        save_figure(fig, stem)
    return fig
