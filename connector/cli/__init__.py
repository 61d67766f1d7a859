"""The ``dynamo-local`` command: its parser and subcommands, the ``up`` composition
root (the one place that wires connector and exporter together) and its tables. ``main`` is
the console script's entry point (``connector.cli:main``)."""

from connector.cli.program import main

__all__ = ["main"]
