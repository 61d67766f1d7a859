"""The mock worker's life: start, register, run, and stop the way a Dynamo worker does.

Exit behaviour (what the connector's tests rely on):

* SIGTERM / SIGINT: health turns 503, the simulated work stops, the entries are removed
  (lease revoked / files deleted), exit 0, all within ``--grace`` seconds. If removing them
  takes longer, the process exits 1 and says so.
* ``--exit-after S --exit-code 0``: a clean finish, same path as SIGTERM.
* ``--exit-after S --exit-code N`` (N != 0): a crash. The process ends at once with code N
  and its discovery entries stay behind, as they do when a real worker crashes (seen with
  ai-dynamo-runtime 1.6.1: a worker that dies of an exception leaves its file). The timer
  counts from process start, so a crash can happen before registration too.
* SIGKILL: nothing runs; entries stay (file forever, etcd until the lease expires).
* The etcd lease lost (expired or revoked by someone else), or the prefill queue failing:
  the process deregisters what is left and exits 1.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from prometheus_client import disable_created_metrics

from connector.mockworker.config import ConfigError, MockConfig, parse_config
from connector.mockworker.dynamo_runtime import DynamoRuntimeWorker, RuntimeUnavailable
from connector.mockworker.load import CpuBurner, allocate_ballast
from connector.mockworker.metrics import MockMetrics
from connector.mockworker.registry import Registration, RegistrationError, open_registration

if TYPE_CHECKING:
    from aiohttp import web

log = logging.getLogger("connector.mockworker")


async def _close_at_once(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    # The request plane is only advertised, never spoken: accept and hang up.
    writer.close()
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()


class MockWorker:
    def __init__(self, cfg: MockConfig) -> None:
        self.cfg = cfg
        self.metrics = MockMetrics(cfg)
        self.started = time.monotonic()
        self.ready = False
        self.instance_id: int | None = None
        self.registration: Registration | DynamoRuntimeWorker | None = None
        self._done: asyncio.Future[tuple[str, int]] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._runner: web.AppRunner | None = None
        self._http_runner: web.AppRunner | None = None  # frontend's HTTP port
        self._rpc_server: asyncio.Server | None = None
        self._burner = CpuBurner(cfg.cpu_burn)
        self._ballast: bytearray | None = None

    # ------------------------------------------------------------------ outcome

    def _finish(self, why: str, code: int) -> None:
        if self._done is not None and not self._done.done():
            self._done.set_result((why, code))

    def _crash(self) -> None:
        ident = f" {self.instance_id:x}" if self.instance_id is not None else ""
        log.info(
            "exiting with code %d after %ss without deregistering instance%s (simulated crash)",
            self.cfg.exit_code,
            self.cfg.exit_after_s,
            ident,
        )
        logging.shutdown()
        sys.stdout.flush()
        os._exit(self.cfg.exit_code)

    def _exit_timer(self) -> None:
        if self.cfg.exit_code != 0:
            self._crash()
        self._finish(f"--exit-after {self.cfg.exit_after_s}", 0)

    def health(self) -> tuple[int, dict[str, Any]]:
        uptime = round(time.monotonic() - self.started, 3)
        if not self.ready or self.instance_id is None:
            return 503, {"status": "notready", "uptime_s": uptime}
        return 200, {
            "status": "ready",
            "instance_id": f"{self.instance_id:x}",
            "namespace": self.cfg.namespace,
            "component": self.cfg.component,
            "endpoints": {ep: "ready" for ep in self.cfg.endpoints},
            "uptime_s": uptime,
        }

    # ------------------------------------------------------------------ run

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        self._done = loop.create_future()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._finish, f"received {sig.name}", 0)
        if self.cfg.exit_after_s is not None:
            loop.call_later(self.cfg.exit_after_s, self._exit_timer)
        try:
            code = await self._run()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
        return code

    async def _run(self) -> int:
        cfg = self.cfg
        assert self._done is not None
        self._burner.start()
        if cfg.memory_mb:
            self._ballast = await asyncio.to_thread(allocate_ballast, cfg.memory_mb)
            log.info("holding %d MiB of memory", cfg.memory_mb)
        try:
            self.registration = await self._open_registration()
        except OSError as exc:
            log.error("%s", exc)
            await self._cleanup()
            return 1

        await asyncio.wait({self._done}, timeout=cfg.startup_delay_s)
        if self._done.done():
            why, code = self._done.result()
            log.info("stopping before registration: %s", why)
            await self._cleanup()
            return code

        try:
            self.instance_id = await self.registration.register()
        except (RegistrationError, RuntimeUnavailable) as exc:
            log.error("%s", exc)
            await self._cleanup()
            return 1
        self.metrics.bind(self.instance_id)
        self.ready = True
        self._log_registered()
        self._start_work()

        why, code = await self._done
        return await self._stop(why, code)

    async def _open_registration(self) -> Registration | DynamoRuntimeWorker:
        cfg = self.cfg
        if cfg.use_dynamo_runtime:
            # The runtime serves the request plane and the system port itself.
            return DynamoRuntimeWorker(cfg)
        try:
            self._rpc_server = await asyncio.start_server(
                _close_at_once, cfg.rpc_host, cfg.rpc_port
            )
        except OSError as exc:
            raise OSError(
                f"cannot listen on request-plane port {cfg.rpc_host}:{cfg.rpc_port}: {exc}"
            ) from exc
        rpc_port = int(self._rpc_server.sockets[0].getsockname()[1])
        if cfg.system_port:
            # Imported on demand (as are etcd and NATS): a replica without them starts faster.
            from connector.mockworker.http import build_app, serve

            app = build_app(self.metrics.exposition, self.health)
            try:
                self._runner = await serve(app, cfg.system_host, cfg.system_port)
            except OSError as exc:
                raise OSError(
                    f"cannot serve /metrics on {cfg.system_host}:{cfg.system_port}: {exc}"
                ) from exc
        if cfg.http_port:
            from connector.mockworker.http import build_app, serve

            app = build_app(self.metrics.exposition, self.health)
            try:
                self._http_runner = await serve(app, cfg.http_host, cfg.http_port)
            except OSError as exc:
                raise OSError(
                    f"cannot serve /metrics on {cfg.http_host}:{cfg.http_port}: {exc}"
                ) from exc
        return open_registration(cfg, rpc_port)

    def _log_registered(self) -> None:
        cfg = self.cfg
        assert self.registration is not None and self.instance_id is not None
        log.info(
            "registered instance %x as %s/%s/%s in %s",
            self.instance_id,
            cfg.namespace,
            cfg.component,
            ",".join(cfg.endpoints),
            self.registration.where(),
        )

    def _start_work(self) -> None:
        loop = asyncio.get_running_loop()
        reg = self.registration
        assert reg is not None and self.instance_id is not None
        simulate = reg.simulate() if isinstance(reg, DynamoRuntimeWorker) else None
        self._tasks.append(
            loop.create_task(simulate or self.metrics.simulate(), name="simulated-requests")
        )
        if isinstance(reg, Registration):
            self._tasks.append(loop.create_task(self._watch_lost(reg), name="watch-lease"))
        if self.cfg.queue != "none":
            from connector.mockworker.queue import run_queue

            queue = loop.create_task(run_queue(self.cfg, self.instance_id), name="queue")
            queue.add_done_callback(self._queue_done)
            self._tasks.append(queue)

    async def _watch_lost(self, reg: Registration) -> None:
        await reg.lost.wait()
        self._finish(f"registration lost: {reg.lost_reason}", 1)

    def _queue_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            from connector.mockworker.queue import QueueError

            reason = str(exc) if isinstance(exc, QueueError) else repr(exc)
            self._finish(f"prefill queue failed: {reason}", 1)

    # ------------------------------------------------------------------ stop

    async def _stop(self, why: str, code: int) -> int:
        log.info("deregistering instance %x: %s", self.instance_id, why)
        self.ready = False
        try:
            await asyncio.wait_for(self._deregister_and_cleanup(), self.cfg.grace_s)
        except TimeoutError:
            log.error("deregistration did not finish within --grace %ss", self.cfg.grace_s)
            return code or 1
        except Exception as exc:
            log.error("deregistration failed: %s", exc)
            return code or 1
        return code

    async def _deregister_and_cleanup(self) -> None:
        await self._cancel_tasks()
        assert self.registration is not None
        await self.registration.deregister()
        log.info("deregistered instance %x", self.instance_id)
        await self._cleanup()

    async def _cancel_tasks(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()

    async def _cleanup(self) -> None:
        await self._cancel_tasks()
        self._burner.stop()
        for runner in (self._runner, self._http_runner):
            if runner is not None:
                await runner.cleanup()
        self._runner = self._http_runner = None
        if self._rpc_server is not None:
            self._rpc_server.close()
            await self._rpc_server.wait_closed()
            self._rpc_server = None


def configure_logging() -> None:
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s mockworker: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    logging.getLogger("connector").setLevel(logging.INFO)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        cfg = parse_config(sys.argv[1:] if argv is None else argv, os.environ)
    except ConfigError as exc:
        print(f"mockworker: error: {exc}", file=sys.stderr)
        return 2
    configure_logging()
    # Dynamo's own exposition has no *_created series; keep the mock's identical in shape.
    disable_created_metrics()  # type: ignore[no-untyped-call]
    return asyncio.run(MockWorker(cfg).run())
