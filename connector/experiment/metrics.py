"""The frontend's load and latency, from its own ``dynamo_frontend_*`` metrics: request rate,
errors, requests in flight, TTFT and ITL percentiles over a trailing window.

Two sources give the same figures. With a Prometheus URL, PromQL does the work
(``rate``, ``histogram_quantile``) on what Prometheus scraped. Without one, the experiment
scrapes each frontend replica's ``/metrics`` itself; the pure functions here sum the
replicas' counters and histograms, take the difference across the window and interpolate
the quantiles as Prometheus' ``histogram_quantile`` does.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

REQUESTS = "dynamo_frontend_requests_total"
INFLIGHT = "dynamo_frontend_inflight_requests"
TTFT = "dynamo_frontend_time_to_first_token_seconds"
ITL = "dynamo_frontend_inter_token_latency_seconds"
QUANTILES = (("p50", 0.5), ("p99", 0.99))

Buckets = tuple[tuple[float, float], ...]  # (upper bound, cumulative count), +Inf last


@dataclass(frozen=True)
class Totals:
    """One moment's cumulative counters of the frontend(s), summed over replicas and label
    sets (models, endpoints)."""

    requests_ok: float = 0.0
    requests_failed: float = 0.0
    inflight: float = 0.0
    ttft: Buckets = ()
    itl: Buckets = ()


@dataclass(frozen=True)
class Figures:
    """What one timeline row shows of the frontend; ``None`` where there was no data (no
    request finished in the window, or the source did not answer)."""

    request_rate: float | None = None  # requests finished per second
    errors_per_s: float | None = None
    inflight: float | None = None
    ttft_p50_s: float | None = None
    ttft_p99_s: float | None = None
    itl_p50_s: float | None = None
    itl_p99_s: float | None = None


def parse_totals(text: str) -> Totals:
    """The counters of one frontend's Prometheus text exposition."""
    ok = failed = inflight = 0.0
    buckets: dict[str, dict[float, float]] = {TTFT: {}, ITL: {}}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == REQUESTS:
                if sample.labels.get("status", "success") == "success":
                    ok += sample.value
                else:
                    failed += sample.value
            elif sample.name == INFLIGHT:
                inflight += sample.value
            elif sample.name.endswith("_bucket") and sample.name[: -len("_bucket")] in buckets:
                le = float(sample.labels["le"])
                into = buckets[sample.name[: -len("_bucket")]]
                into[le] = into.get(le, 0.0) + sample.value
    return Totals(ok, failed, inflight, _sorted(buckets[TTFT]), _sorted(buckets[ITL]))


def add(totals: Iterable[Totals]) -> Totals:
    """Several frontend replicas as one."""
    ok = failed = inflight = 0.0
    ttft: dict[float, float] = {}
    itl: dict[float, float] = {}
    for t in totals:
        ok += t.requests_ok
        failed += t.requests_failed
        inflight += t.inflight
        for into, given in ((ttft, t.ttft), (itl, t.itl)):
            for le, count in given:
                into[le] = into.get(le, 0.0) + count
    return Totals(ok, failed, inflight, _sorted(ttft), _sorted(itl))


def window(older: Totals | None, newer: Totals, seconds: float) -> Figures:
    """The figures between two moments ``seconds`` apart. A counter that went down (a
    frontend restarted) counts from zero, as Prometheus' ``rate`` does."""
    if older is None or seconds <= 0:
        return Figures(inflight=newer.inflight)
    ttft = _bucket_delta(older.ttft, newer.ttft)
    itl = _bucket_delta(older.itl, newer.itl)
    return Figures(
        request_rate=_delta(older.requests_ok + older.requests_failed, _total(newer)) / seconds,
        errors_per_s=_delta(older.requests_failed, newer.requests_failed) / seconds,
        inflight=newer.inflight,
        ttft_p50_s=histogram_quantile(0.5, ttft),
        ttft_p99_s=histogram_quantile(0.99, ttft),
        itl_p50_s=histogram_quantile(0.5, itl),
        itl_p99_s=histogram_quantile(0.99, itl),
    )


def histogram_quantile(q: float, buckets: Sequence[tuple[float, float]]) -> float | None:
    """Prometheus' ``histogram_quantile`` over cumulative ``(le, count)`` buckets: linear
    interpolation inside the bucket the rank falls in, the lowest bucket starting at 0, the
    highest finite bound when the rank falls in ``+Inf``; ``None`` without observations."""
    if not buckets or not math.isinf(buckets[-1][0]) or not 0 <= q <= 1:
        return None
    counts = _monotonic([c for _, c in buckets])
    if counts[-1] <= 0:
        return None
    rank = q * counts[-1]
    for i, ((le, _), cum) in enumerate(zip(buckets, counts, strict=True)):
        if cum < rank:
            continue
        if math.isinf(le):
            return buckets[i - 1][0] if i > 0 else None
        if i == 0:
            if le <= 0:
                return le
            start, below = 0.0, 0.0
        else:
            start, below = buckets[i - 1][0], counts[i - 1]
        in_bucket = cum - below
        return le if in_bucket <= 0 else start + (le - start) * (rank - below) / in_bucket
    return None


def _total(t: Totals) -> float:
    return t.requests_ok + t.requests_failed


def _delta(older: float, newer: float) -> float:
    return newer - older if newer >= older else newer


def _bucket_delta(older: Buckets, newer: Buckets) -> Buckets:
    before = dict(older)
    if newer and before and newer[-1][1] < before.get(newer[-1][0], 0.0):
        return newer  # reset
    return tuple((le, max(count - before.get(le, 0.0), 0.0)) for le, count in newer)


def _sorted(buckets: Mapping[float, float]) -> Buckets:
    return tuple(sorted(buckets.items()))


def _monotonic(counts: Sequence[float]) -> list[float]:
    """Cumulative counts made non-decreasing (scrapes are not atomic across buckets)."""
    out: list[float] = []
    for c in counts:
        out.append(max(c, out[-1]) if out else c)
    return out


# ---------------------------------------------------------------------------- PromQL


def promql(selector: str, window_s: float) -> dict[str, str]:
    """The queries that give :class:`Figures` from a Prometheus that scrapes the frontend
    with ``selector`` (label matchers without braces)."""
    w = f"[{_duration(window_s)}]"
    sel = f"{{{selector}}}"
    failed = f'{{{selector},status!="success"}}' if selector else '{status!="success"}'

    def quantile(q: float, metric: str) -> str:
        return f"histogram_quantile({q}, sum by (le) (rate({metric}_bucket{sel}{w})))"

    return {
        "request_rate": f"sum(rate({REQUESTS}{sel}{w}))",
        "errors_per_s": f"sum(rate({REQUESTS}{failed}{w})) or vector(0)",
        "inflight": f"sum({INFLIGHT}{sel})",
        "ttft_p50_s": quantile(0.5, TTFT),
        "ttft_p99_s": quantile(0.99, TTFT),
        "itl_p50_s": quantile(0.5, ITL),
        "itl_p99_s": quantile(0.99, ITL),
    }


def _duration(seconds: float) -> str:
    return f"{round(seconds * 1000)}ms"


def figures_from_values(values: Mapping[str, float | None]) -> Figures:
    """:class:`Figures` from the answers to :func:`promql`'s queries (NaN: no data)."""

    def get(key: str) -> float | None:
        v = values.get(key)
        return None if v is None or math.isnan(v) else v

    return Figures(
        request_rate=get("request_rate"),
        errors_per_s=get("errors_per_s"),
        inflight=get("inflight"),
        ttft_p50_s=get("ttft_p50_s"),
        ttft_p99_s=get("ttft_p99_s"),
        itl_p50_s=get("itl_p50_s"),
        itl_p99_s=get("itl_p99_s"),
    )
