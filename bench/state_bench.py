"""State-save benchmark: what one save costs on the event loop, against the full dump.

A save used to serialize the whole state (``model_dump_json``) on the loop; it now makes
again only the replica records that changed and splices the others' kept JSON in
(``connector.reconcile.state._Fragments``). With N records (default 1,000, each as a Dynamo
worker's: 4 ports, log paths, a third with a last exit), in one run, the median of
``--samples`` of each:

1. the full dump, the old cost;
2. a save where nothing changed (a resync pass);
3. a save with ``--dirty`` records changed (about what a 20 ms window of a scale changes),
   one with a third changed (the most a save serializes piece by piece), and one with
   every record changed (a whole dump again, plus an eighth of the pieces).

Target: a save with ``--dirty`` changed costs <= 1/3 of the full dump. Every rendered
document is checked byte for byte against the full dump.

    python -m bench.state_bench [--records 1000] [--dirty 10] [--samples 50]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable

from connector.reconcile.state import (
    MOSTLY_CHANGED,
    ComponentRecord,
    ConnectorState,
    ExitRecord,
    ReplicaRecord,
    _Fragments,
)

RATIO_GOAL = 1 / 3


def build(n: int) -> ConnectorState:
    state = ConnectorState(namespace="bench", circusd={"endpoint": "ipc:///run/c", "pid": 1})
    state.components["Sleep"] = ComponentRecord(target=n, next_ordinal=n + 1)
    for i in range(1, n + 1):
        w = f"bench.sleep.{i}"
        base = 20000 + 4 * i
        state.replicas[w] = ReplicaRecord(
            component="Sleep",
            ordinal=i,
            watcher=w,
            phase="ready",
            pid=10000 + i,
            create_time=1.7e9 + i / 100,
            spawned_at=1.7e9 + i,
            ready_at=1.7e9 + i + 0.5,
            last_exit=ExitRecord(at=1.7e9, code=-15, reason="stopped") if i % 3 == 0 else None,
            reservation={
                "replica_id": f"Sleep/{i}",
                "component": "Sleep",
                "gpus": [],
                "gpu_fraction": 0.0,
                "cpu_cores": 1.0,
                "cpus": [i % 16],
                "memory_bytes": 2**30,
                "ports": {"system": base, "rpc": base + 1, "fpm": base + 2, "nixl": base + 3},
                "sockets": {},
                "env_names": {"port.system": "DYN_SYSTEM_PORT", "port.rpc": "DYN_RPC_PORT"},
            },
            log_paths={"stdout": f"/wd/logs/{w}.stdout.log", "stderr": f"/wd/logs/{w}.err"},
        )
    return state


def _median_ms(fn: Callable[[], object], samples: int) -> float:
    times = []
    for _ in range(samples):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=1000)
    parser.add_argument("--dirty", type=int, default=10)
    parser.add_argument("--samples", type=int, default=50)
    args = parser.parse_args(argv)
    state = build(args.records)
    recs = list(state.replicas.values())
    fragments = _Fragments()
    while fragments.made_total < len(recs):  # the first saves make the pieces
        fragments.render(state)
    tick = [0]

    def touch(k: int) -> None:
        tick[0] += 1
        for rec in recs[:k]:
            rec.restarts = tick[0]  # an attribute set, as the loop's modules do

    def changed(k: int) -> Callable[[], str]:
        def save() -> str:
            touch(k)
            return fragments.render(state)

        return save

    full = _median_ms(lambda: state.model_dump_json(indent=1), args.samples)
    # The attribute sets themselves (pydantic's __setattr__) are not the save's cost.
    touch_only = _median_ms(lambda: touch(args.dirty), args.samples)
    clean = _median_ms(lambda: fragments.render(state), args.samples)
    dirty = _median_ms(changed(args.dirty), args.samples) - touch_only
    fewer = max(5, args.samples // 5)
    third = len(recs) // MOSTLY_CHANGED
    most = _median_ms(changed(third), fewer) - _median_ms(lambda: touch(third), fewer)
    every = _median_ms(changed(len(recs)), fewer) - _median_ms(lambda: touch(len(recs)), fewer)
    assert fragments.render(state) == state.model_dump_json(indent=1)
    touch(args.dirty)
    assert fragments.render(state) == state.model_dump_json(indent=1)
    ratio = dirty / full
    verdict = "ok" if ratio <= RATIO_GOAL else "MISSED"
    n = args.records
    print(f"state save on the loop, {n} replica records, median of {args.samples}")
    print(f"  full dump (before):         {full:7.2f} ms")
    print(f"  save, nothing changed:      {clean:7.2f} ms  ({clean / full:.2f}x the full dump)")
    print(
        f"  save, {args.dirty} records changed:  {dirty:7.2f} ms  ({ratio:.2f}x the full dump, "
        f"goal <= {RATIO_GOAL:.2f}x: {verdict})"
    )
    print(f"  save, {third} changed:         {most:7.2f} ms  ({most / full:.2f}x the full dump)")
    print(f"  save, all {n} changed:     {every:7.2f} ms  ({every / full:.2f}x the full dump)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
