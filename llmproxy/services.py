"""Shared services handed to middlewares, providers and event sinks at construction.

Nothing here is reached through module globals: whoever needs a service is given it.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    import aiohttp

    from .config import Config
    from .metrics import Metrics


def worker_slot() -> tuple[int, int]:
    """(this worker's index, the number of workers): `(0, 1)` for a single process; a
    worker of `server.workers: N` is told its place by the supervisor (`LLMPROXY_WORKER`,
    "i/N"). Files of its own (the spend log's spill and WAL files) are named by it."""
    raw = os.environ.get("LLMPROXY_WORKER", "")
    try:
        i, n = (int(x) for x in raw.split("/"))
    except ValueError:
        return (0, 1)
    return (i, n) if 0 <= i < n else (0, 1)


@dataclass(slots=True)
class Services:
    config: "Config"
    metrics: "Metrics"
    http: "aiohttp.ClientSession | None" = None  # set at startup, one per process
    clock: Callable[[], float] = time.monotonic  # injectable for time-based logic
    wall: Callable[[], float] = time.time
    # Set at startup: the store (always), Redis (when redis_url is set), the invalidator
    # (cache invalidation across replicas, through Redis when there is one).
    store: Any = None
    redis: Any = None
    invalidator: Any = None
    readiness: dict[str, Any] = field(default_factory=dict)  # component -> state, shown on /health/readiness
    worker: tuple[int, int] = field(default_factory=worker_slot)  # (index, workers), see worker_slot
    registry: Any = None  # the plugin registry (`plugins.Registry`), for plugins that load plugins


def open_redis(url: str, max_connections: int = 256, timeout: float = 0.25) -> Any:
    """A redis.asyncio client whose calls time out quickly (`timeout`, seconds, for connecting,
    each call and waiting for a pooled connection): a hung Redis must slow nothing
    beyond these bounds (callers fall back to local state on errors).

    The pool blocks (up to the same short timeout) when all its connections are busy:
    redis-py's default pool raises "Too many connections" past 100 concurrent calls,
    which under load would look like Redis being down and flip every limit to its
    local fallback.

    A call on a pooled connection that Redis closed (it restarted) is retried once on a
    new connection, so a restart costs each stale connection nothing instead of one
    error. Timeouts are not retried (a hung Redis costs one `timeout`). A command runs
    twice only if Redis died between running it and answering, when a restarted Redis
    has lost its first effect anyway (and a doubled take or charge errs towards refusing)."""
    import redis.asyncio as aioredis
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff
    from redis.exceptions import ConnectionError as RedisConnectionError

    pool = aioredis.BlockingConnectionPool.from_url(
        url, max_connections=max_connections, timeout=timeout, socket_timeout=timeout,
        socket_connect_timeout=timeout, health_check_interval=15, retry_on_timeout=False,
        retry=Retry(NoBackoff(), 1), retry_on_error=[RedisConnectionError])
    return aioredis.Redis(connection_pool=pool)
