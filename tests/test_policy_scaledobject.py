"""Reading a KEDA ScaledObject file: a full valid file parses to exact values, KEDA's
defaults fill what it leaves out, and everything dynamo-local cannot honour is refused
with the file, the field path and why (never ignored). Then the binding to a graph: the
target service, its local min/max, and one driver per component."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from connector.errors import ScaledObjectError
from connector.graph.model import Graph
from connector.graph_api import graph, service
from connector.policy.binding import BoundPolicy, adapter_name, bind
from connector.policy.hpa import (
    DEFAULT_SCALE_DOWN,
    DEFAULT_SCALE_UP,
    Behavior,
    MetricType,
    PolicyType,
    ScalingPolicy,
    ScalingRules,
    SelectPolicy,
)
from connector.policy.keda import Fallback
from connector.policy.scaledobject import (
    PrometheusTrigger,
    ScaledObject,
    TargetRef,
    load_scaled_object,
    parse_scaled_object,
    parse_scaled_object_text,
)

ORIGIN = "scaledobject.yaml"

FULL = """\
apiVersion: keda.sh/v1alpha1
kind: ScaledObject
metadata:
  name: decode-scaler
  namespace: default
  labels: {app: demo, tier: decode}
  annotations: {kubectl.kubernetes.io/last-applied-configuration: "{}"}
spec:
  scaleTargetRef:
    apiVersion: apps/v1
    kind: Deployment
    name: Decode
  pollingInterval: 15
  cooldownPeriod: 120
  initialCooldownPeriod: 30
  idleReplicaCount: 0
  minReplicaCount: 1
  maxReplicaCount: 6
  fallback:
    failureThreshold: 3
    replicas: 4
  advanced:
    restoreToOriginalReplicaCount: false
    horizontalPodAutoscalerConfig:
      name: keda-hpa-decode
      behavior:
        scaleUp:
          stabilizationWindowSeconds: 0
          selectPolicy: Max
          policies:
            - {type: Pods, value: 2, periodSeconds: 30}
            - {type: Percent, value: 50, periodSeconds: 30}
        scaleDown:
          stabilizationWindowSeconds: 200
          selectPolicy: Min
          policies:
            - {type: Pods, value: 1, periodSeconds: 60}
  triggers:
    - type: prometheus
      name: queue
      metricType: AverageValue
      metadata:
        serverAddress: http://127.0.0.1:9090/
        query: sum(dynamo_frontend_queued_requests{dynamo_namespace="demo"})
        threshold: "5"
        activationThreshold: "0.5"
        ignoreNullValues: "false"
        namespace: team-a
        customHeaders: X-Scope-OrgID=tenant-1,X-Client=dl
        queryParameters: dedup=true
        unsafeSsl: "false"
    - type: prometheus
      metadata:
        serverAddress: https://prom.example:9090
        query: histogram_quantile(0.95, sum(rate(ttft_bucket[1m])) by (le))
        threshold: '0.5'
"""


def _raw(text: str = FULL) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(text)
    return data


def test_a_full_file_parses_to_exact_values() -> None:
    assert parse_scaled_object_text(FULL, ORIGIN) == ScaledObject(
        name="decode-scaler",
        source=ORIGIN,
        target=TargetRef("apps/v1", "Deployment", "Decode"),
        triggers=(
            PrometheusTrigger(
                index=0,
                name="queue",
                server_address="http://127.0.0.1:9090",
                query='sum(dynamo_frontend_queued_requests{dynamo_namespace="demo"})',
                threshold=5.0,
                activation_threshold=0.5,
                metric_type=MetricType.AVERAGE_VALUE,
                ignore_null_values=False,
                namespace="team-a",
                custom_headers=(("X-Scope-OrgID", "tenant-1"), ("X-Client", "dl")),
                query_parameters=(("dedup", "true"),),
                unsafe_ssl=False,
            ),
            PrometheusTrigger(
                index=1,
                name=None,
                server_address="https://prom.example:9090",
                query="histogram_quantile(0.95, sum(rate(ttft_bucket[1m])) by (le))",
                threshold=0.5,
            ),
        ),
        namespace="default",
        labels=(("app", "demo"), ("tier", "decode")),
        polling_interval_s=15,
        cooldown_s=120,
        initial_cooldown_s=30,
        min_replicas=1,
        max_replicas=6,
        max_replicas_set=True,
        idle_replicas=0,
        fallback=Fallback(failure_threshold=3, replicas=4),
        behavior=Behavior(
            scale_up=ScalingRules(
                0,
                (
                    ScalingPolicy(PolicyType.PODS, 2, 30),
                    ScalingPolicy(PolicyType.PERCENT, 50, 30),
                ),
                SelectPolicy.MAX,
            ),
            scale_down=ScalingRules(
                200, (ScalingPolicy(PolicyType.PODS, 1, 60),), SelectPolicy.MIN
            ),
        ),
    )


MINIMAL = """\
apiVersion: keda.sh/v1alpha1
kind: ScaledObject
metadata: {name: prometheus-scaledobject}
spec:
  scaleTargetRef: {name: Decode}
  triggers:
  - type: prometheus
    metadata:
      serverAddress: http://127.0.0.1:9090
      threshold: '100'
      query: sum(rate(http_requests_total[2m]))
"""


def test_what_a_file_leaves_out_is_kedas_and_kubernetes_default() -> None:
    so = parse_scaled_object_text(MINIMAL, ORIGIN)
    assert (so.polling_interval_s, so.cooldown_s, so.initial_cooldown_s) == (30, 300, 0)
    assert (so.min_replicas, so.max_replicas, so.max_replicas_set) == (0, 100, False)
    assert (so.idle_replicas, so.fallback) == (None, None)
    assert so.behavior == Behavior(DEFAULT_SCALE_UP, DEFAULT_SCALE_DOWN)
    (t,) = so.triggers
    assert (t.metric_type, t.activation_threshold, t.ignore_null_values) == (
        MetricType.AVERAGE_VALUE,
        0.0,
        True,  # KEDA's default: an empty result reads as 0
    )
    assert so.target == TargetRef("apps/v1", "Deployment", "Decode")
    assert so.warnings == ()


def test_a_behavior_direction_fills_what_it_leaves_out_from_the_defaults() -> None:
    raw = _raw(MINIMAL)
    raw["spec"]["advanced"] = {
        "horizontalPodAutoscalerConfig": {
            "behavior": {"scaleDown": {"stabilizationWindowSeconds": 60}, "scaleUp": {}}
        }
    }
    so = parse_scaled_object(raw, ORIGIN)
    assert so.behavior == Behavior(
        DEFAULT_SCALE_UP, ScalingRules(60, DEFAULT_SCALE_DOWN.policies, SelectPolicy.MAX)
    )


def test_dynamos_scaling_adapter_is_a_target() -> None:
    """The file Dynamo's autoscaling guide applies: scaleTargetRef names the DGD service's
    DynamoGraphDeploymentScalingAdapter; its metricName is read and said to be unused."""
    text = """\
apiVersion: keda.sh/v1alpha1
kind: ScaledObject
metadata: {name: sglang-agg-decode-scaler, namespace: default}
spec:
  scaleTargetRef:
    apiVersion: nvidia.com/v1alpha1
    kind: DynamoGraphDeploymentScalingAdapter
    name: sglang-agg-decode
  minReplicaCount: 1
  maxReplicaCount: 10
  pollingInterval: 15
  cooldownPeriod: 60
  triggers:
  - type: prometheus
    metadata:
      serverAddress: http://127.0.0.1:9090
      metricName: dynamo_ttft_p95
      query: |
        histogram_quantile(0.95,
          sum(rate(dynamo_frontend_time_to_first_token_seconds_bucket[5m])) by (le))
      threshold: "0.5"
"""
    so = parse_scaled_object_text(text, ORIGIN)
    assert so.target == TargetRef(
        "nvidia.com/v1alpha1", "DynamoGraphDeploymentScalingAdapter", "sglang-agg-decode"
    )
    assert so.triggers[0].query.startswith("histogram_quantile(0.95")
    assert so.warnings == (
        f"{ORIGIN}: spec.triggers[0].metadata.metricName: read and not used, as KEDA does not "
        "use it for prometheus triggers (series are named by trigger)",
    )


def _with(path: str, value: Any, base: str = MINIMAL) -> dict[str, Any]:
    """``base`` with ``value`` at the dotted ``path`` (``[i]`` indexes lists); a value of
    ``...`` deletes the key."""
    raw = copy.deepcopy(_raw(base))
    node: Any = raw
    parts = path.replace("[", ".[").split(".")
    for part in parts[:-1]:
        node = node[int(part[1:-1])] if part.startswith("[") else node.setdefault(part, {})
    last = parts[-1]
    if value is ...:
        del node[last]
    else:
        node[last] = value
    return raw


def _with_all(changes: dict[str, Any], base: str = MINIMAL) -> dict[str, Any]:
    raw = _raw(base)
    for path, value in changes.items():
        raw = _with(path, value, yaml.safe_dump(raw))
    return raw


T0 = "spec.triggers[0]"
M0 = f"{T0}.metadata"


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (_with("apiVersion", "keda.sh/v1"), "apiVersion: must be keda.sh/v1alpha1, got str "
         "'keda.sh/v1'"),
        (_with("kind", "ScaledJob"), "kind: str 'ScaledJob' is not supported here (only "
         "ScaledObject)"),
        (_with("status", {}), "status: not supported here (a ScaledObject's status is written "
         "by KEDA, not read from the file)"),
        (_with("metadata.uid", "1"), "metadata.uid: not supported here (only name, namespace, "
         "labels and annotations are read)"),
        (_with("metadata.annotations", {"autoscaling.keda.sh/paused": "true"}),
         "metadata.annotations.autoscaling.keda.sh/paused: KEDA annotations are not supported "
         "here"),
        (_with("metadata.name", "Decode_Scaler"), "metadata.name: 'Decode_Scaler' is not a "
         "Kubernetes name (lowercase letters, digits, '-' and '.')"),
        (_with("spec.scaleTargetRef.kind", "StatefulSet"), "spec.scaleTargetRef.kind: str "
         "'StatefulSet' is not supported here (only the default, Deployment, naming a graph "
         "service, or DynamoGraphDeploymentScalingAdapter)"),
        (_with("spec.scaleTargetRef.apiVersion", "apps/v1beta1"), "spec.scaleTargetRef."
         "apiVersion: str 'apps/v1beta1' is not supported here (only apps/v1 for a "
         "Deployment)"),
        (_with("spec.scaleTargetRef.envSourceContainerName", "main"),
         "spec.scaleTargetRef.envSourceContainerName: not supported here (trigger parameters "
         "are read from the file only, never from a container's environment)"),
        (_with("spec.scaleTargetRef", ...), "spec.scaleTargetRef: is required"),
        (_with("spec.pollingInterval", 0), "spec.pollingInterval: must be >= 1, got 0"),
        (_with("spec.cooldownPeriod", 1.5), "spec.cooldownPeriod: must be an integer, got "
         "float 1.5"),
        (_with_all({"spec.minReplicaCount": 5, "spec.maxReplicaCount": 3}),
         "spec.minReplicaCount: 5 must not be above maxReplicaCount (3)"),
        (_with("spec.idleReplicaCount", 1), "spec.idleReplicaCount: 1 is not supported here "
         "(only 0: KEDA documents that other values do not work with the HPA)"),
        (_with("spec.idleReplicaCount", 0), "spec.idleReplicaCount: 0 must be less than "
         "minReplicaCount (0)"),
        (_with("spec.fallback", {"replicas": 2}), "spec.fallback.failureThreshold: is required "
         "in a fallback"),
        (_with("spec.fallback", {"failureThreshold": 3, "replicas": 2, "behavior": "static"}),
         "spec.fallback.behavior: not supported here"),
        (_with("spec.advanced", {"restoreToOriginalReplicaCount": True}),
         "spec.advanced.restoreToOriginalReplicaCount: true is not supported here (a policy "
         "lives as long as `dynamo-local up`, whose replicas all stop with it: there is no "
         "original count to restore)"),
        (_with("spec.advanced", {"scalingModifiers": {"formula": "a+b", "target": "2"}}),
         "spec.advanced.scalingModifiers: not supported here (composite formulas over "
         "triggers are not implemented)"),
        (_with("spec.advanced.horizontalPodAutoscalerConfig.behavior.scaleUp",
               {"policies": [{"type": "Cores", "value": 1, "periodSeconds": 15}]}),
         "spec.advanced.horizontalPodAutoscalerConfig.behavior.scaleUp.policies[0].type: "
         "must be Pods or Percent, got str 'Cores'"),
        (_with("spec.advanced.horizontalPodAutoscalerConfig.behavior.scaleDown",
               {"policies": [{"type": "Pods", "value": 1, "periodSeconds": 1801}]}),
         "spec.advanced.horizontalPodAutoscalerConfig.behavior.scaleDown.policies[0]."
         "periodSeconds: must be <= 1800, got 1801"),
        (_with("spec.advanced.horizontalPodAutoscalerConfig.behavior.scaleDown",
               {"selectPolicy": "Fastest"}),
         "spec.advanced.horizontalPodAutoscalerConfig.behavior.scaleDown.selectPolicy: must "
         "be one of Max, Min, Disabled, got str 'Fastest'"),
        (_with("spec.advanced.horizontalPodAutoscalerConfig.behavior.scaleDown",
               {"stabilizationWindowSeconds": 3601}),
         "spec.advanced.horizontalPodAutoscalerConfig.behavior.scaleDown."
         "stabilizationWindowSeconds: must be <= 3600, got 3601"),
        (_with("spec.advanced.horizontalPodAutoscalerConfig.behavior.scaleUp",
               {"tolerance": 0.05}),
         "spec.advanced.horizontalPodAutoscalerConfig.behavior.scaleUp.tolerance: not "
         "supported here (the HPA's tolerance is its default, 0.1)"),
        (_with("spec.triggers", []), "spec.triggers: must be a non-empty list, got a list"),
        (_with(f"{T0}.type", "cpu"), f"{T0}.type: 'cpu' is not supported here (only "
         "prometheus)"),
        (_with(f"{T0}.metricType", "Utilization"), f"{T0}.metricType: str 'Utilization' is "
         "not supported here (only AverageValue, the default, and Value)"),
        (_with(f"{T0}.authenticationRef", {"name": "keda-prom-creds"}),
         f"{T0}.authenticationRef: not supported here (there is no TriggerAuthentication "
         "here: put what the query needs in serverAddress, customHeaders or "
         "queryParameters)"),
        (_with(f"{M0}.authModes", "bearer"), f"{M0}.authModes: not supported here (there is "
         "no TriggerAuthentication here: put what the query needs in customHeaders)"),
        (_with(f"{M0}.query", ...), f"{M0}.query: is required"),
        (_with(f"{M0}.threshold", "0"), f"{M0}.threshold: must be > 0, got str '0'"),
        (_with(f"{M0}.threshold", "lots"), f"{M0}.threshold: must be a number, got str "
         "'lots'"),
        (_with(f"{M0}.ignoreNullValues", "maybe"), f"{M0}.ignoreNullValues: must be true or "
         "false, got str 'maybe'"),
        (_with(f"{M0}.serverAddress", "prometheus:9090"), f"{M0}.serverAddress: must be an "
         "http:// or https:// URL, got 'prometheus:9090'"),
        (_with(f"{M0}.customHeaders", "X-Token"), f"{M0}.customHeaders: must be key=value "
         "pairs separated by commas, got 'X-Token'"),
        (_with(f"{M0}.queryFromEnv", "QUERY"), f"{M0}.queryFromEnv: not supported here"),
    ],
)  # fmt: skip
def test_what_cannot_be_honoured_is_refused_with_its_path(
    raw: dict[str, Any], message: str
) -> None:
    with pytest.raises(ScaledObjectError) as info:
        parse_scaled_object(raw, ORIGIN)
    assert info.value.message == f"{ORIGIN}: {message}"
    assert info.value.code == "invalid_scaledobject"


def test_fallback_with_a_value_trigger_is_refused_as_keda_refuses_it() -> None:
    raw = _raw(FULL)
    raw["spec"]["triggers"][1]["metricType"] = "Value"
    with pytest.raises(ScaledObjectError) as info:
        parse_scaled_object(raw, ORIGIN)
    assert info.value.message == (
        f"{ORIGIN}: spec.fallback: a fallback needs every trigger's metricType to be "
        "AverageValue; spec.triggers[1].metricType is Value"
    )
    del raw["spec"]["fallback"]
    assert parse_scaled_object(raw, ORIGIN).triggers[1].metric_type is MetricType.VALUE


def test_idle_zero_with_min_zero_written_is_keda_s_quirk_accepted() -> None:
    """KEDA compares idleReplicaCount with the HPA's minimum (at least 1) when
    minReplicaCount is written, so ``minReplicaCount: 0`` with ``idleReplicaCount: 0``
    passes there, and here."""
    raw = _with("spec.idleReplicaCount", 0)
    raw["spec"]["minReplicaCount"] = 0
    assert parse_scaled_object(raw, ORIGIN).idle_replicas == 0


def test_yaml_errors_and_unreadable_files_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(ScaledObjectError) as info:
        parse_scaled_object_text("spec: [unclosed\n", ORIGIN)
    assert info.value.message.startswith(f"{ORIGIN}:2:1: invalid YAML")
    with pytest.raises(ScaledObjectError) as info:
        parse_scaled_object_text("a: 1\na: 2\n", ORIGIN)
    assert "duplicate key 'a'" in info.value.message
    with pytest.raises(ScaledObjectError) as info:
        load_scaled_object(tmp_path / "missing.yaml", "missing.yaml")
    assert info.value.message == "missing.yaml: cannot read: No such file or directory"
    path = tmp_path / "so.yaml"
    path.write_text(MINIMAL)
    assert load_scaled_object(path, "so.yaml").source == "so.yaml"


# --------------------------------------------------------------------------- binding


def _graph() -> Graph:
    sleep = ["sleep", "60"]
    return graph(
        "sglang-agg",
        service("Frontend", role="frontend", command=sleep),
        service("decode", role="worker", sub_type="decode", command=sleep, max_replicas=8),
        service("Gauge", role="worker", command=sleep, min_replicas=1),
    )


def _so(name: str = "s", target: str = "Gauge", **spec: Any) -> ScaledObject:
    raw = _with("metadata.name", name)
    raw["spec"]["scaleTargetRef"] = {"name": target}
    raw["spec"].update(spec)
    if target == "Gauge":
        raw["spec"].setdefault("minReplicaCount", 1)
    return parse_scaled_object(raw, f"{name}.yaml")


def test_a_service_name_or_its_scaling_adapter_name_is_the_target() -> None:
    graph = _graph()
    assert adapter_name(graph, "decode") == "sglang-agg-decode"
    assert bind(graph, [_so("a", "Frontend")]) == (BoundPolicy(_so("a", "Frontend"), "Frontend"),)
    raw = _with(
        "spec.scaleTargetRef",
        {
            "apiVersion": "nvidia.com/v1alpha1",
            "kind": "DynamoGraphDeploymentScalingAdapter",
            "name": "sglang-agg-decode",
        },
    )
    raw["spec"]["maxReplicaCount"] = 8
    (bound,) = bind(graph, [parse_scaled_object(raw, "d.yaml")])
    assert bound.component == "decode"


@pytest.mark.parametrize(
    ("policies", "planner", "message"),
    [
        ([_so("a", "Prefill")], None, "a.yaml: spec.scaleTargetRef.name: graph 'sglang-agg' "
         "has no service 'Prefill' (its services: Frontend, Gauge, decode)"),
        ([_so("a", "Gauge", minReplicaCount=0)], None, "a.yaml: spec.minReplicaCount: 0 is "
         "below Gauge's local.minReplicas (1), so the policy could not set it"),
        ([_so("a", "decode")], None, "a.yaml: spec.maxReplicaCount: 100 (KEDA's default when "
         "it is not set) is above decode's local.maxReplicas (8), so the policy could not set "
         "it"),
        ([_so("a", "decode", maxReplicaCount=9)], None, "a.yaml: spec.maxReplicaCount: 9 is "
         "above decode's local.maxReplicas (8), so the policy could not set it"),
        ([_so("a", "Gauge", minReplicaCount=1), _so("b", "Gauge", minReplicaCount=1)], None,
         "b.yaml: spec.scaleTargetRef.name: Gauge is already driven by ScaledObject 'a' "
         "(a.yaml); one driver per component"),
        ([_so("a", "Frontend"), _so("a", "Gauge", minReplicaCount=1)], None,
         "a.yaml: metadata.name: 'a' is already the name of a.yaml"),
        ([_so("a", "decode", maxReplicaCount=8)], "the Planner executor (--planner-executor)",
         "a.yaml: spec.scaleTargetRef.name: decode is also scaled by the Planner executor "
         "(--planner-executor); one driver per component: drop ScaledObject 'a' or the "
         "Planner"),
    ],
)  # fmt: skip
def test_binding_refuses_what_the_graph_or_another_driver_forbids(
    policies: list[ScaledObject], planner: str | None, message: str
) -> None:
    with pytest.raises(ScaledObjectError) as info:
        bind(_graph(), policies, planner)
    assert info.value.message == message


def test_the_planner_executor_leaves_other_components_to_policies() -> None:
    (bound,) = bind(_graph(), [_so("a", "Frontend")], "the Planner executor (x)")
    assert bound.component == "Frontend"
