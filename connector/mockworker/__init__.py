"""A pure-Python stand-in for a Dynamo worker: ``python -m connector.mockworker``.

It registers in Dynamo's discovery (file backend or etcd with a kept-alive lease, in the exact
formats of :mod:`connector.dynamo.discovery.keys`), serves ``/metrics`` (``dynamo_component_*``, and
``dynamo_frontend_*`` for ``--role frontend``) and ``/health`` on ``DYN_SYSTEM_PORT`` (a frontend
also on ``DYN_HTTP_PORT``, where the real frontend serves its ``/metrics``), listens on its
advertised request-plane port, deregisters on SIGTERM within ``--grace``, and leaves its entry
behind when killed or crashing, like the real runtime. Options add a start-up delay, a crash after N
seconds, CPU burn, memory ballast and a NATS JetStream prefill-queue role; ``--use-dynamo-runtime``
registers through the real ``ai-dynamo-runtime`` package instead. ``--help`` lists every flag and
the environment variable behind it.

Modules: :mod:`.config` (flags and environment), :mod:`.registry` (discovery entries),
:mod:`.metrics` (series and simulated requests), :mod:`.http` (system server),
:mod:`.load` (CPU and memory), :mod:`.queue` (JetStream), :mod:`.dynamo_runtime` (the real
runtime), :mod:`.app` (life cycle and exit behaviour).
"""

from connector.mockworker.app import MockWorker, main
from connector.mockworker.config import MockConfig, parse_config

__all__ = ["MockConfig", "MockWorker", "main", "parse_config"]
