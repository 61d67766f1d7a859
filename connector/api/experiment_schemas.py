"""JSON Schemas of the experiment routes (``/v1/experiments``) and the live timeline
(``/v1/timeline``), named into :data:`connector.api.schemas.NAMED`. Apart from the other
schemas because the plan's bounds are the plan reader's (:mod:`connector.experiment.plan`):
this module is where the API and the experiment code meet.
"""

from __future__ import annotations

from connector.api.schema_refs import Schema, ref
from connector.experiment import plan as plan_limits
from connector.experiment.timeline import FIXED_COLUMNS

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
# The timeline's figure columns (after t_s, time and phase), as the CSV names them.
_FIGURES = FIXED_COLUMNS[3:]

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


NAMED_EXPERIMENTS: dict[str, Schema] = {
    "ExperimentPlan": EXPERIMENT_PLAN,
    "ExperimentPhase": PLAN_PHASE,
    "Experiment": EXPERIMENT,
    "ExperimentList": EXPERIMENT_LIST,
    "Timeline": TIMELINE,
    "TimelineSample": SAMPLE,
    "TimelineMark": TIMELINE_MARK,
}
