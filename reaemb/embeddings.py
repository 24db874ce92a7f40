"""Item embedding tables in the run directory: one place that writes and reads them.

``<run>/embeddings/<variant>/`` holds ``embeddings.safetensors`` (tensor ``embeddings``,
shape ``(n_items, dim)``, row ``k`` = item index ``k + 1``; padding is not stored) and
``manifest.json`` (dataset key, variant, producer settings, item raw ids in row order).
Every consumer (SRS adapters, analyses) reads through :func:`load_item_embeddings`, which
checks that the table matches the prepared dataset it is used with.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .data.prepared import PreparedDataset
from .io import atomic_dir

__all__ = ["save_item_embeddings", "load_item_embeddings", "list_variants", "VARIANT_ORDER"]

# Display order of the paper's variants (others sort after these).
VARIANT_ORDER = ["id", "inference", "scft", "lrcl", "crrl"]


def _dataset_key(dataset: PreparedDataset) -> str:
    return dataset.path.name if dataset.path is not None else dataset.name


def save_item_embeddings(
    embeddings_root: str | Path,
    variant: str,
    table: torch.Tensor | np.ndarray,
    dataset: PreparedDataset,
    meta: dict | None = None,
) -> Path:
    """Write the table of ``variant`` atomically; returns its folder."""
    table = torch.as_tensor(table).detach().to("cpu", torch.float32).contiguous()
    if table.ndim != 2 or table.shape[0] != dataset.n_items:
        raise ValueError(f"expected a table of shape ({dataset.n_items}, dim), got {tuple(table.shape)}")
    if not torch.isfinite(table).all():
        raise ValueError(f"embedding table of variant {variant!r} has non-finite values")
    folder = Path(embeddings_root) / variant
    manifest = {
        "variant": variant,
        "dataset": dataset.name,
        "dataset_key": _dataset_key(dataset),
        "n_items": dataset.n_items,
        "dim": int(table.shape[1]),
        "item_raw_ids": [str(x) for x in dataset.item_ids[1:]],
        "meta": meta or {},
    }
    with atomic_dir(folder) as tmp:
        save_file({"embeddings": table}, str(tmp / "embeddings.safetensors"))
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return folder


def load_item_embeddings(
    folder: str | Path, dataset: PreparedDataset | None = None
) -> tuple[torch.Tensor, dict]:
    """Read a table written by :func:`save_item_embeddings`. With ``dataset``, check that the
    rows are that dataset's items in its order."""
    folder = Path(folder)
    manifest_path = folder / "manifest.json"
    if not manifest_path.exists():
        raise FileNotFoundError(f"{folder} holds no embedding table (no manifest.json)")
    manifest = json.loads(manifest_path.read_text())
    table = load_file(str(folder / "embeddings.safetensors"))["embeddings"]
    if dataset is not None:
        ids = [str(x) for x in dataset.item_ids[1:]]
        if manifest["item_raw_ids"] != ids:
            raise ValueError(
                f"embedding table {folder} was built for dataset key {manifest.get('dataset_key')!r}, "
                f"not for {_dataset_key(dataset)!r} (item ids differ)"
            )
    return table, manifest


def table_fingerprint(table: torch.Tensor | np.ndarray) -> str:
    """SHA-256 (first 16 hex digits) of a table's float32 values and shape: what a result
    computed from the table records, so that a rebuilt, different table is noticed."""
    import hashlib

    t = torch.as_tensor(table).detach().to("cpu", torch.float32).contiguous()
    h = hashlib.sha256(str(tuple(t.shape)).encode())
    h.update(t.numpy().tobytes())
    return h.hexdigest()[:16]


def list_variants(embeddings_root: str | Path) -> list[str]:
    """Variants present under ``embeddings_root``, in the paper's order."""
    root = Path(embeddings_root)
    found = [p.name for p in root.iterdir() if (p / "manifest.json").exists()] if root.is_dir() else []
    return sorted(found, key=lambda v: (VARIANT_ORDER.index(v) if v in VARIANT_ORDER else 99, v))
