"""The mock worker's configuration: Dynamo's environment variables, overridden by flags.

The environment names are the ones a real Dynamo worker reads (and the connector sets), so
a graph can swap a real worker for this mock without touching its ``envs``.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

Role = Literal["frontend", "worker"]
Backend = Literal["file", "etcd", "none"]
QueueRole = Literal["producer", "consumer", "none"]

DEFAULT_NAMESPACE = "dynamo"
DEFAULT_COMPONENT = "backend"
DEFAULT_ENDPOINT = "generate"
DEFAULT_ETCD = "http://localhost:2379"  # Dynamo's own default
DEFAULT_NATS = "nats://localhost:4222"  # Dynamo's own default
DEFAULT_LEASE_TTL_S = 30
# ai-dynamo-runtime 1.6.1 parses DYN_SYSTEM_PORT as an i16 and refuses to start above this.
RUNTIME_MAX_SYSTEM_PORT = 32767
# Names become etcd path segments and file names: keep them to what Dynamo accepts.
_NAME = re.compile(r"^[A-Za-z0-9_-]+$")


class ConfigError(ValueError):
    """A flag or environment variable has a value the mock worker cannot use."""


@dataclass(frozen=True)
class MockConfig:
    namespace: str
    component: str
    endpoints: tuple[str, ...]
    role: Role
    discovery: Backend
    file_kv: str | None
    etcd_endpoints: str
    lease_ttl_s: int
    system_host: str
    system_port: int  # 0: no HTTP server
    rpc_host: str
    rpc_port: int  # 0: an OS-assigned port, advertised as such
    instance_id: int | None  # file/none backends only; random when None
    startup_delay_s: float
    exit_after_s: float | None
    exit_code: int
    cpu_burn: float
    memory_mb: int
    grace_s: float
    queue: QueueRole
    nats_url: str
    stream: str
    rate: float
    messages: int  # producer: stop after this many (0: no limit)
    request_rate: float  # simulated requests per second behind the metrics
    model: str
    use_dynamo_runtime: bool
    # Frontend only: the real frontend serves /metrics on its HTTP port (DYN_HTTP_PORT),
    # which is where Prometheus service discovery points; 0 serves none.
    http_host: str = "127.0.0.1"
    http_port: int = 0


def _env_int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r}: not an integer") from None


def _default_backend(env: Mapping[str, str]) -> str:
    # Dynamo itself defaults to etcd; the mock picks what its environment points at, so it
    # runs standalone (no discovery) when nothing is configured.
    explicit = env.get("DYN_DISCOVERY_BACKEND", "").strip()
    if explicit:
        return explicit
    if env.get("DYN_FILE_KV"):
        return "file"
    if env.get("ETCD_ENDPOINTS"):
        return "etcd"
    return "none"


def _parse_instance_id(raw: str) -> int:
    try:
        value = int(raw, 16)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{raw!r} is not a hex number") from None
    if not 0 < value < 2**64:
        raise argparse.ArgumentTypeError(f"{raw!r} is not a non-zero u64")
    return value


def build_parser(env: Mapping[str, str]) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m connector.mockworker",
        description="A pure-Python stand-in for a Dynamo worker: registers in Dynamo's "
        "discovery, serves /metrics and /health, and can burn CPU, hold memory, crash on "
        "cue and feed or drain a NATS JetStream prefill queue.",
    )
    add = p.add_argument
    add(
        "--namespace",
        default=env.get("DYN_NAMESPACE") or DEFAULT_NAMESPACE,
        help="Dynamo namespace (env DYN_NAMESPACE; default %(default)s)",
    )
    add(
        "--component",
        default=env.get("DYN_COMPONENT") or None,
        help="component name (env DYN_COMPONENT; default 'backend', 'frontend' for that role)",
    )
    add(
        "--endpoint",
        dest="endpoints",
        action="append",
        default=None,
        help="endpoint to register; repeatable (default generate)",
    )
    add(
        "--role",
        choices=["frontend", "worker"],
        default="worker",
        help="frontend also exports dynamo_frontend_* metrics (default %(default)s)",
    )
    add(
        "--discovery",
        choices=["file", "etcd", "none"],
        default=_default_backend(env),
        help="env DYN_DISCOVERY_BACKEND; default: file if DYN_FILE_KV is set, etcd if "
        "ETCD_ENDPOINTS is set, else none",
    )
    add(
        "--file-kv",
        default=env.get("DYN_FILE_KV") or None,
        help="file backend root directory (env DYN_FILE_KV)",
    )
    add(
        "--etcd-endpoints",
        default=env.get("ETCD_ENDPOINTS") or DEFAULT_ETCD,
        help="env ETCD_ENDPOINTS; the first one is used (default %(default)s)",
    )
    add(
        "--lease-ttl",
        type=int,
        default=_env_int(env, "ETCD_LEASE_TTL", DEFAULT_LEASE_TTL_S),
        help="etcd lease TTL in seconds (env ETCD_LEASE_TTL; default %(default)s)",
    )
    add(
        "--system-host",
        default=env.get("DYN_SYSTEM_HOST") or "127.0.0.1",
        help="address of /metrics and /health (env DYN_SYSTEM_HOST; default %(default)s)",
    )
    add(
        "--system-port",
        type=int,
        default=_env_int(env, "DYN_SYSTEM_PORT", 0),
        help="port of /metrics and /health; 0 serves none (env DYN_SYSTEM_PORT)",
    )
    add(
        "--http-host",
        default=env.get("DYN_HTTP_HOST") or "127.0.0.1",
        help="frontend: address of its HTTP port (env DYN_HTTP_HOST; default %(default)s)",
    )
    add(
        "--http-port",
        type=int,
        default=_env_int(env, "DYN_HTTP_PORT", 0),
        help="frontend: also serve /metrics and /health there, as the real frontend serves "
        "/metrics on its HTTP port; 0 serves none (env DYN_HTTP_PORT)",
    )
    add(
        "--rpc-host",
        default=env.get("DYN_TCP_RPC_HOST") or "127.0.0.1",
        help="request-plane address advertised (env DYN_TCP_RPC_HOST; default %(default)s)",
    )
    add(
        "--rpc-port",
        type=int,
        default=_env_int(env, "DYN_TCP_RPC_PORT", 0),
        help="request-plane TCP port; 0 picks one (env DYN_TCP_RPC_PORT)",
    )
    add(
        "--instance-id",
        type=_parse_instance_id,
        default=None,
        help="instance id in hex for the file/none backends (default: random u64)",
    )
    add(
        "--startup-delay",
        type=float,
        default=0.0,
        metavar="S",
        help="seconds to wait before registering",
    )
    add(
        "--exit-after",
        type=float,
        default=None,
        metavar="S",
        help="exit on its own after S seconds (see --exit-code)",
    )
    add(
        "--exit-code",
        type=int,
        default=0,
        metavar="N",
        help="code for --exit-after: 0 deregisters first, non-zero is a crash that leaves "
        "the discovery entry behind (default %(default)s)",
    )
    add(
        "--cpu-burn",
        type=float,
        default=0.0,
        metavar="RATIO",
        help="busy fraction of one core, 0..1",
    )
    add(
        "--memory-mb",
        type=int,
        default=0,
        metavar="N",
        help="MiB of memory to allocate and touch (resident)",
    )
    add(
        "--grace",
        type=float,
        default=5.0,
        metavar="S",
        help="most seconds to deregister and exit after SIGTERM/SIGINT (default %(default)s)",
    )
    add(
        "--queue",
        choices=["producer", "consumer", "none"],
        default="none",
        help="prefill-queue role on NATS JetStream (default %(default)s)",
    )
    add(
        "--nats-url",
        default=env.get("NATS_SERVER") or DEFAULT_NATS,
        help="env NATS_SERVER (default %(default)s)",
    )
    add(
        "--stream",
        default=None,
        help="JetStream stream; subject <stream>.queue (default {namespace}_prefill_queue)",
    )
    add(
        "--rate",
        type=float,
        default=1.0,
        metavar="N",
        help="queue messages per second published or consumed (default %(default)s)",
    )
    add(
        "--messages",
        type=int,
        default=0,
        metavar="N",
        help="producer: stop publishing after N messages (default 0: no limit)",
    )
    add(
        "--request-rate",
        type=float,
        default=5.0,
        metavar="N",
        help="simulated requests per second behind the metrics (default %(default)s)",
    )
    add(
        "--model",
        default="mock-model",
        help="model label of the frontend metrics (default %(default)s)",
    )
    add(
        "--use-dynamo-runtime",
        action="store_true",
        help="register through the real ai-dynamo-runtime package instead",
    )
    return p


def parse_config(argv: Sequence[str], env: Mapping[str, str]) -> MockConfig:
    """Flags over environment over defaults. Raises :class:`ConfigError` (or exits with
    argparse's usage message) for values that cannot work."""
    ns = build_parser(env).parse_args(list(argv))
    if ns.discovery not in ("file", "etcd", "none"):
        raise ConfigError(
            f"DYN_DISCOVERY_BACKEND={ns.discovery!r}: the mock worker supports file, etcd or none"
        )
    role: Role = ns.role
    component = ns.component or ("frontend" if role == "frontend" else DEFAULT_COMPONENT)
    endpoints = tuple(ns.endpoints or (DEFAULT_ENDPOINT,))
    for label, value in [("namespace", ns.namespace), ("component", component)] + [
        ("endpoint", e) for e in endpoints
    ]:
        if not _NAME.match(value):
            raise ConfigError(f"{label} {value!r}: only letters, digits, '_' and '-' allowed")
    if ns.discovery == "file" and not ns.file_kv:
        raise ConfigError("file discovery needs a root directory: set DYN_FILE_KV or --file-kv")
    if ns.lease_ttl < 1:
        raise ConfigError(f"lease TTL must be >= 1 s, got {ns.lease_ttl}")
    if not 0.0 <= ns.cpu_burn <= 1.0:
        raise ConfigError(f"--cpu-burn must be within 0..1, got {ns.cpu_burn}")
    if ns.memory_mb < 0:
        raise ConfigError(f"--memory-mb must be >= 0, got {ns.memory_mb}")
    if ns.rate <= 0 or ns.request_rate < 0:
        raise ConfigError("--rate must be > 0 and --request-rate >= 0")
    if ns.grace <= 0:
        raise ConfigError(f"--grace must be > 0, got {ns.grace}")
    if not 0 <= ns.exit_code <= 255:
        raise ConfigError(f"--exit-code must be within 0..255, got {ns.exit_code}")
    ports = (
        ("DYN_SYSTEM_PORT", ns.system_port),
        ("DYN_TCP_RPC_PORT", ns.rpc_port),
        ("DYN_HTTP_PORT", ns.http_port),
    )
    for name, port in ports:
        if not 0 <= port <= 65535:
            raise ConfigError(f"{name} must be a port number (0..65535), got {port}")
    if ns.use_dynamo_runtime and ns.system_port > RUNTIME_MAX_SYSTEM_PORT:
        raise ConfigError(
            f"DYN_SYSTEM_PORT={ns.system_port}: ai-dynamo-runtime 1.6.1 reads it as a signed "
            f"16-bit number, so it must be <= {RUNTIME_MAX_SYSTEM_PORT}"
        )
    if ns.instance_id is not None and (ns.discovery == "etcd" or ns.use_dynamo_runtime):
        raise ConfigError(
            "--instance-id works only with the file or no backend: with etcd the id is the "
            "lease id, and the real runtime picks its own"
        )
    return MockConfig(
        namespace=ns.namespace,
        component=component,
        endpoints=endpoints,
        role=role,
        discovery=ns.discovery,
        file_kv=ns.file_kv,
        etcd_endpoints=ns.etcd_endpoints,
        lease_ttl_s=ns.lease_ttl,
        system_host=ns.system_host,
        system_port=ns.system_port,
        rpc_host=ns.rpc_host,
        rpc_port=ns.rpc_port,
        instance_id=ns.instance_id,
        startup_delay_s=ns.startup_delay,
        exit_after_s=ns.exit_after,
        exit_code=ns.exit_code,
        cpu_burn=ns.cpu_burn,
        memory_mb=ns.memory_mb,
        grace_s=ns.grace,
        queue=ns.queue,
        nats_url=ns.nats_url,
        # connector.dynamo.prefill_queue.default_stream() names it the same; not imported here
        # because that module loads NATS and aiohttp, which most mock workers never need.
        stream=ns.stream or f"{ns.namespace}_prefill_queue",
        rate=ns.rate,
        messages=ns.messages,
        request_rate=ns.request_rate,
        model=ns.model,
        use_dynamo_runtime=ns.use_dynamo_runtime,
        http_host=ns.http_host,
        http_port=ns.http_port if role == "frontend" else 0,
    )
