"""Usage events: one per request to a model API, for a warehouse, a billing service or a
log shipper, through the event sinks `jsonl` (a file) and `webhook` (POSTed batches). The fields of its spend row plus the trace id, the key's alias, the attempts
and the error; never prompt or answer text (`usage_event`).

`JsonlSink` (event sink `jsonl`) appends them to a file, one JSON object per line,
rotated by size like logrotate's numbered files (`events.jsonl.1` the newest of the
old). The request path only queues the record; a task writes what queued every
`flush_interval` in a thread. Past `queue_size` waiting events (a disk that stopped
answering) new ones are dropped and counted rather than held without bound; a failed
write is retried at the next flush. Its queue, drops and failures are on `/metrics`
(`llmproxy_event_sink_*{sink="jsonl"}`) and on `/health/readiness`.
"""

from __future__ import annotations

import asyncio
import os
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

import orjson
import structlog

from .context import BILLED_APIS
from .periodic import every
from .spend import SpendWriter, storable

if TYPE_CHECKING:
    from .context import Record
    from .services import Services

log = structlog.get_logger("llmproxy.events")
QUEUE_DEPTH = "llmproxy_event_sink_queue_depth"
DROPPED = "llmproxy_event_sink_dropped_total"
FAILURES = "llmproxy_event_sink_failures_total"


def usage_event(r: "Record") -> dict[str, Any]:
    """The usage event of a record (see the module docstring); JSON-ready."""
    return {
        "request_id": r.request_id,
        "client_request_id": storable(r.client_request_id),
        "trace_id": storable(r.trace_id),
        "started_at": datetime.fromtimestamp(r.started_at, timezone.utc).isoformat(),
        "api": r.api,
        "stream": r.stream,
        "key_id": r.key_id,
        "key_alias": storable(r.key_alias),
        "team_id": storable(r.team_id),
        "user_id": storable(r.user_id),
        "model": r.model,
        "served_model": r.served_model,
        "deployment": r.deployment,
        "provider": r.provider,
        "status": r.status,
        "error": r.error_code or r.error_type,
        "prompt_tokens": r.prompt_tokens,
        "completion_tokens": r.completion_tokens,
        "cached_tokens": r.cached_tokens,
        "cache_creation_tokens": r.cache_creation_tokens,
        "reasoning_tokens": r.reasoning_tokens,
        "tokens_estimated": r.tokens_estimated,
        "spend": str(r.spend),  # exact decimal USD, as a string (a float would round it)
        "unpriced": r.unpriced,  # no pricing for the model: the spend is unknown
        "duration_ms": round(r.duration_s * 1000, 3),
        "ttfb_ms": None if r.ttfb_s is None else round(r.ttfb_s * 1000, 3),
        "cache": r.cache,
        "client_disconnected": r.client_disconnected,
        "attempts": [{"deployment": a.deployment, "outcome": a.outcome, "duration_ms": round(a.duration_s * 1000, 3)}
                     for a in r.attempts],
    }


@dataclass(frozen=True)
class JsonlOptions:
    path: str = field(metadata={"min_len": 1})  # the file; its rotated copies are <path>.1 ... <path>.<backups>
    max_bytes: int = field(default=100 * 1024 * 1024, metadata={"min": 1024})  # rotate before the file passes this
    backups: int = field(default=5, metadata={"min": 0})  # rotated files kept (0: the file is truncated)
    flush_interval: float = field(default=0.5, metadata={"gt": 0})  # seconds between writes
    queue_size: int = field(default=100_000, metadata={"min": 1})  # events waiting, at most


def _rotate(path: str, backups: int) -> None:
    if backups == 0:
        open(path, "wb").close()
        return
    for i in range(backups - 1, 0, -1):
        older = f"{path}.{i}"
        if os.path.exists(older):
            os.replace(older, f"{path}.{i + 1}")
    os.replace(path, f"{path}.1")


class JsonlSink:
    """Event sink `jsonl` (see the module docstring)."""

    Options = JsonlOptions
    name = "jsonl"

    def __init__(self, options: JsonlOptions, services: "Services") -> None:
        self.options = options
        self.services = services
        self.pending: list[Any] = []
        self.dropped = 0
        self.failures = 0
        self.written = 0
        self._lock = asyncio.Lock()
        self._io = threading.Lock()  # the thread's appends and rotations, one at a time
        self._task: asyncio.Task | None = None
        m = services.metrics
        labels = (self.name,)
        m.define(QUEUE_DEPTH, "gauge", "Events waiting in an event sink's queue.", ("sink",))
        m.define(DROPPED, "counter", "Events an event sink dropped (its queue was full).", ("sink",))
        m.define(FAILURES, "counter", "Failed writes or deliveries of an event sink (retried).", ("sink",))
        m.gauge_from(QUEUE_DEPTH, lambda: len(self.pending), labels)

    def emit(self, record: "Record") -> None:
        if record.api not in BILLED_APIS:
            return
        if len(self.pending) >= self.options.queue_size:
            self.dropped += 1
            self.services.metrics.inc(DROPPED, (self.name,))
            return
        self.pending.append(record)

    def health(self) -> dict[str, Any]:
        return {self.name: {"queued": len(self.pending), "written": self.written, "dropped": self.dropped,
                            "failures": self.failures, "path": self.options.path}}

    async def startup(self) -> None:
        self._task = asyncio.create_task(every(self.options.flush_interval, self.flush, "jsonl_flush"))

    async def shutdown(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self.flush()

    async def flush(self) -> None:
        async with self._lock:
            records, self.pending = self.pending, []
            if not records:
                return
            lines = []
            for r in records:
                try:
                    lines.append(orjson.dumps(usage_event(r)) + b"\n")
                except (TypeError, ValueError) as exc:  # one record that cannot be written is no reason to stop
                    log.error("event_unwritable", sink=self.name, request_id=r.request_id, error=str(exc))
            try:
                await asyncio.to_thread(self._append, lines)
            except OSError as exc:
                self.failures += 1
                self.services.metrics.inc(FAILURES, (self.name,))
                log.warning("event_sink_write_failed", sink=self.name, path=self.options.path,
                            error=f"{type(exc).__name__}: {exc}", events=len(records))
                room = self.options.queue_size - len(self.pending)
                self.pending[:0] = records[:max(0, room)]  # tried again at the next flush, within the bound
                lost = len(records) - max(0, room)
                if lost > 0:
                    self.dropped += lost
                    self.services.metrics.inc(DROPPED, (self.name,), lost)
                return
            self.written += len(lines)

    def _append(self, lines: list[bytes]) -> None:
        data = b"".join(lines)
        o = self.options
        with self._io:
            try:
                size = os.path.getsize(o.path)
            except FileNotFoundError:
                size = 0
            if size and size + len(data) > o.max_bytes:
                _rotate(o.path, o.backups)
            with open(o.path, "ab") as f:
                f.write(data)


# --------------------------------------------------------------------------- webhook


@dataclass(frozen=True)
class WebhookOptions:
    url: str = field(metadata={"min_len": 1})  # where batches are POSTed (a warehouse's ingest, a billing service)
    headers: dict[str, str] | None = None  # sent with each batch (an auth header)
    batch_size: int = field(default=100, metadata={"min": 1})  # events per POST
    flush_interval: float = field(default=1.0, metadata={"gt": 0})  # seconds a partial batch waits
    queue_size: int = field(default=20_000, metadata={"min": 1})  # events waiting in memory; past it, the spill file
    spill_path: str = "./llmproxy-webhook-spill.jsonl"  # per worker, like the spend log's
    timeout: float = field(default=10.0, metadata={"gt": 0})  # seconds per POST


class WebhookSink(SpendWriter):
    """Event sink `webhook`: usage events POSTed in batches as `{"events": [...]}` with an
    `Idempotency-Key` (the same for a batch sent again). It is the spend log's writer
    with another destination, so it has the same guarantees: batches off the request path,
    retried with backoff while the receiver fails (a connection error, a timeout, 408, 425,
    429 or 5xx), spilled to `spill_path` past `queue_size` and at shutdown, replayed when
    the receiver is back (also after a restart), an event a receiver refuses alone (4xx) set
    apart in `<spill_path>.rejected`. Delivery is at least once: a receiver dedupes by each
    event's `request_id`."""

    Options = WebhookOptions
    kind = "webhook"
    readiness_key = "webhook"
    rejected_metric = "llmproxy_webhook_events_rejected_total"
    rejected_help = "Usage events the webhook receiver refused (kept in <spill_path>.rejected)."
    row_type = dict

    def __init__(self, options: WebhookOptions, services: "Services") -> None:
        self.options = options
        super().__init__(options, services)
        self._session: Any = None
        m = services.metrics
        m.define(QUEUE_DEPTH, "gauge", "Events waiting in an event sink's queue.", ("sink",))
        m.define(FAILURES, "counter", "Failed writes or deliveries of an event sink (retried).", ("sink",))
        m.gauge_from(QUEUE_DEPTH, lambda: len(self.queue) + len(self._overflow), ("webhook",))

    def settings(self, options: Any) -> Any:
        return options

    def convert(self, record: "Record") -> dict[str, Any]:
        return usage_event(record)

    def encode(self, row: dict[str, Any]) -> bytes:
        return orjson.dumps(row)

    def decode(self, line: bytes) -> dict[str, Any]:
        row = orjson.loads(line)
        if not isinstance(row, dict) or not isinstance(row.get("request_id"), str):
            raise ValueError("not a usage event")
        return row

    async def startup(self) -> None:
        import aiohttp

        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.options.timeout))
        await super().startup()

    async def shutdown(self) -> None:
        try:
            await super().shutdown()
        finally:
            if self._session is not None:
                await self._session.close()

    async def write(self, rows: list[dict[str, Any]]) -> None:
        import hashlib

        import aiohttp

        from .store import StoreUnavailable

        body = orjson.dumps({"events": rows})
        key = hashlib.sha256(",".join(r["request_id"] for r in rows).encode()).hexdigest()
        headers = {**(self.options.headers or {}), "Content-Type": "application/json", "Idempotency-Key": key}
        try:
            async with self._session.post(self.options.url, data=body, headers=headers) as resp:
                await resp.read()
                status = resp.status
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            self.services.metrics.inc(FAILURES, ("webhook",))
            raise StoreUnavailable(f"the webhook receiver did not answer ({type(exc).__name__})") from None
        if 200 <= status < 300:
            return
        self.services.metrics.inc(FAILURES, ("webhook",))
        if status in (408, 425, 429) or status >= 500:
            raise StoreUnavailable(f"the webhook receiver answered HTTP {status}")
        raise ValueError(f"the webhook receiver refused it: HTTP {status}")
