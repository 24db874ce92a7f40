"""CoderRec, the second comparison system (METHOD.md §7): a small sequential recommender on
item IDs plus RQ-VAE semantic IDs, trained with an LLM at a larger scale, used alone at
inference.

Pipeline (computed once per run: 1-2; per seed: 3-5)

1. **Item embeddings**: the last-token hidden state of the LLM (no chat template, no LM head)
   over ``"Title: …; Genres: …; Year: …;"``, i.e. every attribute of the dataset as
   ``"Key: value;"`` in the dataset's order (:func:`item_prompt_text`). Saved with
   :func:`reaemb.embeddings.save_item_embeddings` as variant ``coderrec-last`` under
   ``<run>/checkpoints/coderrec/<dataset key>/embeddings/`` (git-ignored, beside the RQ-VAE
   and the per-seed checkpoints; outside ``embeddings/``, so notebook 04 does not train its
   SRS grid on it).
2. **Semantic IDs**: :mod:`reaemb.rqvae` (64-d latent, 3 levels x 256 codes, cosine
   distance, rotation trick); collisions resolved by a 4th, disambiguating level.
3. **Small model** (:class:`SmallRecommender`): SASRec (:class:`reaemb.srs.SASRec` blocks,
   1 layer, 1 head, 64-d). An item's input vector is its ID embedding plus one embedding per
   semantic-ID level (the 4th level included); output scores are dot products with the same
   vectors (tied), trained with cross-entropy over the **full catalogue** plus, per RQ-VAE
   level, cross-entropy of a linear head predicting the next item's code ("small-model CE" =
   item CE + ``code_weight`` x mean code CE). Pre-trained alone with
   :func:`reaemb.training.fit` (resumable, early stopping on validation NDCG@10).
4. **Cross-scale training** (:func:`cross_scale_train`): the LLM (LoRA) reads the user's
   last ``cross_max_history`` items as ``inputs_embeds`` (standardised item embeddings ->
   one linear projection to the LLM's hidden size), followed by the **latent thought**: the
   small model's code logits at the last position -> Gumbel-softmax per level -> expected
   codebook vector per level, summed over levels -> RQ-VAE decoder (frozen) -> the same
   projection. A second pass appends the LLM's last hidden state as a continuous thought
   token (``thought_tokens`` of them, each on the KV cache of the previous pass); the final
   hidden state gives the **LLM-side CE** (scores against the projected embedding table,
   full catalogue) and, through a linear head back to the item-embedding space, the **MSE to
   the next item's** (standardised) embedding. Loss = small-model CE + ``llm_ce_weight``
   (0.001) x LLM CE + ``mse_weight`` (0.01) x MSE. The LLM-side losses reach the small model
   only through the Gumbel-softmax thought.
5. **Inference and evaluation**: the small model alone (the LLM is never called), through
   :func:`reaemb.evaluation.compute_ranks` under both protocols and all groups; rows in
   ``metrics.csv`` with ``backbone="sasrec-small"`` and ``variant="coderrec"``.

Choices where the paper is silent (all in :class:`CoderRecConfig`)
    - The paper's LLM is Qwen3-4B; here the package backbone (SmolLM2-135M by default).
    - Cross-scale examples: a random user, a random cut point of its training sequence; the
      small-model CE covers every position of that window, the LLM reads the window's last
      ``cross_max_history`` items and predicts the cut item.
    - The projection is initialised so that projected items have the RMS of the LLM's token
      embeddings; the LLM's last hidden state (after its final norm) is fed back as the
      continuous thought (as in Coconut).
    - LLM-side scores are dot products scaled by ``1/sqrt(hidden)`` (unscaled, the final-norm
      states of SmolLM2 give a CE far above uniform); the head to the embedding space starts
      at zero (MSE 1 on the unit-RMS standardised table).
    - Cross-scale training validates NDCG@10 (full ranking) every ``eval_every`` steps and
      keeps the best small-model state, the pre-trained one (step 0) included, as the SRS fit
      does per epoch; the record says whether cross-scale training improved validation.
    - Every step is seeded from ``(seed, step)`` (user draw, cut points, Gumbel noise,
      dropout), so a resumed run continues exactly as an uninterrupted one.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from .evaluation import (
    PROTOCOLS,
    EvalSet,
    build_eval_set,
    compute_ranks,
    metrics_table,
    rank_metrics,
)
from .rqvae import (
    RQVAE,
    RQVAEConfig,
    code_usage,
    collision_stats,
    fit_rqvae,
    resolve_collisions,
    semantic_ids,
)
from .srs import SASRec, SRSConfig, left_pad
from .training import _record_input, _recorded_input

__all__ = [
    "BACKBONE",
    "VARIANT",
    "EMBEDDING_VARIANT",
    "CoderRecConfig",
    "item_prompt_text",
    "last_token_embeddings",
    "SemanticItemEncoder",
    "SmallRecommender",
    "build_small_model",
    "attach_llm",
    "log_frame",
    "checkpoint_histories",
    "rqvae_plot",
    "training_plot",
    "CrossScaleLLM",
    "CrossScaleResult",
    "cross_scale_windows",
    "cross_scale_train",
    "CoderRecArtifacts",
    "prepare_artifacts",
    "train_and_evaluate_coderrec",
]

BACKBONE = "sasrec-small"
VARIANT = "coderrec"
EMBEDDING_VARIANT = "coderrec-last"
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass
class CoderRecConfig:
    """Small model, its pre-training and the cross-scale stage.

    Attributes:
        hidden_size, num_layers, num_heads, dropout, max_length: the small SASRec (64, 1, 1).
        code_weight: weight of the next-item code CE inside the small-model CE.
        learning_rate, batch_size, max_epochs, patience: pre-training (Adam, early stopping
            on validation NDCG@10, full ranking).
        cross_steps: cross-scale optimisation steps (0 skips the stage).
        cross_batch_size: users per cross-scale step.
        cross_max_history: items the LLM reads per user.
        cross_lr: AdamW learning rate of the LLM side (LoRA, projection, head).
        cross_small_lr: learning rate of the small model during cross-scale training.
        gumbel_tau: Gumbel-softmax temperature of the latent thought.
        thought_tokens: continuous thought tokens appended in the second pass.
        llm_ce_weight, mse_weight: weights of the LLM-side CE and of the MSE (0.001, 0.01).
        lora_r, lora_alpha, lora_dropout, lora_targets: LoRA on the LLM.
        eval_every: validate (and checkpoint) every this many cross-scale steps.
        eval_batch_size: users per scoring batch.
        seed: small-model init, data order, cross-scale draws, LoRA init.
    """

    hidden_size: int = 64
    num_layers: int = 1
    num_heads: int = 1
    dropout: float = 0.2
    max_length: int = 50
    code_weight: float = 1.0
    learning_rate: float = 1e-3
    batch_size: int = 128
    max_epochs: int = 30
    patience: int = 5
    cross_steps: int = 40
    cross_batch_size: int = 8
    cross_max_history: int = 20
    cross_lr: float = 1e-4
    cross_small_lr: float = 1e-4
    gumbel_tau: float = 1.0
    thought_tokens: int = 1
    llm_ce_weight: float = 0.001
    mse_weight: float = 0.01
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] = LORA_TARGETS
    eval_every: int = 10
    eval_batch_size: int = 512
    seed: int = 0

    def __post_init__(self) -> None:
        self.lora_targets = tuple(self.lora_targets)
        for name in ("hidden_size", "num_layers", "num_heads", "max_length", "batch_size", "max_epochs",
                     "patience", "cross_batch_size", "cross_max_history", "thought_tokens", "eval_every",
                     "eval_batch_size", "lora_r"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.cross_steps < 0:
            raise ValueError(f"cross_steps must be >= 0, got {self.cross_steps}")
        if self.gumbel_tau <= 0:
            raise ValueError(f"gumbel_tau must be positive, got {self.gumbel_tau}")
        for name in ("code_weight", "llm_ce_weight", "mse_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["lora_targets"] = list(d["lora_targets"])
        return d

    def srs_config(self, extra: dict | None = None) -> SRSConfig:
        """The :class:`SRSConfig` of the small SASRec (what :func:`reaemb.training.fit` reads)."""
        return SRSConfig(backbone="sasrec", hidden_size=self.hidden_size, max_length=self.max_length,
                         num_layers=self.num_layers, num_heads=self.num_heads, dropout=self.dropout,
                         learning_rate=self.learning_rate, batch_size=self.batch_size, max_epochs=self.max_epochs,
                         patience=self.patience, eval_batch_size=self.eval_batch_size, seed=self.seed,
                         extra=dict(extra or {}))


# ---------------------------------------------------------------------------------------
# 1. item embeddings


def item_prompt_text(attributes: Mapping[str, str], max_value_chars: int = 100) -> str:
    """``"Title: Toy Story; Genres: Animation;"``: every non-empty attribute as ``"Key: value;"``.

    >>> item_prompt_text({"title": "Toy Story", "release_year": "1995"})
    'Title: Toy Story; Release year: 1995;'
    """
    parts = [f"{str(k).replace('_', ' ').strip().capitalize()}: {str(v)[:max_value_chars].rstrip()};"
             for k, v in attributes.items() if str(v).strip()]
    return " ".join(parts)


def last_token_embeddings(backbone, texts: list[str], batch_size: int = 32, progress: bool = True) -> torch.Tensor:
    """``(len(texts), hidden)`` last-token hidden states (after the final norm) of the LLM over
    the plain texts (the tokenizer's own special tokens, no chat template), float32 on CPU.
    Texts are batched by length; the result is in the given order."""
    from tqdm.auto import tqdm

    from .backbone import encode_prompts

    if not texts:
        raise ValueError("no texts to embed")
    tok = backbone.tokenizer
    prompts = [list(tok(t)["input_ids"])[: backbone.config.max_length] or [backbone.eos_id] for t in texts]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out = torch.empty(len(prompts), backbone.hidden_size)
    model = backbone.model
    was = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for a in tqdm(range(0, len(order), batch_size), desc="item embeddings (last token)", disable=not progress):
                rows = order[a : a + batch_size]
                emb = encode_prompts(model, [prompts[i] for i in rows], backbone.pad_id, "last", "left",
                                     share_prefix=False, device=backbone.device)
                out[torch.as_tensor(rows)] = emb.float().cpu()
    finally:
        model.train(was)
    return out


# ---------------------------------------------------------------------------------------
# 3. the small model


class SemanticItemEncoder(nn.Module):
    """Item index -> ID embedding + sum of its semantic-ID level embeddings (row 0 = zero).

    ``sem_ids`` is ``(n_items, levels)`` (rows = items ``1..n``), level ``l`` taking values in
    ``0..vocab[l]-1``."""

    is_frozen_table = False
    adapter = None

    def __init__(self, n_items: int, hidden: int, sem_ids: torch.Tensor, vocab: list[int]):
        super().__init__()
        sem_ids = torch.as_tensor(sem_ids).long()
        if sem_ids.ndim != 2 or sem_ids.shape[0] != n_items:
            raise ValueError(f"sem_ids must be ({n_items}, levels), got {tuple(sem_ids.shape)}")
        if len(vocab) != sem_ids.shape[1] or any(int(sem_ids[:, i].max()) >= v for i, v in enumerate(vocab)):
            raise ValueError(f"semantic IDs do not fit the vocabulary sizes {vocab}")
        self.n_items = n_items
        self.embedding = nn.Embedding(n_items + 1, hidden, padding_idx=0)
        self.levels = nn.ModuleList(nn.Embedding(v, hidden) for v in vocab)
        self.register_buffer("sem", torch.cat([torch.zeros(1, sem_ids.shape[1], dtype=torch.long), sem_ids]))

    def table(self) -> torch.Tensor:
        """``(n_items + 1, hidden)``."""
        out = self.embedding.weight
        for level, emb in enumerate(self.levels):
            out = out + emb(self.sem[:, level])
        return torch.cat([torch.zeros_like(out[:1]), out[1:]])

    def forward(self, seq: torch.Tensor, table: torch.Tensor | None = None) -> torch.Tensor:
        return F.embedding(seq, self.table() if table is None else table)


class SmallRecommender(SASRec):
    """The small CoderRec model: :class:`reaemb.srs.SASRec` over :class:`SemanticItemEncoder`
    inputs, full-catalogue cross-entropy, and one code head per RQ-VAE level."""

    def __init__(self, n_items: int, config: SRSConfig, sem_ids: torch.Tensor, vocab: list[int],
                 code_levels: int, code_weight: float = 1.0):
        super().__init__(n_items, config)
        torch.manual_seed(config.seed)
        self.items = SemanticItemEncoder(n_items, config.hidden_size, sem_ids, vocab)
        self.code_levels = int(code_levels)
        self.codebook_size = int(vocab[0])
        if code_levels < 1 or any(v != vocab[0] for v in vocab[:code_levels]):
            raise ValueError("the first code_levels levels must share one codebook size")
        self.code_head = nn.Linear(config.hidden_size, code_levels * vocab[0])
        self.code_weight = code_weight
        self._init_weights()

    def code_logits(self, h: torch.Tensor) -> torch.Tensor:
        """``(..., H) -> (..., code_levels, codebook_size)``: the next item's code logits."""
        return self.code_head(h).unflatten(-1, (self.code_levels, self.codebook_size))

    def losses(self, seq: torch.Tensor) -> dict[str, torch.Tensor]:
        """Item CE (full catalogue) and code CE over every real position of ``(B, T + 1)``
        left-padded windows, and ``loss`` = item CE + ``code_weight`` x code CE."""
        inputs, targets = seq[:, :-1], seq[:, 1:]
        valid = (inputs != 0) & (targets != 0)
        table = self.items.table()
        h = self.encode(inputs, table)[valid]
        logits = h @ table.T
        logits[:, 0] = float("-inf")
        tgt = targets[valid]
        item_ce = F.cross_entropy(logits, tgt)
        codes = self.items.sem[tgt, : self.code_levels]
        code_ce = F.cross_entropy(self.code_logits(h).reshape(-1, self.codebook_size), codes.reshape(-1))
        return {"loss": item_ce + self.code_weight * code_ce, "item_ce": item_ce, "code_ce": code_ce}

    def training_loss(self, seq: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return self.losses(seq)["loss"]


def build_small_model(n_items: int, config: CoderRecConfig, sem_ids: torch.Tensor, codebook_size: int,
                      code_levels: int) -> SmallRecommender:
    """The small model over ``sem_ids`` (``(n_items, code_levels + 1)``, the last level the
    collision suffix); the codes' hash is part of its config, so a checkpoint of other codes
    is refused."""
    from .io import sha256_json

    sem_ids = torch.as_tensor(sem_ids).long()
    vocab = [codebook_size] * code_levels + [int(sem_ids[:, code_levels:].max()) + 1 for _ in
                                              range(sem_ids.shape[1] - code_levels)]
    extra = {"code_weight": config.code_weight, "sem_ids": sha256_json(sem_ids.tolist())[:16]}
    return SmallRecommender(n_items, config.srs_config(extra), sem_ids, vocab, code_levels, config.code_weight)


# ---------------------------------------------------------------------------------------
# 4. cross-scale training


class CrossScaleLLM(nn.Module):
    """The LLM side: projection of standardised item embeddings to the LLM's hidden size, the
    LoRA-wrapped LLM, and a head from its hidden size back to the item-embedding space. The
    RQ-VAE (codebooks and decoder) is held frozen."""

    def __init__(self, model: nn.Module, item_table: torch.Tensor, rqvae: RQVAE):
        super().__init__()
        self.model = model
        self.rqvae = rqvae
        for p in rqvae.parameters():
            p.requires_grad_(False)
        hidden = int(model.config.hidden_size)
        with torch.no_grad():
            items = rqvae.standardise(item_table)
        self.register_buffer("items", items)
        self.proj = nn.Linear(items.shape[1], hidden)
        self.head = nn.Linear(hidden, items.shape[1])
        self.logit_scale = hidden ** -0.5
        with torch.no_grad():  # projected items get the RMS of the token embeddings
            self.head.weight.zero_()  # predicts the mean embedding at first: MSE starts at 1
            self.head.bias.zero_()
            token_rms = model.get_input_embeddings().weight.float().pow(2).mean().sqrt()
            out_rms = self.proj(items).pow(2).mean().sqrt().clamp(min=1e-8)
            self.proj.weight.mul_(token_rms / out_rms)
            self.proj.bias.mul_(token_rms / out_rms)

    def thought(self, code_probs: torch.Tensor) -> torch.Tensor:
        """``(B, L, K)`` code distributions -> ``(B, hidden)`` latent thought token."""
        return self.proj(self.rqvae.decoder(self.rqvae.soft_latent(code_probs)))

    def forward(self, history: torch.Tensor, code_probs: torch.Tensor, thought_tokens: int = 1) -> torch.Tensor:
        """``(B, M)`` left-padded histories and the thought -> ``(B, hidden)`` final hidden
        state after ``thought_tokens`` continuous-thought passes."""
        from .backbone import decoder_of, position_ids_from_mask

        body = decoder_of(self.model)
        real = history != 0
        emb = self.proj(self.items[(history - 1).clamp(min=0)]) * real.unsqueeze(-1)
        x = torch.cat([emb, self.thought(code_probs).unsqueeze(1)], 1)
        mask = torch.cat([real.long(), torch.ones_like(history[:, :1])], 1)
        pos = position_ids_from_mask(mask)
        out = body(inputs_embeds=x, attention_mask=mask, position_ids=pos, use_cache=True)
        h, cache, last = out.last_hidden_state[:, -1:], out.past_key_values, pos[:, -1:]
        for _ in range(thought_tokens):
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
            last = last + 1
            out = body(inputs_embeds=h, attention_mask=mask, position_ids=last, past_key_values=cache, use_cache=True)
            h, cache = out.last_hidden_state[:, -1:], out.past_key_values
        return h[:, 0]

    def losses(self, h: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        """LLM-side CE over the full catalogue (scaled dot products with the projected item
        table) and MSE to the next item's standardised embedding."""
        logits = (h @ self.proj(self.items).T) * self.logit_scale
        ce = F.cross_entropy(logits, targets - 1)
        mse = F.mse_loss(self.head(h), self.items[targets - 1])
        return {"llm_ce": ce, "mse": mse}


def cross_scale_windows(dataset, users: torch.Tensor, width: int, generator: torch.Generator) -> torch.Tensor:
    """``(B, width)`` left-padded windows of the users' training sequences ending at a cut
    point drawn uniformly from positions ``1..len-1`` (the last column is the target)."""
    seqs = []
    for u in users.tolist():
        s = dataset.train_sequence(u)
        cut = int(torch.randint(1, len(s), (1,), generator=generator)) if len(s) > 1 else len(s) - 1
        seqs.append(np.asarray(s[max(0, cut + 1 - width) : cut + 1]))
    return left_pad(seqs, width)


@dataclass
class CrossScaleResult:
    """What :func:`cross_scale_train` reports: ``history`` (one dict per step: loss terms,
    seconds), ``valid`` (step, NDCG@10 per validation), the best step (0 = the pre-trained
    model) and its NDCG@10."""

    history: list[dict] = field(default_factory=list)
    valid: list[dict] = field(default_factory=list)
    best_step: int = 0
    best_valid: float = float("nan")

    @property
    def seconds(self) -> float:
        return float(sum(h["seconds"] for h in self.history))


def _valid_ndcg10(model, valid_set: EvalSet, batch_size: int, device) -> float:
    ranks = compute_ranks(model, valid_set, protocols=("full",), batch_size=batch_size, device=device)["full"]
    return float(rank_metrics(ranks, 10)[1].mean())


def _step_seed(seed: int, step: int) -> int:
    return (seed * 1_000_003 + step * 7_919 + 101) % (2**63 - 1)


def cross_scale_train(
    small: SmallRecommender,
    llm: CrossScaleLLM,
    dataset,
    config: CoderRecConfig,
    *,
    valid_set: EvalSet | None = None,
    checkpoint_dir: str | Path | None = None,
    progress: bool = True,
    stop_after: int | None = None,
) -> CrossScaleResult:
    """Joint training of the small model and the LLM side for ``config.cross_steps`` steps
    (see the module docstring); the small model ends holding its best validated state.

    With ``checkpoint_dir`` everything trained (small model, LoRA, projection, head, AdamW
    state, best state, histories) is saved at every validation and a later call resumes;
    ``stop_after`` steps in this call simulate an interruption.
    """
    from tqdm.auto import tqdm

    from .checkpoint import load_checkpoint, optimizer_from_flat, optimizer_to_flat, save_checkpoint
    from .training import _load_state, _state_tensors

    device = next(llm.model.parameters()).device
    small.to(device)
    llm.to(device)
    if valid_set is None:
        valid_set = build_eval_set(dataset, "valid", config.max_length, config.seed)
    users = torch.as_tensor([u for u in range(dataset.n_users) if len(dataset.train_sequence(u)) > 1])
    if len(users) == 0:
        raise ValueError("no user has two training interactions: nothing to train on")
    llm_params = {n: p for n, p in llm.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW([
        {"params": list(small.parameters()), "lr": config.cross_small_lr},
        {"params": list(llm_params.values()), "lr": config.cross_lr},
    ])
    fingerprint = {**config.to_dict(), "small": small.config.extra}
    for key in ("eval_batch_size", "max_epochs", "patience"):
        fingerprint.pop(key)
    result = CrossScaleResult()
    start = 0
    best_state = _state_tensors(small, "")
    ck = load_checkpoint(checkpoint_dir) if checkpoint_dir is not None else None
    if ck is not None:
        tensors, state = ck
        if state["config"] != fingerprint:
            raise ValueError(f"checkpoint {checkpoint_dir} was written with another config: {state['config']}")
        _load_state(small, tensors, "small.")
        with torch.no_grad():
            for name, p in llm_params.items():
                p.copy_(tensors[f"llm.{name}"])
        optimizer_from_flat(optimizer, tensors, state["optimizer"])
        best_state = {k[5:]: v for k, v in tensors.items() if k.startswith("best.")}
        result = CrossScaleResult(state["history"], state["valid"], state["best_step"], state["best_valid"])
        start = state["step"]
    else:
        result.best_valid = _valid_ndcg10(small, valid_set, config.eval_batch_size, device)
        result.valid.append({"step": 0, "ndcg10": result.best_valid})

    def save(step: int) -> None:
        if checkpoint_dir is None:
            return
        opt_t, opt_meta = optimizer_to_flat(optimizer)
        tensors = (_state_tensors(small, "small.") | {f"best.{k}": v for k, v in best_state.items()}
                   | {f"llm.{n}": p.detach().cpu().clone() for n, p in llm_params.items()} | opt_t)
        save_checkpoint(checkpoint_dir, tensors, {
            "step": step, "history": result.history, "valid": result.valid, "best_step": result.best_step,
            "best_valid": result.best_valid, "optimizer": opt_meta, "config": fingerprint})

    end = config.cross_steps if stop_after is None else min(config.cross_steps, start + stop_after)
    bar = tqdm(range(start, end), desc=f"cross-scale seed {config.seed}", disable=not progress or start >= end,
               initial=start, total=config.cross_steps, leave=False)
    for step in bar:
        tick = time.perf_counter()
        seed = _step_seed(config.seed, step)
        torch.manual_seed(seed)  # Gumbel noise, dropout
        gen = torch.Generator().manual_seed(seed)
        batch_users = users[torch.randint(0, len(users), (config.cross_batch_size,), generator=gen)]
        window = cross_scale_windows(dataset, batch_users, config.max_length + 1, gen).to(device)
        small.train()
        llm.train()
        parts = small.losses(window)
        inputs = window[:, :-1]
        h_small = small.encode(inputs, small.items.table(), last_only=True)[:, -1]
        probs = F.gumbel_softmax(small.code_logits(h_small), tau=config.gumbel_tau, hard=False, dim=-1)
        h_llm = llm(inputs[:, -config.cross_max_history:], probs, config.thought_tokens)
        parts |= llm.losses(h_llm, window[:, -1])
        loss = parts["loss"] + config.llm_ce_weight * parts["llm_ce"] + config.mse_weight * parts["mse"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        result.history.append({"step": step, "loss": float(loss.detach()),
                               **{k: float(v.detach()) for k, v in parts.items() if k != "loss"},
                               "small_loss": float(parts["loss"].detach()),
                               "seconds": round(time.perf_counter() - tick, 4)})
        bar.set_postfix(loss=f"{result.history[-1]['loss']:.3f}", llm_ce=f"{result.history[-1]['llm_ce']:.3f}")
        if (step + 1) % config.eval_every == 0 or step + 1 == config.cross_steps:
            valid = _valid_ndcg10(small, valid_set, config.eval_batch_size, device)
            result.valid.append({"step": step + 1, "ndcg10": valid})
            if valid > result.best_valid:
                result.best_step, result.best_valid = step + 1, valid
                best_state = _state_tensors(small, "")
            save(step + 1)
    bar.close()
    _load_state(small, best_state, "")
    small.eval()
    llm.eval()
    return result


def attach_llm(backbone, item_table: torch.Tensor, rqvae: RQVAE, config: CoderRecConfig) -> CrossScaleLLM:
    """Wrap ``backbone.model`` with fresh LoRA adapters (seeded by ``config.seed``; the model
    is modified in place, so pass a freshly loaded backbone) and build the LLM side."""
    import peft

    torch.manual_seed(config.seed)
    lora = peft.LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                           target_modules=list(config.lora_targets), bias="none")
    model = peft.get_peft_model(backbone.model, lora)
    return CrossScaleLLM(model, item_table, rqvae).to(backbone.device)


# ---------------------------------------------------------------------------------------
# 5. the run: artifacts once, models per seed


@dataclass
class CoderRecArtifacts:
    """Computed once per run: the item table, the RQ-VAE and the semantic IDs.

    Attributes:
        table: ``(n_items, D)`` last-token item embeddings.
        rqvae: the trained RQ-VAE; ``rq_history`` its per-epoch losses.
        codes: ``(n_items, levels)`` RQ-VAE codes; ``sem_ids`` with the collision suffix.
        collisions: :func:`reaemb.rqvae.collision_stats` of ``codes``.
        usage: :func:`reaemb.rqvae.code_usage` of ``codes``.
        folder: where the table and the IDs are stored.
    """

    table: torch.Tensor
    rqvae: RQVAE
    rq_history: list[dict]
    codes: torch.Tensor
    sem_ids: torch.Tensor
    collisions: dict
    usage: list[dict]
    folder: Path

    @property
    def rq_config(self) -> RQVAEConfig:
        return self.rqvae.config


def _key(dataset) -> str:
    return dataset.path.name if dataset.path is not None else dataset.name


def prepare_artifacts(run, dataset, load_llm: Callable[[], object], rq_config: RQVAEConfig | None = None, *,
                      batch_size: int = 32, progress: bool = True) -> CoderRecArtifacts:
    """Item embeddings (reused when ``checkpoints/coderrec/<key>/embeddings/coderrec-last``
    exists; ``load_llm`` is only called otherwise), the RQ-VAE (resumed from / reloaded from
    ``checkpoints/coderrec/<key>/rqvae``) and the semantic IDs (``semantic_ids.json`` in the
    same folder)."""
    from .embeddings import load_item_embeddings, save_item_embeddings
    from .io import atomic_write_json

    rq_config = rq_config or RQVAEConfig()
    folder = run.checkpoints / "coderrec" / _key(dataset)
    emb_folder = folder / "embeddings" / EMBEDDING_VARIANT
    if (emb_folder / "manifest.json").exists():
        table, _ = load_item_embeddings(emb_folder, dataset)
    else:
        backbone = load_llm()
        texts = [item_prompt_text(dataset.item_attributes[i]) for i in range(1, dataset.n_items + 1)]
        tick = time.perf_counter()
        table = last_token_embeddings(backbone, texts, batch_size, progress)
        save_item_embeddings(folder / "embeddings", EMBEDDING_VARIANT, table, dataset, meta={
            "pooling": "last", "prompt": "Key: value; ...", "example": texts[0], "source": backbone.source,
            "seconds": round(time.perf_counter() - tick, 1)})
        del backbone
    result = fit_rqvae(table, rq_config, checkpoint_dir=folder / "rqvae", progress=progress)
    codes = semantic_ids(result.model, table)
    sem = resolve_collisions(codes)
    collisions = collision_stats(codes)
    usage = code_usage(codes, rq_config.codebook_size)
    atomic_write_json(folder / "semantic_ids.json", {"codes": codes.tolist(), "sem_ids": sem.tolist(),
                                                     "collisions": collisions, "usage": usage})
    return CoderRecArtifacts(table, result.model, result.history, codes, sem, collisions, usage, folder)


def artifacts_fingerprint(artifacts: CoderRecArtifacts) -> str:
    """Fingerprint of what the small model is built from: the item table and the semantic IDs."""
    from .embeddings import table_fingerprint

    return table_fingerprint(torch.cat([artifacts.table.float().cpu(), artifacts.sem_ids.float().cpu()], 1))


def forget_stale_coderrec(run, dataset, fingerprint: str) -> bool:
    """Drop CoderRec's rows and per-seed checkpoints when they were computed from other
    artifacts (a rebuilt item table or RQ-VAE: ``results/srs_inputs.json`` records the
    fingerprint with the rows). Rows written before fingerprints were recorded are kept and
    the current fingerprint recorded for them. Returns True when something was dropped."""
    import shutil

    from .results import drop_metrics, read_metrics

    recorded = _recorded_input(run, dataset, VARIANT)
    df = read_metrics(run)
    has_rows = bool(((df["dataset"] == dataset.name) & (df["variant"] == VARIANT)).any())
    if recorded is None:
        if has_rows:
            _record_input(run, dataset, VARIANT, fingerprint)
        return False
    if recorded == fingerprint:
        return False
    drop_metrics(run, dataset.name, VARIANT)
    ck_root = run.checkpoints / "coderrec" / _key(dataset)
    for folder in [*ck_root.glob("small-seed*"), *ck_root.glob("cross-seed*")]:
        shutil.rmtree(folder)
    _record_input(run, dataset, VARIANT, None)
    return True


def train_and_evaluate_coderrec(
    run,
    dataset,
    artifacts: CoderRecArtifacts,
    seed: int,
    config: CoderRecConfig,
    load_llm: Callable[[], object],
    *,
    eval_sets: dict[str, EvalSet] | None = None,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> dict:
    """One seed: pre-train the small model (:func:`reaemb.training.fit`), cross-scale
    training (a fresh LLM from ``load_llm``), then the small model alone on the test split
    under both protocols; rows appended to ``metrics.csv`` (``sasrec-small`` / ``coderrec``),
    per-user ranks to ``results/ranks/``. Both stages resume from their checkpoints; a seed
    already in ``metrics.csv`` is skipped. Returns a log dict (``skipped``, times, NDCG@10s,
    loss histories)."""
    from dataclasses import replace

    from .io import atomic_dir
    from .results import append_metrics, completed
    from .training import default_device, fit

    ck_root = run.checkpoints / "coderrec" / _key(dataset)
    fingerprint = artifacts_fingerprint(artifacts)
    forget_stale_coderrec(run, dataset, fingerprint)
    if completed(run, dataset.name, BACKBONE, VARIANT, seed):
        return {"seed": seed, "skipped": True, **checkpoint_histories(ck_root, seed)}
    tick = time.perf_counter()
    config = replace(config, seed=seed)
    device = torch.device(device) if device is not None else default_device()
    eval_sets = eval_sets if eval_sets is not None else {}
    for split in ("valid", "test"):
        if split not in eval_sets:
            eval_sets[split] = build_eval_set(dataset, split, config.max_length, seed)
    levels = artifacts.rq_config.levels
    small = build_small_model(dataset.n_items, config, artifacts.sem_ids, artifacts.rq_config.codebook_size, levels)
    pre = fit(small, dataset, valid_set=eval_sets["valid"], checkpoint_dir=ck_root / f"small-seed{seed}",
              device=device, progress=progress)
    pre_seconds = pre.seconds
    cross = CrossScaleResult(best_valid=pre.best_valid)
    if config.cross_steps > 0:
        backbone = load_llm()
        llm = attach_llm(backbone, artifacts.table, artifacts.rqvae, config)
        cross = cross_scale_train(small, llm, dataset, config, valid_set=eval_sets["valid"],
                                  checkpoint_dir=ck_root / f"cross-seed{seed}", progress=progress)
        del llm, backbone
    small.to(device)
    ranks = compute_ranks(small, eval_sets["test"], protocols=PROTOCOLS, batch_size=config.eval_batch_size,
                          device=device)
    table = metrics_table(ranks, eval_sets["test"].groups)
    rows = table.assign(dataset=dataset.name, backbone=BACKBONE, variant=VARIANT, seed=seed)
    append_metrics(run, rows)
    _record_input(run, dataset, VARIANT, fingerprint)
    with atomic_dir(run.results / "ranks" / f"{dataset.name}_{BACKBONE}_{VARIANT}_seed{seed}") as tmp:
        np.savez_compressed(tmp / "ranks.npz", **ranks)
    m = rows.set_index(["protocol", "group", "metric"])["value"]
    return {"seed": seed, "skipped": False, "seconds": round(time.perf_counter() - tick, 1),
            "pretrain_seconds": round(pre_seconds, 1), "pretrain_epochs": pre.epochs_run,
            "pretrain_valid_ndcg10": round(pre.best_valid, 4), "cross_seconds": round(cross.seconds, 1),
            "cross_steps": len(cross.history), "cross_best_step": cross.best_step,
            "cross_valid_ndcg10": round(cross.best_valid, 4),
            "test_ndcg10_sampled": round(float(m[("sampled100", "all", "NDCG@10")]), 4),
            "test_ndcg10_full": round(float(m[("full", "all", "NDCG@10")]), 4),
            "pretrain_history": pre.history, "cross_history": cross.history, "cross_valid": cross.valid}


def checkpoint_histories(ck_root: str | Path, seed: int) -> dict:
    """The loss histories of a finished seed, read back from its checkpoints (for the plots
    of a rerun that skipped it): ``pretrain_history``, ``cross_history``, ``cross_valid``."""
    import json

    out = {"pretrain_history": [], "cross_history": [], "cross_valid": []}
    small = Path(ck_root) / f"small-seed{seed}" / "state.json"
    cross = Path(ck_root) / f"cross-seed{seed}" / "state.json"
    if small.exists():
        out["pretrain_history"] = json.loads(small.read_text())["history"]
    if cross.exists():
        state = json.loads(cross.read_text())
        out["cross_history"], out["cross_valid"] = state["history"], state["valid"]
    return out


def rqvae_plot(history: list[dict], usage: list[dict], stem: str | Path | None = None):
    """RQ-VAE training (reconstruction and quantization loss per epoch, left) and code usage
    per level (perplexity and codes used, right)."""
    import matplotlib.pyplot as plt

    from .plots import save_figure

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(9.6, 3.4))
    epochs = [h["epoch"] for h in history]
    ax.plot(epochs, [h["recon"] for h in history], label="reconstruction (MSE)")
    ax.plot(epochs, [h["quant"] for h in history], label="codebook + commitment")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.legend(frameon=False)
    levels = [u["level"] for u in usage]
    bx.bar([lv - 0.2 for lv in levels], [u["perplexity"] for u in usage], width=0.4, label="perplexity")
    bx.bar([lv + 0.2 for lv in levels], [u["used"] for u in usage], width=0.4, label="codes used")
    if usage:
        bx.axhline(usage[0]["codebook_size"], color="grey", lw=0.8, ls="--", label="codebook size")
    bx.set_xticks(levels, [f"level {lv}" for lv in levels])
    bx.legend(frameon=False, fontsize=8)
    fig.tight_layout()
    if stem is not None:
        save_figure(fig, stem)
    return fig


def training_plot(logs: list[dict], stem: str | Path | None = None):
    """Per seed: small-model pre-training loss and validation NDCG@10 per epoch, the
    cross-scale loss terms per step (small-model CE, LLM-side CE, MSE) and the cross-scale
    validation NDCG@10."""
    import matplotlib.pyplot as plt

    from .plots import save_figure

    fig, axes = plt.subplots(1, 4, figsize=(17, 3.4))
    for log in logs:
        seed = log["seed"]
        pre, cross = log.get("pretrain_history") or [], log.get("cross_history") or []
        if pre:
            line, = axes[0].plot([h["epoch"] for h in pre], [h["loss"] for h in pre], label=f"seed {seed}")
            axes[1].plot([h["epoch"] for h in pre], [h["valid"] for h in pre], color=line.get_color(),
                         label=f"seed {seed} pre-training")
        if cross:
            steps = [h["step"] for h in cross]
            for key, ls in (("small_loss", "-"), ("llm_ce", "--"), ("mse", ":")):
                axes[2].plot(steps, [h[key] for h in cross], ls=ls, label=f"seed {seed} {key}")
        if log.get("cross_valid"):
            axes[3].plot([v["step"] for v in log["cross_valid"]], [v["ndcg10"] for v in log["cross_valid"]],
                         marker="o", ms=3, label=f"seed {seed}")
    axes[0].set(xlabel="epoch", ylabel="small-model CE (train)", title="pre-training")
    axes[1].set(xlabel="epoch", ylabel="valid NDCG@10 (full)", title="validation")
    axes[2].set(xlabel="step", ylabel="loss (batch)", title="cross-scale training", yscale="log")
    axes[3].set(xlabel="step (0 = pre-trained)", ylabel="valid NDCG@10 (full)", title="cross-scale validation")
    for ax in axes:
        if ax.lines:
            ax.legend(frameon=False, fontsize=7)
    fig.tight_layout()
    if stem is not None:
        save_figure(fig, stem)
    return fig


def log_frame(logs: list[dict]) -> pd.DataFrame:
    """The per-seed logs of :func:`train_and_evaluate_coderrec` as a table (histories left
    out)."""
    keep = [{k: v for k, v in d.items() if not k.endswith(("history", "valid")) or k.endswith("ndcg10")}
            for d in logs]
    return pd.DataFrame(keep)
