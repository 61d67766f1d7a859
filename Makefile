# The two commands a fresh machine needs: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
GRAPH ?= examples/demo.yaml

.PHONY: demo test lint pytest bench setup clean

setup:
	scripts/setup.sh

## Sets up and runs the demo graph (mock workers, no GPU, no Docker, no etcd) in the foreground.
demo: setup
	$(VENV)/bin/dynamo-local up $(GRAPH)

## Sets up everything (virtualenv, Debian packages for real servers) and runs lint + the suite.
test:
	scripts/setup.sh --test
	$(MAKE) lint
	$(MAKE) pytest

lint:
	$(VENV)/bin/ruff check connector exporter tests bench
	$(VENV)/bin/ruff format --check connector exporter tests bench
	$(VENV)/bin/mypy

pytest:
	scripts/run-pytest.sh

bench:
	scripts/setup.sh --test --bench
	$(PY) -m bench

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
