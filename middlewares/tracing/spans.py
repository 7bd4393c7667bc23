"""The spans of one request: the SERVER span (`RequestTracer`, the request's `ctx.tracer`),
the spans of the middlewares' work (`RequestTracer.span`), and one CLIENT span per
upstream attempt (`Attempt`) with the OpenTelemetry GenAI attributes.

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

from opentelemetry.trace import Link, SpanKind, Status, StatusCode, get_current_span, set_span_in_context
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from llmproxy.errors import ProxyError

if TYPE_CHECKING:
    from llmproxy.context import Context
    from llmproxy.usage import Usage

PROPAGATOR = TraceContextTextMapPropagator()
OPERATIONS = {"chat": "chat", "messages": "chat", "completions": "text_completion", "embeddings": "embeddings"}
REQUEST_PARAMS = (("max_tokens", "gen_ai.request.max_tokens"), ("max_completion_tokens", "gen_ai.request.max_tokens"),
                  ("temperature", "gen_ai.request.temperature"), ("top_p", "gen_ai.request.top_p"))
DEFAULT_ADDRESSES = {"openai": ("api.openai.com", 443), "anthropic": ("api.anthropic.com", 443)}
HEAD = TAIL = 4096
_ID = re.compile(rb'"id"\s*:\s*"([^"\\]{1,256})"')
_MODEL = re.compile(rb'"model"\s*:\s*"([^"\\]{1,256})"')
_FINISH = re.compile(rb'"(?:finish_reason|stop_reason)"\s*:\s*"([^"\\]{1,64})"')


class RequestTracer:
    """`ctx.tracer` for one request: its SERVER span, and the parent of every other."""

    __slots__ = ("owner", "ctx", "server", "context", "error")

    def __init__(self, owner: Any, ctx: "Context", span: Any) -> None:
        self.owner, self.ctx, self.server = owner, ctx, span
        self.context = set_span_in_context(span)
        self.error: str | None = None

    @classmethod
    def start(cls, owner: Any, ctx: "Context") -> "RequestTracer":
        parent = links = None
        headers = ctx.headers
        if "traceparent" in headers:
            extracted = PROPAGATOR.extract(headers)
            if owner.options.link_client_trace:  # a trace of our own, pointing at the client's
                client = get_current_span(extracted).get_span_context()
                if client.is_valid:
                    links = [Link(client)]
            else:
                parent = extracted
        method = ctx.request.method if ctx.request is not None else "POST"
        path = owner.path_of(ctx)
        name = method if ctx.api == "unknown" else f"{method} {path}"  # an unknown path is no route
        span = owner.tracer.start_span(name, context=parent, kind=SpanKind.SERVER, links=links, attributes={
            "http.request.method": method, "url.path": path, "llmproxy.request_id": ctx.record.request_id,
            "llmproxy.api": ctx.api})
        sc = span.get_span_context()
        if sc.is_valid:
            ctx.record.trace_id = format(sc.trace_id, "032x")
        return cls(owner, ctx, span)

    @contextmanager
    def span(self, name: str, attributes: dict[str, Any] | None = None) -> Iterator[Any]:
        span = self.owner.tracer.start_span(name, context=self.context, attributes=attributes)
        try:
            yield span
        except BaseException as exc:
            span.set_status(Status(StatusCode.ERROR))
            span.set_attribute("error.type", _error_type(exc))
            raise
        finally:
            span.end()

    def attempt(self, ctx: "Context", deployment: Any, model: Any) -> "Attempt":
        return Attempt.start(self, ctx, deployment, model)

    def finish(self) -> None:
        """The request is over (a cleanup: after the last byte, after the forwarder's usage)."""
        record = self.ctx.record
        span = self.server
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
        if status >= 500:
            attrs["error.type"] = code or str(status)
            span.set_status(Status(StatusCode.ERROR))
        span.set_attributes(attrs)
        span.end()


class Attempt:
    """One upstream attempt's CLIENT span (the forwarder's `AttemptTrace`)."""

    __slots__ = ("span", "headers", "head", "tail", "size", "started", "ended")

    def __init__(self, span: Any, headers: dict[str, str]) -> None:
        self.span = span
        self.headers = headers
        self.head = b""
        self.tail = b""
        self.size = 0
        self.started = time.perf_counter()
        self.ended = False

    @classmethod
    def start(cls, tracer: RequestTracer, ctx: "Context", dep: Any, model: Any) -> "Attempt":
        operation = OPERATIONS.get(ctx.api, ctx.api)
        requested = dep.model or model.name
        attrs: dict[str, Any] = {"gen_ai.operation.name": operation, "gen_ai.provider.name": dep.provider,
                                 "gen_ai.request.model": requested, "llmproxy.deployment": dep.id,
                                 "llmproxy.model": model.name}
        body = ctx.body or {}
        for key, attr in REQUEST_PARAMS:
            value = body.get(key)
            if type(value) in (int, float):
                attrs[attr] = value
        address = _address(dep)
        if address is not None:
            attrs["server.address"], attrs["server.port"] = address
        span = tracer.owner.tracer.start_span(f"{operation} {requested}", context=tracer.context,
                                              kind=SpanKind.CLIENT, attributes=attrs)
        headers: dict[str, str] = {}
        PROPAGATOR.inject(headers, context=set_span_in_context(span))
        return cls(span, headers)

    def answered(self, status: int) -> None:
        self.span.set_attribute("http.response.status_code", status)

    def chunk(self, data: bytes) -> None:
        if not self.size:
            elapsed = time.perf_counter() - self.started
            self.span.add_event("gen_ai.first_chunk", {"llmproxy.time_to_first_chunk_s": elapsed})
            self.span.set_attribute("llmproxy.time_to_first_chunk_s", elapsed)
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
        if outcome != "ok":
            attrs["error.type"] = outcome
            span.set_status(Status(StatusCode.ERROR))
        span.set_attributes(attrs)
        span.end()


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
    reasons = _FINISH.findall(head if whole else tail)
    reasons = [r.decode("utf-8", "replace") for r in dict.fromkeys(reasons)]
    if reasons:
        out["gen_ai.response.finish_reasons"] = reasons
    return out


_ADDRESSES: dict[str, tuple[str, int] | None] = {}


def _address(dep: Any) -> tuple[str, int] | None:
    """`server.address`/`server.port` of a deployment (its api_base, or the provider's
    public API), worked out once per deployment."""
    key = dep.id
    if key in _ADDRESSES:
        return _ADDRESSES[key]
    found = DEFAULT_ADDRESSES.get(dep.provider)
    if dep.api_base:
        parts = urlsplit(dep.api_base)
        if parts.hostname:
            found = (parts.hostname, parts.port or (443 if parts.scheme == "https" else 80))
    if len(_ADDRESSES) < 4096:
        _ADDRESSES[key] = found
    return found


def _error_type(exc: BaseException) -> str:
    if isinstance(exc, ProxyError):
        return exc.code or exc.type
    return type(exc).__name__
