"""JSON Schemas (2020-12, as OpenAPI 3.1 uses them) of every body the API reads or writes.

The same dicts validate request bodies and query parameters (:mod:`connector.api.validation`)
and appear in the OpenAPI document, so the documented and the enforced shapes cannot drift.
Response schemas list the keys the server always writes as ``required``; extra keys are
allowed where another module (exporter, resources, interop) owns the content.
"""

from __future__ import annotations

from connector.api.experiment_schemas import NAMED_EXPERIMENTS
from connector.api.schema_refs import Schema, ref
from connector.vocabulary import REPLICA_STATES, ComponentStatus, values

# Upper bounds that keep one request from asking for something absurd.
MAX_REPLICAS = 1024
MAX_WAIT_S = 3600.0
MAX_LOG_LINES = 10_000
MAX_EVENTS = 2000

STATES = list(REPLICA_STATES)
COMPONENT_STATUSES = list(values(ComponentStatus))


ERROR: Schema = {
    "type": "object",
    "required": ["error"],
    "additionalProperties": False,
    "properties": {
        "error": {
            "type": "object",
            "required": ["code", "message", "details"],
            "additionalProperties": False,
            "properties": {
                "code": {"type": "string", "description": "stable machine-readable code"},
                "message": {"type": "string", "description": "one line for a person"},
                "details": {"type": "object"},
            },
        }
    },
}

REPLICA_COUNTS: Schema = {
    "type": "object",
    "required": ["desired", "running", "ready", "min", "max"],
    "additionalProperties": False,
    "properties": {
        "desired": {"type": "integer", "minimum": 0},
        "running": {"type": "integer", "minimum": 0},
        "ready": {"type": "integer", "minimum": 0},
        "min": {"type": "integer", "minimum": 0},
        "max": {"type": ["integer", "null"], "minimum": 0},
    },
}

COMPONENT: Schema = {
    "type": "object",
    "required": [
        "name",
        "role",
        "sub_component_type",
        "dynamo_namespace",
        "status",
        "replicas",
        "restarts",
        "crashloops",
        "scale_in_flight",
        "reason",
    ],
    "additionalProperties": False,
    "properties": {
        "name": {"type": "string"},
        "role": {"type": "string", "enum": ["frontend", "router", "worker", "planner"]},
        "sub_component_type": {"type": ["string", "null"], "enum": ["prefill", "decode", None]},
        "dynamo_namespace": {"type": "string"},
        "status": {"type": "string", "enum": COMPONENT_STATUSES},
        "replicas": ref("ReplicaCounts"),
        "restarts": {"type": "integer", "minimum": 0},
        "crashloops": {"type": "integer", "minimum": 0},
        "scale_in_flight": {"type": "boolean"},
        "reason": {"type": ["string", "null"]},
    },
}

REPLICA: Schema = {
    "type": "object",
    "required": [
        "replica",
        "component",
        "watcher",
        "state",
        "ready",
        "pid",
        "started_at",
        "restarts",
        "last_exit_code",
        "gpus",
        "gpu_fraction",
        "cpu_cores",
        "memory_bytes",
        "ports",
        "sockets",
    ],
    "additionalProperties": False,
    "properties": {
        "replica": {"type": "string", "description": "ordinal, the `replica` metric label"},
        "component": {"type": "string"},
        "watcher": {"type": "string"},
        "state": {"type": "string", "enum": STATES},
        "ready": {"type": "boolean"},
        "pid": {"type": ["integer", "null"]},
        "started_at": {"type": ["number", "null"], "description": "Unix time"},
        "restarts": {"type": "integer", "minimum": 0},
        "last_exit_code": {"type": ["integer", "null"]},
        "gpus": {"type": "array", "items": {"type": "string"}},
        "gpu_fraction": {"type": "number", "minimum": 0},
        "cpu_cores": {"type": "number", "minimum": 0},
        "memory_bytes": {"type": "integer", "minimum": 0},
        "ports": {"type": "object", "additionalProperties": {"type": "integer"}},
        "sockets": {"type": "object", "additionalProperties": {"type": "string"}},
    },
}

COMPONENT_LIST: Schema = {
    "type": "object",
    "required": ["namespace", "components"],
    "additionalProperties": False,
    "properties": {
        "namespace": {"type": "string"},
        "components": {"type": "array", "items": ref("Component")},
    },
}

COMPONENT_DETAIL: Schema = {
    "type": "object",
    "required": ["component", "replicas"],
    "additionalProperties": False,
    "properties": {
        "component": ref("Component"),
        "replicas": {"type": "array", "items": ref("Replica")},
    },
}

REPLICA_SET: Schema = {
    "type": "object",
    "required": ["component", "desired", "running", "ready", "replicas"],
    "additionalProperties": False,
    "properties": {
        "component": {"type": "string"},
        "desired": {"type": "integer", "minimum": 0},
        "running": {"type": "integer", "minimum": 0},
        "ready": {"type": "integer", "minimum": 0},
        "replicas": {"type": "array", "items": ref("Replica")},
    },
}

WAIT_PROPERTIES: Schema = {
    "wait": {
        "type": "boolean",
        "default": False,
        "description": "answer only when the component has converged "
        "(or `timeout_s` ran out: 202 with converged false)",
    },
    "timeout_s": {
        "type": "number",
        "exclusiveMinimum": 0,
        "maximum": MAX_WAIT_S,
        "description": "how long to wait when `wait` is true (default: the connector's "
        "scale timeout)",
    },
}

SCALE_REQUEST: Schema = {
    "type": "object",
    "required": ["replicas"],
    "additionalProperties": False,
    "properties": {
        "replicas": {"type": "integer", "minimum": 0, "maximum": MAX_REPLICAS},
        **WAIT_PROPERTIES,
    },
}

RESTART_REQUEST: Schema = {
    "type": "object",
    "additionalProperties": False,
    "properties": dict(WAIT_PROPERTIES),
}

OPERATION_RESULT: Schema = {
    "type": "object",
    "required": ["component", "operation", "target", "waited", "converged", "state"],
    "additionalProperties": False,
    "properties": {
        "component": {"type": "string"},
        "operation": {"type": "string", "enum": ["scale", "restart"]},
        "target": {"type": "integer", "minimum": 0},
        "waited": {"type": "boolean"},
        "converged": {
            "type": "boolean",
            "description": "every desired replica is ready; false after a wait that ran out "
            "of time (the target stays set and the loop keeps converging)",
        },
        "reason": {"type": "string", "description": "why a wait ended unconverged"},
        "state": ref("Component"),
    },
}

LOGS: Schema = {
    "type": "object",
    "required": ["component", "lines"],
    "additionalProperties": False,
    "properties": {
        "component": {"type": "string"},
        "lines": {
            "type": "array",
            "items": {"type": "string"},
            "description": "newest last; each line is `[<replica> <stream>] <time> <text>`",
        },
    },
}

EVENT: Schema = {
    "type": "object",
    "required": ["seq", "time", "kind"],
    "properties": {
        "seq": {"type": "integer", "minimum": 1},
        "time": {"type": "number"},
        "kind": {"type": "string"},
        "component": {"type": "string"},
        "replica": {"type": "string"},
        "source": {"type": "string"},
        "from_replicas": {"type": "integer"},
        "to_replicas": {"type": "integer"},
        "outcome": {"type": "string"},
        "reason": {"type": "string"},
        "duration_s": {"type": "number"},
        "trace_id": {"type": "string"},
        "details": {"type": "object"},
    },
}

EVENT_LIST: Schema = {
    "type": "object",
    "required": ["events", "last_seq"],
    "additionalProperties": False,
    "properties": {
        "events": {"type": "array", "items": ref("Event")},
        "last_seq": {"type": "integer", "minimum": 0},
    },
}

# Owned by other modules (exporter usage, interop, resources): the keys they always write.
COMPONENT_USAGE: Schema = {
    "type": "object",
    "required": ["component", "replicas"],
    "properties": {
        "component": {"type": "string"},
        "namespace": {"type": "string"},
        "replicas": {"type": "array", "items": {"type": "object"}},
        "totals": {"type": "object"},
    },
}

TOPOLOGY: Schema = {"type": "object", "description": "nodes and edges of the running graph"}

PREFILL_QUEUE: Schema = {
    "type": "object",
    "description": "prefill queue depth and rates (keys documented in docs/metrics.md)",
}

_COUNT: Schema = {"type": "integer", "minimum": 0}
_BY_REPLICA: Schema = {"type": "object", "additionalProperties": {"type": "object"}}

_GPU_PROPERTIES: Schema = {
    "index": _COUNT,
    "uuid": {"type": "string"},
    "name": {"type": "string"},
    "state": {"type": "string", "enum": ["free", "allocated", "leaked"]},
    "owners": {
        "type": "array",
        "items": {"type": "string"},
        "description": "replica ids; a stopped replica whose processes still run is named "
        "'Decode/1 (stopped; processes still running)'",
    },
    "fraction_used": {"type": "number", "minimum": 0, "maximum": 1},
    "memory_total_bytes": _COUNT,
    "memory_used_bytes": {**_COUNT, "description": "as of the last NVML reading, if any"},
    "foreign_memory_bytes": {**_COUNT, "description": "used by processes not ours"},
    "blocked_by_foreign": {"type": "boolean"},
    "mig_mode": {"type": ["boolean", "null"]},
}

GPU_ALLOCATION: Schema = {
    "type": "object",
    "required": [k for k in _GPU_PROPERTIES if k != "memory_used_bytes"],
    "properties": _GPU_PROPERTIES,
}

_MACHINE_PROPERTIES: Schema = {
    "gpus": {"type": "array", "items": ref("GpuAllocation")},
    "free_gpus": _COUNT,
    "gpu_backend": {"type": "string", "description": "'ok', or why there is no GPU"},
    "cpu": {
        "type": "object",
        "required": ["allocatable_cores", "reserved_cores", "pinned"],
        "properties": {
            "allocatable_cores": {"type": "number", "minimum": 0},
            "reserved_cores": {"type": "number", "minimum": 0},
            "pinned": {"type": "array", "items": _COUNT},
        },
    },
    "memory": {
        "type": "object",
        "required": ["allocatable_bytes", "reserved_bytes"],
        "properties": {"allocatable_bytes": _COUNT, "reserved_bytes": _COUNT},
    },
    "ports": {**_BY_REPLICA, "description": "replica -> {port name: port}"},
    "sockets": {**_BY_REPLICA, "description": "replica -> {socket name: path}"},
    "port_range": {"type": "array", "items": _COUNT, "minItems": 2, "maxItems": 2},
    "lingering": {
        "type": "array",
        "description": "stopped replicas whose processes outlived their release, with what "
        "they still hold",
        "items": {
            "type": "object",
            "required": ["replica", "pids", "reservation"],
            "properties": {
                "replica": {"type": "string"},
                "pids": {"type": "array", "items": _COUNT},
                "reservation": {"type": "object"},
            },
        },
    },
}

MACHINE_RESOURCES: Schema = {
    "type": "object",
    "description": "who holds each GPU, the CPU and memory budgets, ports and sockets per "
    "replica, and what stopped replicas still hold",
    "required": list(_MACHINE_PROPERTIES),
    "properties": _MACHINE_PROPERTIES,
}

HEALTH: Schema = {
    "type": "object",
    "required": ["status", "namespace", "uptime_s"],
    "additionalProperties": False,
    "properties": {
        "status": {"type": "string", "enum": ["ok"]},
        "namespace": {"type": "string"},
        "uptime_s": {"type": "number", "minimum": 0},
    },
}

CHECK: Schema = {
    "type": "object",
    "required": ["ok", "detail"],
    "additionalProperties": False,
    "properties": {"ok": {"type": "boolean"}, "detail": {"type": "string"}},
}

READINESS: Schema = {
    "type": "object",
    "required": ["status", "checks"],
    "additionalProperties": False,
    "properties": {
        "status": {"type": "string", "enum": ["ready"]},
        "checks": {"type": "object", "additionalProperties": ref("Check")},
    },
}

SHUTDOWN: Schema = {
    "type": "object",
    "required": ["status"],
    "additionalProperties": False,
    "properties": {"status": {"type": "string", "enum": ["shutting_down"]}},
}

PROMETHEUS_TARGET_GROUP: Schema = {
    "type": "object",
    "description": "one scrape target and its labels (Prometheus HTTP service discovery)",
    "required": ["targets", "labels"],
    "additionalProperties": False,
    "properties": {
        "targets": {
            "type": "array",
            "items": {"type": "string", "description": "host:port"},
            "minItems": 1,
        },
        "labels": {
            "type": "object",
            "description": "`__metrics_path__`, `dynamo_namespace` and `role` (frontend, "
            "worker, router, planner or connector); replicas also `dynamo_component` (the "
            "graph's service name) and `replica` (the ordinal), as on dynamo_local_* series",
            "required": ["__metrics_path__", "dynamo_namespace", "role"],
            "additionalProperties": {"type": "string"},
        },
    },
}

PROMETHEUS_TARGETS: Schema = {
    "type": "array",
    "items": ref("PrometheusTargetGroup"),
}

# Named schemas, referenced as #/components/schemas/<name>.
NAMED: dict[str, Schema] = {
    "Error": ERROR,
    "ReplicaCounts": REPLICA_COUNTS,
    "Component": COMPONENT,
    "Replica": REPLICA,
    "ComponentList": COMPONENT_LIST,
    "ComponentDetail": COMPONENT_DETAIL,
    "ReplicaSet": REPLICA_SET,
    "ScaleRequest": SCALE_REQUEST,
    "RestartRequest": RESTART_REQUEST,
    "OperationResult": OPERATION_RESULT,
    "Logs": LOGS,
    "Event": EVENT,
    "EventList": EVENT_LIST,
    "ComponentUsage": COMPONENT_USAGE,
    "Topology": TOPOLOGY,
    "PrefillQueue": PREFILL_QUEUE,
    "MachineResources": MACHINE_RESOURCES,
    "GpuAllocation": GPU_ALLOCATION,
    "Health": HEALTH,
    "Check": CHECK,
    "Readiness": READINESS,
    "Shutdown": SHUTDOWN,
    "PrometheusTargetGroup": PROMETHEUS_TARGET_GROUP,
    "PrometheusTargets": PROMETHEUS_TARGETS,
    **NAMED_EXPERIMENTS,
}


def resolve(schema: Schema) -> Schema:
    """Follow a local ``$ref`` (one level) to the named schema."""
    target = schema.get("$ref")
    if isinstance(target, str):
        return NAMED[target.rsplit("/", 1)[-1]]
    return schema
