# The README's two commands: `make run` and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Stage commands in dvc.yaml call `python`: make it the venv's.
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

# apt-get needs root: sudo when make is not run as root.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: install system-deps run paper test ui lint bench clean cluster-up cluster-down

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

## System packages: Debian's chromium, which renders the paper report headless in its test.
system-deps:
	command -v chromium >/dev/null || ($(SUDO) apt-get update && $(SUDO) apt-get install -y chromium)

## Run the whole DVC pipeline on the embedded sample, then print the results.
run: $(STAMP)
	test -d .dvc || dvc init -q
	dvc repro
	$(PY) -m cli.report

## The paper's ablations and Figure 1 as DVC experiments on the sample, then reports/paper.{md,html};
## PARAMS=params-imagenet.yaml runs them on that file's params instead.
paper: $(STAMP)
	test -d .dvc || dvc init -q
	$(PY) -m cli.paper $(if $(PARAMS),--params $(PARAMS))

## The whole test suite (real Ray, MLflow, DVC on tiny generated data), two files at a time:
## the tests wait on servers, Ray start-ups and checkpoints for much of their time.
test: $(STAMP) system-deps
	$(PY) -m pytest -q -n 2 --dist loadfile

## The MLflow UI over the local store, on 127.0.0.1 only.
# Without mlflow server's job runner: seven processes the UI of our runs never uses.
ui: export MLFLOW_SERVER_ENABLE_JOB_EXECUTION = false
ui: $(STAMP)
	mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db --host 127.0.0.1 --port 5000

## A real multi-node Ray cluster on this machine (root): a head and WORKERS worker nodes, each
## `ray start` in its own network namespace; writes cluster.env. See cli/localcluster.py.
WORKERS ?= 1
CPUS_PER_NODE ?= 2
cluster-up: $(STAMP)
	$(PY) -m cli.localcluster up --services --workers $(WORKERS) --cpus-per-node $(CPUS_PER_NODE)

## Stops every process cluster-up started, removes its namespaces, links, temp dirs and cluster.env.
cluster-down: $(STAMP)
	$(PY) -m cli.localcluster down

lint: $(STAMP)
	ruff check pipeline stages models cli tests benchmarks

bench: $(STAMP)
	$(PY) benchmarks/model.py
	$(PY) benchmarks/preprocess.py
	$(PY) benchmarks/input_pipeline.py
	$(PY) benchmarks/train_overhead.py
	$(PY) benchmarks/archives.py
	$(PY) benchmarks/peers_write.py
	$(PY) benchmarks/peers_read.py
	$(PY) benchmarks/scaling.py
	$(PY) benchmarks/scale.py

clean:
	rm -rf data artifacts metrics plots mlflow.db mlruns reports
