"""The request pipeline's types: one `Context` per request, a `Reply` back, a `Record` out.

Every request, rejections included, passes one chain composed at start for its API
(`llmproxy.pipeline`): the configured middlewares in config order with the built-in
stages among them (the unknown-path check, the body read, the model route) and a
terminal (the forwarder, or the model list). A middleware is any callable
`async (ctx, call_next) -> Reply`. It may
- reject early: raise `ProxyError` (or return its own `Reply`) without calling `call_next`;
- read and change `ctx.body` (the parsed JSON request) before calling `call_next` (the
  forwarder writes what it holds then); `ctx.prompt_text()` is its text, derived once;
- observe or transform the answer: wrap `reply.body` (an async iterator of bytes,
  each item one chunk as it arrived) and return `reply.with_body(...)`;
- add fields to the request's record: `ctx.record.extra["name"] = value`.

Class attributes tell the chain where a middleware acts (read once, at start):
- `apis`: the APIs it acts on (default `BODY_APIS`); for any other the chain skips it;
- `stage`: `"request"` (default) needs the parsed body and the resolved model, so it runs
  after the read and route stages; `"identity"` decides who is asking (auth) and runs
  before the body is read; `"outer"` works on any request: listed before the identity
  middlewares it runs before anything is read and wraps every outcome (tracing); listed
  after them it runs where it stands, on the requests that get that far. A `"request"`
  middleware listed before an `"identity"` one is a config error.
- an identity middleware may define `async routed(ctx)`: called by the route stage once
  the model is known and allowed; raising there rejects (a budget).

Nothing reaches the client until every middleware has returned; exactly one place, the
writer in `server.py`, touches aiohttp's response, and it always closes the body and runs
`ctx.cleanups`. A wrapper generator that never started runs no `finally` (and one whose
reply a middleware above dropped is never closed): put work that must happen in
`ctx.cleanups`, not in a generator's `finally`. Cleanups run innermost first (the
forwarder's, which fills the record's usage and spend, before those of the middlewares
around it), then the record goes to the event sinks.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from decimal import Decimal
from typing import TYPE_CHECKING, Any, AsyncIterator, Awaitable, Callable, ContextManager, Protocol

from .usage import prompt_text as _prompt_text

if TYPE_CHECKING:
    from aiohttp import web
    from multidict import CIMultiDictProxy

    from .config import Deployment, Model
    from .store import SubscriptionInfo, TeamInfo
    from .usage import Usage

# The APIs of the data plane. `BODY_APIS` take a JSON body naming a model; "models" is
# `GET /v1/models`; "limits" `GET /v1/limits`; "passthrough" any request under the prefix
# of a `passthrough:` route (`llmproxy.passthrough`); "unknown" any path the gateway does
# not serve; "admin" the admin API.
BODY_APIS: frozenset[str] = frozenset({"chat", "completions", "embeddings", "messages", "responses",
                                       "count_tokens", "input_tokens"})
# Token counting (`POST /v1/messages/count_tokens`, `POST /v1/responses/input_tokens`): a
# body like `messages`' / `responses`', answered by a deployment that speaks it or by the
# tokenizer here; never billed, never in the spend log, its own small share of a rate.
COUNT_APIS: frozenset[str] = frozenset({"count_tokens", "input_tokens"})
BILLED_APIS: frozenset[str] = BODY_APIS - COUNT_APIS  # what the spend log and usage events record
ALL_APIS: frozenset[str] = BODY_APIS | {"models", "limits", "passthrough", "unknown", "admin"}


class BodyCut(Exception):
    """Raised by a reply body that cannot go on (its upstream was cut mid-way): the writer
    closes the client's connection, since ending the body cleanly would pass a truncated
    answer off as whole. Whoever raises it fills the record first."""


@dataclass(frozen=True, slots=True)
class Reply:
    """What the chain answers. `body` is `bytes` for a small fixed body, else an async
    iterator of chunks; the writer closes an iterator whatever happens."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes | AsyncIterator[bytes]
    # The length of an iterator body when known and untouched (upstream's Content-Length of a
    # body no middleware changed); `with_body` drops it, so a transformed body is never framed
    # with a stale length.
    content_length: int | None = None

    def with_body(self, body: bytes | AsyncIterator[bytes]) -> "Reply":
        return replace(self, body=body, content_length=None)

    def with_headers(self, headers: list[tuple[str, str]]) -> "Reply":
        return replace(self, headers=headers)


Next = Callable[["Context"], Awaitable[Reply]]


class Middleware(Protocol):
    async def __call__(self, ctx: "Context", call_next: Next) -> Reply: ...


class Principal(Protocol):
    """Who is asking: `ctx.principal`, set by the identity middleware (`auth`). What a
    middleware may read of it; `auth.Principal` implements it."""

    key_id: str | None  # the key's public id (its SHA-256); None for the master key
    key_alias: str | None
    team_id: str | None
    user_id: str | None
    is_master: bool
    # The key's own limits (None: none); the team's are on `team`.
    rpm_limit: int | None
    tpm_limit: int | None
    max_parallel_requests: int | None
    team: "TeamInfo | None"
    # The team's subscription (a `SubscriptionInfo`), set by the subscription middleware;
    # None without one. Read with getattr: a principal of another identity plugin may lack it.
    subscription: "SubscriptionInfo | None"

    def allows_model(self, name: str) -> bool:
        """May this caller use the configured model `name`? Asked by the route stage (403)
        and by the forwarder before each fallback model. A principal may also define
        `denial(name) -> str`, the 403's message."""


class Lease(Protocol):
    """What an admission step hands out for one upstream attempt."""

    def release(self, usage: "Usage | None") -> None:
        """The attempt ended: `usage` is what it really used (None when nothing was sent)."""

    # Optional: `feedback(status, headers)` is called once per attempt with the upstream's
    # status and headers, before `release`, so provider rate-limit headers and 429s can
    # tighten the deployment's buckets. It must not raise.


class Admission(Protocol):
    """Installed on `ctx.admission` by a middleware (the scheduler); the router calls it
    before each upstream attempt for the deployment it picked and releases the lease
    when that attempt ends (at once on failure, at the end of the stream on success)."""

    async def acquire(self, ctx: "Context", deployment: "Deployment") -> Lease: ...

    def has_capacity(self, deployment: "Deployment") -> bool: ...


class AttemptTrace(Protocol):
    """One upstream attempt as a tracer sees it (`Tracer.attempt`); the forwarder calls it."""

    headers: dict[str, str]  # added to the upstream request (the attempt's traceparent)

    def answered(self, status: int) -> None: ...

    def chunk(self, data: bytes) -> None: ...  # each chunk of a 2xx answer, as it passes

    def end(self, usage: "Usage | None", outcome: str) -> None: ...  # once; outcome as Attempt's


class Tracer(Protocol):
    """Installed on `ctx.tracer` by a tracing middleware for one request. `ctx.trace(name)`
    opens a span of the request's trace (a no-op without a tracer); the forwarder asks
    for one `attempt` per upstream attempt."""

    def span(self, name: str, attributes: dict[str, Any] | None = None) -> ContextManager[Any]: ...

    def attempt(self, ctx: "Context", deployment: "Deployment", model: "Model") -> AttemptTrace: ...


_NO_SPAN = nullcontext()  # what ctx.trace() gives without a tracer: enters as None


@dataclass(slots=True)
class Attempt:
    deployment: str
    outcome: str  # "ok", "http_<status>", "connect_error", "timeout", "stream_error"
    duration_s: float = 0.0


@dataclass(slots=True)
class Record:
    """One per request, whatever happened; handed to every event sink exactly once."""

    request_id: str
    client_request_id: str | None
    api: str
    path: str
    started_at: float  # wall clock, seconds since the epoch
    model: str | None = None  # the configured model the client asked for (never other client text)
    requested_model: str | None = None  # the client's name as sent, cut by `errors.shown`
    served_model: str | None = None  # the model whose deployment answered (a fallback's name)
    deployment: str | None = None
    provider: str | None = None
    stream: bool = False
    status: int = 0
    error_type: str | None = None
    error_code: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    cache_creation_tokens: int = 0
    reasoning_tokens: int = 0
    tokens_estimated: bool = False
    spend: Decimal = Decimal(0)
    unpriced: bool = False  # answered by a model without pricing: the spend is unknown, not 0
    duration_s: float = 0.0
    ttfb_s: float | None = None
    cache: str | None = None  # hit | miss | bypass, set by a cache middleware
    client_disconnected: bool = False
    attempts: list[Attempt] = field(default_factory=list)
    key_id: str | None = None
    key_alias: str | None = None
    team_id: str | None = None
    user_id: str | None = None
    trace_id: str | None = None
    # Admin API calls (api "admin"): what was done, by whom (`master` or an admin key's
    # id, never a secret), to what.
    action: str | None = None
    actor: str | None = None
    target_id: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class Context:
    """One request on its way through the chain. A field is None until whoever owns it
    sets it: the server sets everything down to `record` (and `request`, which only the
    built-in stages read); `principal` is the identity middleware's (auth); `body` and
    `stream` the read stage's; `model` the route stage's; `admission` the scheduler's;
    `deployment` the forwarder's; `tracer` a tracing middleware's."""

    api: str  # one of ALL_APIS
    path: str
    headers: "CIMultiDictProxy[str]"
    body: dict[str, Any] | None  # the parsed JSON request; None before the read stage
    record: Record
    model: "Model | None" = None
    stream: bool = False
    api_key: str | None = None  # the key the client presented; never logged, never sent upstream
    principal: Principal | None = None
    request: "web.BaseRequest | None" = None
    admission: Admission | None = None
    deployment: "Deployment | None" = None
    started: float = field(default_factory=time.perf_counter)
    cleanups: list[Callable[[], Any]] = field(default_factory=list)
    tracer: Tracer | None = None  # the tracing middleware's, for this request
    upstream_headers: dict[str, str] | None = None  # the next upstream request's trace context (replaces the client's)
    _prompt: str | None = field(default=None, repr=False)

    def trace(self, name: str, attributes: dict[str, Any] | None = None) -> ContextManager[Any]:
        """`with ctx.trace("llmproxy.pii") as span:` a span of this request's trace around
        some work (`span` None without a tracer: set attributes only when it is not)."""
        tracer = self.tracer
        return _NO_SPAN if tracer is None else tracer.span(name, attributes)

    def prompt_text(self) -> str:
        """The request's text as a tokenizer counts it (`usage.prompt_text`), derived once
        per request, from the body as it is at the first call: budgets, limits and the
        token estimate all read this. A middleware that changes the text of the body
        after that (pii's masking) calls `body_changed()`."""
        prompt = self._prompt
        if prompt is None:
            prompt = self._prompt = _prompt_text(self.body, self.api) if self.body is not None else ""
        return prompt

    def body_changed(self) -> None:
        """Say that the text of `body` changed: `prompt_text()` is derived again."""
        self._prompt = None

    @property
    def client_wants_usage(self) -> bool:
        opts = self.body.get("stream_options") if self.body is not None else None
        return isinstance(opts, dict) and opts.get("include_usage") is True

    def permits(self, model: str) -> bool:
        """May the caller use the configured model `model` (no principal: anyone may)?"""
        principal = self.principal
        return principal is None or principal.allows_model(model)
