# One environment for everything; pyproject.toml is the only dependency list.
# VENV is the environment: .venv/ (made with $(PYTHON) if missing) by default, or an existing
# one such as an activated conda environment: make test VENV=$$CONDA_PREFIX.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.optkit-installed
LAB_STAMP := $(VENV)/.optkit-lab-installed
# What is installed into it; environment.yml's pip list is the same (tests/test_env.py).
EXTRAS := dev,cpu
WEIGHTS ?= build/weights
REPORT ?= build/report
JOBS ?= auto
LAB_IP ?= 127.0.0.1
LAB_PORT ?= 8888

.PHONY: install demo test lint format clean chromium lab

$(STAMP): pyproject.toml
	test -x $(PY) || { $(PYTHON) -m venv $(VENV) && $(PY) -m pip install -q -U pip; }
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
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

$(LAB_STAMP): $(STAMP)
	$(PY) -m pip install -q -e ".[$(EXTRAS),lab]"
	touch $(LAB_STAMP)

## JupyterLab on notebooks/, headless, with the kernel "optkit" (this environment's Python,
## the kernel the notebooks name): open the URL with the token that it prints.
lab: $(LAB_STAMP)
	$(PY) -m ipykernel install --sys-prefix --name optkit --display-name "Python (optkit)"
	$(VENV)/bin/jupyter lab notebooks/ --no-browser --ip $(LAB_IP) --port $(LAB_PORT) \
		$$(test "$$(id -u)" != 0 || echo --allow-root)

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
