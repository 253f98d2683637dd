# One virtualenv (.venv) for everything; pyproject.toml is the only dependency list.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
WEIGHTS ?= build/weights
REPORT ?= build/report
JOBS ?= auto

.PHONY: install demo test lint format clean chromium

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -U pip
	$(PY) -m pip install -q -e ".[dev,cpu]"
	touch $(STAMP)

install: $(STAMP)

## The main job on the embedded default model (random opt-125m weights, optkit's tokenizer):
## the papermill benchmark sweep (notebooks/03_benchmark_sweep.ipynb), JAX vs HF PyTorch at
## batch sizes 1-8, written to $(REPORT)/: report.html, sweep.csv/.jsonl and PNG plots.
## OMP_WAIT_POLICY=PASSIVE: torch's spinning OpenMP threads slow it down several times on a
## CPU shared with other work (recorded in every row).
demo: $(STAMP)
	@test -d $(WEIGHTS)/opt-125m-np || $(VENV)/bin/optkit random-weights $(WEIGHTS)/opt-125m-np --model opt-125m
	rm -rf $(REPORT)
	OMP_WAIT_POLICY=PASSIVE $(VENV)/bin/optkit bench report --output-dir $(REPORT) \
		-p model opt-125m -p path $(WEIGHTS)

## Debian's chromium, which the web-page tests drive through Playwright (installed if missing).
chromium:
	@test -x /usr/bin/chromium || ! command -v apt-get >/dev/null || { \
	  SUDO=$$(test "$$(id -u)" = 0 || echo sudo); \
	  $$SUDO apt-get install -y chromium || { $$SUDO apt-get update && $$SUDO apt-get install -y chromium; }; }

## The whole test suite (exit code 5, "no tests collected", fails like any other error).
## --dist loadgroup: tests marked xdist_group("name") share one worker (and its compiled model).
test: $(STAMP) chromium
	$(PY) -m pytest -n $(JOBS) --dist loadgroup -q

lint: $(STAMP)
	$(VENV)/bin/ruff check optkit tests benchmarks

format: $(STAMP)
	$(VENV)/bin/ruff check --fix optkit tests benchmarks

clean:
	rm -rf build .pytest_cache
