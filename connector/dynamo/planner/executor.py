"""The Dynamo Planner's "virtual connector" executor: its decisions read from etcd, applied
(:func:`connector.dynamo.planner.targets.apply_decision`) and acknowledged.

The Planner in *virtual* mode does not scale anything itself. Its coordinator writes the
decision into etcd under ``v1/{ns}/planner/`` (Dynamo's
``VirtualConnectorCoordinator``): first the counts that changed (``num_prefill_workers``,
``num_decode_workers``, decimal strings), then ``decision_id`` (0, 1, 2, ...). Before its
next decision it waits until ``scaled_decision_id`` >= ``decision_id``.

:class:`VirtualConnectorExecutor` is the other side: it watches the prefix, hands every new
decision to an ``apply`` callback (which scales the graph's prefill and decode components)
and then writes ``scaled_decision_id``, bound to a lease of its own that it keeps alive, so
the acknowledgement disappears when the connector does.

**Every decision is acknowledged, also one that failed or was met only in part** (not
enough GPUs, a component in crash loop). The Planner cannot tell "not done yet" from "cannot
be done": an unacknowledged decision just stalls it until its own timeout, after which it
proceeds anyway, having learnt nothing. Acknowledging at once lets it observe the counts
that really run (through its metrics and ``get_actual_worker_counts``) and decide again;
what could not be met is recorded as a ``decision`` event with outcome ``partial`` or
``failed`` and the reason, where people and alerts see it.

Decisions that arrive while one is being applied are coalesced: when the current one is
done, the executor reads the keys again and applies only the newest. Two are never applied
at the same time.

What it has seen and what it has acknowledged are in :meth:`VirtualConnectorExecutor.status`
(``decision_id``, ``decision_seen_at``, ``acknowledged``), which the exporter publishes as
``dynamo_local_planner_decision_*``: a seen id above the acknowledged one is a Planner
waiting on us.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aetcd

from connector.dynamo.discovery.etcd import ETCD_CLIENT_OPTIONS, etcd_endpoint
from connector.dynamo.planner.targets import DecisionOutcome
from connector.errors import (
    DiscoveryUnavailable,
)
from connector.events import EventLog

__all__ = ["PlannerDecision", "SeenDecision", "VirtualConnectorExecutor"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PlannerDecision:
    """The Planner's keys as read in one etcd request."""

    decision_id: int
    num_prefill_workers: int | None
    num_decode_workers: int | None
    create_revision: int  # of the decision_id key: a new Planner re-creates it
    errors: tuple[str, ...] = ()  # keys whose value is not a decimal integer


@dataclass(frozen=True)
class SeenDecision:
    """The Planner's newest ``decision_id`` as the executor last saw it in etcd."""

    decision_id: int
    create_revision: int  # of the decision_id key: which Planner wrote it
    seen_at: float  # Unix time the executor first saw this id from this Planner


ApplyFn = Callable[[int | None, int | None, int], Awaitable[DecisionOutcome]]


def _parse_count(raw: bytes | None, name: str, errors: list[str]) -> int | None:
    if raw is None:
        return None
    text = raw.decode(errors="replace").strip()
    if text.isdigit():
        return int(text)
    errors.append(f"{name} is not a decimal integer: {text!r}")
    return None


class VirtualConnectorExecutor:
    """Executes the Planner's virtual-connector decisions for one Dynamo namespace."""

    def __init__(
        self,
        etcd_url: str,
        namespace: str,
        apply: ApplyFn,
        events: EventLog | None = None,
        *,
        lease_ttl_s: int = 10,
        rpc_timeout_s: float = 2.0,
        retry_s: float = 0.5,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.etcd_url = etcd_url
        self.namespace = namespace
        self.prefix = f"v1/{namespace}/planner/"
        self.ack_key = self.prefix + "scaled_decision_id"
        self._decision_key = self.prefix + "decision_id"
        self._apply = apply
        self._events = events
        self.lease_ttl_s = lease_ttl_s
        self.rpc_timeout_s = rpc_timeout_s
        self.retry_s = retry_s
        self.host, self.port = etcd_endpoint(etcd_url)
        self._client: Any = None
        self.lease_id: int | None = None
        # (create_revision of decision_id, decision id) last acknowledged.
        self._handled: tuple[int, int] | None = None
        self.last_outcome: DecisionOutcome | None = None
        self.last_decision: PlannerDecision | None = None
        self.applying: int | None = None
        # The decision key as last seen (watch event or listing), and the etcd revision of
        # that observation: replies can arrive out of order, an older one never wins.
        self.seen: SeenDecision | None = None
        self._seen_revision = 0
        self._clock = clock
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._closing = False

    # ---------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        """Connect, take a lease, pick up a decision left pending, then watch."""
        self._client = aetcd.Client(
            self.host, self.port, timeout=self.rpc_timeout_s, options=dict(ETCD_CLIENT_OPTIONS)
        )
        try:
            await self._grant_lease()
            revision = await self._load_baseline()
            watch = await self._client.watch_prefix(
                self.prefix.encode(), start_revision=revision + 1
            )
        except Exception as exc:
            with contextlib.suppress(Exception):
                await self._client.close()
            self._client = None
            raise DiscoveryUnavailable(
                f"Planner executor: etcd at {self.etcd_url} is not reachable: "
                f"{exc or type(exc).__name__}",
                url=self.etcd_url,
            ) from exc
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._watch_loop(watch), name="planner-watch"),
            loop.create_task(self._worker(), name="planner-apply"),
            loop.create_task(self._keepalive(), name="planner-lease"),
        ]
        self._wake.set()  # a decision pending from before we started is handled once

    async def close(self) -> None:
        """Stop; the lease is revoked, so the acknowledgement goes with the executor."""
        self._closing = True
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks = []
        if self._client is not None:
            if self.lease_id is not None:
                with contextlib.suppress(Exception):
                    await self._client.revoke_lease(self.lease_id)
            with contextlib.suppress(Exception):
                await self._client.close()
            self._client = None

    @property
    def running(self) -> bool:
        """Started and not closed."""
        return bool(self._tasks)

    @property
    def acknowledged(self) -> int | None:
        """The newest decision id acknowledged to the Planner whose ``decision_id`` key is in
        etcd now (``None``: none yet; an id acknowledged to a Planner that has since been
        replaced does not count for the new one)."""
        handled, seen = self._handled, self.seen
        if handled is None:
            return None
        if seen is not None and seen.create_revision != handled[0]:
            return None
        return handled[1]

    def status(self) -> dict[str, Any]:
        """For the API, the status page and the exporter (``exporter.sources.parse_planner``).

        ``decision_id``: the newest decision id seen in etcd (``None`` while the Planner has
        written none, or its keys are gone); ``decision_seen_at``: the Unix time it was first
        seen; ``acknowledged``: see :attr:`acknowledged`.
        """
        seen = self.seen
        out: dict[str, Any] = {
            "namespace": self.namespace,
            "prefix": self.prefix,
            "lease_id": self.lease_id,
            "decision_id": seen.decision_id if seen is not None else None,
            "decision_seen_at": seen.seen_at if seen is not None else None,
            "acknowledged": self.acknowledged,
            "applying": self.applying,
        }
        if self.last_decision is not None:
            out["last_decision"] = {
                "decision_id": self.last_decision.decision_id,
                "num_prefill_workers": self.last_decision.num_prefill_workers,
                "num_decode_workers": self.last_decision.num_decode_workers,
            }
        if self.last_outcome is not None:
            out["last_outcome"] = {
                "outcome": self.last_outcome.outcome,
                "reason": self.last_outcome.reason,
                "applied": dict(self.last_outcome.applied),
            }
        return out

    # ------------------------------------------------------------------ reading

    async def _grant_lease(self) -> None:
        lease = await self._client.lease(self.lease_ttl_s)
        self.lease_id = int(lease.id)

    async def _load_baseline(self) -> int:
        """Take an acknowledgement already in etcd (ours from before a restart) as handled,
        re-bound to our lease. Returns the revision the listing was taken at."""
        listing = await self._client.get_prefix(self.prefix.encode())
        values = {kv.key.decode(errors="replace"): kv for kv in listing}
        decision_kv = values.get(self._decision_key)
        self._see_listing(decision_kv, listing)
        ack_kv = values.get(self.ack_key)
        ack = _parse_count(ack_kv.value if ack_kv else None, "scaled_decision_id", [])
        if ack is not None and decision_kv is not None:
            decision = _parse_count(decision_kv.value, "decision_id", [])
            if decision is not None and decision <= ack:
                self._handled = (decision_kv.create_revision, decision)
        if ack is not None:
            # Its old lease dies with the old process; the Planner must keep seeing it.
            await self._client.put(self.ack_key.encode(), str(ack).encode(), lease=self.lease_id)
        return int(listing.header.revision)

    async def _read_decision(self) -> PlannerDecision | None:
        listing = await self._client.get_prefix(self.prefix.encode())
        values = {kv.key.decode(errors="replace"): kv for kv in listing}
        decision_kv = values.get(self._decision_key)
        self._see_listing(decision_kv, listing)
        if decision_kv is None:
            return None
        errors: list[str] = []
        decision_id = _parse_count(decision_kv.value, "decision_id", errors)
        if decision_id is None:
            log.warning("Planner executor: %s: %s", self._decision_key, errors[0])
            return None
        prefill_kv = values.get(self.prefix + "num_prefill_workers")
        decode_kv = values.get(self.prefix + "num_decode_workers")
        return PlannerDecision(
            decision_id=decision_id,
            num_prefill_workers=_parse_count(
                prefill_kv.value if prefill_kv else None, "num_prefill_workers", errors
            ),
            num_decode_workers=_parse_count(
                decode_kv.value if decode_kv else None, "num_decode_workers", errors
            ),
            create_revision=int(decision_kv.create_revision),
            errors=tuple(errors),
        )

    def _see(self, revision: int, decision_id: int | None, create_revision: int = 0) -> None:
        """Record the decision key's state as of etcd ``revision`` (``decision_id`` ``None``:
        no decision: the key is absent or not a decimal integer). Watch events and listings
        may be handled out of order; an observation older than the last one is dropped."""
        if revision < self._seen_revision:
            return
        self._seen_revision = revision
        if decision_id is None:
            self.seen = None
            return
        seen = self.seen
        if seen is not None and (seen.decision_id, seen.create_revision) == (
            decision_id,
            create_revision,
        ):
            return  # the same decision written again: first seen earlier
        self.seen = SeenDecision(decision_id, create_revision, self._clock())

    def _see_kv(self, kv: Any) -> None:
        """The decision key from a watch event's or a listing's key-value."""
        decision_id = _parse_count(kv.value, "decision_id", [])
        self._see(int(kv.mod_revision), decision_id, int(kv.create_revision))

    def _see_listing(self, decision_kv: Any, listing: Any) -> None:
        if decision_kv is not None:
            self._see_kv(decision_kv)
        else:
            self._see(int(listing.header.revision), None)

    def _is_new(self, decision: PlannerDecision) -> bool:
        if self._handled is None:
            return True
        create_revision, decision_id = self._handled
        # A re-created key is a new Planner counting from 0 again.
        return decision.create_revision != create_revision or decision.decision_id > decision_id

    # ------------------------------------------------------------------ loops

    async def _watch_loop(self, watch: Any) -> None:
        while True:
            try:
                async for event in watch:
                    key = event.kv.key.decode(errors="replace")
                    if key != self._decision_key:
                        continue
                    if event.kind == "DELETE":
                        # A DELETE's mod revision is the revision of the deletion.
                        self._see(int(event.kv.mod_revision), None)
                        await self._planner_gone()
                    else:
                        self._see_kv(event.kv)
                    self._wake.set()
            except asyncio.CancelledError:
                with contextlib.suppress(Exception):
                    await watch.cancel()
                raise
            except Exception as exc:
                log.warning("Planner executor: watch on %s broke: %s", self.prefix, exc)
            # Re-list and watch again; a decision missed meanwhile is picked up by the wake.
            watch = await self._rewatch()
            self._wake.set()

    async def _rewatch(self) -> Any:
        while True:
            try:
                listing = await self._client.get_prefix(self.prefix.encode())
                decision_kv = next(
                    (kv for kv in listing if kv.key.decode(errors="replace") == self._decision_key),
                    None,
                )
                self._see_listing(decision_kv, listing)
                if decision_kv is None:
                    await self._planner_gone()
                return await self._client.watch_prefix(
                    self.prefix.encode(), start_revision=int(listing.header.revision) + 1
                )
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.debug("Planner executor: etcd still unreachable: %s", exc)
                await asyncio.sleep(self.retry_s)

    async def _planner_gone(self) -> None:
        """The Planner's keys went with its lease. Drop our acknowledgement, so a Planner that
        starts again (counting from 0) waits for us instead of reading a stale, higher id."""
        if self._handled is None:
            return
        self._handled = None
        with contextlib.suppress(Exception):
            await self._client.delete(self.ack_key.encode())

    async def _worker(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while True:
                try:
                    decision = await self._read_decision()
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    log.warning("Planner executor: reading the decision failed: %s", exc)
                    await asyncio.sleep(self.retry_s)
                    continue
                if decision is None or not self._is_new(decision):
                    break
                await self._handle(decision)

    async def _handle(self, decision: PlannerDecision) -> None:
        self.last_decision = decision
        self.applying = decision.decision_id
        started = time.monotonic()
        try:
            if decision.errors:
                outcome = DecisionOutcome("failed", "; ".join(decision.errors))
            else:
                outcome = await self._apply(
                    decision.num_prefill_workers, decision.num_decode_workers, decision.decision_id
                )
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("Planner executor: applying decision %d failed", decision.decision_id)
            outcome = DecisionOutcome("failed", f"{type(exc).__name__}: {exc}")
        finally:
            self.applying = None
        # Recorded first, then acknowledged: whoever sees the acknowledgement finds the
        # outcome already in the event log.
        self.last_outcome = outcome
        if self._events is not None:
            self._events.emit(
                "decision",
                source="planner",
                outcome=outcome.outcome,
                reason=outcome.reason,
                duration_s=time.monotonic() - started,
                details={
                    "decision_id": decision.decision_id,
                    "num_prefill_workers": decision.num_prefill_workers,
                    "num_decode_workers": decision.num_decode_workers,
                    "applied": dict(outcome.applied),
                },
            )
        await self._acknowledge(decision)

    async def _acknowledge(self, decision: PlannerDecision) -> None:
        """Write ``scaled_decision_id`` on our lease; retried until etcd takes it.

        Only while the Planner that made the decision is still there (its ``decision_id``
        key has the same create revision): an acknowledgement left for a Planner that
        restarted meanwhile (counting from 0 again) would tell it a decision was done that
        we never saw.
        """
        client = self._client
        key = self._decision_key.encode()
        while True:
            try:
                written, _ = await client.transaction(
                    compare=[client.transactions.create(key) == decision.create_revision],
                    success=[
                        client.transactions.put(
                            self.ack_key.encode(),
                            str(decision.decision_id).encode(),
                            lease=self.lease_id,
                        )
                    ],
                    failure=[],
                )
                break
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning(
                    "Planner executor: acknowledging %d failed: %s", decision.decision_id, exc
                )
                await asyncio.sleep(self.retry_s)
        if written:
            self._handled = (decision.create_revision, decision.decision_id)
        else:
            log.info(
                "Planner executor: decision %d not acknowledged: its Planner is gone",
                decision.decision_id,
            )

    async def _keepalive(self) -> None:
        """Refresh the lease at a third of its TTL; if it expired (etcd was away longer than
        the TTL), take a new one and write the acknowledgement again."""
        interval = max(self.lease_ttl_s / 3, 0.1)
        while True:
            await asyncio.sleep(interval)
            try:
                reply = await self._client.refresh_lease(self.lease_id)
                if reply is not None and int(reply.TTL) > 0:
                    continue
                await self._grant_lease()
                if self._handled is not None:
                    await self._client.put(
                        self.ack_key.encode(), str(self._handled[1]).encode(), lease=self.lease_id
                    )
                log.info("Planner executor: lease expired; acknowledgement re-bound to a new lease")
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.debug("Planner executor: lease refresh failed: %s", exc)
