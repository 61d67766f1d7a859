"""Which managed replica owns each discovery instance, and what Dynamo component each
service really registers as.

A plain ``DynamoGraphDeployment`` says nothing about the component name its workers register under:
Dynamo's decode and aggregated workers register as ``backend``, prefill workers as ``prefill``,
whatever the service is called. So the name is *learnt*, never guessed: an instance belongs to the
replica whose allocated port it advertises, or else to the replica whose process tree holds the
socket listening on its transport address (:func:`connector.dynamo.discovery.cache.match_instance`).
Ownership is decided for every instance of every replica, whatever its readiness kind, so
dead-instance cleanup covers them all.

A decision, once made, is remembered per key, so an entry can still be attributed after its
process is gone (that is when it must be removed). An instance no replica owns is foreign;
the socket search for it is not repeated for :data:`FOREIGN_RECHECK_S`, since it walks the
process trees of every live replica.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Iterable, Mapping

from connector.dynamo.discovery.cache import (
    Instance,
    ReplicaAddress,
    listening_ports,
    match_instance,
)
from connector.reconcile.state import ReplicaRecord
from connector.supervision import procs

# A foreign verdict from the socket search is trusted this long; a replica that registers
# before the connector has recorded its pid is found on the next look.
FOREIGN_RECHECK_S = 5.0


def allocated_ports(rec: ReplicaRecord) -> frozenset[int]:
    ports = (rec.reservation or {}).get("ports") or {}
    return frozenset(int(p) for p in ports.values())


def component_of(replica_id: str) -> str:
    """``Decode/3`` -> ``Decode`` (the graph's service name)."""
    return replica_id.rsplit("/", 1)[0]


class Ownership:
    """Instance key -> replica id, with the Dynamo components learnt per service."""

    def __init__(self) -> None:
        self._owners: dict[str, str] = {}
        self._learnt: dict[str, Counter[str]] = {}  # service -> Dynamo component -> count
        self._foreign_at: dict[str, float] = {}  # key -> when the socket search found none

    def known(self, key: str) -> str | None:
        return self._owners.get(key)

    def record(self, inst: Instance, replica_id: str) -> None:
        if self._owners.get(inst.key) == replica_id:
            return
        self._owners[inst.key] = replica_id
        self._foreign_at.pop(inst.key, None)
        self._learnt.setdefault(component_of(replica_id), Counter())[inst.component] += 1

    def forget(self, key: str) -> None:
        self._owners.pop(key, None)
        self._foreign_at.pop(key, None)

    def by_port(self, inst: Instance, records: Iterable[ReplicaRecord]) -> str | None:
        """The owner as decided earlier, or by allocated port (no I/O)."""
        known = self._owners.get(inst.key)
        if known is not None:
            return known
        addrs = [ReplicaAddress(r.replica_id, allocated_ports(r), frozenset()) for r in records]
        owner = match_instance(inst, addrs)
        if owner is not None:
            self.record(inst, owner)
        return owner

    def recently_foreign(self, key: str) -> bool:
        at = self._foreign_at.get(key)
        return at is not None and time.monotonic() - at < FOREIGN_RECHECK_S

    async def by_socket(self, inst: Instance, records: Iterable[ReplicaRecord]) -> str | None:
        """The owner by port, else the replica whose process tree listens on the
        instance's transport port (process trees walked in a thread)."""
        recs = list(records)
        owner = self.by_port(inst, recs)
        if owner is not None or inst.address is None:
            return owner
        live = [r for r in recs if r.pid is not None]
        if not live:
            return None

        def trees() -> tuple[list[ReplicaAddress], dict[int, int]]:
            table = procs.process_tree()
            addrs = [
                ReplicaAddress(r.replica_id, allocated_ports(r), frozenset(table.of(r.pid)))
                for r in live
                if r.pid is not None
            ]
            return addrs, listening_ports(pid for a in addrs for pid in a.pids)

        addrs, listeners = await asyncio.to_thread(trees)
        owner = match_instance(inst, addrs, listeners)
        if owner is None:
            self._foreign_at[inst.key] = time.monotonic()
        else:
            self.record(inst, owner)
        return owner

    def learnt_component(self, service: str) -> str | None:
        """The Dynamo component the service's replicas registered as most often."""
        seen = self._learnt.get(service)
        return seen.most_common(1)[0][0] if seen else None

    def learnt(self) -> Mapping[str, str]:
        """Service -> learnt Dynamo component, for every service seen registering."""
        return {svc: c.most_common(1)[0][0] for svc, c in self._learnt.items() if c}
