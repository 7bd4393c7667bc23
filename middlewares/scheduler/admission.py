"""The admission step the router calls before each upstream attempt (`ctx.admission`).

`acquire` takes one request and the estimated tokens from the deployment's buckets and
from the key's and team's, plus a parallel slot of each that caps them - at once when
everything has room and nobody is queued, else through the deployment's `Lane`. It
answers a `Lease` or raises the 429 `ProxyError` of SPEC §2. `Lease.release(usage)`
reconciles; `Lease.feedback(status, headers)` passes on what the provider said.

With a `remote` (the Redis buckets), the local table is only a mirror used to decide
when to try: a start is confirmed by one atomic script on the shared buckets, and a
refusal there puts the waiter back at the front of its tenant's queue.
"""

from __future__ import annotations

import asyncio
import math
from typing import TYPE_CHECKING, Any, Awaitable, Iterable

from llmproxy.context import COUNT_APIS
from llmproxy.errors import ProxyError

from .headers import format_duration, provider_limits, retry_after_seconds
from .lane import Lane, Refusal, Waiter
from .limits import DEPLOYMENT, REQUESTS, TOKENS, Demand, Limit, Parallel, demand_of, deployment_limits, tenant_of
from .table import BucketTable

COUNT_SHARE = 0.1  # of a deployment's rpm, for token counting (`RateScheduler.count_lane`)

if TYPE_CHECKING:
    from llmproxy.config import Deployment
    from llmproxy.context import Context
    from llmproxy.metrics import Metrics
    from llmproxy.usage import Usage

RATE_LIMITED = "llmproxy_rate_limited_total"
QUEUE_DEPTH = "llmproxy_scheduler_queue_depth"
WAIT_SECONDS = "llmproxy_scheduler_wait_seconds"


def define_metrics(metrics: "Metrics") -> None:
    metrics.define(RATE_LIMITED, "counter", "Requests refused by the rate scheduler.", ("reason",))
    metrics.define(QUEUE_DEPTH, "gauge", "Requests waiting for a deployment.", ("deployment",))
    metrics.define(WAIT_SECONDS, "histogram", "Seconds a request waited for admission.", ("deployment",))


class _NoLease:
    """For attempts no limit applies to."""

    __slots__ = ()

    def release(self, usage: "Usage | None") -> None:
        pass

    def feedback(self, status: int, headers: list[tuple[str, str]]) -> None:
        pass


NO_LEASE = _NoLease()


class Lease:
    """What one attempt took; `release` gives back or charges the difference, once."""

    __slots__ = ("sched", "lane", "demand", "table", "remote", "done", "told")

    def __init__(self, sched: "RateScheduler", lane: Lane, demand: Demand, table: BucketTable) -> None:
        self.sched, self.lane, self.demand, self.table = sched, lane, demand, table
        self.remote: Any = None  # the shared-bucket reservation's id, once confirmed
        self.done = False
        self.told: Any = None  # what the provider said, for the shared buckets at release

    def feedback(self, status: int, headers: list[tuple[str, str]]) -> None:
        """The upstream answered (called once per attempt, before `release`): its rate-limit
        headers and a 429 tighten this deployment's buckets - here at once; in the shared
        buckets with the release (the one round trip a completion makes)."""
        told = self.sched.feedback(self.lane, status, headers)
        if told is not None and self.remote is not None:
            self.told = told

    def release(self, usage: "Usage | None") -> None:
        """The attempt ended. None: nothing was used, everything goes back. Else the
        request stays taken; tokens reconcile with `usage` where they should."""
        if self.done:
            return
        self.done = True
        sched, d = self.sched, self.demand
        now = sched.clock()
        deltas = reconcile(d, usage, self.lane.dep.tpm_counts)
        if usage is None:
            self.table.give_back(d, now)
        else:
            for lim, delta in deltas:
                self.table.adjust(lim, delta, now)
            self.table.free(d)
        if self.remote is not None:
            sched.remote.release(self, deltas, usage is None, self.told)
        sched.released()


def reconcile(d: Demand, usage: "Usage | None", tpm_counts: str) -> list[tuple[Limit, float]]:
    """Units to give back (> 0) or charge (< 0) per limit when an attempt ends.
    No usage: all of it back. Else tokens reconcile to the real count, except that a
    `tpm_counts: reserved` deployment keeps its reservation (only an overage is charged);
    requests stay taken."""
    if usage is None:
        return [(lim, n) for lim, n in zip(d.limits, d.needs)]
    actual = usage.prompt_tokens + usage.completion_tokens
    out = []
    for lim, n in zip(d.limits, d.needs):
        if lim.unit != TOKENS:
            continue
        delta = n - actual
        if delta > 0 and lim.owner == DEPLOYMENT and tpm_counts == "reserved":
            continue
        if delta:
            out.append((lim, delta))
    return out


class RateScheduler:
    """The `Admission` the scheduler middleware installs on every request's context."""

    def __init__(self, deployments: Iterable["Deployment"], *, clock: Any, wall: Any, metrics: "Metrics",
                 default_max_tokens: int = 4096, model_of: dict[str, str] | None = None) -> None:
        self.clock = clock
        self.model_of = dict(model_of or {})  # deployment id -> the configured model it serves
        self.wall = wall
        self.metrics = metrics
        define_metrics(metrics)
        self.default_max_tokens = default_max_tokens
        self.table = BucketTable()
        self.remote: Any = None  # RedisBuckets, set by the middleware when redis_url is set
        self.poll = math.inf  # seconds between retries of a waiter the mirror cannot predict
        self.lanes: dict[str, Lane] = {}
        self.count_lanes: dict[str, Lane] = {}  # token counting's own buckets (count_lane)
        self.waiting: set[Lane] = set()
        for dep in deployments:
            self.lanes[dep.id] = Lane(dep, deployment_limits(dep), self)

    def lane(self, dep: "Deployment") -> Lane:
        lane = self.lanes.get(dep.id)
        if lane is None:  # a deployment the config did not list (a test building its own)
            lane = self.lanes[dep.id] = Lane(dep, deployment_limits(dep), self)
        return lane

    def count_lane(self, dep: "Deployment") -> Lane:
        """The deployment's lane for token counting: a bucket of its own holding
        `COUNT_SHARE` of the deployment's `rpm` (at least 1 a minute), so counting never
        takes the requests its Messages or Responses calls need, nor the key's or team's."""
        lane = self.count_lanes.get(dep.id)
        if lane is None:
            limits: tuple[Limit, ...] = ()
            if dep.rpm is not None:
                rpm = max(1.0, dep.rpm * COUNT_SHARE)
                burst = max(1.0, (dep.burst if dep.burst is not None else dep.rpm) * COUNT_SHARE)
                limits = (Limit(f"dep:{dep.id}:count:requests", DEPLOYMENT, REQUESTS, rpm, burst),)
            lane = self.count_lanes[dep.id] = Lane(dep, limits, self)
        return lane

    # -- the Admission protocol

    def has_capacity(self, dep: "Deployment") -> bool:
        """Room for one more request now: nobody queued, not paused, buckets not empty."""
        lane = self.lanes.get(dep.id)
        if lane is None:
            return True
        if lane.size:
            return False
        now = self.clock()
        if lane.paused_until > now:
            return False
        for lim in lane.limits:
            b = self.table.bucket(lim, now)
            if b.refill(now) < (1.0 if lim.unit == REQUESTS else min(b.capacity, 1.0)):
                return False
        return True

    def acquire(self, ctx: "Context", dep: "Deployment") -> Awaitable[Lease | _NoLease]:
        """Runs before each upstream attempt on `dep`; returns when it may start. Raises
        the 429 when it may not; a cancellation (the client left) leaves the queue. Traced
        as a span of its own (`llmproxy.scheduler.wait`, with the seconds waited); untraced,
        the admission's own coroutine is what the caller awaits (no frame more)."""
        if ctx.tracer is None:
            return self._acquire(ctx, dep)
        return self._traced(ctx, dep)

    async def _traced(self, ctx: "Context", dep: "Deployment") -> Lease | _NoLease:
        t0 = self.clock()
        with ctx.trace("llmproxy.scheduler.wait", {"llmproxy.deployment": dep.id}) as span:
            try:
                return await self._acquire(ctx, dep)
            finally:
                span.set_attribute("llmproxy.scheduler.wait_seconds", self.clock() - t0)

    async def _acquire(self, ctx: "Context", dep: "Deployment") -> Lease | _NoLease:
        model = self.model_of.get(dep.id) or (ctx.model.name if ctx.model is not None else dep.id)
        if ctx.api in COUNT_APIS:
            lane = self.count_lane(dep)
            demand = Demand(tenant_of(ctx.principal), lane.limits, (1.0,) * len(lane.limits), (), 0)
        else:
            lane = self.lane(dep)
            demand = demand_of(ctx, lane.limits, self.default_max_tokens, model)
        if not demand:
            return NO_LEASE
        now = self.clock()
        w: Waiter | None = None
        queued = False  # w has had a place in the queue (and keeps it when turned back)
        while True:
            table = self.table
            if w is None and not lane.size and lane.paused_until <= now and table.blocking(demand, now)[0] is None:
                table.take(demand, now)
                lease = Lease(self, lane, demand, table)
            else:
                if w is None:
                    w = Waiter(demand, model, now, now + dep.max_queue_wait)
                if queued:
                    w.future = asyncio.get_running_loop().create_future()
                    lane.enqueue(w, front=True)
                else:
                    try:
                        lane.enqueue(w)
                    except Refusal as refusal:
                        raise self.refused(lane, demand, model, refusal) from None
                    queued = True
                lane.pump()
                try:
                    lease = await w.future
                except Refusal as refusal:
                    raise self.refused(lane, demand, model, refusal) from None
                except asyncio.CancelledError:
                    self._abandon(lane, w)
                    raise
            if self.remote is None:
                self.metrics.observe(WAIT_SECONDS, lane.label, self.clock() - (w.enqueued if w else now))
                return lease
            if w is None:
                w = Waiter(demand, model, now, now + dep.max_queue_wait)
            if await self.remote.confirm(lease, w):
                self.metrics.observe(WAIT_SECONDS, lane.label, self.clock() - w.enqueued)
                return lease
            # The shared buckets said no (another replica took the room) or Redis failed
            # and the fallback table is now in use: wait again, keeping the place.
            now = self.clock()

    def _abandon(self, lane: Lane, w: Waiter) -> None:
        fut = w.future
        if fut.done() and not fut.cancelled() and fut.exception() is None:
            fut.result().release(None)  # granted while we were leaving: give it back
        else:
            lane.cancel(w)

    # -- called by lanes and leases

    def granted(self, lane: Lane, w: Waiter, now: float) -> None:
        if not w.future.done():
            w.future.set_result(Lease(self, lane, w.demand, self.table))
        else:  # its task was cancelled and has not run its way out of the queue yet
            self.table.give_back(w.demand, now)

    def released(self) -> None:
        for lane in list(self.waiting):
            lane.pump()

    def queue_depth(self, lane: Lane, delta: int) -> None:
        self.metrics.inc(QUEUE_DEPTH, lane.label, delta)
        if lane.size:
            self.waiting.add(lane)
        else:
            self.waiting.discard(lane)

    def feedback(self, lane: Lane, status: int, headers: list[tuple[str, str]]) -> Any:
        """Apply what a provider's answer says to this process's buckets; answer it
        (limits, pause seconds) when it said anything."""
        limits = provider_limits(headers, self.wall())
        if not limits and status != 429:
            return None
        now = self.clock()
        table = self.table
        for lim in lane.limits:
            window = limits.requests if lim.unit == REQUESTS else limits.token_bound()
            if window is not None:
                table.bucket(lim, now).tighten(window.remaining * table.share, now)
        pause = limits.exhausted_until()
        if status == 429:
            pause = limits.retry_after if limits.retry_after is not None else (pause or 1.0)
        if pause:
            lane.pause(pause, now)
        return limits, pause

    # -- 429s

    def refused(self, lane: Lane, demand: Demand, model: str, refusal: Refusal) -> ProxyError:
        reason = refusal.reason
        self.metrics.inc(RATE_LIMITED, (reason,))
        block = refusal.block
        now = self.clock()
        if reason in ("queue_full", "wait_too_long"):
            applied = lane.limits
            why = (f"{lane.size} requests are already waiting" if reason == "queue_full" else
                   f"it would wait more than the {lane.dep.max_queue_wait:g} seconds allowed")
        else:
            owner = block.owner
            applied = tuple(lim for lim in demand.limits if lim.owner == owner) or lane.limits
            who = "this team's subscription" if owner == "subscription" else f"this {owner}"
            if isinstance(block, Parallel):
                why = f"{who} may have at most {block.limit} requests in flight"
            else:
                per = "requests" if block.unit == REQUESTS else "tokens"
                why = f"{who}'s limit of {int(block.per_minute)} {per} per minute is reached"
        headers = {"retry-after": retry_after_seconds(refusal.retry_after)}
        headers.update(self.limit_headers(applied, now))
        return ProxyError(429, f"Rate limit reached for model '{model}': {why}. "
                               f"Try again in {headers['retry-after']}s.",
                          "rate_limit_error", "rate_limit_exceeded", headers=headers)

    def limit_headers(self, limits: Iterable[Limit], now: float) -> dict[str, str]:
        """OpenAI's `x-ratelimit-{limit,remaining,reset}-{requests,tokens}`: the limit per
        minute, what is left now, and the time until the bucket is full again."""
        out = {}
        for lim in limits:
            b = self.table.bucket(lim, now)
            out[f"x-ratelimit-limit-{lim.unit}"] = str(int(lim.per_minute))
            out[f"x-ratelimit-remaining-{lim.unit}"] = str(max(0, math.floor(b.refill(now))))
            out[f"x-ratelimit-reset-{lim.unit}"] = format_duration(b.time_to_full(now))
        return out

    def pump_all(self) -> None:
        """Re-examine every queue now (tests moving an injected clock call this)."""
        for lane in list(self.waiting):
            lane.pump()
