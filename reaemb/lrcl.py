"""Contrastive fine-tuning of the LLM item encoder: SCFT (LLMEmb) and LRCL (METHOD.md §2–3).

Both train LoRA adapters (r 8, α 32, dropout 0.1 on every attention and MLP projection)
with in-batch contrastive learning between two augmented views of each item
(:func:`reaemb.text.augmented_item_text`, fresh views each step). SCFT encodes a view with
one pass (mean-pooled last hidden state); LRCL with the two-pass thought forward of
:mod:`reaemb.thought`, training the thought attention module as well.

Loss (:func:`soft_clip_loss`): ``logits = X Yᵀ / τ``, soft targets
``softmax((X Xᵀ + Y Yᵀ) / (2τ))`` row-wise, symmetric cross-entropy (rows and columns);
``τ`` is learnable and clamped ≥ ``tau_min`` (in the loss and after every update).
X and Y are L2-normalised first (``normalize=True``): then ``X Yᵀ`` are cosines, ``τ``
has its usual meaning and the loss cannot be lowered by inflating norms. The option
``loss="infonce"`` is the standard symmetric cosine InfoNCE (hard diagonal targets).

Both run the prompts' common prefix once per batch (``share_prefix``, see
:func:`reaemb.backbone.forward_shared_prefix`): the same outputs and gradients as one pass
per view, at a fraction of the cost; under LoRA dropout the shared positions draw one
dropout mask per batch instead of one per view.

Training is seeded and resumable: each step ``s`` seeds torch with ``(seed, s)`` (dropout)
and draws its items and views from ``(seed, s)``, so a run resumed from a checkpoint
(LoRA adapter, thought module, τ, optimizer state, RNG state, step, loss history; written
atomically every ``checkpoint_every`` steps) ends exactly where the uninterrupted run
does. Device placement and multi-GPU data parallelism go through ``accelerate``
(``accelerate launch`` runs the same code; each process draws its own items and uses its
local batch as negatives; a CPU run is the single-process case).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from .backbone import (
    Backbone,
    collate,
    encode_prompts,
    extract_embeddings,
    forward_shared_prefix,
    last_hidden_state,
    pool,
    position_ids_from_mask,
)
from .io import atomic_dir, atomic_write_json
from .text import TextConfig, augmented_item_text, item_text
from .thought import (
    ThoughtAttention,
    ThoughtConfig,
    ThoughtPrefix,
    decode_suffix,
    load_thought,
    thought_forward,
)

__all__ = [
    "LORA_TARGETS",
    "LRCLConfig",
    "ItemEncoder",
    "ContrastiveResult",
    "soft_clip_loss",
    "infonce_loss",
    "contrastive_loss",
    "build_encoder",
    "build_optimizer",
    "training_step",
    "train_contrastive",
    "encode_catalogue",
    "save_encoder",
    "load_encoder",
    "merge_lora",
    "build_llm_variant",
    "summarize_variants",
]

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class LRCLConfig:
    """SCFT / LRCL training.

    Attributes:
        method: ``"lrcl"`` (two-pass with thought attention) or ``"scft"`` (single pass).
        steps: optimizer steps.
        batch_size: items per step and process (each gives two views; the other items of the
            batch are the negatives).
        lr: AdamW learning rate (LoRA, thought module and τ).
        weight_decay: AdamW weight decay (not applied to τ).
        max_grad_norm: gradient clipping (None: off).
        lora_r, lora_alpha, lora_dropout, lora_targets: the LoRA adapters.
        loss: ``"soft_clip"`` (METHOD.md §3) or ``"infonce"``.
        tau_init: initial temperature; tau_min: its clamp.
        normalize: L2-normalise the two views' embeddings before the loss.
        center: subtract the batch mean (over both views) before normalising (default on;
            False gives METHOD.md §3's loss exactly). Mean-pooled
            LLM states share one dominant direction (random-pair cosine 0.99 for SmolLM2 on
            ml-100k), which makes the soft targets of ``soft_clip`` almost uniform; centring
            removes it so that the loss sees the items' differences.
        pooling: ``"mean"`` or ``"last"``.
        use_cache: LRCL pass 2 reuses the prefix of pass 1 (identical result, ~half the cost).
        share_prefix: run the prompts' common prefix (chat template, system prompt,
            instruction) once per batch instead of once per view (same outputs and
            gradients in eval mode; under LoRA dropout the shared positions draw one mask
            for the batch). About halves a step on ml-100k.
        max_value_chars: attribute values are cut to this many characters.
        drop_ratio: share of attributes dropped in an augmented view.
        seed: seeds LoRA and module init, item draws, views and dropout.
        checkpoint_every: write a checkpoint every this many steps (0: never).
    """

    method: str = "lrcl"
    steps: int = 40
    batch_size: int = 16
    lr: float = 2e-4
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    lora_r: int = 8
    lora_alpha: int = 32
    lora_dropout: float = 0.1
    lora_targets: tuple[str, ...] = LORA_TARGETS
    loss: str = "soft_clip"
    tau_init: float = 0.05
    tau_min: float = 1e-3
    normalize: bool = True
    center: bool = True
    pooling: str = "mean"
    use_cache: bool = True
    share_prefix: bool = True
    max_value_chars: int = 100
    drop_ratio: float = 0.4
    seed: int = 0
    checkpoint_every: int = 10

    def __post_init__(self) -> None:
        if self.method not in ("lrcl", "scft"):
            raise ValueError(f"method must be 'lrcl' or 'scft', got {self.method!r}")
        if self.loss not in ("soft_clip", "infonce"):
            raise ValueError(f"loss must be 'soft_clip' or 'infonce', got {self.loss!r}")
        if self.batch_size < 2:
            raise ValueError("batch_size must be >= 2 (in-batch negatives)")
        if self.tau_init < self.tau_min or self.tau_min <= 0:
            raise ValueError("need 0 < tau_min <= tau_init")

    @property
    def text_config(self) -> TextConfig:
        return TextConfig(max_value_chars=self.max_value_chars, drop_ratio=self.drop_ratio)

    def identity(self) -> dict:
        """Fields that must match for a checkpoint to be resumed (not steps/checkpointing)."""
        d = asdict(self)
        d.pop("steps")
        d.pop("checkpoint_every")
        d["lora_targets"] = list(d["lora_targets"])
        return d


# --------------------------------------------------------------------------- losses


def _soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return -(targets * logits.log_softmax(-1)).sum(-1).mean()


def soft_clip_loss(x: torch.Tensor, y: torch.Tensor, tau: torch.Tensor | float, tau_min: float = 1e-3) -> torch.Tensor:
    """LLMEmb/ReaEmb loss: ``logits = X Yᵀ/τ``, targets ``softmax((X Xᵀ + Y Yᵀ)/(2τ))``,
    mean of the row-wise and column-wise soft cross-entropies. ``τ`` is clamped ≥ ``tau_min``."""
    tau = torch.as_tensor(tau, dtype=x.dtype, device=x.device).clamp(min=tau_min)
    logits = x @ y.T / tau
    targets = ((x @ x.T + y @ y.T) / (2 * tau)).softmax(-1)
    return 0.5 * (_soft_cross_entropy(logits, targets) + _soft_cross_entropy(logits.T, targets.T))


def infonce_loss(x: torch.Tensor, y: torch.Tensor, tau: torch.Tensor | float, tau_min: float = 1e-3) -> torch.Tensor:
    """Symmetric InfoNCE: item ``i``'s two views are the positive pair, the batch the negatives."""
    tau = torch.as_tensor(tau, dtype=x.dtype, device=x.device).clamp(min=tau_min)
    logits = x @ y.T / tau
    labels = torch.arange(x.shape[0], device=x.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))


def contrastive_loss(x: torch.Tensor, y: torch.Tensor, tau: torch.Tensor, config: LRCLConfig) -> torch.Tensor:
    """The loss of ``config`` (centring on the batch mean of both views first when
    ``config.center``, then normalising when ``config.normalize``)."""
    if config.center:
        mean = torch.cat([x, y]).mean(0, keepdim=True)
        x, y = x - mean, y - mean
    if config.normalize:
        x, y = F.normalize(x, dim=-1), F.normalize(y, dim=-1)
    fn = soft_clip_loss if config.loss == "soft_clip" else infonce_loss
    return fn(x.float(), y.float(), tau, config.tau_min)


# --------------------------------------------------------------------------- encoder


class ItemEncoder(nn.Module):
    """Everything trained, as one module (what ``accelerator.prepare`` wraps): the LoRA
    model, the thought module (LRCL only) and the temperature ``tau``.

    ``forward(input_ids, attention_mask)`` returns the item embeddings of padded prompts;
    ``forward(prompts=...)`` (lists of ids) does the same with the prompts' common prefix run
    once when ``share_prefix`` (:func:`reaemb.backbone.forward_shared_prefix`; same outputs
    and gradients in eval mode, about half the cost).
    """

    def __init__(self, model: nn.Module, thought: ThoughtAttention | None, thought_id: int,
                 tau_init: float = 0.05, pooling: str = "mean", use_cache: bool = True,
                 pad_id: int = 0, share_prefix: bool = True) -> None:
        super().__init__()
        self.model = model
        self.thought = thought
        self.thought_id = thought_id
        self.pooling = pooling
        self.use_cache = use_cache
        self.pad_id = pad_id
        self.share_prefix = share_prefix
        self.tau = nn.Parameter(torch.tensor(float(tau_init)))

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                prompts: list[list[int]] | None = None) -> torch.Tensor:
        if prompts is not None:
            return self.encode_prompts(prompts)
        if input_ids is None or attention_mask is None:
            raise ValueError("give input_ids and attention_mask, or prompts")
        if self.thought is None:
            return pool(last_hidden_state(self.model, input_ids, attention_mask), attention_mask, self.pooling)
        return thought_forward(self.model, self.thought, input_ids, attention_mask, thought_id=self.thought_id,
                               pooling=self.pooling, use_cache=self.use_cache).embedding

    def encode_prompts(self, prompts: list[list[int]]) -> torch.Tensor:
        """Item embeddings ``(B, D)`` of prompts given as id lists (each ending in
        ``<|Thought|>``, EOS)."""
        device = self.tau.device
        if not self.share_prefix:
            ids, mask = collate(prompts, self.pad_id, "left")
            return self.forward(ids.to(device), mask.to(device))
        if self.thought is None:
            return encode_prompts(self.model, prompts, self.pad_id, self.pooling, device=device)
        return self._thought_shared(prompts, device)

    def _thought_shared(self, prompts: list[list[int]], device: torch.device) -> torch.Tensor:
        # Pass 1 over everything before <|Thought|> with the common prefix run once, then the
        # thought module and pass 2 on the two suffix positions (as thought_forward's cached
        # path, whose layout [prefix | thought, EOS] this reproduces).
        if any(len(p) < 3 or p[-2] != self.thought_id for p in prompts):
            raise ValueError("every prompt must end with <|Thought|> then EOS")
        states = forward_shared_prefix(self.model, [p[:-2] for p in prompts], self.pad_id, keep=1, device=device)
        b = len(prompts)
        mask = torch.cat([states.attention_mask, torch.ones((b, 2), dtype=states.attention_mask.dtype, device=device)], 1)
        positions = position_ids_from_mask(mask)
        hidden = states.hidden
        mu = self.thought(hidden.detach().float(), states.attention_mask, states.positions).to(hidden.dtype)
        eos = self.model.get_input_embeddings()(torch.as_tensor([p[-1] for p in prompts], device=device))
        prefix = ThoughtPrefix(hidden, states.kv, mask, positions, eos, mu)
        return decode_suffix(self.model, prefix, mu, self.pooling)


def build_encoder(backbone: Backbone, config: LRCLConfig, calibration_texts: list[str] | None = None) -> ItemEncoder:
    """Wrap ``backbone.model`` with fresh LoRA adapters (and, for LRCL, a thought module whose
    output scale is calibrated on ``calibration_texts``). Seeded by ``config.seed``.

    The backbone's model is modified in place (LoRA layers injected): load a fresh backbone
    for each trained variant.
    """
    import peft

    torch.manual_seed(config.seed)
    lora = peft.LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                           target_modules=list(config.lora_targets), bias="none")
    model = peft.get_peft_model(backbone.model, lora)
    thought = None
    if config.method == "lrcl":
        thought = ThoughtAttention(ThoughtConfig(backbone.hidden_size)).to(backbone.device)
        texts = calibration_texts or ["title is item"]
        ids, mask = collate([backbone.prompt_ids(t) for t in texts], backbone.pad_id, "left")
        ids, mask = ids.to(backbone.device), mask.to(backbone.device)
        with torch.no_grad():
            hidden = last_hidden_state(model, ids, mask)[:, :-2]  # the prefix (causal: same as pass 1)
            emb = model.get_input_embeddings().weight
            thought.calibrate(emb[: backbone.thought_id], hidden, mask[:, :-2])
    return ItemEncoder(model, thought, backbone.thought_id, config.tau_init, config.pooling, config.use_cache,
                       backbone.pad_id, config.share_prefix).to(backbone.device)


@dataclass
class ContrastiveResult:
    """What :func:`train_contrastive` returns.

    Attributes:
        encoder: the trained :class:`ItemEncoder` (unwrapped).
        history: one dict per step: ``step``, ``loss``, ``tau``, ``seconds``.
        resumed_from: the step a checkpoint was resumed from (0: fresh start).
    """

    encoder: ItemEncoder
    history: list[dict] = field(default_factory=list)
    resumed_from: int = 0

    @property
    def losses(self) -> list[float]:
        return [h["loss"] for h in self.history]


def _step_seed(seed: int, step: int, process: int = 0) -> int:
    return (seed * 1_000_003 + step * 7919 + process * 104_729) % (2**31 - 1)


def _draw_batch(n_items: int, batch_size: int, seed: int, step: int, process: int) -> list[int]:
    """Items ``1..n_items`` of step ``step`` (without replacement), deterministic."""
    rng = np.random.default_rng([seed, step, process])
    return (rng.choice(n_items, size=min(batch_size, n_items), replace=False) + 1).tolist()


def _view_prompts(backbone: Backbone, attributes: list[dict], items: list[int], config: LRCLConfig,
                  step: int) -> list[list[int]]:
    """Prompt ids of view 0 of every item, then view 1 (fresh views each step)."""
    texts = [
        augmented_item_text(attributes[i], seed=config.seed * 100_003 + step, item=i, view=v, config=config.text_config)
        for v in (0, 1)
        for i in items
    ]
    return [backbone.prompt_ids(t) for t in texts]


# --------------------------------------------------------------------------- checkpoints


def _save_checkpoint(folder: Path, encoder: ItemEncoder, optimizer: torch.optim.Optimizer, step: int,
                     history: list[dict], config: LRCLConfig) -> None:
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, entry in state["state"].items():
        for name, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{name}"] = value
    rng = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            rng[f"cuda_{i}"] = s
    with atomic_dir(folder) as tmp:
        encoder.model.save_pretrained(tmp / "adapter")
        trained = {"tau": encoder.tau.detach().cpu().reshape(1)}
        if encoder.thought is not None:
            trained.update({f"thought.{k}": v.detach().cpu().contiguous() for k, v in encoder.thought.state_dict().items()})
        save_file(trained, str(tmp / "trained.safetensors"))
        save_file(tensors or {"_empty": torch.zeros(1)}, str(tmp / "optimizer.safetensors"))
        save_file(rng, str(tmp / "rng.safetensors"))
        (tmp / "state.json").write_text(json.dumps({
            "step": step, "history": history, "config": config.identity(),
            "optimizer_scalars": scalars, "param_groups": state["param_groups"],
        }, indent=1))


def _load_checkpoint(folder: Path, encoder: ItemEncoder, optimizer: torch.optim.Optimizer,
                     config: LRCLConfig) -> tuple[int, list[dict]]:
    from peft import set_peft_model_state_dict

    meta = json.loads((folder / "state.json").read_text())
    if meta["config"] != config.identity():
        raise ValueError(f"checkpoint {folder} was written with a different configuration; "
                         "use another checkpoint folder or delete it")
    adapter = load_file(str(folder / "adapter" / "adapter_model.safetensors"))
    set_peft_model_state_dict(encoder.model, adapter)
    trained = load_file(str(folder / "trained.safetensors"))
    with torch.no_grad():
        encoder.tau.copy_(trained["tau"].reshape(()))
    if encoder.thought is not None:
        encoder.thought.load_state_dict({k[len("thought."):]: v for k, v in trained.items() if k.startswith("thought.")})
    tensors = load_file(str(folder / "optimizer.safetensors"))
    opt_state: dict = {}
    for key, value in list(tensors.items()) + list(meta["optimizer_scalars"].items()):
        if key == "_empty":
            continue
        idx, name = key.split(".", 1)
        opt_state.setdefault(int(idx), {})[name] = value
    optimizer.load_state_dict({"state": opt_state, "param_groups": meta["param_groups"]})
    rng = load_file(str(folder / "rng.safetensors"))
    torch.set_rng_state(rng["torch_cpu"])
    return int(meta["step"]), list(meta["history"])


# --------------------------------------------------------------------------- training


def build_optimizer(encoder: ItemEncoder, config: LRCLConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters of ``encoder`` (no weight decay on ``tau``)."""
    others = [p for n, p in encoder.named_parameters() if p.requires_grad and n != "tau"]
    return torch.optim.AdamW([
        {"params": others, "weight_decay": config.weight_decay},
        {"params": [encoder.tau], "weight_decay": 0.0},
    ], lr=config.lr)


def training_step(model: nn.Module, encoder: ItemEncoder, optimizer: torch.optim.Optimizer,
                  prompts: list[list[int]], config: LRCLConfig, accelerator=None) -> float:
    """One optimizer step on ``prompts`` (view 0 of every item, then view 1): forward,
    :func:`contrastive_loss`, backward, gradient clipping, update, then ``tau`` clamped to
    ``config.tau_min``. ``model`` is ``encoder`` or its ``accelerate`` wrapper. Returns the loss."""
    n = len(prompts) // 2
    if 2 * n != len(prompts) or n < 2:
        raise ValueError(f"expected two views of at least 2 items, got {len(prompts)} prompts")
    if config.share_prefix:
        emb = model(prompts=prompts)
    else:
        ids, mask = collate(prompts, encoder.pad_id, "left")
        emb = model(ids.to(encoder.tau.device), mask.to(encoder.tau.device))
    loss = contrastive_loss(emb[:n], emb[n:], encoder.tau, config)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if accelerator is not None:
        accelerator.backward(loss)
        if config.max_grad_norm is not None:
            accelerator.clip_grad_norm_(params, config.max_grad_norm)
    else:
        loss.backward()
        if config.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():
        encoder.tau.clamp_(min=config.tau_min)
    return float(loss.detach())


def train_contrastive(
    backbone: Backbone,
    attributes: list[dict],
    config: LRCLConfig = LRCLConfig(),
    checkpoint_dir: str | Path | None = None,
    progress: bool = True,
    stop_after: int | None = None,
) -> ContrastiveResult:
    """Train SCFT or LRCL (``config.method``) on items ``1..len(attributes)-1``.

    Args:
        backbone: a freshly loaded backbone (its model receives LoRA adapters in place).
        attributes: ``dataset.item_attributes`` (index 0 = padding, ignored).
        config: the :class:`LRCLConfig`.
        checkpoint_dir: where ``latest/`` is written every ``config.checkpoint_every`` steps
            and resumed from when present (same configuration required).
        progress: show a tqdm bar.
        stop_after: stop (as if interrupted) once this step is reached; for tests.
    """
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=backbone.device.type == "cpu")
    n_items = len(attributes) - 1
    calibration = [item_text(attributes[i], config.text_config) for i in range(1, min(n_items, 32) + 1)]
    encoder = build_encoder(backbone, config, calibration)
    optimizer = build_optimizer(encoder, config)
    start, history = 0, []
    latest = Path(checkpoint_dir) / "latest" if checkpoint_dir is not None else None
    if latest is not None and (latest / "state.json").exists():
        start, history = _load_checkpoint(latest, encoder, optimizer, config)
    wrapped, optimizer = accelerator.prepare(encoder, optimizer)
    wrapped.train()
    bar = tqdm(range(start, config.steps), desc=f"{config.method} training", disable=not progress,
               initial=start, total=config.steps)
    for step in bar:
        if stop_after is not None and step >= stop_after:
            break
        t0 = time.perf_counter()
        torch.manual_seed(_step_seed(config.seed, step, accelerator.process_index))
        items = _draw_batch(n_items, config.batch_size, config.seed, step, accelerator.process_index)
        prompts = _view_prompts(backbone, attributes, items, config, step)
        loss = training_step(wrapped, encoder, optimizer, prompts, config, accelerator)
        record = {"step": step + 1, "loss": loss, "tau": float(encoder.tau.detach()),
                  "seconds": time.perf_counter() - t0}
        history.append(record)
        bar.set_postfix(loss=f"{record['loss']:.4f}", tau=f"{record['tau']:.4f}")
        done = step + 1
        if latest is not None and config.checkpoint_every and accelerator.is_main_process and (
            done % config.checkpoint_every == 0 or done == config.steps
        ):
            _save_checkpoint(latest, accelerator.unwrap_model(wrapped), optimizer, done, history, config)
    encoder = accelerator.unwrap_model(wrapped)
    encoder.eval()
    return ContrastiveResult(encoder, history, start)


def encode_catalogue(backbone: Backbone, encoder: ItemEncoder | None, texts: list[str],
                     batch_size: int = 32, progress: bool = True, desc: str = "embedding items") -> torch.Tensor:
    """Catalogue embeddings through a trained encoder (None: the frozen backbone)."""
    if encoder is None:
        return extract_embeddings(backbone, texts, batch_size, progress=progress, desc=desc)
    encoder.eval()
    return extract_embeddings(backbone, texts, batch_size, progress=progress, desc=desc,
                              encode_batch=encoder.encode_prompts, model=encoder)


def save_encoder(encoder: ItemEncoder, folder: str | Path, meta: dict | None = None) -> Path:
    """Write the trained parts: ``adapter/`` (peft ``save_pretrained``), ``thought/``
    (safetensors, LRCL only), ``tau.json``. Atomic."""
    from .thought import save_thought

    folder = Path(folder)
    with atomic_dir(folder) as tmp:
        encoder.model.save_pretrained(tmp / "adapter")
        if encoder.thought is not None:
            save_thought(encoder.thought, tmp / "thought")
        atomic_write_json(tmp / "encoder.json", {"tau": float(encoder.tau), "pooling": encoder.pooling,
                                                 "thought_id": encoder.thought_id, "share_prefix": encoder.share_prefix,
                                                 "meta": meta or {}})
    return folder


def load_encoder(backbone: Backbone, folder: str | Path) -> ItemEncoder:
    """Rebuild an :class:`ItemEncoder` from :func:`save_encoder` output on a fresh backbone."""
    from peft import PeftModel

    folder = Path(folder)
    if not (folder / "encoder.json").exists():
        raise FileNotFoundError(f"{folder} holds no saved encoder (no encoder.json)")
    info = json.loads((folder / "encoder.json").read_text())
    model = PeftModel.from_pretrained(backbone.model, folder / "adapter")
    thought = load_thought(folder / "thought", backbone.device) if (folder / "thought").exists() else None
    return ItemEncoder(model, thought, backbone.thought_id, info["tau"], info["pooling"], pad_id=backbone.pad_id,
                       share_prefix=info.get("share_prefix", True)).to(backbone.device).eval()


def merge_lora(encoder_or_model: ItemEncoder | nn.Module) -> nn.Module:
    """Merge the LoRA adapters into the base weights and return the plain causal LM (for
    CRRL, which freezes the LLM). For an :class:`ItemEncoder`, its ``model`` is replaced by
    the merged model too."""
    model = encoder_or_model.model if isinstance(encoder_or_model, ItemEncoder) else encoder_or_model
    merged = model.merge_and_unload() if hasattr(model, "merge_and_unload") else model
    if isinstance(encoder_or_model, ItemEncoder):
        encoder_or_model.model = merged
    return merged


def _variant_key(variant: str, dataset, backbone_config, config: LRCLConfig | None, text_config: TextConfig) -> dict:
    """What an embedding table of ``variant`` depends on (a table built with another key is rebuilt)."""
    from dataclasses import asdict

    return {
        "variant": variant,
        "dataset": dataset.path.name if getattr(dataset, "path", None) is not None else dataset.name,
        "n_items": int(dataset.n_items),
        "backbone": {k: v for k, v in asdict(backbone_config).items() if k not in ("cache_dir", "device")},
        "text": asdict(text_config),
        "training": None if config is None else {**config.identity(), "steps": config.steps},
    }


def build_llm_variant(
    variant: str,
    dataset,
    run,
    backbone_config,
    config: LRCLConfig | None = None,
    batch_size: int = 32,
    rebuild: bool = False,
    progress: bool = True,
) -> dict:
    """Build one LLM embedding variant of the catalogue into the run directory.

    ``variant`` is ``"inference"`` (frozen backbone), ``"scft"`` or ``"lrcl"`` (trained with
    ``config``, its method set from the variant). Writes ``<run>/embeddings/<variant>/``, the
    trained parts to ``<run>/models/<variant>/`` and a summary with the loss history to
    ``<run>/results/llm_<variant>.json``; checkpoints go to ``<run>/checkpoints/<variant>/``.

    Resuming: a variant already built with the same settings (dataset, backbone, text and
    training configuration, steps) is skipped and its saved summary returned; an interrupted
    training resumes from its last checkpoint; more steps with an otherwise unchanged
    configuration continue from the checkpoint. A variant built with other settings is
    rebuilt (its checkpoints are discarded when the training configuration differs);
    ``rebuild`` forces a fresh build.

    Returns:
        ``variant``, ``skipped``, ``history`` (one dict per step), ``train_seconds`` (sum of
        the step times, over resumed sessions too; 0 for inference), ``build_seconds`` (wall
        time of the build that finished), ``extract_seconds`` and ``items_per_second``
        (catalogue extraction), ``n_items``, ``key``.
    """
    import dataclasses
    import shutil

    from .backbone import catalogue_texts, load_backbone
    from .embeddings import list_variants, save_item_embeddings

    if variant not in ("inference", "scft", "lrcl"):
        raise ValueError(f"variant must be inference, scft or lrcl, got {variant!r}")
    config = dataclasses.replace(config or LRCLConfig(), method=variant) if variant != "inference" else None
    text_config = config.text_config if config is not None else TextConfig()
    key = _variant_key(variant, dataset, backbone_config, config, text_config)
    summary_path = run.results / f"llm_{variant}.json"
    if not rebuild and variant in list_variants(run.embeddings) and summary_path.exists():
        summary = json.loads(summary_path.read_text())
        if summary.get("key") == key:
            return {**summary, "skipped": True}
    ckpt = run.checkpoints / variant
    state = ckpt / "latest" / "state.json"
    if config is not None and state.exists() and (
        rebuild or json.loads(state.read_text()).get("config") != config.identity()
    ):
        shutil.rmtree(ckpt)
    backbone = load_backbone(backbone_config)
    texts = catalogue_texts(dataset, text_config)
    t0 = time.perf_counter()
    encoder, history = None, []
    if config is not None:
        result = train_contrastive(backbone, dataset.item_attributes, config, ckpt, progress=progress)
        encoder, history = result.encoder, result.history
        save_encoder(encoder, run.root / "models" / variant, meta={"key": key})
    t1 = time.perf_counter()
    table = encode_catalogue(backbone, encoder, texts, batch_size, progress=progress, desc=f"{variant} embeddings")
    t2 = time.perf_counter()
    meta = {"backbone": backbone.source, "key": key}
    save_item_embeddings(run.embeddings, variant, table, dataset, meta=meta)
    summary = {"variant": variant, "history": history, "train_seconds": sum(h["seconds"] for h in history),
               "build_seconds": t2 - t0, "extract_seconds": t2 - t1,
               "items_per_second": len(texts) / (t2 - t1), "n_items": len(texts), "key": key}
    atomic_write_json(summary_path, summary)
    return {**summary, "skipped": False}


def summarize_variants(summaries: dict[str, dict]):
    """One row per variant built by :func:`build_llm_variant`: steps, training seconds,
    first and last loss, extraction items/s, whether it was skipped (already built)."""
    import pandas as pd

    rows = {}
    for name, s in summaries.items():
        losses = [h["loss"] for h in s.get("history", [])]
        rows[name] = {
            "steps": len(losses),
            "train_seconds": round(s.get("train_seconds", 0.0), 1),
            "first_loss": losses[0] if losses else None,
            "last_loss": losses[-1] if losses else None,
            "extract_items_per_s": round(s.get("items_per_second", float("nan")), 2),
            "skipped": bool(s.get("skipped", False)),
        }
    return pd.DataFrame.from_dict(rows, orient="index")
