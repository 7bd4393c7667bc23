"""The upstream side behind one small interface (after httpcore's): plain values in,
`Upstream(status, headers, body)` out. The body iterator yields bytes as they arrive;
`close()` releases or aborts the connection and is always called by the forwarder.

Header policy, in this order (the forwarder's side is in `forwarder.py`):
1. upstream gets only the allowlisted client headers (`FORWARD_HEADERS`), never the
   client's key, cookies or OpenAI organisation/project headers;
2. then the provider's own auth (the deployment's key) and the deployment's `headers`;
3. `Accept-Encoding: identity` is asked for; a compressed answer is decoded by the
   client session and forwarded without its `Content-Encoding` (one policy, tested).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable, ClassVar

import aiohttp
import orjson
from yarl import URL

if TYPE_CHECKING:
    from ..config import Deployment
    from ..context import Context
    from ..services import Services

def upstream_body(ctx: "Context", model: str, *, include_usage: bool = False) -> bytes:
    """The body sent upstream: `ctx.body` naming the deployment's `model` (`*`: the
    client's own name, for a pattern model) (and with
    `stream_options.include_usage` when `include_usage`), written by orjson.

    Why not the client's own bytes when nothing changed: orjson writes a 100 KB
    conversation in about 15 us here, while finding the `model` key in the bytes to splice
    it (one `bytes.find` over them) takes 47 us; and bytes with a duplicate key ("model"
    twice) would let a server that keeps the first one serve another model than the one
    routed and priced. Written from the parsed body, upstream reads what we read."""
    body = ctx.body
    if model != "*" and body.get("model") != model:  # "*": the name the client asked for
        body = {**body, "model": model}
    if include_usage:
        opts = body.get("stream_options")
        body = {**body, "stream_options": {**(opts if isinstance(opts, dict) else {}), "include_usage": True}}
    return orjson.dumps(body)


FORWARD_HEADERS = (
    "accept",
    "anthropic-version",
    "anthropic-beta",
    "openai-beta",
    "traceparent",
    "tracestate",
)


@dataclass(slots=True)
class Upstream:
    status: int
    headers: list[tuple[str, str]]
    body: AsyncIterator[bytes]
    close: Callable[[], None]
    content_length: int | None = None  # of the decoded body; None when unknown or compressed

    async def read_all(self) -> bytes:
        parts = [chunk async for chunk in self.body]
        return b"".join(parts)


class UpstreamConnectError(Exception):
    """The upstream could not be reached (DNS, refused, reset before an answer)."""


class Provider:
    """Base of every provider. Subclasses set `apis` (the endpoint kinds they serve),
    `requires_api_key`, `offline`, an optional `Options` dataclass for extra
    deployment keys, and implement `open`."""

    apis: ClassVar[frozenset[str]] = frozenset()
    requires_api_key: ClassVar[bool] = True
    offline: ClassVar[bool] = False
    Options: ClassVar[type | None] = None

    def __init__(self, deployment: "Deployment", options: Any, services: "Services") -> None:
        self.deployment = deployment
        self.options = options
        self.services = services

    @classmethod
    def needs_api_key(cls, deployment: "Deployment") -> bool:
        """Whether check-config refuses `deployment` without an `api_key`; by default the
        class's `requires_api_key` (OpenAI's depends on the `api_base`)."""
        return cls.requires_api_key

    @classmethod
    def check_deployment(cls, deployment: "Deployment") -> list[str]:
        """Problems with a deployment's own keys that its `Options` types cannot say, as
        `key: message` (check-config prefixes the deployment's path); run at start and by
        `check-config`."""
        return []

    async def open(self, ctx: "Context") -> Upstream:
        raise NotImplementedError  # abstract


class HTTPProvider(Provider):
    """A provider reached over HTTP through the process's shared client session."""

    default_base: ClassVar[str] = ""
    paths: ClassVar[dict[str, str]] = {}

    def __init__(self, deployment: "Deployment", options: Any, services: "Services") -> None:
        super().__init__(deployment, options, services)
        self.base = (deployment.api_base or self.default_base).rstrip("/")
        self.fixed_headers = {k.lower(): v for k, v in self.auth_headers().items()}
        self.fixed_headers.update({k.lower(): v for k, v in deployment.headers.items()})
        self.fixed_headers["content-type"] = "application/json"
        self.fixed_headers["accept-encoding"] = "identity"
        self.timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=deployment.timeout, sock_read=deployment.stream_idle_timeout
        )

    def auth_headers(self) -> dict[str, str]:
        return {}

    def request_headers(self, ctx: "Context") -> dict[str, str]:
        headers = {}
        client = ctx.headers
        for name in FORWARD_HEADERS:
            value = client.get(name)
            if value is not None:
                headers[name] = value
        extra = ctx.upstream_headers
        if extra:  # the attempt's own trace context replaces the client's, both headers
            headers.pop("traceparent", None)
            headers.pop("tracestate", None)
            headers.update(extra)
        headers.update(self.fixed_headers)
        return headers

    def request_body(self, ctx: "Context") -> bytes:
        return upstream_body(ctx, self.deployment.model)

    def request_query(self, ctx: "Context") -> str:
        """The query string sent upstream, encoded and without `?`: the client's as it was
        sent (`/v1/messages?beta=true`). A provider with parameters of its own (Azure's
        `api-version`) merges them here, so that the deployment's win."""
        request = ctx.request
        return request.rel_url.raw_query_string if request is not None else ""

    def request_url(self, ctx: "Context") -> "str | URL":
        """The deployment's URL for the API with `request_query`: the client chooses the
        query, never the URL."""
        url = self.base + self.paths[ctx.api]
        query = self.request_query(ctx)
        return URL(f"{url}?{query}", encoded=True) if query else url

    async def open(self, ctx: "Context") -> Upstream:
        url = self.request_url(ctx)
        session = self.services.http
        try:
            resp = await session.post(
                url, data=self.request_body(ctx), headers=self.request_headers(ctx), timeout=self.timeout
            )
        except (aiohttp.ClientConnectionError, OSError) as exc:
            if isinstance(exc, (aiohttp.ServerTimeoutError, asyncio.TimeoutError)):
                raise asyncio.TimeoutError() from exc
            raise UpstreamConnectError(f"{type(exc).__name__}: {exc}") from exc
        length = resp.content_length if "Content-Encoding" not in resp.headers else None
        return Upstream(resp.status, list(resp.headers.items()), resp.content.iter_any(), resp.close, length)
