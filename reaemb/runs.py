"""Run directories and the quick/full profile shared by every notebook.

A run is ``papermill_runs/<run>.yaml`` (its parameters) and ``papermill_runs/<run>/`` (its
executed notebooks and artifacts)::

    papermill_runs/<run>/
        data/           prepared datasets (git-ignored)
        embeddings/     item embedding tables (git-ignored)
        checkpoints/    training state for resume (git-ignored)
        results/        small outputs the tests and README read (metrics.csv, <stage>.json)
        NN_*.ipynb      executed notebooks

Figures go to ``figures/<run>/``. ``$REAEMB_RUNS_DIR`` moves the run root (tests use it),
``$REAEMB_PROFILE`` forces a profile (CI sets ``quick``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from .io import atomic_write_json

__all__ = [
    "PROFILES",
    "QUICK_ITEM_CORE",
    "resolve_profile",
    "pick",
    "data_config",
    "project_root",
    "RunDir",
    "run_dir",
]

PROFILES = ("full", "quick")
T = TypeVar("T")


def resolve_profile(profile: str = "full") -> str:
    """The profile in force: ``$REAEMB_PROFILE`` when set, else the notebook's parameter.

    ``quick`` shrinks the work (fewer steps, epochs, items) without changing the code path,
    so that CI can execute every notebook in minutes.
    """
    value = os.environ.get("REAEMB_PROFILE") or profile
    if value not in PROFILES:
        raise ValueError(f"unknown profile {value!r}; choose one of {PROFILES}")
    return value


def pick(profile: str, full: T, quick: T) -> T:
    """``full`` or ``quick`` by profile: ``EPOCHS = pick(PROFILE, full=200, quick=2)``."""
    return quick if resolve_profile(profile) == "quick" else full


# The quick profile keeps only items with at least this many interactions (about 300 of
# ml-100k's 1,473): the LLM stages then touch a fifth of the catalogue, same code path.
QUICK_ITEM_CORE = 120


def data_config(profile: str = "full", **fields):
    """The :class:`reaemb.data.DataConfig` a notebook uses under ``profile``: as given in the
    full profile; in the quick profile with ``item_core`` raised to :data:`QUICK_ITEM_CORE`."""
    from .data import DataConfig

    if resolve_profile(profile) == "quick":
        fields["item_core"] = max(int(fields.get("item_core", 3)), QUICK_ITEM_CORE)
    return DataConfig(**fields)


def project_root() -> Path:
    """The checkout this package lives in (it is installed editable), else the working
    directory's nearest parent holding ``pyproject.toml``."""
    here = Path(__file__).resolve().parents[1]
    if (here / "pyproject.toml").exists():
        return here
    for parent in [Path.cwd(), *Path.cwd().parents]:
        if (parent / "pyproject.toml").exists():
            return parent
    return Path.cwd()


@dataclass(frozen=True)
class RunDir:
    """The folders of one run. Creating the object creates nothing on disk; each accessor
    makes its folder on first use."""

    name: str
    root: Path
    figures_root: Path

    def _sub(self, name: str) -> Path:
        path = self.root / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    @property
    def data(self) -> Path:
        return self._sub("data")

    @property
    def embeddings(self) -> Path:
        return self._sub("embeddings")

    @property
    def checkpoints(self) -> Path:
        return self._sub("checkpoints")

    @property
    def results(self) -> Path:
        return self._sub("results")

    @property
    def figures(self) -> Path:
        path = self.figures_root / self.name
        path.mkdir(parents=True, exist_ok=True)
        return path

    @property
    def metrics_csv(self) -> Path:
        return self.results / "metrics.csv"

    def record(self, stage: str, values: dict) -> Path:
        """Write ``results/<stage>.json`` atomically: a notebook's headline numbers, where
        tests and later notebooks read them."""
        return atomic_write_json(self.results / f"{stage}.json", values)

    def recorded(self, stage: str) -> dict:
        """Read back what :meth:`record` wrote."""
        path = self.root / "results" / f"{stage}.json"
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist: run the notebook of stage {stage!r} first")
        return json.loads(path.read_text())


def run_dir(name: str, runs_root: str | Path | None = None) -> RunDir:
    """The :class:`RunDir` of run ``name`` under ``runs_root`` (default
    ``$REAEMB_RUNS_DIR`` or ``<project>/papermill_runs``)."""
    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"run name must be a plain folder name, got {name!r}")
    root = Path(runs_root or os.environ.get("REAEMB_RUNS_DIR") or project_root() / "papermill_runs")
    figures = Path(os.environ.get("REAEMB_FIGURES_DIR") or project_root() / "figures")
    return RunDir(name, root / name, figures)
