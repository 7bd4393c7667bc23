"""Cache invalidation across replicas: "key K changed", "team T changed".

The admin API calls `publish(kind, id)` after a write; every cache in every replica that
`subscribe`d drops what it holds for that id. Locally this is a direct call; with Redis
the message also goes out on a pub/sub channel that every replica listens to. Pub/sub can
drop messages (a replica reconnecting misses what was sent meanwhile), so caches must also
bound the age of what they hold (`auth`'s `cache_ttl`): invalidation makes changes fast,
the TTL makes them certain.
"""

from __future__ import annotations

import asyncio
from typing import Any, Callable

import orjson
import structlog

log = structlog.get_logger("llmproxy.invalidation")

CHANNEL = "llmproxy:invalidate"
Listener = Callable[[str, str], None]  # (kind, id): kind is "key" or "team"


class Invalidator:
    def __init__(self, redis: Any = None) -> None:
        self.redis = redis
        self.listeners: list[Listener] = []
        self._task: asyncio.Task | None = None
        self.origin = id(self)

    def subscribe(self, listener: Listener) -> None:
        self.listeners.append(listener)

    def _deliver(self, kind: str, ident: str) -> None:
        for listener in self.listeners:
            try:
                listener(kind, ident)
            except Exception:
                log.exception("invalidation_listener_failed", kind=kind)

    async def publish(self, kind: str, ident: str) -> None:
        """Drop `ident` from this replica's caches now, and from the others' through Redis."""
        self._deliver(kind, ident)
        if self.redis is not None:
            try:
                await self.redis.publish(CHANNEL, orjson.dumps({"kind": kind, "id": ident, "origin": self.origin}))
            except Exception as exc:  # the TTL still bounds staleness elsewhere
                log.warning("invalidation_publish_failed", error=f"{type(exc).__name__}: {exc}")

    async def start(self) -> None:
        if self.redis is not None:
            self._task = asyncio.create_task(self._listen(), name="llmproxy-invalidation")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass

    async def _listen(self) -> None:
        """Listen forever, reconnecting with backoff; after a reconnect everything cached may
        have missed a message, so every listener is told to drop all (`kind="*"`)."""
        delay = 0.5
        while True:
            pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(CHANNEL)
                self._deliver("*", "*")
                delay = 0.5
                while True:
                    msg = await pubsub.get_message(timeout=5.0)
                    if msg is None or msg.get("type") != "message":
                        continue
                    try:
                        data = orjson.loads(msg["data"])
                    except orjson.JSONDecodeError:
                        continue
                    if data.get("origin") != self.origin:
                        self._deliver(str(data.get("kind")), str(data.get("id")))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("invalidation_listener_disconnected", error=f"{type(exc).__name__}: {exc}",
                            retry_in=delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
            finally:
                try:
                    await pubsub.aclose()
                except Exception:
                    pass
