"""A miss on its way to the cache: its answer copied as it passes (`tap`), checked and
stored when the request ends (`Capture`, a cleanup), and the requests waiting for it
(`Flight`)."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, AsyncIterator

from llmproxy.middlewares.cache import convert
from llmproxy.middlewares.cache.key import Controls
from llmproxy.middlewares.cache.store import Entry

if TYPE_CHECKING:
    from llmproxy.context import Context
    from llmproxy.middlewares.cache import Cache


class Flight:
    """A request on its way upstream that identical ones wait for (the event is made only
    when one does: most misses have no company)."""

    __slots__ = ("event", "entry", "ended")

    def __init__(self) -> None:
        self.event: asyncio.Event | None = None
        self.entry: Entry | None = None  # what it stored, once ended
        self.ended = False

    async def wait(self) -> None:
        if not self.ended:
            if self.event is None:
                self.event = asyncio.Event()
            await self.event.wait()

    def end(self, entry: Entry | None) -> None:
        self.entry, self.ended = entry, True
        if self.event is not None:
            self.event.set()


async def tap(body: AsyncIterator[bytes], capture: "Capture") -> AsyncIterator[bytes]:
    """A reply body passed through unchanged while a copy is kept for the cache, up to
    `max_entry_bytes` (past that the copy is dropped). `capture.complete` only once the body
    has ended on its own; closing this closes the body it wraps (an async generator: resuming
    one costs less than a Python `__anext__`, and this runs for every chunk of every miss)."""
    parts = capture.parts
    limit = capture.limit
    size = 0
    try:
        async for chunk in body:
            if parts is not None:
                size += len(chunk)
                if size > limit:
                    parts = capture.parts = None
                else:
                    parts.append(chunk)
            yield chunk
        capture.complete = True
    finally:
        aclose = getattr(body, "aclose", None)
        if aclose is not None:
            await aclose()


class Capture:
    """One miss's answer on its way to the cache; called as a cleanup when the request
    ends: stores a whole 200 answer, and ends the request's flight whatever happened."""

    __slots__ = ("cache", "ctx", "key", "controls", "flight", "parts", "complete", "limit", "content_type")

    def __init__(self, cache: "Cache", ctx: "Context", key: bytes, controls: Controls,
                 flight: "Flight | None") -> None:
        self.cache = cache
        self.ctx = ctx
        self.key = key
        self.controls = controls
        self.flight = flight
        self.parts: list[bytes] | None = []
        self.complete = False
        self.limit = cache.options.max_entry_bytes
        self.content_type: str | None = None

    def release(self, entry: Entry | None) -> None:
        """End the flight (once): the requests waiting for it take `entry` (None: go upstream)."""
        flight = self.flight
        if flight is not None:
            self.flight = None
            if self.cache.flights.get(self.key) is flight:
                del self.cache.flights[self.key]
            flight.end(entry)

    def __call__(self) -> None:
        entry = None
        try:
            entry = self.entry()
            if entry is not None:
                self.cache._store(self.key, entry)
        finally:
            self.release(entry)

    def entry(self) -> Entry | None:
        """The entry to store, or None: not stored when the answer is not whole and 200,
        was cut, failed mid-stream, passed `max_entry_bytes`, or the client went away."""
        ctx, record, parts = self.ctx, self.ctx.record, self.parts
        if (not self.complete or not parts or not self.controls.store or record.status != 200
                or record.error_code is not None or record.client_disconnected):
            return None
        ttl = self.controls.ttl if self.controls.ttl is not None else self.cache.options.ttl
        if ttl <= 0:
            return None
        body = parts[0] if len(parts) == 1 else b"".join(parts)
        span = None
        if ctx.stream:
            if not _whole_stream(body, ctx.api):
                return None
            kind, ctype = "sse", self.content_type or convert.SSE
            if ctx.api in ("chat", "completions") and ctx.client_wants_usage:
                span = convert.usage_chunk_span(body)
        else:
            stripped = body.strip()
            if stripped[:1] != b"{" or stripped[-1:] != b"}":
                return None
            if ctx.api == "responses" and not convert.whole_response(stripped):
                return None
            kind, ctype = "json", self.content_type or convert.JSON
        now = self.cache.wall()
        usage = (record.prompt_tokens, record.completion_tokens, record.cached_tokens,
                 record.cache_creation_tokens, record.reasoning_tokens)
        return Entry(kind, body, ctype, now, now + ttl, usage, span)


def _whole_stream(body: bytes, api: str) -> bool:
    """Whether a stream ended as a whole answer does: OpenAI's last event is `[DONE]`,
    Anthropic's `message_stop` (an error event, ours or upstream's, is never last but one),
    the Responses API's `response.completed` or `.incomplete` (never `.failed`, an error)."""
    if api == "responses":
        return convert.responses_end(body) in convert.RESPONSES_DONE
    tail = body[-256:].rstrip()
    if api == "messages":
        return b"message_stop" in tail[-96:] and b"event: error" not in tail
    return tail.endswith(b"[DONE]")
