"""Run layout, profiles, the papermill runner, and notebook 01 executed with papermill."""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pytest
import yaml
from papermill.translators import PythonTranslator

from conftest import ROOT
from reaemb.data import load_prepared
from reaemb.runs import (
    QUICK_ITEM_CORE,
    _declared_parameters,
    data_config,
    execute_run,
    load_run_spec,
    pick,
    resolve_profile,
    run_dir,
)


def test_profile_resolution(monkeypatch):
    monkeypatch.delenv("REAEMB_PROFILE", raising=False)
    assert resolve_profile("full") == "full" and pick("full", full=10, quick=1) == 10
    monkeypatch.setenv("REAEMB_PROFILE", "quick")
    assert resolve_profile("full") == "quick" and pick("full", full=10, quick=1) == 1
    assert data_config("full", dataset="ml-100k").item_core == QUICK_ITEM_CORE
    monkeypatch.setenv("REAEMB_PROFILE", "fast")
    with pytest.raises(ValueError, match="unknown profile"):
        resolve_profile("full")


def test_run_dir_layout(isolated_runs):
    run = run_dir("demo")
    assert not run.root.exists()  # nothing is created before it is used
    assert run.results == isolated_runs / "runs" / "demo" / "results"
    run.record("stage", {"x": 1})
    assert run.recorded("stage") == {"x": 1}
    assert run.figures == isolated_runs / "figures" / "demo"
    with pytest.raises(ValueError):
        run_dir("../escape")


def test_run_spec_validation(tmp_path):
    spec = tmp_path / "r.yaml"
    spec.write_text(yaml.safe_dump({"dataset": "ml-100k", "epochs": 3}))
    with pytest.raises(ValueError, match="unknown key"):
        load_run_spec(spec)
    spec.write_text(yaml.safe_dump({"dataset": "ml-100k"}))
    assert load_run_spec(spec)["run"] == "r"
    with pytest.raises(FileNotFoundError):
        load_run_spec(tmp_path / "missing.yaml")


def test_committed_run_specs_parse():
    for spec in sorted((ROOT / "papermill_runs").glob("*.yaml")):
        assert load_run_spec(spec)["dataset"]


def test_every_notebook_has_kernelspec_and_parameters():
    notebooks = sorted((ROOT / "notebooks").glob("*.ipynb"))
    assert notebooks, "no notebooks found"
    for nb in notebooks:
        meta = json.loads(nb.read_text())["metadata"]
        assert meta["kernelspec"]["name"] == "python3", nb
        declared = _declared_parameters(nb)
        assert {"RUN", "DATASET", "PROFILE"} <= declared, (nb, declared)
        # papermill must understand every parameter line (a '>=' in a comment breaks it)
        cell = next(c for c in nbformat.read(nb, as_version=4).cells if "parameters" in c.metadata.get("tags", []))
        assert {p.name for p in PythonTranslator.inspect(cell)} == declared, nb


@pytest.mark.slow
def test_runner_executes_notebook_01_and_skips_it_when_finished(isolated_runs, monkeypatch, capsys):
    monkeypatch.setenv("REAEMB_PROFILE", "quick")
    spec = isolated_runs / "nbtest.yaml"
    spec.write_text(yaml.safe_dump({"dataset": "ml-100k", "profile": "quick", "seed": 0}))
    timings = execute_run(spec, only=["01_data_prep"])
    assert [t["skipped"] for t in timings] == [False]
    run = run_dir("nbtest")
    assert (run.root / "01_data_prep.ipynb").exists()
    recorded = run.recorded("01_data_prep")
    assert recorded["stats"]["raw"] == {"users": 943, "items": 1682, "interactions": 100000}
    assert recorded["profile"] == "quick"
    # the quick profile prepared the smaller catalogue as well, and both reload
    work = load_prepared(run.data / recorded["working_catalogue"]["prepared"])
    assert work.config.item_core == QUICK_ITEM_CORE and work.n_items == recorded["working_catalogue"]["items"]
    assert load_prepared(run.data / recorded["prepared"]).n_items == recorded["stats"]["processed"]["items"]
    assert Path(run.figures / "01_item_popularity.png").stat().st_size > 10_000
    timings = execute_run(spec, only=["01_data_prep"])
    assert [t["skipped"] for t in timings] == [True]
    assert "skipped" in capsys.readouterr().out


def test_environment_yml_carries_the_requirements_pins():
    reqs = {
        line.strip()
        for line in (ROOT / "requirements.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert set(pip) == reqs


def test_runner_reruns_later_stages_after_an_earlier_one_ran(isolated_runs, monkeypatch):
    import papermill as pm

    executed = []

    def fake_execute(source, out, parameters, cwd, progress_bar):
        executed.append(Path(source).stem)
        Path(out).write_text("{}")

    monkeypatch.setattr(pm, "execute_notebook", fake_execute)
    spec = isolated_runs / "chain.yaml"
    spec.write_text(yaml.safe_dump({"dataset": "ml-100k", "profile": "quick",
                                    "notebooks": ["01_data_prep", "05_long_tail"]}))
    execute_run(spec)
    assert executed == ["01_data_prep", "05_long_tail"]
    execute_run(spec)  # both finished with the same parameters: nothing runs
    assert executed == ["01_data_prep", "05_long_tail"]
    execute_run(spec, only=["05_long_tail"], force=True)
    assert executed[-1] == "05_long_tail" and len(executed) == 3
    # stage 01's parameters change: it runs, and so does 05 although its own marker matches
    spec.write_text(yaml.safe_dump({"dataset": "ml-100k", "profile": "quick", "seed": 1,
                                    "notebooks": ["01_data_prep", "05_long_tail"]}))
    timings = execute_run(spec)
    assert executed[3:] == ["01_data_prep", "05_long_tail"]
    assert [t["skipped"] for t in timings] == [False, False]


def test_a_whole_run_in_a_fresh_checkout_starts_the_committed_results_over(isolated_runs, monkeypatch):
    """A fresh clone holds committed results but no stage markers: a whole run recomputes every
    model instead of skipping the committed rows; once a stage has run, nothing is removed."""
    import papermill as pm

    monkeypatch.setattr(pm, "execute_notebook", lambda source, out, **kw: Path(out).write_text("{}"))
    spec = isolated_runs / "clone.yaml"
    spec.write_text(yaml.safe_dump({"dataset": "ml-100k", "profile": "quick", "notebooks": ["05_long_tail"]}))
    run = run_dir("clone")
    committed = {run.metrics_csv: "dataset,backbone\n", run.results / "srs_inputs.json": "{}",
                 run.results / "ranks" / "m" / "ranks.npz": "x", run.results / "05_long_tail.json": "{}"}

    def commit():
        for path, text in committed.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)

    commit()
    execute_run(spec, only=["05_long_tail"])  # one stage on committed results: nothing removed
    assert all(path.exists() for path in committed)
    for marker in (run.results / "stages").glob("*.json"):
        marker.unlink()
    execute_run(spec)
    assert not run.metrics_csv.exists() and not (run.results / "srs_inputs.json").exists()
    assert not (run.results / "ranks").exists()
    assert (run.results / "05_long_tail.json").exists()  # rewritten by its stage, not removed
    commit()
    execute_run(spec, force=True)  # a stage has run here: results are kept
    assert all(path.exists() for path in committed)
