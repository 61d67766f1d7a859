"""Reading a KEDA ``ScaledObject`` file (``apiVersion: keda.sh/v1alpha1``) into a
:class:`ScaledObject`, as it is applied to a cluster.

What dynamo-local honours is read (https://keda.sh/docs/2.16/reference/scaledobject-spec/,
https://keda.sh/docs/2.16/scalers/prometheus/); everything else is refused with the file,
the field path and why, never ignored: a policy that silently dropped a field would not be
the policy that runs in the cluster. ``metadata`` other than name, namespace, labels and
annotations is refused too, and so are KEDA's own annotations (pausing, HPA ownership).

Two ``scaleTargetRef`` kinds are read: the default (``apps/v1`` ``Deployment``), whose
``name`` is the graph service's name, and Dynamo's ``DynamoGraphDeploymentScalingAdapter``
(``nvidia.com/v1alpha1`` or ``v1beta1``), named ``{graph}-{service in lowercase}`` as the
Dynamo operator names the adapter of each service; :mod:`connector.policy.binding`
resolves either against the graph.

Over 500 lines on purpose: the keys each section honours, the reason each refused key is
given (:data:`_WHY`) and the readers of those sections are one table, read top to bottom
against KEDA's spec page; split, a refusal's reason would sit apart from the reader that
refuses it. The typed reading itself is the graph's :class:`~connector.graph.reader.Reader`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from connector.errors import GraphError, ScaledObjectError
from connector.graph.loader import parse_yaml
from connector.graph.reader import Reader, describe, join_path
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
from connector.policy.keda import Fallback, PolicySpec, TriggerTarget

API_VERSION = "keda.sh/v1alpha1"
KIND = "ScaledObject"
DEFAULT_TARGET_KIND = ("apps/v1", "Deployment")
ADAPTER_KIND = "DynamoGraphDeploymentScalingAdapter"
ADAPTER_API_VERSIONS = ("nvidia.com/v1alpha1", "nvidia.com/v1beta1")

# KEDA's defaults (scaledobject-spec).
DEFAULT_POLLING_INTERVAL_S = 30
DEFAULT_COOLDOWN_S = 300
DEFAULT_MAX_REPLICAS = 100
# Kubernetes' validation of HPAScalingRules.
MAX_STABILIZATION_WINDOW_S = 3600
MAX_POLICY_PERIOD_S = 1800
# A DNS subdomain name, as Kubernetes requires of metadata.name.
_NAME = re.compile(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?")
NOT_SUPPORTED = "not supported here"
_TRUE = ("true", "1", "t", "yes")  # strconv.ParseBool's words, as KEDA reads them
_FALSE = ("false", "0", "f", "no")

# Keys dynamo-local reads, per mapping. Anything else is refused (with _WHY when known).
_TOP = ("apiVersion", "kind", "metadata", "spec")
_METADATA = ("name", "namespace", "labels", "annotations")
_SPEC = (
    "scaleTargetRef",
    "pollingInterval",
    "cooldownPeriod",
    "initialCooldownPeriod",
    "idleReplicaCount",
    "minReplicaCount",
    "maxReplicaCount",
    "fallback",
    "advanced",
    "triggers",
)
_TARGET = ("apiVersion", "kind", "name")
_FALLBACK = ("failureThreshold", "replicas")
_ADVANCED = ("restoreToOriginalReplicaCount", "horizontalPodAutoscalerConfig")
_HPA_CONFIG = ("name", "behavior")
_BEHAVIOR = ("scaleUp", "scaleDown")
_RULES = ("stabilizationWindowSeconds", "selectPolicy", "policies")
_POLICY = ("type", "value", "periodSeconds")
_TRIGGER = ("type", "name", "metadata", "metricType", "useCachedMetrics")
_PROMETHEUS = (
    "serverAddress",
    "query",
    "threshold",
    "activationThreshold",
    "ignoreNullValues",
    "namespace",
    "customHeaders",
    "queryParameters",
    "unsafeSsl",
    "metricName",
)
_WHY = {
    "status": "a ScaledObject's status is written by KEDA, not read from the file",
    "envSourceContainerName": "trigger parameters are read from the file only, never from "
    "a container's environment",
    "scalingModifiers": "composite formulas over triggers are not implemented",
    "authenticationRef": "there is no TriggerAuthentication here: put what the query "
    "needs in serverAddress, customHeaders or queryParameters",
    "authModes": "there is no TriggerAuthentication here: put what the query needs in "
    "customHeaders",
    "tolerance": "the HPA's tolerance is its default, 0.1",
}


@dataclass(frozen=True)
class TargetRef:
    api_version: str
    kind: str
    name: str

    @property
    def is_adapter(self) -> bool:
        return self.kind == ADAPTER_KIND


@dataclass(frozen=True)
class PrometheusTrigger:
    """One ``type: prometheus`` trigger."""

    index: int
    name: str | None
    server_address: str
    query: str
    threshold: float
    activation_threshold: float = 0.0
    metric_type: MetricType = MetricType.AVERAGE_VALUE
    ignore_null_values: bool = True  # KEDA's default: an empty result is 0
    namespace: str | None = None
    custom_headers: tuple[tuple[str, str], ...] = ()
    query_parameters: tuple[tuple[str, str], ...] = ()
    unsafe_ssl: bool = False

    @property
    def label(self) -> str:
        """How metrics and events name the trigger: its ``name``, else its index."""
        return self.name or str(self.index)

    @property
    def target(self) -> TriggerTarget:
        return TriggerTarget(self.threshold, self.activation_threshold, self.metric_type)


@dataclass(frozen=True)
class ScaledObject:
    name: str
    source: str  # the file as named on the command line, for messages
    target: TargetRef
    triggers: tuple[PrometheusTrigger, ...]
    namespace: str | None = None
    labels: tuple[tuple[str, str], ...] = ()
    polling_interval_s: int = DEFAULT_POLLING_INTERVAL_S
    cooldown_s: int = DEFAULT_COOLDOWN_S
    initial_cooldown_s: int = 0
    min_replicas: int = 0
    max_replicas: int = DEFAULT_MAX_REPLICAS
    max_replicas_set: bool = False  # False: KEDA's default, for messages
    idle_replicas: int | None = None
    fallback: Fallback | None = None
    behavior: Behavior = field(default_factory=Behavior)
    # What was read but has no effect, as in KEDA (e.g. a prometheus metricName): said
    # at start-up rather than dropped without a word.
    warnings: tuple[str, ...] = ()

    @property
    def policy(self) -> PolicySpec:
        return PolicySpec(
            triggers=tuple(t.target for t in self.triggers),
            min_replicas=self.min_replicas,
            max_replicas=self.max_replicas,
            idle_replicas=self.idle_replicas,
            cooldown_s=self.cooldown_s,
            initial_cooldown_s=self.initial_cooldown_s,
            fallback=self.fallback,
            behavior=self.behavior,
        )

    @property
    def lowest_replicas(self) -> int:
        """The fewest replicas the policy may set: idle, else min."""
        return self.idle_replicas if self.idle_replicas is not None else self.min_replicas


class _Reader(Reader):
    """The graph's reader, raising :class:`ScaledObjectError`, with KEDA's readings: strict
    mappings (an unknown key is refused, never ignored), numbers and booleans as KEDA's
    metadata strings, ``key=value`` lists. Warnings are kept for ``up`` to print."""

    error = ScaledObjectError

    def warn(self, path: str, reason: str) -> None:
        self.warnings.append(f"{self.origin}: {path}: {reason}")

    def mapping_of(
        self, value: object, path: str, allowed: Sequence[str], why: str | None = None
    ) -> Mapping[str, Any]:
        """``value`` as a mapping whose keys are all in ``allowed``; another key is refused
        with ``why`` (else the reason :data:`_WHY` has for it, if any)."""
        found = self.mapping(value, path)
        for key in found:
            if key not in allowed:
                reason = _WHY.get(key, why)
                self.fail(
                    join_path(path, key),
                    f"not supported here ({reason})" if reason else NOT_SUPPORTED,
                )
        return found

    def string(self, value: object, path: str, pattern: re.Pattern[str] | None = None) -> str:
        if isinstance(value, str) and not value.strip():
            self.fail(path, f"must be a non-empty string, got {describe(value)}")
        return super().string(value, path, pattern)

    def number(self, value: object, path: str, *, positive: bool = False) -> float:
        """A trigger number: KEDA's metadata values are strings ('100.50'); a bare YAML
        number is read the same."""
        number: float | None = None
        if isinstance(value, int | float) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value.strip())
            except ValueError:
                number = None
        if number is None or not math.isfinite(number):
            self.fail(path, f"must be a number, got {describe(value)}")
        if positive and number <= 0:
            self.fail(path, f"must be > 0, got {describe(value)}")
        return number

    def boolean(self, value: object, path: str) -> bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in (*_TRUE, *_FALSE):
            return value.strip().lower() in _TRUE
        self.fail(path, f"must be true or false, got {describe(value)}")

    def pairs(self, value: object, path: str) -> tuple[tuple[str, str], ...]:
        """KEDA's ``key=value,key2=value2`` lists (customHeaders, queryParameters)."""
        text = self.string(value, path)
        out: list[tuple[str, str]] = []
        for item in text.split(","):
            key, sep, val = item.partition("=")
            if not sep or not key.strip():
                self.fail(path, f"must be key=value pairs separated by commas, got {text!r}")
            out.append((key.strip(), val.strip()))
        return tuple(out)


def _metadata(r: _Reader, raw: object) -> tuple[str, str | None, tuple[tuple[str, str], ...]]:
    meta = r.mapping_of(
        raw, "metadata", _METADATA, why="only name, namespace, labels and annotations are read"
    )
    name = r.string(meta.get("name"), "metadata.name")
    if not _NAME.fullmatch(name):
        r.fail(
            "metadata.name",
            f"{name!r} is not a Kubernetes name (lowercase letters, digits, '-' and '.')",
        )
    namespace = meta.get("namespace")
    if namespace is not None:
        namespace = r.string(namespace, "metadata.namespace")
    labels = meta.get("labels") or {}
    if not isinstance(labels, Mapping):
        r.fail("metadata.labels", f"must be a mapping, got {describe(labels)}")
    annotations = meta.get("annotations") or {}
    if not isinstance(annotations, Mapping):
        r.fail("metadata.annotations", f"must be a mapping, got {describe(annotations)}")
    for key in annotations:
        if "keda.sh/" in str(key):
            # Pausing and HPA ownership change what KEDA does: not honoured, so refused.
            r.fail(f"metadata.annotations.{key}", "KEDA annotations are not supported here")
    return name, namespace, tuple(sorted((str(k), str(v)) for k, v in labels.items()))


def _target(r: _Reader, raw: object) -> TargetRef:
    path = "spec.scaleTargetRef"
    if raw is None:
        r.fail(path, "is required")
    ref = r.mapping_of(raw, path, _TARGET)
    name = r.string(ref.get("name"), f"{path}.name")
    kind = ref.get("kind", DEFAULT_TARGET_KIND[1])
    api_version = ref.get("apiVersion")
    if kind == ADAPTER_KIND:
        api_version = api_version if api_version is not None else ADAPTER_API_VERSIONS[0]
        if api_version not in ADAPTER_API_VERSIONS:
            r.fail(
                f"{path}.apiVersion",
                f"{api_version!r} is not supported here for {ADAPTER_KIND} "
                f"(only {', '.join(ADAPTER_API_VERSIONS)})",
            )
        return TargetRef(str(api_version), kind, name)
    if kind != DEFAULT_TARGET_KIND[1]:
        r.fail(
            f"{path}.kind",
            f"{describe(kind)} is not supported here (only the default, Deployment, naming a "
            f"graph service, or {ADAPTER_KIND})",
        )
    api_version = api_version if api_version is not None else DEFAULT_TARGET_KIND[0]
    if api_version != DEFAULT_TARGET_KIND[0]:
        r.fail(
            f"{path}.apiVersion",
            f"{describe(api_version)} is not supported here (only apps/v1 for a Deployment)",
        )
    return TargetRef(DEFAULT_TARGET_KIND[0], DEFAULT_TARGET_KIND[1], name)


def _rules(r: _Reader, raw: object, path: str, default: ScalingRules) -> ScalingRules:
    """One direction of ``behavior``; what it leaves out is Kubernetes' default for it."""
    if raw is None:
        return default
    rules = r.mapping_of(raw, path, _RULES)
    window = default.stabilization_window_s
    if "stabilizationWindowSeconds" in rules:
        window = r.integer(
            rules["stabilizationWindowSeconds"],
            f"{path}.stabilizationWindowSeconds",
            minimum=0,
            maximum=MAX_STABILIZATION_WINDOW_S,
        )
    select = SelectPolicy.MAX
    if "selectPolicy" in rules:
        value = rules["selectPolicy"]
        if value not in tuple(SelectPolicy):
            r.fail(
                f"{path}.selectPolicy",
                f"must be one of Max, Min, Disabled, got {describe(value)}",
            )
        select = SelectPolicy(value)
    raw_policies = rules.get("policies")
    if raw_policies is None or raw_policies == []:
        return ScalingRules(window, default.policies, select)  # Kubernetes' defaulting
    if not isinstance(raw_policies, list):
        r.fail(f"{path}.policies", f"must be a list, got {describe(raw_policies)}")
    policies: list[ScalingPolicy] = []
    for i, raw_policy in enumerate(raw_policies):
        ppath = f"{path}.policies[{i}]"
        policy = r.mapping_of(raw_policy, ppath, _POLICY)
        kind = policy.get("type")
        if kind not in tuple(PolicyType):
            r.fail(f"{ppath}.type", f"must be Pods or Percent, got {describe(kind)}")
        value = r.integer(policy.get("value"), f"{ppath}.value", minimum=1)
        period = r.integer(
            policy.get("periodSeconds"),
            f"{ppath}.periodSeconds",
            minimum=1,
            maximum=MAX_POLICY_PERIOD_S,
        )
        policies.append(ScalingPolicy(PolicyType(kind), value, period))
    return ScalingRules(window, tuple(policies), select)


def _advanced(r: _Reader, raw: object) -> Behavior:
    path = "spec.advanced"
    advanced = r.mapping_of(raw, path, _ADVANCED)
    if "restoreToOriginalReplicaCount" in advanced:
        restore = r.boolean(
            advanced["restoreToOriginalReplicaCount"], f"{path}.restoreToOriginalReplicaCount"
        )
        if restore:
            r.fail(
                f"{path}.restoreToOriginalReplicaCount",
                "true is not supported here (a policy lives as long as `dynamo-local up`, "
                "whose replicas all stop with it: there is no original count to restore)",
            )
    hpa = r.mapping_of(
        advanced.get("horizontalPodAutoscalerConfig"),
        f"{path}.horizontalPodAutoscalerConfig",
        _HPA_CONFIG,
    )
    if "name" in hpa:
        r.string(hpa["name"], f"{path}.horizontalPodAutoscalerConfig.name")
    bpath = f"{path}.horizontalPodAutoscalerConfig.behavior"
    behavior = r.mapping_of(hpa.get("behavior"), bpath, _BEHAVIOR)
    return Behavior(
        scale_up=_rules(r, behavior.get("scaleUp"), f"{bpath}.scaleUp", DEFAULT_SCALE_UP),
        scale_down=_rules(r, behavior.get("scaleDown"), f"{bpath}.scaleDown", DEFAULT_SCALE_DOWN),
    )


def _server_address(r: _Reader, value: object, path: str) -> str:
    text = r.string(value, path).strip()
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        r.fail(path, f"must be an http:// or https:// URL, got {text!r}")
    return text.rstrip("/")


def _trigger(r: _Reader, raw: object, index: int) -> PrometheusTrigger:
    path = f"spec.triggers[{index}]"
    if not isinstance(raw, Mapping):
        r.fail(path, f"must be a mapping, got {describe(raw)}")
    kind = raw.get("type")
    if kind != "prometheus":
        if not isinstance(kind, str) or not kind:
            r.fail(f"{path}.type", f"is required, got {describe(kind)}")
        r.fail(f"{path}.type", f"{kind!r} is not supported here (only prometheus)")
    trigger = r.mapping_of(raw, path, _TRIGGER)
    name = trigger.get("name")
    if name is not None:
        name = r.string(name, f"{path}.name")
    metric_type = MetricType.AVERAGE_VALUE
    if "metricType" in trigger:
        value = trigger["metricType"]
        if value not in tuple(MetricType):
            r.fail(
                f"{path}.metricType",
                f"{describe(value)} is not supported here (only AverageValue, the default, "
                "and Value)",
            )
        metric_type = MetricType(value)
    if "useCachedMetrics" in trigger:
        # Caching means one query per pollingInterval, which is what happens here anyway.
        r.boolean(trigger["useCachedMetrics"], f"{path}.useCachedMetrics")
    mpath = f"{path}.metadata"
    if trigger.get("metadata") is None:
        r.fail(mpath, "is required")
    meta = r.mapping_of(trigger.get("metadata"), mpath, _PROMETHEUS)
    for required in ("serverAddress", "query", "threshold"):
        if required not in meta:
            r.fail(f"{mpath}.{required}", "is required")
    if "metricName" in meta:
        r.warn(
            f"{mpath}.metricName",
            "read and not used, as KEDA does not use it for prometheus triggers (series are "
            "named by trigger)",
        )
    namespace = meta.get("namespace")
    return PrometheusTrigger(
        index=index,
        name=name,
        server_address=_server_address(r, meta["serverAddress"], f"{mpath}.serverAddress"),
        query=r.string(meta["query"], f"{mpath}.query").strip(),
        threshold=r.number(meta["threshold"], f"{mpath}.threshold", positive=True),
        activation_threshold=(
            r.number(meta["activationThreshold"], f"{mpath}.activationThreshold")
            if "activationThreshold" in meta
            else 0.0
        ),
        metric_type=metric_type,
        ignore_null_values=(
            r.boolean(meta["ignoreNullValues"], f"{mpath}.ignoreNullValues")
            if "ignoreNullValues" in meta
            else True
        ),
        namespace=r.string(namespace, f"{mpath}.namespace") if namespace is not None else None,
        custom_headers=(
            r.pairs(meta["customHeaders"], f"{mpath}.customHeaders")
            if "customHeaders" in meta
            else ()
        ),
        query_parameters=(
            r.pairs(meta["queryParameters"], f"{mpath}.queryParameters")
            if "queryParameters" in meta
            else ()
        ),
        unsafe_ssl=(
            r.boolean(meta["unsafeSsl"], f"{mpath}.unsafeSsl") if "unsafeSsl" in meta else False
        ),
    )


def _fallback(r: _Reader, raw: object, triggers: Sequence[PrometheusTrigger]) -> Fallback | None:
    if raw is None:
        return None
    path = "spec.fallback"
    fb = r.mapping_of(raw, path, _FALLBACK)
    for required in _FALLBACK:
        if required not in fb:
            r.fail(f"{path}.{required}", "is required in a fallback")
    fallback = Fallback(
        failure_threshold=r.integer(fb["failureThreshold"], f"{path}.failureThreshold", minimum=0),
        replicas=r.integer(fb["replicas"], f"{path}.replicas", minimum=0),
    )
    for t in triggers:
        if t.metric_type is not MetricType.AVERAGE_VALUE:
            # KEDA refuses this ScaledObject too (CheckFallbackValid).
            r.fail(
                path,
                f"a fallback needs every trigger's metricType to be AverageValue; "
                f"spec.triggers[{t.index}].metricType is {t.metric_type.value}",
            )
    return fallback


def parse_scaled_object(raw: object, origin: str) -> ScaledObject:
    """A ScaledObject from its parsed YAML. Raises :class:`ScaledObjectError` naming
    ``origin``, the field path and why."""
    r = _Reader(origin)
    top = r.mapping_of(raw, "", _TOP)
    if top.get("apiVersion") != API_VERSION:
        r.fail("apiVersion", f"must be {API_VERSION}, got {describe(top.get('apiVersion'))}")
    if top.get("kind") != KIND:
        r.fail("kind", f"{describe(top.get('kind'))} is not supported here (only {KIND})")
    name, namespace, labels = _metadata(r, top.get("metadata"))
    if top.get("spec") is None:
        r.fail("spec", "is required")
    spec = r.mapping_of(top.get("spec"), "spec", _SPEC)
    target = _target(r, spec.get("scaleTargetRef"))

    def seconds(key: str, default: int, low: int = 0) -> int:
        return r.integer(spec[key], f"spec.{key}", minimum=low) if key in spec else default

    polling = seconds("pollingInterval", DEFAULT_POLLING_INTERVAL_S, 1)
    cooldown = seconds("cooldownPeriod", DEFAULT_COOLDOWN_S)
    initial_cooldown = seconds("initialCooldownPeriod", 0)
    min_replicas = seconds("minReplicaCount", 0)
    max_set = "maxReplicaCount" in spec
    max_replicas = seconds("maxReplicaCount", DEFAULT_MAX_REPLICAS, 1)
    if min_replicas > max_replicas:
        r.fail(
            "spec.minReplicaCount",
            f"{min_replicas} must not be above maxReplicaCount ({max_replicas})",
        )
    idle: int | None = None
    if "idleReplicaCount" in spec:
        idle = r.integer(spec["idleReplicaCount"], "spec.idleReplicaCount", minimum=0)
        if idle != 0:
            r.fail(
                "spec.idleReplicaCount",
                f"{idle} is not supported here (only 0: KEDA documents that other values do "
                "not work with the HPA)",
            )
        # KEDA's check compares with the HPA's minimum when minReplicaCount is set (at
        # least 1), else with 0.
        floor = max(min_replicas, 1) if "minReplicaCount" in spec else 0
        if idle >= floor:
            r.fail(
                "spec.idleReplicaCount",
                f"{idle} must be less than minReplicaCount ({min_replicas})",
            )
    raw_triggers = spec.get("triggers")
    if not isinstance(raw_triggers, list) or not raw_triggers:
        r.fail("spec.triggers", f"must be a non-empty list, got {describe(raw_triggers)}")
    triggers = tuple(_trigger(r, t, i) for i, t in enumerate(raw_triggers))
    names = [t.name for t in triggers if t.name is not None]
    if len(names) != len(set(names)):
        r.fail("spec.triggers", "trigger names must be unique")
    fallback = _fallback(r, spec.get("fallback"), triggers)
    behavior = _advanced(r, spec.get("advanced")) if "advanced" in spec else Behavior()
    return ScaledObject(
        name=name,
        source=origin,
        target=target,
        triggers=triggers,
        namespace=namespace,
        labels=labels,
        polling_interval_s=polling,
        cooldown_s=cooldown,
        initial_cooldown_s=initial_cooldown,
        min_replicas=min_replicas,
        max_replicas=max_replicas,
        max_replicas_set=max_set,
        idle_replicas=idle,
        fallback=fallback,
        behavior=behavior,
        warnings=tuple(r.warnings),
    )


def parse_scaled_object_text(text: str, origin: str) -> ScaledObject:
    try:
        raw = parse_yaml(text, origin)
    except GraphError as exc:  # YAML syntax: same message, this error type
        raise ScaledObjectError(exc.message, **exc.details) from None
    return parse_scaled_object(raw, origin)


def load_scaled_object(path: Path, display: str | None = None) -> ScaledObject:
    """Read one ScaledObject file (blocking: call in a thread from a loop). ``display``
    is how messages name it (default: ``path``)."""
    origin = display if display is not None else str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ScaledObjectError(f"{origin}: not UTF-8 text ({exc.reason})", source=origin) from None
    except OSError as exc:
        raise ScaledObjectError(f"{origin}: cannot read: {exc.strerror}", source=origin) from None
    return parse_scaled_object_text(text, origin)
