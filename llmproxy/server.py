"""The aiohttp application: routes, the per-request context, the chain, and the writer.

The chain is composed once at start (middlewares in config order, the forwarder last).
The writer (`Gateway._write`) is the only code that touches aiohttp's response; its
`finally` closes the reply body, runs `ctx.cleanups` and emits the record exactly once.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import os
import time
from typing import TYPE_CHECKING, Any, AsyncIterator

import aiohttp
import orjson
import structlog
from aiohttp import web

from . import errors, tokenizer
from .admin import Admin
from .context import Context, Next, Record, Reply
from .errors import ProxyError
from .forwarder import Forwarder
from .metrics import CONTENT_TYPE, Metrics
from .plugins import Registry, check_config
from .router import DeploymentState, Router
from .services import Services, open_redis
from .invalidation import Invalidator
from .store import open_store
from .validate import client_key, validate_body

if TYPE_CHECKING:
    from .config import Config

log = structlog.get_logger("llmproxy.server")

API_PATHS = {
    "chat": ("/v1/chat/completions", "/chat/completions"),
    "completions": ("/v1/completions", "/completions"),
    "embeddings": ("/v1/embeddings", "/embeddings"),
    "messages": ("/v1/messages", "/messages"),
}
_JSON = "application/json"
_API_NAMES = {"chat": "OpenAI Chat Completions", "completions": "OpenAI Completions",
              "embeddings": "OpenAI Embeddings", "messages": "Anthropic Messages"}
_ENDPOINT = {"chat": "/v1/chat/completions", "completions": "/v1/completions",
             "embeddings": "/v1/embeddings", "messages": "/v1/messages"}


class Gateway:
    """Everything one process needs to serve: built from a checked config."""

    def __init__(self, config: "Config", registry: Registry | None = None,
                 services: Services | None = None) -> None:
        self.config = config
        self.registry = registry or Registry.from_entry_points()
        checked = check_config(config, self.registry)
        self.services = services or Services(config=config, metrics=Metrics(config.metrics.team_label))
        s = self.services
        self.models = {m.name: m for m in config.models}
        states: dict[str, list[DeploymentState]] = {}
        for model in config.models:
            states[model.name] = []
            for dep in model.deployments:
                cls = self.registry.provider(dep.provider, f"models[{model.name}]")
                provider = cls(dep, checked.deployment_options.get(dep.id), s)
                states[model.name].append(DeploymentState(dep, provider, model))
        self.router = Router(states, s.clock)
        self.forwarder = Forwarder(self.router, config.router, s)
        self.middlewares: list[Any] = []
        for spec, cls, options in checked.middleware_options:
            self.middlewares.append(_start(spec.path, cls, options, s))
        self.master_gate = bool(config.master_key) and not any(
            spec.name == "auth" for spec, _, _ in checked.middleware_options)
        self.chain: Next = self._compose()
        self.sinks: list[Any] = [cls(opts, s) for cls, opts in self._sink_classes()]
        self.sinks += [_start(spec.path, cls, opts, s) for spec, cls, opts in checked.sink_options]
        self.draining = False
        self.max_body = config.server.max_body_bytes
        # Request ids: a random per-process prefix and a counter, unique across replicas and
        # restarts without a random draw (a system call) per request.
        self._rid_prefix = os.urandom(8).hex()
        self.inflight = 0  # read by the llmproxy_inflight_requests gauge at scrape time
        self.services.metrics.gauge_from("llmproxy_inflight_requests", lambda: self.inflight)
        self._owns_store = self._owns_redis = False
        self._seq = 0

    def _sink_classes(self) -> list[tuple[type, Any]]:
        """The built-in sinks, through the entry points like any plugin; a registry built by
        hand for tests or embedding may lack them, and then gets them directly."""
        from .accesslog import AccessLog
        from .metrics import MetricsSink
        from .spend import SpendWriter

        builtin = {"metrics": MetricsSink, "access_log": AccessLog, "spend_log": SpendWriter}
        names = ["metrics"] + (["spend_log"] if self.config.spend.enabled else []) + \
            (["access_log"] if self.config.server.access_log else [])
        return [(self.registry.event_sink(n, "event_sinks") if n in self.registry.event_sinks else builtin[n], None)
                for n in names]

    def _compose(self) -> Next:
        handler: Next = self._terminal
        for mw in reversed(self.middlewares):
            handler = _bind(mw, handler)
        return handler

    async def _terminal(self, ctx: Context) -> Reply:
        if ctx.api == "models":
            return self._models_reply(ctx)
        return await self.forwarder(ctx)

    # --- lifecycle --------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.max_body, handler_args={"max_field_size": 16384})
        for api, paths in API_PATHS.items():
            handler = self._handler(api)
            for path in paths:
                app.router.add_post(path, handler)
        for path in ("/v1/models", "/models"):
            app.router.add_get(path, self._handler("models"))
        app.router.add_get("/health/liveliness", self.liveliness)
        app.router.add_get("/health/liveness", self.liveliness)
        app.router.add_get("/health/readiness", self.readiness)
        app.router.add_get("/metrics", self.metrics)
        Admin(self).register(app)  # the admin API here, unless server.admin_port serves it alone
        app.router.add_route("*", "/{tail:.*}", self.unknown)
        app.on_startup.append(self._startup)
        app.on_cleanup.append(self._cleanup)
        return app

    async def _startup(self, app: web.Application) -> None:
        if self.services.http is None:
            connector = aiohttp.TCPConnector(limit=0, limit_per_host=0, ttl_dns_cache=300,
                                             keepalive_timeout=30, enable_cleanup_closed=True)
            self.services.http = aiohttp.ClientSession(
                connector=connector, auto_decompress=True,
                timeout=aiohttp.ClientTimeout(total=None))
        await asyncio.get_running_loop().run_in_executor(None, tokenizer.warm)
        s = self.services
        if s.store is None:
            s.store = await open_store(self.config.database_url, sqlite_path=self.config.database.sqlite_path,
                                       statement_cache=self.config.database.statement_cache)
            self._owns_store = True
            applied = await s.store.migrate()
            if applied:
                log.info("migrated", versions=applied)
        s.readiness["database"] = "ok"
        if s.redis is None and self.config.redis_url:
            s.redis = open_redis(self.config.redis_url)
            self._owns_redis = True
        if s.redis is not None:
            try:
                await s.redis.ping()
                s.readiness["redis"] = "ok"
            except Exception as exc:  # Redis may come later; limits fall back meanwhile
                s.readiness["redis"] = "unreachable"
                log.warning("redis_unreachable", error=f"{type(exc).__name__}: {exc}")
        if s.invalidator is None:
            s.invalidator = Invalidator(s.redis)
        await s.invalidator.start()
        for part in self.middlewares + self.sinks:
            start = getattr(part, "startup", None)
            if start is not None:
                await start()
        self.services.readiness["config"] = "ok"

    async def _cleanup(self, app: web.Application) -> None:
        for part in reversed(self.middlewares + self.sinks):
            stop = getattr(part, "shutdown", None)
            if stop is not None:
                try:
                    await stop()
                except Exception:
                    log.exception("shutdown_failed", part=type(part).__name__)
        if self.services.invalidator is not None:
            await self.services.invalidator.stop()
        if self.services.http is not None:
            await self.services.http.close()
        if self._owns_store and self.services.store is not None:
            await self.services.store.close()
        if self._owns_redis and self.services.redis is not None:
            await self.services.redis.aclose()

    # --- operations endpoints -----------------------------------------------------------

    async def liveliness(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readiness(self, request: web.Request) -> web.Response:
        # Dependencies are shown, but only draining or a failed start makes this replica
        # unready: with the database or Redis down it keeps serving (cached keys, local
        # limits), and taking every replica out of rotation at once would serve no one.
        state = dict(self.services.readiness)
        ready = not self.draining and state.get("config") == "ok"
        state["status"] = "ready" if ready else ("draining" if self.draining else "not_ready")
        return web.Response(body=orjson.dumps(state), status=200 if ready else 503, content_type=_JSON)

    async def metrics(self, request: web.Request) -> web.Response:
        body = self.services.metrics.exposition()
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})

    async def unknown(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, "unknown")

    # --- the data plane -------------------------------------------------------------------

    def _handler(self, api: str):
        return functools.partial(self._serve, api=api)

    async def _serve(self, request: web.Request, api: str) -> web.StreamResponse:
        started = time.perf_counter()
        headers = request.headers
        client_rid = _client_request_id(headers.get("x-request-id"))
        self._seq += 1
        rid = f"{self._rid_prefix}{self._seq:08x}"
        record = Record(rid, client_rid, api, request.path, time.time())
        tp = headers.get("traceparent")
        if tp and len(tp) >= 55:
            record.trace_id = tp[3:35]
        ctx: Context | None = None
        self.inflight += 1
        reply: Reply | None = None
        err_api = "messages" if api == "messages" or (api in ("models", "unknown") and "anthropic-version" in headers) \
            else "chat"
        try:
            try:
                ctx = await self._context(request, api, record, started)
                reply = await self.chain(ctx)
            except ProxyError as exc:
                reply = _error_reply(exc, err_api)
                record.error_type, record.error_code = exc.type, exc.code
            except Exception:
                # A bug (ours or a plugin's), never the client's fault: a 500 in the API's shape,
                # logged with its traceback, and counted as such.
                log.exception("request_failed", request_id=rid, path=request.path)
                exc = ProxyError(500, "The proxy failed to handle this request.", "api_error", "internal_error")
                reply = _error_reply(exc, err_api)
                record.error_type, record.error_code = exc.type, exc.code
            return await self._write(request, reply, record)
        except asyncio.CancelledError:
            record.client_disconnected = True
            raise
        finally:
            self.inflight -= 1
            if ctx is not None:
                for cleanup in reversed(ctx.cleanups):  # innermost first, like a stack of finally blocks
                    try:
                        cleanup()
                    except Exception:
                        log.exception("cleanup_failed", request_id=rid)
            if record.client_disconnected:
                record.status = 499
            elif record.status == 0:
                record.status = reply.status if reply is not None else 500
            record.duration_s = time.perf_counter() - started
            for sink in self.sinks:
                try:
                    sink.emit(record)
                except Exception:
                    log.exception("event_sink_failed", sink=type(sink).__name__, request_id=rid)

    async def _context(self, request: web.Request, api: str, record: Record, started: float) -> Context:
        headers = request.headers
        if api == "unknown":
            raise errors.not_found_path(request.path)
        key = client_key(headers)
        if self.master_gate and (key is None or not hmac.compare_digest(
                key.encode(), self.config.master_key.encode())):
            raise errors.unauthorized()
        if api == "models":
            return Context(api, request.path, headers, {}, record, api_key=key, started=started)
        if request.content_length is not None and request.content_length > self.max_body:
            raise errors.too_large(self.max_body)
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise errors.too_large(self.max_body) from None
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise errors.invalid_request(f"The request body is not valid JSON ({exc}).") from None
        if raw.count(b"[") + raw.count(b"{") > MAX_DEPTH and _depth(body) > MAX_DEPTH:
            raise errors.invalid_request(f"The request body is nested more than {MAX_DEPTH} levels deep.")
        validate_body(api, body)
        name = body["model"]
        record.model = name
        model = self.models.get(name)
        if model is None:
            raise errors.model_not_found(name)
        if not self.router.serves(name, api):
            raise errors.invalid_request(
                f"The model '{name}' is not served through the {_API_NAMES[api]} API; its deployments speak "
                f"another API (use {self._endpoint_for(name)}).", "model")
        stream = body.get("stream") is True and api != "embeddings"
        record.stream = stream
        return Context(api, request.path, headers, body, record, model=model, stream=stream, api_key=key,
                       started=started)

    def _endpoint_for(self, model: str) -> str:
        for api, path in _ENDPOINT.items():
            if self.router.serves(model, api):
                return path
        return "another endpoint"

    async def _write(self, request: web.Request, reply: Reply, record: Record) -> web.StreamResponse:
        headers = reply.headers
        rid = record.client_request_id or record.request_id
        body = reply.body
        record.status = reply.status if record.status == 0 else record.status
        if isinstance(body, (bytes, bytearray)):
            resp = web.Response(status=reply.status, body=body)
            for name, value in headers:
                resp.headers.add(name, value)
            resp.headers["x-request-id"] = rid
            return resp
        resp = web.StreamResponse(status=reply.status)
        for name, value in headers:
            resp.headers.add(name, value)
        resp.headers["x-request-id"] = rid
        if reply.content_length is not None:
            resp.content_length = reply.content_length
        try:
            await resp.prepare(request)
            async for chunk in body:
                await resp.write(chunk)
            await resp.write_eof()
        finally:
            aclose = getattr(body, "aclose", None)
            if aclose is not None:
                try:
                    await aclose()
                except Exception:
                    log.exception("body_close_failed", request_id=record.request_id)
        return resp

    # --- /v1/models --------------------------------------------------------------------

    def _models_reply(self, ctx: Context) -> Reply:
        allowed = getattr(ctx.principal, "allows_model", None)
        names = [m.name for m in self.config.models if allowed is None or allowed(m.name)]
        created = 1700000000
        if "anthropic-version" in ctx.headers:
            data = [{"type": "model", "id": n, "display_name": n, "created_at": "2023-11-14T22:13:20Z"}
                    for n in names]
            body = {"data": data, "has_more": False, "first_id": names[0] if names else None,
                    "last_id": names[-1] if names else None}
        else:
            body = {"object": "list",
                    "data": [{"id": n, "object": "model", "created": created, "owned_by": "llmproxy"}
                             for n in names]}
        return Reply(200, [("Content-Type", _JSON)], orjson.dumps(body))


MAX_DEPTH = 200  # orjson writes at most 255 levels; deeper bodies could not be forwarded


def _depth(value: Any) -> int:
    """Nesting depth of a parsed JSON value, iteratively (no recursion limit to hit)."""
    deepest = 0
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            item = item.values()
        elif not isinstance(item, list):
            continue
        deepest = max(deepest, depth)
        stack.extend((child, depth + 1) for child in item if isinstance(child, (dict, list)))
    return deepest


def _start(path: str, cls: type, options: Any, services: Services) -> Any:
    """Construct a plugin; a failure is a config error naming it, not a traceback at start."""
    from .config import ConfigError

    try:
        return cls(options, services)
    except Exception as exc:
        raise ConfigError(f"{path}: failed to start: {type(exc).__name__}: {exc}") from exc


def _bind(mw: Any, nxt: Next) -> Next:
    async def call(ctx: Context) -> Reply:
        return await mw(ctx, nxt)
    return call


def _error_reply(exc: ProxyError, api: str) -> Reply:
    headers = [("Content-Type", _JSON)] + list(exc.headers.items())
    return Reply(exc.status, headers, exc.body(api))


def _client_request_id(value: str | None) -> str | None:
    """A client's `x-request-id` is echoed and stored only when it is short and printable."""
    if not value or len(value) > 128 or not value.isprintable():
        return None
    return value


async def collect(body: bytes | AsyncIterator[bytes]) -> bytes:
    if isinstance(body, (bytes, bytearray)):
        return bytes(body)
    return b"".join([c async for c in body])
