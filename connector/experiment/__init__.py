"""Scaling experiments: drive a running graph with load phases (aiperf), sample what it does
every second, and write a timeline, a summary and a report to look at.

``dynamo-local experiment PLAN.yaml`` (:mod:`connector.experiment.command`). The
experiment is a client of the HTTP API, as the CLI is: it never imports the connector's
internals (an import-linter contract says so).

- :mod:`~connector.experiment.plan`: the plan file, validated with errors that name the field
- :mod:`~connector.experiment.aiperf`: aiperf's config per run of phases, the subprocess
- :mod:`~connector.experiment.metrics`: the frontend's figures from its metrics or PromQL
- :mod:`~connector.experiment.sampler`: the sampling loop
- :mod:`~connector.experiment.timeline`: a sample, the CSV
- :mod:`~connector.experiment.summary`: the figures (pure functions)
- :mod:`~connector.experiment.report`: the HTML report (plotly)
- :mod:`~connector.experiment.runner`: one experiment, start to run folder
"""
