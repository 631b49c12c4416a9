# One-command entry points; see README.md.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fedray-installed
# CPU machines take the local CPU torch wheel; GPU machines resolve CUDA torch freely.
TORCH_CONSTRAINT := $(if $(shell command -v nvidia-smi),,-c constraints/cpu.txt)

.PHONY: install test run lint clean peer-env bigbench

install: $(STAMP)

$(STAMP): pyproject.toml constraints/cpu.txt constraints/data.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_CONSTRAINT) -e '.[dev]'
	$(PY) -m pip install --quiet --no-deps -r constraints/data.txt
	touch $(STAMP)

# The Flower peer of the system benchmark (benchmarks/peers/): its own venv, because
# flwr[simulation] pins an older ray than .venv's. Not a runtime dependency of fedray.
PEER_VENV ?= .venv-peer
PEER_STAMP := $(PEER_VENV)/.peer-installed
# flwr 1.42.0 (same ray pin) needs certifi>=2026.10.19, which the package index here lacks;
# where it has it: make peer-env FLWR_VERSION=1.42.0
FLWR_VERSION ?= 1.41.0

peer-env: $(PEER_STAMP)

$(PEER_STAMP): pyproject.toml constraints/cpu.txt constraints/data.txt
	test -x $(PEER_VENV)/bin/python || python3 -m venv $(PEER_VENV)
	$(PEER_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(PEER_VENV)/bin/python -m pip install --quiet $(TORCH_CONSTRAINT) -e '.[peer]' 'flwr[simulation]==$(FLWR_VERSION)'
	$(PEER_VENV)/bin/python -m pip install --quiet --no-deps -r constraints/data.txt
	$(PEER_VENV)/bin/python -c 'import flwr, fedray, ray; print("peer env: flwr", flwr.__version__, "ray", ray.__version__)'
	touch $(PEER_STAMP)

# BIG-bench tasks (dataset: bigbench): the bigbench sdist into fedray's cache, once; opt-in,
# never part of install (358 MB). See README.md, "Data".
bigbench: install
	$(PY) -m fedray.data.bigbench fetch

test: install
	$(VENV)/bin/ruff check fedray tests benchmarks
	$(PY) -m pytest -q --durations=15

run: install
	$(VENV)/bin/fedray run jobs/quickstart.yaml

lint: install
	$(VENV)/bin/ruff check fedray tests benchmarks
	$(VENV)/bin/ruff format --check fedray tests benchmarks

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
