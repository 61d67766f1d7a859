"""Dynamo's discovery formats: keys, values and the file backend's layout.

One place knows how Dynamo names an instance (verified against
ai-dynamo-runtime 1.6.1): the mock worker writes with these functions and the discovery
watcher reads with them, so the two can never disagree.

Formats read (only the first is ever written):

* ``v1/instances/{ns}/{component}/{endpoint}/{instance_id:x}`` (current)
* ``instances/{ns}/{component}/{endpoint}:{lease:x}`` (2025)
* ``{ns}/components/{component}/{endpoint}:{lease:x}`` (early 2025)
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

V1_PREFIX = "v1/instances/"
MDC_PREFIX = "v1/mdc/"
LEGACY_2025_PREFIX = "instances/"

_V1 = re.compile(r"^v1/instances/([^/]+)/([^/]+)/([^/]+)/([0-9a-fA-F]+)$")
_2025 = re.compile(r"^instances/([^/]+)/([^/]+)/([^/:]+):([0-9a-fA-F]+)$")
_EARLY_2025 = re.compile(r"^([^/]+)/components/([^/]+)/([^/:]+):([0-9a-fA-F]+)$")


@dataclass(frozen=True)
class InstanceKey:
    namespace: str
    component: str
    endpoint: str
    instance_id: int  # u64; equals the etcd lease id of the registering process
    format: str = "v1"  # "v1" | "2025" | "early-2025"

    @property
    def key(self) -> str:
        if self.format == "2025":
            return (
                f"instances/{self.namespace}/{self.component}/{self.endpoint}:{self.instance_id:x}"
            )
        if self.format == "early-2025":
            return (
                f"{self.namespace}/components/{self.component}/{self.endpoint}:{self.instance_id:x}"
            )
        return instance_key(self.namespace, self.component, self.endpoint, self.instance_id)


def instance_key(namespace: str, component: str, endpoint: str, instance_id: int) -> str:
    """The current (v1) etcd key of an instance; the id is lowercase hex."""
    return f"{V1_PREFIX}{namespace}/{component}/{endpoint}/{instance_id:x}"


def parse_instance_key(key: str) -> InstanceKey | None:
    """Parse any of the three known key formats; ``None`` for anything else."""
    for pattern, fmt in ((_V1, "v1"), (_2025, "2025"), (_EARLY_2025, "early-2025")):
        m = pattern.match(key)
        if m:
            ns, comp, ep, hex_id = m.groups()
            return InstanceKey(ns, comp, ep, int(hex_id, 16), fmt)
    return None


def instance_value(
    namespace: str,
    component: str,
    endpoint: str,
    instance_id: int,
    host: str,
    port: int,
    device_type: str = "cpu",
) -> dict[str, Any]:
    """The JSON value Dynamo 1.6 stores for an instance."""
    return {
        "type": "Endpoint",
        "namespace": namespace,
        "component": component,
        "endpoint": endpoint,
        "instance_id": instance_id,
        "transport": {"tcp": f"{host}:{port}/{instance_id:x}/{namespace}/{component}/{endpoint}"},
        "device_type": device_type,
        "request_plane_codec": "msgpack",
    }


def encode_value(value: dict[str, Any]) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def decode_value(raw: bytes | str) -> dict[str, Any] | None:
    """Decode an instance value. JSON ints stay Python ints, so u64 ids above 2^53 are exact."""
    try:
        value = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None
    return value if isinstance(value, dict) else None


_ADDR = re.compile(r"^\[?([^\]/]+?)\]?:(\d+)(?:/|$)")


def transport_address(value: dict[str, Any]) -> tuple[str, int] | None:
    """(host, port) a registered instance advertises, from ``tcp`` or legacy ``nats_tcp``."""
    transport = value.get("transport")
    if not isinstance(transport, dict):
        return None
    for kind in ("tcp", "nats_tcp"):
        addr = transport.get(kind)
        if isinstance(addr, str):
            m = _ADDR.match(addr)
            if m:
                return m.group(1), int(m.group(2))
    return None


def file_path(root: Path, key: str) -> Path:
    """Where the file backend (``DYN_FILE_KV=root``) keeps ``key``.

    The part after ``v1/instances/`` is percent-encoded into a single file name.
    """
    if key.startswith(V1_PREFIX):
        return root / "v1" / "instances" / quote(key[len(V1_PREFIX) :], safe="")
    head, _, tail = key.rpartition("/")
    return root / head / quote(tail, safe="")


def key_from_file(root: Path, path: Path) -> str | None:
    """Inverse of :func:`file_path` for instance files; ``None`` for unrelated files."""
    try:
        rel = path.relative_to(root / "v1" / "instances")
    except ValueError:
        return None
    if len(rel.parts) != 1 or rel.name.startswith("."):
        return None
    return V1_PREFIX + unquote(rel.name)
