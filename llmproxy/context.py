"""The request pipeline's types: one `Context` per request, a `Reply` back, a `Record` out.

A middleware is any callable `async (ctx, call_next) -> Reply`. It may
- reject early: raise `ProxyError` (or return its own `Reply`) without calling `call_next`;
- read and change `ctx.body` (the parsed JSON request) before calling `call_next`;
- observe or transform the answer: wrap `reply.body` (an async iterator of bytes,
  each item one chunk as it arrived) and return `reply.with_body(...)`;
- add fields to the request's record: `ctx.record.extra["name"] = value`.

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
from dataclasses import dataclass, field, replace
from decimal import Decimal
from typing import TYPE_CHECKING, Any, AsyncIterator, Awaitable, Callable, Protocol

if TYPE_CHECKING:
    from multidict import CIMultiDictProxy

    from .config import Deployment, Model
    from .usage import Usage


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
    model: str | None = None
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
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class Context:
    """One request on its way through the chain. A field is None until whoever owns it
    sets it: the server sets everything down to `record`; `principal` is the auth
    middleware's; `admission` the scheduler's; `deployment` the router's."""

    api: str  # chat | completions | embeddings | messages | models
    path: str
    headers: "CIMultiDictProxy[str]"
    body: dict[str, Any]
    record: Record
    model: "Model | None" = None
    stream: bool = False
    api_key: str | None = None  # the key the client presented; never logged, never sent upstream
    principal: Any = None
    admission: Admission | None = None
    deployment: "Deployment | None" = None
    started: float = field(default_factory=time.perf_counter)
    cleanups: list[Callable[[], Any]] = field(default_factory=list)

    @property
    def client_wants_usage(self) -> bool:
        opts = self.body.get("stream_options")
        return isinstance(opts, dict) and opts.get("include_usage") is True
