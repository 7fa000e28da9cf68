# The two commands a fresh machine needs: `make dev` runs moonq, `make test` checks it.
# Both create the virtualenv and install what they need: `make dev` moonq alone, everything
# else moonq with its test tools (the `dev` extra).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TOOLS := $(VENV)/.installed
RUNTIME := $(VENV)/.installed-runtime

.PHONY: install dev test lint format typecheck pytest bench chaos screenshots clean

$(BIN)/pip:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# A current install with the dev extra includes the runtime: nothing more to install.
$(RUNTIME): pyproject.toml | $(BIN)/pip
	[ $(TOOLS) -nt pyproject.toml ] || $(BIN)/pip install --quiet -e .
	touch $(RUNTIME)

$(TOOLS): pyproject.toml | $(BIN)/pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(TOOLS) $(RUNTIME)

install: $(TOOLS)

dev: $(RUNTIME)
	$(BIN)/moonq dev

test: lint typecheck pytest

lint: $(TOOLS)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(TOOLS)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

typecheck: $(TOOLS)
	$(BIN)/mypy

# Two processes, a test file each at a time: most tests wait on sockets and processes, so the
# suite takes ~3/4 of the time on two cores (`make chaos` runs its slow tests one at a time).
pytest: $(TOOLS)
	$(BIN)/pytest -n 2 --dist loadfile

bench: $(TOOLS)
	$(BIN)/python -m bench.run
	$(BIN)/python -m bench.batch
	$(BIN)/python -m bench.dashboard

# The dashboard's screenshots in docs/, which the README shows (needs Debian's chromium).
screenshots: $(TOOLS)
	MOONQ_SCREENSHOTS=1 $(BIN)/pytest tests/test_dashboard_browser.py -q

# The full fault suite: 500 jobs, upstream faults, workers SIGKILLed and stalled, Redis stalled
# (a redis-server of its own; `--redis-url URL` runs it on another Redis, without Redis stalls).
chaos: $(TOOLS)
	$(BIN)/pytest -m slow
	$(BIN)/python -m tests.chaos

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
