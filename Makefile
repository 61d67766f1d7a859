# The two commands a fresh machine needs: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
GRAPH ?= examples/dynamo.yaml
# Extra `dynamo-local up` flags, e.g. make demo UP_ARGS="--port 0".
UP_ARGS ?=

.PHONY: demo test lint pytest bench setup clean

setup:
	scripts/setup.sh

## Sets up and runs the demo graph in the foreground: the real Dynamo (frontend, mocker
## prefill and decode workers, Planner) on a tiny offline model, no GPU; Ctrl-C stops it.
## The model folder (examples/models/, not committed) is written once; the graph finds it
## through its workingDir, so `up` works from any directory.
demo: setup
	$(PY) -m connector.dynamo.tiny_model examples/models >/dev/null
	$(VENV)/bin/dynamo-local up $(GRAPH) $(UP_ARGS)

## Sets up everything (virtualenv, Debian packages for real servers) and runs lint + the suite.
test:
	scripts/setup.sh --test
	$(MAKE) lint
	$(MAKE) pytest

lint:
	$(VENV)/bin/ruff check connector exporter tests bench
	$(VENV)/bin/ruff format --check connector exporter tests bench
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

pytest:
	scripts/run-pytest.sh

bench:
	scripts/setup.sh --test --bench
	$(PY) -m bench

clean:
	rm -rf $(VENV) .venv-aiperf .pytest_cache .mypy_cache .ruff_cache
