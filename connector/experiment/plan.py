"""An experiment plan: the load phases to drive, the SLO to judge them by, where to read the
frontend's metrics. A YAML file, read with the graph loader's reader so a wrong plan names
the file, the field and the reason: ``plan.yaml: phases[1].concurrency: must be >= 1, got 0``.

::

    name: burst-then-calm
    seed: 42                          # aiperf's --random-seed: the same prompts every run
    tokenizer: models/tiny-llama      # a folder (relative to this file) or a hub id
    model: tiny-llama                 # default: the first model the frontend lists
    prometheus: http://127.0.0.1:9090 # default: scrape the frontend's /metrics directly
    interval: 1                       # seconds between timeline samples
    window: 10                        # seconds the rates and percentiles are taken over
                                      # (default 10, or the interval if longer)
    gracePeriod: 30                   # seconds a phase's requests may finish after it ends
    cooldown: 60                      # seconds sampled after the last phase (scale-down)
    slo: {ttftP99Seconds: 0.5, itlP99Seconds: 0.05}
    phases:
      - {name: burst, concurrency: 8, inputTokens: 400, outputTokens: 200, duration: 60}
      - {name: calm, requestRate: 0.5, inputTokens: {mean: 400, stddev: 40},
         outputTokens: 200, duration: 60}

Unlike a graph, where keys Kubernetes knows but dynamo-local does not are only warned about,
an unknown key in a plan is an error: a misspelt ``requestrate`` would otherwise run a
different experiment than the one written down.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from connector.errors import GraphError
from connector.graph.loader import parse_yaml
from connector.graph.reader import Reader, describe, join_path

# aiperf's phase names: they become its artifact folders (phases/<name>/).
PHASE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")
ARRIVALS = ("poisson", "constant", "gamma")
# The SLO keys and the timeline column each bounds.
SLO_COLUMNS = {
    "ttftP50Seconds": "ttft_p50_s",
    "ttftP99Seconds": "ttft_p99_s",
    "itlP50Seconds": "itl_p50_s",
    "itlP99Seconds": "itl_p99_s",
}

_TOP_KEYS = (
    "name",
    "seed",
    "tokenizer",
    "model",
    "prometheus",
    "interval",
    "window",
    "gracePeriod",
    "cooldown",
    "slo",
    "phases",
)
_PHASE_KEYS = (
    "name",
    "concurrency",
    "requestRate",
    "arrival",
    "inputTokens",
    "outputTokens",
    "duration",
)
_TOKEN_KEYS = ("mean", "stddev")
_PROMETHEUS_KEYS = ("url", "selector")


# Upper bounds: a plan is a few phases of minutes to hours; beyond these it is a typo (and a
# run kept in memory a sample per interval would grow without end).
MAX_PHASES = 100
MAX_SECONDS = 86400.0  # a phase, the grace period, the cool-down, the window
MAX_INTERVAL_S = 3600.0
MAX_NAME = 128
MAX_SEED = 2**32 - 1  # aiperf's random seed
MAX_TOKENS = 1_000_000  # a sequence length
MAX_CONCURRENCY = 100_000
MAX_RATE = 100_000.0  # requests per second
MAX_TEXT = 4096  # the tokenizer, the model, a Prometheus URL or selector
# A YAML plan may use anchors; expanded, it holds at most this many values (nested aliases
# can otherwise expand a few bytes into billions of nodes).
MAX_NODES = 20_000


class PlanError(ValueError):
    """The plan is invalid; the message names the file, the field and why; ``field`` is the
    field's path (``phases[1].concurrency``), empty for the plan as a whole."""

    def __init__(self, message: str, field: str = "") -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class Tokens:
    """A synthetic sequence length: normally distributed around ``mean``."""

    mean: int
    stddev: float = 0.0


@dataclass(frozen=True)
class Phase:
    name: str
    duration_s: float
    input_tokens: Tokens
    output_tokens: Tokens
    concurrency: int | None = None  # with request_rate: a cap on requests in flight
    request_rate: float | None = None  # requests per second
    arrival: str = "poisson"  # how a rate phase spaces its requests

    @property
    def level(self) -> float:
        """How much load the phase asks for: its request rate, else its concurrency. Rising
        and falling load (the summary) compare these numbers."""
        if self.request_rate is not None:
            return self.request_rate
        return float(self.concurrency or 0)

    def describe(self) -> str:
        if self.request_rate is not None:
            load = f"{self.request_rate:g} req/s"
            if self.concurrency is not None:
                load += f" (at most {self.concurrency} in flight)"
        else:
            load = f"concurrency {self.concurrency}"
        return f"{self.name}: {load} for {self.duration_s:g} s"


@dataclass(frozen=True)
class Prometheus:
    url: str
    # Label matchers that pick the frontend's series (without braces); "" means the default:
    # the graph's namespace and role, as /v1/prometheus/targets labels them.
    selector: str = ""


@dataclass(frozen=True)
class Plan:
    phases: tuple[Phase, ...]
    tokenizer: str
    name: str = "experiment"
    seed: int = 0
    model: str | None = None
    prometheus: Prometheus | None = None
    interval_s: float = 1.0
    window_s: float = 10.0
    grace_period_s: float = 30.0
    cooldown_s: float = 0.0
    slo: Mapping[str, float] = field(default_factory=dict)  # SLO key -> bound (seconds)
    source: str = ""

    @property
    def load_seconds(self) -> float:
        """Seconds of load the phases ask for, without aiperf's start-up or the cool-down."""
        return sum(p.duration_s for p in self.phases)


class _PlanReader(Reader):
    def fail(self, path: str, reason: str) -> NoReturn:
        prefix = f"{path}: " if path else ""
        raise PlanError(f"{self.origin}: {prefix}{reason}", path)

    def known(self, value: Mapping[str, Any], path: str, keys: Iterable[str]) -> None:
        allowed = list(keys)
        for key in value:
            if key not in allowed:
                self.fail(join_path(path, key), f"unknown key; known: {', '.join(allowed)}")

    def number(
        self, value: object, path: str, *, positive: bool, maximum: float | None = None
    ) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
            self.fail(path, f"must be a number, got {describe(value)}")
        if math.isinf(value):
            self.fail(path, f"must be finite, got {value}")
        if positive and value <= 0:
            self.fail(path, f"must be > 0, got {value}")
        if value < 0:
            self.fail(path, f"must be >= 0, got {value}")
        if maximum is not None and value > maximum:
            self.fail(path, f"must be <= {maximum:g}, got {value}")
        return float(value)

    def bounded_seconds(
        self, value: object, path: str, *, positive: bool, maximum: float = MAX_SECONDS
    ) -> float:
        seconds = self.seconds(value, path, positive=positive)
        if math.isnan(seconds) or math.isinf(seconds) or seconds > maximum:
            self.fail(path, f"must be <= {maximum:g} seconds, got {value}")
        return seconds

    def bounded_string(self, value: object, path: str) -> str:
        text = self.string(value, path)
        if len(text) > MAX_TEXT:
            self.fail(path, f"must be at most {MAX_TEXT} characters, got {len(text)}")
        return text


def load_plan(path: Path, *, display: str | None = None) -> Plan:
    """Read and validate a plan file. Relative tokenizer folders are resolved against the
    file's folder. Raises :class:`PlanError`."""
    origin = display if display is not None else str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise PlanError(f"{origin}: not UTF-8 text ({exc.reason})") from None
    except OSError as exc:
        raise PlanError(f"{origin}: cannot read: {exc.strerror}") from None
    return parse_plan(decode_yaml(text, origin), origin=origin, base_dir=path.resolve().parent)


def decode_yaml(text: str, origin: str) -> object:
    """The YAML document of a plan; a syntax error or a document that expands (through
    anchors and aliases) to more than :data:`MAX_NODES` values is a :class:`PlanError`."""
    try:
        raw = parse_yaml(text, origin)
    except GraphError as exc:
        raise PlanError(str(exc)) from None
    if _nodes(raw, MAX_NODES) > MAX_NODES:
        raise PlanError(f"{origin}: the document expands to more than {MAX_NODES} values")
    return raw


def _nodes(value: object, budget: int) -> int:
    """How many values ``value`` holds, counting shared (aliased) parts each time they
    appear, and stopping once past ``budget``."""
    count = 0
    stack = [value]
    while stack and count <= budget:
        item = stack.pop()
        count += 1
        if isinstance(item, Mapping):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list | tuple):
            stack.extend(item)
    return count


def parse_plan(raw: object, *, origin: str = "plan", base_dir: Path | None = None) -> Plan:
    """A :class:`Plan` from the decoded YAML document; raises :class:`PlanError`."""
    r = _PlanReader(origin)
    top = r.mapping(raw, "", optional=False)
    r.known(top, "", _TOP_KEYS)
    if _nodes(raw, MAX_NODES) > MAX_NODES:
        r.fail("", f"the plan holds more than {MAX_NODES} values")
    phases_raw = r.sequence(top.get("phases"), "phases")
    if not phases_raw:
        r.fail("phases", "must list at least one phase")
    if len(phases_raw) > MAX_PHASES:
        r.fail("phases", f"at most {MAX_PHASES} phases, got {len(phases_raw)}")
    phases = tuple(_phase(r, item, f"phases[{i}]", i) for i, item in enumerate(phases_raw))
    seen: dict[str, int] = {}
    for i, phase in enumerate(phases):
        if phase.name in seen:
            r.fail(f"phases[{i}].name", f"{phase.name!r} is already phases[{seen[phase.name]}]")
        seen[phase.name] = i
    if "tokenizer" not in top:
        r.fail(
            "tokenizer",
            "required: the model's tokenizer, as a local folder (relative to the plan) or a "
            "Hugging Face id (fetched from the hub); aiperf counts tokens with it",
        )
    interval_s = _seconds(r, top, "interval", 1.0, positive=True, maximum=MAX_INTERVAL_S)
    plan = Plan(
        phases=phases,
        tokenizer=_tokenizer(r.bounded_string(top["tokenizer"], "tokenizer"), base_dir),
        name=_name(r, top["name"], "name") if "name" in top else "experiment",
        seed=_seed(r, top["seed"]) if "seed" in top else 0,
        model=r.bounded_string(top["model"], "model") if "model" in top else None,
        prometheus=_prometheus(r, top["prometheus"]) if "prometheus" in top else None,
        interval_s=interval_s,
        # A window shorter than the interval would see no scrape to take a difference to.
        window_s=_seconds(r, top, "window", max(10.0, interval_s), positive=True),
        grace_period_s=_seconds(r, top, "gracePeriod", 30.0, positive=False),
        cooldown_s=_seconds(r, top, "cooldown", 0.0, positive=False),
        slo=_slo(r, top.get("slo")),
        source=origin,
    )
    if plan.window_s < plan.interval_s:
        r.fail("window", f"must be >= interval ({plan.interval_s:g}), got {plan.window_s:g}")
    return plan


def _seed(r: _PlanReader, value: object) -> int:
    seed = r.integer(value, "seed", minimum=0)
    if seed > MAX_SEED:
        r.fail("seed", f"must be <= {MAX_SEED}, got {seed}")
    return seed


def _name(r: _PlanReader, value: object, path: str) -> str:
    name = r.string(value, path)
    if len(name) > MAX_NAME:
        r.fail(path, f"must be at most {MAX_NAME} characters, got {len(name)}")
    if not PHASE_NAME.fullmatch(name):
        r.fail(
            path,
            f"invalid name {name!r}: must start with a letter or '_' and hold only letters, "
            "digits, '_' and '-'",
        )
    return name


def _seconds(
    r: _PlanReader,
    top: Mapping[str, Any],
    key: str,
    default: float,
    *,
    positive: bool,
    maximum: float = MAX_SECONDS,
) -> float:
    if key not in top:
        return default
    return r.bounded_seconds(top[key], key, positive=positive, maximum=maximum)


def _tokenizer(value: str, base_dir: Path | None) -> str:
    """A relative path that names a folder next to the plan becomes absolute (aiperf runs
    elsewhere); anything else is passed as given (a hub id such as ``org/model``)."""
    candidate = Path(value).expanduser()
    if not candidate.is_absolute() and base_dir is not None:
        candidate = base_dir / candidate
    return str(candidate) if candidate.is_dir() else value


def _prometheus(r: _PlanReader, value: object) -> Prometheus:
    if isinstance(value, str):
        return Prometheus(url=_http_url(r, value, "prometheus"))
    m = r.mapping(value, "prometheus", optional=False)
    r.known(m, "prometheus", _PROMETHEUS_KEYS)
    if "url" not in m:
        r.fail("prometheus.url", "required: the Prometheus server's URL")
    selector = r.bounded_string(m["selector"], "prometheus.selector") if "selector" in m else ""
    if "{" in selector or "}" in selector:
        r.fail("prometheus.selector", f"label matchers without braces, got {selector!r}")
    return Prometheus(url=_http_url(r, m["url"], "prometheus.url"), selector=selector)


def _http_url(r: _PlanReader, value: object, path: str) -> str:
    url = r.bounded_string(value, path)
    if not url.startswith(("http://", "https://")):
        r.fail(path, f"must be an http:// or https:// URL, got {url!r}")
    return url.rstrip("/")


def _slo(r: _PlanReader, value: object) -> dict[str, float]:
    m = r.mapping(value, "slo")
    r.known(m, "slo", tuple(SLO_COLUMNS))
    return {key: r.number(m[key], f"slo.{key}", positive=True, maximum=MAX_SECONDS) for key in m}


def _tokens_count(r: _PlanReader, value: object, path: str) -> int:
    count = r.integer(value, path, minimum=1)
    if count > MAX_TOKENS:
        r.fail(path, f"must be <= {MAX_TOKENS}, got {count}")
    return count


def _tokens(r: _PlanReader, value: object, path: str) -> Tokens:
    if value is None:
        r.fail(path, "required: a mean number of tokens, or {mean, stddev}")
    if not isinstance(value, Mapping):
        return Tokens(mean=_tokens_count(r, value, path))
    m = r.mapping(value, path)
    r.known(m, path, _TOKEN_KEYS)
    if "mean" not in m:
        r.fail(f"{path}.mean", "required: the mean number of tokens")
    mean = _tokens_count(r, m["mean"], f"{path}.mean")
    stddev = (
        r.number(m["stddev"], f"{path}.stddev", positive=False, maximum=MAX_TOKENS)
        if "stddev" in m
        else 0.0
    )
    return Tokens(mean=mean, stddev=stddev)


def _phase(r: _PlanReader, value: object, path: str, index: int) -> Phase:
    m = r.mapping(value, path, optional=False)
    r.known(m, path, _PHASE_KEYS)
    name = _name(r, m["name"], f"{path}.name") if "name" in m else f"phase{index + 1}"
    concurrency = (
        r.integer(m["concurrency"], f"{path}.concurrency", minimum=1)
        if "concurrency" in m
        else None
    )
    if concurrency is not None and concurrency > MAX_CONCURRENCY:
        r.fail(f"{path}.concurrency", f"must be <= {MAX_CONCURRENCY}, got {concurrency}")
    rate = (
        r.number(m["requestRate"], f"{path}.requestRate", positive=True, maximum=MAX_RATE)
        if "requestRate" in m
        else None
    )
    if concurrency is None and rate is None:
        r.fail(path, "needs concurrency (requests in flight) or requestRate (requests/s)")
    arrival = "poisson"
    if "arrival" in m:
        if rate is None:
            r.fail(f"{path}.arrival", "applies only to a requestRate phase")
        arrival = r.choice(m["arrival"], f"{path}.arrival", ARRIVALS)
    if "duration" not in m:
        r.fail(f"{path}.duration", "required: the phase's length in seconds")
    return Phase(
        name=name,
        duration_s=r.bounded_seconds(m["duration"], f"{path}.duration", positive=True),
        input_tokens=_tokens(r, m.get("inputTokens"), f"{path}.inputTokens"),
        output_tokens=_tokens(r, m.get("outputTokens"), f"{path}.outputTokens"),
        concurrency=concurrency,
        request_rate=rate,
        arrival=arrival,
    )
