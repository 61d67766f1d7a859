"""What a plain ``DynamoGraphDeployment`` service gets when its ``local:`` block says nothing.

Most graphs are copied from Kubernetes, where the operator fills in what a pod needs: its
ports, its host, how it proves it is ready. On one machine those defaults must differ per
replica (two decode workers cannot both serve ``DYN_SYSTEM_PORT=9090`` or the forward-pass
metrics on 20380) and must stay on loopback. This module holds those defaults, per role, in
one table, so the graph loader, the README's table and the tests read the same thing.

A service's own declarations always win: a port it declares with the same name or env var,
an env var it sets itself, a ``local.readiness`` it spells out.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from connector.graph.model import (
    PortSpec,
    Readiness,
    ReadinessKind,
    Role,
    Service,
    SubComponentType,
)

# Every Dynamo process binds and advertises these addresses; without them the request
# plane advertises the host's main address, and the system/HTTP servers listen on all
# interfaces (the Planner's dashboard too). Values a service sets in ``envs`` win.
LOOPBACK_ENV: Mapping[str, str] = {
    "DYN_TCP_RPC_HOST": "127.0.0.1",
    "DYN_TCP_RESPONSE_STREAM_HOST": "127.0.0.1",
    "DYN_EVENT_PLANE_HOST": "127.0.0.1",
    "DYN_SYSTEM_HOST": "127.0.0.1",
    "DYN_HTTP_HOST": "127.0.0.1",
    "VLLM_NIXL_SIDE_CHANNEL_HOST": "127.0.0.1",
}


# Port name -> the env var a Dynamo 1.6.1 process reads it from.
#   system: /metrics, /health, /live (off unless set); the Prometheus SD target of workers
#           and the Planner.
#   rpc:    the TCP request plane the instance advertises in discovery (its address is how
#           an instance is matched to its replica).
#   fpm:    forward-pass metrics of vLLM-style workers, which the load-based Planner reads
#           (default 20380: two workers on one host collide there; the mocker sends them
#           over the event plane instead and ignores it).
#   http:   the frontend's OpenAI API and its /metrics.
#   nixl:   vLLM's NIXL side channel for KV transfer between prefill and decode (vLLM's
#           default 5600 would be shared by every worker on the host). KV-event publishers
#           take their endpoint from the worker's own --kv-events-config: write a port
#           there as a {port.NAME} of local.ports.
_SYSTEM = PortSpec("system", "DYN_SYSTEM_PORT")
_RPC = PortSpec("rpc", "DYN_TCP_RPC_PORT")
_FPM = PortSpec("fpm", "DYN_FORWARDPASS_METRIC_PORT")
_HTTP = PortSpec("http", "DYN_HTTP_PORT")
_NIXL = PortSpec("nixl", "VLLM_NIXL_SIDE_CHANNEL_PORT")

ROLE_PORTS: Mapping[Role, tuple[PortSpec, ...]] = {
    Role.WORKER: (_SYSTEM, _RPC, _FPM, _NIXL),
    Role.ROUTER: (_SYSTEM, _RPC),
    Role.FRONTEND: (_HTTP,),
    Role.PLANNER: (_SYSTEM, _RPC),  # the Planner registers {ns}/Planner/generate
}

# The port whose /metrics Prometheus scrapes, per role (see ROLE_PORTS).
METRICS_PORT: Mapping[Role, str] = {
    Role.WORKER: "system",
    Role.ROUTER: "system",
    Role.FRONTEND: "http",
    Role.PLANNER: "system",
}


def implicit_ports(
    role: Role, declared: Sequence[PortSpec], envs: Mapping[str, str]
) -> tuple[PortSpec, ...]:
    """The role's default ports that the service neither declares (by name or env var) nor
    fixes itself through ``envs``."""
    names = {p.name for p in declared}
    taken_envs = {p.env for p in declared if p.env} | set(envs)
    return tuple(
        p for p in ROLE_PORTS.get(role, ()) if p.name not in names and p.env not in taken_envs
    )


def _flag_value(args: Sequence[str], flag: str) -> str | None:
    """``--flag V`` or ``--flag=V`` in a command line (the last one wins, as argparse)."""
    value = None
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            value = args[i + 1]
        elif arg.startswith(flag + "="):
            value = arg.split("=", 1)[1]
    return value


def default_readiness(
    role: Role, argv: Sequence[str], envs: Mapping[str, str], ports: Sequence[PortSpec]
) -> Readiness:
    """How a replica of ``role`` proves it is ready when the graph does not say.

    * worker (and router): its instance is registered in discovery, under whatever Dynamo
      component it registers as (learnt from the process that holds the instance's
      address, so ``backend`` or ``prefill`` need not be guessed); without a discovery
      backend, its process being up;
    * frontend: ``GET /v1/models`` answers on its HTTP port;
    * planner and anything else: its process is up.
    """
    if role in (Role.WORKER, Role.ROUTER):
        return Readiness(kind=ReadinessKind.DISCOVERY, default=True)
    if role is Role.FRONTEND:
        port = _flag_value(argv, "--http-port") or envs.get("DYN_HTTP_PORT")
        if port is None:
            declared = {p.env: p.name for p in ports if p.env}
            port = "{port." + declared.get("DYN_HTTP_PORT", "http") + "}"
        return Readiness(
            kind=ReadinessKind.HTTP, url=f"http://127.0.0.1:{port}/v1/models", default=True
        )
    return Readiness(default=True)


def discovery_component(svc: Service) -> str:
    """The component name a service's replicas are expected to register under, before any
    has (then the learnt name wins): what its readiness names, else Dynamo's default for
    its role (``prefill`` for prefill workers, ``backend`` for decode and aggregated
    ones), else the service name lowercased."""
    if svc.readiness.component:
        return svc.readiness.component
    if svc.role is Role.WORKER:
        return "prefill" if svc.sub_component_type is SubComponentType.PREFILL else "backend"
    return svc.name.lower()


def service_env(svc: Service, graph_namespace: str) -> dict[str, str]:
    """What every replica of ``svc`` gets as a Dynamo process: loopback for all it binds
    and advertises, its namespace, and the component dynamo-local's mock worker registers
    as (Dynamo's own processes choose theirs; that one is learnt from discovery)."""
    return {
        **LOOPBACK_ENV,
        "DYN_NAMESPACE": svc.dynamo_namespace or graph_namespace,
        "DYN_COMPONENT": discovery_component(svc),
    }
