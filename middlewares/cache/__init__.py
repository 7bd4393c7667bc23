"""The `cache` middleware: an exact-match response cache (SPEC §6, issue 14).

Per request of the model APIs, in this order:
1. Controls (`llmproxy.middlewares.cache.key`): `Cache-Control` and the body's `cache` field,
   which is removed here so it never reaches the provider. A request that asks for samples
   (`n` > 1, a `temperature` other than 0) is not cached unless `cache_nondeterministic:
   true`: it is a `bypass`, and so is `no-cache` (no lookup), and a Responses request whose
   answer changes state the provider keeps (a `conversation`, a `background` run).
2. The key: SHA-256 of a canonical JSON of what changes the answer, scoped to the tenant
   (`scope: team` by default), so one team never reads another's answer.
3. Lookup: this process's LRU, then, on a miss, Redis (when there is one: the cache's own
   `redis_url`, else the gateway's). A hit answers at once: no upstream call, so no scheduler
   quota (the forwarder takes it), `record.cache = "hit"`, zero spend, and the tokens it saved
   in `record.extra` (`cache_saved_prompt_tokens`, `cache_saved_completion_tokens`).
4. Single-flight: while one request for a key is on its way upstream, identical ones wait
   for it and are answered from what it stored (one upstream call per replica for a stampede).
   If it stores nothing, each of them goes upstream itself.
5. A miss goes on; its answer is copied as it passes (`capture.tap`, at most `max_entry_bytes`) and
   stored when the request ends (a cleanup, after the forwarder's has filled the record): only
   a whole 200 answer, never a cut, failed or partial one.

Answers: a stored stream replays as that stream; a non-streamed request for the same thing
gets the JSON assembled from it, and a stored JSON answer is written as the API's stream for
a streamed one (`llmproxy.middlewares.cache.convert`). Responses carry `x-llmproxy-cache:
hit|miss|bypass` and, on a hit, `age`.

With `pii: mask` listed before this middleware, what is keyed and stored is the masked
request and the answer as upstream wrote it (placeholders in it); pii restores a hit's
answer with the caller's own values like any other answer.
"""

from __future__ import annotations

import asyncio
import time
from hashlib import sha256
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import structlog

from llmproxy.context import Reply
from llmproxy.errors import ProxyError
from llmproxy.middlewares.cache import convert
from llmproxy.middlewares.cache.capture import Capture, Flight, tap
from llmproxy.middlewares.cache.key import (OFF_LOOP_BYTES, Controls, canonical, hash_in_thread, keeps_state,
                                            nondeterministic, take_controls)
from llmproxy.middlewares.cache.store import Entry, LocalStore, RedisStore

if TYPE_CHECKING:
    from llmproxy.context import Context, Next
    from llmproxy.services import Services

log = structlog.get_logger("llmproxy.middlewares.cache")

HEADER = "x-llmproxy-cache"
_SHUTDOWN_WAIT = 2.0  # seconds given to Redis writes still on their way at shutdown


@dataclass(frozen=True)
class Options:
    ttl: float = field(default=3600.0, metadata={"gt": 0})  # seconds an answer is served
    scope: Literal["team", "key", "global"] = "team"
    max_entry_bytes: int = field(default=1024 * 1024, metadata={"min": 1})  # larger answers are not stored
    cache_nondeterministic: bool = False  # also cache n > 1 and a temperature other than 0
    max_bytes: int = field(default=64 * 1024 * 1024, metadata={"min": 0})  # this process's LRU; 0: none
    redis_url: str | None = None  # a Redis of the cache's own; default: the gateway's redis_url
    redis_prefix: str = "llmproxy:cache:"


class Cache:
    """Built once at start as `Cache(options, services)`; called once per request."""

    Options = Options
    apis = frozenset({"chat", "completions", "embeddings", "messages", "responses"})

    def __init__(self, options: Options | None, services: "Services | None") -> None:
        self.options = opts = options or Options()
        self.services = services
        self.wall = services.wall if services is not None else time.time
        self.local = LocalStore(opts.max_bytes) if opts.max_bytes > 0 else None
        self.remote: RedisStore | None = None
        self._own_redis: Any = None
        self.flights: dict[bytes, Flight] = {}  # key -> the request on its way upstream for it
        self._writes: set[asyncio.Task] = set()

    async def startup(self) -> None:
        """Connect the Redis store (the cache's own `redis_url`, else the gateway's). Listing
        `pii` after `cache` is allowed (SPEC §3) but logged: requests are then keyed and
        answers stored with the personal data in them."""
        s = self.services
        if s is None:
            return
        names = [m.name for m in s.config.middlewares] if s.config is not None else []
        if "pii" in names and "cache" in names and names.index("pii") > names.index("cache"):
            log.warning("middleware_order", detail="cache is listed before pii: requests are keyed and answers "
                        "stored with the personal data unmasked (SPEC §3 lists pii first)")
        redis = None
        if self.options.redis_url:
            from llmproxy.services import open_redis

            redis = self._own_redis = open_redis(self.options.redis_url)
        elif s.redis is not None:
            redis = s.redis
        if redis is not None:
            self.remote = RedisStore(redis, self.options.redis_prefix, clock=s.clock)

    async def shutdown(self) -> None:
        if self._writes:
            await asyncio.wait(set(self._writes), timeout=_SHUTDOWN_WAIT)
        if self._own_redis is not None:
            await self._own_redis.aclose()
            self._own_redis = None

    def health(self) -> dict[str, Any]:
        out: dict[str, Any] = {"cache_entries": len(self.local) if self.local is not None else 0}
        if self.remote is not None:
            out["cache_redis_failures"] = self.remote.failures
        return out

    # --- the request path -------------------------------------------------------------

    async def __call__(self, ctx: "Context", call_next: "Next") -> Reply:
        """Runs after auth (and pii) and before the scheduler; a hit returns without calling
        `call_next`, so nothing inside it (scheduler, forwarder) runs."""
        controls = take_controls(ctx)
        record = ctx.record
        if keeps_state(ctx.body, ctx.api) or (not self.options.cache_nondeterministic
                                              and nondeterministic(ctx.body, ctx.api)):
            record.cache = "bypass"
            return await self._onward(ctx, call_next, "bypass", None)
        data = canonical(ctx, self.options.scope, controls.namespace)
        key = sha256(data).digest() if len(data) < OFF_LOOP_BYTES else await hash_in_thread(data)
        if not controls.lookup:  # no-cache: answer from upstream, and store that
            record.cache = "bypass"
            capture = Capture(self, ctx, key, controls, None)
            ctx.cleanups.append(capture)
            return await self._onward(ctx, call_next, "bypass", capture)
        entry = self.local.get(key, self.wall(), controls.max_age) if self.local is not None else None
        if entry is None:
            flight = self.flights.get(key)
            if flight is not None:  # the same request is on its way upstream: wait for its answer
                await flight.wait()
                entry = flight.entry
                if entry is not None and not entry.fresh(self.wall(), controls.max_age):
                    entry = None
        if entry is not None:
            reply = self._hit(ctx, entry)
            if reply is not None:
                return reply
        capture = self._lead(ctx, key, controls)
        if self.remote is not None:
            entry = await self._remote(ctx, key, controls, capture)
            if entry is not None:
                reply = self._hit(ctx, entry)
                if reply is not None:
                    return reply
        record.cache = "miss"
        return await self._onward(ctx, call_next, "miss", capture)

    def _lead(self, ctx: "Context", key: bytes, controls: Controls) -> Capture:
        """Not in this process: the first of identical requests leads (the others wait for
        it, see `Flight`); its capture is registered now, before anything that may fail, so
        that the flight always ends."""
        flight = None
        if controls.store and key not in self.flights:
            flight = self.flights[key] = Flight()
        capture = Capture(self, ctx, key, controls, flight)
        ctx.cleanups.append(capture)
        return capture

    async def _remote(self, ctx: "Context", key: bytes, controls: Controls, capture: Capture) -> Entry | None:
        """The entry in Redis, if it is there and fresh; it goes to the local LRU and to the
        requests waiting for this one."""
        try:
            entry = await self.remote.get(key)  # type: ignore[union-attr]
        except BaseException:  # cancelled (the client went away): the waiting ones go on
            capture.release(None)
            raise
        if entry is None or not entry.fresh(self.wall(), controls.max_age):
            return None
        if self.local is not None:
            self.local.put(key, entry)
        capture.release(entry)
        return entry

    async def _onward(self, ctx: "Context", call_next: "Next", result: str,
                      capture: "Capture | None") -> Reply:
        """Call the rest of the chain; the answer carries the header, and a miss's is copied
        for storing by `capture` (a cleanup registered before the forwarder's, so it runs
        after it, with the record's usage filled)."""
        try:
            reply = await call_next(ctx)
        except ProxyError as exc:  # an error answer says so too (a copy: the dict may be shared)
            exc.headers = {**exc.headers, HEADER: result}
            raise
        headers = reply.headers + [(HEADER, result)]
        if capture is None or reply.status != 200 or not capture.controls.store:
            return Reply(reply.status, headers, reply.body, reply.content_length)
        for name, value in reply.headers:
            if name.lower() == "content-type":
                capture.content_type = value
                break
        body = reply.body
        if isinstance(body, (bytes, bytearray)):
            capture.parts, capture.complete = [bytes(body)], True
            return Reply(reply.status, headers, body, reply.content_length)
        return Reply(reply.status, headers, tap(body, capture), reply.content_length)  # same bytes, same length

    def _hit(self, ctx: "Context", entry: Entry) -> Reply | None:
        """The answer from `entry` in the form this request asks for; None when the entry
        cannot be written in it (a miss then)."""
        api = ctx.api
        try:
            if entry.kind == "json":
                if ctx.stream:
                    body, ctype = convert.json_to_sse(api, entry.body, ctx.client_wants_usage), convert.SSE
                else:
                    body, ctype = entry.body, entry.content_type
            elif ctx.stream:
                body, ctype = entry.body, entry.content_type
                if api in ("chat", "completions"):
                    body = convert.openai_stream_for(body, entry.usage_span, entry.usage, ctx.client_wants_usage)
            else:
                body, ctype = convert.sse_to_json(api, entry.body, entry.usage), convert.JSON
        except (ValueError, TypeError, AttributeError, KeyError) as exc:
            log.warning("cache_entry_unreadable", request_id=ctx.record.request_id, error=str(exc)[:200])
            return None
        record = ctx.record
        record.cache = "hit"
        record.ttfb_s = time.perf_counter() - ctx.started
        record.extra["cache_saved_prompt_tokens"] = entry.usage[0]
        record.extra["cache_saved_completion_tokens"] = entry.usage[1]
        age = max(0, int(self.wall() - entry.stored_at))
        return Reply(200, [("Content-Type", ctype), (HEADER, "hit"), ("age", str(age))], body)

    def _store(self, key: bytes, entry: Entry) -> None:
        if self.local is not None:
            self.local.put(key, entry)
        if self.remote is not None:
            task = asyncio.get_running_loop().create_task(self.remote.put(key, entry))
            self._writes.add(task)
            task.add_done_callback(self._writes.discard)
