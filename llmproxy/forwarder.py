"""The terminal element of the chain: attempts upstream, retries and falls back before the
first byte, then relays the answer chunk by chunk while counting tokens.

Protocol mechanics, always on, in this order:
0. the models to try: the requested one, then its `fallbacks` that the caller may use
   (`ctx.permits`, the same allow-check as the route stage's 403); a fallback the caller
   may not use is skipped, so the client gets the error of the last allowed attempt;
1. pick a deployment (router), take its admission lease (if a middleware installed one);
2. open the upstream request; connect plus first byte are bounded by `timeout`;
3. classify the answer: 2xx relays; 401/403, 429, 5xx, connect errors and timeouts cool the
   deployment down and are retried (`num_retries`, `retry_after`, then `fallbacks`);
   any other 4xx reaches the client unchanged; an Anthropic stream whose first event is
   `error` counts as a failure before the first byte;
4. response headers: hop-by-hop (RFC 9110 §7.6.1 and any named in `Connection`) dropped,
   then framing (`Content-Length`, `Content-Encoding`: bodies are forwarded decoded and may
   be changed by middlewares), `Set-Cookie`, the provider's own rate-limit headers and the
   operator's account (`openai-organization`, `openai-project`, `anthropic-organization-id`);
5. relay: each chunk is written as it arrives; an SSE parser beside it counts tokens and
   removes the usage-only chunk the proxy asked for; gaps between chunks are bounded by
   `stream_idle_timeout`; a mid-stream failure ends the stream with the API's SSE error;
6. cleanup (registered on the context, run by the writer whatever happened): close the
   upstream connection, give back the lease with the real usage, fill the record.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, AsyncIterator

import aiohttp
import orjson
import structlog

from . import errors, tokenizer
from .context import COUNT_APIS, Attempt, BodyCut, Reply
from .errors import ProxyError
from .pricing import cost
from .providers.base import Upstream, UpstreamConnectError
from .sse import SSEParser
from .usage import (AnthropicStreamMeter, OpenAIStreamMeter, ResponsesStreamMeter, Usage, anthropic_usage,
                    openai_usage, responses_usage)

if TYPE_CHECKING:
    from .config import Router as RouterConfig
    from .context import AttemptTrace, Context, Lease
    from .router import DeploymentState, Router
    from .services import Services

HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-connection", "proxy-authenticate", "proxy-authorization",
    "te", "trailer", "trailers", "transfer-encoding", "upgrade",
})
# Framing and headers that describe the provider, not this answer to this client (the
# organization and project are the operator's provider account: not the client's to know).
NOT_FORWARDED = frozenset({"content-length", "content-encoding", "set-cookie", "set-cookie2", "date",
                           "server", "x-request-id", "retry-after", "alt-svc", "openai-organization",
                           "openai-project", "anthropic-organization-id"})
RATE_LIMIT_PREFIXES = ("x-ratelimit-", "anthropic-ratelimit-")
MAX_ERROR_BODY = 1 << 20
log = structlog.get_logger("llmproxy.forwarder")


def response_headers(raw: list[tuple[str, str]]) -> list[tuple[str, str]]:
    named: set[str] = set()
    for name, value in raw:
        if name.lower() == "connection":
            named.update(token.strip().lower() for token in value.split(","))
    out = []
    for name, value in raw:
        low = name.lower()
        if low in HOP_BY_HOP or low in NOT_FORWARDED or low in named or low.startswith(RATE_LIMIT_PREFIXES):
            continue
        if low == "x-request-id":
            continue
        out.append((name, value))
    return out


class _Failure(Exception):
    """An attempt that failed before the first byte; `error` is what the client would get."""

    def __init__(self, error: ProxyError, outcome: str, cool_for: float | None) -> None:
        self.error = error
        self.outcome = outcome
        self.cool_for = cool_for


class Forwarder:
    def __init__(self, router: "Router", config: "RouterConfig", services: "Services") -> None:
        self.router = router
        self.config = config
        self.services = services

    async def __call__(self, ctx: "Context") -> Reply:
        assert ctx.model is not None
        cfg = self.config
        names = [ctx.model.name] + [n for n in cfg.fallbacks.get(ctx.model.name, ()) if n != ctx.model.name]
        failures: list[_Failure] = []
        asked = ctx.body["model"]
        for name in names:  # a pattern (`claude-*`) serves the name asked for: that is what the caller must be allowed
            if not self.router.serves(name, ctx.api) or not ctx.permits(asked if name.endswith("*") else name):
                continue
            for _ in range(1 + cfg.num_retries):
                if failures and cfg.retry_after:
                    await asyncio.sleep(cfg.retry_after)
                state = self.router.pick(name, ctx.api, ctx.admission)
                try:
                    return await self._attempt(ctx, state)
                except _Failure as failure:
                    if failure.cool_for is not None:
                        self.router.cool(state, failure.cool_for)
                    failures.append(failure)
        # The last failure decides, but a 429 only when every attempt was rate limited.
        assert failures, "a model with no deployment for this API passed validation"
        if all(f.error.status == 429 for f in failures):
            raise failures[-1].error
        raise next(f for f in reversed(failures) if f.error.status != 429).error

    async def _attempt(self, ctx: "Context", state: "DeploymentState") -> Reply:
        dep = state.deployment
        record = ctx.record
        lease: Lease | None = None
        if ctx.admission is not None:
            lease = await ctx.admission.acquire(ctx, dep)
        trace = ctx.tracer.attempt(ctx, dep, state.model) if ctx.tracer is not None else None
        ctx.upstream_headers = trace.headers if trace is not None else None
        ctx.deployment = dep
        state.inflight += 1
        t0 = time.perf_counter()
        upstream: Upstream | None = None
        first: list[bytes] = []
        parser = SSEParser() if ctx.stream else None
        meter = None
        handed_over = False
        deadline = _Deadline(dep.timeout)
        try:
            try:
                try:
                    upstream = await state.provider.open(ctx)
                    if trace is not None:
                        trace.answered(upstream.status)
                    if lease is not None:
                        feedback = getattr(lease, "feedback", None)
                        if feedback is not None:  # provider rate-limit headers and 429s tighten the buckets
                            feedback(upstream.status, upstream.headers)
                    if 200 <= upstream.status < 300:
                        meter = self._meter(ctx, state)
                        if parser is not None:  # a JSON answer's first byte comes with its headers
                            await self._read_first(upstream, parser, meter, first)
                    else:
                        failure_body = await _read_bounded(upstream)
                except asyncio.CancelledError:
                    if deadline.expired():
                        raise TimeoutError from None
                    raise
                finally:
                    deadline.handle.cancel()
            except TimeoutError:
                raise _Failure(errors.upstream_timeout(
                    f"The upstream deployment did not answer within {dep.timeout:g} seconds."),
                    "timeout", self.config.cooldown_seconds) from None
            except UpstreamConnectError as exc:  # the address is for the log, never for the client
                log.warning("upstream_unreachable", deployment=dep.id, request_id=record.request_id, error=str(exc))
                raise _Failure(errors.upstream_error(f"The upstream deployment {dep.id} could not be reached."),
                               "connect_error", self.config.cooldown_seconds) from None
            except (aiohttp.ClientError, ConnectionError) as exc:
                raise _Failure(errors.upstream_error(f"The upstream connection failed ({type(exc).__name__})."),
                               "connect_error", self.config.cooldown_seconds) from None
            if meter is None:
                reply = self._upstream_status(ctx, state, upstream, failure_body)
                if trace is not None:
                    trace.end(None, f"http_{upstream.status}")
                return reply
            if isinstance(meter, AnthropicStreamMeter) and meter.first_event_error is not None:
                err = meter.first_event_error
                raise _Failure(errors.upstream_error(
                    f"The upstream stream failed before its first byte ({err.get('type', 'error')})."),
                    "stream_error", self.config.cooldown_seconds)
            record.attempts.append(Attempt(dep.id, "ok", time.perf_counter() - t0))
            record.deployment = dep.id
            record.served_model = state.model.name
            record.provider = dep.provider
            if parser is None:
                reply = Reply(upstream.status, response_headers(upstream.headers),
                              self._relay_json(ctx, upstream, meter, trace), upstream.content_length)
            else:
                reply = Reply(upstream.status, response_headers(upstream.headers),
                              self._relay_sse(ctx, upstream, parser, meter, first, trace))
            ctx.cleanups.append(_Finish(ctx, state, upstream, meter, lease, trace))
            handed_over = True
            return reply
        except _Failure as failure:
            record.attempts.append(Attempt(dep.id, failure.outcome, time.perf_counter() - t0))
            if trace is not None:
                trace.end(None, failure.outcome)
            raise
        finally:
            if not handed_over:
                if trace is not None:
                    trace.end(None, "cancelled")  # (a no-op when it already ended)
                state.inflight -= 1
                if upstream is not None:
                    upstream.close()
                if lease is not None:
                    lease.release(None)

    def _meter(self, ctx: "Context", state: "DeploymentState"):
        if ctx.api in COUNT_APIS:  # a count costs nothing and uses no tokens
            return _BodyMeter(_no_usage)
        if ctx.api == "messages":
            return AnthropicStreamMeter() if ctx.stream else _BodyMeter(anthropic_usage)
        if ctx.api == "responses":
            return ResponsesStreamMeter() if ctx.stream else _BodyMeter(responses_usage)
        if ctx.stream:
            drop = not ctx.client_wants_usage and state.deployment.stream_usage
            return OpenAIStreamMeter(drop_usage_chunk=drop)
        return _BodyMeter(openai_usage)

    async def _read_first(self, upstream: Upstream, parser: SSEParser, meter, first: list[bytes]) -> None:
        """Read a stream until its first whole event (an Anthropic `error` there fails the
        attempt). The bytes of those events go in `first`, already fed to the meter; a
        partial event stays pending in the parser."""
        async for chunk in upstream.body:
            out = _parse(parser, meter, chunk)
            if out:
                first.append(out)
                return

    def _upstream_status(self, ctx: "Context", state: "DeploymentState", upstream: Upstream, body: bytes) -> Reply:
        status = upstream.status
        dep = state.deployment
        cooldown = self.config.cooldown_seconds
        if status in (401, 403):
            raise _Failure(errors.upstream_auth_error(
                f"The upstream deployment rejected the proxy's credentials (HTTP {status})."),
                f"http_{status}", cooldown)
        if status == 429:
            retry_after = _retry_after(upstream.headers)
            raise _Failure(errors.upstream_rate_limited(
                "The upstream provider is rate limiting this model; try again later.", retry_after),
                "http_429", retry_after if retry_after is not None else cooldown)
        if status >= 500:
            raise _Failure(errors.upstream_error(f"The upstream deployment failed (HTTP {status})."),
                           f"http_{status}", cooldown)
        # Any other status (a 4xx about the request itself) reaches the client unchanged.
        ctx.record.attempts.append(Attempt(dep.id, f"http_{status}"))
        ctx.record.deployment = dep.id
        ctx.record.served_model = state.model.name
        ctx.record.provider = dep.provider
        return Reply(status, response_headers(upstream.headers), body)

    async def _relay_json(self, ctx: "Context", upstream: Upstream, meter: "_BodyMeter",
                          trace: "AttemptTrace | None" = None) -> AsyncIterator[bytes]:
        """A JSON answer passes through as it arrives; a copy is kept to read usage at the end.
        A body cut short closes the client's connection rather than ending it cleanly
        (`BodyCut`), with the record saying `upstream_cut`."""
        parts = meter.parts
        try:
            async for chunk in upstream.body:
                if not parts:
                    ctx.record.ttfb_s = time.perf_counter() - ctx.started
                parts.append(chunk)
                if trace is not None:
                    trace.chunk(chunk)
                yield chunk
        except (aiohttp.ClientError, ConnectionError, TimeoutError) as exc:
            record = ctx.record
            record.status, record.error_type, record.error_code = 502, "api_error", "upstream_cut"
            log.warning("upstream_cut", deployment=ctx.deployment.id if ctx.deployment else None,
                        request_id=record.request_id, error=f"{type(exc).__name__}: {exc}")
            raise BodyCut from None

    async def _relay_sse(self, ctx: "Context", upstream: Upstream, parser: SSEParser, meter,
                         first: list[bytes], trace: "AttemptTrace | None" = None) -> AsyncIterator[bytes]:
        record = ctx.record
        record.ttfb_s = time.perf_counter() - ctx.started
        try:
            for chunk in first:
                if trace is not None:
                    trace.chunk(chunk)
                yield chunk
            async for chunk in upstream.body:
                out = _pass(parser, meter, chunk)
                if trace is not None:
                    trace.chunk(chunk)
                if out:
                    yield out
            for ev in parser.close():
                if not meter.feed(ev):
                    yield ev.raw
        except (aiohttp.ClientError, ConnectionError, TimeoutError) as exc:
            if isinstance(exc, TimeoutError):  # aiohttp's idle (sock_read) timeout is one too
                err = errors.upstream_timeout(
                    f"The upstream stream was idle for more than {ctx.deployment.stream_idle_timeout:g} seconds.")
            else:
                err = errors.upstream_error(f"The upstream stream failed ({type(exc).__name__}).")
            record.status = err.status
            record.error_type, record.error_code = err.type, err.code
            yield err.sse(ctx.api)


def _pass(parser: SSEParser, meter, chunk: bytes) -> bytes:
    """Feed one chunk to the parser and meter; return the bytes to send now.

    Only whole events go out: a partial event waits for its end (it might be the usage-only
    chunk to remove, and a stream that fails mid-event must still end with a well-formed
    error event). A chunk that holds whole events only and drops none goes out as it came,
    without a copy; otherwise the kept events' raw bytes, unchanged.
    """
    if not parser.pending and chunk[-2:] == b"\n\n" and not meter.wants(chunk):
        # Whole events the meter has no use for now (the usual chunk): out as they came,
        # remembered unparsed in case tokens must be estimated at the end.
        meter.skip(chunk)
        return chunk
    return _parse(parser, meter, chunk)


def _parse(parser: SSEParser, meter, chunk: bytes) -> bytes:
    """`_pass` event by event: every event is fed to the meter."""
    carried = bool(parser.pending)
    kept = []
    dropped = False
    for ev in parser.feed(chunk):
        if meter.feed(ev):
            dropped = True
        else:
            kept.append(ev.raw)
    if not dropped and not carried and not parser.pending:
        return chunk
    return b"".join(kept)


class _Deadline:
    """`asyncio.timeout` for the hot path at a third of its cost: one timer handle that
    cancels the task when it fires. The timer firing always surfaces as CancelledError at
    the await in progress; `expired()` then tells ours from any other cancellation (a client
    disconnect), which stays a cancellation."""

    __slots__ = ("task", "handle", "fired")

    def __init__(self, seconds: float) -> None:
        self.task = asyncio.current_task()
        self.fired = False
        self.handle = asyncio.get_running_loop().call_later(seconds, self._fire)

    def _fire(self) -> None:
        self.fired = True
        self.task.cancel()

    def expired(self) -> bool:
        return self.fired and self.task.uncancel() == 0


def _no_usage(body: dict) -> Usage:
    return Usage()


class _BodyMeter:
    """Usage of a non-streamed answer, read from the whole body once it has passed."""

    __slots__ = ("parts", "parse")

    def __init__(self, parse) -> None:
        self.parts: list[bytes] = []
        self.parse = parse

    def result(self, ctx: "Context"):
        if self.parse is _no_usage:
            return Usage()
        usage = None
        if self.parts:
            body = self.parts[0] if len(self.parts) == 1 else b"".join(self.parts)
            found = _usage_object(body)
            if found is None:  # no cheap answer: read the whole body
                try:
                    found = orjson.loads(body)
                except orjson.JSONDecodeError:
                    found = None
            if isinstance(found, dict):
                usage = self.parse(found)
        if usage is None:
            usage = Usage(prompt_tokens=tokenizer.count_tokens(ctx.prompt_text()), estimated=True)
        return usage


def _usage_object(body: bytes) -> dict | None:
    """`{"usage": {...}}` cut from the end of a JSON answer without parsing all of it.

    Providers put `usage` last; an unescaped `"usage"` followed by `:` can only be a key
    (inside a JSON string the quotes would be escaped). The object is delimited by brace
    depth (usage objects hold numbers and nested objects, no strings with braces); anything
    unexpected returns None and the caller parses the whole body.
    """
    at = body.rfind(b'"usage"')
    if at < 0:
        return None
    i = at + 7
    n = len(body)
    while i < n and body[i] in b" \t\r\n":
        i += 1
    if i >= n or body[i] != 58:  # ':'
        return None
    i += 1
    while i < n and body[i] in b" \t\r\n":
        i += 1
    if i >= n or body[i] != 123:  # '{'
        return None
    end = body.find(b"}", i)
    # nested objects: extend until the braces balance
    while end >= 0 and body.count(b"{", i, end + 1) != body.count(b"}", i, end + 1):
        end = body.find(b"}", end + 1)
    if end < 0:
        return None
    try:
        value = orjson.loads(body[i:end + 1])
    except orjson.JSONDecodeError:
        return None
    return {"usage": value} if isinstance(value, dict) else None


class _Finish:
    """Runs once when the request ends: close upstream, account usage, give back the lease."""

    __slots__ = ("ctx", "state", "upstream", "meter", "lease", "trace")

    def __init__(self, ctx, state, upstream, meter, lease, trace=None) -> None:
        self.ctx, self.state, self.upstream, self.meter, self.lease = ctx, state, upstream, meter, lease
        self.trace = trace

    def __call__(self) -> None:
        ctx, record = self.ctx, self.ctx.record
        self.state.inflight -= 1
        self.upstream.close()
        meter = self.meter
        if isinstance(meter, _BodyMeter):
            usage = meter.result(ctx)
        else:
            usage = meter.result(ctx.prompt_text)  # called only when upstream sent no usage
        record.prompt_tokens = usage.prompt_tokens
        record.completion_tokens = usage.completion_tokens
        record.cached_tokens = usage.cached_tokens
        record.cache_creation_tokens = usage.cache_creation_tokens
        record.reasoning_tokens = usage.reasoning_tokens
        record.tokens_estimated = usage.estimated
        pricing = self.state.model.pricing_for(self.ctx.body["model"])
        record.unpriced = pricing is None
        record.spend = cost(pricing, usage)
        if self.lease is not None:
            self.lease.release(usage)
        if self.trace is not None:
            self.trace.end(usage, record.error_code or ("client_disconnected" if record.client_disconnected else "ok"))


async def _read_bounded(upstream: Upstream) -> bytes:
    parts = []
    size = 0
    async for chunk in upstream.body:
        parts.append(chunk)
        size += len(chunk)
        if size > MAX_ERROR_BODY:
            break
    return b"".join(parts)


def _retry_after(headers: list[tuple[str, str]]) -> float | None:
    for name, value in headers:
        if name.lower() == "retry-after":
            try:
                return max(0.0, float(value))
            except ValueError:
                return None
    return None
