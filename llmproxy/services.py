"""Shared services handed to middlewares, providers and event sinks at construction.

Nothing here is reached through module globals: whoever needs a service is given it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    import aiohttp

    from .config import Config
    from .metrics import Metrics


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


def open_redis(url: str) -> Any:
    """A redis.asyncio client whose calls time out quickly: a hung Redis must slow nothing
    beyond these bounds (callers fall back to local state on errors)."""
    import redis.asyncio as aioredis

    return aioredis.from_url(url, socket_timeout=0.25, socket_connect_timeout=0.25,
                             health_check_interval=15, retry_on_timeout=False)
