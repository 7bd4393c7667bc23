"""Where answers are kept: an in-process LRU bounded in bytes, and Redis when there is one.

An `Entry` is one answer as its first client got it: the SSE bytes of a stream or the JSON
bytes of an answer, with what it used (for the tokens a hit saves, and to write a usage
chunk an earlier client did not ask for), when it was stored and until when it may be used.

`LocalStore`: an `OrderedDict` in recency order; a get moves the entry to the end, a put
evicts from the front until the bytes held fit `max_bytes`. Both O(1) amortized.

`RedisStore`: one key per entry (`prefix` + the request key in hex) holding the entry
serialized and zlib-compressed, with Redis's own expiry set to the entry's. Every call is
bounded by the client's timeouts (`services.open_redis`, 0.25 s), and a failure, a timeout
or a value that does not decode is a miss: the cache never fails a request. Values of
`OFF_LOOP_BYTES` or more are compressed and decompressed in a thread (zlib lets go of the GIL).
"""

from __future__ import annotations

import asyncio
import time
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable

import orjson
import structlog

log = structlog.get_logger("llmproxy.middlewares.cache")

OFF_LOOP_BYTES = 256 * 1024
ENTRY_OVERHEAD = 256  # bytes an entry costs besides its body: the object, its key, the table slot
_FORMAT = 1  # the serialized entry's version: another one is a miss (a replica of another release)


@dataclass(frozen=True, slots=True)
class Entry:
    kind: str  # "sse" | "json"
    body: bytes
    content_type: str
    stored_at: float  # wall clock, seconds
    expires_at: float
    # Tokens the answer used, as the record had them: prompt, completion, cached, cache
    # creation, reasoning.
    usage: tuple[int, int, int, int, int] = (0, 0, 0, 0, 0)
    # OpenAI streams: where the usage-only chunk is in `body` (the first client asked for it),
    # so it can be left out for a client that did not; None when the stream has none.
    usage_span: tuple[int, int] | None = None

    @property
    def size(self) -> int:
        return len(self.body) + ENTRY_OVERHEAD

    def fresh(self, now: float, max_age: float | None) -> bool:
        return now < self.expires_at and (max_age is None or now - self.stored_at <= max_age)

    def dumps(self) -> bytes:
        meta = [_FORMAT, self.kind, self.content_type, self.stored_at, self.expires_at, list(self.usage),
                list(self.usage_span) if self.usage_span is not None else None]
        return orjson.dumps(meta) + b"\n" + self.body

    @classmethod
    def loads(cls, data: bytes) -> "Entry | None":
        """An entry from `dumps`'s bytes, or None when they are not one (a miss)."""
        cut = data.find(b"\n")
        if cut < 0:
            return None
        try:
            meta = orjson.loads(data[:cut])
            version, kind, ctype, stored, expires, usage, span = meta
            if version != _FORMAT or kind not in ("sse", "json"):
                return None
            return cls(kind, data[cut + 1:], str(ctype), float(stored), float(expires),
                       tuple(int(u) for u in usage), tuple(span) if span is not None else None)  # type: ignore[arg-type]
        except (orjson.JSONDecodeError, TypeError, ValueError):
            return None


class LocalStore:
    """This process's entries, most recently used last, at most `max_bytes` of them."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.entries: OrderedDict[bytes, Entry] = OrderedDict()
        self.bytes = 0

    def get(self, key: bytes, now: float, max_age: float | None = None) -> Entry | None:
        """The entry if it is fresh at `now` (and at most `max_age` old); an expired one is dropped."""
        entry = self.entries.get(key)
        if entry is None:
            return None
        if not entry.fresh(now, max_age):
            if entry.expires_at <= now:
                self._drop(key)
            return None
        self.entries.move_to_end(key)
        return entry

    def put(self, key: bytes, entry: Entry) -> None:
        size = entry.size
        if size > self.max_bytes:
            return
        if key in self.entries:
            self._drop(key)
        entries = self.entries
        entries[key] = entry
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, old = entries.popitem(last=False)
            self.bytes -= old.size

    def _drop(self, key: bytes) -> None:
        old = self.entries.pop(key, None)
        if old is not None:
            self.bytes -= old.size

    def __len__(self) -> int:
        return len(self.entries)


class RedisStore:
    """Entries in Redis, shared by every replica; any failure is a miss (logged, at most
    once every `quiet` seconds so that an outage does not flood the log)."""

    def __init__(self, redis: Any, prefix: str, clock: Callable[[], float] = time.monotonic,
                 quiet: float = 10.0) -> None:
        self.redis = redis
        self.prefix = prefix.encode()
        self.clock = clock
        self.quiet = quiet
        self.failures = 0  # calls that failed, since start
        self._logged_at: float | None = None

    def name(self, key: bytes) -> bytes:
        return self.prefix + key.hex().encode()

    async def get(self, key: bytes) -> Entry | None:
        try:
            raw = await self.redis.get(self.name(key))
        except Exception as exc:  # down, hung (the client's timeout), refused: a miss
            self._failed("get", exc)
            return None
        if raw is None:
            return None
        try:
            data = zlib.decompress(raw) if len(raw) < OFF_LOOP_BYTES else await asyncio.to_thread(zlib.decompress, raw)
        except zlib.error:
            return None
        return Entry.loads(data)

    async def put(self, key: bytes, entry: Entry) -> None:
        """Store a new entry, for its lifetime (it is stored as soon as it is made)."""
        ttl_ms = int((entry.expires_at - entry.stored_at) * 1000)
        if ttl_ms <= 0:
            return
        data = entry.dumps()
        packed = zlib.compress(data, 1) if len(data) < OFF_LOOP_BYTES else \
            await asyncio.to_thread(zlib.compress, data, 1)
        try:
            await self.redis.set(self.name(key), packed, px=ttl_ms)
        except Exception as exc:
            self._failed("set", exc)

    def _failed(self, op: str, exc: BaseException) -> None:
        self.failures += 1
        now = self.clock()
        if self._logged_at is None or now - self._logged_at >= self.quiet:
            self._logged_at = now
            log.warning("cache_redis_failed", op=op, error=f"{type(exc).__name__}: {exc}",
                        failures=self.failures, effect="served as a miss")
