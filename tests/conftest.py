"""Shared pytest set-up: the real-server fixtures of :mod:`tests.servers`."""

pytest_plugins = ["tests.servers"]
