"""Sequential recommenders: SASRec, GRU4Rec and Bert4Rec over ID or frozen LLM item embeddings
(METHOD.md §5).

Conventions (one place for each):

- Items are ``1..n_items``; 0 is padding. Bert4Rec's mask token is ``n_items + 1``.
- Sequences are **left-padded** (right-aligned): the most recent item is in the last column.
  Positions are counted from the right (the last column is position 0), so a batch can be
  trimmed to its longest sequence without changing any representation, and SASRec's
  "the last item sits at position ``max_length - 1``" convention holds for every batch.
- Padding never leaks: padded inputs are zero vectors, attention never looks at padded keys,
  and GRU4Rec's GRU has no biases so that a zero input keeps a zero state. A user's
  representation therefore does not depend on how much padding surrounds the history (tested).
- Scores are dot products of the user representation with the item input table
  (:meth:`SequentialRecommender.item_table`), i.e. input and output item embeddings are tied,
  as in SASRec and Bert4Rec.

Item input (:class:`ItemEncoder`): either a trainable ID embedding, or a **frozen** table from
an LLM reduced by PCA to ``min(pca_dim, n_items, dim)`` dimensions (scikit-learn) and mapped
by an adapter ``Linear(k -> 256) -> Linear(256 -> 128)`` (no activation in between, as in
LLMEmb). Every item keeps its own PCA row: row ``i`` of the buffer is item ``i``, row 0 is the
zero padding row (the reference code's insertion of the padding row at the wrong index gives
the last item a zero vector; :func:`pca_table` is tested against that).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "BACKBONES",
    "SRSConfig",
    "pca_table",
    "ItemEncoder",
    "SequentialRecommender",
    "SASRec",
    "GRU4Rec",
    "Bert4Rec",
    "build_model",
    "left_pad",
]

BACKBONES = ("sasrec", "gru4rec", "bert4rec")


@dataclass
class SRSConfig:
    """Model and training settings of one sequential recommender.

    The defaults are the reference settings (LLM-ESR / LLMEmb / ReaEmb code): a notebook that
    deviates for speed sets the field and says so.

    Attributes:
        backbone: ``sasrec``, ``gru4rec`` or ``bert4rec``.
        hidden_size: model width (item embeddings, transformer, GRU).
        max_length: longest history the model reads (older items are cut).
        num_layers: transformer blocks (SASRec, Bert4Rec) or GRU layers (GRU4Rec).
        num_heads: attention heads.
        dropout: dropout on embeddings, attention, feed-forward and between GRU layers.
        mask_prob: Bert4Rec: share of training positions replaced by the mask token.
        pca_dim: frozen tables are reduced to ``min(pca_dim, n_items, dim)`` dimensions.
        adapter_hidden: width of the adapter's middle layer (``k -> adapter_hidden -> hidden``).
        align_alpha: weight of the LLMEmb alignment loss (adapter outputs vs. a trained
            ID-SASRec's item embeddings); 0 switches it off.
        align_tau: temperature of the alignment loss.
        learning_rate, weight_decay: Adam.
        batch_size: users per training batch.
        max_epochs: upper bound on training epochs.
        patience: stop after this many epochs without a better validation NDCG@10 (the
            reference uses 20).
        valid_protocol: protocol of the early-stopping metric: ``full`` (ranking over all
            items) or ``sampled100``.
        eval_batch_size: users per scoring batch in evaluation.
        seed: reaches parameter init, data order, negatives and dropout.
    """

    backbone: str = "sasrec"
    hidden_size: int = 128
    max_length: int = 200
    num_layers: int = 2
    num_heads: int = 1
    dropout: float = 0.5
    mask_prob: float = 0.2
    pca_dim: int = 512
    adapter_hidden: int = 256
    align_alpha: float = 0.0
    align_tau: float = 2.0
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    batch_size: int = 128
    max_epochs: int = 200
    patience: int = 20
    valid_protocol: str = "full"
    eval_batch_size: int = 512
    seed: int = 0
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.backbone not in BACKBONES:
            raise ValueError(f"backbone must be one of {BACKBONES}, got {self.backbone!r}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        for name in ("hidden_size", "max_length", "num_layers", "num_heads", "batch_size", "pca_dim",
                     "adapter_hidden", "max_epochs", "patience", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if not 0.0 < self.mask_prob < 1.0:
            raise ValueError(f"mask_prob must be in (0, 1), got {self.mask_prob}")
        if self.align_alpha < 0 or self.align_tau <= 0:
            raise ValueError("align_alpha must be >= 0 and align_tau > 0")
        if self.valid_protocol not in ("full", "sampled100"):
            raise ValueError(f"valid_protocol must be 'full' or 'sampled100', got {self.valid_protocol!r}")

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------------------------
# item input


def pca_table(table: torch.Tensor | np.ndarray, dim: int = 512, seed: int = 0) -> tuple[torch.Tensor, dict]:
    """PCA of an item table (rows = items ``1..n``) to ``k = min(dim, n, D)`` dimensions, with
    the zero padding row put **in front**: row ``i`` of the result is item ``i``.

    The components are scaled by one scalar so that the table has unit root-mean-square
    (a linear map, so the geometry is unchanged; it keeps Adam's first steps in the same
    range for every LLM). Returns the ``(n + 1, k)`` table and a record of what was done.
    """
    from sklearn.decomposition import PCA

    x = torch.as_tensor(table, dtype=torch.float32).cpu().numpy().astype(np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"expected an (n_items, dim) table with at least 2 items, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("the item table has non-finite values")
    k = int(min(dim, x.shape[0], x.shape[1]))
    pca = PCA(n_components=k, svd_solver="full", random_state=seed)
    z = pca.fit_transform(x)
    rms = float(np.sqrt((z**2).mean())) or 1.0
    z = z / rms
    out = torch.zeros(x.shape[0] + 1, k, dtype=torch.float32)
    out[1:] = torch.from_numpy(z).float()
    info = {
        "pca_dim": k,
        "requested_dim": dim,
        "input_dim": int(x.shape[1]),
        "explained_variance": round(float(pca.explained_variance_ratio_.sum()), 6),
        "scale": rms,
    }
    return out, info


class ItemEncoder(nn.Module):
    """Item index -> vector of size ``hidden``: a trainable ID embedding (``table=None``) or
    a frozen PCA table followed by the trainable adapter.

    ``extra_tokens`` trainable vectors follow the items (Bert4Rec's mask token).
    Index 0 (padding) maps to the zero vector in both modes.
    """

    def __init__(self, n_items: int, hidden: int, *, table: torch.Tensor | None = None,
                 pca_dim: int = 512, adapter_hidden: int = 256, extra_tokens: int = 0, seed: int = 0):
        super().__init__()
        self.n_items = n_items
        self.extra_tokens = extra_tokens
        self.pca_info: dict = {}
        if table is None:
            self.embedding = nn.Embedding(n_items + 1 + extra_tokens, hidden, padding_idx=0)
            self.frozen = None
            self.adapter = None
        else:
            if table.shape[0] != n_items:
                raise ValueError(f"the item table has {table.shape[0]} rows for {n_items} items")
            reduced, self.pca_info = pca_table(table, pca_dim, seed)
            self.register_buffer("frozen", reduced)  # a buffer: never a parameter, never trained
            self.adapter = nn.Sequential(
                nn.Linear(reduced.shape[1], adapter_hidden), nn.Linear(adapter_hidden, hidden)
            )
            self.extra = nn.Parameter(0.02 * torch.randn(extra_tokens, hidden)) if extra_tokens else None
            self.embedding = None

    @property
    def is_frozen_table(self) -> bool:
        return self.frozen is not None

    def adapted(self, items: torch.Tensor | None = None) -> torch.Tensor:
        """Adapter outputs for item indices (default: every row incl. padding)."""
        rows = self.frozen if items is None else self.frozen[items]
        return self.adapter(rows)

    def table(self) -> torch.Tensor:
        """``(n_items + 1 + extra_tokens, hidden)``: every index's vector, row 0 zero."""
        if self.embedding is not None:
            weight = self.embedding.weight
            return torch.cat([torch.zeros_like(weight[:1]), weight[1:]])
        out = self.adapted()
        out = torch.cat([torch.zeros_like(out[:1]), out[1:]])
        if self.extra is not None:
            out = torch.cat([out, self.extra])
        return out

    def forward(self, seq: torch.Tensor, table: torch.Tensor | None = None) -> torch.Tensor:
        table = self.table() if table is None else table
        return F.embedding(seq, table)


# ---------------------------------------------------------------------------------------
# blocks


class Dropout(nn.Module):
    """Inverted dropout with a mask drawn by ``torch.rand`` (on CPU several times faster than
    ``nn.Dropout``'s Bernoulli sampler; the same distribution)."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        return x * (torch.rand_like(x) >= self.p) * (1.0 / (1.0 - self.p))


class SelfAttention(nn.Module):
    """Multi-head self-attention over a padded batch; padded keys are never attended to."""

    def __init__(self, hidden: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)
        self.attn_drop = Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """``last_only``: queries of the last position only (all keys): ``(B, 1, H)``."""
        b, t, h = x.shape
        if last_only:  # scoring needs the last position alone: skip the other queries
            q = F.linear(x[:, -1:], self.qkv.weight[:h], self.qkv.bias[:h])
            k, v = F.linear(x, self.qkv.weight[h:], self.qkv.bias[h:]).split(h, dim=2)
            mask = mask[:, :, -1:]
        else:
            q, k, v = self.qkv(x).split(h, dim=2)
        q = q.view(b, -1, self.heads, h // self.heads).transpose(1, 2)
        k, v = (z.view(b, t, self.heads, h // self.heads).transpose(1, 2) for z in (k, v))
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))
        att = self.attn_drop(torch.softmax(att.masked_fill(~mask, float("-inf")), dim=-1))
        return self.proj((att @ v).transpose(1, 2).reshape(b, q.shape[2], h))


class Block(nn.Module):
    """Transformer block: post-norm as in SASRec/BERT (``x = LN(x + drop(f(x)))``)."""

    def __init__(self, hidden: int, heads: int, dropout: float, inner: int, activation: str):
        super().__init__()
        self.attn = SelfAttention(hidden, heads, dropout)
        self.ln1 = nn.LayerNorm(hidden)
        self.ff = nn.Sequential(nn.Linear(hidden, inner), nn.GELU() if activation == "gelu" else nn.ReLU(),
                                Dropout(dropout), nn.Linear(inner, hidden))
        self.ln2 = nn.LayerNorm(hidden)
        self.drop = Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        y = self.attn(x, mask, last_only)
        x = self.ln1((x[:, -1:] if last_only else x) + self.drop(y))
        return self.ln2(x + self.drop(self.ff(x)))


def attention_mask(seq: torch.Tensor, causal: bool) -> torch.Tensor:
    """Boolean ``(B, 1, T, T)`` mask, True = may attend: real keys only (causal: and not
    later ones). Every query may attend to itself, so padded rows never become NaN."""
    t = seq.shape[1]
    allowed = (seq != 0)[:, None, None, :].expand(-1, 1, t, t)
    if causal:
        allowed = allowed & torch.ones(t, t, dtype=torch.bool, device=seq.device).tril()
    return allowed | torch.eye(t, dtype=torch.bool, device=seq.device)


# ---------------------------------------------------------------------------------------
# models


class SequentialRecommender(nn.Module):
    """Shared parts: item input, scoring, the training losses."""

    extra_tokens = 0
    objective = "bce"  # one sampled negative per position

    def __init__(self, n_items: int, config: SRSConfig, table: torch.Tensor | None = None):
        super().__init__()
        self.n_items = n_items
        self.config = config
        torch.manual_seed(config.seed)
        self.items = ItemEncoder(n_items, config.hidden_size, table=table, pca_dim=config.pca_dim,
                                 adapter_hidden=config.adapter_hidden, extra_tokens=self.extra_tokens,
                                 seed=config.seed)
        self.emb_dropout = Dropout(config.dropout)

    def _init_weights(self) -> None:
        # the adapter keeps PyTorch's default (fan-in scaled) init: with std 0.02 its two layers
        # would shrink unit-scale PCA inputs ~100-fold and the items would start invisible
        adapter = set(self.items.adapter.modules()) if self.items.adapter is not None else set()
        for m in self.modules():
            if m in adapter:
                continue
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
                if isinstance(m, nn.Linear) and m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.GRU):
                for name, p in m.named_parameters():
                    (nn.init.xavier_uniform_ if "weight_ih" in name else nn.init.orthogonal_)(p)

    def item_table(self) -> torch.Tensor:
        """Output vectors of items ``0..n_items`` (row 0 = padding, zero)."""
        return self.items.table()[: self.n_items + 1]

    def encode(self, seq: torch.Tensor, table: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """``(B, T) -> (B, T, H)`` hidden states (``last_only``: ``(B, 1, H)``, the last
        position's, computed without the other positions' outputs of the last layer)."""
        raise NotImplementedError

    def user_representation(self, seq: torch.Tensor) -> torch.Tensor:
        """``(B, T)`` left-padded histories -> ``(B, H)`` next-item query vectors."""
        return self.encode(self.prepare_history(seq), self.items.table(), last_only=True)[:, -1]

    @torch.no_grad()
    def score_all(self, seq: torch.Tensor) -> torch.Tensor:
        """``(B, n_items + 1)`` scores of every item for each history; column 0 = padding."""
        return self.user_representation(seq) @ self.item_table().T

    def prepare_history(self, seq: torch.Tensor) -> torch.Tensor:
        """The model's input for a left-padded history (Bert4Rec appends the mask token)."""
        return seq[:, -self.config.max_length:]

    def training_loss(self, seq: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Next-item BCE with one uniformly sampled negative per position.

        ``seq`` ``(B, T + 1)`` left-padded training sequences: positions ``0..T-1`` are the
        input, ``1..T`` the targets. Negatives avoid the items of the user's window.
        """
        inputs, targets = seq[:, :-1], seq[:, 1:]
        valid = (inputs != 0) & (targets != 0)
        negatives = sample_negatives(seq, self.n_items, generator)
        table = self.items.table()
        h = self.encode(inputs, table)
        # F.embedding, not table[idx]: its backward is a fast dense scatter on CPU
        pos = (h * F.embedding(targets, table)).sum(-1)
        neg = (h * F.embedding(negatives, table)).sum(-1)
        loss = F.binary_cross_entropy_with_logits(pos, torch.ones_like(pos), reduction="none") + \
            F.binary_cross_entropy_with_logits(neg, torch.zeros_like(neg), reduction="none")
        return (loss * valid).sum() / valid.sum().clamp(min=1)


def sample_negatives(seq: torch.Tensor, n_items: int, generator: torch.Generator, tries: int = 20) -> torch.Tensor:
    """One uniform item per position of ``seq[:, 1:]`` that does not occur in the row of
    ``seq`` (rejection sampling, vectorised; rows holding nearly every item may keep a rare
    collision after ``tries`` rounds)."""
    shape = (seq.shape[0], seq.shape[1] - 1)
    neg = torch.randint(1, n_items + 1, shape, generator=generator, device="cpu").to(seq.device)
    for _ in range(tries):
        clash = (neg[:, :, None] == seq[:, None, :]).any(-1)
        if not clash.any():
            break
        fresh = torch.randint(1, n_items + 1, shape, generator=generator, device="cpu").to(seq.device)
        neg = torch.where(clash, fresh, neg)
    return neg


class SASRec(SequentialRecommender):
    """Self-attentive sequential recommendation (Kang & McAuley 2018): causal transformer,
    learned positions, next-item BCE with one sampled negative."""

    def __init__(self, n_items: int, config: SRSConfig, table: torch.Tensor | None = None):
        super().__init__(n_items, config, table)
        h = config.hidden_size
        self.positions = nn.Embedding(config.max_length + 1, h)
        self.blocks = nn.ModuleList(Block(h, config.num_heads, config.dropout, h, "relu") for _ in range(config.num_layers))
        self.ln = nn.LayerNorm(h)
        self._init_weights()

    def encode(self, seq: torch.Tensor, table: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        real = (seq != 0).unsqueeze(-1)
        t = seq.shape[1]
        pos = torch.arange(t - 1, -1, -1, device=seq.device)  # position 0 = most recent
        x = self.items(seq, table) + self.positions(pos)[None]
        x = self.emb_dropout(self.ln(x)) * real
        mask = attention_mask(seq, causal=True)
        for i, block in enumerate(self.blocks):
            last = last_only and i == len(self.blocks) - 1
            x = block(x, mask, last) * (real[:, -1:] if last else real)
        return x


class GRU4Rec(SequentialRecommender):
    """Session-based recommendation with GRUs (Hidasi et al. 2016), in the next-item BCE
    setting of the reference code: embedding dropout, a bias-free GRU, a dense output layer."""

    def __init__(self, n_items: int, config: SRSConfig, table: torch.Tensor | None = None):
        super().__init__(n_items, config, table)
        h = config.hidden_size
        self.gru = nn.GRU(h, h, num_layers=config.num_layers, bias=False, batch_first=True,
                          dropout=config.dropout if config.num_layers > 1 else 0.0)
        self.dense = nn.Linear(h, h)
        self._init_weights()

    def encode(self, seq: torch.Tensor, table: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        # zero inputs keep the bias-free GRU's state at zero: left padding changes nothing
        x = self.emb_dropout(self.items(seq, table)) * (seq != 0).unsqueeze(-1)
        y, _ = self.gru(x)
        return self.dense(y[:, -1:] if last_only else y)


class Bert4Rec(SequentialRecommender):
    """BERT4Rec (Sun et al. 2019): bidirectional transformer trained to recover masked items
    (cross-entropy over all items at the masked positions); at inference the mask token is
    appended to the history and its output ranks the next item."""

    extra_tokens = 1
    objective = "masked"

    def __init__(self, n_items: int, config: SRSConfig, table: torch.Tensor | None = None):
        super().__init__(n_items, config, table)
        h = config.hidden_size
        self.mask_token = n_items + 1
        self.positions = nn.Embedding(config.max_length + 1, h)
        self.blocks = nn.ModuleList(Block(h, config.num_heads, config.dropout, 4 * h, "gelu") for _ in range(config.num_layers))
        self.ln = nn.LayerNorm(h)
        self.head = nn.Sequential(nn.Linear(h, h), nn.GELU(), nn.LayerNorm(h))
        self.output_bias = nn.Parameter(torch.zeros(n_items + 1))
        self._init_weights()

    def encode(self, seq: torch.Tensor, table: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        real = (seq != 0).unsqueeze(-1)
        t = seq.shape[1]
        pos = torch.arange(t - 1, -1, -1, device=seq.device)
        x = self.emb_dropout(self.ln(self.items(seq, table) + self.positions(pos)[None])) * real
        mask = attention_mask(seq, causal=False)
        for i, block in enumerate(self.blocks):
            last = last_only and i == len(self.blocks) - 1
            x = block(x, mask, last) * (real[:, -1:] if last else real)
        return self.head(x)

    def prepare_history(self, seq: torch.Tensor) -> torch.Tensor:
        seq = seq[:, -(self.config.max_length - 1):]
        mask = torch.full_like(seq[:, :1], self.mask_token)
        return torch.cat([seq, mask], dim=1)

    @torch.no_grad()
    def score_all(self, seq: torch.Tensor) -> torch.Tensor:
        return super().score_all(seq) + self.output_bias

    def training_loss(self, seq: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Masked-item cross-entropy over all items. ``seq`` ``(B, T)`` left-padded; each
        real position is masked with probability ``mask_prob``, and the last real item of
        every row is always masked (it mirrors the inference task)."""
        real = seq != 0
        draw = torch.rand(seq.shape, generator=generator, device="cpu").to(seq.device)
        masked = real & (draw < self.config.mask_prob)
        masked[:, -1] |= real[:, -1]
        inputs = torch.where(masked, torch.full_like(seq, self.mask_token), seq)
        table = self.items.table()
        h = self.encode(inputs, table)[masked]
        logits = h @ table[: self.n_items + 1].T + self.output_bias
        logits[:, 0] = float("-inf")
        return F.cross_entropy(logits, seq[masked])


def build_model(n_items: int, config: SRSConfig, table: torch.Tensor | None = None) -> SequentialRecommender:
    """The backbone named in ``config`` over ``n_items`` items; ``table`` (rows = items
    ``1..n``) selects the frozen-table input, None the ID embedding."""
    cls = {"sasrec": SASRec, "gru4rec": GRU4Rec, "bert4rec": Bert4Rec}[config.backbone]
    return cls(n_items, config, table)


def left_pad(sequences: list[np.ndarray], length: int) -> torch.Tensor:
    """``(len(sequences), length)`` int64 tensor: the last ``length`` items of each sequence,
    right-aligned, zeros in front."""
    out = np.zeros((len(sequences), length), dtype=np.int64)
    for row, s in enumerate(sequences):
        s = s[-length:]
        if len(s):
            out[row, length - len(s):] = s
    return torch.from_numpy(out)
