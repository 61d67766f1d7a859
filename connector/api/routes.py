"""The route table: the one place that says which routes exist, what they accept and answer.

The application registers its routes from :data:`ROUTES`, the validation middleware checks
inputs against the schemas declared here, the auth middleware reads ``mutating``/``public``,
and :mod:`connector.api.openapi` renders the same table as OpenAPI 3.1. A route cannot be served
without being documented, nor documented with a shape it does not enforce.
"""

from __future__ import annotations

from connector.api import experiments as x
from connector.api import handlers as h
from connector.api import schemas as s
from connector.api import timeline, vendor
from connector.api.schema_refs import ref
from connector.api.spec import COMPONENT_NAME, Body, Param, Route

NAME = Param("name", COMPONENT_NAME, "component name as written in the graph", required=True)
COMPONENT_ERRORS = (404, 503)
EXPERIMENT_ID = Param(
    "id",
    {"type": "string", "pattern": r"^[A-Za-z0-9_][A-Za-z0-9_-]*$", "maxLength": 160},
    "the experiment's id (`<plan name>-<date>-<time>`, as POST answered)",
    required=True,
)


def _json(schema_name: str, description: str) -> tuple[str, tuple[Body, ...]]:
    return description, (Body(ref(schema_name)),)


ROUTES: tuple[Route, ...] = (
    Route(
        "GET",
        "/v1/components",
        h.list_components,
        "listComponents",
        "Every component with its status and replica counts",
        "components",
        responses={200: _json("ComponentList", "components of the graph")},
        errors=(503,),
    ),
    Route(
        "GET",
        "/v1/components/{name}",
        h.get_component,
        "getComponent",
        "One component and its replicas",
        "components",
        path_params=(NAME,),
        responses={200: _json("ComponentDetail", "the component and its replicas")},
        errors=COMPONENT_ERRORS,
    ),
    Route(
        "GET",
        "/v1/components/{name}/replicas",
        h.get_replicas,
        "getReplicas",
        "Desired, running and ready replicas of a component",
        "scaling",
        path_params=(NAME,),
        responses={200: _json("ReplicaSet", "replica counts and the replicas")},
        errors=COMPONENT_ERRORS,
    ),
    Route(
        "PUT",
        "/v1/components/{name}/replicas",
        h.put_replicas,
        "scaleComponent",
        "Set a component's replica count",
        "scaling",
        description=(
            "Sets the target and returns 202 at once, or with `wait` returns 200 when every "
            "desired replica is ready. 409: outside minReplicas..maxReplicas, component in "
            "crashloop, not enough GPUs/CPU/memory, or superseded by a newer target while "
            "waiting. With `wait`, 202 and `converged: false` when `timeout_s` ran out (the target "
            "stays set and the loop keeps converging)."
        ),
        path_params=(NAME,),
        body=ref("ScaleRequest"),
        body_required=True,
        responses={
            200: _json("OperationResult", "converged (with wait)"),
            202: _json("OperationResult", "target set; the loop is converging"),
        },
        errors=(400, 404, 409, 413, 415, 422, 503, 504),
        timeout_s=None,
    ),
    Route(
        "POST",
        "/v1/components/{name}/restart",
        h.restart_component,
        "restartComponent",
        "Replace every replica of a component and clear its crash loop",
        "scaling",
        path_params=(NAME,),
        body=ref("RestartRequest"),
        responses={
            200: _json("OperationResult", "every replica replaced and ready (with wait)"),
            202: _json("OperationResult", "restart started"),
        },
        errors=(400, 404, 409, 413, 415, 422, 503, 504),
        timeout_s=None,
    ),
    Route(
        "GET",
        "/v1/components/{name}/logs",
        h.get_logs,
        "getLogs",
        "Newest log lines of a component's replicas, merged in time order",
        "components",
        path_params=(NAME,),
        query=(
            Param(
                "lines",
                {"type": "integer", "minimum": 0, "maximum": s.MAX_LOG_LINES, "default": 100},
                "how many lines (newest)",
            ),
            Param(
                "replica",
                {"type": "string", "pattern": r"^([A-Za-z0-9_.-]+/)?[0-9]{1,9}$", "maxLength": 270},
                "only this replica (ordinal, or component/ordinal)",
            ),
            Param(
                "stream",
                {"type": "string", "enum": ["stdout", "stderr", "both"], "default": "both"},
                "which output stream",
            ),
        ),
        responses={200: _json("Logs", "log lines, newest last")},
        errors=(400, 404, 422, 503),
    ),
    Route(
        "GET",
        "/v1/components/{name}/metrics",
        h.get_metrics,
        "getComponentMetrics",
        "CPU, memory and GPU usage of a component from the latest sample",
        "components",
        path_params=(NAME,),
        responses={200: _json("ComponentUsage", "usage per replica and totals")},
        errors=COMPONENT_ERRORS,
    ),
    Route(
        "GET",
        "/v1/components/{name}/resources",
        h.get_component_resources,
        "getComponentResources",
        "What each replica of a component has allocated and uses",
        "components",
        path_params=(NAME,),
        responses={200: _json("ComponentUsage", "allocation and usage per replica")},
        errors=COMPONENT_ERRORS,
    ),
    Route(
        "GET",
        "/v1/topology",
        h.get_topology,
        "getTopology",
        "The graph's components, their live replicas and the edges between them",
        "graph",
        query=(
            Param(
                "format",
                {"type": "string", "enum": ["json", "dot", "mermaid"], "default": "json"},
                "json, Graphviz dot, or Mermaid",
            ),
        ),
        responses={
            200: (
                "the topology",
                (
                    Body(ref("Topology")),
                    Body({"type": "string"}, "text/vnd.graphviz"),
                    Body({"type": "string"}, "text/plain"),
                ),
            )
        },
        errors=(400, 503),
    ),
    Route(
        "GET",
        "/v1/prefill-queue",
        h.get_prefill_queue,
        "getPrefillQueue",
        "Prefill queue depth and rates (NATS JetStream)",
        "graph",
        responses={200: _json("PrefillQueue", "queue metrics, or why they are unavailable")},
        errors=(503,),
    ),
    Route(
        "GET",
        "/v1/resources",
        h.get_resources,
        "getResources",
        "The machine's GPUs with their allocation, and the CPU and memory budgets",
        "graph",
        responses={200: _json("MachineResources", "allocation map")},
        errors=(503,),
    ),
    Route(
        "GET",
        "/v1/events",
        h.get_events,
        "getEvents",
        "Scale, restart, crash and Planner events (JSON, or live as Server-Sent Events)",
        "events",
        description=(
            "With `Accept: text/event-stream` the answer is a live stream: one message per "
            "event (`id` = seq, `data` = the event JSON), a comment every 15 s, "
            "`event: shutdown` when the server stops. A reconnecting client sends "
            "`Last-Event-ID` (or `since`) and gets what it missed."
        ),
        query=(
            Param("since", {"type": "integer", "minimum": 0}, "only events with seq > since"),
            Param(
                "limit",
                {"type": "integer", "minimum": 1, "maximum": s.MAX_EVENTS},
                "at most this many (the newest) events; JSON only",
            ),
        ),
        responses={
            200: (
                "events",
                (Body(ref("EventList")), Body({"type": "string"}, "text/event-stream")),
            )
        },
        errors=(400, 422, 503),
        timeout_s=None,
    ),
    Route(
        "POST",
        "/v1/experiments",
        x.post_experiment,
        "startExperiment",
        "Run an experiment: load phases with aiperf while the graph scales",
        "experiments",
        description=(
            "The plan is the YAML plan file's document, as JSON or as YAML text "
            "(`Content-Type: application/yaml`). Runs inside the connector with the runner "
            "of `dynamo-local experiment`, one at a time: 202 with the run (its `id`, "
            "`Location`), 409 `experiment_running` naming the running one, 422 "
            "`invalid_plan` naming the field, 503 `aiperf_missing`. The run folder is "
            "`<working dir>/experiments/<id>`; a relative `tokenizer` folder is resolved "
            "against the server's current directory."
        ),
        body=ref("ExperimentPlan"),
        body_required=True,
        body_types=("application/json", "application/yaml"),
        validate_body=False,
        responses={202: _json("Experiment", "started")},
        errors=(400, 409, 413, 415, 422, 503),
    ),
    Route(
        "GET",
        "/v1/experiments",
        x.list_experiments,
        "listExperiments",
        "The recent experiments (the last 20), newest first",
        "experiments",
        responses={200: _json("ExperimentList", "experiments")},
    ),
    Route(
        "GET",
        "/v1/experiments/{id}",
        x.get_experiment,
        "getExperiment",
        "One experiment: state, phase, progress, latest sample, summary once done",
        "experiments",
        path_params=(EXPERIMENT_ID,),
        responses={200: _json("Experiment", "the experiment")},
        errors=(404,),
    ),
    Route(
        "DELETE",
        "/v1/experiments/{id}",
        x.cancel_experiment,
        "cancelExperiment",
        "Cancel a running experiment (aiperf is stopped; what was sampled is written)",
        "experiments",
        description=(
            "Answers 200 with the cancelled run once aiperf has stopped and the run folder "
            "is written (timeline, events, summary, report of what was sampled), or 202 if "
            "that took longer than 45 s (GET shows when it is done). 409 "
            "`experiment_finished` if it is not running."
        ),
        path_params=(EXPERIMENT_ID,),
        responses={
            200: _json("Experiment", "cancelled"),
            202: _json("Experiment", "cancelling"),
        },
        errors=(404, 409),
        timeout_s=None,
    ),
    Route(
        "GET",
        "/v1/experiments/{id}/report",
        x.get_report,
        "getExperimentReport",
        "The experiment's report.html (self-contained, sandboxed)",
        "experiments",
        description="409 `experiment_running` before the run ends; 404 `no_report` if it "
        "ended without one (failed before sampling, or plotly missing).",
        path_params=(EXPERIMENT_ID,),
        responses={200: ("the report", (Body({"type": "string"}, "text/html"),))},
        errors=(404, 409),
    ),
    Route(
        "GET",
        "/v1/timeline",
        timeline.get_timeline,
        "getTimeline",
        "The live timeline of the last 15 minutes (what the status page charts)",
        "events",
        description=(
            "One sample a second: each component's desired/ready/running replicas, CPU "
            "and RSS; the frontend's request rate, errors, requests in flight, TTFT and ITL "
            "p50/p99 (from its own /metrics); the events of that second; the phase of a "
            "running experiment. Sampling starts with the first read and stops two minutes "
            "after the last one (no experiment running). `since`: only samples after that "
            "`seq` (a cursor above `last_seq`, from before a restart, gets them all)."
        ),
        query=(Param("since", {"type": "integer", "minimum": 0}, "only samples with seq > since"),),
        responses={200: _json("Timeline", "samples, oldest first")},
        errors=(400, 422),
    ),
    Route(
        "GET",
        "/v1/prometheus/targets",
        h.prometheus_targets,
        "getPrometheusTargets",
        "Scrape targets for Prometheus' HTTP service discovery (http_sd_configs)",
        "operations",
        description=(
            "One target group per running replica (starting or ready, with a pid) whose "
            "metrics port is known: workers, routers and the Planner on their `system` "
            "port, the frontend on its `http` port, all on 127.0.0.1; plus the connector's "
            "own `/metrics` at the address this request reached, when it serves one."
        ),
        responses={200: _json("PrometheusTargets", "target groups")},
        errors=(503,),
    ),
    Route(
        "POST",
        "/v1/shutdown",
        h.shutdown,
        "shutdown",
        "Stop every replica and the server (what `dynamo-local down` calls)",
        "operations",
        responses={202: _json("Shutdown", "shutdown started")},
        errors=(503,),
    ),
    Route(
        "GET",
        "/metrics",
        h.metrics,
        "getMetrics",
        "Prometheus metrics (text format, or OpenMetrics when asked for)",
        "operations",
        responses={
            200: (
                "exposition",
                (
                    Body({"type": "string"}, "text/plain"),
                    Body({"type": "string"}, "application/openmetrics-text"),
                ),
            )
        },
        errors=(503,),
    ),
    Route(
        "GET",
        "/healthz",
        h.healthz,
        "healthz",
        "Liveness: the server process is up",
        "operations",
        responses={200: _json("Health", "up")},
        public=True,
    ),
    Route(
        "GET",
        "/readyz",
        h.readyz,
        "readyz",
        "Readiness: circusd answers and the discovery backend is reachable",
        "operations",
        responses={200: _json("Readiness", "ready")},
        errors=(503,),
    ),
    Route(
        "GET",
        "/openapi.json",
        h.openapi,
        "getOpenApi",
        "This document",
        "operations",
        responses={200: ("OpenAPI 3.1 document", (Body({"type": "object"}),))},
    ),
    Route(
        "GET",
        "/",
        h.index,
        "statusPage",
        "The live status page",
        "status page",
        responses={200: ("HTML page", (Body({"type": "string"}, "text/html"),))},
        public=True,
    ),
    Route(
        "GET",
        "/static/{file}",
        h.static_asset,
        "statusPageAsset",
        "Scripts and styles of the status page (served by this server, no CDN)",
        "status page",
        path_params=(
            Param(
                "file",
                {"type": "string", "pattern": r"^[a-z0-9_-]+\.(js|css|svg)$", "maxLength": 64},
                "asset name",
                required=True,
            ),
        ),
        responses={
            200: (
                "asset",
                (
                    Body({"type": "string"}, "text/javascript"),
                    Body({"type": "string"}, "text/css"),
                    Body({"type": "string"}, "image/svg+xml"),
                ),
            )
        },
        errors=(404,),
        public=True,
    ),
    Route(
        "GET",
        vendor.PATH,
        vendor.plotly_js,
        "statusPagePlotly",
        "plotly.js for the status page's charts, from the installed plotly package",
        "status page",
        responses={200: ("plotly.min.js", (Body({"type": "string"}, "text/javascript"),))},
        errors=(404,),
        public=True,
    ),
)

# The status codes answered by the middleware on any route: 500 never shows a traceback.
COMMON_ERRORS = (500,)


def by_method_and_path() -> dict[tuple[str, str], Route]:
    return {(route.method, route.path): route for route in ROUTES}
