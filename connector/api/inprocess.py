"""The connector read as the HTTP API answers, without HTTP: what an experiment started
through the API and the status page's live timeline sample with.

:mod:`connector.experiment` is a client of the API (a contract keeps it off the connector's
internals); its sampler and runner take anything with the read calls of
:class:`connector.client.Client` (``experiment.sampler.GraphApi``). Inside the server that
is this class: the same JSON as ``GET /v1/components``, ``/v1/components/{name}``,
``/v1/components/{name}/metrics`` and ``/v1/events``, built by the same functions, but
without a request to itself each second (no loopback round trips, nothing that depends on
the address or token the server was started with).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from connector.api.views import component_json, replica_json, require_component, sorted_replicas

if TYPE_CHECKING:
    from connector.local import LocalConnector


class InProcessApi:
    def __init__(self, connector: LocalConnector) -> None:
        self.connector = connector

    async def components(self) -> dict[str, Any]:
        view = self.connector.view()
        return {
            "namespace": view.namespace,
            "components": [component_json(c) for c in view.components],
        }

    async def component(self, name: str) -> dict[str, Any]:
        view = self.connector.view()
        found = require_component(view, name, self.connector.graph.name)
        return {
            "component": component_json(found),
            "replicas": [replica_json(r) for r in sorted_replicas(view, name)],
        }

    async def metrics(self, name: str) -> dict[str, Any]:
        return await self.connector.get_component_metrics(name)

    async def events(self, since: int = 0, limit: int | None = None) -> dict[str, Any]:
        log = self.connector.events
        return {
            "events": [e.to_dict() for e in log.since(since, limit)],
            "last_seq": log.last_seq,
        }
