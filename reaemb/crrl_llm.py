"""The LLM side of CRRL (METHOD.md §4): the thought policy over the merged LRCL model, and
the stage that builds a run's ``crrl`` embedding variant.

The LLM is frozen in CRRL, so pass 1 of an item (its prompt up to ``<|Thought|>``) never
changes during training. :func:`build_prefix_cache` therefore runs pass 1 once over the whole
catalogue and keeps, for every item, the prefix's last hidden states (the thought module's
input and most of the mean pool) and its KV cache (what pass 2 attends to). After that:

* the thought vector μθ(x) of an anchor is the thought module on its cached hidden states;
* a rollout's embedding costs only the two suffix positions (``<|Thought|>`` carrying the
  action, then EOS) on top of the cached prefix K/V, expanded G times for the G rollouts
  (:func:`reaemb.thought.decode_suffix`, the same cached pass 2 as LRCL);
* the candidate table (noise-free embeddings of every item under the current module) costs
  the same two positions per item, so it can be refreshed often: every
  ``CRRLConfig.candidate_refresh_every`` steps, and once more at the end, which is also the
  exported catalogue.

Memory: the cache holds ``2 · layers · kv_heads · head_dim`` numbers per prefix token
(SmolLM2-135M: 11,520, i.e. 46 KB in fp32; ~2.6 MB per ml-100k item, ~3.9 GB for its 1,473
items) plus the hidden states (2.3 KB per token). Recomputing pass 1 instead would cost a
full catalogue pass (~155 s on two CPU cores) at every refresh. :class:`LLMThoughtPolicy`
also runs without a cache (pass 1 computed per step, as in LRCL), which the benchmark uses.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .backbone import collate, decoder_of, position_ids_from_mask
from .crrl import (
    SIMILARITIES,
    Anchors,
    CRRLConfig,
    build_anchors,
    first_rank_share,
    table_reward,
    train_crrl,
    validation_cooccurrence,
)
from .io import atomic_dir, atomic_write_json
from .thought import ThoughtAttention, ThoughtPrefix, decode_suffix, encode_prefix, save_thought

__all__ = [
    "PrefixCache",
    "build_prefix_cache",
    "expand_prefix",
    "LLMThoughtPolicy",
    "crrl_evaluation",
    "build_crrl_variant",
]


# --------------------------------------------------------------------------- pass-1 cache


@dataclass
class PrefixCache:
    """Pass 1 of every item, tokens of all items concatenated.

    Attributes:
        hidden: ``(T, D)`` last hidden states of the prefix tokens.
        kv: ``(T, layers, 2, kv_heads, head_dim)`` keys and values of the prefix tokens.
        start: ``(n_items + 1,)`` first row of each item (index 0 = padding, unused).
        length: ``(n_items + 1,)`` prefix length of each item (0 for padding).
        eos_embed: ``(D,)`` input embedding of the EOS token that ends every prompt.
    """

    hidden: torch.Tensor
    kv: torch.Tensor
    start: torch.Tensor
    length: torch.Tensor
    eos_embed: torch.Tensor

    @property
    def n_items(self) -> int:
        return len(self.length) - 1

    @property
    def nbytes(self) -> int:
        return self.hidden.numel() * self.hidden.element_size() + self.kv.numel() * self.kv.element_size()

    def gather(self, items: torch.Tensor | Sequence[int]) -> ThoughtPrefix:
        """The left-padded pass-1 state of ``items`` (what :func:`encode_prefix` returns for
        their prompts; ``thought`` is left None)."""
        items = torch.as_tensor(items, dtype=torch.long).cpu()
        if len(items) == 0 or int(items.min()) < 1 or int(items.max()) > self.n_items:
            raise ValueError(f"items must be in 1..{self.n_items}")
        length, start = self.length[items], self.start[items]
        width = int(length.max())
        rel = torch.arange(width).unsqueeze(0) - (width - length).unsqueeze(1)
        valid = rel >= 0
        rows = (start.unsqueeze(1) + rel.clamp(min=0)).to(self.hidden.device)
        # Padding columns repeat the item's first token: finite values that the attention
        # mask, the thought module's mask and the pooling mask all ignore.
        hidden = self.hidden[rows]
        kv = self.kv[rows]
        mask = torch.cat([valid.long(), torch.ones(len(items), 2, dtype=torch.long)], 1).to(self.hidden.device)
        pairs = [(kv[:, :, layer, 0].transpose(1, 2), kv[:, :, layer, 1].transpose(1, 2)) for layer in range(kv.shape[2])]
        eos = self.eos_embed.unsqueeze(0).expand(len(items), -1)
        return ThoughtPrefix(hidden, pairs, mask, position_ids_from_mask(mask), eos, None)


def _check_prompts(prompts: Sequence[Sequence[int]], thought_id: int, eos_id: int) -> None:
    for i, p in enumerate(prompts):
        if len(p) < 3 or p[-2] != thought_id or p[-1] != eos_id:
            raise ValueError(f"prompt {i} does not end with <|Thought|> then EOS")


@torch.no_grad()
def build_prefix_cache(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    thought_id: int,
    eos_id: int,
    pad_id: int = 0,
    batch_size: int = 32,
    progress: bool = True,
) -> PrefixCache:
    """Pass 1 over ``prompts`` (item ``i`` = ``prompts[i - 1]``, each ending in
    ``<|Thought|>, EOS``): the :class:`PrefixCache` of the catalogue. Batches are sorted by
    length (little padding); padding never enters the cache."""
    _check_prompts(prompts, thought_id, eos_id)
    body = decoder_of(model)
    cfg = model.config
    n_layers, n_kv = int(cfg.num_hidden_layers), int(cfg.num_key_value_heads)
    head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    length = torch.tensor([0] + [len(p) - 2 for p in prompts], dtype=torch.long)
    start = torch.zeros_like(length)
    start[1:] = torch.cumsum(length, 0)[:-1]
    total = int(length.sum())
    hidden = torch.empty(total, int(cfg.hidden_size), dtype=dtype, device=device)
    kv = torch.empty(total, n_layers, 2, n_kv, head_dim, dtype=dtype, device=device)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    bar = tqdm(range(0, len(order), batch_size), desc="pass 1 (catalogue)", disable=not progress, unit="batch")
    for b0 in bar:
        rows = order[b0 : b0 + batch_size]
        ids, mask = collate([prompts[i][:-2] for i in rows], pad_id, "left")
        ids, mask = ids.to(device), mask.to(device)
        out = body(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask), use_cache=True)
        valid = mask.bool()
        dest = torch.cat([start[i + 1] + torch.arange(length[i + 1]) for i in rows]).to(device)
        hidden[dest] = out.last_hidden_state[valid]
        layers = out.past_key_values.layers
        keys = torch.stack([ly.keys for ly in layers], 1).permute(0, 3, 1, 2, 4)  # (B, W, L, H, hd)
        values = torch.stack([ly.values for ly in layers], 1).permute(0, 3, 1, 2, 4)
        kv[dest] = torch.stack([keys[valid], values[valid]], 2)
    eos = body.get_input_embeddings()(torch.tensor([eos_id], device=device))[0]
    return PrefixCache(hidden, kv, start, length, eos)


def expand_prefix(prefix: ThoughtPrefix, repeats: int) -> ThoughtPrefix:
    """Each row of ``prefix`` repeated ``repeats`` times in a row (the G rollouts of an anchor
    share its pass 1)."""

    def rep(x):
        return x.repeat_interleave(repeats, dim=0)

    return ThoughtPrefix(rep(prefix.hidden), [(rep(k), rep(v)) for k, v in prefix.kv], rep(prefix.attention_mask),
                         rep(prefix.positions), rep(prefix.eos_embeds), None)


def _select(prefix: ThoughtPrefix, rows: slice) -> ThoughtPrefix:
    return ThoughtPrefix(prefix.hidden[rows], [(k[rows], v[rows]) for k, v in prefix.kv], prefix.attention_mask[rows],
                         prefix.positions[rows], prefix.eos_embeds[rows], None)


# --------------------------------------------------------------------------- the policy


class LLMThoughtPolicy:
    """:class:`reaemb.crrl.ThoughtPolicy` over a merged LRCL model and its thought module.

    The LLM is put in eval mode with ``requires_grad`` off: only ``module`` is trained.

    Args:
        model: the causal LM with LoRA merged.
        module: the :class:`ThoughtAttention` (trained).
        cache: the catalogue's :class:`PrefixCache`; None computes pass 1 for each batch of
            anchors from ``prompts`` (one prefix pass per anchor, shared by its G rollouts).
        prompts: item ``i``'s prompt ids at ``prompts[i - 1]`` (needed without a cache).
        pad_id: id written at padding positions.
        pooling: ``"mean"`` or ``"last"``.
        max_rollout_rows: rollouts decoded together (memory bound on the expanded KV cache).
    """

    def __init__(
        self,
        model: nn.Module,
        module: ThoughtAttention,
        cache: PrefixCache | None = None,
        prompts: Sequence[Sequence[int]] | None = None,
        pad_id: int = 0,
        pooling: str = "mean",
        max_rollout_rows: int = 256,
    ) -> None:
        if cache is None and prompts is None:
            raise ValueError("give the catalogue's PrefixCache or its prompts")
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.module = module
        self.cache = cache
        self.prompts = prompts
        self.pad_id = pad_id
        self.pooling = pooling
        self.max_rollout_rows = max_rollout_rows

    @property
    def n_items(self) -> int:
        return self.cache.n_items if self.cache is not None else len(self.prompts)

    def parameters(self):
        """The trainable parameters: the thought module's."""
        return self.module.parameters()

    @torch.no_grad()
    def prefix_states(self, items: torch.Tensor) -> ThoughtPrefix:
        """Pass 1 of ``items`` (from the cache, or computed now), left padded."""
        items = torch.as_tensor(items, dtype=torch.long).cpu()
        if self.cache is not None:
            return self.cache.gather(items)
        device = next(self.model.parameters()).device
        ids, mask = collate([self.prompts[int(i) - 1] for i in items], self.pad_id, "left")
        prefix = encode_prefix(self.model, self.module, ids.to(device), mask.to(device))
        prefix.thought = None
        return prefix

    def thought(self, states: ThoughtPrefix) -> torch.Tensor:
        """μθ: ``(B, D)`` thought vectors, differentiable in the module only (the pass-1
        states are detached, as in the method)."""
        p = states.hidden.shape[1]
        mu = self.module(states.hidden.detach(), states.attention_mask[:, :p], states.positions[:, :p])
        return mu.to(states.hidden.dtype)

    @torch.no_grad()
    def embed(self, states: ThoughtPrefix, thoughts: torch.Tensor) -> torch.Tensor:
        """Pass 2 with ``thoughts`` at ``<|Thought|>``: ``(B, d) -> (B, D)``, or
        ``(A, G, d) -> (A, G, D)`` with each anchor's KV cache expanded G times."""
        if thoughts.ndim == 2:
            return decode_suffix(self.model, states, thoughts, self.pooling)
        n_anchors, g, d = thoughts.shape
        per = max(1, self.max_rollout_rows // g)
        out = []
        for a0 in range(0, n_anchors, per):
            part = expand_prefix(_select(states, slice(a0, a0 + per)), g)
            emb = decode_suffix(self.model, part, thoughts[a0 : a0 + per].reshape(-1, d), self.pooling)
            out.append(emb.reshape(-1, g, emb.shape[-1]))
        return torch.cat(out)

    @torch.no_grad()
    def catalogue_table(self, batch_size: int = 256, progress: bool = False) -> torch.Tensor:
        """``(n_items + 1, D)`` float32 noise-free embeddings of every item under the current
        module (row 0 = padding, zeros), on CPU."""
        if self.cache is not None:
            order = torch.argsort(self.cache.length[1:], stable=True) + 1
        else:
            order = torch.as_tensor(sorted(range(1, self.n_items + 1), key=lambda i: len(self.prompts[i - 1])))
        table = None
        bar = tqdm(range(0, len(order), batch_size), desc="candidate table", disable=not progress, unit="batch")
        for b0 in bar:
            items = order[b0 : b0 + batch_size]
            states = self.prefix_states(items)
            emb = self.embed(states, self.thought(states)).float().cpu()
            if table is None:
                table = torch.zeros(self.n_items + 1, emb.shape[1])
            table[items] = emb
        return table

    def reference(self) -> LLMThoughtPolicy:
        """The same policy with a frozen copy of the current module (for the KL term)."""
        frozen = copy.deepcopy(self.module).eval()
        for p in frozen.parameters():
            p.requires_grad_(False)
        return LLMThoughtPolicy(self.model, frozen, self.cache, self.prompts, self.pad_id, self.pooling,
                                self.max_rollout_rows)


# --------------------------------------------------------------------------- the stage


def crrl_evaluation(train: Anchors, valid: Anchors | None = None, similarity: str = "dot"):
    """``table -> dict``: mean noise-free reward and first-rank share of the positive, on the
    training anchors and (if given) on the validation anchors, each item embedded by its row
    of the candidate table, candidates scored with ``similarity``."""

    def evaluate(table: torch.Tensor) -> dict:
        out = {"train_reward": table_reward(table, train, similarity),
               "train_first": first_rank_share(table, train, similarity)}
        if valid is not None:
            out |= {"valid_reward": table_reward(table, valid, similarity),
                    "valid_first": first_rank_share(table, valid, similarity)}
        return out

    return evaluate


def _lrcl_text_chars(folder: Path) -> int:
    info = json.loads((folder / "encoder.json").read_text())
    return int(((info.get("meta") or {}).get("config") or {}).get("max_value_chars", 100))


def build_crrl_variant(
    dataset,
    run,
    backbone_config,
    config: CRRLConfig | None = None,
    batch_size: int = 32,
    rebuild: bool = False,
    progress: bool = True,
) -> dict:
    """Train CRRL from the run's LRCL model and write the ``crrl`` variant.

    Reads ``<run>/models/lrcl/`` (notebook 02). Loads the backbone, the LRCL encoder, merges
    LoRA and freezes the LLM; runs pass 1 once over the catalogue (:func:`build_prefix_cache`);
    builds training anchors (training co-occurrence) and validation anchors (validation
    targets against training histories, negatives never co-occurring in either); measures the
    noise-free reward and first-rank share before, trains (checkpoints in
    ``<run>/checkpoints/crrl/``, resumed when present), measures after. Writes the catalogue
    embeddings under the trained module to ``<run>/embeddings/crrl/``, the module to
    ``<run>/models/crrl/`` and everything measured to ``<run>/results/crrl_history.json``.
    Skipped (the saved summary returned) when the variant exists and was trained with the same
    configuration from the same LRCL model (the fingerprint of the LRCL table), unless
    ``rebuild``; otherwise trained again from scratch.

    Returns a dict: ``history`` (per step), ``evaluations`` (step, train/valid reward and
    first-rank share at the start, after each refresh and at the end), ``before``,
    ``after``, anchor counts and seconds.
    """
    from accelerate import Accelerator

    from .backbone import catalogue_texts, load_backbone
    from .embeddings import (
        list_variants,
        load_item_embeddings,
        save_item_embeddings,
        table_fingerprint,
    )
    from .lrcl import load_encoder, merge_lora
    from .text import TextConfig

    config = config or CRRLConfig()
    history_path = run.results / "crrl_history.json"
    lrcl_dir = run.root / "models" / "lrcl"
    if not (lrcl_dir / "encoder.json").exists():
        raise FileNotFoundError(f"no LRCL model in {lrcl_dir}: run notebook 02 (LRCL) first")
    # the LRCL model is identified by the table it exported (a retrained LRCL means retraining CRRL)
    lrcl_fp = table_fingerprint(load_item_embeddings(run.embeddings / "lrcl")[0]) \
        if "lrcl" in list_variants(run.embeddings) else None
    if "crrl" in list_variants(run.embeddings) and history_path.exists() and not rebuild:
        saved = json.loads(history_path.read_text())
        if saved.get("lrcl_fingerprint") == lrcl_fp and saved.get("config") == json.loads(json.dumps(dataclasses.asdict(config))):
            return saved | {"skipped": True}
        rebuild = True  # another LRCL model or another configuration: start over
    t0 = time.perf_counter()
    accelerator = Accelerator(cpu=not torch.cuda.is_available() or backbone_config.device == "cpu")
    backbone = load_backbone(backbone_config)
    encoder = load_encoder(backbone, lrcl_dir)
    if encoder.thought is None:
        raise ValueError(f"{lrcl_dir} holds no thought module (an SCFT model?): CRRL needs the LRCL model")
    model = merge_lora(encoder).to(accelerator.device)
    module = encoder.thought.to(accelerator.device).train()
    texts = catalogue_texts(dataset, TextConfig(max_value_chars=_lrcl_text_chars(lrcl_dir)))
    prompts = [backbone.prompt_ids(t) for t in texts]
    cache = build_prefix_cache(model, prompts, backbone.thought_id, backbone.eos_id, backbone.pad_id, batch_size,
                               progress=progress and accelerator.is_main_process)
    t_cache = time.perf_counter()
    policy = LLMThoughtPolicy(model, module, cache, prompts, backbone.pad_id, backbone.config.pooling)

    anchors = build_anchors(dataset.cooccurrence, config.n_negatives, config.top_k_positives, config.seed,
                            negative_fallback_share=config.negative_fallback_share)
    valid = build_anchors(validation_cooccurrence(dataset), config.n_negatives, config.top_k_positives, config.seed,
                          exclude=dataset.cooccurrence, negative_fallback_share=config.negative_fallback_share)
    evaluate = crrl_evaluation(anchors, valid, config.similarity)
    table = policy.catalogue_table()
    before = evaluate(table)
    before_by = {sim: crrl_evaluation(anchors, valid, sim)(table) for sim in SIMILARITIES}
    ckpt = run.checkpoints / "crrl"
    if rebuild and ckpt.exists() and accelerator.is_main_process:
        shutil.rmtree(ckpt)
    accelerator.wait_for_everyone()
    t_train = time.perf_counter()
    history = train_crrl(policy, module, anchors, table, config, refresh_table=policy.catalogue_table,
                         evaluate=evaluate, reference=policy.reference() if config.beta > 0 else None,
                         checkpoint_dir=ckpt, progress=progress, accelerator=accelerator)
    t_end_train = time.perf_counter()
    final = policy.catalogue_table()
    after = evaluate(final)
    after_by = {sim: crrl_evaluation(anchors, valid, sim)(final) for sim in SIMILARITIES}
    t_final = time.perf_counter()
    evaluations = [{"step": h["step"], **{k[5:]: v for k, v in h.items() if k.startswith("eval_")}}
                   for h in history if any(k.startswith("eval_") for k in h)]
    evaluations.append({"step": config.steps, **after})
    same_positive = dict(zip(anchors.anchor.tolist(), anchors.positives[:, 0].tolist(), strict=True))
    summary = {
        "config": dataclasses.asdict(config),
        "history": history,
        "evaluations": evaluations,
        "before": before,
        "after": after,
        "by_similarity": {"before": before_by, "after": after_by},
        "anchors": {"train": len(anchors), "train_skipped": anchors.n_skipped, "train_fallback": anchors.n_fallback,
                    "valid": len(valid), "valid_skipped": valid.n_skipped, "valid_fallback": valid.n_fallback,
                    "valid_positive_is_train_positive": float(np.mean(
                        [same_positive.get(a) == p for a, p in zip(valid.anchor.tolist(), valid.positives[:, 0].tolist(),
                                                                    strict=True)]))},
        "cache_bytes": cache.nbytes,
        "seconds": {"load_and_pass1": t_cache - t0, "train": t_end_train - t_train,
                    "final_table": t_final - t_end_train, "total": t_final - t0},
        "lrcl": str(lrcl_dir),
        "lrcl_fingerprint": lrcl_fp,
    }
    if accelerator.is_main_process:
        meta = {"backbone": backbone.source, "pooling": backbone.config.pooling, "from": "lrcl",
                "config": config.identity(), "steps": config.steps}
        save_item_embeddings(run.embeddings, "crrl", final[1:], dataset, meta=meta)
        with atomic_dir(run.root / "models" / "crrl") as tmp:
            save_thought(module, tmp / "thought")
            atomic_write_json(tmp / "crrl.json", {"config": dataclasses.asdict(config), "lrcl": str(lrcl_dir)})
        atomic_write_json(history_path, summary)
    accelerator.wait_for_everyone()
    return summary | {"skipped": False}
