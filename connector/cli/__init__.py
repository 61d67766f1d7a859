"""The ``dynamo-local`` command: its parser and subcommands, the ``up`` composition
root (the one place that wires connector and exporter together) and its tables."""
