"""Shared pytest set-up: the real-server fixtures of :mod:`tests.servers` and the real-Dynamo
fixtures of :mod:`tests.dynamo_helpers`."""

pytest_plugins = ["tests.servers", "tests.dynamo_helpers"]
