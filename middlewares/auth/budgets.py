"""Budgets: spend counters per key and per team and budget period, reserved at admission
and reconciled when the request ends.

A `Budget` is a limit (`max_budget`) on one key, one team or one team's subscription,
optionally reset every `budget_duration`; periods are counted from the key's, team's or
subscription's `created_at` (`keys.period_start`); a subscription's counts its team's
spend since the subscription began. Its counter holds the period's spend plus the reservations of the
requests still running, in integer nano-dollars (exact; `nanos`), under
`llmproxy:budget:<key|team|subscription>:<id>:<period start, epoch seconds>` (`0` for a budget that
never resets). A period's counter expires a day after the period ends; a lifetime
counter seven days after its last use (it is rebuilt when needed, see below).

The `Ledger` keeps the counters:

- `reserve(budgets, amount)` admits a request: for each budget, refuse (`BudgetExceeded`)
  when the counter has already reached the limit, else add `amount` (the request's
  estimated cost, `estimate`) to every counter, all-or-nothing. With Redis this is one Lua
  script (GET, compare, INCRBY, EXPIRE) per reservation, so there is no read-then-write race
  and every replica enforces the same budget; without Redis a dict in this process does the
  same within one event-loop step.
- `settle(reservation, actual)` reconciles when the request ends: adds `actual - amount`.
  It is synchronous (request cleanups are); the Redis call runs as a task that `drain()`
  awaits at shutdown.
- A counter that is absent (a new period, a Redis restart, an idle lifetime counter) is
  rebuilt from the spend log (`store.key_spend(id, since=period start)` or `team_spend`)
  and set only if still absent (`SET NX`), so a rebuild never overwrites live counts.
  Rebuilds of one counter are shared by concurrent requests (one query per process).
- Redis failing (down, timing out): the ledger falls back to its in-process counters (and
  says so once per outage), retrying Redis after `redis_retry` seconds, rather than
  failing requests. Budgets are then enforced per process until Redis is back, and the
  spend made meanwhile is missing from the Redis counter until it next gets rebuilt.
- The database failing during a rebuild: that budget is not enforced for this request
  (logged); the next request retries the rebuild. Counters that exist are enforced as
  usual, without the database.

Overshoot bound. A request is admitted while its counter (settled spend + reservations
of the requests in flight) is below the limit, so the settled spend of a period can exceed
the budget by at most

    sum over the requests in flight when the counter crosses the limit of
        max(0, actual cost - reserved estimate)
  + the cost of the last request(s) admitted before the crossing

(every request admitted while the counter was below the limit may finish; the ones
admitted later are refused). The estimate counts prompt tokens as a quarter of the prompt's
characters and the output as `max_tokens` (or `max_completion_tokens`, or a default of
1024), so a request whose `max_tokens` is set is rarely under-estimated. Also outside the
bound: requests whose counter could not be rebuilt (database down), a Redis outage
(per-process counters), and the spend log's write delay (about a second) when a counter
is rebuilt mid-period.

Pricing. A model without `pricing` costs 0: its requests reserve and add nothing, so they
alone never exhaust a budget, but they are refused like any other once priced requests
have exhausted it. Lua compares numbers as doubles: exact up to 2^53 nano-dollars (about
$9M); the counters themselves (INCRBY) are exact 64-bit integers.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass, replace
from datetime import datetime, timedelta, timezone
from decimal import ROUND_CEILING, ROUND_HALF_EVEN, Decimal
from typing import TYPE_CHECKING, Any, Callable, Sequence

import structlog
from redis.exceptions import ResponseError

from llmproxy.keys import parse_duration, period_start
from llmproxy.store import StoreError

_REDIS_REFUSED = (ResponseError,)  # an error reply (a script's), not a lost connection

if TYPE_CHECKING:
    from llmproxy.config import Pricing
    from llmproxy.context import Context
    from llmproxy.store import KeyInfo, SubscriptionInfo, TeamInfo

log = structlog.get_logger("llmproxy.middlewares.auth.budgets")

UTC = timezone.utc
NANOS_PER_USD = 10**9
DEFAULT_MAX_TOKENS = 1024
DAY = 86400
LIFETIME_TTL = 7 * DAY
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_PRUNE_EVERY = 1024

# KEYS: the counters; ARGV[1]: the amount; ARGV[2i], ARGV[2i+1]: counter i's limit and ttl.
# Returns {1} when reserved, {0, i, value} when counter i reached its limit, {-1, i} when
# counter i is absent (the caller rebuilds it and calls again).
_RESERVE = """
local amount = tonumber(ARGV[1])
for i, key in ipairs(KEYS) do
  local value = redis.call('GET', key)
  if not value then return {-1, i} end
  if tonumber(value) >= tonumber(ARGV[2 * i]) then return {0, i, value} end
end
for i, key in ipairs(KEYS) do
  if amount ~= 0 then redis.call('INCRBY', key, ARGV[1]) end
  redis.call('EXPIRE', key, ARGV[2 * i + 1])
end
return {1}
"""

# Adds ARGV[1] to each counter that still exists (an expired one is rebuilt from the log).
_ADJUST = """
for _, key in ipairs(KEYS) do
  if redis.call('EXISTS', key) == 1 then redis.call('INCRBY', key, ARGV[1]) end
end
return 1
"""


def nanos(amount: Decimal) -> int:
    """USD as integer nano-dollars, rounded half-even (as the store quantizes spend)."""
    return int((amount * NANOS_PER_USD).to_integral_value(ROUND_HALF_EVEN))


def usd(amount: int) -> Decimal:
    return Decimal(amount).scaleb(-9)


def estimate(pricing: "Pricing | None", prompt_tokens: int, output_tokens: int) -> int:
    """The cost of so many tokens, in nano-dollars rounded up; 0 without pricing."""
    if pricing is None:
        return 0
    # price per 1M tokens in USD = price * 1000 nano-dollars per token
    total = (prompt_tokens * pricing.input_per_1m + output_tokens * pricing.output_per_1m) * 1000
    return int(Decimal(total).to_integral_value(ROUND_CEILING))


def estimate_request(ctx: "Context", default_max_tokens: int = DEFAULT_MAX_TOKENS) -> int:
    """A request's estimated cost in nano-dollars: prompt characters / 4 as input tokens,
    `max_tokens` / `max_completion_tokens` (else `default_max_tokens`) as output tokens;
    embeddings produce no output tokens."""
    pricing = ctx.model.pricing_for(ctx.body["model"]) if ctx.model is not None else None
    if pricing is None:
        return 0
    body = ctx.body
    prompt = -(-len(ctx.prompt_text()) // 4)
    if ctx.api == "embeddings":
        output = 0
    else:
        output = body.get("max_tokens")
        if output is None:
            output = body.get("max_completion_tokens")
        if output is None:
            output = default_max_tokens
    return estimate(pricing, prompt, output)


# ---------------------------------------------------------------------------- budgets


@dataclass(frozen=True, slots=True)
class Budget:
    """A spending limit on one key or team: `limit` nano-dollars per period of `duration`
    counted from `anchor` (None: one period, forever)."""

    scope: str  # "key" | "team" | "subscription"
    id: str
    limit: int
    anchor: datetime = _EPOCH
    duration: timedelta | None = None
    team_id: str | None = None  # a subscription's team: its spend since `anchor` is what counts

    @classmethod
    def of_key(cls, info: "KeyInfo") -> "Budget | None":
        return _budget("key", info.id, info.max_budget, info.budget_duration, info.created_at)

    @classmethod
    def of_team(cls, info: "TeamInfo") -> "Budget | None":
        return _budget("team", info.team_id, info.max_budget, info.budget_duration, info.created_at)

    @classmethod
    def of_subscription(cls, info: "SubscriptionInfo") -> "Budget | None":
        """A subscription's budget: its team's spend since the subscription began, per
        period counted from then."""
        budget = _budget("subscription", info.subscription_id, info.max_budget, info.budget_duration,
                         info.created_at)
        return None if budget is None else replace(budget, team_id=info.team_id)

    def period(self, now: datetime) -> tuple[datetime, datetime | None]:
        """The current period's start and end (end None: it never resets). A lifetime
        budget's period starts at the epoch."""
        if self.duration is None:
            return _EPOCH, None
        start = period_start(self.anchor, self.duration, now)
        return start, start + self.duration

    def describe(self) -> str:
        """The budget, for messages ("team 'org-2''s budget" would read badly)."""
        if self.scope == "key":
            return "this key's budget"
        if self.scope == "subscription":
            return f"the budget of team '{self.team_id}''s subscription"
        return f"the budget of team '{self.id}'"


def _budget(scope: str, ident: str, limit: Decimal | None, duration: str | None,
            created: datetime | None) -> Budget | None:
    if limit is None:
        return None
    period = None
    if duration:
        try:
            period = parse_duration(duration)
        except ValueError:  # bad data in the store: stricter to never reset than to ignore
            log.warning("budget_duration_invalid", scope=scope, id=ident, budget_duration=duration)
    return Budget(scope, ident, nanos(limit), created or _EPOCH, period)


class BudgetExceeded(Exception):
    """`budget` has reached its limit: `spent` nano-dollars this period (reservations of
    running requests included); `resets_at` None when it never resets."""

    def __init__(self, budget: Budget, spent: int, resets_at: datetime | None) -> None:
        super().__init__(f"{budget.scope} budget exceeded")
        self.budget = budget
        self.spent = spent
        self.resets_at = resets_at

    def retry_after(self, now: float) -> int | None:
        """Whole seconds from `now` (epoch) until the budget resets, at least 1."""
        if self.resets_at is None:
            return None
        return max(1, math.ceil(self.resets_at.timestamp() - now))


@dataclass(frozen=True, slots=True)
class Reservation:
    """What `reserve` took: `amount` on each of `counters`, in the `backend` that holds them."""

    counters: tuple[str, ...]
    amount: int
    backend: str  # "redis" | "local"


@dataclass(frozen=True, slots=True)
class _Counter:
    name: str
    start: datetime
    end: datetime | None
    expires: float  # epoch seconds: a day after the period ends, or a week from now


# ---------------------------------------------------------------------------- the ledger


class Ledger:
    """Budget counters in Redis (when `redis` is given) or in this process; see the module.

    `store` answers `key_spend`/`team_spend` for rebuilds; `now` is the wall clock
    (epoch seconds), injectable so tests can move to the next period.
    """

    def __init__(self, store: Any, redis: Any = None, *, now: Callable[[], float] = time.time,
                 prefix: str = "llmproxy:budget", store_timeout: float = 2.0, redis_retry: float = 5.0) -> None:
        self.store = store
        self.redis = redis
        self.now = now
        self.prefix = prefix
        self.store_timeout = store_timeout
        self.redis_retry = redis_retry
        self._local: dict[str, list] = {}  # counter name -> [nanos, expires at (epoch)]
        self._rebuilds: dict[str, asyncio.Future] = {}
        self._pending: set[asyncio.Task] = set()
        self._redis_down_until = 0.0  # time.monotonic()
        self._redis_outage = False
        self._ops = 0
        if redis is not None:
            self._reserve_script = redis.register_script(_RESERVE)
            self._adjust_script = redis.register_script(_ADJUST)

    def counter(self, budget: Budget, now: datetime) -> _Counter:
        start, end = budget.period(now)
        name = f"{self.prefix}:{budget.scope}:{budget.id}:{int(start.timestamp())}"
        expires = end.timestamp() + DAY if end is not None else now.timestamp() + LIFETIME_TTL
        return _Counter(name, start, end, expires)

    # -- admission

    async def reserve(self, budgets: Sequence[Budget], amount: int) -> Reservation:
        """Reserve `amount` nano-dollars on every budget, or raise BudgetExceeded naming
        the first one that has reached its limit (then nothing is reserved)."""
        # Never more than the smallest budget could cover: an absurd estimate (max_tokens
        # 10^13) must neither overflow a 64-bit counter in Redis nor stand for more than a
        # budget's worth; the real cost is settled later all the same.
        amount = min(amount, min(b.limit for b in budgets)) if budgets else amount
        ts = self.now()
        now = datetime.fromtimestamp(ts, UTC)
        counters = [self.counter(b, now) for b in budgets]
        if self.redis is not None and time.monotonic() >= self._redis_down_until:
            try:
                reservation = await self._reserve_redis(budgets, counters, amount, ts)
            except BudgetExceeded:
                self._redis_up()
                raise
            except _REDIS_REFUSED as exc:  # Redis answered, but not this one: it alone is counted here
                log.warning("budget_redis_refused", error=f"{type(exc).__name__}: {exc}", amount=amount)
            except Exception as exc:  # down, timed out, reset: count locally meanwhile
                self._redis_failed(exc)
            else:
                self._redis_up()
                return reservation
        return await self._reserve_local(budgets, counters, amount, ts)

    async def _reserve_redis(self, budgets: Sequence[Budget], counters: list[_Counter], amount: int,
                             ts: float) -> Reservation:
        active = list(range(len(budgets)))
        for _ in range(2 * len(budgets) + 2):
            args: list[int] = [amount]
            for i in active:
                args += [budgets[i].limit, max(1, math.ceil(counters[i].expires - ts))]
            names = [counters[i].name for i in active]
            if not names:
                break
            result = await self._reserve_script(keys=names, args=args)
            status = int(result[0])
            if status == 1:
                return Reservation(tuple(names), amount, "redis")
            i = active[int(result[1]) - 1]
            if status == 0:
                raise BudgetExceeded(budgets[i], int(result[2]), counters[i].end)
            total = await self._rebuilt(budgets[i], counters[i])
            if total is None:
                active.remove(i)
                continue
            await self.redis.set(counters[i].name, total, nx=True,
                                 ex=max(1, math.ceil(counters[i].expires - ts)))
        # Every counter was unavailable (database down during rebuilds) or kept vanishing.
        return Reservation((), 0, "redis")

    async def _reserve_local(self, budgets: Sequence[Budget], counters: list[_Counter], amount: int,
                             ts: float) -> Reservation:
        self._ops += 1
        if self._ops % _PRUNE_EVERY == 0:
            self._prune(ts)
        local = self._local
        active = []
        for i, c in enumerate(counters):
            entry = local.get(c.name)
            if entry is None or entry[1] <= ts:
                total = await self._rebuilt(budgets[i], c)
                if total is None:
                    continue
                entry = local.get(c.name)
                if entry is None or entry[1] <= ts:  # set only if still absent
                    local[c.name] = [total, c.expires]
            active.append(i)
        # No await from here on: check and add in one step of the event loop.
        entries = []
        for i in active:
            entry = local.get(counters[i].name)
            if entry is None:  # expired during the rebuild of another counter: skip it
                continue
            if entry[0] >= budgets[i].limit:
                raise BudgetExceeded(budgets[i], entry[0], counters[i].end)
            entries.append((i, entry))
        for i, entry in entries:
            entry[0] += amount
            if counters[i].end is None:
                entry[1] = counters[i].expires  # lifetime counters expire a week after last use
        return Reservation(tuple(counters[i].name for i, _ in entries), amount, "local")

    # -- reconciliation

    def settle(self, reservation: Reservation, actual: int) -> None:
        """The request ended having cost `actual` nano-dollars: correct its reservation.
        Synchronous; a Redis update runs as a task (see `drain`)."""
        delta = actual - reservation.amount
        if delta == 0 or not reservation.counters:
            return
        if reservation.backend == "local":
            for name in reservation.counters:
                entry = self._local.get(name)
                if entry is not None:
                    entry[0] += delta
            return
        task = asyncio.get_running_loop().create_task(self._adjust_redis(reservation.counters, delta))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _adjust_redis(self, names: tuple[str, ...], delta: int) -> None:
        try:
            await self._adjust_script(keys=list(names), args=[delta])
        except Exception as exc:  # the reservation stays counted: an overcount, never an undercount
            log.warning("budget_settle_failed", error=f"{type(exc).__name__}: {exc}", delta_nanos=delta)

    async def drain(self) -> None:
        """Wait for the reconciliations still running (at shutdown)."""
        while self._pending:
            await asyncio.gather(*list(self._pending), return_exceptions=True)

    # -- reading

    async def spent(self, budget: Budget) -> int | None:
        """The current period's counter (spend plus reservations), None when absent."""
        now = datetime.fromtimestamp(self.now(), UTC)
        c = self.counter(budget, now)
        if self.redis is not None and time.monotonic() >= self._redis_down_until:
            try:
                value = await self.redis.get(c.name)
            except Exception as exc:
                self._redis_failed(exc)
            else:
                return None if value is None else int(value)
        entry = self._local.get(c.name)
        return None if entry is None or entry[1] <= now.timestamp() else entry[0]

    async def current(self, budget: Budget) -> int | None:
        """The current period's spend (with the reservations of running requests): the
        counter, else the spend log's total (not stored); None when neither answers."""
        spent = await self.spent(budget)
        if spent is not None:
            return spent
        return await self._rebuilt(budget, self.counter(budget, datetime.fromtimestamp(self.now(), UTC)))

    # -- internals

    async def _rebuilt(self, budget: Budget, counter: _Counter) -> int | None:
        """The period's spend from the spend log, one query per counter however many ask;
        None when the database does not answer."""
        fut = self._rebuilds.get(counter.name)
        if fut is None:
            fut = asyncio.ensure_future(self._rebuild(budget, counter))
            self._rebuilds[counter.name] = fut
            fut.add_done_callback(lambda _f, name=counter.name: self._rebuilds.pop(name, None))
        return await asyncio.shield(fut)

    async def _rebuild(self, budget: Budget, counter: _Counter) -> int | None:
        since = counter.start if counter.end is not None else None
        if budget.scope == "subscription":  # the team's spend, never from before the subscription
            owner, query = budget.team_id, self.store.team_spend
            since = budget.anchor if since is None or since < budget.anchor else since
        else:
            owner, query = budget.id, (self.store.key_spend if budget.scope == "key" else self.store.team_spend)
        try:
            total = await asyncio.wait_for(query(owner, since=since), self.store_timeout)
        except (StoreError, TimeoutError, OSError) as exc:
            log.warning("budget_rebuild_failed", scope=budget.scope, id=budget.id,
                        error=f"{type(exc).__name__}: {exc}", effect="not enforced for this request")
            return None
        return nanos(total)

    def _prune(self, ts: float) -> None:
        for name in [n for n, e in self._local.items() if e[1] <= ts]:
            del self._local[name]

    def _redis_failed(self, exc: Exception) -> None:
        self._redis_down_until = time.monotonic() + self.redis_retry
        if not self._redis_outage:
            self._redis_outage = True
            log.warning("budget_redis_unavailable", error=f"{type(exc).__name__}: {exc}",
                        effect="budgets counted in this process until Redis answers", retry_in=self.redis_retry)

    def _redis_up(self) -> None:
        if self._redis_outage:
            self._redis_outage = False
            log.info("budget_redis_recovered")
