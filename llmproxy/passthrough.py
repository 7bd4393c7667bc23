"""Pass-through routes (`passthrough:` in the config): the endpoints the gateway does not
model (files, batches, audio, images, moderations, Anthropic's message batches...),
forwarded as they are to one provider account.

`{prefix}/{rest}?{query}`, any method, goes to `{api_base}/{rest}?{query}`. The request has
passed its chain before it gets here (`llmproxy.pipeline`: the outer middlewares, then every
identity middleware, else the master-key gate), so a caller without a valid key had its
401 before anything below ran. Then, in this order:

1. the path: `rest` is appended to `api_base`, never a URL of the client's: a `.` or `..`
   segment (percent-encoded too), an encoded `/` or `\\`, an empty segment and a scheme in
   the first segment (`http:`) are refused (400);
2. the body: a JSON body (`Content-Type` JSON, or none) is read whole, bounded by
   `server.max_body_bytes` (413), and must parse (400). When it names a `model`, the caller
   must be allowed that name (403, the route stage's check) and upstream gets the body as
   parsed (written by orjson, so upstream reads the model that was checked); otherwise the
   bytes as sent. Any other body (a multipart upload) is streamed upstream as it arrives,
   never held whole, bounded by the route's `max_body_bytes` (413: at once for a
   `Content-Length` over it; else the upload is cut and upstream never sees its end);
3. the rate limits, when a middleware offers an admission step (the scheduler's
   `admission`): one attempt per request on the route's own lane (`passthrough:{prefix}`,
   with no deployment buckets), so the key's and team's `rpm_limit` and
   `max_parallel_requests` apply, and the subscription's entry for the body's model or its
   `*` entry. Nothing says how many tokens an opaque body takes, so none are reserved up
   front; `tpm_limit` is charged with the answer's usage when it ends, and a request waits
   (or gets its 429) while that charge leaves the key's or team's token bucket in debt;
4. the request headers: only `REQUEST_HEADERS` of the client's (never its key, cookies or
   OpenAI organization/project), then the route's key in the provider's header, the route's
   `headers`, `Accept-Encoding: identity`, and the body's framing (`Content-Length` as sent
   when the body goes as sent, else chunked);
5. the answer, whatever its status, streamed back as it arrives; there are no retries (an
   upload cannot be sent twice) and redirects are not followed. Headers as the forwarder's
   (`forwarder.response_headers`: hop-by-hop, framing, cookies, the provider's rate-limit
   and account headers dropped), except `Retry-After`, which here is the upstream's to
   give. A JSON answer of at most `SNIFF_BYTES` is copied aside as it passes and read for
   its `usage` at the end; a larger one passes unread;
6. cleanup (on `ctx.cleanups`, run by the writer whatever happened): release or close the
   upstream connection, fill the record's tokens, give back the lease.

The record of each request has api "passthrough", the route's prefix in
`record.extra["passthrough"]`, `deployment` "passthrough:{prefix}", the route's provider,
and the tokens of the answer's `usage` (no spend: no prices apply).
"""

from __future__ import annotations

import asyncio
import re
import time
from typing import TYPE_CHECKING, Any, AsyncIterator, Sequence
from urllib.parse import unquote

import aiohttp
import orjson
import structlog
from aiohttp import web
from yarl import URL

from . import errors
from .config import Deployment
from .context import Attempt, BodyCut, Context, Reply
from .forwarder import response_headers
from .patterns import NameTable
from .providers.anthropic import DEFAULT_VERSION
from .providers.base import FORWARD_HEADERS
from .usage import MAX_TOKENS, Usage, anthropic_usage, openai_usage
from .validate import read_bounded

if TYPE_CHECKING:
    from .config import Config, Model, Passthrough as RouteConfig
    from .context import Admission, Lease
    from .services import Services

log = structlog.get_logger("llmproxy.passthrough")

# The client's headers upstream may see: the forwarder's, plus what uploads and the
# non-model endpoints use. The client's key, cookies, Host and framing never pass.
REQUEST_HEADERS = tuple(dict.fromkeys(FORWARD_HEADERS + ("content-type", "idempotency-key", "range")))
SNIFF_BYTES = 1 << 20  # a JSON answer up to this size is read for its usage
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:")


def register(app: web.Application, routes: Sequence["RouteConfig"], handler: Any) -> None:
    """Add `{prefix}/{tail}` for every method of each route (before the catch-all)."""
    for route in routes:
        app.router.add_route("*", route.prefix + "/{tail:.*}", handler)


class _Route:
    """One configured route, with what every request of it sends."""

    def __init__(self, cfg: "RouteConfig", max_body: int) -> None:
        self.prefix = cfg.prefix
        self.provider = cfg.provider
        self.base = cfg.api_base.rstrip("/")
        self.max_upload = cfg.max_body_bytes or max_body
        headers: dict[str, str] = {}
        if cfg.api_key:
            if cfg.provider == "anthropic":
                headers["x-api-key"] = cfg.api_key
            else:
                headers["authorization"] = f"Bearer {cfg.api_key}"
        headers.update({k.lower(): v for k, v in cfg.headers.items()})
        headers["accept-encoding"] = "identity"
        self.fixed = headers
        self.timeout = aiohttp.ClientTimeout(total=None, sock_connect=cfg.timeout, sock_read=cfg.read_timeout)
        # The scheduler's lane for the route: no buckets of its own, the caller's limits only.
        self.lane = Deployment(provider=cfg.provider, model="passthrough", api_base=cfg.api_base,
                               id=f"passthrough:{cfg.prefix}")

    def request_headers(self, client: Any) -> dict[str, str]:
        out = {}
        for name in REQUEST_HEADERS:
            value = client.get(name)
            if value is not None:
                out[name] = value
        out.update(self.fixed)
        if self.provider == "anthropic":
            out.setdefault("anthropic-version", DEFAULT_VERSION)
        return out


class _Upload:
    """A request body streamed upstream chunk by chunk, cut when it passes `limit`."""

    __slots__ = ("limit", "over")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.over = False

    async def stream(self, content: Any) -> AsyncIterator[bytes]:
        sent = 0
        async for chunk in content.iter_any():
            sent += len(chunk)
            if sent > self.limit:
                self.over = True
                raise _TooLarge  # aiohttp aborts the upstream connection: no clean end of the body
            yield chunk


class _TooLarge(Exception):
    pass


class Passthrough:
    """The terminal of api "passthrough" (see the module docstring). The admission step is
    the one a middleware exposes as `admission` (the scheduler's); that middleware does not
    act on this API, so the terminal asks it directly."""

    def __init__(self, config: "Config", services: "Services", middlewares: Sequence[Any] = ()) -> None:
        self.routes = [_Route(r, config.server.max_body_bytes) for r in config.passthrough]
        self.max_json = config.server.max_body_bytes
        self.models = NameTable({m.name: m for m in config.models})  # exact names, then patterns
        self.services = services
        self.admission: Admission | None = next(
            (a for a in (getattr(mw, "admission", None) for mw in middlewares) if hasattr(a, "acquire")), None)

    async def __call__(self, ctx: Context) -> Reply:
        request = ctx.request
        assert request is not None, "the pass-through terminal needs the aiohttp request"
        raw_path = request.rel_url.raw_path
        route = next((r for r in self.routes if raw_path.startswith(r.prefix + "/")), None)
        if route is None:  # routed on the decoded path only (`/open%61i/...`)
            raise errors.not_found_path(ctx.path)
        rest = raw_path[len(route.prefix) + 1:]
        _check_rest(rest)
        record = ctx.record
        record.extra["passthrough"] = route.prefix
        record.deployment, record.provider = route.lane.id, route.provider
        query = request.rel_url.raw_query_string
        url = URL(f"{route.base}/{rest}" + (f"?{query}" if query else ""), encoded=True)
        headers = route.request_headers(ctx.headers)
        upload: _Upload | None = None
        model: Model | None = None
        data: Any = None
        if request.body_exists:
            if _is_json(ctx.headers.get("content-type")):
                data, model = await self._json_body(ctx, request)
            else:
                if request.content_length is not None and request.content_length > route.max_upload:
                    raise errors.too_large(route.max_upload)
                if request.content_length is not None and "content-encoding" not in ctx.headers:
                    headers["content-length"] = str(request.content_length)  # decoded bytes: else chunked
                upload = _Upload(route.max_upload)
                data = upload.stream(request.content)
        lease: Lease | None = None
        if self.admission is not None:
            lease = await self.admission.acquire(_admission_view(ctx, model), route.lane)
        resp: aiohttp.ClientResponse | None = None
        handed_over = False
        t0 = time.perf_counter()
        try:
            try:
                with ctx.trace("llmproxy.passthrough", {"llmproxy.passthrough.prefix": route.prefix}):
                    resp = await self.services.http.request(request.method, url, data=data, headers=headers,
                                                            timeout=route.timeout, allow_redirects=False)
            except (asyncio.TimeoutError, aiohttp.ServerTimeoutError):
                record.attempts.append(Attempt(route.lane.id, "timeout", time.perf_counter() - t0))
                raise errors.upstream_timeout(
                    f"The pass-through upstream did not answer within its timeout ({route.prefix}).") from None
            except (aiohttp.ClientError, OSError) as exc:
                if upload is not None and upload.over:
                    raise errors.too_large(route.max_upload) from None
                record.attempts.append(Attempt(route.lane.id, "connect_error", time.perf_counter() - t0))
                # The address and the cause are for the log, never for the client.
                log.warning("passthrough_upstream_failed", prefix=route.prefix, request_id=record.request_id,
                            error=f"{type(exc).__name__}: {exc}")
                raise errors.upstream_error(f"The pass-through upstream of {route.prefix} could not be reached.") \
                    from None
            status = resp.status
            record.attempts.append(_attempt(route, status, time.perf_counter() - t0))
            length = resp.content_length if "Content-Encoding" not in resp.headers else None
            ctype = resp.headers.get("Content-Type")
            sniff = _Sniff() if 200 <= status < 300 and ctype is not None and _is_json(ctype) and (
                length is None or length <= SNIFF_BYTES) else None
            out_headers = response_headers(list(resp.headers.items()))
            retry_after = resp.headers.get("Retry-After")
            if retry_after is not None:
                out_headers.append(("Retry-After", retry_after))
            relay = _Relay(ctx, resp, sniff)
            ctx.cleanups.append(_Finish(ctx, route, relay, lease))
            handed_over = True
            return Reply(status, out_headers, relay.body(), length)
        finally:
            if not handed_over:
                if resp is not None:
                    resp.close()
                if lease is not None:
                    lease.release(None)

    async def _json_body(self, ctx: Context, request: web.BaseRequest) -> tuple[bytes, "Model | None"]:
        """The JSON body, read and checked (step 2); the configured model it names, if any."""
        raw = await read_bounded(request, self.max_json)
        if not raw:
            return raw, None
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise errors.invalid_request(f"The request body is not valid JSON ({exc}).") from None
        if not isinstance(body, dict) or "model" not in body:
            return raw, None
        name = body["model"]
        if not isinstance(name, str) or not name:
            raise errors.invalid_request("'model' must be a non-empty string.", "model")
        record = ctx.record
        model = self.models.get(name)
        if model is not None:
            record.model = model.name  # a configured name (a pattern's for one it serves): a bounded label
        if model is None or model.name != name:
            record.requested_model = errors.shown(name)
        if not ctx.permits(name):
            denial = getattr(ctx.principal, "denial", None)
            message = denial(errors.shown(name)) if denial is not None else \
                f"This key is not allowed to use the model '{errors.shown(name)}'."
            raise errors.ProxyError(403, message, "permission_error", None, "model")
        try:
            return orjson.dumps(body), model
        except TypeError:  # nested deeper than orjson writes
            raise errors.invalid_request("The request body is nested too deeply.") from None


def _check_rest(rest: str) -> None:
    """Step 1: `rest` must stay a path under `api_base`."""
    segments = rest.split("/")
    last = len(segments) - 1
    for i, seg in enumerate(segments):
        text = unquote(seg)
        if text in (".", "..") or "/" in text or "\\" in text or (not seg and i != last) \
                or (i == 0 and _SCHEME.match(text)):
            raise errors.invalid_request(
                "A pass-through path must be a plain path under the route: no '.' or '..' segments, "
                "empty segments, encoded slashes or URLs.")


def _is_json(content_type: str | None) -> bool:
    """A JSON media type, or none at all (servers such as FastAPI read a body without one
    as JSON: it must be checked like one)."""
    if content_type is None:
        return True
    mime = content_type.partition(";")[0].strip().lower()
    return mime == "application/json" or (mime.startswith("application/") and mime.endswith("+json"))


def _admission_view(ctx: Context, model: "Model | None") -> Context:
    """The request as the admission step reads it: its caller and tracer, the configured
    model its body named (for the subscription's entry), and a body that asks for no output
    tokens, so that nothing is reserved of a token limit before the answer says what it used."""
    return Context("passthrough", ctx.path, ctx.headers, {"max_tokens": 0}, ctx.record, model=model,
                   principal=ctx.principal, tracer=ctx.tracer, started=ctx.started)


def _attempt(route: _Route, status: int, seconds: float) -> Attempt:
    return Attempt(route.lane.id, "ok" if status < 400 else f"http_{status}", seconds)


class _Sniff:
    """The copy of a small JSON answer, for its usage; dropped once past SNIFF_BYTES."""

    __slots__ = ("parts", "size")

    def __init__(self) -> None:
        self.parts: list[bytes] | None = []
        self.size = 0

    def add(self, chunk: bytes) -> None:
        if self.parts is not None:
            self.size += len(chunk)
            if self.size > SNIFF_BYTES:
                self.parts = None
            else:
                self.parts.append(chunk)

    def usage(self, provider: str) -> Usage | None:
        if not self.parts:
            return None
        try:
            body = orjson.loads(b"".join(self.parts))
        except orjson.JSONDecodeError:
            return None
        if not isinstance(body, dict) or not isinstance(body.get("usage"), dict):
            return None
        if provider == "anthropic":
            return anthropic_usage(body)
        usage = body["usage"]
        if "prompt_tokens" not in usage and "input_tokens" in usage:
            return _input_output_usage(usage)
        return openai_usage(body)


def _input_output_usage(usage: dict) -> Usage:
    """OpenAI's newer `usage` shape (Responses, images, audio): input and output tokens."""
    def count(value: Any) -> int:  # ints only, clamped as `usage` clamps
        return min(value, MAX_TOKENS) if type(value) is int and value > 0 else 0

    details = usage.get("input_tokens_details")
    out_details = usage.get("output_tokens_details")
    return Usage(prompt_tokens=count(usage.get("input_tokens")), completion_tokens=count(usage.get("output_tokens")),
                 cached_tokens=count(details.get("cached_tokens")) if isinstance(details, dict) else 0,
                 reasoning_tokens=count(out_details.get("reasoning_tokens")) if isinstance(out_details, dict) else 0)


class _Relay:
    """The upstream answer's body, chunk by chunk as it arrives (step 5)."""

    __slots__ = ("ctx", "resp", "sniff", "done")

    def __init__(self, ctx: Context, resp: aiohttp.ClientResponse, sniff: _Sniff | None) -> None:
        self.ctx, self.resp, self.sniff = ctx, resp, sniff
        self.done = False

    async def body(self) -> AsyncIterator[bytes]:
        record = self.ctx.record
        sniff = self.sniff
        first = True
        try:
            async for chunk in self.resp.content.iter_any():
                if first:
                    record.ttfb_s = time.perf_counter() - self.ctx.started
                    first = False
                if sniff is not None:
                    sniff.add(chunk)
                yield chunk
            self.done = True
        except (aiohttp.ClientError, ConnectionError, TimeoutError) as exc:
            record.status, record.error_type, record.error_code = 502, "api_error", "upstream_cut"
            log.warning("passthrough_upstream_cut", request_id=record.request_id, error=f"{type(exc).__name__}: {exc}")
            raise BodyCut from None


class _Finish:
    """Runs once when the request ends (step 6)."""

    __slots__ = ("ctx", "route", "relay", "lease")

    def __init__(self, ctx: Context, route: _Route, relay: _Relay, lease: "Lease | None") -> None:
        self.ctx, self.route, self.relay, self.lease = ctx, route, relay, lease

    def __call__(self) -> None:
        relay = self.relay
        if relay.done:
            relay.resp.release()  # read to its end: the connection goes back to the pool
        else:
            relay.resp.close()
        usage = relay.sniff.usage(self.route.provider) if relay.done and relay.sniff is not None else None
        record = self.ctx.record
        if usage is not None:
            record.prompt_tokens, record.completion_tokens = usage.prompt_tokens, usage.completion_tokens
            record.cached_tokens, record.cache_creation_tokens = usage.cached_tokens, usage.cache_creation_tokens
            record.reasoning_tokens = usage.reasoning_tokens
        if self.lease is not None:
            self.lease.release(usage or Usage())  # the request went upstream: it stays counted
