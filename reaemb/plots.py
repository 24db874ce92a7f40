"""Figures shared by the notebooks. Each function draws one figure, saves it as PNG and
PDF when given a path stem, and returns the matplotlib Figure."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from .data.prepared import PreparedDataset

__all__ = ["save_figure", "item_popularity_plot", "loss_curves_plot"]


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


def loss_curves_plot(histories: dict[str, list[dict]], stem: str | Path | None = None,
                     title: str | None = None) -> plt.Figure:
    """Training curves of contrastive variants: loss per step (left) and the learnable
    temperature τ (right). ``histories`` maps a variant name to its per-step records
    (``step``, ``loss``, ``tau``), as :func:`reaemb.lrcl.train_contrastive` returns them;
    variants without steps are left out."""
    fig, (ax_loss, ax_tau) = plt.subplots(1, 2, figsize=(9.6, 3.4))
    for name, history in histories.items():
        if not history:
            continue
        steps = [h["step"] for h in history]
        line, = ax_loss.plot(steps, [h["loss"] for h in history], marker="o", ms=3, lw=1.2, label=name.upper())
        ax_tau.plot(steps, [h["tau"] for h in history], marker="o", ms=3, lw=1.2, color=line.get_color())
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("contrastive loss (batch)")
    ax_tau.set_xlabel("step")
    ax_tau.set_ylabel("temperature τ")
    if ax_loss.lines:
        ax_loss.legend(frameon=False)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    if stem is not None:
        save_figure(fig, stem)
    return fig
