"""The thought attention module and the two-pass LRCL forward (METHOD.md §3).

Thought attention
    One attention head with its own ``Q, K, V`` maps (hidden × hidden) and rotary position
    embedding (base 1000) applied to q and k at their token positions (positions counted
    over non-padding tokens, as in the LLM). The query is the last hidden state ``H`` at the
    position just before ``<|Thought|>``; keys and values are ``H`` at every non-padding
    position before ``<|Thought|>`` (the query position included), padding masked. The
    output ``r`` is multiplied by a scalar ``scale`` so that it lives at the scale of the
    token input embeddings (SmolLM2's last hidden states are ~15× a token embedding's norm):
    :meth:`ThoughtAttention.calibrate` sets ``scale = mean ‖input embedding row‖ /
    mean ‖r‖`` on a sample batch at initialisation; the scale is then a learnable scalar
    (``ThoughtConfig.learnable_scale``). ``V`` starts as the identity, so that at
    initialisation ``r`` is an attention-weighted average of the prompt's hidden states.

Two-pass forward, and what the cached variant computes
    METHOD.md: pass 1 runs the prompt through the LLM without gradient; the module turns its
    hidden states into ``r``; ``r`` replaces the input embedding at ``<|Thought|>``; pass 2
    runs the LLM (with LoRA) on the modified inputs with gradient and mean-pools.

    Causality makes the prompt's prefix (every position before ``<|Thought|>``) compute
    exactly the same thing in both passes when both use the same weights. So here:

    * pass 1 runs **only the prefix**, with the current (LoRA) weights, **with gradient
      enabled when the caller's grad mode is**, keeping its KV cache;
    * the thought module reads the prefix hidden states **detached** (pass 1 gives it no
      gradient, as in the method);
    * pass 2 computes only the two suffix positions (``<|Thought|>`` carrying ``r`` and EOS)
      on top of the cached prefix K/V; the item embedding pools the prefix hidden states of
      pass 1 together with the two new positions.

    The computation graph is then *identical* to the full second pass of the method
    (pass 1 under ``no_grad`` on the whole prompt, pass 2 on the whole modified prompt with
    gradient): same outputs, same gradients for LoRA (through the prefix K/V and the prefix
    hidden states in the mean pool) and for the thought module (through ``r`` only), in eval
    mode. :func:`thought_forward` with ``use_cache=False`` is that full reference; the tests
    compare the two. A step therefore costs about one LLM pass, not two. The one difference
    under training-mode dropout: the cached variant draws one dropout mask for the prefix,
    shared by the module's input and pass 2, where the full variant draws two.

    The cached path needs the two suffix positions to be the last two columns, i.e. left
    padding; right-padded batches are re-aligned to the left internally
    (:func:`left_align`), which changes nothing in the result because positions are counted
    from the mask.

For CRRL (METHOD.md §4): :func:`thought_forward` accepts ``thought_noise`` (added to the
thought vector μ before pass 2) and returns both μ and the embedding; :func:`encode_prefix`
and :func:`decode_suffix` let several noisy rollouts share one prefix pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .backbone import decoder_of, position_ids_from_mask
from .io import atomic_dir

__all__ = [
    "ThoughtConfig",
    "ThoughtAttention",
    "ThoughtOutput",
    "ThoughtPrefix",
    "apply_rope",
    "left_align",
    "encode_prefix",
    "decode_suffix",
    "thought_forward",
    "save_thought",
    "load_thought",
]


@dataclass(frozen=True)
class ThoughtConfig:
    """The thought attention module.

    Attributes:
        hidden_size: the LLM's hidden size (Q, K, V are hidden × hidden).
        rope_base: rotary base (METHOD.md: 1000).
        learnable_scale: train the output scale (else it stays at its calibrated value).
        identity_value_init: start ``V`` as the identity (``r`` = attention average of H).
    """

    hidden_size: int
    rope_base: float = 1000.0
    learnable_scale: bool = True
    identity_value_init: bool = True


def apply_rope(x: torch.Tensor, positions: torch.Tensor, base: float) -> torch.Tensor:
    """Rotary embedding on the last dim of ``x`` (``(..., len, dim)``, dim even) at integer
    ``positions`` (``(..., len)``), rotate-half convention."""
    dim = x.shape[-1]
    inv_freq = base ** (-torch.arange(0, dim, 2, device=x.device, dtype=torch.float32) / dim)
    angles = positions.to(torch.float32).unsqueeze(-1) * inv_freq  # (..., len, dim/2)
    cos = torch.cat([angles.cos(), angles.cos()], -1).to(x.dtype)
    sin = torch.cat([angles.sin(), angles.sin()], -1).to(x.dtype)
    half = dim // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], -1)
    return x * cos + rotated * sin


class ThoughtAttention(nn.Module):
    """One-head attention from the position before ``<|Thought|>`` over the prompt."""

    def __init__(self, config: ThoughtConfig) -> None:
        super().__init__()
        if config.hidden_size % 2:
            raise ValueError("hidden_size must be even for rotary embedding")
        self.config = config
        d = config.hidden_size
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        if config.identity_value_init:
            with torch.no_grad():
                self.v_proj.weight.copy_(torch.eye(d))
                self.v_proj.bias.zero_()
        self.scale = nn.Parameter(torch.tensor(1.0), requires_grad=config.learnable_scale)

    def raw(
        self,
        hidden: torch.Tensor,
        attention_mask: torch.Tensor,
        positions: torch.Tensor,
        query_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Unscaled output ``r``. ``hidden`` ``(B, L, D)``; keys are the non-padding
        positions ``<= query_index`` (default: the last column, i.e. left padding)."""
        hidden = hidden.to(self.q_proj.weight.dtype)  # bf16 LLM states, fp32 module
        b, length, d = hidden.shape
        rows = torch.arange(b, device=hidden.device)
        if query_index is None:
            query_index = torch.full((b,), length - 1, dtype=torch.long, device=hidden.device)
        hq = hidden[rows, query_index].unsqueeze(1)  # (B, 1, D)
        q = apply_rope(self.q_proj(hq), positions[rows, query_index].unsqueeze(1), self.config.rope_base)
        k = apply_rope(self.k_proj(hidden), positions, self.config.rope_base)
        v = self.v_proj(hidden)
        scores = (q @ k.transpose(1, 2)).squeeze(1) / math.sqrt(d)  # (B, L)
        cols = torch.arange(length, device=hidden.device).unsqueeze(0)
        allowed = attention_mask.bool() & (cols <= query_index.unsqueeze(1))
        scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
        weights = scores.softmax(-1)
        return (weights.unsqueeze(1) @ v).squeeze(1)

    def forward(
        self,
        hidden: torch.Tensor,
        attention_mask: torch.Tensor,
        positions: torch.Tensor,
        query_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The thought vector ``r · scale`` of shape ``(B, D)``."""
        return self.raw(hidden, attention_mask, positions, query_index) * self.scale

    @torch.no_grad()
    def calibrate(self, input_embeddings: torch.Tensor, hidden: torch.Tensor, attention_mask: torch.Tensor) -> float:
        """Set ``scale`` = mean input-embedding row norm / mean ``‖r‖`` on a sample
        (``hidden``: prefix hidden states, left padded). Returns the scale."""
        positions = position_ids_from_mask(attention_mask)
        r = self.raw(hidden.float(), attention_mask, positions)
        value = input_embeddings.float().norm(dim=-1).mean() / r.norm(dim=-1).mean().clamp(min=1e-8)
        self.scale.fill_(float(value))
        return float(value)


@dataclass
class ThoughtOutput:
    """Result of :func:`thought_forward`.

    Attributes:
        embedding: ``(B, D)`` pooled last hidden state of pass 2 (the item embedding).
        thought: ``(B, D)`` μ, the thought vector before any noise (``r · scale``).
    """

    embedding: torch.Tensor
    thought: torch.Tensor


@dataclass
class ThoughtPrefix:
    """Pass 1 over the prefix (left-padded): what pass 2 needs, reusable across rollouts.

    Attributes:
        hidden: ``(B, P, D)`` last hidden states of the prefix (carry gradient if computed
            with grad enabled).
        kv: per layer ``(key, value)`` of the prefix.
        attention_mask: ``(B, P + 2)`` mask of the whole prompt.
        positions: ``(B, P + 2)`` position ids.
        eos_embeds: ``(B, D)`` input embeddings of the EOS token.
        thought: ``(B, D)`` μ from the thought module.
    """

    hidden: torch.Tensor
    kv: list[tuple[torch.Tensor, torch.Tensor]]
    attention_mask: torch.Tensor
    positions: torch.Tensor
    eos_embeds: torch.Tensor
    thought: torch.Tensor


def left_align(input_ids: torch.Tensor, attention_mask: torch.Tensor, pad_id: int = 0):
    """Re-pad a batch on the left (non-padding tokens moved to the end of each row)."""
    if bool(attention_mask[:, -1].all()):
        return input_ids, attention_mask
    order = torch.argsort(attention_mask.long(), dim=1, stable=True)  # pads first, order kept
    ids = torch.gather(input_ids, 1, order)
    mask = torch.gather(attention_mask, 1, order)
    return ids.masked_fill(mask == 0, pad_id), mask


def encode_prefix(
    model: nn.Module, thought_module: ThoughtAttention, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> ThoughtPrefix:
    """Pass 1 on all but the last two columns (left padding: ``<|Thought|>`` and EOS)."""
    input_ids, attention_mask = left_align(input_ids, attention_mask)
    body = decoder_of(model)
    positions = position_ids_from_mask(attention_mask)
    p = input_ids.shape[1] - 2
    out = body(
        input_ids=input_ids[:, :p],
        attention_mask=attention_mask[:, :p],
        position_ids=positions[:, :p],
        use_cache=True,
    )
    hidden = out.last_hidden_state
    kv = [(layer.keys, layer.values) for layer in out.past_key_values.layers]
    mu = thought_module(hidden.detach(), attention_mask[:, :p], positions[:, :p])
    eos = body.embed_tokens(input_ids[:, -1]) if hasattr(body, "embed_tokens") else body.get_input_embeddings()(input_ids[:, -1])
    return ThoughtPrefix(hidden, kv, attention_mask, positions, eos, mu.to(hidden.dtype))


def decode_suffix(
    model: nn.Module, prefix: ThoughtPrefix, thought: torch.Tensor, pooling: str = "mean"
) -> torch.Tensor:
    """Pass 2: the ``<|Thought|>`` position carrying ``thought`` (``(B, D)``) and EOS, on the
    cached prefix; returns the pooled embedding. ``prefix`` is left unchanged (reusable)."""
    from transformers import DynamicCache

    body = decoder_of(model)
    cache = DynamicCache(ddp_cache_data=prefix.kv)
    p = prefix.hidden.shape[1]
    suffix = torch.stack([thought.to(prefix.eos_embeds.dtype), prefix.eos_embeds], 1)
    out = body(
        inputs_embeds=suffix,
        attention_mask=prefix.attention_mask,
        position_ids=prefix.positions[:, p:],
        past_key_values=cache,
        use_cache=True,
    )
    h2 = out.last_hidden_state  # (B, 2, D)
    if pooling == "last":
        return h2[:, -1]
    if pooling != "mean":
        raise ValueError(f"pooling must be 'mean' or 'last', got {pooling!r}")
    pre_mask = prefix.attention_mask[:, :p].to(h2.dtype).unsqueeze(-1)
    total = (prefix.hidden * pre_mask).sum(1) + h2.sum(1)
    return total / (pre_mask.sum(1) + 2.0)


def _full_two_pass(
    model: nn.Module,
    thought_module: ThoughtAttention,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    thought_id: int,
    thought_noise: torch.Tensor | None,
    pooling: str,
) -> ThoughtOutput:
    """The method as written: pass 1 (no grad) on the whole prompt, pass 2 on the whole
    modified prompt. Any padding side."""
    from .backbone import pool

    body = decoder_of(model)
    positions = position_ids_from_mask(attention_mask)
    is_thought = (input_ids == thought_id) & attention_mask.bool()
    if not bool((is_thought.sum(1) == 1).all()):
        raise ValueError("every row must hold exactly one <|Thought|> token")
    t_index = is_thought.long().argmax(1)
    with torch.no_grad():
        h1 = body(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, use_cache=False).last_hidden_state
    mu = thought_module(h1, attention_mask, positions, query_index=t_index - 1).to(h1.dtype)
    action = mu if thought_noise is None else mu + thought_noise
    embeds = body.embed_tokens(input_ids)
    embeds = torch.where(is_thought.unsqueeze(-1), action.unsqueeze(1).to(embeds.dtype), embeds)
    h2 = body(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=positions, use_cache=False).last_hidden_state
    return ThoughtOutput(pool(h2, attention_mask, pooling), mu)


def thought_forward(
    model: nn.Module,
    thought_module: ThoughtAttention,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    thought_id: int | None = None,
    thought_noise: torch.Tensor | None = None,
    pooling: str = "mean",
    use_cache: bool = True,
) -> ThoughtOutput:
    """The LRCL two-pass forward: item embedding and thought vector μ.

    Args:
        model: the causal LM (peft-wrapped or not); only its decoder body runs.
        thought_module: the :class:`ThoughtAttention`.
        input_ids, attention_mask: prompts ending in ``<|Thought|>, EOS`` (either padding).
        thought_id: id of ``<|Thought|>`` (needed by the full path, checked otherwise).
        thought_noise: ``(B, D)`` added to μ before pass 2 (CRRL rollouts).
        pooling: ``"mean"`` or ``"last"``.
        use_cache: reuse the prefix pass (see module docstring); False runs the full
            reference second pass.
    """
    if not use_cache:
        if thought_id is None:
            raise ValueError("the full two-pass path needs thought_id")
        return _full_two_pass(model, thought_module, input_ids, attention_mask, thought_id, thought_noise, pooling)
    ids, mask = left_align(input_ids, attention_mask)
    if thought_id is not None and not bool((ids[:, -2] == thought_id).all()):
        raise ValueError("every prompt must end with <|Thought|> then EOS")
    prefix = encode_prefix(model, thought_module, ids, mask)
    action = prefix.thought if thought_noise is None else prefix.thought + thought_noise
    return ThoughtOutput(decode_suffix(model, prefix, action, pooling), prefix.thought)


def save_thought(module: ThoughtAttention, folder) -> None:
    """Write the module as ``thought.safetensors`` (weights and config in its metadata)."""
    import json

    meta = {"config": json.dumps(module.config.__dict__)}
    tensors = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    with atomic_dir(folder) as tmp:
        save_file(tensors, str(tmp / "thought.safetensors"), metadata=meta)


def load_thought(folder, device: torch.device | str = "cpu") -> ThoughtAttention:
    """Read a module written by :func:`save_thought`."""
    import json
    from pathlib import Path

    from safetensors import safe_open

    path = Path(folder) / "thought.safetensors"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    with safe_open(str(path), "pt") as fh:
        config = ThoughtConfig(**json.loads(fh.metadata()["config"]))
    module = ThoughtAttention(config)
    module.load_state_dict(load_file(str(path)))
    return module.to(device)
