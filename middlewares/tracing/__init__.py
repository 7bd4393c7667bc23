"""Middleware `tracing`: OpenTelemetry spans for every request, with the GenAI conventions.

Listed first (outermost) it sees every outcome, rejections included:
- one SERVER span per request, `{method} {route}`, from the first middleware to the last
  byte written (it ends in `ctx.cleanups`, after the forwarder's usage): method, path,
  status (499 when the client left), request id, key alias and team; never a key;
- spans for the work of the middlewares inside it, through `ctx.trace(name)`:
  `llmproxy.auth` (the key's lookup), `llmproxy.pii` (the analysis), and
  `llmproxy.scheduler.wait` (the admission, with the seconds waited);
- one CLIENT span per upstream attempt (`spans.Attempt`), `{gen_ai.operation.name}
  {gen_ai.request.model}`, siblings for retries and fallbacks; its `traceparent` goes
  upstream. A stream's attempt ends with the stream.

The client's W3C `traceparent`/`tracestate` is the parent, unless `link_client_trace`:
then each request starts a trace of its own that links to the client's. The trace id goes
into the record (the access log line and the spend row).

Export: OTLP (`http/protobuf` from the event loop, or `grpc` when its package is
installed) to the endpoint of the options or of the standard `OTEL_EXPORTER_OTLP_*`
variables, through a bounded queue (`export.py`): a collector that is down or slow costs
requests nothing; spans that do not fit, or whose export failed, are dropped and counted
in `llmproxy_tracing_spans_dropped_total`. Without any endpoint, spans are made (trace ids
reach the logs and upstream) but not exported, and the start says so.
"""

from __future__ import annotations

import asyncio
import os
import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import structlog

from llmproxy.config import ConfigError
from llmproxy.context import ALL_APIS
from llmproxy.errors import ProxyError
from llmproxy.periodic import every

from .export import DROPPED, BoundedProcessor, LoopExporter, exporter_for, sampler_for
from .spans import RequestTracer

if TYPE_CHECKING:
    from llmproxy.context import Context, Next, Reply
    from llmproxy.services import Services

log = structlog.get_logger("llmproxy.tracing")

MAX_PATH = 256  # characters of a path kept on a span (an unknown path is the client's text)


@dataclass(frozen=True)
class Options:
    # Each None falls back to its OTEL_* variable, then to the SDK's default.
    endpoint: str | None = None  # OTEL_EXPORTER_OTLP_ENDPOINT: the collector's base URL (/v1/traces is added)
    traces_endpoint: str | None = None  # OTEL_EXPORTER_OTLP_TRACES_ENDPOINT: the whole traces URL
    headers: dict[str, str] | None = None  # OTEL_EXPORTER_OTLP_HEADERS ("k=v,k2=v2"), e.g. an auth header
    protocol: Literal["http/protobuf", "grpc"] | None = None  # OTEL_EXPORTER_OTLP_PROTOCOL
    service_name: str | None = None  # OTEL_SERVICE_NAME, default "llmproxy"
    sampler: str | None = None  # OTEL_TRACES_SAMPLER, default parentbased_always_on
    sampler_arg: str | None = None  # OTEL_TRACES_SAMPLER_ARG (the ratio of the *traceidratio samplers)
    link_client_trace: bool = False  # a trace of our own per request, linked to the client's
    # Prompts and answers as span events: false; true (refused with pii configured: the
    # trace would hold what pii keeps from the upstream); masked (the text as the upstream
    # sees it, after pii). Bounded per span (content.MAX_CHARS).
    capture_content: bool | Literal["masked"] = False
    max_queue_size: int = field(default=2048, metadata={"min": 1})  # spans waiting for export
    export_timeout: float = field(default=5.0, metadata={"gt": 0})  # seconds per export call
    schedule_delay: float = field(default=1.0, metadata={"gt": 0})  # seconds between exports


class Tracing:
    """Middleware `tracing` (see the module docstring)."""

    Options = Options
    apis = ALL_APIS
    stage = "outer"

    def __init__(self, options: Options | None, services: "Services") -> None:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.util.instrumentation import InstrumentationScope

        from llmproxy import __version__

        self.options = o = options or Options()
        self.services = services
        env = os.environ
        name = o.service_name or env.get("OTEL_SERVICE_NAME") or "llmproxy"
        try:
            self.sampler = sampler_for(o.sampler or env.get("OTEL_TRACES_SAMPLER"),
                                       o.sampler_arg or env.get("OTEL_TRACES_SAMPLER_ARG"))
            self.exporter, self.where = exporter_for(o, env)
        except ValueError as exc:
            raise ConfigError([f"tracing: {exc}"]) from None
        self.ids = random.Random(os.urandom(16))  # trace and span ids
        self.addresses: dict[str, Any] = {}  # deployment id -> (server.address, server.port)
        self.resource = Resource.create({"service.name": name})
        self.scope = InstrumentationScope("llmproxy", __version__)
        self.processors: list[Any] = []
        self.processor: Any = None
        bounds = {"max_queue_size": o.max_queue_size, "export_timeout": o.export_timeout,
                  "schedule_delay": o.schedule_delay}
        if isinstance(self.exporter, tuple):  # OTLP/HTTP, from the loop
            _, url, headers = self.exporter
            self.processor = LoopExporter(url, headers, resource=self.resource, scope=self.scope, **bounds)
        elif self.exporter is not None:  # gRPC: the SDK's exporter, in its thread
            self.processor = BoundedProcessor(self.exporter, **bounds)
        if self.processor is not None:
            self.processors.append(self.processor)
        services.metrics.define(DROPPED, "counter", "Spans dropped: the export queue was full or the export "
                                "failed (the collector down or slow).", ())
        self._reported = 0
        self._task: asyncio.Task | None = None

    @staticmethod
    def check_config(options: Options, config: Any) -> list[str]:
        """`check-config` and the start: what the options cannot be with the rest."""
        problems = []
        if options.capture_content is True and any(m.name == "pii" for m in config.middlewares):
            problems.append("capture_content: true would record the prompts and answers that pii keeps from "
                            "the upstream, unmasked; use capture_content: masked to record them as the upstream "
                            "sees them")
        try:
            sampler_for(options.sampler or os.environ.get("OTEL_TRACES_SAMPLER"),
                        options.sampler_arg or os.environ.get("OTEL_TRACES_SAMPLER_ARG"))
        except ValueError as exc:
            problems.append(str(exc))
        return problems

    @property
    def capture(self) -> bool:
        return bool(self.options.capture_content)

    def add_span_processor(self, processor: Any) -> None:
        """Another SDK span processor for every span (a test's in-memory exporter)."""
        self.processors.append(processor)

    def on_end(self, span: Any) -> None:
        for processor in self.processors:
            processor.on_end(span)

    async def startup(self) -> None:
        if self.exporter is None:
            log.warning("tracing_not_exported", detail="no OTLP endpoint (options endpoint/traces_endpoint or "
                        "OTEL_EXPORTER_OTLP_ENDPOINT): spans are made, trace ids reach logs and upstream, "
                        "nothing is exported")
        else:
            log.info("tracing_exporting", endpoint=self.where)
        if isinstance(self.processor, LoopExporter):
            await self.processor.start()
        self._task = asyncio.create_task(every(1.0, self._count_dropped, "tracing_dropped_count"))

    async def shutdown(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        # The last spans go out within the export timeout, in a thread: the loop is not held.
        for processor in self.processors:
            if isinstance(processor, LoopExporter):
                await processor.stop()
            else:
                await asyncio.to_thread(processor.shutdown)
        self._count_dropped()

    def _count_dropped(self) -> None:
        if self.processor is None:
            return
        dropped = self.processor.dropped
        if dropped > self._reported:
            self.services.metrics.inc(DROPPED, (), dropped - self._reported)
            self._reported = dropped

    async def __call__(self, ctx: "Context", call_next: "Next") -> "Reply":
        tracer = RequestTracer.start(self, ctx)
        ctx.tracer = tracer
        ctx.cleanups.append(tracer.finish)  # first in, so it runs last: after the forwarder's usage
        try:
            return await call_next(ctx)
        except ProxyError as exc:
            tracer.error = exc.code or exc.type
            raise

    def path_of(self, ctx: "Context") -> str:
        path = ctx.path
        return path if len(path) <= MAX_PATH else path[:MAX_PATH - 1] + "…"
