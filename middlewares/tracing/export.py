"""Where spans go: the OTLP exporter the options or the `OTEL_*` variables name, the
sampler, and a batch processor whose queue is bounded and counted.

The SDK's `BatchSpanProcessor` already exports from a thread of its own, so `on_end` (on
the request path) only appends to a queue. `BoundedProcessor` puts a counted bound in
front of it: a span past `max_queue_size` waiting spans is dropped at once (and counted),
and so are the spans of an export that failed (the collector down, refusing, or slower
than `export_timeout`). Nothing on the request path ever waits for the collector.
"""

from __future__ import annotations

import threading
from typing import Any, Mapping, Sequence
from urllib.parse import unquote

from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace import sampling

DROPPED = "llmproxy_tracing_spans_dropped_total"
DEFAULT_ENDPOINT_HINT = "http://localhost:4318"


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


def exporter_for(o: Any, env: Mapping[str, str]) -> tuple[SpanExporter | None, str | None]:
    """The exporter the options, else the environment, ask for, and where it sends (for
    the log); (None, None) when neither names an endpoint."""
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
        return GrpcExporter(endpoint=where, headers=headers or None, timeout=timeout), where
    if protocol != "http/protobuf":
        raise ValueError(f"protocol: expected 'http/protobuf' or 'grpc', got {protocol[:40]!r}")
    where = traces or base.rstrip("/") + "/v1/traces"
    return _http_exporter()(endpoint=where, headers=headers or None, timeout=timeout), where


def _http_exporter() -> type:
    """The SDK's OTLP/HTTP exporter, its spans encoded by `otlp.encode` (the same bytes, in
    a third of the CPU); its transport, retries and headers are the SDK's. Should a later
    SDK move its transport, the SDK's own encoder is used."""
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    from .otlp import encode

    class Exporter(OTLPSpanExporter):
        def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
            client = getattr(self, "_client", None)
            if getattr(self, "_shutdown", False) or not callable(getattr(client, "export", None)):
                return super().export(spans)
            result = client.export(encode(spans))
            return SpanExportResult.SUCCESS if getattr(result, "success", False) else SpanExportResult.FAILURE

    return Exporter


_SAMPLERS = {
    "always_on": lambda arg: sampling.ALWAYS_ON,
    "always_off": lambda arg: sampling.ALWAYS_OFF,
    "traceidratio": lambda arg: sampling.TraceIdRatioBased(arg),
    "parentbased_always_on": lambda arg: sampling.ParentBased(sampling.ALWAYS_ON),
    "parentbased_always_off": lambda arg: sampling.ParentBased(sampling.ALWAYS_OFF),
    "parentbased_traceidratio": lambda arg: sampling.ParentBased(sampling.TraceIdRatioBased(arg)),
}


def sampler_for(name: str | None, arg: str | None) -> sampling.Sampler:
    """OTEL_TRACES_SAMPLER's names (default parentbased_always_on); the ratio samplers take
    OTEL_TRACES_SAMPLER_ARG, a number in [0, 1] (default 1)."""
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
