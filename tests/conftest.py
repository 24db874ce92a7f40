"""Shared fixtures: small data files written by the tests, and the location of the real
datasets (``$REAEMB_DATA_DIR`` or ``../shared/data`` beside the checkout)."""

from __future__ import annotations

import copy
import functools
import json
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path | None:
    env = os.environ.get("REAEMB_DATA_DIR")
    for candidate in ([Path(env)] if env else []) + [ROOT.parent / "shared" / "data"]:
        if candidate.is_dir():
            return candidate
    return None


def write_inter_json(folder: Path, name: str, seqs: dict, items: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.inter.json").write_text(json.dumps(seqs))
    (folder / f"{name}.item.json").write_text(json.dumps(items))
    return folder


@pytest.fixture
def isolated_runs(tmp_path, monkeypatch):
    """Run and figure roots inside a temporary folder."""
    monkeypatch.setenv("REAEMB_RUNS_DIR", str(tmp_path / "runs"))
    monkeypatch.setenv("REAEMB_FIGURES_DIR", str(tmp_path / "figures"))
    return tmp_path


# --------------------------------------------------------------------------- LLM fixtures


@functools.lru_cache(maxsize=1)
def _smollm2_tokenizer():
    from transformers import AutoTokenizer

    from reaemb.backbone import convert_gguf, embedded_gguf

    return AutoTokenizer.from_pretrained(convert_gguf(embedded_gguf()))


def tiny_backbone(seed: int = 0, padding_side: str = "left"):
    """A :class:`reaemb.backbone.Backbone` around a tiny random Llama (2 layers, hidden 32)
    with the real SmolLM2 tokenizer and chat template, ``<|Thought|>`` added: the full code
    path of the embedded backbone in milliseconds. A fresh one per call (LoRA is injected in
    place)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from reaemb.backbone import Backbone, BackboneConfig, add_thought_token

    tokenizer = copy.deepcopy(_smollm2_tokenizer())
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    model = LlamaForCausalLM(cfg).eval()
    thought_id = add_thought_token(model, tokenizer)
    eos = int(tokenizer.eos_token_id)
    pad = int(tokenizer.pad_token_id) if tokenizer.pad_token_id is not None else eos
    config = BackboneConfig(model="tiny-llama", padding_side=padding_side)
    return Backbone(model, tokenizer, thought_id, eos, pad, config, "tiny-llama")


@pytest.fixture(scope="session")
def smollm2():
    """The real embedded SmolLM2-135M-Instruct (converted once into the model cache)."""
    from reaemb.backbone import BackboneConfig, load_backbone

    return load_backbone(BackboneConfig())


@pytest.fixture
def make_tiny_backbone():
    """Factory of fresh :func:`tiny_backbone` instances."""
    return tiny_backbone


# --------------------------------------------------------------------------- tiny datasets

CYCLE_ITEMS = 30


def cyclic_dataset(tmp_path: Path, genres: bool = False):
    """30 users walking the cycle 0 -> 1 -> ... -> 29 -> 0 from every start: the next item is
    always the successor of the last one. ``genres``: items alternate Comedy / Drama."""
    from reaemb.data import DataConfig, prepare

    seqs = {str(u): [str((u + j) % CYCLE_ITEMS) for j in range(7 + u % 4)] for u in range(CYCLE_ITEMS)}
    items = {str(i): {"title": f"item {i}", **({"genres": "Drama" if i % 2 else "Comedy"} if genres else {})}
             for i in range(CYCLE_ITEMS)}
    write_inter_json(tmp_path / "src", "Cyc", seqs, items)
    return prepare(DataConfig(dataset="json:Cyc", data_dir=str(tmp_path / "src"), user_core=5, item_core=1),
                   tmp_path / "data")


@pytest.fixture
def one_thread():
    """Tiny models run fastest on one thread (and do not fight other processes for cores)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

