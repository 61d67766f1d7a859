"""Policies: the KEDA ``ScaledObject`` a user deploys to a cluster, run against the local
graph (``dynamo-local up GRAPH --scaledobject FILE``).

One module per job: :mod:`~connector.policy.scaledobject` reads and validates the file,
:mod:`~connector.policy.binding` ties it to a graph service (one driver per component),
:mod:`~connector.policy.hpa` and :mod:`~connector.policy.keda` are the algorithms as pure
functions, :mod:`~connector.policy.prometheus` queries Prometheus,
:mod:`~connector.policy.explain` words the decisions, and :mod:`~connector.policy.driver`
runs the poll loops. :mod:`connector.interop` starts the drivers with the connector.
"""
