# megagsm: two commands on a fresh machine.
#   make demo   - set up, then run the CPU demo (SFT then GSPO on a tiny model, 2 processes)
#   make test   - set up, then run the test suite
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup test test-slow mutate demo clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e .
	@touch $(STAMP)

test: setup
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

test-slow: setup
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -m slow $(PYTEST_ARGS)

# mutation testing of the core modules (not part of `make test`); MUTATE_ARGS e.g. --module megagsm/rl/losses.py
mutate: setup
	OMP_NUM_THREADS=1 $(PY) -m megagsm.testing.mutate --max-mutants 10 --jobs 2 --json runs/mutate/report.json $(MUTATE_ARGS)

demo: setup
	$(PY) -m megagsm.demo

clean:
	rm -rf runs/ .pytest_cache
