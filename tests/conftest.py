"""Shared fixtures: small data files written by the tests, and the location of the real
datasets (``$REAEMB_DATA_DIR`` or ``../shared/data`` beside the checkout)."""

from __future__ import annotations

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
