"""Runs every benchmark, one process each, and fails if any of them fails to run."""

from __future__ import annotations

import subprocess
import sys

BENCHMARKS = (
    "core_bench",
    "scale_bench",
    "discovery_bench",
    "exporter_bench",
    "api_bench",
    "api_fuzz",
    "dynamo_bench",
    "chaos",
)


def main() -> int:
    failed = []
    for name in BENCHMARKS:
        print(f"== bench.{name}", flush=True)
        if subprocess.call([sys.executable, "-m", f"bench.{name}"]) != 0:
            failed.append(name)
    if failed:
        print(f"benchmarks that failed to run: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
