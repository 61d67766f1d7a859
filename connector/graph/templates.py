"""``{port.NAME}``, ``{socket.NAME}`` and ``{gpu.FIELD}`` in a service's command, args, envs
and readiness URL: what they may name (checked when the graph loads) and their values for
one replica (filled in when it spawns).

``{gpu.count}`` is how many GPUs the replica holds (1 for a fraction), ``{gpu.fraction}``
its share of each (``1`` for whole GPUs, ``0.5`` for half of one, ``0`` without a GPU) and
``{gpu.uuids}`` their UUIDs, comma-separated: so a command can say
``--tensor-parallel-size {gpu.count}`` or ``--gpu-memory-utilization {gpu.fraction}``.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence

PATTERN = re.compile(r"\{(port|socket|gpu)\.([^{}]*)\}")
GPU_FIELDS = ("count", "fraction", "uuids")

Values = Mapping[str, Mapping[str, str]]  # kind ("port", "socket", "gpu") -> name -> text


def gpu_fields(gpus: Sequence[str], fraction: float) -> dict[str, str]:
    """The ``{gpu.*}`` values of a replica holding ``gpus`` (a share ``fraction`` of one
    GPU, or 0 for whole GPUs)."""
    share = f"{fraction:g}" if fraction else ("1" if gpus else "0")
    return {"count": str(len(gpus)), "fraction": share, "uuids": ",".join(gpus)}


def values_of(
    ports: Mapping[str, int],
    sockets: Mapping[str, str],
    gpu: Mapping[str, str] | None = None,
) -> dict[str, dict[str, str]]:
    """Template values from a replica's allocation (no GPU fields: it holds none)."""
    return {
        "port": {name: str(port) for name, port in ports.items()},
        "socket": dict(sockets),
        "gpu": dict(gpu) if gpu is not None else gpu_fields((), 0.0),
    }


def expand(text: str, values: Values) -> str:
    """``text`` with every template replaced; KeyError names one the replica lacks."""

    def sub(m: re.Match[str]) -> str:
        kind, name = m.groups()
        table = values.get(kind, {})
        if name not in table:
            raise KeyError(f"{m.group(0)} is not allocated to this replica")
        return table[name]

    return PATTERN.sub(sub, text)


def undeclared(text: str, declared: Mapping[str, Sequence[str]]) -> Iterator[tuple[str, str]]:
    """Each template in ``text`` naming nothing declared: (the template, its kind).
    ``declared`` holds the port and socket names; GPU fields are always known."""
    for match in PATTERN.finditer(text):
        kind, name = match.groups()
        known = GPU_FIELDS if kind == "gpu" else declared.get(kind, ())
        if name not in known:
            yield match.group(0), kind
