"""The `subscription` middleware (SPEC §6): the team's subscription decides whether its
keys are served, which models they may use, their rate limits per model and a budget.

An identity middleware listed after `auth` (it needs the caller's team): it runs before
the body is read, so a disabled subscription is a 403 before any work is spent. For a
key of a team, per request:

1. The team's subscription (`SubscriptionInfo`, or "none") from the local cache while it
   is younger than `ttl`; else from Redis (`redis_url`: one copy shared by the replicas);
   else from the source (`source`: an entry point of `llmproxy.subscription_sources`,
   `db` by default, `http` built in; `sources`). Concurrent lookups of one team share
   one call. "None" is cached like any answer.
2. The source failing (an error, or no answer within `timeout`): the last good answer,
   local or in Redis, is served for `stale_if_error` seconds past its `ttl`; after that,
   503. A failure is never cached: a source that is down locks nobody out while it has
   a good answer to serve, and never turns one into a denial. For a second after a
   failure the source is not asked again (a hung source slows no request beyond one
   `timeout`).
3. No subscription: served as before (`required: true` refuses it, 403). Disabled: 403
   `permission_error` saying so (`GET /v1/limits` still answers, to say why).
4. Otherwise the caller's principal gets the subscription: its models narrow the key's
   and team's (the route stage's 403 says the subscription excludes it, and the
   forwarder skips fallbacks it excludes); its budget joins the key's and team's
   (auth's reservation, the same counters and overshoot bound: the principal's
   `with_subscription`, since no middleware package imports another);
   its `limits` are taken by the scheduler (per model, or `"*"`) with the key's and
   team's, so the tightest holds.

A change through the admin API (`/subscription/new|update|delete`, a team deleted)
drops the Redis copy and is published on `services.invalidator`: every replica drops
its own within a second (Redis pub/sub), and always within `ttl` (a lost message).
`POST /subscription/refresh` reads one team from its source at once (`refresh_subscription`): for an
`http` source whose system of record changed.
"""

from __future__ import annotations

import asyncio
import math
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, Mapping

import orjson
import structlog

from llmproxy.config import ConfigError, build
from llmproxy.context import BODY_APIS
from llmproxy.errors import ProxyError
from llmproxy.store import SubscriptionInfo

from .sources import DbSource, HttpSource, SourceError, subscription_of

if TYPE_CHECKING:
    from llmproxy.context import Context, Next, Reply
    from llmproxy.services import Services

__all__ = ["DbSource", "HttpSource", "Options", "SourceError", "Subscription", "subscription_json",
           "subscription_of"]

log = structlog.get_logger("llmproxy.subscription")

LOOKUPS = "llmproxy_subscription_lookups_total"
_OUTAGE_BACKOFF = 1.0  # seconds without asking a source that just failed
_DERIVED_MAX = 4096  # principals remembered per team (the auth cache's are shared objects)


@dataclass(frozen=True)
class Options:
    source: str = field(default="db", metadata={"min_len": 1})  # a llmproxy.subscription_sources name
    ttl: float = field(default=60.0, metadata={"gt": 0})  # seconds an answer is used without asking again
    stale_if_error: float = field(default=600.0, metadata={"min": 0})  # seconds past ttl a good answer outlives a failing source
    timeout: float = field(default=5.0, metadata={"gt": 0})  # seconds a source lookup may take in all
    required: bool = False  # a key without a team, or a team without a subscription, gets 403
    cache_size: int = field(default=100_000, metadata={"min": 1})  # teams held in this process
    redis_prefix: str = field(default="llmproxy:subscription:", metadata={"min_len": 1})
    source_options: Mapping[str, Any] = field(default_factory=dict, metadata={"extra": True})  # the source's own keys


def subscription_json(sub: SubscriptionInfo) -> dict[str, Any]:
    """A subscription as JSON (the Redis copy and the admin views)."""
    return {
        "subscription_id": sub.subscription_id, "team_id": sub.team_id, "enabled": sub.enabled,
        "models": list(sub.models), "limits": sub.limits,
        "max_budget": None if sub.max_budget is None else float(sub.max_budget),
        "budget_duration": sub.budget_duration, "metadata": sub.metadata,
        "created_at": None if sub.created_at is None else sub.created_at.isoformat(),
        "updated_at": None if sub.updated_at is None else sub.updated_at.isoformat(),
    }


def _from_json(data: dict[str, Any]) -> SubscriptionInfo:
    fields = dict(data)
    for name in ("created_at", "updated_at"):
        if fields.get(name) is not None:
            fields[name] = datetime.fromisoformat(fields[name])
    if fields.get("max_budget") is not None:
        fields["max_budget"] = repr(fields["max_budget"])  # the float's shortest form, exactly
    return SubscriptionInfo(**fields)


class _Entry:
    """One team's answer: `sub` (None: no subscription) as of `fetched` (services.clock);
    `valid` False once invalidated (still a last good answer while the source is down)."""

    __slots__ = ("sub", "fetched", "valid", "derived")

    def __init__(self, sub: SubscriptionInfo | None, fetched: float) -> None:
        self.sub = sub
        self.fetched = fetched
        self.valid = True
        self.derived: dict[int, tuple[Any, Any]] = {}

    def principal(self, base: Any) -> Any:
        """`base` under this subscription, made once per principal object (auth's are
        shared by every request of a key until its cache entry is refreshed): by the
        principal's own `with_subscription` (auth's: models, budget), else wrapped (models
        and limits; the budget needs auth's ledger)."""
        found = self.derived.get(id(base))
        if found is not None and found[0] is base:
            return found[1]
        derive = getattr(base, "with_subscription", None)
        derived = derive(self.sub) if derive is not None else _Subscribed(base, self.sub)
        if len(self.derived) >= _DERIVED_MAX:
            self.derived.clear()
        self.derived[id(base)] = (base, derived)
        return derived


class _Subscribed:
    """A principal that is no dataclass, with the subscription's model check added."""

    def __init__(self, base: Any, sub: SubscriptionInfo) -> None:
        self._base = base
        self.subscription = sub

    def __getattr__(self, name: str) -> Any:
        return getattr(self._base, name)

    def allows_model(self, name: str) -> bool:
        return self.subscription.allows_model(name) and self._base.allows_model(name)


class Subscription:
    """Middleware `subscription` (see the module docstring)."""

    Options = Options
    stage = "identity"
    apis = BODY_APIS | {"models", "limits"}

    def __init__(self, options: Options | None, services: "Services") -> None:
        self.options = options = options or Options()
        self.services = services
        cls, source_options = _source(options, services.registry)
        self.source = cls(source_options, services)
        self.source_name = options.source
        self._cache: OrderedDict[str, _Entry] = OrderedDict()
        self._inflight: dict[str, asyncio.Task] = {}
        self._generation = 0
        self._down_until = -math.inf
        self._outage = False
        self._redis_outage = False
        self.metrics = services.metrics
        self.metrics.define(LOOKUPS, "counter", "Subscription lookups by where the answer came from "
                            "(cache, redis, source, stale, error).", ("source",))

    @staticmethod
    def check_config(options: Options, config: Any, registry: Any = None) -> list[str]:
        """`check-config` and the start: the source is installed and takes these options,
        and an identity middleware (auth) is listed before (a subscription belongs to the
        caller's team, which it finds)."""
        problems = []
        registry = registry if registry is not None else _registry()
        try:
            _source(options, registry)
        except ConfigError as exc:
            problems += [m.split("subscription.", 1)[-1] for m in exc.messages]
        names = [m.name for m in config.middlewares]
        before = names[:names.index("subscription")] if "subscription" in names else []
        if not any(getattr(registry.middlewares.get(n) and _loaded(registry, n), "stage", None) == "identity"
                   for n in before):
            problems.append("source: needs the auth middleware (or another identity middleware) listed before "
                            "it: a subscription belongs to the caller's team, which that finds")
        return problems

    async def startup(self) -> None:
        if self.services.invalidator is not None:
            self.services.invalidator.subscribe(self.invalidate)

    async def shutdown(self) -> None:
        for task in list(self._inflight.values()):
            task.cancel()

    # -- the hook

    async def __call__(self, ctx: "Context", call_next: "Next") -> "Reply":
        principal = ctx.principal
        team_id = principal.team_id if principal is not None and not principal.is_master else None
        if team_id is None:
            if self.options.required and principal is not None and not principal.is_master:
                raise ProxyError(403, "This key belongs to no team, and this gateway serves only teams with a "
                                      "subscription.", "permission_error", "no_subscription")
            return await call_next(ctx)
        entry = self._fresh(team_id)
        if entry is None:
            if ctx.tracer is None:
                entry = await self.lookup(team_id, principal.key_id, principal.user_id)
            else:
                with ctx.trace("llmproxy.subscription"):
                    entry = await self.lookup(team_id, principal.key_id, principal.user_id)
        sub = entry.sub
        if sub is None:
            if self.options.required:
                raise ProxyError(403, "This key's team has no subscription.", "permission_error", "no_subscription")
            return await call_next(ctx)
        if not sub.enabled and ctx.api != "limits":
            raise ProxyError(403, "This team's subscription is disabled.", "permission_error",
                             "subscription_disabled")
        ctx.principal = entry.principal(principal)
        return await call_next(ctx)

    async def describe_limits(self, ctx: "Context", report: dict[str, Any]) -> None:
        """`GET /v1/limits`: the caller's subscription, as the admin API shows it."""
        sub = getattr(ctx.principal, "subscription", None)
        if sub is not None:
            view = subscription_json(sub)
            del view["metadata"]  # the operator's, not the caller's
            report["subscription"] = view

    # -- the cache

    def _fresh(self, team_id: str) -> _Entry | None:
        entry = self._cache.get(team_id)
        if entry is not None and entry.valid and self.services.clock() - entry.fetched < self.options.ttl:
            self.metrics.inc(LOOKUPS, ("cache",))
            return entry
        return None

    async def lookup(self, team_id: str, key_id: str | None = None, user_id: str | None = None) -> _Entry:
        """The team's entry: cached, else from Redis or the source (one call for every
        concurrent lookup of the team), else a last good answer, else a 503."""
        entry = self._fresh(team_id)
        if entry is not None:
            return entry
        task = self._inflight.get(team_id)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._load(team_id, key_id, user_id))
            self._inflight[team_id] = task
            task.add_done_callback(lambda t, team=team_id: self._done(team, t))
        return await asyncio.shield(task)

    def _done(self, team_id: str, task: asyncio.Task) -> None:
        if self._inflight.get(team_id) is task:
            del self._inflight[team_id]
        if not task.cancelled():
            task.exception()  # retrieved: every waiter may have gone

    async def _load(self, team_id: str, key_id: str | None, user_id: str | None, *,
                    force: bool = False) -> _Entry:
        generation = self._generation
        clock, inc = self.services.clock, self.metrics.inc
        shared: _Entry | None = None
        if not force:
            shared = await self._from_redis(team_id)
            if shared is not None and clock() - shared.fetched < self.options.ttl:
                self._put(team_id, shared, generation)
                inc(LOOKUPS, ("redis",))
                return shared
        if force or clock() >= self._down_until:
            started = clock()
            try:
                sub = await asyncio.wait_for(self.source.fetch(team_id, key_id, user_id), self.options.timeout)
            except Exception as exc:  # whatever the source does wrong, it is a failure to answer
                self._source_failed(exc)
                if force:
                    raise _unavailable() from None
            else:
                self._source_ok()
                entry = _Entry(sub, started)
                if self._put(team_id, entry, generation):  # no invalidation raced this read
                    await self._to_redis(team_id, entry)
                inc(LOOKUPS, ("source",))
                return entry
        # The source did not answer: the freshest good answer still within stale_if_error.
        horizon = self.options.ttl + self.options.stale_if_error
        candidates = [e for e in (self._cache.get(team_id), shared) if e is not None]
        best = max(candidates, key=lambda e: e.fetched, default=None)
        if best is not None and clock() - best.fetched < horizon:
            inc(LOOKUPS, ("stale",))
            return best
        inc(LOOKUPS, ("error",))
        raise _unavailable()

    def _put(self, team_id: str, entry: _Entry, generation: int) -> bool:
        """Cache `entry` unless an invalidation came after `generation` was read."""
        if generation != self._generation:
            return False
        cache = self._cache
        cache.pop(team_id, None)
        if len(cache) >= self.options.cache_size:
            cache.popitem(last=False)
        cache[team_id] = entry
        return True

    def invalidate(self, kind: str, ident: str) -> None:
        """An invalidation message: "subscription" or "team" (a team id), or "*". What is
        dropped stays a last good answer for an outage of the source."""
        if kind not in ("subscription", "team", "*"):
            return
        self._generation += 1
        if kind == "*":
            for entry in self._cache.values():
                entry.valid = False
        else:
            entry = self._cache.get(ident)
            if entry is not None:
                entry.valid = False

    # -- for the admin API

    async def subscription_changed(self, team_id: str) -> None:
        """The team's subscription changed in the store: drop the Redis copy now (the
        admin layer then publishes the invalidation, which drops the local ones)."""
        self.invalidate("subscription", team_id)
        redis = self.services.redis
        if redis is not None:
            try:
                await redis.delete(self.options.redis_prefix + team_id)
            except Exception as exc:
                log.warning("subscription_redis_delete_failed", team_id=team_id, error=f"{type(exc).__name__}: {exc}",
                            effect=f"replicas may read the old subscription from Redis for up to {self.options.ttl:g}s")

    async def refresh_subscription(self, team_id: str) -> SubscriptionInfo | None:
        """Read the team's subscription from the source now (503 when it cannot answer)
        and share it through Redis; the admin layer then publishes the invalidation."""
        self.invalidate("subscription", team_id)
        entry = await self._load(team_id, None, None, force=True)
        return entry.sub

    # -- Redis

    async def _from_redis(self, team_id: str) -> _Entry | None:
        redis = self.services.redis
        if redis is None:
            return None
        try:
            raw = await redis.get(self.options.redis_prefix + team_id)
        except Exception as exc:
            self._redis_failed(exc)
            return None
        self._redis_ok()
        if raw is None:
            return None
        try:
            data = orjson.loads(raw)
            sub = None if data["sub"] is None else _from_json(data["sub"])
            age = max(0.0, self.services.wall() - float(data["at"]))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            log.warning("subscription_redis_value_invalid", team_id=team_id, error=f"{type(exc).__name__}: {exc}")
            return None
        return _Entry(sub, self.services.clock() - age)

    async def _to_redis(self, team_id: str, entry: _Entry) -> None:
        redis = self.services.redis
        if redis is None:
            return
        age = self.services.clock() - entry.fetched
        value = orjson.dumps({"at": self.services.wall() - age,
                              "sub": None if entry.sub is None else subscription_json(entry.sub)})
        try:
            await redis.set(self.options.redis_prefix + team_id, value,
                            ex=max(1, math.ceil(self.options.ttl + self.options.stale_if_error)))
        except Exception as exc:
            self._redis_failed(exc)

    def _redis_failed(self, exc: BaseException) -> None:
        if not self._redis_outage:
            self._redis_outage = True
            log.warning("subscription_redis_unavailable", error=f"{type(exc).__name__}: {exc}",
                        effect="subscriptions are read from the source and cached in this process")

    def _redis_ok(self) -> None:
        if self._redis_outage:
            self._redis_outage = False
            log.info("subscription_redis_recovered")

    # -- the source's health

    def _source_failed(self, exc: BaseException) -> None:
        self._down_until = self.services.clock() + _OUTAGE_BACKOFF
        self.services.readiness["subscription_source"] = "unreachable"
        if not self._outage:
            self._outage = True
            problem = f"no answer within {self.options.timeout:g}s" if isinstance(exc, TimeoutError) else \
                f"{type(exc).__name__}: {exc}"
            log.warning("subscription_source_unavailable", source=self.source_name, error=problem,
                        effect=f"last good answers are served for {self.options.stale_if_error:g}s past their "
                               "ttl; teams without one get 503")

    def _source_ok(self) -> None:
        self._down_until = -math.inf
        if self._outage or "subscription_source" not in self.services.readiness:
            self.services.readiness["subscription_source"] = "ok"
        if self._outage:
            self._outage = False
            log.info("subscription_source_recovered", source=self.source_name)


def _unavailable() -> ProxyError:
    return ProxyError(503, "The subscription service is unavailable; try again shortly.", "api_error",
                      "service_unavailable", headers={"retry-after": "1"})


def _registry() -> Any:
    from llmproxy.plugins import Registry

    return Registry.from_entry_points()


def _loaded(registry: Any, name: str) -> Any:
    try:
        return registry.middleware(name, name)
    except ConfigError:  # reported where the middleware itself is checked
        return None


def _source(options: Options, registry: Any) -> tuple[type, Any]:
    """The source class and its built options; ConfigError naming what is wrong."""
    if registry is None:
        registry = _registry()
    cls = registry.subscription_source(options.source, "subscription.source")
    opts_cls = getattr(cls, "Options", None)
    extra = dict(options.source_options)
    if opts_cls is None:
        if extra:
            raise ConfigError(f"subscription.{', '.join(map(str, extra))}: unknown (the {options.source} source "
                              "takes no options)")
        return cls, None
    return cls, build(opts_cls, extra, "subscription")

