"""Resource defaults shared by the library (``ConnectorOptions``, ``ResourceManager``) and
the ``up`` command's flags, kept here so the CLI does not import the connector to print
its help."""

from __future__ import annotations

import os

# Ports handed to replicas. Dynamo's runtime reads DYN_SYSTEM_PORT as a signed 16-bit
# number, so no replica port may go above HIGHEST_REPLICA_PORT.
PORT_RANGE: tuple[int, int] = (20000, 29999)
HIGHEST_REPLICA_PORT = 32767
# A GPU that processes not ours use beyond this is not handed out.
GPU_FOREIGN_MEMORY_THRESHOLD_BYTES = 1 << 30
# How long a release waits for a stopped replica's processes to exit and NVML to let go.
RELEASE_TIMEOUT_S = 30.0

# The machine-wide replica budget, as a kubelet's maxPods: a component with no maxReplicas
# cannot be given more processes than the machine can run. 8 per core the connector may
# use, and never fewer than 64 (`up --max-replicas` / ConnectorOptions.max_replicas).
REPLICAS_PER_CORE = 8
MIN_REPLICA_BUDGET = 64


# Replica logs (`up --log-max-size/--log-backups/--keep-stopped-logs`): each stream's file
# rotates at this size, keeping this many rotated files; and the files of the newest
# stopped replicas of each component stay, older ones are deleted.
LOG_MAX_BYTES = 10 * 1024 * 1024
LOG_BACKUPS = 3
STOPPED_LOGS_KEPT = 16


def replica_budget() -> int:
    """The default replica budget of this machine (its CPU affinity, not every core)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(MIN_REPLICA_BUDGET, REPLICAS_PER_CORE * (cores or 1))
