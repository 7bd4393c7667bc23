"""The `scheduler` middleware (SPEC §6): provider-aware queueing and rate limits.

It installs the admission step on `ctx.admission`; the forwarder calls it for the
deployment the router picked, before each upstream attempt (see
`llmproxy.middlewares.scheduler.admission`). Per deployment, `rpm` and `tpm` buckets refill
continuously up to `burst`; per key and team, `rpm_limit`, `tpm_limit` and
`max_parallel_requests` apply too. A request that cannot start waits in its deployment's
queue (round-robin across tenants, FIFO within one) for at most `max_queue_wait` seconds,
among at most `max_queue_size`; otherwise, or as soon as its predicted wait is known to be
too long, it gets a 429 with `Retry-After` and `x-ratelimit-*` headers.

Token estimate: prompt characters / 4 (rounded up) plus `max_tokens` /
`max_completion_tokens`, else `default_max_tokens`.

With `redis_url` set, every replica draws from the same buckets in Redis (one script per
admission, one per completion); when Redis stops answering, each replica falls back to
local buckets holding its share (1/N of every limit, N replicas by heartbeat) and returns
to Redis when it answers again (`llmproxy.middlewares.scheduler.redis`).

The package: bucket arithmetic (`bucket`), which limits a request takes from (`limits`),
this process's buckets (`table`), per-deployment fair queues (`lane`), the admission step
and its leases (`admission`), provider and 429 headers (`headers`) and the shared Redis
buckets with their local fallback (`redis`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import structlog

from .admission import NO_LEASE, Lease, RateScheduler, define_metrics
from .bucket import TokenBucket
from .headers import ProviderLimits, Window, format_duration, parse_duration, provider_limits
from .limits import Demand, Limit, Parallel, demand_of, deployment_limits, estimate_tokens, tenant_limits, tenant_of
from .table import BucketTable


log = structlog.get_logger("llmproxy.scheduler")


def _local_level(table: BucketTable, lim: Limit, now: float) -> float:
    """A bucket's level in this process's table, without making one (absent: full)."""
    b = table.buckets.get(lim.id)
    return lim.capacity * table.share if b is None else b.refill(now)


def _bucket_row(lim: Limit, level: float) -> dict[str, Any]:
    remaining = max(0, math.floor(level))
    return {"from": lim.owner, "limit": int(lim.per_minute), "remaining": remaining,
            "used": max(0, math.ceil(lim.capacity - level)),
            "resets_in_seconds": round(max(0.0, lim.capacity - level) / lim.rate, 3)}

if TYPE_CHECKING:
    from llmproxy.context import Context, Next, Reply
    from llmproxy.services import Services


@dataclass(frozen=True)
class Options:
    default_max_tokens: int = field(default=4096, metadata={"min": 0})  # output estimate without max_tokens
    redis_prefix: str = field(default="llmproxy:", metadata={"min_len": 1})  # Redis key prefix
    heartbeat_interval: float = field(default=3.0, metadata={"gt": 0})  # seconds between replica heartbeats
    parallel_lease_ttl: float = field(default=60.0, metadata={"gt": 0})  # seconds a parallel slot outlives its replica
    replicas: int = field(default=1, metadata={"min": 1})  # N assumed until a heartbeat has counted them


class Scheduler:
    """Middleware `scheduler` (see the module docstring)."""

    Options = Options

    def __init__(self, options: Options | None, services: "Services") -> None:
        self.options = options = options or Options()
        self.services = services
        models = services.config.models if services.config else ()
        deployments = [d for m in models for d in m.deployments]
        self.admission = RateScheduler(deployments, clock=services.clock, wall=services.wall,
                                       metrics=services.metrics, default_max_tokens=options.default_max_tokens,
                                       model_of={d.id: m.name for m in models for d in m.deployments})
        self.remote = None

    def order_note(self) -> str | None:
        """What it means that `pii` or `cache` is listed after the scheduler (SPEC §3 calls
        that order a choice with a cost): here, nothing for quota, since the admission
        happens when the forwarder sends upstream wherever the scheduler is listed."""
        names = [m.name for m in self.services.config.middlewares] if self.services.config else []
        if "scheduler" not in names:
            return None
        after = [n for n in names[names.index("scheduler") + 1:] if n in ("pii", "cache")]
        if not after:
            return None
        return (f"scheduler is listed before {' and '.join(after)}: quota is still taken only when a "
                f"request goes upstream (the forwarder asks), so requests that {' or '.join(after)} answers or "
                "refuses take none, and the 429s it gives pass through every middleware; its place in the list "
                "changes nothing (SPEC §3's recommended order lists it last)")

    async def startup(self) -> None:
        """With Redis: start the shared buckets and the replica heartbeat."""
        note = self.order_note()
        if note is not None:
            log.warning("middleware_order", detail=note)
        s = self.services
        if s.redis is None:
            return
        from llmproxy.middlewares.scheduler.redis import RedisBuckets

        o = self.options
        self.remote = RedisBuckets(s.redis, self.admission, readiness=s.readiness, prefix=o.redis_prefix,
                                   heartbeat=o.heartbeat_interval, lease_ttl=o.parallel_lease_ttl,
                                   replicas=o.replicas)
        await self.remote.start()

    async def shutdown(self) -> None:
        if self.remote is not None:
            await self.remote.stop()

    def health(self) -> dict[str, Any]:
        """For /health/readiness: where the buckets are, and the replicas they are shared by."""
        remote = self.remote
        if remote is None:
            return {"scheduler": {"mode": "local", "replicas": 1}}
        return {"scheduler": {"mode": "local-fallback" if remote.fallback else "redis", "replicas": remote.replicas}}

    async def describe_limits(self, ctx: "Context", report: dict[str, Any]) -> None:
        """`GET /v1/limits`: per model, the caller's rate limits (key, team, subscription)
        as `rpm`, `tpm` and `max_parallel_requests`, each the binding one of those that
        apply (the least left; all of them under `all`), with what is left now, what is
        used (a bucket refills continuously: used is what it lacks of full) and the seconds
        until it is full again. With Redis, the shared buckets' state; else this process's."""
        now = self.services.clock()
        table = self.admission.table
        for model, entry in report["models"].items():
            limits, slots = tenant_limits(ctx.principal, model)
            if not limits and not slots:
                continue
            shared = await self.remote.peek(limits, slots) if self.remote is not None else None
            if shared is not None:
                levels, in_use = shared
            else:
                levels = [_local_level(table, lim, now) for lim in limits]
                in_use = [table.inflight.get(par.id, 0) for par in slots]
            for unit, name in (("requests", "rpm"), ("tokens", "tpm")):
                rows = [_bucket_row(lim, level) for lim, level in zip(limits, levels) if lim.unit == unit]
                if rows:
                    entry[name] = {**min(rows, key=lambda r: (r["remaining"], r["limit"])), "all": rows}
            if slots:
                rows = [{"from": par.owner, "limit": par.limit, "in_flight": n, "remaining": max(0, par.limit - n)}
                        for par, n in zip(slots, in_use)]
                entry["max_parallel_requests"] = {**min(rows, key=lambda r: (r["remaining"], r["limit"])),
                                                  "all": rows}

    async def __call__(self, ctx: "Context", call_next: "Next") -> "Reply":
        """Installs the admission step; the wait, if any, happens when the forwarder asks."""
        ctx.admission = self.admission
        return await call_next(ctx)
