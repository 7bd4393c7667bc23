"""Prometheus metrics (SPEC §5) and the event sink that fills them from request records.

The request path only adds numbers into plain dicts (`inc`, `observe`): prometheus_client's
per-update locks and label lookups cost more than everything else a record does. A
collector renders the dicts at scrape time. With `workers` above 1 (the supervisor sets
`PROMETHEUS_MULTIPROC_DIR` before any worker starts) each worker also flushes its
increments into prometheus_client's multiprocess files once a second and before each
scrape it answers, so that `/metrics` of any worker sums all of them.

Labels stay bounded: model, deployment, status; `team` only with `metrics.team_label`.
Duration and TTFB buckets reach 10 minutes. Middlewares add their own metrics with
`define(...)`.
"""

from __future__ import annotations

import asyncio
import os
from bisect import bisect_left
from typing import TYPE_CHECKING, Any, Iterator

from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector,
                               generate_latest)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from .periodic import every

if TYPE_CHECKING:
    from .context import Record
    from .services import Services

BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    """The process's metrics: definitions, cheap accumulation, rendering."""

    def __init__(self, team_label: bool = False) -> None:
        self.team_label = team_label
        self.multiprocess = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
        self.kinds: dict[str, tuple[str, str, tuple[str, ...], tuple[float, ...]]] = {}
        self.values: dict[tuple[str, tuple], float] = {}  # counters and gauges
        self.hists: dict[tuple[str, tuple], list[float]] = {}  # per-bucket counts..., +Inf, sum
        self._pending: dict[tuple[str, tuple], float] = {}  # multiprocess: not yet flushed
        self._pending_hists: dict[tuple[str, tuple], list[float]] = {}
        self._prom: dict[str, Any] = {}
        self.drains: list[Any] = []  # sinks holding records not yet counted: drained before reading
        self.registry = CollectorRegistry(auto_describe=False)
        if not self.multiprocess:  # process_cpu_seconds_total, process_resident_memory_bytes...
            ProcessCollector(registry=self.registry)
        team = ("team",) if team_label else ()
        self.define("llmproxy_requests_total", "counter", "Requests by outcome.",
                    ("model", "deployment", "status") + team)
        self.define("llmproxy_request_duration_seconds", "histogram", "Request duration.",
                    ("model", "deployment") + team)
        self.define("llmproxy_time_to_first_byte_seconds", "histogram", "Time to the first byte sent.",
                    ("model", "deployment") + team)
        self.define("llmproxy_tokens_total", "counter", "Tokens counted.", ("type", "model", "deployment") + team)
        self.define("llmproxy_spend_usd_total", "counter", "Spend in USD.", ("model", "deployment") + team)
        self.define("llmproxy_unpriced_requests_total", "counter",
                    "Answered requests of a model without pricing (their spend is unknown, recorded as 0).",
                    ("model",))
        self.define("llmproxy_inflight_requests", "gauge", "Requests being served.", ())
        self.define("llmproxy_admin_requests_total", "counter", "Admin API calls by action and status.",
                    ("action", "status"))
        self.define("llmproxy_upstream_errors_total", "counter", "Failed upstream attempts.",
                    ("deployment", "outcome"))
        self.define("llmproxy_cache_requests_total", "counter", "Requests a response cache saw, by result.",
                    ("result",))
        self.registry.register(_Collector(self))

    def define(self, name: str, kind: str, help: str, labels: tuple[str, ...],
               buckets: tuple[float, ...] = BUCKETS) -> None:
        """Declare a metric (`counter`, `gauge` or `histogram`) once, at construction time."""
        if kind not in ("counter", "gauge", "histogram"):
            raise ValueError(f"unknown metric kind {kind!r}")
        self.kinds[name] = (kind, help, tuple(labels), tuple(buckets))
        if self.multiprocess:
            if kind == "counter":
                self._prom[name] = Counter(name, help, labels, registry=None)
            elif kind == "gauge":
                self._prom[name] = Gauge(name, help, labels, registry=None, multiprocess_mode="livesum")
            else:
                self._prom[name] = Histogram(name, help, labels, buckets=buckets, registry=None)

    # --- the request path -------------------------------------------------------------

    def inc(self, name: str, labels: tuple = (), value: float = 1.0) -> None:
        key = (name, labels)
        values = self.values
        values[key] = values.get(key, 0.0) + value
        if self.multiprocess:
            self._pending[key] = self._pending.get(key, 0.0) + value

    def observe(self, name: str, labels: tuple, value: float) -> None:
        key = (name, labels)
        buckets = self.kinds[name][3]
        at = bisect_left(buckets, value)
        for table in (self.hists, self._pending_hists) if self.multiprocess else (self.hists,):
            h = table.get(key)
            if h is None:
                h = table[key] = [0.0] * (len(buckets) + 2)
            h[at] += 1
            h[-1] += value

    # --- scraping ---------------------------------------------------------------------

    def gauge_from(self, name: str, read: Any, labels: tuple = ()) -> None:
        """A gauge whose value is read when metrics are drained (a counter the owner keeps)."""
        def update() -> None:
            key = (name, labels)
            value = float(read())
            if self.values.get(key) != value:
                self.values[key] = value
                if self.multiprocess:
                    self._pending[key] = value
        self.drains.append(update)

    def drain(self) -> None:
        for drain in self.drains:
            drain()

    def exposition(self) -> bytes:
        self.drain()
        if self.multiprocess:
            from prometheus_client import multiprocess

            self.flush()
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            return generate_latest(registry)
        return generate_latest(self.registry)

    def flush(self) -> None:
        """Multiprocess mode: move pending increments into the shared files."""
        pending, self._pending = self._pending, {}
        for (name, labels), value in pending.items():
            metric = self._prom[name]
            child = metric.labels(*labels) if labels else metric
            if self.kinds[name][0] == "gauge":
                child.set(self.values[(name, labels)])
            else:
                child.inc(value)
        hists, self._pending_hists = self._pending_hists, {}
        for (name, labels), counts in hists.items():
            metric = self._prom[name]
            child = metric.labels(*labels) if labels else metric
            # prometheus_client keeps one value per bucket and one for the sum.
            for i, n in enumerate(counts[:-1]):
                if n:
                    child._buckets[i].inc(n)
            child._sum.inc(counts[-1])

    def tick(self) -> None:
        """The periodic step (llmproxy.periodic): drain, and write the worker's file."""
        self.drain()
        if self.multiprocess:
            self.flush()


class _Collector:
    """Renders the accumulated dicts as Prometheus metric families."""

    def __init__(self, metrics: Metrics) -> None:
        self.m = metrics

    def collect(self) -> Iterator[Any]:
        m = self.m
        by_name: dict[str, list] = {}
        for (name, labels), value in list(m.values.items()):
            by_name.setdefault(name, []).append((labels, value))
        hist_by_name: dict[str, list] = {}
        for (name, labels), counts in list(m.hists.items()):
            hist_by_name.setdefault(name, []).append((labels, counts))
        for name, (kind, help, labelnames, buckets) in m.kinds.items():
            if kind == "histogram":
                family = HistogramMetricFamily(name, help, labels=labelnames)
                for labels, counts in hist_by_name.get(name, ()):
                    cumulative, running = [], 0.0
                    for bound, n in zip(list(buckets) + [float("inf")], counts[:-1]):
                        running += n
                        cumulative.append((_bound(bound), running))
                    family.add_metric(list(labels), cumulative, counts[-1])
            else:
                family_cls = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
                family = family_cls(name.removesuffix("_total") if kind == "counter" else name, help,
                                    labels=labelnames)
                rows = by_name.get(name, ())
                if not rows and not labelnames:
                    rows = [((), 0.0)]
                for labels, value in rows:
                    family.add_metric(list(labels), value)
            yield family


def _bound(b: float) -> str:
    return "+Inf" if b == float("inf") else repr(float(b))


class MetricsSink:
    """Event sink: records in, counters and histograms updated. The request path only
    queues the record; they are counted in batches every second and before every scrape,
    so `/metrics` is always exact."""

    def __init__(self, options: Any, services: "Services") -> None:
        self.m = services.metrics
        self.m.drains.append(self.drain)
        self.pending: list["Record"] = []
        self._flusher: asyncio.Task | None = None
        self._flush_soon = False

    async def startup(self) -> None:
        self._flusher = asyncio.create_task(every(1.0, self.m.tick, "metrics_flush"))

    async def shutdown(self) -> None:
        if self._flusher is not None:
            self._flusher.cancel()
        self.drain()
        if self.m.multiprocess:
            self.m.flush()

    def emit(self, record: "Record") -> None:
        self.pending.append(record)
        # With workers, a scrape of any worker reads the others' files: write them right
        # after the requests of this turn of the loop, so a scrape sees every request done.
        if self.m.multiprocess and not self._flush_soon:
            self._flush_soon = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_soon = False
        try:
            self.m.tick()
        except Exception:  # the periodic tick logs a failure that persists
            pass

    def drain(self) -> None:
        pending, self.pending = self.pending, []
        for record in pending:
            self.count(record)

    def count(self, record: "Record") -> None:
        m = self.m
        if record.api == "admin":  # the action is one of the admin API's own route names
            m.inc("llmproxy_admin_requests_total", (record.action or "", str(record.status)))
            return
        # Only configured names are labels: a name the client made up counts as "unknown".
        model = record.model or ("unknown" if record.requested_model else "")
        short = (model, record.deployment or "")
        if m.team_label:
            short += (record.team_id or "",)
        m.inc("llmproxy_requests_total", short[:2] + (str(record.status),) + short[2:])
        m.observe("llmproxy_request_duration_seconds", short, record.duration_s)
        if record.ttfb_s is not None:
            m.observe("llmproxy_time_to_first_byte_seconds", short, record.ttfb_s)
        if record.prompt_tokens:
            m.inc("llmproxy_tokens_total", ("prompt",) + short, record.prompt_tokens)
        if record.completion_tokens:
            m.inc("llmproxy_tokens_total", ("completion",) + short, record.completion_tokens)
        if record.spend:
            m.inc("llmproxy_spend_usd_total", short, float(record.spend))
        elif record.unpriced:
            m.inc("llmproxy_unpriced_requests_total", (model,))
        if record.cache is not None:  # hit | miss | bypass, set by a cache middleware
            m.inc("llmproxy_cache_requests_total", (record.cache,))
        for attempt in record.attempts:
            outcome = attempt.outcome
            if outcome != "ok" and not outcome.startswith("http_4"):
                m.inc("llmproxy_upstream_errors_total", (attempt.deployment, outcome))
