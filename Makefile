# Two commands are the contract:
#   make reproduce   set up .venv, run the ml-100k reference run (notebooks 01->06), write RESULTS.md
#   make test        set up .venv, then lint, unit tests and every notebook (quick profile, nbval)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
RUN ?= papermill_runs/ml-100k.yaml

.PHONY: venv test reproduce lint bench bench-env clean-venv

$(STAMP): requirements.txt requirements-nodeps.txt constraints.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements.txt -c constraints.txt
	$(PY) -m pip install --quiet --no-deps -r requirements-nodeps.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $(STAMP)

venv: $(STAMP)

lint: $(STAMP)
	$(PY) -m ruff check .

# Unit tests, then every notebook executed by nbval in the quick profile into a temporary
# run root (cells marked NBVAL_CHECK_OUTPUT must reproduce their committed output).
test: $(STAMP)
	$(PY) -m ruff check .
	@tmp=$$(mktemp -d -t reaemb-test.XXXXXX); \
	REAEMB_PROFILE=quick REAEMB_RUNS_DIR=$$tmp/runs REAEMB_FIGURES_DIR=$$tmp/figures \
	  $(PY) -m pytest tests notebooks --nbval-lax -p no:cacheprovider; \
	status=$$?; rm -rf $$tmp; exit $$status

reproduce: $(STAMP)
	$(PY) -m reaemb.runs $(RUN)
	$(PY) -m reaemb.report

bench: $(STAMP)
	@for b in bench/bench_*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

# RecBole 1.2.1 (the reference of bench/bench_srs.py) needs numpy < 2: its own environment.
RECBOLE_VENV := .venv-recbole
$(RECBOLE_VENV)/.installed:
	$(PYTHON) -m venv $(RECBOLE_VENV)
	$(RECBOLE_VENV)/bin/pip install --quiet torch==2.13.0 recbole==1.2.1 numpy==1.26.4 pandas==2.2.3 \
	  scipy==1.13.1 scikit-learn==1.5.2 "setuptools<81"
	touch $@

bench-env: $(RECBOLE_VENV)/.installed

clean-venv:
	rm -rf $(VENV)
