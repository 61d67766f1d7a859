"""Wires Dynamo interop (discovery, Planner executor, prefill queue) into a connector."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from connector.local import LocalConnector


async def start_interop(connector: LocalConnector) -> list[Any]:
    return []
