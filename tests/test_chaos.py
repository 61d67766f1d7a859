"""The chaos suite, short: the scenarios of :mod:`bench.chaos` with small counts (20 replica
SIGKILLs, 5 connector SIGKILLs at random moments and 3 at chosen points, 1 circusd SIGKILL,
a 5 s etcd outage, an unwritable state dir), asserting the zeros the benchmark prints as
figures. Real circusd, real etcd, the mock worker as replicas, and a real ``up`` process
where the connector itself is killed or its API questioned. Scenarios that can share a
connector do (1 and 3; 2, 6 and 4): the start-ups are most of the cost on 2 cores.

Seeded: ``DYNAMO_LOCAL_CHAOS_SEED`` replays a failure (every assertion message names the
seed); the long run with figures is ``python -m bench.chaos``.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench import chaos
from connector.dynamo.discovery.keys import encode_value, instance_key, instance_value
from tests.servers import ServerStartError

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SEED = int(os.environ.get("DYNAMO_LOCAL_CHAOS_SEED", "20261201"))
# The issue asks for 30 s (the benchmark's default); the suite keeps to a shorter outage,
# still well past the watch's retry period and many /healthz calls long.
ETCD_PAUSE_S = 5.0


@pytest.fixture
def etcd(tmp_path: Path) -> Iterator[chaos.RestartableEtcd]:
    server = chaos.RestartableEtcd(tmp_path / "etcd")
    try:
        server.start()
    except ServerStartError as exc:
        pytest.fail(str(exc), pytrace=False)
    try:
        yield server
    finally:
        server.stop()


def assert_clean(result: chaos.Result) -> None:
    violations = result.violations()
    assert violations == [], f"{result.scenario}, seed {result.seed}:\n  " + "\n  ".join(violations)


async def test_replica_sigkills_under_churn_then_a_circusd_sigkill_leave_nothing_behind(
    tmp_path: Path, etcd: chaos.RestartableEtcd
) -> None:
    """Scenarios 1 and 3 on one library connector: one start-up for both, and circusd is
    killed under a graph that has just been through the replica kills."""
    async with chaos.library_deployment(
        tmp_path, etcd.url, "chaos-lib", replicas=2, max_replicas=4
    ) as dep:
        kills = await chaos.replica_kills_on(
            dep, seed=SEED, kills=20, max_replicas=4, gap_s=0.1, registered_share=0.35
        )
        circusd = await chaos.circusd_kills_on(dep, seed=SEED, kills=1)
    dep.closed_into(circusd)
    assert_clean(kills)
    assert kills.kills == 20
    assert kills.registered_kills > 0  # dead-instance cleanup was exercised
    assert kills.converge_s is not None
    assert len(kills.listed_s) == 20
    assert kills.listed_over_limit == 0, f"seed {SEED}: {sorted(kills.listed_s)[-3:]}"
    assert_clean(circusd)
    assert (circusd.kills, circusd.survivors) == (1, 0)
    assert len(circusd.recovered_s) == 1
    assert max(circusd.listed_s) <= chaos.LISTED_LIMIT_S


@pytest.mark.timeout(240)  # ~40 s on 2 idle cores; restarts of `up` slow down most under load
async def test_connector_sigkills_then_an_etcd_outage_lose_nothing(
    tmp_path: Path, etcd: chaos.RestartableEtcd
) -> None:
    """Scenarios 2, 6 and 4 on one working dir under ``up``: 5 SIGKILLs of ``up`` at random
    moments and one at each chosen point (mid scale-up, mid drain, mid state write), with
    ``up`` again after each, then etcd stopped under the last one. The outage goes in the issue's
    order: the scale-up first, then the kill. The benchmark kills at once, after a 30 s
    outage, and shows the known gap: gRPC's reconnect backoff (growing to 120 s) keeps the
    connector's etcd client away long after etcd is back (see bench.chaos); after a 5 s
    outage it is at most a few seconds, inside these bounds."""
    async with chaos.up_deployment(
        tmp_path, etcd.url, "chaos-up", replicas=2, max_replicas=4
    ) as dep:
        restarts = await chaos.connector_kills_on(dep, seed=SEED, restarts=5, max_replicas=4)
        points = await chaos.connector_kill_points_on(dep, seed=SEED, per_point=1, max_replicas=4)
        outage = await chaos.etcd_outage_on(
            dep, etcd, seed=SEED, pause_s=ETCD_PAUSE_S, max_replicas=4
        )
    dep.closed_into(outage)
    assert_clean(restarts)
    assert restarts.restarts == 5
    assert restarts.state_parse_failures == 0
    assert restarts.not_readopted == 0
    assert restarts.duplicates_seen == 0
    assert restarts.readopted_same_pid > 0  # something really was re-adopted
    assert_clean(points)
    for point, stats in points.points.items():
        where = f"{point}, seed {SEED}: {stats}"
        # Each kill landed at its point the first time, or after a try that came too late.
        assert stats.kills == 1 and stats.tries <= chaos.KILL_POINT_TRIES, where
        assert (stats.corrupt, stats.duplicates, stats.orphans) == (0, 0, 0), where
        assert stats.alive_at_kill > 0 and stats.readopted == stats.alive_at_kill, where
        assert stats.not_readopted == 0, where
    scale_up, drain, write = (points.points[p] for p in chaos.KILL_POINTS)
    assert list(scale_up.seen) == ["new replica starting, its process up"]
    assert list(drain.seen) == ["draining, keys out of etcd"]
    assert drain.stopped == 1  # the next connector finished the drained replica's stop
    ((cut_off, _),) = write.seen.items()
    assert cut_off.startswith("temp file not renamed, "), cut_off
    assert_clean(outage)
    assert outage.api_calls >= ETCD_PAUSE_S * 2  # /healthz and /v1/components, ~5 per second
    assert (outage.api_failures, outage.stopped_during_pause) == (0, 0)
    assert outage.ready_after_s is not None
    assert outage.listed_after_kill_s is not None
    assert outage.listed_after_kill_s <= chaos.LISTED_LIMIT_S


# Both failure points of one root cause: a replica's start or stop task that fails on its
# first state write dies, and its record stays `spawning` / `stopping` with nothing to take
# it further until the connector restarts (bench.chaos scenario 5).
UNWRITABLE_CASES = ["disk full during a scale-up", "read-only during a scale-down"]


@pytest.mark.parametrize("case", UNWRITABLE_CASES)
async def test_an_unwritable_state_dir_fails_the_scale_clearly_and_loses_nothing(
    tmp_path: Path, case: str
) -> None:
    """The disk full as the kernel says it (the temp file a symlink to /dev/full), the
    read-only dir simulated at the state store's write (see bench.chaos): as root,
    permission bits do not stop a write."""
    result = await chaos.unwritable_state(tmp_path, seed=SEED, case=case, limit_s=None)
    assert_clean(result)
    assert result.clear_error, result.error
    assert result.running_kept
    assert result.disk_state_ok


async def test_a_scale_cut_short_by_an_unwritable_state_dir_completes_once_writable(
    tmp_path: Path,
) -> None:
    # Side by side (each has its own connector and working dir): twice as fast. It takes the
    # next pass (resync: 1 s) and a spawn; 3 s leaves room for a loaded machine (1.5 s did
    # not, once), and is still far short of what it took before the resume (never).
    results = await asyncio.gather(
        *(
            chaos.unwritable_state(tmp_path, seed=SEED, case=case, limit_s=3.0)
            for case in UNWRITABLE_CASES
        )
    )
    for result in results:
        assert_clean(result)
        assert result.completed_after_s is not None


async def test_the_audit_sees_an_orphan_a_duplicate_a_stray_listener_and_stale_keys(
    tmp_path: Path, etcd: chaos.RestartableEtcd
) -> None:
    """The zeros above mean something: each kind of finding is planted once and seen."""
    # Claims to be Decode/1 from a group of its own, and listens on a port nobody reserved.
    impostor_code = (
        "import socket, time; s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen(); "
        "print('listening', flush=True); time.sleep(60)"
    )
    impostor: subprocess.Popen[str] | None = None
    async with chaos.library_deployment(
        tmp_path, etcd.url, "chaos-audit", replicas=1, max_replicas=2
    ) as dep:
        try:
            converge_s, clean = await dep.settle()
            assert converge_s is not None and clean.clean, clean.lines()
            impostor = subprocess.Popen(
                [sys.executable, "-c", impostor_code],
                env={
                    **os.environ,
                    chaos.MARKER_ENV: dep.run_id,
                    "DYNAMO_LOCAL_REPLICA": "Decode/1",
                },
                stdout=subprocess.PIPE,
                text=True,
                start_new_session=True,
            )
            assert impostor.stdout is not None
            assert await asyncio.to_thread(impostor.stdout.readline) == "listening\n"
            (rec,) = (await dep.observe()).records
            ((_, (_, running)),) = (await dep.view.instances(dep.namespace)).items()
            for instance, port in ((0xABC, 1), (0xDEF, rec.ports["rpc"])):
                value = instance_value(
                    dep.namespace, "backend", "generate", instance, "127.0.0.1", port
                )
                key = instance_key(dep.namespace, "backend", "generate", instance)
                await dep.view.client.put(key.encode(), encode_value(value))
            found = await chaos.audit(
                await dep.observe(), dep.run_id, dep.namespace, dep.view, dep.http
            )
        finally:
            if impostor is not None:
                impostor.kill()
                impostor.wait()
                if impostor.stdout is not None:
                    impostor.stdout.close()
    assert dep.left_after_shutdown == []
    namespace = dep.namespace
    pid = impostor.pid
    assert found.orphans == [f"pid {pid} (Decode/1) in process group {pid}, no live replica's"]
    assert found.duplicates == ["Decode/1: 2 live processes"]
    assert len(found.leaked_reservations) == 1
    assert found.leaked_reservations[0].startswith(f"Decode/1 pid {pid} listens on ")
    assert found.leaked_reservations[0].endswith(", reserved for nobody")
    assert sorted(found.stale_instances) == [
        f"v1/instances/{namespace}/backend/generate/abc advertises port 1 (no replica, "
        "not running)",
        f"v1/instances/{namespace}/backend/generate/def: Decode/1 now runs instance "
        f"{running}, not def",
    ]
