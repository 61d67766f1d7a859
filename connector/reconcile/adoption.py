"""Adoption after a connector restart: persisted records matched with circusd's watchers,
strays stopped, lost replicas restarted, crash loops of changed specs cleared."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from connector.reconcile.replica_actions import ReplicaActions
from connector.supervision import procs
from connector.supervision.circus import CircusCommandError

log = logging.getLogger("connector.reconcile")


class Adoption(ReplicaActions):
    """Taking over what a previous connector left running."""

    async def adopt(self) -> dict[str, list[str]]:
        """Match persisted records with circusd's watchers after a connector restart."""
        report: dict[str, list[str]] = {"adopted": [], "stray": [], "lost": []}
        for problem in self.resources.restore_held_after_stop(self.state.held_after_stop):
            self.events.emit("adopt", outcome="failed", reason=f"held_after_stop {problem}")
        reply = await self.channel.call("list")
        ours = [w for w in reply.get("watchers", []) if w.startswith(self.watcher_prefix)]
        for watcher in ours:
            rec = self.state.replicas.get(watcher)
            pids = [int(p) for p in (await self.channel.call("list", name=watcher)).get("pids", [])]
            if rec is None or rec.component not in self.graph.services:
                report["stray"].append(watcher)
                for pid in pids:
                    await asyncio.to_thread(procs.terminate_group, pid, 5.0)
                with contextlib.suppress(CircusCommandError):
                    await self.channel.call("rm", name=watcher, waiting=True)
                continue
            if rec.reservation is not None:
                self.resources.adopt_dict(rec.reservation)
            alive = await asyncio.to_thread(procs.same_process, rec.pid, rec.create_time)
            if rec.pid in pids and alive:
                report["adopted"].append(rec.replica_id)
                pid = rec.pid
                assert pid is not None
                self._exit_watcher.watch(pid, self._exit_callback(watcher))
                if rec.phase == "stopping":
                    self._launch(watcher, self._stop(rec, None, "stop interrupted by restart"))
                    continue
                if rec.phase != "ready":
                    rec.phase = "starting"
                    self._launch(watcher, self._resume_probe(rec))
            else:
                report["lost"].append(rec.replica_id)
                rec.pid = None
                rec.phase = "backoff" if rec.phase != "stopping" else "stopping"
                rec.restart_at = time.time()
                if rec.phase == "stopping":
                    self._launch(watcher, self._stop(rec, None, "stop interrupted by restart"))
        lost = [(w, rec) for w, rec in self.state.replicas.items() if w not in ours]
        # The watchers are gone (circusd restarted): their processes must not survive
        # either. One read of the process table for all of them.
        groups = [(rec.pid, rec.create_time) for _, rec in lost if rec.pid is not None]
        if groups:
            await asyncio.to_thread(procs.kill_groups, groups)
        for watcher, rec in lost:
            report["lost"].append(rec.replica_id)
            if rec.phase == "stopping" or rec.component not in self.graph.services:
                self.state.replicas.pop(watcher)
                continue
            if rec.reservation is not None:
                self.resources.adopt_dict(rec.reservation)
            rec.pid = None
            rec.phase = "backoff"
            rec.restart_at = time.time()
        for name in self.graph.services:
            self.component_record(name)
        cleared = self._clear_crashloops_of_changed_specs()
        reason = None
        if cleared:
            report["crashloop_cleared"] = cleared
            reason = (
                f"crash loop cleared for {', '.join(cleared)}: the spec (command, args, env "
                "or resources) differs from the one that crash-looped"
            )
        self.events.emit("adopt", reason=reason, details=dict(report))
        await self.save()
        return report

    def _clear_crashloops_of_changed_specs(self) -> list[str]:
        """As Kubernetes resets CrashLoopBackOff on a new pod spec: a component whose spec
        changed since it crash-looped starts afresh. Its exited replicas are removed (their
        watchers hold the old command) and the next pass starts new ones."""
        cleared = []
        for name, svc in self.graph.services.items():
            comp = self.component_record(name)
            if not comp.crashloop or comp.crashloop_spec in (None, svc.spec_digest()):
                continue
            comp.crashloop = False
            comp.crashloop_reason = None
            comp.crashloop_spec = None
            comp.failures = []
            for rec in self.state.replicas_of(name):
                if rec.phase == "exited":
                    self.begin_stop(rec, None, "spec changed since the crash loop")
            cleared.append(name)
        return cleared
