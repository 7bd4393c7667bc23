"""`stamp`: an example llmproxy middleware that does one of each thing a middleware can do.

Installed next to llmproxy, it is listed in the config by its entry-point name; its
options are the fields of `Stamp.Options`:

    middlewares:
      - stamp: {value: v1, blocked_users: [mallory]}

For each request, in this order:
1. reject early: a request from a blocked user gets a 403 and never goes upstream;
2. change the request: one that names no user goes upstream naming `<value>`;
3. change the answer: its headers get `<header>: <value>`;
4. observe the answer as it streams: its chunks and bytes, passed on unchanged, are
   counted into the request's record (`extra["stamp_chunks"]`, `extra["stamp_bytes"]`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, AsyncIterator

from llmproxy.context import BODY_APIS, Context, Next, Reply
from llmproxy.errors import ProxyError

_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # an HTTP field name (RFC 9110 section 5.1)


class Stamp:
    """Built once at start as `Stamp(options, services)`; called once per request of the
    APIs it acts on. Two class attributes say where it stands: `apis`, the APIs it acts on
    (the default, `llmproxy.context.BODY_APIS`, is the model APIs, which have a parsed
    `ctx.body`; this one adds "models" so that `GET /v1/models` is stamped too, and its
    request steps look at `ctx.body`, None there), and `stage` (left at "request": it runs
    after authentication, the body read and the model route, so `ctx.principal`, and for
    a model API `ctx.body` and `ctx.model`, are set)."""

    apis = BODY_APIS | {"models"}

    @dataclass(frozen=True)
    class Options:
        """Built by llmproxy from the config section; an unknown key fails `check-config`."""

        header: str = "x-llmproxy-stamp"
        value: str = "stamped"
        blocked_users: tuple[str, ...] = ()  # a YAML list arrives as a tuple

        def __post_init__(self) -> None:
            # Checked when the config is: a ValueError here becomes a config error at this
            # section's path, so `check-config` catches it rather than the first request.
            if not _TOKEN.fullmatch(self.header):
                raise ValueError(f"header: {self.header!r} is not a valid HTTP header name")
            if any(c in self.value for c in "\r\n\0"):
                raise ValueError("value: must not contain CR, LF or NUL")

    def __init__(self, options: Stamp.Options | None, services: Any) -> None:
        # Precompute here, once: the per-request path below only reads.
        opts = options or self.Options()
        self.value = opts.value
        self.stamp = (opts.header, opts.value)
        self.blocked = frozenset(opts.blocked_users)

    async def __call__(self, ctx: Context, call_next: Next) -> Reply:
        """Runs in config order, before the middlewares listed after this one. Raising a
        ProxyError (or returning a Reply) without awaiting `call_next` answers at once:
        nothing below runs, the upstream included. The server shapes the error per API."""
        if ctx.body is not None:  # a model API: there is a request to check and change
            user = _user(ctx)
            if user in self.blocked:
                raise ProxyError(403, f"The user '{user}' may not use this proxy.",
                                 "permission_error", "user_blocked", "user")
            _name_user_if_absent(ctx, self.value)  # `ctx.body` is what goes upstream

        reply = await call_next(ctx)

        # On the way back (reverse config order). Nothing has reached the client yet, so the
        # headers can still change; build a new list rather than mutating the one below's.
        headers = reply.headers + [self.stamp]
        if isinstance(reply.body, (bytes, bytearray)):  # a small fixed answer, whole already
            ctx.record.extra["stamp_chunks"] = 1 if reply.body else 0
            ctx.record.extra["stamp_bytes"] = len(reply.body)
            return reply.with_headers(headers)
        counted = _Counted(reply.body)
        # The body may never be iterated (the client left, or a middleware above us raised
        # after we returned). The writer runs `ctx.cleanups` at the end of every request
        # whatever happened, so the record gets the numbers either way: zero, partial or all.
        ctx.cleanups.append(lambda: counted.write(ctx.record.extra))
        return Reply(reply.status, headers, counted)


class _Counted:
    """The body passed through unchanged, counting chunks and bytes as they go by.

    A class rather than an async generator: a generator that never started ignores
    `aclose()`, so it could not pass the close on to the body it wraps. This one does,
    iterated or not, and the upstream connection behind it is released at once."""

    __slots__ = ("body", "chunks", "bytes")

    def __init__(self, body: AsyncIterator[bytes]) -> None:
        self.body = body
        self.chunks = 0
        self.bytes = 0

    def __aiter__(self) -> _Counted:
        return self

    async def __anext__(self) -> bytes:
        chunk = await self.body.__anext__()  # its StopAsyncIteration ends us too
        self.chunks += 1
        self.bytes += len(chunk)
        return chunk

    async def aclose(self) -> None:
        aclose = getattr(self.body, "aclose", None)
        if aclose is not None:
            await aclose()

    def write(self, extra: dict[str, Any]) -> None:
        extra["stamp_chunks"] = self.chunks
        extra["stamp_bytes"] = self.bytes


def _user(ctx: Context) -> str | None:
    """The end user the client named: `user` (OpenAI APIs) or `metadata.user_id` (Anthropic)."""
    if ctx.api == "messages":
        meta = ctx.body.get("metadata")
        user = meta.get("user_id") if isinstance(meta, dict) else None
    else:
        user = ctx.body.get("user")
    return user if isinstance(user, str) else None


def _name_user_if_absent(ctx: Context, value: str) -> None:
    if ctx.api == "messages":
        meta = ctx.body.setdefault("metadata", {})
        if isinstance(meta, dict):
            meta.setdefault("user_id", value)
    else:
        ctx.body.setdefault("user", value)
