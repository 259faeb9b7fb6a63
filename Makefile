# Two commands on a fresh clone: `make demo` and `make test`. Both create .venv themselves.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-oldest test-newest docs lint format bench bench-gpu clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python examples/poisson_1d.py

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

# The declared dependency ranges at both ends (not in CI: several GB of CUDA wheels each).
test-oldest:
	bash tools/test_versions.sh oldest

test-newest:
	bash tools/test_versions.sh newest

DOCS_STAMP := $(VENV)/.docs-installed

$(DOCS_STAMP): $(STAMP)
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[docs]"
	touch $(DOCS_STAMP)

# The documentation site, warnings as errors; the gallery examples run on the CPU (~1 minute).
docs: $(DOCS_STAMP)
	$(BIN)/python -m sphinx -b html -W --keep-going -q docs docs/_build/html
	$(BIN)/python docs/check_links.py docs/_build/html
	@echo "Open docs/_build/html/index.html"

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# The prepared GPU check (benchmarks/gpu.py, < 5 minutes): on a machine with CUDA, torch and lightning
# installed (no .venv needed); writes gpu_table.md.
bench-gpu:
	PYTHONPATH=. $(PYTHON) benchmarks/gpu.py --out gpu_table.md
	PYTHONPATH=. $(PYTHON) benchmarks/derivatives_cost.py --device cuda --points 1024 16384
	PYTHONPATH=. $(PYTHON) benchmarks/gauss_newton_cost.py --device cuda --repeats 3 --no-cg
	PYTHONPATH=. $(PYTHON) benchmarks/gauss_newton_cost.py --device cuda --repeats 3 --no-cg --dtype float32

clean:
	rm -rf $(VENV) .venv-oldest .venv-newest lightning_logs .pytest_cache docs/_build docs/auto_examples docs/sg_execution_times.rst
