# megagsm: two commands on a fresh machine.
#   make demo   - set up, then run the CPU demo (SFT then GSPO on a tiny model, 2 processes)
#   make test   - set up, then run the test suite (two pytest workers, one per core; a test file
#                 stays on one worker so its module-scoped launches run once)
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup test test-slow mutate demo clean gpu-check

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	@touch $(STAMP)

test: setup
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -m "not slow" -n 2 --dist loadfile $(PYTEST_ARGS)

test-slow: setup
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -m slow $(PYTEST_ARGS)

# mutation testing of the core modules (not part of `make test`); MUTATE_ARGS e.g. --module megagsm/rl/losses.py
mutate: setup
	OMP_NUM_THREADS=1 $(PY) -m megagsm.testing.mutate --max-mutants 10 --jobs 2 --json runs/mutate/report.json $(MUTATE_ARGS)

demo: setup
	$(PY) -m megagsm.demo

# on a machine with one H100/H200 and its own CUDA torch (not .venv's CPU torch): tests marked gpu, then
# the SFT MFU, decode-roofline and GSPO-step benchmarks (scripts/gpu_check.sh); without a GPU: one line
gpu-check:
	bash scripts/gpu_check.sh

clean:
	rm -rf runs/ .pytest_cache
