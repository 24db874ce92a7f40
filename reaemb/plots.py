"""Figures shared by the notebooks. Each function draws one figure, saves it as PNG and
PDF when given a path stem, and returns the matplotlib Figure."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from .data.prepared import PreparedDataset

__all__ = [
    "save_figure",
    "item_popularity_plot",
    "group_metric_plot",
    "umap_grid_plot",
    "loss_curves_plot",
    "crrl_reward_plot",
]


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


def group_metric_plot(df, metric: str = "NDCG@10", protocol: str = "full", kind: str = "items",
                      stem: str | Path | None = None) -> plt.Figure:
    """Bars of ``metric`` for the head and tail groups of ``kind`` (``"items"`` or
    ``"users"``), one panel per backbone, one bar pair per variant, error bars = std over
    seeds (seaborn). ``df`` is the long-form metrics table (:func:`reaemb.longtail.load_metrics`)."""
    import seaborn as sns

    from .embeddings import VARIANT_ORDER
    from .longtail import VARIANT_LABELS

    if kind not in ("items", "users"):
        raise ValueError(f"kind must be 'items' or 'users', got {kind!r}")
    groups = [f"head_{kind}", f"tail_{kind}"]
    sub = df[(df["metric"] == metric) & (df["protocol"] == protocol) & df["group"].isin(groups)].copy()
    if sub.empty:
        raise ValueError(f"no {kind} group rows for {metric} / {protocol}")
    present = [v for v in VARIANT_ORDER if v in set(sub["variant"])] + sorted(set(sub["variant"]) - set(VARIANT_ORDER))
    sub["method"] = sub["variant"].map(lambda v: VARIANT_LABELS.get(v, v))
    backbones = sorted(sub["backbone"].unique())
    fig, axes = plt.subplots(1, len(backbones), figsize=(4.2 * len(backbones), 3.6), sharey=True, squeeze=False)
    for ax, bb in zip(axes[0], backbones):
        sns.barplot(data=sub[sub["backbone"] == bb], x="method", y="value", hue="group", hue_order=groups,
                    order=[VARIANT_LABELS.get(v, v) for v in present], errorbar="sd", ax=ax,
                    palette=["tab:blue", "tab:orange"])
        ax.set_title(bb)
        ax.set_xlabel("")
        ax.set_ylabel(f"{metric} ({protocol} ranking)" if ax is axes[0][0] else "")
        ax.tick_params(axis="x", rotation=30)
        for label in ax.get_xticklabels():
            label.set_horizontalalignment("right")
        if ax.get_legend() is not None:
            ax.get_legend().remove()
    handles, names = axes[0][-1].get_legend_handles_labels()
    axes[0][-1].legend(handles, names, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    fig.suptitle(f"{df['dataset'].iloc[0]}: head vs tail {kind}")
    fig.tight_layout()
    if stem is not None:
        save_figure(fig, stem)
    return fig


def umap_grid_plot(coords: dict[str, np.ndarray], labels: np.ndarray, popularity: np.ndarray,
                   pairs: np.ndarray | None = None, stem: str | Path | None = None) -> plt.Figure:
    """UMAP maps of several embedding tables side by side: top row coloured by category
    (``labels``, "other" in grey), bottom row by log popularity; ``pairs`` ((P, 2) row
    indices of co-occurring items) are drawn as thin lines on the top row."""
    names = list(coords)
    fig, axes = plt.subplots(2, len(names), figsize=(3.6 * len(names), 7.0), squeeze=False)
    cats = [c for c in dict.fromkeys(labels) if c != "other"]
    palette = plt.get_cmap("tab10")
    colours = {c: palette(i % 10) for i, c in enumerate(sorted(cats))}
    colours["other"] = (0.8, 0.8, 0.8, 1.0)
    col = np.array([colours[c] for c in labels])
    for j, name in enumerate(names):
        xy = coords[name]
        ax = axes[0, j]
        if pairs is not None and len(pairs):
            from matplotlib.collections import LineCollection

            ax.add_collection(LineCollection(np.stack([xy[pairs[:, 0]], xy[pairs[:, 1]]], axis=1),
                                             colors="black", linewidths=0.3, alpha=0.25, zorder=1))
        ax.scatter(xy[:, 0], xy[:, 1], c=col, s=5, linewidths=0, zorder=2)
        ax.set_title(name)
        sc = axes[1, j].scatter(xy[:, 0], xy[:, 1], c=np.log1p(popularity), cmap="viridis", s=5, linewidths=0)
        for ax in axes[:, j]:
            ax.set_xticks([])
            ax.set_yticks([])
    handles = [plt.Line2D([], [], marker="o", ls="", color=colours[c], label=c) for c in sorted(cats) + ["other"]]
    axes[0, -1].legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False, fontsize=8)
    fig.colorbar(sc, ax=axes[1, -1], label="log(1 + interactions)")
    axes[0, 0].set_ylabel("by category; lines: co-occurring pairs")
    axes[1, 0].set_ylabel("by popularity")


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
