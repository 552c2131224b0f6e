# Two commands on a fresh machine; each sets itself up first (scripts/bootstrap.sh).
#   make run     train on the embedded digits data (10 clients, 5 rounds) -> outputs/...
#   make test    make lint, then the full test suite (what CI runs)
VENV ?= .venv
ARGS ?=
BENCH_OUT ?= docs/performance.md
PYTEST_ARGS ?=

.PHONY: setup run test test-fast lint deadcode bench mutate

setup:
	@bash scripts/bootstrap.sh

run: setup
	$(VENV)/bin/fl-app simulate $(ARGS)

# `make test` lints first (ruff, mypy, the import-layer contracts): CI runs this target.
test: setup lint
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

test-fast: setup
	$(VENV)/bin/python -m pytest -m "not slow" $(PYTEST_ARGS)

# ruff, mypy and lint-imports (the layer contracts in pyproject.toml [tool.importlinter],
# drawn in docs/architecture.md). About 30 s from cold on 2 cores, seconds when warm.
lint: setup
	$(VENV)/bin/ruff check fl_app strategies tests scripts
	$(VENV)/bin/mypy fl_app strategies
	$(VENV)/bin/lint-imports --no-logo

# Dead code: vulture over the code, with tests/scripts/benchmarks as users. Names only a
# framework calls are listed, with the caller, in scripts/vulture_whitelist.py.
deadcode: setup
	$(VENV)/bin/vulture fl_app strategies tests scripts benchmarks scripts/vulture_whitelist.py \
		--min-confidence 60 --exclude 'mutants/'

# The benchmark suite (< 15 min on 2 cores): one Markdown document, written into
# docs/performance.md between its benchmark markers.
# Smoke test: make bench ARGS=--quick BENCH_OUT=/tmp/bench.md
bench: setup
	$(VENV)/bin/python -m benchmarks --out $(BENCH_OUT) $(ARGS)

# Mutation testing of the privacy-critical modules listed under [tool.mutmut] in
# pyproject.toml (noise, clipping, accounting, ledger, budgets, checkpoint/resume checks,
# the audit chain, SecAgg's encoding). Slow: hours for the whole list on 2 cores.
# Scope it with mutmut's name globs, e.g.  make mutate MUTANTS='fl_app.privacy.clipping*'
# Every survivor is killed by a test or listed in tests/mutants-accepted.md with the reason.
MUTANTS ?=
MUTATE_JOBS ?= 2
mutate: setup
	$(VENV)/bin/python -m pip install --quiet 'mutmut>=3.8,<4'
	$(VENV)/bin/mutmut run --max-children $(MUTATE_JOBS) $(MUTANTS)
	$(VENV)/bin/mutmut results
