"""Item text and the seeded view augmentation."""

from __future__ import annotations

import numpy as np
import pytest

from reaemb.text import (
    TextConfig,
    augment_attributes,
    augmented_item_text,
    clean_attributes,
    item_text,
)


def test_item_text_and_truncation():
    attrs = {"title": "Toy Story", "year": "1995", "genres": "Animation, Comedy"}
    assert item_text(attrs) == "title is Toy Story; year is 1995; genres is Animation, Comedy"
    assert item_text({"title": "abcdefgh"}, TextConfig(max_value_chars=3)) == "title is abc"


def test_clean_attributes_flattens_and_drops_empty():
    raw = {"title": " A\n  pen ", "description": "", "categories": [["Office", "Pens"], ["Office"]],
           "price": None, "brand": "Bic"}
    assert clean_attributes(raw) == {"title": "A pen", "categories": "Office, Pens, Office", "brand": "Bic"}


def test_augmentation_drops_int_04n_and_shuffles_deterministically():
    attrs = {f"k{i}": f"v{i}" for i in range(5)}
    view = augment_attributes(attrs, np.random.default_rng(0))
    assert len(view) == 5 - int(0.4 * 5) == 3
    assert set(view) <= set(attrs) and all(view[k] == attrs[k] for k in view)
    a = augmented_item_text(attrs, seed=1, item=7, view=0)
    assert a == augmented_item_text(attrs, seed=1, item=7, view=0)
    texts = {augmented_item_text(attrs, seed=1, item=7, view=v) for v in range(20)}
    assert len(texts) > 1  # views differ
    # one attribute is never dropped: int(0.4 * 1) == 0
    assert augmented_item_text({"title": "x"}, seed=0, item=1, view=0) == "title is x"


def test_bad_text_config():
    with pytest.raises(ValueError):
        TextConfig(max_value_chars=0)
    with pytest.raises(ValueError):
        TextConfig(drop_ratio=1.0)
