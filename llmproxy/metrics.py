"""Prometheus metrics (SPEC §5) and the event sink that fills them from request records.

Labels stay bounded: model, deployment, status; `team` only with `metrics.team_label`.
Duration and TTFB buckets reach 10 minutes. With `workers` above 1 the values live in
`PROMETHEUS_MULTIPROC_DIR` (set by the supervisor before any worker starts) and
`/metrics` sums every process.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST

if TYPE_CHECKING:
    from .context import Record
    from .services import Services

BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    """The process's collectors, in a registry of its own (no global state)."""

    def __init__(self, team_label: bool = False) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.team_label = team_label
        r = self.registry
        base = ["model", "deployment", "status"] + (["team"] if team_label else [])
        short = ["model", "deployment"] + (["team"] if team_label else [])
        self.requests = Counter("llmproxy_requests_total", "Requests by outcome.", base, registry=r)
        self.duration = Histogram("llmproxy_request_duration_seconds", "Request duration.", short,
                                  buckets=BUCKETS, registry=r)
        self.ttfb = Histogram("llmproxy_time_to_first_byte_seconds", "Time to the first byte sent.", short,
                              buckets=BUCKETS, registry=r)
        self.tokens = Counter("llmproxy_tokens_total", "Tokens counted.", ["type"] + short, registry=r)
        self.spend = Counter("llmproxy_spend_usd_total", "Spend in USD.", short, registry=r)
        self.inflight = Gauge("llmproxy_inflight_requests", "Requests being served.", registry=r,
                              multiprocess_mode="livesum")
        self.upstream_errors = Counter("llmproxy_upstream_errors_total", "Failed upstream attempts.",
                                       ["deployment", "outcome"], registry=r)
        self._children: dict[tuple, Any] = {}

    def child(self, metric: Any, labels: tuple) -> Any:
        """Label children cached by value tuple: `labels()` is the slow part of a metric."""
        key = (id(metric), labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found

    def exposition(self) -> bytes:
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            from prometheus_client import multiprocess

            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            return generate_latest(registry)
        return generate_latest(self.registry)


class MetricsSink:
    """Event sink: one record in, counters and histograms updated."""

    def __init__(self, options: Any, services: "Services") -> None:
        self.m = services.metrics

    def emit(self, record: "Record") -> None:
        m = self.m
        model = record.model or ""
        dep = record.deployment or ""
        short = (model, dep, record.team_id or "") if m.team_label else (model, dep)
        m.child(m.requests, short[:2] + (str(record.status),) + short[2:]).inc()
        m.child(m.duration, short).observe(record.duration_s)
        if record.ttfb_s is not None:
            m.child(m.ttfb, short).observe(record.ttfb_s)
        if record.prompt_tokens:
            m.child(m.tokens, ("prompt",) + short).inc(record.prompt_tokens)
        if record.completion_tokens:
            m.child(m.tokens, ("completion",) + short).inc(record.completion_tokens)
        if record.spend:
            m.child(m.spend, short).inc(float(record.spend))
        for attempt in record.attempts:
            if attempt.outcome != "ok" and not attempt.outcome.startswith("http_4"):
                m.child(m.upstream_errors, (attempt.deployment, attempt.outcome)).inc()
