"""Item attribute text and the view augmentation of LRCL / SCFT (METHOD.md §1, §3).

An item is an ordered mapping ``attribute -> value`` (strings). Its text is
``"key is value; key is value"`` with each value cut to ``max_value_chars`` characters.
Contrastive training builds two *views* of every item: attributes shuffled and
``int(0.4 * n)`` of the ``n`` attributes dropped, seeded so that the same
``(seed, item, view)`` always gives the same text.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

__all__ = [
    "TextConfig",
    "clean_attributes",
    "item_text",
    "augment_attributes",
    "augmented_item_text",
]


@dataclass(frozen=True)
class TextConfig:
    """How item attributes become text.

    Attributes:
        max_value_chars: each value is cut to this many characters (METHOD.md: ~100).
        drop_ratio: share of attributes dropped in an augmented view; ``int(drop_ratio * n)``.
        separator: between ``key is value`` pairs.
    """

    max_value_chars: int = 100
    drop_ratio: float = 0.4
    separator: str = "; "

    def __post_init__(self) -> None:
        if self.max_value_chars < 1:
            raise ValueError(f"max_value_chars must be >= 1, got {self.max_value_chars}")
        if not 0.0 <= self.drop_ratio < 1.0:
            raise ValueError(f"drop_ratio must be in [0, 1), got {self.drop_ratio}")


def _as_text(value: object) -> str:
    """Flatten a raw attribute value (str, number, list of lists) into one string."""
    if value is None:
        return ""
    if isinstance(value, float) and value != value:  # NaN
        return ""
    if isinstance(value, (list, tuple)):
        parts = [_as_text(v) for v in value]
        return ", ".join(p for p in parts if p)
    if isinstance(value, Mapping):
        parts = [f"{k}: {_as_text(v)}" for k, v in value.items() if _as_text(v)]
        return ", ".join(parts)
    return " ".join(str(value).split())  # collapse whitespace and newlines


def clean_attributes(raw: Mapping[str, object]) -> dict[str, str]:
    """Normalise a raw attribute record: values flattened to single-line strings, empty
    values removed, key order kept."""
    out: dict[str, str] = {}
    for key, value in raw.items():
        text = _as_text(value)
        if text:
            out[str(key)] = text
    return out


def _truncate(value: str, limit: int) -> str:
    return value if len(value) <= limit else value[:limit].rstrip()


def item_text(attributes: Mapping[str, str], config: TextConfig = TextConfig()) -> str:
    """``key is value; key is value`` over the (non-empty) attributes, in their order.

    >>> item_text({"title": "Toy Story", "year": "1995"})
    'title is Toy Story; year is 1995'
    """
    pairs = [
        f"{key} is {_truncate(value, config.max_value_chars)}"
        for key, value in attributes.items()
        if value
    ]
    return config.separator.join(pairs)


def augment_attributes(
    attributes: Mapping[str, str],
    rng: np.random.Generator,
    drop_ratio: float = 0.4,
) -> dict[str, str]:
    """One augmented view: attributes shuffled, ``int(drop_ratio * n)`` of them dropped.

    An item with a single attribute keeps it (``int(0.4 * 1) == 0``).
    """
    keys = [k for k, v in attributes.items() if v]
    order = rng.permutation(len(keys))
    n_drop = int(drop_ratio * len(keys))
    kept = [keys[i] for i in order[: len(keys) - n_drop]]
    return {k: attributes[k] for k in kept}


def augmented_item_text(
    attributes: Mapping[str, str],
    *,
    seed: int,
    item: int,
    view: int,
    config: TextConfig = TextConfig(),
) -> str:
    """Text of view ``view`` of ``item``, deterministic in ``(seed, item, view)``.

    Passing a training step as part of ``seed`` gives fresh views each step while staying
    reproducible.
    """
    rng = np.random.default_rng([int(seed), int(item), int(view)])
    return item_text(augment_attributes(attributes, rng, config.drop_ratio), config)
