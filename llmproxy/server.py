"""The aiohttp application: routes, the per-request context, the chains, and the writer.

One chain per API is composed once at start (`llmproxy.pipeline`: the middlewares in
config order with the built-in stages among them, a terminal last). Every request gets
its context and record here and goes through its API's chain, whatever it sends; the
writer (`Gateway._write`) is the only code that touches aiohttp's response; its
`finally` closes the reply body, runs `ctx.cleanups` and emits the record exactly once.
"""

from __future__ import annotations

import asyncio
import functools
import os
import time
from typing import TYPE_CHECKING, Any, AsyncIterator, Awaitable

import aiohttp
import orjson
import structlog
from aiohttp import web

from . import __version__, tokenizer
from .admin import Admin
from .context import ALL_APIS, BodyCut, Context, Next, Record, Reply
from .errors import ProxyError
from .forwarder import Forwarder
from .invalidation import Invalidator
from .metrics import CONTENT_TYPE, Metrics
from .passthrough import Passthrough, register as register_passthrough
from .pipeline import LimitsReport, MasterGate, ModelList, ReadBody, Route, TokenCount, chain_for
from .plugins import Registry, check_config
from .router import DeploymentState, Router
from .services import Services, open_redis
from .store import open_store
from .validate import client_key, parse_traceparent

if TYPE_CHECKING:
    from .config import Config

log = structlog.get_logger("llmproxy.server")

API_PATHS = {
    "chat": ("/v1/chat/completions", "/chat/completions"),
    "completions": ("/v1/completions", "/completions"),
    "embeddings": ("/v1/embeddings", "/embeddings"),
    "messages": ("/v1/messages", "/messages"),
    "responses": ("/v1/responses", "/responses"),
    "count_tokens": ("/v1/messages/count_tokens", "/messages/count_tokens"),
    "input_tokens": ("/v1/responses/input_tokens", "/responses/input_tokens"),
}
_JSON = "application/json"


class Gateway:
    """Everything one process needs to serve: built from a checked config."""

    def __init__(self, config: "Config", registry: Registry | None = None,
                 services: Services | None = None) -> None:
        self.config = config
        self.registry = registry or Registry.from_entry_points()
        checked = check_config(config, self.registry)
        self.services = services or Services(config=config, metrics=Metrics(config.metrics.team_label))
        s = self.services
        if s.registry is None:
            s.registry = self.registry
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
        self.max_body = config.server.max_body_bytes
        self.admin = Admin(self)
        self.chains: dict[str, Next] = self._compose()
        self.sinks: list[Any] = [cls(opts, s) for cls, opts in self._sink_classes()]
        self.sinks += [_start(spec.path, cls, opts, s) for spec, cls, opts in checked.sink_options]
        self.draining = False
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

    def _compose(self) -> dict[str, Next]:
        """One chain per API (see `llmproxy.pipeline`)."""
        mws = self.middlewares
        gate = MasterGate(self.config.master_key) if self.config.master_key else None
        hooks = [mw.routed for mw in mws if getattr(mw, "stage", None) == "identity" and hasattr(mw, "routed")]
        read, route = ReadBody(self.max_body), Route(self.models, self.router, hooks)
        describers = [mw for mw in mws if hasattr(mw, "describe_limits")]
        counter = TokenCount(self.forwarder, self.router)
        terminals = {"models": ModelList(self.config, self.router), "limits": LimitsReport(self.config, describers),
                     "count_tokens": counter, "input_tokens": counter,
                     "admin": self.admin, "passthrough": Passthrough(self.config, self.services, mws)}
        return {api: chain_for(api, mws, terminal=terminals.get(api, self.forwarder), gate=gate, read=read,
                               route=route)
                for api in ALL_APIS}

    # --- lifecycle --------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.max_body, handler_args={"max_field_size": 16384})
        for api, paths in API_PATHS.items():
            handler = self._handler(api)
            for path in paths:
                app.router.add_post(path, handler)
        for path in ("/v1/models", "/models", "/v1/models/{model_id:.+}", "/models/{model_id:.+}"):
            app.router.add_get(path, self._handler("models"))
        for path in ("/v1/limits", "/limits"):
            app.router.add_get(path, self._handler("limits"))
        app.router.add_get("/", self.root)  # and HEAD: clients probe the base URL
        app.router.add_get("/health", self.liveliness)
        app.router.add_get("/health/liveliness", self.liveliness)
        app.router.add_get("/health/liveness", self.liveliness)
        app.router.add_get("/health/readiness", self.readiness)
        app.router.add_get("/metrics", self.metrics)
        self.admin.register(app)  # the admin API here, unless server.admin_port serves it alone
        register_passthrough(app, self.config.passthrough, self._handler("passthrough"))  # {prefix}/..., any method
        app.router.add_route("*", "/{tail:.*}", self.unknown)
        app.on_startup.append(self._startup)
        app.on_cleanup.append(self._cleanup)
        return app

    async def _startup(self, app: web.Application) -> None:
        try:
            await self._start()
        except BaseException:  # a failed start (the database, say) leaves nothing open behind it
            await self._cleanup(app)
            raise

    async def _start(self) -> None:
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
        """Stop what started; safe after a start that failed half way (and twice)."""
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
            self._owns_redis = False

    # --- operations endpoints -----------------------------------------------------------

    async def root(self, request: web.Request) -> web.Response:
        return web.json_response({"name": "llmproxy", "version": __version__, "status": "ok"})

    async def liveliness(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readiness(self, request: web.Request) -> web.Response:
        # Dependencies are shown, but only draining or a failed start makes this replica
        # unready: with the database or Redis down it keeps serving (cached keys, local
        # limits), and taking every replica out of rotation at once would serve no one.
        state: dict[str, Any] = dict(self.services.readiness)
        ready = not self.draining and state.get("config") == "ok"
        state["status"] = "ready" if ready else ("draining" if self.draining else "not_ready")
        details = {}
        for part in self.middlewares + self.sinks:  # a part may say more: the spend log, the scheduler
            health = getattr(part, "health", None)
            if health is not None:
                try:
                    details.update(health())
                except Exception:
                    log.exception("health_failed", part=type(part).__name__)
        if details:
            state["details"] = details
        return web.Response(body=orjson.dumps(state), status=200 if ready else 503, content_type=_JSON)

    async def metrics(self, request: web.Request) -> web.Response:
        body = self.services.metrics.exposition()
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})

    async def unknown(self, request: web.Request) -> web.StreamResponse:
        return await self.serve(request, "unknown")

    # --- the data plane -------------------------------------------------------------------

    def _handler(self, api: str):
        return functools.partial(self.serve, api=api)

    async def serve(self, request: web.Request, api: str) -> web.StreamResponse:
        started = time.perf_counter()
        headers = request.headers
        client_rid = _client_request_id(headers.get("x-request-id"))
        self._seq += 1
        rid = f"{self._rid_prefix}{self._seq:08x}"
        record = Record(rid, client_rid, api, request.path, time.time())
        if "traceparent" in headers:  # the client's trace, when it is a W3C one (else none)
            client_trace = parse_traceparent(headers.get("traceparent"))
            if client_trace is not None:
                record.trace_id = f"{client_trace[0]:032x}"
        ctx = Context(api, request.path, headers, None, record, api_key=client_key(headers), started=started,
                      request=request)
        self.inflight += 1
        reply: Reply | None = None
        err_api = "messages" if api in ("messages", "count_tokens") or (
            api in ("models", "passthrough", "unknown") and "anthropic-version" in headers) else "chat"
        try:
            try:
                reply = await self.chains[api](ctx)
            except ProxyError as exc:
                reply = _error_reply(exc, err_api)
                record.error_type, record.error_code = exc.type, exc.code
            except Exception:
                # A bug (ours or a plugin's), never the client's fault: a 500 in the API's shape,
                # logged with its traceback, and counted as such.
                log.exception("request_failed", request_id=rid, trace_id=record.trace_id, path=request.path)
                exc = ProxyError(500, "The proxy failed to handle this request.", "api_error", "internal_error")
                reply = _error_reply(exc, err_api)
                record.error_type, record.error_code = exc.type, exc.code
            return await self._write(request, reply, record)
        except asyncio.CancelledError:
            if self.draining:  # cut by the shutdown's graceful_timeout, not by the client
                record.error_type, record.error_code = "api_error", "server_shutdown"
                if record.status == 0:
                    record.status = 503
            else:
                record.client_disconnected = True
            raise
        finally:
            self.inflight -= 1
            for cleanup in reversed(ctx.cleanups):  # innermost first, like a stack of finally blocks
                try:
                    cleanup()
                except Exception:
                    log.exception("cleanup_failed", request_id=rid)
            # A cleanup holds the context it cleans up (the forwarder's `_Finish`): dropped now,
            # the request's objects go with their last reference, not with the next GC pass.
            ctx.cleanups.clear()
            ctx.tracer = None  # likewise the tracer, which holds the context it traces
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

    async def _write(self, request: web.Request, reply: Reply, record: Record) -> web.StreamResponse:
        headers = reply.headers
        rid = record.client_request_id or record.request_id
        body = reply.body
        record.status = reply.status if record.status == 0 else record.status
        if isinstance(body, (bytes, bytearray)):
            resp = web.Response(status=reply.status, body=body)
            for name, value in headers:
                resp.headers.add(name, value)
            resp.headers["x-request-id"] = resp.headers["request-id"] = rid
            return resp
        resp = web.StreamResponse(status=reply.status)
        for name, value in headers:
            resp.headers.add(name, value)
        resp.headers["x-request-id"] = resp.headers["request-id"] = rid  # request-id: Anthropic's name
        if reply.content_length is not None:
            resp.content_length = reply.content_length
        try:
            try:
                await _to_client(resp.prepare(request))
                async for chunk in body:
                    await _to_client(resp.write(chunk))
                await _to_client(resp.write_eof())
            except _ClientGone:  # the client went away while we wrote (a reset, a closed socket)
                record.client_disconnected = True
        except BodyCut:  # the answer cannot be finished: the client sees the connection close
            if request.transport is not None:
                request.transport.close()
        finally:
            aclose = getattr(body, "aclose", None)
            if aclose is not None:
                try:
                    await aclose()
                except Exception:
                    log.exception("body_close_failed", request_id=record.request_id)
        return resp

class _ClientGone(Exception):
    """Writing to the client failed: only the writes say so, never an error from the body."""


async def _to_client(write: Awaitable[Any]) -> Any:
    try:
        return await write
    except ConnectionError:
        raise _ClientGone from None


def _start(path: str, cls: type, options: Any, services: Services) -> Any:
    """Construct a plugin; a failure is a config error naming it, not a traceback at start."""
    from .config import ConfigError

    try:
        return cls(options, services)
    except Exception as exc:
        raise ConfigError(f"{path}: failed to start: {type(exc).__name__}: {exc}") from exc


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
