"""Where spans go: the OTLP exporter the options or the `OTEL_*` variables name, the
sampler, and the bounded queue in front of the export.

`http/protobuf` (the default) is exported from the event loop (`LoopExporter`): each
span is written as OTLP bytes when it ends (`otlp.Encoder.span_entry`) and waits in a bounded
queue; a task POSTs batches with aiohttp, `export_timeout` at most. The SDK's exporter would run in a thread of its own,
and its Python work there fights the loop for the GIL: measured, that contention cost
more than the work. `grpc` uses the SDK's exporter (its package installed) behind the
SDK's `BatchSpanProcessor` with a counted bound (`BoundedProcessor`). Either way a span
past `max_queue_size` waiting spans is dropped at once, and so are the spans of an export
that failed (the collector down, refusing, or slower than `export_timeout`); each is
counted. Nothing on the request path ever waits for the collector.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from typing import Any, Mapping, Sequence
from urllib.parse import unquote

import structlog
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

from .otlp import Encoder

log = structlog.get_logger("llmproxy.tracing")
DROPPED = "llmproxy_tracing_spans_dropped_total"


class _Counted(SpanExporter):
    """The real exporter, telling the processor how each export ended."""

    def __init__(self, inner: SpanExporter, done: Any) -> None:
        self.inner = inner
        self.done = done

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        try:
            result = self.inner.export(spans)
        except Exception:  # an exporter that raises is one that failed
            result = SpanExportResult.FAILURE
        self.done(len(spans), result is SpanExportResult.SUCCESS)
        return result

    def shutdown(self) -> None:
        self.inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.inner.force_flush(timeout_millis)


class BoundedProcessor(SpanProcessor):
    """A BatchSpanProcessor behind a counted bound (see the module docstring)."""

    def __init__(self, exporter: SpanExporter, *, max_queue_size: int, export_timeout: float,
                 schedule_delay: float) -> None:
        self.limit = max_queue_size
        self.pending = 0  # ended spans handed to the batch processor and not yet exported
        self.dropped = 0
        self.exported = 0
        self._lock = threading.Lock()
        self.batch = BatchSpanProcessor(
            _Counted(exporter, self._done), max_queue_size=max_queue_size,
            schedule_delay_millis=schedule_delay * 1000, max_export_batch_size=min(512, max_queue_size),
            export_timeout_millis=export_timeout * 1000)

    def _done(self, n: int, ok: bool) -> None:
        with self._lock:
            self.pending -= n
            if ok:
                self.exported += n
            else:
                self.dropped += n

    def on_start(self, span: Any, parent_context: Any = None) -> None:
        pass

    def on_end(self, span: ReadableSpan) -> None:
        if not span.context.trace_flags.sampled:
            return
        with self._lock:
            if self.pending >= self.limit:
                self.dropped += 1
                return
            self.pending += 1
        self.batch.on_end(span)

    def shutdown(self) -> None:
        self.batch.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.batch.force_flush(timeout_millis)


class LoopExporter:
    """Spans to OTLP/HTTP from the event loop (see the module docstring). A span processor
    (`on_end`) with an async life: `start()`, then `stop()` sends what is left."""

    BATCH = 256  # spans per export request

    def __init__(self, url: str, headers: dict[str, str], *, resource: Any, scope: Any, max_queue_size: int,
                 export_timeout: float, schedule_delay: float) -> None:
        self.url = url
        self.resource, self.scope = resource, scope
        self.encoder = Encoder()
        self.headers = {**headers, "content-type": "application/x-protobuf"}
        self.limit = max_queue_size
        self.timeout = export_timeout
        self.delay = schedule_delay
        self.queue: deque[Any] = deque()
        self.dropped = 0
        self.exported = 0
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._session: Any = None
        self._failed_logged_at = -60.0
        self._failures_unlogged = 0

    def on_end(self, span: Any) -> None:
        if not span.context.trace_flags.sampled:
            return
        queue = self.queue
        if len(queue) >= self.limit:
            self.dropped += 1
            return
        queue.append(self.encoder.span_entry(span))  # bytes from here on (see Encoder.request_of)
        if len(queue) >= self.BATCH and self._wake is not None:
            self._wake.set()

    async def start(self) -> None:
        import aiohttp

        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout),
                                              auto_decompress=False)
        self._wake = asyncio.Event()
        self._task = asyncio.create_task(self._run(), name="llmproxy-tracing-export")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        try:
            while self.queue and await self._send_batch():
                pass
            self.dropped += len(self.queue)  # the collector failed at shutdown: counted, not waited for
            self.queue.clear()
        finally:
            if self._session is not None:
                await self._session.close()

    async def _run(self) -> None:
        assert self._wake is not None
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), self.delay)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()
            while self.queue:
                try:
                    sent = await self._send_batch()
                except asyncio.CancelledError:
                    raise
                except Exception:  # a bug of ours: these spans are lost, the loop goes on
                    log.exception("tracing_export_crashed")
                    sent = False
                if not sent:  # the collector is down or refusing: try again after a pause, not at once
                    break

    async def _send_batch(self) -> bool:
        """POST one batch; False when it failed (its spans are dropped and counted)."""
        import aiohttp

        queue = self.queue
        batch = [queue.popleft() for _ in range(min(self.BATCH, len(queue)))]
        data = self.encoder.request_of(self.resource, self.scope, batch)
        error = None
        try:
            async with self._session.post(self.url, data=data, headers=self.headers) as resp:
                await resp.read()
                if not 200 <= resp.status < 300:
                    error = f"HTTP {resp.status}"
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            error = f"{type(exc).__name__}: {exc}"
        if error is None:
            self.exported += len(batch)
            return True
        self.dropped += len(batch)
        self._failures_unlogged += 1
        now = asyncio.get_running_loop().time()
        if now - self._failed_logged_at >= 60.0:  # a collector that is down: a line a minute
            log.warning("tracing_export_failed", endpoint=self.url, error=error, failures=self._failures_unlogged,
                        detail="these spans are dropped and counted in " + DROPPED)
            self._failed_logged_at, self._failures_unlogged = now, 0
        return False

    def shutdown(self) -> None:  # (the SDK processor interface; `stop()` is the real one)
        pass

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


# --------------------------------------------------------------------------- choosing


def parse_headers(text: str | None) -> dict[str, str]:
    """OTEL_EXPORTER_OTLP_HEADERS: `k=v,k2=v2`, values URL-encoded (a basic auth value's
    space is `%20`); a malformed pair is a ValueError naming it (never its value)."""
    out: dict[str, str] = {}
    for pair in (text or "").split(","):
        if not pair.strip():
            continue
        name, sep, value = pair.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"OTLP headers: expected name=value pairs separated by commas, got a pair "
                             f"named {name.strip()[:40]!r}")
        out[unquote(name.strip()).lower()] = unquote(value.strip())
    return out


def exporter_for(o: Any, env: Mapping[str, str]) -> tuple[Any, str | None]:
    """What the options, else the environment, ask for, and where it sends (for the log):
    `("http", url, headers)` for OTLP/HTTP (our `LoopExporter`), an SDK exporter for gRPC,
    or (None, None) when neither names an endpoint."""
    traces = o.traces_endpoint or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    base = o.endpoint or env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    protocol = o.protocol or env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get(
        "OTEL_EXPORTER_OTLP_PROTOCOL") or "http/protobuf"
    if (env.get("OTEL_TRACES_EXPORTER") or "otlp").strip().lower() == "none" or not (traces or base):
        return None, None
    if o.headers is not None:
        headers = {k.lower(): v for k, v in o.headers.items()}
    else:
        headers = parse_headers(env.get("OTEL_EXPORTER_OTLP_TRACES_HEADERS") or env.get("OTEL_EXPORTER_OTLP_HEADERS"))
    timeout = o.export_timeout
    if protocol == "grpc":
        try:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter
        except ImportError:
            raise ValueError("protocol grpc needs the package opentelemetry-exporter-otlp-proto-grpc "
                             "(pip install it, or use http/protobuf)") from None
        where = traces or base
        return GrpcExporter(endpoint=where, headers=headers or None, timeout=timeout), where  # an SDK exporter
    if protocol != "http/protobuf":
        raise ValueError(f"protocol: expected 'http/protobuf' or 'grpc', got {protocol[:40]!r}")
    where = traces or base.rstrip("/") + "/v1/traces"
    return ("http", where, headers), where


_MASK64 = (1 << 64) - 1


def _ratio(arg: float) -> Any:
    bound = round(arg * (1 << 64))  # the SDK's TraceIdRatioBased: the lower 64 bits of the trace id

    def sample(parent: Any, trace_id: int) -> bool:
        return (trace_id & _MASK64) < bound
    return sample


def _parent_based(root: Any) -> Any:
    def sample(parent: Any, trace_id: int) -> bool:
        if parent is None:
            return root(None, trace_id)
        return parent.trace_flags.sampled
    return sample


def _always(answer: bool) -> Any:
    return lambda parent, trace_id: answer


_SAMPLERS = {
    "always_on": lambda arg: _always(True),
    "always_off": lambda arg: _always(False),
    "traceidratio": _ratio,
    "parentbased_always_on": lambda arg: _parent_based(_always(True)),
    "parentbased_always_off": lambda arg: _parent_based(_always(False)),
    "parentbased_traceidratio": lambda arg: _parent_based(_ratio(arg)),
}


def sampler_for(name: str | None, arg: str | None) -> Any:
    """OTEL_TRACES_SAMPLER's names (default parentbased_always_on), as a function of the
    parent's context (None for a root) and the trace id; the ratio samplers take
    OTEL_TRACES_SAMPLER_ARG, a number in [0, 1] (default 1), and decide as the SDK's do."""
    key = (name or "parentbased_always_on").strip().lower()
    if key not in _SAMPLERS:
        raise ValueError(f"sampler: expected one of {', '.join(_SAMPLERS)}, got {key[:40]!r}")
    ratio = 1.0
    if arg not in (None, ""):
        try:
            ratio = float(arg)
        except ValueError:
            raise ValueError(f"sampler_arg: expected a number between 0 and 1, got {str(arg)[:40]!r}") from None
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"sampler_arg: expected a number between 0 and 1, got {ratio}")
    return _SAMPLERS[key](ratio)
