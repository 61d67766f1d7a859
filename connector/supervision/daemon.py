"""The circusd one connector talks to, over its lifetime: attached (an external one, or the
one a killed connector left running, as the state recorded it) or started, its command
channel, its pub/sub events, a new one after a death, and the stop.

Kept apart from :mod:`connector.supervision.circus` (the mechanics: the process, the
channel, the subscription) so that the façade holds one object for "our circusd" instead
of four fields and the rules tying them together.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from connector.supervision.circus import (
    CircusChannel,
    CircusdInfo,
    CircusEvents,
    EventHandler,
    start_circusd,
    stop_circusd,
)


class CircusSupervisor:
    """circusd for one connector. ``endpoint``: an external circusd to attach to instead of
    owning one (``pubsub_endpoint`` its event stream, if any)."""

    def __init__(
        self,
        run_dir: Path,
        *,
        check_delay_s: float,
        endpoint: str | None = None,
        pubsub_endpoint: str | None = None,
    ) -> None:
        self.run_dir = run_dir
        self.check_delay_s = check_delay_s
        self.endpoint = endpoint
        self.pubsub_endpoint = pubsub_endpoint
        self.info: CircusdInfo | None = None
        self.channel: CircusChannel | None = None
        # Whether this connector started the circusd it runs on now (a failed start must
        # not leave it behind; one re-attached to keeps the replicas it already had).
        self.started = False
        self._events: CircusEvents | None = None
        self._subscription: tuple[str, EventHandler, frozenset[str] | None] | None = None

    async def attach(self, recorded: Mapping[str, Any] | None) -> CircusdInfo:
        """Attach to the external circusd, else to the recorded one if it is ours and alive
        (it kept our replicas running), else start one; then check that it answers."""
        if self.endpoint:
            self.info = CircusdInfo(self.endpoint, self.pubsub_endpoint or "", owned=False)
        else:
            previous = CircusdInfo.from_dict(dict(recorded)) if recorded else None
            if previous is not None and previous.owned and previous.process_alive():
                self.info = previous
            else:
                self.info = await start_circusd(self.run_dir, check_delay=self.check_delay_s)
                self.started = True
        self.channel = CircusChannel(self.info.endpoint)
        await self.channel.call("list")  # fail now, clearly, if it does not answer
        return self.info

    def subscribe(
        self, prefix: str, handler: EventHandler, events: frozenset[str] | None = None
    ) -> None:
        """Receive the ``events`` (all when None) of watchers named ``prefix*``, again
        after a restart."""
        self._subscription = (prefix, handler, events)
        self._start_events()

    def _start_events(self) -> None:
        if self.info is None or not self.info.pubsub_endpoint or self._subscription is None:
            return
        if self._events is not None:
            return
        prefix, handler, events = self._subscription
        self._events = CircusEvents(self.info.pubsub_endpoint, prefix, handler, events)
        self._events.start()

    def alive(self) -> bool:
        """False only when the circusd we own has died (an external one is not ours to
        judge: its channel says when it is gone)."""
        info = self.info
        return info is None or not info.owned or info.process_alive()

    async def restart(self) -> CircusChannel:
        """A new circusd after ours died: fresh channel, events subscribed again."""
        await self._stop_events()
        if self.channel is not None:
            self.channel.close()
        self.info = await start_circusd(self.run_dir, check_delay=self.check_delay_s)
        self.channel = CircusChannel(self.info.endpoint)
        self._start_events()
        return self.channel

    async def close(self, *, detach: bool) -> bool:
        """Stop listening and close the channel; unless ``detach``, also stop the circusd we
        own (its replicas die with it). True when a circusd was stopped."""
        await self._stop_events()
        stopped = False
        if not detach and self.info is not None and self.info.owned:
            await stop_circusd(self.info, self.channel)
            stopped = True
        if self.channel is not None:
            self.channel.close()
        return stopped

    async def _stop_events(self) -> None:
        if self._events is not None:
            await self._events.stop()
            self._events = None
