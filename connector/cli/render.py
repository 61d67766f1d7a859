"""Rich tables and one-line summaries the CLI prints. Pure functions of the API's JSON."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

from rich.table import Table
from rich.text import Text

STATUS_STYLES = {
    "running": "green",
    "starting": "cyan",
    "degraded": "yellow",
    "crashloop": "bold red",
    "stopped": "dim",
    "ready": "green",
    "spawning": "cyan",
    "stopping": "magenta",
    "backoff": "yellow",
    "exited": "red",
}
OUTCOME_STYLES = {
    "ok": "green",
    "timeout": "yellow",
    "partial": "yellow",
    "superseded": "yellow",
    "failed": "red",
    "refused": "red",
}


def styled(value: str, styles: Mapping[str, str]) -> Text:
    return Text(value, style=styles.get(value, ""))


def role_of(component: Mapping[str, Any]) -> str:
    sub = component.get("sub_component_type")
    return f"{component['role']} ({sub})" if sub else str(component["role"])


def components_table(data: Mapping[str, Any]) -> Table:
    table = Table(title=f"namespace {data['namespace']}", title_justify="left")
    for header in ("COMPONENT", "ROLE", "STATUS", "READY", "RUNNING", "RESTARTS", "REASON"):
        table.add_column(header, no_wrap=header != "REASON")
    for c in data["components"]:
        r = c["replicas"]
        status = styled(c["status"], STATUS_STYLES)
        if c["scale_in_flight"]:
            status.append(" …", style="dim")
        table.add_row(
            c["name"],
            role_of(c),
            status,
            f"{r['ready']}/{r['desired']}",
            str(r["running"]),
            str(c["restarts"]),
            c["reason"] or "",
        )
    return table


def replicas_table(detail: Mapping[str, Any]) -> Table:
    table = Table(title=detail["component"]["name"], title_justify="left")
    for header in ("REPLICA", "STATE", "PID", "UPTIME", "RESTARTS", "LAST EXIT", "GPUS", "PORTS"):
        table.add_column(header, no_wrap=True)
    now = time.time()
    for r in detail["replicas"]:
        started = r["started_at"]
        table.add_row(
            r["replica"],
            styled(r["state"], STATUS_STYLES),
            str(r["pid"] or "-"),
            duration(now - started) if started else "-",
            str(r["restarts"]),
            "-" if r["last_exit_code"] is None else str(r["last_exit_code"]),
            ",".join(short_gpu(g) for g in r["gpus"]) or "-",
            pairs(r["ports"]),
        )
    return table


def events_table(events: Sequence[Mapping[str, Any]]) -> Table:
    table = Table()
    for header in ("SEQ", "TIME", "KIND", "COMPONENT", "CHANGE", "OUTCOME", "DURATION", "REASON"):
        table.add_column(header, no_wrap=header != "REASON")
    for e in events:
        table.add_row(*event_cells(e))
    return table


def event_cells(e: Mapping[str, Any]) -> tuple[str | Text, ...]:
    component = e.get("component") or ""
    if e.get("replica"):
        component = f"{component}#{e['replica']}"
    change = ""
    if e.get("from_replicas") is not None and e.get("to_replicas") is not None:
        change = f"{e['from_replicas']} → {e['to_replicas']}"
    duration_s = e.get("duration_s")
    return (
        str(e["seq"]),
        time.strftime("%H:%M:%S", time.localtime(float(e["time"]))),
        str(e["kind"]),
        component,
        change,
        styled(str(e.get("outcome") or ""), OUTCOME_STYLES),
        f"{duration_s:.2f} s" if isinstance(duration_s, int | float) else "",
        str(e.get("reason") or ""),
    )


def event_line(e: Mapping[str, Any]) -> Text:
    line = Text()
    for i, cell in enumerate(c for c in event_cells(e) if str(c)):
        if i:
            line.append(" ")
        line.append(cell if isinstance(cell, Text) else Text(cell))
    return line


def top_table(
    components: Mapping[str, Any],
    usage: Mapping[str, Mapping[str, Any]],
    queue: Mapping[str, Any] | None,
) -> Table:
    depth = queue_depth(queue)
    caption = f"prefill queue: {depth} pending" if depth is not None else queue_reason(queue)
    table = Table(
        title=f"namespace {components['namespace']}  {time.strftime('%H:%M:%S')}",
        title_justify="left",
        caption=caption,
        caption_justify="left",
    )
    for header in ("COMPONENT", "STATUS", "READY", "CPU", "RSS", "GPU MEM", "RESTARTS"):
        table.add_column(header, no_wrap=True, justify="left" if header == "COMPONENT" else "right")
    for c in components["components"]:
        totals = usage.get(c["name"], {}).get("totals", {})
        replicas = usage.get(c["name"], {}).get("replicas", [])
        cpu = [r["cpu_utilization_ratio"] for r in replicas if "cpu_utilization_ratio" in r]
        table.add_row(
            c["name"],
            styled(c["status"], STATUS_STYLES),
            f"{c['replicas']['ready']}/{c['replicas']['desired']}",
            f"{100 * sum(cpu):.0f}%" if cpu else "-",
            size(totals.get("memory_rss_bytes")),
            size(totals.get("gpu_memory_used_bytes")),
            str(c["restarts"]),
        )
    return table


GPU_STATE_STYLES = {"free": "green", "allocated": "cyan", "leaked": "bold red"}


def resources_tables(data: Mapping[str, Any]) -> list[Table]:
    """``/v1/resources`` as tables: the GPUs (with the CPU and memory budgets as caption),
    then ports and sockets per replica, then stopped replicas still holding resources."""
    cpu, memory = data.get("cpu") or {}, data.get("memory") or {}
    caption = (
        f"CPU {cpu.get('reserved_cores', 0):g}/{cpu.get('allocatable_cores', 0):g} cores "
        f"reserved · memory {size(memory.get('reserved_bytes'))} / "
        f"{size(memory.get('allocatable_bytes'))} reserved"
    )
    gpus = Table(title="GPUs", title_justify="left", caption=caption, caption_justify="left")
    for header in ("GPU", "UUID", "NAME", "STATE", "OWNERS", "MEMORY", "FOREIGN"):
        gpus.add_column(header, no_wrap=header != "OWNERS")
    for g in data.get("gpus") or []:
        state = styled(str(g["state"]), GPU_STATE_STYLES)
        if g.get("mig_mode"):
            state.append(" (MIG)", style="dim")
        elif g.get("blocked_by_foreign"):
            state.append(" (foreign use)", style="yellow")
        gpus.add_row(
            str(g["index"]),
            short_gpu(str(g["uuid"])),
            str(g.get("name", "")),
            state,
            ", ".join(g.get("owners") or []) or "-",
            f"{size(g.get('memory_used_bytes'))} / {size(g.get('memory_total_bytes'))}",
            size(g.get("foreign_memory_bytes")) if g.get("foreign_memory_bytes") else "-",
        )
    if not data.get("gpus"):
        gpus.add_row("-", "-", f"no GPU: {data.get('gpu_backend', 'unknown')}", "", "", "", "")
    tables = [gpus]
    ports, sockets = data.get("ports") or {}, data.get("sockets") or {}
    if ports or sockets:
        held = Table(title="Ports and sockets", title_justify="left")
        for header in ("REPLICA", "PORTS", "SOCKETS"):
            held.add_column(header, no_wrap=header == "REPLICA")
        for replica in sorted(set(ports) | set(sockets)):
            held.add_row(
                replica,
                pairs(ports.get(replica)),
                pairs(sockets.get(replica)),
            )
        tables.append(held)
    lingering = data.get("lingering") or []
    if lingering:
        stuck = Table(
            title="Stopped replicas still running (their resources stay held)",
            title_justify="left",
        )
        for header in ("REPLICA", "PIDS", "GPUS", "CPU", "MEMORY", "PORTS"):
            stuck.add_column(header, no_wrap=True)
        for entry in lingering:
            r = entry.get("reservation") or {}
            stuck.add_row(
                str(entry["replica"]),
                ",".join(str(p) for p in entry.get("pids") or []) or "-",
                ",".join(short_gpu(u) for u in r.get("gpus") or []) or "-",
                f"{r.get('cpu_cores', 0):g}" if r.get("cpu_cores") else "-",
                size(r.get("memory_bytes")) if r.get("memory_bytes") else "-",
                pairs(r.get("ports")),
            )
        tables.append(stuck)
    return tables


def queue_depth(queue: Mapping[str, Any] | None) -> int | None:
    if not queue or queue.get("status", "ok") != "ok":
        return None
    pending = queue.get("pending")
    return pending if isinstance(pending, int) else None


def queue_reason(queue: Mapping[str, Any] | None) -> str:
    if not queue:
        return "prefill queue: unknown"
    return f"prefill queue: {queue.get('status', 'unavailable')} {queue.get('reason', '')}".strip()


def size(value: object) -> str:
    if not isinstance(value, int | float):
        return "-"
    amount = float(value)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if amount < 1024 or unit == "GiB":
            return f"{amount:.0f} {unit}" if unit == "B" else f"{amount:.1f} {unit}"
        amount /= 1024
    return f"{amount:.1f} GiB"


def duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def pairs(named: Mapping[str, object] | None) -> str:
    """``{"system": 20001, "rpc": 20002}`` as ``system=20001 rpc=20002``; ``-`` for none."""
    return " ".join(f"{k}={v}" for k, v in (named or {}).items()) or "-"


def short_gpu(uuid: str) -> str:
    return uuid[:12] if uuid.startswith("GPU-") else uuid
