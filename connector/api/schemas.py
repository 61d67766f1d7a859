"""JSON Schemas (2020-12, as OpenAPI 3.1 uses them) of every body the API reads or writes.

The same dicts validate request bodies and query parameters (:mod:`connector.api.validation`)
and appear in the OpenAPI document, so the documented and the enforced shapes cannot drift.
Response schemas list the keys the server always writes as ``required``; extra keys are
allowed where another module (exporter, resources, interop) owns the content.
"""

from __future__ import annotations

from typing import Any

from connector.experiment import plan as plan_limits
from connector.vocabulary import REPLICA_STATES, ComponentStatus, values

Schema = dict[str, Any]

# Upper bounds that keep one request from asking for something absurd.
MAX_REPLICAS = 1024
MAX_WAIT_S = 3600.0
MAX_LOG_LINES = 10_000
MAX_EVENTS = 2000

STATES = list(REPLICA_STATES)
COMPONENT_STATUSES = list(values(ComponentStatus))


def ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def nullable(schema: Schema) -> Schema:
    kind = schema["type"]
    return {**schema, "type": [*kind, "null"] if isinstance(kind, list) else [kind, "null"]}


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

# ------------------------------------------------------------------- experiments
# The plan has the shape of the YAML plan file (connector.experiment.plan), whose reader
# checks it and names the field of what is wrong; the bounds here are the reader's.

_PLAN_NAME: Schema = {
    "type": "string",
    "pattern": r"^[A-Za-z_][A-Za-z0-9_-]*$",
    "minLength": 1,
    "maxLength": plan_limits.MAX_NAME,
}
_TEXT: Schema = {"type": "string", "minLength": 1, "maxLength": plan_limits.MAX_TEXT}
_URL: Schema = {**_TEXT, "pattern": "^https?://"}


def _seconds(*, positive: bool, maximum: float = plan_limits.MAX_SECONDS) -> Schema:
    low = {"exclusiveMinimum": 0} if positive else {"minimum": 0}
    return {"type": "number", **low, "maximum": maximum}


_TOKENS: Schema = {
    "type": ["integer", "object"],
    "description": "a number of tokens, or {mean, stddev} (normally distributed)",
    "minimum": 1,
    "maximum": plan_limits.MAX_TOKENS,
    "required": ["mean"],
    "additionalProperties": False,
    "properties": {
        "mean": {"type": "integer", "minimum": 1, "maximum": plan_limits.MAX_TOKENS},
        "stddev": {"type": "number", "minimum": 0, "maximum": plan_limits.MAX_TOKENS},
    },
}

PLAN_PHASE: Schema = {
    "type": "object",
    "description": "one load phase: `concurrency` (requests in flight) or `requestRate` "
    "(requests/s, with `concurrency` as a cap)",
    "required": ["inputTokens", "outputTokens", "duration"],
    "anyOf": [{"required": ["concurrency"]}, {"required": ["requestRate"]}],
    "dependentRequired": {"arrival": ["requestRate"]},
    "additionalProperties": False,
    "properties": {
        "name": {**_PLAN_NAME, "description": "default phase<N>; unique within the plan"},
        "concurrency": {"type": "integer", "minimum": 1, "maximum": plan_limits.MAX_CONCURRENCY},
        "requestRate": {
            "type": "number",
            "exclusiveMinimum": 0,
            "maximum": plan_limits.MAX_RATE,
        },
        "arrival": {"type": "string", "enum": list(plan_limits.ARRIVALS), "default": "poisson"},
        "inputTokens": _TOKENS,
        "outputTokens": _TOKENS,
        "duration": {**_seconds(positive=True), "description": "seconds"},
    },
}

EXPERIMENT_PLAN: Schema = {
    "type": "object",
    "description": "an experiment plan, as the YAML file `dynamo-local experiment` reads "
    "(README, Run an experiment); a relative `tokenizer` folder is resolved against the "
    "server's current directory",
    "required": ["tokenizer", "phases"],
    "additionalProperties": False,
    "properties": {
        "name": {**_PLAN_NAME, "default": "experiment"},
        "seed": {"type": "integer", "minimum": 0, "maximum": plan_limits.MAX_SEED},
        "tokenizer": {**_TEXT, "description": "a local folder or a Hugging Face id"},
        "model": {**_TEXT, "description": "default: the first model the frontend lists"},
        "prometheus": {
            "type": ["string", "object"],
            "description": "a Prometheus URL, or {url, selector}; default: scrape the "
            "frontend's /metrics",
            "pattern": "^https?://",
            "minLength": 1,
            "maxLength": plan_limits.MAX_TEXT,
            "required": ["url"],
            "additionalProperties": False,
            "properties": {
                "url": _URL,
                "selector": {**_TEXT, "pattern": "^[^{}]*$"},
            },
        },
        "interval": {**_seconds(positive=True, maximum=plan_limits.MAX_INTERVAL_S), "default": 1},
        "window": {
            **_seconds(positive=True),
            "description": "at least `interval`; default 10 (or `interval` if longer)",
        },
        "gracePeriod": {**_seconds(positive=False), "default": 30},
        "cooldown": {**_seconds(positive=False), "default": 0},
        "slo": {
            "type": "object",
            "additionalProperties": False,
            "properties": {key: _seconds(positive=True) for key in plan_limits.SLO_COLUMNS},
        },
        "phases": {
            "type": "array",
            "minItems": 1,
            "maxItems": plan_limits.MAX_PHASES,
            "items": ref("ExperimentPhase"),
        },
    },
}

_NUMBER_OR_NULL: Schema = {"type": ["number", "null"]}
_COUNT_OR_NULL: Schema = {"type": ["integer", "null"], "minimum": 0}
_FIGURES = (
    "target_concurrency",
    "target_request_rate",
    "request_rate",
    "errors_per_s",
    "inflight",
    "ttft_p50_s",
    "ttft_p99_s",
    "itl_p50_s",
    "itl_p99_s",
)

TIMELINE_MARK: Schema = {
    "type": "object",
    "description": "an event of the sample's second (scale, decision, ready, exit, ...)",
    "required": ["seq", "time", "kind", "text"],
    "additionalProperties": False,
    "properties": {
        "seq": {"type": "integer", "minimum": 0},
        "time": {"type": "number"},
        "kind": {"type": "string"},
        "text": {"type": "string", "description": "as the timeline.csv events column says it"},
        "component": {"type": "string"},
        "replica": {"type": "string"},
        "source": {"type": "string"},
        "from_replicas": {"type": "integer"},
        "to_replicas": {"type": "integer"},
        "outcome": {"type": "string"},
        "duration_s": {"type": "number"},
    },
}

SAMPLE: Schema = {
    "type": "object",
    "description": "one second of the timeline: the columns of timeline.csv (README, Run "
    "an experiment); the frontend's figures are null where there was no data",
    "required": ["time", "phase", *_FIGURES, "components", "events"],
    "additionalProperties": False,
    "properties": {
        "seq": {"type": "integer", "minimum": 1, "description": "live timeline only"},
        "t": {"type": "number", "description": "seconds since the experiment started"},
        "time": {"type": "number", "description": "Unix time"},
        "phase": {"type": "string", "description": "the load phase running, or empty"},
        **{key: _NUMBER_OR_NULL for key in _FIGURES},
        "components": {
            "type": "object",
            "additionalProperties": {
                "type": "object",
                "required": ["desired", "ready", "running", "cpu_cores", "rss_bytes"],
                "additionalProperties": False,
                "properties": {
                    "desired": _COUNT_OR_NULL,
                    "ready": _COUNT_OR_NULL,
                    "running": _COUNT_OR_NULL,
                    "cpu_cores": _NUMBER_OR_NULL,
                    "rss_bytes": _COUNT_OR_NULL,
                },
            },
        },
        "events": {"type": "array", "items": {"type": "string"}},
        "marks": {"type": "array", "items": ref("TimelineMark"), "description": "live only"},
    },
}

_TIME_OR_NULL: Schema = {"type": ["number", "null"], "description": "Unix time"}

EXPERIMENT: Schema = {
    "type": "object",
    "required": [
        "id",
        "name",
        "state",
        "phase",
        "progress",
        "created_at",
        "started_at",
        "finished_at",
        "folder",
        "phases",
        "error",
        "report",
    ],
    "additionalProperties": False,
    "properties": {
        "id": {"type": "string", "description": "<plan name>-<date>-<time>: its run folder"},
        "name": {"type": "string"},
        "state": {"type": "string", "enum": ["running", "succeeded", "failed", "cancelled"]},
        "phase": {
            "type": ["string", "null"],
            "description": "what it does now: waiting for the frontend, aiperf starting, a "
            "phase's name, requests finishing, cool-down, cancelling; null once it ended",
        },
        "progress": {
            "type": "object",
            "required": ["done_s", "total_s", "fraction"],
            "additionalProperties": False,
            "properties": {
                "done_s": {"type": "number", "minimum": 0},
                "total_s": {"type": "number", "minimum": 0},
                "fraction": {"type": "number", "minimum": 0, "maximum": 1},
            },
        },
        "created_at": {"type": "number"},
        "started_at": {**_TIME_OR_NULL, "description": "when sampling started"},
        "finished_at": _TIME_OR_NULL,
        "folder": {"type": "string", "description": "the run folder on the server"},
        "phases": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["name", "description", "start", "end"],
                "additionalProperties": False,
                "properties": {
                    "name": {"type": "string"},
                    "description": {"type": "string"},
                    "start": _TIME_OR_NULL,
                    "end": _TIME_OR_NULL,
                },
            },
        },
        "error": {"type": ["string", "null"]},
        "report": {
            "type": ["string", "null"],
            "description": "the report's path once the run folder has one",
        },
        "latest_sample": {
            "anyOf": [ref("TimelineSample"), {"type": "null"}],
            "description": "the newest timeline row (not in listings)",
        },
        "summary": {
            "type": ["object", "null"],
            "description": "summary.json once the run ended (not in listings)",
        },
    },
}

EXPERIMENT_LIST: Schema = {
    "type": "object",
    "required": ["experiments", "running", "kept"],
    "additionalProperties": False,
    "properties": {
        "experiments": {"type": "array", "items": ref("Experiment"), "description": "newest first"},
        "running": {"type": ["string", "null"]},
        "kept": {"type": "integer", "minimum": 1, "description": "how many runs are kept"},
    },
}

TIMELINE: Schema = {
    "type": "object",
    "required": [
        "interval_s",
        "window_s",
        "capacity",
        "sampling",
        "last_seq",
        "components",
        "frontends",
        "samples",
        "experiment",
    ],
    "additionalProperties": False,
    "properties": {
        "interval_s": {"type": "number"},
        "window_s": {"type": "number", "description": "the rates' and percentiles' window"},
        "capacity": {"type": "integer", "description": "samples kept (15 minutes)"},
        "sampling": {"type": "boolean"},
        "last_seq": {"type": "integer", "minimum": 0},
        "components": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["name", "role"],
                "additionalProperties": False,
                "properties": {"name": {"type": "string"}, "role": {"type": "string"}},
            },
        },
        "frontends": {"type": "array", "items": {"type": "string"}},
        "samples": {"type": "array", "items": ref("TimelineSample")},
        "experiment": {
            "type": ["object", "null"],
            "description": "the running experiment (or the latest, if it ended within the "
            "timeline's span): id, name, state, phase, progress, phases, report, error",
        },
    },
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
    "ExperimentPlan": EXPERIMENT_PLAN,
    "ExperimentPhase": PLAN_PHASE,
    "Experiment": EXPERIMENT,
    "ExperimentList": EXPERIMENT_LIST,
    "Timeline": TIMELINE,
    "TimelineSample": SAMPLE,
    "TimelineMark": TIMELINE_MARK,
}


def resolve(schema: Schema) -> Schema:
    """Follow a local ``$ref`` (one level) to the named schema."""
    target = schema.get("$ref")
    if isinstance(target, str):
        return NAMED[target.rsplit("/", 1)[-1]]
    return schema
