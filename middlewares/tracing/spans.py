"""The spans of one request: the SERVER span (`RequestTracer`, the request's `ctx.tracer`),
the spans of the middlewares' work (`RequestTracer.span`), and one CLIENT span per
upstream attempt (`Attempt`) with the OpenTelemetry GenAI attributes.

A span here is a small object of our own (`Span`) rather than the SDK's: the SDK's costs
about 20 µs of CPU to make and end (attribute validation under a lock, a Context object,
processors), and a request makes two to five. Ours holds what the OTLP export needs, under
the names the SDK's `ReadableSpan` uses (`context`, `parent`, `kind`, `attributes`,
`events`, `links`, `status`, `resource`, `instrumentation_scope`, `start_time`,
`end_time`), so that SDK span processors and exporters (a `BatchSpanProcessor`, the test
suite's `InMemorySpanExporter`) take it as it is. The W3C `traceparent` is read and
written here too (a regex and an f-string, not the propagator's Context machinery).

What the answer says (`gen_ai.response.id`, `.model`, `.finish_reasons`) is read from the
first and last 4 KB of the bytes that passed (JSON or SSE), never from the whole answer:
the id and model come first in every provider's answer and stream, the finish reason
last. A value from upstream is cut to 256 characters.
"""

from __future__ import annotations

import re
import time
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Iterator
from urllib.parse import urlsplit

from opentelemetry.trace import SpanKind, Status, StatusCode, TraceFlags

from llmproxy.errors import ProxyError
from llmproxy.validate import parse_traceparent

from . import content

if TYPE_CHECKING:
    from llmproxy.context import Context
    from llmproxy.usage import Usage

OPERATIONS = {"chat": "chat", "messages": "chat", "responses": "chat", "completions": "text_completion",
              "embeddings": "embeddings"}
REQUEST_PARAMS = (("max_tokens", "gen_ai.request.max_tokens"), ("max_completion_tokens", "gen_ai.request.max_tokens"),
                  ("temperature", "gen_ai.request.temperature"), ("top_p", "gen_ai.request.top_p"))
DEFAULT_ADDRESSES = {"openai": ("api.openai.com", 443), "anthropic": ("api.anthropic.com", 443)}
HEAD = TAIL = 4096
MAX_TRACESTATE = 512  # characters of a client's tracestate kept (W3C: 32 members of at most 256)
_ID = re.compile(rb'"id"\s*:\s*"([^"\\]{1,256})"')
_MODEL = re.compile(rb'"model"\s*:\s*"([^"\\]{1,256})"')
_FINISH = re.compile(rb'"(?:finish_reason|stop_reason)"\s*:\s*"([^"\\]{1,64})"')
SAMPLED, NOT_SAMPLED = TraceFlags(1), TraceFlags(0)
_UNSET = Status(StatusCode.UNSET)
_ERROR = Status(StatusCode.ERROR)


class SpanContext:
    """Ids and flags of a span (the SDK's `SpanContext` fields the export reads)."""

    __slots__ = ("trace_id", "span_id", "trace_flags", "trace_state", "is_remote")
    is_valid = True

    def __init__(self, trace_id: int, span_id: int, trace_flags: TraceFlags, trace_state: str = "",
                 is_remote: bool = False) -> None:
        self.trace_id, self.span_id, self.trace_flags = trace_id, span_id, trace_flags
        self.trace_state, self.is_remote = trace_state, is_remote

    def traceparent(self) -> str:
        return f"00-{self.trace_id:032x}-{self.span_id:016x}-{int(self.trace_flags):02x}"


def client_context(headers: Any) -> SpanContext | None:
    """The client's W3C trace context, or None when it sent none (or a malformed one). A
    tracestate longer than MAX_TRACESTATE is left out whole (cut, it would not be one)."""
    parsed = parse_traceparent(headers.get("traceparent"))
    if parsed is None:
        return None
    trace_id, span_id, flags = parsed
    state = headers.get("tracestate") or ""
    return SpanContext(trace_id, span_id, TraceFlags(flags & 0xFF), state if len(state) <= MAX_TRACESTATE else "",
                       True)


class Event:
    __slots__ = ("name", "timestamp", "attributes")
    dropped_attributes = 0

    def __init__(self, name: str, timestamp: int, attributes: dict[str, Any]) -> None:
        self.name, self.timestamp, self.attributes = name, timestamp, attributes


class Link:
    __slots__ = ("context", "attributes")
    dropped_attributes = 0

    def __init__(self, context: SpanContext) -> None:
        self.context, self.attributes = context, {}


class Span:
    """One span, recorded (see the module docstring); `end()` hands it to the processors."""

    __slots__ = ("owner", "name", "context", "parent", "kind", "start_time", "end_time", "attributes",
                 "events", "links", "status")
    dropped_attributes = dropped_events = dropped_links = 0

    def __init__(self, owner: Any, name: str, context: SpanContext, parent: SpanContext | None, kind: SpanKind,
                 attributes: dict[str, Any], links: list[Link] | tuple = ()) -> None:
        self.owner, self.name, self.context, self.parent, self.kind = owner, name, context, parent, kind
        self.attributes = attributes
        self.start_time = time.time_ns()
        self.end_time: int | None = None
        self.events: list[Event] = []
        self.links = links
        self.status = _UNSET

    @property
    def resource(self) -> Any:
        return self.owner.resource

    @property
    def instrumentation_scope(self) -> Any:
        return self.owner.scope

    def get_span_context(self) -> SpanContext:
        return self.context

    def set_attribute(self, key: str, value: Any) -> None:
        self.attributes[key] = value

    def set_attributes(self, attributes: dict[str, Any]) -> None:
        self.attributes.update(attributes)

    def add_event(self, name: str, attributes: dict[str, Any] | None = None) -> None:
        self.events.append(Event(name, time.time_ns(), attributes or {}))

    def set_status(self, status: Status) -> None:
        self.status = status

    def end(self) -> None:
        if self.end_time is None:
            self.end_time = time.time_ns()
            self.owner.on_end(self)


class _Unrecorded:
    """A span the sampler left out: it keeps its ids (for the upstream's traceparent) and
    records nothing."""

    __slots__ = ("context", "parent")

    def __init__(self, context: SpanContext, parent: SpanContext | None) -> None:
        self.context, self.parent = context, parent

    def get_span_context(self) -> SpanContext:
        return self.context

    def set_attribute(self, key: str, value: Any) -> None:
        pass

    def set_attributes(self, attributes: dict[str, Any]) -> None:
        pass

    def add_event(self, name: str, attributes: dict[str, Any] | None = None) -> None:
        pass

    def set_status(self, status: Any) -> None:
        pass

    def end(self) -> None:
        pass


def start_span(owner: Any, name: str, parent: SpanContext | None, kind: SpanKind, attributes: dict[str, Any],
               links: list[Link] | tuple = (), root: bool = False) -> Span | _Unrecorded:
    """A new span: a child of `parent` (same trace, its sampling decision), or with
    `root` (or no parent) the first of a new trace, sampled by the owner's sampler."""
    if parent is None or root:
        trace_id = owner.ids.getrandbits(128) or 1
        sampled = owner.sampler(None, trace_id)
        state = ""
    else:
        trace_id = parent.trace_id
        sampled = owner.sampler(parent, trace_id)
        state = parent.trace_state
    context = SpanContext(trace_id, owner.ids.getrandbits(64) or 1, SAMPLED if sampled else NOT_SAMPLED, state)
    if not sampled:
        return _Unrecorded(context, None if root else parent)
    return Span(owner, name, context, None if root else parent, kind, attributes, links)


class RequestTracer:
    """`ctx.tracer` for one request: its SERVER span, and the parent of every other."""

    __slots__ = ("owner", "ctx", "server", "error")

    def __init__(self, owner: Any, ctx: "Context", span: Any) -> None:
        self.owner, self.ctx, self.server = owner, ctx, span
        self.error: str | None = None

    @classmethod
    def start(cls, owner: Any, ctx: "Context") -> "RequestTracer":
        client = client_context(ctx.headers) if "traceparent" in ctx.headers else None
        link = owner.options.link_client_trace and client is not None
        method = ctx.request.method if ctx.request is not None else "POST"
        path = owner.path_of(ctx)
        # The route's template, not the path (a pass-through's `/openai/v1/files/file-abc` is
        # `/openai/{tail:.*}`): span names stay few. An unknown path is no route.
        resource = getattr(getattr(getattr(ctx.request, "match_info", None), "route", None), "resource", None)
        template = getattr(resource, "canonical", None) or path
        name = method if ctx.api == "unknown" else f"{method} {template}"
        span = start_span(owner, name, client, SpanKind.SERVER, {
            "http.request.method": method, "url.path": path, "llmproxy.request_id": ctx.record.request_id,
            "llmproxy.api": ctx.api}, links=[Link(client)] if link else (), root=link)
        ctx.record.trace_id = f"{span.context.trace_id:032x}"
        return cls(owner, ctx, span)

    @contextmanager
    def span(self, name: str, attributes: dict[str, Any] | None = None) -> Iterator[Any]:
        span = start_span(self.owner, name, self.server.context, SpanKind.INTERNAL, dict(attributes or {}))
        try:
            yield span
        except BaseException as exc:
            span.set_status(_ERROR)
            span.set_attribute("error.type", _error_type(exc))
            raise
        finally:
            span.end()

    def attempt(self, ctx: "Context", deployment: Any, model: Any) -> "Attempt":
        return Attempt.start(self, ctx, deployment, model)

    def finish(self) -> None:
        """The request is over (a cleanup: after the last byte, after the forwarder's usage)."""
        span = self.server
        if not isinstance(span, Span):
            return
        record = self.ctx.record
        status = 499 if record.client_disconnected else (record.status or 500)
        attrs: dict[str, Any] = {"http.response.status_code": status}
        for attr, value in (("llmproxy.key_alias", record.key_alias), ("llmproxy.team_id", record.team_id),
                            ("llmproxy.user_id", record.user_id), ("llmproxy.model", record.model),
                            ("llmproxy.deployment", record.deployment)):
            if value:
                attrs[attr] = value
        code = record.error_code or self.error
        if code:
            attrs["llmproxy.error.code"] = code
        user, session = _langfuse_ids(record.user_id, self.ctx.body)
        if user:
            attrs["langfuse.user.id"] = user
        if session:
            attrs["langfuse.session.id"] = session
        if status >= 500:
            attrs["error.type"] = code or str(status)
            span.set_status(_ERROR)
        span.set_attributes(attrs)
        span.end()


class Attempt:
    """One upstream attempt's CLIENT span (the forwarder's `AttemptTrace`)."""

    __slots__ = ("span", "headers", "head", "tail", "size", "started", "ended", "captured", "content")

    def __init__(self, span: Any, headers: dict[str, str]) -> None:
        self.span = span
        self.headers = headers
        self.head = b""
        self.tail = b""
        self.size = 0
        self.started = time.perf_counter()
        self.ended = False
        self.captured: list[bytes] | None = None  # the answer's first bytes, with capture_content
        self.content: Any = None  # (api, stream, content.Budget) with capture_content

    @classmethod
    def start(cls, tracer: RequestTracer, ctx: "Context", dep: Any, model: Any) -> "Attempt":
        operation = OPERATIONS.get(ctx.api, ctx.api)
        requested = dep.model or model.name
        span = start_span(tracer.owner, "", tracer.server.context, SpanKind.CLIENT, {})
        if isinstance(span, Span):  # recorded: name and attributes (left out of a span not kept)
            span.name = f"{operation} {requested}"
            attrs = span.attributes
            attrs.update({"gen_ai.operation.name": operation, "gen_ai.provider.name": dep.provider,
                          "gen_ai.request.model": requested, "llmproxy.deployment": dep.id,
                          "llmproxy.model": model.name,
                          "langfuse.observation.type": "embedding" if operation == "embeddings" else "generation"})
            body = ctx.body or {}
            for key, attr in REQUEST_PARAMS:
                value = body.get(key)
                if type(value) in (int, float):
                    attrs[attr] = value
            address = _address(tracer.owner.addresses, dep)
            if address is not None:
                attrs["server.address"], attrs["server.port"] = address
        context = span.context
        headers = {"traceparent": context.traceparent()}
        if context.trace_state:
            headers["tracestate"] = context.trace_state
        attempt = cls(span, headers)
        attempt.ended = not isinstance(span, Span)
        if tracer.owner.capture and not attempt.ended:
            budget = content.Budget()
            for name, event_attrs in content.input_events(ctx.api, ctx.body, budget):
                span.add_event(name, event_attrs)
            attempt.captured, attempt.content = [], (ctx.api, ctx.stream, budget)
        return attempt

    def answered(self, status: int) -> None:
        self.span.set_attribute("http.response.status_code", status)

    def chunk(self, data: bytes) -> None:
        if self.ended:  # a span not kept ends at once: nothing to read from the answer
            return
        if not self.size:
            elapsed = time.perf_counter() - self.started
            self.span.add_event("gen_ai.first_chunk", {"llmproxy.time_to_first_chunk_s": elapsed})
            self.span.set_attribute("llmproxy.time_to_first_chunk_s", elapsed)
        if self.captured is not None and self.size < content.MAX_ANSWER_BYTES:
            self.captured.append(data[:content.MAX_ANSWER_BYTES - self.size])
        if self.size < HEAD:
            self.head += data[:HEAD - self.size]
        self.tail = (self.tail + data)[-TAIL:] if len(data) < TAIL else data[-TAIL:]
        self.size += len(data)

    def end(self, usage: "Usage | None", outcome: str) -> None:
        if self.ended:
            return
        self.ended = True
        span = self.span
        attrs: dict[str, Any] = {}
        if usage is not None:
            attrs["gen_ai.usage.input_tokens"] = usage.prompt_tokens
            attrs["gen_ai.usage.output_tokens"] = usage.completion_tokens
            if usage.estimated:
                attrs["llmproxy.usage.estimated"] = True
        if self.size:
            attrs.update(_response_info(self.head, self.tail, self.size))
        if self.content is not None:
            api, stream, budget = self.content
            for name, event_attrs in content.output_events(api, stream, b"".join(self.captured or ()), budget):
                span.add_event(name, event_attrs)
            if budget.cut or self.size > content.MAX_ANSWER_BYTES:
                attrs["llmproxy.content_truncated"] = True
        if outcome != "ok":
            attrs["error.type"] = outcome
            span.set_status(_ERROR)
        span.set_attributes(attrs)
        span.end()


MAX_LANGFUSE_ID = 200  # Langfuse drops a user or session id longer than this


def _langfuse_ids(key_user: str | None, body: Any) -> tuple[str | None, str | None]:
    """Langfuse's user and session of a request: the key's `user_id`, else the request's own
    (OpenAI's `user`, Anthropic's `metadata.user_id`); the session from `metadata.session_id`
    (OpenAI's chat `metadata`). The client's text, so only strings Langfuse would keep."""
    meta = body.get("metadata") if isinstance(body, dict) else None
    meta = meta if isinstance(meta, dict) else {}
    user = key_user or (body.get("user") if isinstance(body, dict) else None) or meta.get("user_id")
    session = meta.get("session_id")
    ok = lambda v: v if isinstance(v, str) and 0 < len(v) <= MAX_LANGFUSE_ID else None  # noqa: E731
    return ok(user), ok(session)


def _response_info(head: bytes, tail: bytes, size: int) -> dict[str, Any]:
    whole = size <= len(head)
    out: dict[str, Any] = {}
    m = _ID.search(head)
    if m:
        out["gen_ai.response.id"] = m[1].decode("utf-8", "replace")
    m = _MODEL.search(head)
    if m is None and not whole:
        found = _MODEL.findall(tail)
        m_value = found[-1] if found else None
    else:
        m_value = m[1] if m else None
    if m_value:
        out["gen_ai.response.model"] = m_value.decode("utf-8", "replace")
    reasons = [r.decode("utf-8", "replace") for r in dict.fromkeys(_FINISH.findall(head if whole else tail))]
    if reasons:
        out["gen_ai.response.finish_reasons"] = reasons
    return out


def _address(known: dict[str, Any], dep: Any) -> tuple[str, int] | None:
    """`server.address`/`server.port` of a deployment (its api_base, or the provider's
    public API), worked out once per deployment (`known`: the owner's table)."""
    key = dep.id
    if key in known:
        return known[key]
    found = DEFAULT_ADDRESSES.get(dep.provider)
    if dep.api_base:
        parts = urlsplit(dep.api_base)
        if parts.hostname:
            found = (parts.hostname, parts.port or (443 if parts.scheme == "https" else 80))
    if len(known) < 4096:
        known[key] = found
    return found


def _error_type(exc: BaseException) -> str:
    if isinstance(exc, ProxyError):
        return exc.code or exc.type
    return type(exc).__name__
