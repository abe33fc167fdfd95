# Two entry points (see README): `make run` and `make test`. Both create .venv on first use.
PYTHON ?= python3
# The CPU build of torch on this project's machines; users with a GPU can pass TORCH_SPEC=torch
# (any release that satisfies pyproject's range) to keep their CUDA build.
TORCH_SPEC ?= torch==2.13.0
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
# DVC stage commands call `python`: make it the project's interpreter.
export PATH := $(BIN):$(PATH)
export MLFLOW_SKIP_PIP_REQUIREMENTS_CHECK := true

.PHONY: setup run test test-fast fuzz lint typecheck clean

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch first, so that resolving the project does not pull another torch build
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

run: setup
	dvc repro
	@echo
	@cat data/decide/decision.json | $(BIN)/python -c "import json,sys; d=json.load(sys.stdin); print('decision:', d['verdict'], d['candidate'] or '', '-', '; '.join(d['reasons']))"

# on pytest-xdist workers, one per core and at most 4: the suite is mostly single-threaded (imports, DVC, servers); tests
# that share an expensive fixture stay on one worker (tests/conftest.py, shared_fixture_group), and the worker holding the
# session's `dvc repro` is the critical path, so more workers would add memory, not speed
XDIST := -n auto --maxprocesses 4 --dist loadgroup

test: setup
	$(BIN)/python -m pytest $(XDIST) --durations=15

lint: setup
	$(BIN)/ruff check rcat stages pipelines benchmarks tests

typecheck: setup
	$(BIN)/mypy rcat

# the inner loop: everything but the end-to-end runs marked slow
test-fast: setup
	$(BIN)/python -m pytest $(XDIST) -m "not slow"

# the property-based tests with many more examples than the suite's 40 per test (seeded: reproducible)
FUZZ_EXAMPLES ?= 2000
fuzz: setup
	RCAT_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(BIN)/python -m pytest tests/test_fuzz.py -p no:cacheprovider --hypothesis-show-statistics -q

clean:
	rm -rf data/prepared data/models data/attack_cache data/finetune data/evaluate data/decide mlflow.db mlruns mlartifacts
