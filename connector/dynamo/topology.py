"""The system topology: components, their replicas and instances, and how they connect.

:func:`build_topology` is pure: it joins the graph (what should run), the connector's view
(what runs) and the discovery instances (what registered) into one JSON-able dict.
:func:`to_dot` and :func:`to_mermaid` render that dict for the CLI and for docs.

Edges come from two places: the graph's declared edges (``graph.edges()`` where the graph
has it, else every ``depends_on``), and *observed* links, established TCP connections from
one component's processes to a port another component's processes listen on, measured by
:func:`observe_links` (psutil; blocking, so the caller runs it in a thread).
"""

from __future__ import annotations

import ipaddress
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import psutil

from connector.dynamo.discovery.cache import Instance, ReplicaAddress, match_instance
from connector.graph.dynamo_defaults import discovery_component
from connector.graph.model import Graph, Service
from connector.view import ConnectorView, ReplicaView


@dataclass(frozen=True)
class ObservedLink:
    """``connections`` established TCP connections from ``source``'s processes to a port
    that ``target``'s processes listen on."""

    source: str
    target: str
    connections: int


def _replica_id(rep: ReplicaView) -> str:
    return f"{rep.component}/{rep.replica}"


def _declared_edges(graph: Graph) -> list[dict[str, Any]]:
    edges_fn = getattr(graph, "edges", None)
    if callable(edges_fn):
        return [{"source": e.source, "target": e.target, "kind": e.kind} for e in edges_fn()]
    return [
        {"source": svc.name, "target": dep, "kind": "dependsOn"}
        for svc in graph.services.values()
        for dep in svc.depends_on
    ]


def _instance_entry(inst: Instance, owner: str | None) -> dict[str, Any]:
    return {
        "id": inst.instance_hex,
        "namespace": inst.namespace,
        "component": inst.component,
        "endpoint": inst.endpoint,
        "address": f"{inst.address[0]}:{inst.address[1]}" if inst.address else None,
        "replica": owner,
        "backend": inst.backend,
    }


def build_topology(
    graph: Graph,
    view: ConnectorView,
    instances: Iterable[Instance],
    links: Iterable[ObservedLink] = (),
    owners: Mapping[str, str | None] | None = None,
    components: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Nodes (one per graph component) and edges, as a JSON-able dict.

    ``components`` maps a service to the Dynamo component its replicas were seen
    registering as (learnt by the discovery bridge); an instance is placed under the
    service of the replica that owns it, else under the service expected to register it.

    ``owners`` maps an instance key to the replica that owns it (from
    :func:`connector.dynamo.discovery.cache.match_instance` with listening sockets); without it,
    owners are matched by allocated port only. Instances of no graph component are listed under
    ``external``; they are shown, never touched."""
    replica_addrs = [
        ReplicaAddress(
            _replica_id(r),
            frozenset(r.ports.values()),
            frozenset({r.pid}) if r.pid else frozenset(),
        )
        for r in view.replicas
    ]

    def owner_of(inst: Instance) -> str | None:
        if owners is not None and inst.key in owners:
            return owners[inst.key]
        return match_instance(inst, replica_addrs)

    learnt = components or {}

    def component_name(name: str, svc: Service) -> str:
        return learnt.get(name) or discovery_component(svc)

    by_identity: dict[tuple[str, str], str] = {}
    for name, svc in graph.services.items():
        ns = svc.dynamo_namespace or graph.namespace
        by_identity[(ns, component_name(name, svc))] = name

    node_instances: dict[str, list[dict[str, Any]]] = {name: [] for name in graph.services}
    external: list[dict[str, Any]] = []
    for inst in sorted(instances, key=lambda i: (i.namespace, i.component, i.endpoint, i.key)):
        owner = owner_of(inst)
        node = owner.rsplit("/", 1)[0] if owner else None
        if node not in node_instances:
            node = by_identity.get((inst.namespace, inst.component))
        entry = _instance_entry(inst, owner)
        if node is None:
            external.append(entry)
        else:
            node_instances[node].append(entry)

    nodes = []
    for name, svc in graph.services.items():
        comp = view.component(name)
        reps = sorted(view.replicas_of(name), key=lambda r: int(r.replica))
        insts = node_instances[name]
        nodes.append(
            {
                "id": name,
                "role": svc.role.value,
                "sub_component_type": (
                    svc.sub_component_type.value if svc.sub_component_type else None
                ),
                "dynamo_namespace": svc.dynamo_namespace or graph.namespace,
                "dynamo_component": component_name(name, svc),
                "status": comp.status if comp else "stopped",
                "replicas": {
                    "desired": comp.desired if comp else svc.replicas,
                    "running": comp.running if comp else 0,
                    "ready": comp.ready if comp else 0,
                },
                "endpoints": sorted({i["endpoint"] for i in insts}),
                "instances": insts,
                "resources": {
                    "per_replica": {
                        "gpu": svc.resources.gpu,
                        "cpu": svc.resources.cpu,
                        "memory_bytes": svc.resources.memory_bytes,
                    },
                    "gpus": sorted({g for r in reps for g in r.gpus}),
                },
                "replica_states": {_replica_id(r): r.state for r in reps},
            }
        )

    edges = _declared_edges(graph)
    for link in sorted(links, key=lambda lk: (lk.source, lk.target)):
        edges.append(
            {
                "source": link.source,
                "target": link.target,
                "kind": "observed",
                "connections": link.connections,
            }
        )
    return {
        "graph": graph.name,
        "namespace": view.namespace,
        "nodes": nodes,
        "edges": edges,
        "external": external,
    }


# ------------------------------------------------------------------- rendering


def _node_lines(node: Mapping[str, Any]) -> list[str]:
    role = node["role"]
    if node.get("sub_component_type"):
        role = f"{role} ({node['sub_component_type']})"
    reps = node["replicas"]
    lines = [node["id"], role, f"{reps['ready']}/{reps['desired']} ready, {node['status']}"]
    if node["instances"]:
        count = len(node["instances"])
        lines.append(f"{count} instance{'s' if count != 1 else ''}")
    return lines


def _edge_label(edge: Mapping[str, Any]) -> str:
    if edge["kind"] == "observed":
        return f"observed ({edge['connections']})"
    return str(edge["kind"])


def _dot_quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def to_dot(topology: Mapping[str, Any]) -> str:
    """Graphviz DOT: one box per component, solid declared edges, dashed observed links."""
    out = [
        f"digraph {_dot_quote(str(topology['graph']))} {{",
        "  rankdir=LR;",
        '  node [shape=box, style=rounded, fontname="Helvetica"];',
    ]
    for node in topology["nodes"]:
        label = "\\n".join(
            line.replace("\\", "\\\\").replace('"', '\\"') for line in _node_lines(node)
        )
        out.append(f'  {_dot_quote(node["id"])} [label="{label}"];')
    for edge in topology["edges"]:
        style = ", style=dashed" if edge["kind"] == "observed" else ""
        out.append(
            f"  {_dot_quote(edge['source'])} -> {_dot_quote(edge['target'])} "
            f"[label={_dot_quote(_edge_label(edge))}{style}];"
        )
    out.append("}")
    return "\n".join(out) + "\n"


def _mermaid_text(text: str) -> str:
    return text.replace('"', "#quot;")


def to_mermaid(topology: Mapping[str, Any]) -> str:
    """Mermaid flowchart: node ids ``n0, n1, ...`` in graph order, names in the labels."""
    ids = {node["id"]: f"n{i}" for i, node in enumerate(topology["nodes"])}
    out = ["flowchart LR"]
    for node in topology["nodes"]:
        label = "<br/>".join(_mermaid_text(line) for line in _node_lines(node))
        out.append(f'  {ids[node["id"]]}["{label}"]')
    for edge in topology["edges"]:
        src, dst = ids.get(edge["source"]), ids.get(edge["target"])
        if src is None or dst is None:
            continue  # an edge to something outside the graph has no node to point at
        arrow = "-.->" if edge["kind"] == "observed" else "-->"
        out.append(f'  {src} {arrow}|"{_mermaid_text(_edge_label(edge))}"| {dst}')
    return "\n".join(out) + "\n"


# ------------------------------------------------------------- observed links


def _is_local(ip: str) -> bool:
    try:
        return ipaddress.ip_address(ip.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


def observe_links(
    pids_by_component: Mapping[str, Iterable[int]],
    local_hosts: Iterable[str] = (),
) -> list[ObservedLink]:
    """Established TCP connections between components' process trees, as links.

    Blocking (psutil reads /proc): call it with ``asyncio.to_thread``. A connection counts
    for ``A -> B`` when a process of A is connected to a port that a process of B listens
    on (at a loopback or local address).
    """
    local = set(local_hosts)
    listening: dict[int, str] = {}
    outgoing: list[tuple[str, int]] = []
    for component, pids in pids_by_component.items():
        for pid in pids:
            try:
                conns = psutil.Process(pid).net_connections(kind="tcp")
            except psutil.Error:
                continue
            for conn in conns:
                if conn.status == psutil.CONN_LISTEN and conn.laddr:
                    listening.setdefault(conn.laddr.port, component)
                elif conn.status == psutil.CONN_ESTABLISHED and conn.raddr:
                    ip, port = conn.raddr.ip, conn.raddr.port
                    if _is_local(ip) or ip in local:
                        outgoing.append((component, port))
    counts: Counter[tuple[str, str]] = Counter()
    for component, port in outgoing:
        target = listening.get(port)
        if target is not None and target != component:
            counts[(component, target)] += 1
    return [ObservedLink(src, dst, n) for (src, dst), n in sorted(counts.items())]
