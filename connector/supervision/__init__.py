"""Processes and Circus: the circusd the connector owns and its command
channel, process trees, the launcher that ties a replica to its supervisor, logs and
readiness probes. Imports only the graph."""
