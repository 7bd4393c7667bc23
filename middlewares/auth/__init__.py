"""The `auth` middleware: who is asking, may they use this model, can they still pay.

An identity middleware (`stage = "identity"`): it runs before the body is read, so a
request without a valid key gets 401 whatever it sends, and only an authenticated caller
learns whether a model exists (404) or is not allowed (403; `llmproxy.pipeline.Route`
asks `Principal.allows_model`, and the forwarder asks it again before each fallback).

Per request, in this order:
1. No key: 401 `invalid_api_key`. The master key (constant-time compare): a master
   principal, every model, no budget.
2. The key's SHA-256 is looked up in a local cache of key + team (`cache_ttl`; unknown
   keys are cached as unknown for `negative_ttl`, so a flood of bad keys is no flood of
   queries). Concurrent misses for one key share one store call. The cache is bounded
   (`cache_size` known keys and, apart, `negative_cache_size` unknown ones, each evicting
   its oldest entry first, in O(1)) and invalidated through
   `services.invalidator` ("key" id, "team" id, "*"), across replicas when Redis is set;
   `cache_ttl` bounds staleness when a message is lost.
3. The store failing (StoreUnavailable, or no answer within `store_timeout`): a key seen
   within `stale_ttl` keeps working; any other key gets 503. The outage is logged once and
   shown on `/health/readiness`; for a second after a failure the store is not asked
   again, so a hung database slows no request beyond one `store_timeout`.
4. Blocked key or team: 401 `key_blocked`; expired: 401 `key_expired`.
5. `ctx.principal` and the record's key/team/user fields are set. The key itself is never
   logged nor kept: the cache is keyed by its hash. A model outside the key's or the
   team's list is refused by the route stage (403); `/v1/models` lists only the allowed.
6. Budgets (`routed`, once the model is known; `llmproxy.middlewares.auth.budgets`): a key
   or team with `max_budget` reserves the request's estimated cost, or answers 429
   `budget_exceeded`; the reservation is reconciled with the real cost in a cleanup,
   after the forwarder has priced the request.
"""

from __future__ import annotations

import asyncio
import math
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import structlog

from llmproxy import errors
from llmproxy.context import BODY_APIS, COUNT_APIS
from llmproxy.middlewares.auth.budgets import Budget, BudgetExceeded, Ledger, Reservation, estimate_request, nanos, usd
from llmproxy.errors import ProxyError
from llmproxy.keys import key_hash, same_secret
from llmproxy.patterns import ModelNames, allow_list
from llmproxy.store import KeyInfo, StoreUnavailable, TeamInfo

if TYPE_CHECKING:
    from llmproxy.context import Context, Next, Reply
    from llmproxy.services import Services

log = structlog.get_logger("llmproxy.auth")

_OUTAGE_BACKOFF = 1.0  # seconds without asking a store that just failed


@dataclass(frozen=True)
class Options:
    cache_ttl: float = field(default=30.0, metadata={"min": 0})  # seconds a looked-up key is trusted
    negative_ttl: float = field(default=5.0, metadata={"min": 0})  # seconds an unknown key stays unknown
    stale_ttl: float = field(default=300.0, metadata={"min": 0})  # seconds a seen key works while the store is down
    store_timeout: float = field(default=2.0, metadata={"gt": 0})  # seconds per lookup before it counts as down
    cache_size: int = field(default=100_000, metadata={"min": 1})  # known keys held
    negative_cache_size: int = field(default=10_000, metadata={"min": 1})  # unknown keys held, apart
    default_max_tokens: int = field(default=1024, metadata={"min": 0})  # output estimate for budget reservations


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is asking, as `ctx.principal`. `models`: the allow-lists a model must pass (the
    key's, the team's, the subscription's; exact names and `claude-*` patterns), none:
    every model. `rpm_limit`, `tpm_limit`, `max_parallel_requests` are the key's own; the
    team's are on `team`."""

    key_id: str | None
    key_alias: str | None = None
    team_id: str | None = None
    user_id: str | None = None
    models: tuple[ModelNames, ...] = ()
    key: KeyInfo | None = None
    team: TeamInfo | None = None
    rpm_limit: int | None = None
    tpm_limit: int | None = None
    max_parallel_requests: int | None = None
    budgets: tuple[Budget, ...] = ()
    expires_at: float | None = None  # epoch seconds
    is_master: bool = False
    subscription: Any = None  # the team's SubscriptionInfo, set by the subscription middleware

    def allows_model(self, name: str) -> bool:
        for allowed in self.models:
            if not allowed.allows(name):
                return False
        return True

    def with_subscription(self, sub: Any) -> "Principal":
        """This principal under its team's subscription (a `SubscriptionInfo`; asked by the
        subscription middleware): the subscription's models narrow this one's, and its
        budget joins the key's and team's, reserved and settled with them."""
        allowed = allow_list(sub.models)
        models = self.models + (allowed,) if allowed is not None else self.models
        budget = Budget.of_subscription(sub)
        budgets = self.budgets + (budget,) if budget is not None else self.budgets
        return replace(self, subscription=sub, models=models, budgets=budgets)

    def denial(self, name: str) -> str:
        """Why `allows_model(name)` is false, for the 403."""
        sub = self.subscription
        if sub is not None and not sub.allows_model(name):
            return f"The model '{name}' is not part of this team's subscription."
        return f"This key is not allowed to use the model '{name}'."


MASTER = Principal(key_id=None, key_alias="master", is_master=True)


def principal_of(key: KeyInfo, team: TeamInfo | None) -> Principal:
    """The principal of a key (and its team, None when it has none or it was deleted)."""
    lists = [allow_list(key.models), allow_list(team.models) if team is not None else None]
    models = tuple(m for m in lists if m is not None)
    budgets = [Budget.of_key(key), Budget.of_team(team) if team is not None else None]
    return Principal(
        key_id=key.id, key_alias=key.key_alias, team_id=key.team_id, user_id=key.user_id, models=models,
        key=key, team=team, rpm_limit=key.rpm_limit, tpm_limit=key.tpm_limit,
        max_parallel_requests=key.max_parallel_requests, budgets=tuple(b for b in budgets if b is not None),
        expires_at=key.expires_at.timestamp() if key.expires_at is not None else None)


class _Entry:
    __slots__ = ("principal", "fetched")

    def __init__(self, principal: Principal | None, fetched: float) -> None:
        self.principal = principal  # None: no such key
        self.fetched = fetched  # services.clock() when the lookup started


class _Unavailable(Exception):
    """The store did not answer."""


class Auth:
    """Middleware `auth` (see the module docstring)."""

    Options = Options
    stage = "identity"
    apis = BODY_APIS | {"models", "limits"}

    def __init__(self, options: Options | None, services: "Services") -> None:
        self.options = options = options or Options()
        self.services = services
        master = services.config.master_key if services.config is not None else None
        self._master = master or None
        # key hash -> entry, oldest first; unknown keys in a table of their own, so that a
        # flood of random keys evicts only other unknown ones. popitem(last=False) is O(1).
        self._cache: OrderedDict[str, _Entry] = OrderedDict()
        self._unknown: OrderedDict[str, _Entry] = OrderedDict()
        self._ids: dict[str, str] = {}  # key id -> hash, for keys whose id is not their hash
        self._inflight: dict[str, asyncio.Task] = {}
        self._generation = 0  # bumped by every invalidation: lookups begun before it are not cached
        self._down_until = -math.inf
        self._outage = False
        self.ledger: Ledger | None = None
        self.metrics = services.metrics
        self.metrics.define("llmproxy_auth_lookups_total", "counter",
                            "Key resolutions by where the answer came from (cache, store, stale).", ("source",))

    async def startup(self) -> None:
        """Subscribe to invalidations; open the budget ledger on the store and Redis."""
        s = self.services
        if s.invalidator is not None:
            s.invalidator.subscribe(self.invalidate)
        self.ledger = Ledger(s.store, s.redis, now=lambda: s.wall(), store_timeout=self.options.store_timeout)

    async def shutdown(self) -> None:
        """Wait for the budget reconciliations still running."""
        if self.ledger is not None:
            await self.ledger.drain()

    # -- the hook

    async def __call__(self, ctx: "Context", call_next: "Next") -> "Reply":
        """Runs before everything inside it; raising here answers the client at once."""
        key = ctx.api_key
        if not key:
            raise errors.unauthorized("Missing API key: send 'Authorization: Bearer <key>' or 'x-api-key'.")
        if self._master is not None and same_secret(key, self._master):
            ctx.principal = MASTER
            return await call_next(ctx)
        if ctx.tracer is None:
            principal = await self.resolve(key)
        else:
            with ctx.trace("llmproxy.auth"):
                principal = await self.resolve(key)
        if principal is None:
            raise errors.unauthorized("Invalid API key.")
        record = ctx.record
        record.key_id, record.key_alias = principal.key_id, principal.key_alias
        record.team_id, record.user_id = principal.team_id, principal.user_id
        self._check(principal)
        ctx.principal = principal
        return await call_next(ctx)

    async def routed(self, ctx: "Context") -> None:
        """Called by the route stage once the model is known and allowed: reserve the
        request's estimated cost on the key's and team's budgets (429 when one is spent)."""
        principal = ctx.principal
        if isinstance(principal, Principal) and principal.budgets and ctx.api not in COUNT_APIS:
            reservation = await self._reserve(ctx, principal)
            ctx.cleanups.append(lambda: self._settle(ctx, reservation))

    async def describe_limits(self, ctx: "Context", report: dict[str, Any]) -> None:
        """`GET /v1/limits`: the caller's budgets (key, team, subscription) with this
        period's spend (reservations of running requests included) and when it resets."""
        principal = ctx.principal
        if not isinstance(principal, Principal) or self.ledger is None:
            return
        now = datetime.fromtimestamp(self.services.wall(), timezone.utc)
        for budget in principal.budgets:
            spent = await self.ledger.current(budget)
            _, end = budget.period(now)
            report["budgets"].append({
                "scope": budget.scope, "id": budget.id, "max_budget": float(usd(budget.limit)),
                "spend": None if spent is None else float(usd(spent)),
                "remaining": None if spent is None else float(usd(max(0, budget.limit - spent))),
                "budget_duration": None if budget.duration is None else _duration_text(budget.duration),
                "resets_at": None if end is None else end.isoformat()})

    def _check(self, p: Principal) -> None:
        key, team = p.key, p.team
        if key is not None and key.blocked:
            raise errors.unauthorized("This API key is blocked.", "key_blocked")
        if team is not None and team.blocked:
            raise errors.unauthorized("This API key's team is blocked.", "key_blocked")
        if p.expires_at is not None and self.services.wall() >= p.expires_at:
            raise errors.unauthorized("This API key has expired.", "key_expired")

    # -- budgets

    async def _reserve(self, ctx: "Context", principal: Principal) -> Reservation:
        assert self.ledger is not None, "Auth.startup() was not called"
        amount = estimate_request(ctx, self.options.default_max_tokens)
        try:
            return await self.ledger.reserve(principal.budgets, amount)
        except BudgetExceeded as exc:
            raise _budget_error(exc, self.services.wall()) from None

    def _settle(self, ctx: "Context", reservation: Reservation) -> None:
        assert self.ledger is not None
        self.ledger.settle(reservation, nanos(ctx.record.spend))

    # -- resolving a key

    async def resolve(self, key: str) -> Principal | None:
        """The principal of `key`, None when there is no such key; raises 503 when the store
        cannot say and the key was not seen recently enough."""
        digest = key_hash(key)
        now = self.services.clock()
        entry = self._cache.get(digest) or self._unknown.get(digest)
        opts = self.options
        inc = self.metrics.inc
        if entry is not None:
            age = now - entry.fetched
            if age < (opts.cache_ttl if entry.principal is not None else opts.negative_ttl):
                inc("llmproxy_auth_lookups_total", ("cache",))
                return entry.principal
            if now < self._down_until and age < opts.stale_ttl:
                inc("llmproxy_auth_lookups_total", ("stale",))
                return entry.principal
        if now >= self._down_until:
            try:
                inc("llmproxy_auth_lookups_total", ("store",))
                return await self._lookup(digest)
            except _Unavailable:
                pass
        if entry is not None and self.services.clock() - entry.fetched < opts.stale_ttl:
            inc("llmproxy_auth_lookups_total", ("stale",))
            return entry.principal
        raise ProxyError(503, "The key store is unavailable; try again shortly.", "api_error",
                         "service_unavailable", headers={"retry-after": "1"})

    async def _lookup(self, digest: str) -> Principal | None:
        task = self._inflight.get(digest)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._fetch(digest))
            self._inflight[digest] = task
            task.add_done_callback(lambda t, d=digest: self._done(d, t))
        return await asyncio.shield(task)

    def _done(self, digest: str, task: asyncio.Task) -> None:
        self._inflight.pop(digest, None)
        if not task.cancelled():
            task.exception()  # retrieved: every waiter may have gone

    async def _fetch(self, digest: str) -> Principal | None:
        generation = self._generation
        started = self.services.clock()
        store = self.services.store
        try:
            key, team = await asyncio.wait_for(_read(store, digest), self.options.store_timeout)
        except (StoreUnavailable, TimeoutError, OSError) as exc:
            self._store_failed(exc)
            raise _Unavailable from None
        self._store_ok()
        principal = principal_of(key, team) if key is not None else None
        if generation == self._generation:  # no invalidation raced this read
            self._put(digest, _Entry(principal, started))
        return principal

    def _put(self, digest: str, entry: _Entry) -> None:
        self._forget(digest)
        p = entry.principal
        if p is None:
            if len(self._unknown) >= self.options.negative_cache_size:
                self._unknown.popitem(last=False)
            self._unknown[digest] = entry
            return
        cache = self._cache
        if len(cache) >= self.options.cache_size:
            oldest, old = cache.popitem(last=False)
            if old.principal is not None and old.principal.key_id != oldest:
                self._ids.pop(old.principal.key_id, None)
        cache[digest] = entry
        if p.key_id != digest:
            self._ids[p.key_id] = digest

    def _forget(self, digest: str) -> None:
        self._unknown.pop(digest, None)
        old = self._cache.pop(digest, None)
        if old is not None and old.principal is not None and old.principal.key_id != digest:
            self._ids.pop(old.principal.key_id, None)

    def invalidate(self, kind: str, ident: str) -> None:
        """An invalidation message: "key" (its id), "team" (its id) or "*" (everything)."""
        self._generation += 1
        cache = self._cache
        if kind == "key":
            self._forget(self._ids.get(ident, ident))
        elif kind == "team":
            for digest in [d for d, e in cache.items() if e.principal is not None and e.principal.team_id == ident]:
                del cache[digest]
        else:
            cache.clear()
            self._unknown.clear()
            self._ids.clear()

    def _store_failed(self, exc: BaseException) -> None:
        self._down_until = self.services.clock() + _OUTAGE_BACKOFF
        self.services.readiness["database"] = "unreachable"
        if not self._outage:
            self._outage = True
            log.warning("auth_store_unavailable", error=f"{type(exc).__name__}: {exc}",
                        effect=f"keys seen in the last {self.options.stale_ttl:g}s keep working; others get 503")

    def _store_ok(self) -> None:
        self._down_until = -math.inf
        if self._outage:
            self._outage = False
            self.services.readiness["database"] = "ok"
            log.info("auth_store_recovered")


async def _read(store: Any, digest: str) -> tuple[KeyInfo | None, TeamInfo | None]:
    key = await store.key_by_hash(digest)
    team = None
    if key is not None and key.team_id:
        team = await store.team(key.team_id)
    return key, team


def _duration_text(length: Any) -> str:
    seconds = int(length.total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _money(amount: int) -> str:
    return f"${usd(amount).quantize(Decimal('0.000001')).normalize():f}"


def _budget_error(exc: BudgetExceeded, now: float) -> ProxyError:
    b = exc.budget
    message = f"Budget exceeded: {b.describe()} ({_money(b.limit)}) is spent ({_money(exc.spent)}"
    message += " this period)." if exc.resets_at is not None else ")."
    headers = {"x-should-retry": "false"}
    retry_after = exc.retry_after(now)
    if retry_after is not None:
        reset = datetime.fromtimestamp(exc.resets_at.timestamp(), timezone.utc).isoformat()
        message += f" It resets at {reset}."
        headers["retry-after"] = str(retry_after)
    return ProxyError(429, message, "insufficient_quota", "budget_exceeded", headers=headers)
