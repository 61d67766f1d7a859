"""What a connector is configured with beyond its graph (:class:`ConnectorOptions`), and
where it keeps its state by default. Its own module, so that what the connector starts on
top of itself (interop, the CLI) can read the options without importing the connector."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from connector import defaults

if TYPE_CHECKING:  # only a type here: reading the options imports no YAML reader
    from connector.policy.scaledobject import ScaledObject


class Closeable(Protocol):
    """Something started on top of a connector and closed with it (interop, an exporter)."""

    async def close(self) -> None: ...


@dataclass
class ConnectorOptions:
    """Everything that is not in the graph. Defaults run a graph with no external service."""

    discovery: str = "file"  # file | etcd | none
    file_kv: Path | None = None  # default: <working_dir>/discovery
    etcd_url: str | None = None
    nats_url: str | None = None
    circus_endpoint: str | None = None  # attach to an external circusd instead of owning one
    circus_pubsub_endpoint: str | None = None
    circus_check_delay_s: float = 0.25
    gpu_backend: str = "auto"  # auto | nvml | none | fake:<capture.json>
    port_range: tuple[int, int] = defaults.PORT_RANGE  # ports handed to replicas
    # Skip GPUs that processes not ours use beyond this.
    gpu_foreign_memory_threshold_bytes: int = defaults.GPU_FOREIGN_MEMORY_THRESHOLD_BYTES
    # Then a stopped replica's resources are held as lingering (processes alive) or its
    # GPUs as leaked (NVML still lists them).
    gpu_release_timeout_s: float = defaults.RELEASE_TIMEOUT_S
    resync_s: float = 1.0
    scale_timeout_s: float = 300.0
    planner_executor: bool = False
    # Replicas the whole graph may run at once (None: defaults.replica_budget()).
    max_replicas: int | None = None
    # Replica logs: rotation size (0: never) and rotated files kept per stream (>= 1), and
    # how many stopped replicas' files stay per component.
    log_max_bytes: int = defaults.LOG_MAX_BYTES
    log_backups: int = defaults.LOG_BACKUPS
    stopped_logs_kept: int = defaults.STOPPED_LOGS_KEPT
    # KEDA ScaledObjects whose policies drive their components (connector.policy), and
    # whether they only record what they would do.
    scaled_objects: tuple[ScaledObject, ...] = ()
    policy_dry_run: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


def default_working_dir(namespace: str) -> Path:
    return Path.home() / ".dynamo" / "local" / namespace
