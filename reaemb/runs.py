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


# ---------------------------------------------------------------------------------------
# papermill runs


NOTEBOOKS = [
    "01_data_prep",
    "02_lrcl",
    "03_crrl",
    "04_srs_evaluation",
    "05_long_tail",
    "06_embedding_umap",
    "07_coderrec",
]

# YAML keys that become notebook parameters (upper-cased) when a notebook declares them.
_GLOBAL_KEYS = ("run", "dataset", "data_dir", "profile", "seed", "seeds", "model")


def _declared_parameters(notebook: Path) -> set[str]:
    """Names assigned in the notebook's ``parameters`` cell."""
    import nbformat

    nb = nbformat.read(notebook, as_version=4)
    names: set[str] = set()
    for cell in nb.cells:
        if "parameters" in cell.get("metadata", {}).get("tags", []):
            for line in cell.source.splitlines():
                head = line.split("#", 1)[0]
                if "=" in head and not head.startswith((" ", "\t")):
                    names.add(head.split("=", 1)[0].strip())
    return names


def load_run_spec(path: str | Path) -> dict:
    """Read ``papermill_runs/<run>.yaml``: ``run`` (default: the file's stem), global
    parameters, ``notebooks`` (list of stages; default all present), per-notebook
    ``parameters: {stage: {NAME: value}}``, and free text: ``description`` and ``note`` (what
    the run leaves out and why; ``python -m reaemb.report`` prints it in RESULTS.md)."""
    import yaml

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"run spec {path} does not exist")
    spec = yaml.safe_load(path.read_text()) or {}
    if not isinstance(spec, dict):
        raise ValueError(f"{path}: expected a mapping at the top level")
    spec.setdefault("run", path.stem)
    unknown = set(spec) - set(_GLOBAL_KEYS) - {"notebooks", "parameters", "description", "note"}
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {sorted(unknown)}")
    return spec


# results that stages add to rather than rewrite (a stage skips what they already hold)
_ACCUMULATED = ("metrics.csv", "srs_inputs.json", "ranks")


def start_over(run: RunDir) -> list[str]:
    """Remove the results the stages add to (``metrics.csv``, ``srs_inputs.json``, ``ranks/``)
    so that the next run recomputes every model; returns the names removed."""
    import shutil

    removed = []
    for name in _ACCUMULATED:
        path = run.results / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
        else:
            continue
        removed.append(name)
    return removed


def execute_run(spec_path: str | Path, *, force: bool = False, only: list[str] | None = None) -> list[dict]:
    """Execute a run's notebooks in order with papermill into ``papermill_runs/<run>/``.

    A stage whose notebook finished with the same parameters is skipped (its marker
    ``results/stages/<stage>.json`` holds the parameters and time) unless an earlier stage ran
    in this invocation (its outputs may have changed); an interrupted stage is run again, and
    the notebooks themselves reuse what earlier attempts saved (prepared data, checkpoints,
    finished evaluations). Prints the time per stage.

    A whole run (no ``only``) in a checkout where none of its stages has run yet, e.g. a fresh
    clone holding the committed results of the reference run, starts those results over
    (:func:`start_over`): every model is trained again, none is taken from the committed
    ``metrics.csv``; ``git diff`` then compares the reproduction with the committed run.
    """
    import time

    import papermill as pm

    from .io import sha256_json

    spec = load_run_spec(spec_path)
    run = run_dir(spec["run"])
    notebooks_dir = project_root() / "notebooks"
    stages = spec.get("notebooks") or [n for n in NOTEBOOKS if (notebooks_dir / f"{n}.ipynb").exists()]
    if only:
        stages = [s for s in stages if s in only]
    markers = run.results / "stages"
    if not only and not any(markers.glob("*.json")):
        removed = start_over(run)
        if removed:
            print(f"no stage of run {spec['run']!r} has run in this checkout: starting its results over "
                  f"(removed {', '.join(removed)}; the committed ones stay in git)", flush=True)
    markers.mkdir(parents=True, exist_ok=True)
    timings = []
    upstream_ran = False  # once a stage runs, the later ones run too (their inputs may have changed)
    for stage in stages:
        source = notebooks_dir / f"{stage}.ipynb"
        if not source.exists():
            raise FileNotFoundError(f"notebook {source} of stage {stage!r} does not exist")
        declared = _declared_parameters(source)
        params = {k.upper(): v for k, v in spec.items() if k in _GLOBAL_KEYS}
        params.update((spec.get("parameters") or {}).get(stage, {}))
        params = {k: v for k, v in params.items() if k in declared}
        key = sha256_json({"params": params, "notebook": sha256_json(source.read_text())})
        marker = markers / f"{stage}.json"
        if not force and not upstream_ran and marker.exists() and json.loads(marker.read_text()).get("key") == key:
            prev = json.loads(marker.read_text())
            print(f"[{stage}] finished earlier ({prev['seconds']:.0f} s): skipped")
            timings.append({"stage": stage, "seconds": prev["seconds"], "skipped": True})
            continue
        print(f"[{stage}] running with {params}", flush=True)
        start = time.perf_counter()
        pm.execute_notebook(
            str(source),
            str(run.root / f"{stage}.ipynb"),
            parameters=params,
            cwd=str(notebooks_dir),
            progress_bar=True,
        )
        seconds = time.perf_counter() - start
        atomic_write_json(marker, {"key": key, "params": params, "seconds": round(seconds, 1)})
        print(f"[{stage}] done in {seconds:.0f} s", flush=True)
        upstream_ran = True
        timings.append({"stage": stage, "seconds": round(seconds, 1), "skipped": False})
    total = sum(t["seconds"] for t in timings)
    print("stage times: " + ", ".join(f"{t['stage']} {t['seconds']:.0f} s" for t in timings) + f"; total {total:.0f} s")
    atomic_write_json(run.results / "stage_times.json", timings)
    return timings


def main(argv: list[str] | None = None) -> int:
    """``python -m reaemb.runs papermill_runs/<run>.yaml [--force] [--only STAGE ...]``"""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m reaemb.runs", description=execute_run.__doc__)
    parser.add_argument("spec", help="papermill_runs/<run>.yaml")
    parser.add_argument("--force", action="store_true", help="re-run stages that finished")
    parser.add_argument("--only", nargs="*", help="run only these stages (e.g. 01_data_prep)")
    args = parser.parse_args(argv)
    execute_run(args.spec, force=args.force, only=args.only)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
