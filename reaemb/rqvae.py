"""Residual-quantized VAE over item embeddings: semantic IDs for CoderRec (METHOD.md §7).

Model
    The input table (rows = items) is standardised once (per-dimension mean removed, one
    scalar so that the table has unit root-mean-square; both kept as buffers). An MLP encoder
    maps it to ``latent_dim`` (64) dimensions; ``levels`` (3) residual codebooks of
    ``codebook_size`` (256) codes quantize the latent: at level ``l`` the residual ``r_l`` picks
    the code of highest **cosine** similarity, ``r_{l+1} = r_l - e_l``, and the quantized
    latent is ``z_q = e_0 + e_1 + e_2``. An MLP decoder reconstructs the standardised input.

Gradients: the rotation trick
    Instead of the straight-through copy ``z + sg(z_q - z)``, the encoder output is carried to
    ``z_q`` by the rotation trick (Fifty et al., 2024): ``z~ = sg(s R) z`` with ``R`` the
    rotation taking ``z/|z|`` to ``z_q/|z_q|`` (in the plane they span) and ``s = |z_q|/|z|``,
    so the forward value is exactly ``z_q`` while the gradient reaching ``z`` is rotated with
    it. It is applied once, to the whole latent (the sum over levels); the codebooks learn
    from the usual codebook term ``|sg(r_l) - e_l|^2`` and the encoder from the commitment
    term ``beta |r_l - sg(e_l)|^2``, summed over levels.

Initialisation
    Codebooks start from k-means of the residuals of a first encoder pass (level by level,
    scikit-learn, seeded); with fewer items than codes the centres are the items' residuals
    drawn with replacement plus small noise. During the first 80 % of the epochs, codes that
    no item selects are moved onto the residuals of random items after every epoch (dead-code
    restart), so that the codebooks stay in use. Everything is seeded by ``config.seed``, so the
    codes are a function of (table, config).

Semantic IDs
    :func:`semantic_ids` gives each item its ``levels`` codes (eval mode, deterministic);
    :func:`resolve_collisions` appends a disambiguating level: items sharing all codes get
    suffix ``0, 1, 2, ...`` in item order (every other item gets 0), so the full IDs are
    unique. :func:`code_usage` reports used codes and perplexity per level.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "RQVAEConfig",
    "RQVAE",
    "rotate_to",
    "RQVAEResult",
    "fit_rqvae",
    "semantic_ids",
    "resolve_collisions",
    "collision_stats",
    "code_usage",
]


@dataclass
class RQVAEConfig:
    """Shape and training of the RQ-VAE.

    Attributes:
        latent_dim: encoder output (64 in CoderRec).
        hidden: widths of the encoder's hidden layers (the decoder mirrors them).
        levels: residual quantization levels (3).
        codebook_size: codes per level (256).
        beta: weight of the commitment term.
        rotation_trick: carry gradients through quantization by the rotation trick (else
            straight-through).
        learning_rate, weight_decay: AdamW.
        epochs: passes over the table.
        restart_dead: after each of the first ``restart_fraction`` of the epochs, codes no
            item uses are moved onto the residuals of random items (level by level), which
            keeps the codebooks in use; the last epochs run without restarts so the codes
            settle.
        batch_size: items per step.
        seed: init, k-means, batch order.
    """

    latent_dim: int = 64
    hidden: tuple[int, ...] = (256, 128)
    levels: int = 3
    codebook_size: int = 256
    beta: float = 0.25
    rotation_trick: bool = True
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    epochs: int = 300
    batch_size: int = 256
    restart_dead: bool = True
    restart_fraction: float = 0.8
    seed: int = 0

    def __post_init__(self) -> None:
        self.hidden = tuple(int(h) for h in self.hidden)
        for name in ("latent_dim", "levels", "codebook_size", "epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.beta < 0:
            raise ValueError(f"beta must be >= 0, got {self.beta}")
        if not 0.0 <= self.restart_fraction <= 1.0:
            raise ValueError(f"restart_fraction must be in [0, 1], got {self.restart_fraction}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["hidden"] = list(d["hidden"])
        return d


def _mlp(sizes: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(nn.SiLU())
    return nn.Sequential(*layers)


def rotate_to(z: torch.Tensor, q: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """The rotation trick: a tensor equal to ``q`` in the forward pass whose gradient w.r.t.
    ``z`` is ``s R`` (rotation ``R`` of ``z``'s direction onto ``q``'s, scale ``|q|/|z|``),
    both treated as constants. Rows are vectors."""
    zn = z.norm(dim=-1, keepdim=True).clamp(min=eps)
    qn = q.norm(dim=-1, keepdim=True).clamp(min=eps)
    u = (z / zn).detach()
    v = (q / qn).detach()
    w = F.normalize(u + v, dim=-1, eps=eps).detach()
    # R x = x - 2 w (w.x) + 2 v (u.x): reflects through w then through v; R u = v.
    rotated = z - 2 * w * (w * z).sum(-1, keepdim=True) + 2 * v * (u * z).sum(-1, keepdim=True)
    return (qn / zn).detach() * rotated


class RQVAE(nn.Module):
    """Encoder -> residual cosine quantization -> decoder (see the module docstring)."""

    def __init__(self, input_dim: int, config: RQVAEConfig | None = None):
        super().__init__()
        config = config or RQVAEConfig()
        self.config = config
        self.input_dim = input_dim
        torch.manual_seed(config.seed)
        self.encoder = _mlp([input_dim, *config.hidden, config.latent_dim])
        self.decoder = _mlp([config.latent_dim, *reversed(config.hidden), input_dim])
        self.codebooks = nn.Parameter(torch.randn(config.levels, config.codebook_size, config.latent_dim) * 0.1)
        self.register_buffer("mean", torch.zeros(input_dim))
        self.register_buffer("scale", torch.ones(()))

    # -------------------------------------------------------------- standardisation
    def set_standardisation(self, table: torch.Tensor) -> None:
        """Per-dimension mean and one RMS scale of ``table`` (kept as buffers)."""
        table = table.float()
        self.mean.copy_(table.mean(0))
        self.scale.copy_((table - self.mean).pow(2).mean().sqrt().clamp(min=1e-8))

    def standardise(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() - self.mean) / self.scale

    # -------------------------------------------------------------- quantization
    def quantize(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Residual cosine quantization of ``(B, d)`` latents: ``(z_q, codes (B, L),
        residual loss term)``; ``z_q`` carries no gradient to ``z`` (see :meth:`forward`)."""
        residual = z
        codes = []
        zq = torch.zeros_like(z)
        loss = z.new_zeros(())
        for level in range(self.config.levels):
            book = self.codebooks[level]
            sim = F.normalize(residual.detach(), dim=-1) @ F.normalize(book.detach(), dim=-1).T
            idx = sim.argmax(-1)
            e = book[idx]
            loss = loss + F.mse_loss(e, residual.detach()) + self.config.beta * F.mse_loss(residual, e.detach())
            codes.append(idx)
            zq = zq + e.detach()
            residual = residual - e.detach()
        return zq, torch.stack(codes, 1), loss

    def soft_latent(self, probs: torch.Tensor) -> torch.Tensor:
        """``(B, L, K)`` code distributions -> ``(B, d)`` latent: per level the expected
        codebook vector, summed over levels (the soft counterpart of ``z_q``)."""
        if probs.shape[-2:] != self.codebooks.shape[:2]:
            raise ValueError(f"expected (B, {self.config.levels}, {self.config.codebook_size}) code "
                             f"probabilities, got {tuple(probs.shape)}")
        return torch.einsum("blk,lkd->bd", probs, self.codebooks)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """``x`` raw (unstandardised) rows -> losses, codes and reconstruction."""
        target = self.standardise(x)
        z = self.encoder(target)
        zq, codes, q_loss = self.quantize(z)
        if self.config.rotation_trick:
            z_tilde = rotate_to(z, zq)
        else:
            z_tilde = z + (zq - z).detach()
        recon = self.decoder(z_tilde)
        recon_loss = F.mse_loss(recon, target)
        return {"loss": recon_loss + q_loss, "recon": recon_loss, "quant": q_loss, "codes": codes,
                "reconstruction": recon}

    @torch.no_grad()
    def encode_codes(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, L)`` codes of raw rows ``x``."""
        return self.quantize(self.encoder(self.standardise(x)))[1]

    @torch.no_grad()
    def init_codebooks(self, table: torch.Tensor, seed: int) -> None:
        """k-means (level by level, on the residuals) of the encoded ``table``."""
        from sklearn.cluster import KMeans

        residual = self.encoder(self.standardise(table))
        k = self.config.codebook_size
        rng = np.random.default_rng(seed)
        for level in range(self.config.levels):
            r = residual.cpu().numpy().astype(np.float64)
            if len(r) >= k:
                with warnings.catch_warnings():  # duplicate residuals: fewer distinct clusters
                    warnings.simplefilter("ignore")
                    km = KMeans(n_clusters=k, n_init=1, random_state=seed + level, max_iter=50).fit(r)
                centres = km.cluster_centers_
            else:
                centres = r[rng.integers(0, len(r), size=k)] + 1e-3 * rng.standard_normal((k, r.shape[1]))
            book = torch.as_tensor(centres, dtype=torch.float32, device=self.codebooks.device)
            self.codebooks[level] = book
            sim = F.normalize(residual, dim=-1) @ F.normalize(book, dim=-1).T
            residual = residual - book[sim.argmax(-1)]

    @torch.no_grad()
    def restart_dead_codes(self, table: torch.Tensor, generator: torch.Generator) -> list[int]:
        """Move every code that no row of ``table`` selects onto the residual of a random row
        (plus noise of 1 % of the residuals' RMS), level by level; returns the number of
        codes moved per level."""
        residual = self.encoder(self.standardise(table))
        moved = []
        for level in range(self.config.levels):
            book = self.codebooks[level]
            idx = (F.normalize(residual, dim=-1) @ F.normalize(book, dim=-1).T).argmax(-1)
            dead = torch.ones(self.config.codebook_size, dtype=torch.bool)
            dead[idx.cpu()] = False
            n_dead = int(dead.sum())
            if n_dead:
                rows = torch.randint(0, len(residual), (n_dead,), generator=generator)
                rms = residual.pow(2).mean().sqrt()
                noise = torch.randn(n_dead, residual.shape[1], generator=generator) * 0.01 * rms
                book[dead.to(book.device)] = residual[rows.to(residual.device)] + noise.to(book.device)
                idx = (F.normalize(residual, dim=-1) @ F.normalize(book, dim=-1).T).argmax(-1)
            moved.append(n_dead)
            residual = residual - book[idx]
        return moved


@dataclass
class RQVAEResult:
    """What :func:`fit_rqvae` returns: the trained model and one dict per epoch (epoch, loss,
    recon, quant, seconds)."""

    model: RQVAE
    history: list[dict] = field(default_factory=list)


def fit_rqvae(
    table: torch.Tensor,
    config: RQVAEConfig | None = None,
    *,
    checkpoint_dir: str | Path | None = None,
    progress: bool = True,
    stop_after: int | None = None,
) -> RQVAEResult:
    """Train an RQ-VAE on ``table`` (rows = items). Each epoch's order is seeded by
    ``(seed, epoch)``; with ``checkpoint_dir`` the state is saved every epoch (and after the
    codebook init) and a later call resumes where it stopped (``stop_after`` epochs in this
    call simulate an interruption)."""
    from tqdm.auto import tqdm

    from .checkpoint import load_checkpoint, optimizer_from_flat, optimizer_to_flat, save_checkpoint

    config = config or RQVAEConfig()
    table = torch.as_tensor(table, dtype=torch.float32).cpu()
    if table.ndim != 2 or table.shape[0] < 2:
        raise ValueError(f"expected an (n_items, dim) table with at least 2 rows, got {tuple(table.shape)}")
    if not torch.isfinite(table).all():
        raise ValueError("the item table has non-finite values")
    model = RQVAE(table.shape[1], config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    fingerprint = {**config.to_dict(), "input_dim": int(table.shape[1]), "rows": int(table.shape[0])}
    history: list[dict] = []
    start = 0
    ck = load_checkpoint(checkpoint_dir) if checkpoint_dir is not None else None
    if ck is not None:
        tensors, state = ck
        if state["config"] != fingerprint:
            raise ValueError(f"checkpoint {checkpoint_dir} was written with another config: {state['config']}")
        model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        optimizer_from_flat(optimizer, tensors, state["optimizer"])
        history, start = state["history"], state["epoch"]
    else:
        model.set_standardisation(table)
        model.init_codebooks(table, config.seed)

    def save(epoch: int) -> None:
        if checkpoint_dir is None:
            return
        opt_t, opt_meta = optimizer_to_flat(optimizer)
        tensors = {f"model.{k}": v for k, v in model.state_dict().items()} | opt_t
        save_checkpoint(checkpoint_dir, tensors, {"epoch": epoch, "history": history, "optimizer": opt_meta,
                                                  "config": fingerprint})

    end = config.epochs if stop_after is None else min(config.epochs, start + stop_after)
    n = table.shape[0]
    bar = tqdm(range(start, end), desc="RQ-VAE", disable=not progress or start >= end, initial=start,
               total=config.epochs, leave=False)
    for epoch in bar:
        tick = time.perf_counter()
        gen = torch.Generator().manual_seed(config.seed * 1_000_003 + epoch)
        order = torch.randperm(n, generator=gen)
        model.train()
        sums = {"loss": 0.0, "recon": 0.0, "quant": 0.0}
        for a in range(0, n, config.batch_size):
            rows = order[a : a + config.batch_size]
            out = model(table[rows])
            optimizer.zero_grad(set_to_none=True)
            out["loss"].backward()
            optimizer.step()
            for key in sums:
                sums[key] += float(out[key].detach()) * len(rows) / n
        restarted = 0
        if config.restart_dead and epoch + 1 <= int(config.restart_fraction * config.epochs):
            model.eval()
            restarted = sum(model.restart_dead_codes(table, gen))
        history.append({"epoch": epoch, **{k: round(v, 6) for k, v in sums.items()}, "restarted": restarted,
                        "seconds": round(time.perf_counter() - tick, 4)})
        bar.set_postfix(recon=f"{sums['recon']:.4f}", quant=f"{sums['quant']:.4f}")
        if (epoch + 1) % 10 == 0 or epoch + 1 == end:
            save(epoch + 1)
    bar.close()
    model.eval()
    return RQVAEResult(model, history)


# ---------------------------------------------------------------------------------------
# semantic IDs


@torch.no_grad()
def semantic_ids(model: RQVAE, table: torch.Tensor, batch_size: int = 4096) -> torch.Tensor:
    """``(n, levels)`` int64 codes of every row of ``table`` (eval mode)."""
    was = model.training
    model.eval()
    table = torch.as_tensor(table, dtype=torch.float32)
    out = torch.cat([model.encode_codes(table[a : a + batch_size]) for a in range(0, len(table), batch_size)])
    model.train(was)
    return out.long()


def resolve_collisions(codes: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Append a disambiguating level: ``(n, L) -> (n, L + 1)``; the items that share all
    ``L`` codes get ``0, 1, 2, ...`` in row order, every other item 0. The result's rows are
    unique.

    >>> resolve_collisions(torch.tensor([[1, 2], [3, 4], [1, 2]])).tolist()
    [[1, 2, 0], [3, 4, 0], [1, 2, 1]]
    """
    c = torch.as_tensor(codes).long()
    if c.ndim != 2:
        raise ValueError(f"expected (n, levels) codes, got shape {tuple(c.shape)}")
    seen: dict[tuple, int] = {}
    suffix = torch.zeros(len(c), 1, dtype=torch.long)
    for row, key in enumerate(map(tuple, c.tolist())):
        suffix[row, 0] = seen.get(key, 0)
        seen[key] = seen.get(key, 0) + 1
    return torch.cat([c, suffix], 1)


def collision_stats(codes: torch.Tensor | np.ndarray) -> dict:
    """How many items share their full code tuple with another: ``items`` (rows),
    ``unique`` (distinct tuples), ``colliding_items`` (rows - unique: the items that need a
    suffix), ``colliding_groups`` (tuples used more than once), ``max_group`` (largest group)."""
    c = np.asarray(torch.as_tensor(codes).cpu())
    _, counts = np.unique(c, axis=0, return_counts=True)
    return {"items": int(len(c)), "unique": int(len(counts)), "colliding_items": int(len(c) - len(counts)),
            "colliding_groups": int((counts > 1).sum()), "max_group": int(counts.max()) if len(counts) else 0}


def code_usage(codes: torch.Tensor | np.ndarray, codebook_size: int) -> list[dict]:
    """Per level: codes used, and the perplexity ``exp(H(p))`` of the code frequencies (1 when
    one code takes every item, ``codebook_size`` when the codes are used evenly)."""
    c = np.asarray(torch.as_tensor(codes).cpu())
    out = []
    for level in range(c.shape[1]):
        counts = np.bincount(c[:, level], minlength=codebook_size).astype(np.float64)
        p = counts / counts.sum()
        nz = p[p > 0]
        out.append({"level": level, "used": int((counts > 0).sum()), "codebook_size": int(codebook_size),
                    "perplexity": float(math.exp(-(nz * np.log(nz)).sum()))})
    return out
