# Two commands are the contract:
#   make reproduce   set up .venv, run the ml-100k reference run (notebooks 01->06), write RESULTS.md
#   make test        set up .venv, then lint, unit tests and every notebook (quick profile, nbval)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
RUN ?= papermill_runs/ml-100k.yaml

.PHONY: venv test reproduce lint bench clean-venv

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

clean-venv:
	rm -rf $(VENV)
