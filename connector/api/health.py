"""Readiness checks behind ``GET /readyz``: is the supervisor answering, is discovery reachable.

Each check has its own deadline and runs concurrently, so a hung dependency makes
``/readyz`` answer 503 in about ``timeout_s`` instead of hanging the probe.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING

from connector.errors import ConnectorError

if TYPE_CHECKING:
    from connector.local import LocalConnector


@dataclass(frozen=True)
class Check:
    ok: bool
    detail: str

    def to_dict(self) -> dict[str, object]:
        return {"ok": self.ok, "detail": self.detail}


async def supervisor_check(connector: LocalConnector, timeout_s: float) -> Check:
    """circusd answers ``list`` on the connector's own serialized channel, so "ready" means
    our commands get through, not merely that some socket answers."""
    try:
        reply = await asyncio.wait_for(connector.ping_supervisor(timeout_s), timeout_s + 0.5)
    except ConnectorError as exc:
        return Check(False, exc.message)
    except TimeoutError:
        return Check(False, f"circusd did not answer 'list' within {timeout_s:g} s")
    except Exception as exc:
        return Check(False, f"circusd 'list' failed: {exc}")
    watchers = reply.get("watchers", [])
    count = len(watchers) if isinstance(watchers, list) else 0
    return Check(True, f"circusd answered at {reply['endpoint']} ({count} watchers)")


async def discovery_check(connector: LocalConnector, timeout_s: float) -> Check | None:
    """The configured discovery backend answers (``Discovery.healthy``); None when off."""
    options = connector.options
    if options.discovery == "none":
        return None
    interop = connector.interop
    discovery = interop.discovery if interop is not None else None
    if options.discovery == "etcd":
        where = options.etcd_url
    else:
        where = str(options.file_kv or connector.working_dir / "discovery")
    label = f"{options.discovery} discovery" + (f" at {where}" if where else "")
    if discovery is None:
        return Check(False, f"{label} is configured but not running")
    try:
        healthy = await asyncio.wait_for(discovery.healthy(), timeout_s)
    except TimeoutError:
        return Check(False, f"{label} did not answer within {timeout_s:g} s")
    except Exception as exc:
        return Check(False, f"{label} failed: {exc}")
    return Check(True, f"{label} is healthy") if healthy else Check(False, f"{label} is down")


async def readiness(connector: LocalConnector, timeout_s: float) -> dict[str, Check]:
    supervisor, discovery = await asyncio.gather(
        supervisor_check(connector, timeout_s), discovery_check(connector, timeout_s)
    )
    checks = {"supervisor": supervisor}
    if discovery is not None:
        checks["discovery"] = discovery
    return checks
