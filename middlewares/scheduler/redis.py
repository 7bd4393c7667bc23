"""The shared buckets in Redis, and the local fallback when Redis does not answer.

Every replica draws from the same buckets: one hash per limit (`level`, `stamp`), one
sorted set per parallel cap (lease id -> expiry), one key per provider pause. Each step is
ONE Lua script, atomic, with time from Redis's own `TIME` (never a replica's clock):
- TAKE (one round trip per admission): refill every bucket of the demand, check every
  bucket, cap and pause, then take all or nothing. It answers the levels, which the
  replica's local table mirrors to decide when next to try;
- SETTLE (one round trip per completion, none when there is nothing to give back, charge,
  free or tighten): reconcile tokens, free the parallel slots, apply provider feedback;
- HEARTBEAT (every `heartbeat` seconds): this replica's mark in one sorted set (pruned by
  age, counted: N replicas alive), and the expiry of the parallel slots it holds pushed
  forward - a replica that dies leaks its slots for at most `lease_ttl` seconds.
(The replica count is one sorted set rather than a key per replica so that counting needs
no SCAN of the keyspace.)

Any Redis error or timeout (the client's are 0.25 s; a pooled connection that Redis
closed is retried once on a new one, see `services.open_redis`) switches this replica to a
local table holding 1/N of every limit, logged and shown as
`readiness["scheduler"] = "local-fallback"`; the next heartbeat that succeeds switches
back. No request fails because Redis did. N is the largest count of the last
`REPLICA_WINDOW` seconds, so a Redis that restarted empty (and counts one replica until
the others beat again) does not hand each replica the whole limit.

Neither switch refills a bucket: each table starts as full as the one it replaces
(`BucketTable.rescaled`). A Redis that lost its state (restarted empty, flushed, evicted)
would answer every bucket full. An `epoch` key marks the state: TAKE refuses while it is
missing, and HEARTBEAT answers it, so a replica learns of the loss at its next admission or
heartbeat and writes back what it knows (RESEED: each bucket at most as full as its own
table says, the parallel slots it holds, its mark, a new epoch); every other replica sees
the new epoch at its next heartbeat and writes back too. Until then the shared buckets are
as full as the first replica to notice saw them (under load each replica's view is recent).
A replica back from its fallback writes back its own view the same way.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import os
from typing import TYPE_CHECKING, Any

import structlog

from llmproxy.periodic import every

from .limits import REQUESTS, Demand
from .table import BucketTable

if TYPE_CHECKING:
    from .admission import Lease, RateScheduler
    from .headers import ProviderLimits

log = structlog.get_logger("llmproxy.scheduler")

_REFILL = """
local function now_s()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local function level_of(key, cap, rate, now)
  local v = redis.call('HMGET', key, 'l', 't')
  if not v[1] then return cap end
  local level = tonumber(v[1])
  local ts = tonumber(v[2])
  if now > ts then level = level + (now - ts) * rate end
  if level > cap then level = cap end
  return level
end
local function store(key, level, cap, rate, now)
  redis.call('HSET', key, 'l', tostring(level), 't', tostring(now))
  redis.call('PEXPIRE', key, math.ceil((cap - level) / rate * 1000) + 1000)
end
"""

# KEYS: pause, bucket hashes (nb), slot sets (ns), the epoch
# ARGV: nb, ns, lease id, lease ttl ms, then cap, rate, need per bucket, then limit per slot set
# -> {status, blocked or pause, levels...}; status -2: no epoch (Redis lost its state), nothing taken
TAKE = _REFILL + """
local nb, ns = tonumber(ARGV[1]), tonumber(ARGV[2])
if redis.call('EXISTS', KEYS[#KEYS]) == 0 then return {'-2', '0'} end
local now = now_s()
local pause = redis.call('PTTL', KEYS[1])
if pause > 0 then return {'-1', tostring(pause / 1000)} end
local out = {'0', '0'}
local levels = {}
local blocked = 0
for i = 1, nb do
  local a = 4 + (i - 1) * 3
  local cap, rate, need = tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3])
  local level = level_of(KEYS[1 + i], cap, rate, now)
  levels[i] = level
  if blocked == 0 and level < math.min(need, cap) then blocked = i end
end
local now_ms = math.floor(now * 1000)
for j = 1, ns do
  local key = KEYS[1 + nb + j]
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now_ms)
  if blocked == 0 and redis.call('ZCARD', key) >= tonumber(ARGV[4 + nb * 3 + j]) then blocked = nb + j end
end
if blocked == 0 then
  out[1] = '1'
  for i = 1, nb do
    local a = 4 + (i - 1) * 3
    local cap, rate, need = tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3])
    levels[i] = levels[i] - need
    store(KEYS[1 + i], levels[i], cap, rate, now)
  end
  local ttl = tonumber(ARGV[4])
  for j = 1, ns do
    redis.call('ZADD', KEYS[1 + nb + j], now_ms + ttl, ARGV[3])
    redis.call('PEXPIRE', KEYS[1 + nb + j], ttl)
  end
else
  out[2] = tostring(blocked)
end
for i = 1, nb do out[2 + i] = tostring(levels[i]) end
return out
"""

# KEYS: pause, bucket hashes (nb), slot sets (ns)
# ARGV: nb, ns, lease id, pause ms, then cap, rate, op, value per bucket
#   op 'd': give back value (> 0) or charge -value (< 0, debt bounded by that overage);
#   op 'b': the provider says at most value is left
SETTLE = _REFILL + """
local nb, ns = tonumber(ARGV[1]), tonumber(ARGV[2])
local now = now_s()
for i = 1, nb do
  local a = 4 + (i - 1) * 4
  local cap, rate, op, v = tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2]), ARGV[a + 3], tonumber(ARGV[a + 4])
  local level = level_of(KEYS[1 + i], cap, rate, now)
  if op == 'b' then
    if level > v then level = v end
  elseif v > 0 then
    level = math.min(cap, level + v)
  else
    level = math.max(level + v, math.min(level, v))
  end
  store(KEYS[1 + i], level, cap, rate, now)
end
for j = 1, ns do redis.call('ZREM', KEYS[1 + nb + j], ARGV[3]) end
local pause = tonumber(ARGV[4])
if pause > 0 and redis.call('PTTL', KEYS[1]) < pause then redis.call('SET', KEYS[1], '1', 'PX', pause) end
return 1
"""

# KEYS: the replica set, the epoch, then slot sets to renew
# ARGV: replica id, window ms, lease ttl ms, the epoch this replica knows ('' none), a new
#   epoch should there be none yet, then lease ids
# -> {replicas alive, epoch}, or {-1}: the epoch this replica knew is gone, nothing written
HEARTBEAT = """
local epoch = redis.call('GET', KEYS[2])
if not epoch then
  if ARGV[4] ~= '' then return {'-1', ''} end
  epoch = ARGV[5]
  redis.call('SET', KEYS[2], epoch)
end
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local window = tonumber(ARGV[2])
redis.call('ZADD', KEYS[1], now_ms, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now_ms - window)
redis.call('PEXPIRE', KEYS[1], window * 2)
local ttl = tonumber(ARGV[3])
for i = 3, #KEYS do
  redis.call('ZADD', KEYS[i], 'XX', now_ms + ttl, ARGV[3 + i])
  redis.call('PEXPIRE', KEYS[i], ttl)
end
return {tostring(redis.call('ZCARD', KEYS[1])), epoch}
"""

# KEYS: the replica set, the epoch, bucket hashes (nb), slot sets (ns)
# ARGV: nb, ns, replica id, window ms, lease ttl ms, a new epoch should there be none, then
#   cap, rate, level per bucket (each left at most that full), then the lease id per slot set
# -> {replicas alive, epoch}
RESEED = _REFILL + """
local nb, ns = tonumber(ARGV[1]), tonumber(ARGV[2])
local now = now_s()
for i = 1, nb do
  local a = 6 + (i - 1) * 3
  local cap, rate, v = tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3])
  if level_of(KEYS[2 + i], cap, rate, now) > v then store(KEYS[2 + i], v, cap, rate, now) end
end
local now_ms = math.floor(now * 1000)
local ttl = tonumber(ARGV[5])
for j = 1, ns do
  local key = KEYS[2 + nb + j]
  redis.call('ZADD', key, 'NX', now_ms + ttl, ARGV[6 + nb * 3 + j])
  if redis.call('PTTL', key) < ttl then redis.call('PEXPIRE', key, ttl) end
end
redis.call('SET', KEYS[2], ARGV[6], 'NX')
local window = tonumber(ARGV[4])
redis.call('ZADD', KEYS[1], now_ms, ARGV[3])
redis.call('PEXPIRE', KEYS[1], window * 2)
return {tostring(redis.call('ZCARD', KEYS[1])), redis.call('GET', KEYS[2])}
"""

REPLICA_WINDOW = 10.0  # seconds a heartbeat counts a replica alive


# KEYS: bucket hashes (nb), slot sets; ARGV: nb, then cap, rate per bucket
# -> {level per bucket..., slots in use per set...} (read only, for GET /v1/limits)
PEEK = _REFILL + """
local nb = tonumber(ARGV[1])
local now = now_s()
local out = {}
for i = 1, nb do
  out[i] = tostring(level_of(KEYS[i], tonumber(ARGV[2 * i]), tonumber(ARGV[2 * i + 1]), now))
end
local now_ms = math.floor(now * 1000)
for j = nb + 1, #KEYS do out[j] = tostring(redis.call('ZCOUNT', KEYS[j], now_ms, '+inf')) end
return out
"""


def _f(v: Any) -> float:
    return float(v.decode() if isinstance(v, bytes) else v)


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


class RedisBuckets:
    """The `remote` of a RateScheduler (see the module docstring)."""

    def __init__(self, redis: Any, sched: "RateScheduler", *, readiness: dict[str, Any], prefix: str = "llmproxy:",
                 heartbeat: float = 3.0, lease_ttl: float = 60.0, replicas: int = 1, poll: float = 0.5) -> None:
        self.redis = redis
        self.sched = sched
        self.readiness = readiness
        self.prefix = prefix
        self.heartbeat = heartbeat
        self.lease_ttl_ms = int(lease_ttl * 1000)
        self.replicas = replicas
        self.poll = poll
        self.id = os.urandom(6).hex()
        self._ids = itertools.count()
        self.fallback = False
        self.epoch: str | None = None  # set by whoever found Redis empty; a new one: Redis lost its state
        self._counts: list[tuple[float, int]] = []  # (time, replicas counted), the last REPLICA_WINDOW
        self.held: dict[str, tuple[str, ...]] = {}  # lease id -> slot keys, renewed by the heartbeat
        self._take = redis.register_script(TAKE)
        self._settle = redis.register_script(SETTLE)
        self._beat = redis.register_script(HEARTBEAT)
        self._reseed = redis.register_script(RESEED)
        self._peek = redis.register_script(PEEK)
        self._reseeding: asyncio.Future | None = None
        self.reseeds = 0  # times Redis was found without its state and written back
        self._tasks: set[asyncio.Task] = set()
        self._beater: asyncio.Task | None = None
        self.round_trips = 0  # scripts run for admissions and completions (not heartbeats)

    # -- lifecycle

    async def start(self) -> None:
        self.sched.remote = self
        self.sched.poll = self.poll
        try:
            for script in (self._take, self._settle, self._beat, self._reseed):
                script.sha = await self.redis.script_load(script.script)
        except Exception as exc:
            self._failed(exc)
        await self.beat()
        if not self.fallback:
            self.readiness["scheduler"] = "ok"
        self._beater = asyncio.create_task(every(self.heartbeat, self.beat, "scheduler_heartbeat"))

    async def stop(self) -> None:
        if self._beater is not None:
            self._beater.cancel()
            await asyncio.gather(self._beater, return_exceptions=True)
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=1.0)

    async def beat(self) -> None:
        keys = [self.prefix + "replicas", self.prefix + "epoch"]
        args: list[Any] = [self.id, int(REPLICA_WINDOW * 1000), self.lease_ttl_ms, self.epoch or "",
                           os.urandom(8).hex()]
        for lease_id, slot_keys in list(self.held.items()):
            for k in slot_keys:
                keys.append(k)
                args.append(lease_id)
        try:
            reply = await self._beat(keys=keys, args=args)
            n, epoch = int(_f(reply[0])), _s(reply[1])
            if n < 0 or self.fallback or (self.epoch is not None and epoch != self.epoch):
                # Redis lost its state (or this replica counted alone a while): tell it ours
                n = await self.write_back()
            else:
                self.epoch = epoch
        except Exception as exc:
            self._failed(exc)
            return
        self._counted(n)
        if self.fallback:
            self._restored()

    def _counted(self, n: int) -> None:
        """N for the fallback share: the most replicas counted in the last REPLICA_WINDOW
        (a Redis that restarted empty counts one until the others beat again)."""
        now = self.sched.clock()
        self._counts = [(t, c) for t, c in self._counts if now - t < REPLICA_WINDOW]
        self._counts.append((now, max(1, n)))
        self.replicas = max(c for _, c in self._counts)

    async def write_back(self) -> int:
        """RESEED: this replica's view into the shared buckets, each left at most as full as
        this replica's table says (once, however many requests found out at the same time).
        Answers the replicas alive."""
        if self._reseeding is None:
            self._reseeding = asyncio.ensure_future(self._write_back())
            self._reseeding.add_done_callback(self._written_back)
        return await asyncio.shield(self._reseeding)

    def _written_back(self, f: asyncio.Future) -> None:
        self._reseeding = None
        if not f.cancelled():
            f.exception()  # retrieved: each caller that awaited it handles it

    async def _write_back(self) -> int:
        table = self.sched.table
        now = self.sched.clock()
        p = self.prefix + "rl:"
        bucket_keys: list[str] = []
        levels: list[Any] = []
        for lim_id, b in list(table.buckets.items()):
            level = b.refill(now)
            if level < b.capacity:  # a full bucket is what Redis has without it
                bucket_keys.append(p + lim_id)
                levels += [repr(b.capacity / table.share), repr(b.rate / table.share), repr(level / table.share)]
        slots = [(k, lease_id) for lease_id, slot_keys in list(self.held.items()) for k in slot_keys]
        keys = [self.prefix + "replicas", self.prefix + "epoch", *bucket_keys, *(k for k, _ in slots)]
        args: list[Any] = [len(bucket_keys), len(slots), self.id, int(REPLICA_WINDOW * 1000), self.lease_ttl_ms,
                           os.urandom(8).hex(), *levels, *(lease_id for _, lease_id in slots)]
        reply = await self._reseed(keys=keys, args=args)
        n, self.epoch = int(_f(reply[0])), _s(reply[1])
        self.reseeds += 1
        log.warning("scheduler_redis_written_back",
                    detail="Redis lost the shared buckets (restarted or flushed) or this replica counted "
                           "alone for a while: wrote back this replica's view, no bucket refilled",
                    buckets=len(bucket_keys), slots=len(slots), replicas=n)
        return n

    # -- the switch

    def _failed(self, exc: BaseException) -> None:
        if self.fallback:
            return
        self.fallback = True
        share = 1.0 / self.replicas
        self.sched.table = self.sched.table.rescaled(share, self.sched.clock())
        self.sched.poll = math.inf
        self.readiness["scheduler"] = "local-fallback"
        log.warning("scheduler_redis_unreachable", error=f"{type(exc).__name__}: {exc}",
                    replicas=self.replicas, share=round(share, 4))
        self.sched.pump_all()

    def _restored(self) -> None:
        self.fallback = False
        self.sched.table = self.sched.table.rescaled(1.0, self.sched.clock())
        self.sched.poll = self.poll
        self.readiness["scheduler"] = "ok"
        log.info("scheduler_redis_restored", replicas=self.replicas)
        self.sched.pump_all()

    async def peek(self, limits: Any, slots: Any) -> tuple[list[float], list[int]] | None:
        """The shared levels of `limits` and the slots in use of `slots` now (read only);
        None in the fallback or when Redis does not answer (the caller reads its table)."""
        if self.fallback:
            return None
        p = self.prefix + "rl:"
        args: list[Any] = [len(limits)]
        for lim in limits:
            args += [lim.capacity, lim.rate]
        try:
            out = await self._peek(keys=[p + lim.id for lim in limits] + [p + s.id for s in slots], args=args)
        except Exception:
            return None
        values = [_f(v) for v in out]
        return values[:len(limits)], [int(v) for v in values[len(limits):]]

    # -- admission

    def _keys(self, d: Demand, dep_id: str) -> list[str]:
        p = self.prefix + "rl:"
        return ([p + "pause:" + dep_id] + [p + lim.id for lim in d.limits] + [p + s.id for s in d.slots]
                + [self.prefix + "epoch"])

    async def confirm(self, lease: "Lease", waiter: Any = None) -> bool:
        """Take on the shared buckets what `lease` took on the mirror. False: not taken
        there (the mirror is corrected, or the fallback table is now in use); wait again."""
        sched = self.sched
        d = lease.demand
        if lease.table is not sched.table:  # switched tables since: try again on the new one
            lease.table.give_back(d, sched.clock())
            return False
        if self.fallback:
            return True
        lease_id = f"{self.id}:{next(self._ids)}"
        args: list[Any] = [len(d.limits), len(d.slots), lease_id, self.lease_ttl_ms]
        for lim, n in zip(d.limits, d.needs):
            args += [repr(lim.capacity), repr(lim.rate), repr(n)]
        args += [s.limit for s in d.slots]
        keys = self._keys(d, lease.lane.dep.id)
        for attempt in range(2):
            self.round_trips += 1
            call = asyncio.ensure_future(self._take(keys=keys, args=args))
            try:
                reply = await asyncio.shield(call)
            except asyncio.CancelledError:
                call.add_done_callback(lambda f: self._undo(f, lease, lease_id))
                raise
            except Exception as exc:
                self._failed(exc)
                lease.table.give_back(d, sched.clock())
                return False
            if reply[0] not in (b"-2", "-2") or attempt:
                break
            # Redis lost its state and took nothing: write back what this replica knows, then
            # the same TAKE once more
            try:
                self._counted(await self.write_back())
            except asyncio.CancelledError:
                lease.table.give_back(d, sched.clock())
                raise
            except Exception as exc:
                self._failed(exc)
                lease.table.give_back(d, sched.clock())
                return False
        return self._taken(reply, lease, lease_id, waiter)

    def _taken(self, reply: list, lease: "Lease", lease_id: str, waiter: Any) -> bool:
        sched = self.sched
        d = lease.demand
        now = sched.clock()
        status = int(_f(reply[0]))
        if status == -2:  # Redis lost its state (again, or the TAKE's client left): nothing taken
            lease.table.give_back(d, now)
            self._spawn(self._recover())
            return False
        if status == -1:  # another replica saw the provider say stop
            lease.table.give_back(d, now)
            lease.lane.pause(_f(reply[1]), now)
            return False
        table = lease.table
        for lim, level in zip(d.limits, reply[2:]):
            b = table.bucket(lim, now)
            b.level, b.stamp = min(_f(level), b.capacity), now
        if status == 1:
            lease.remote = lease_id
            if d.slots:
                self.held[lease_id] = tuple(self.prefix + "rl:" + s.id for s in d.slots)
            return True
        table.free(d)  # the buckets were set from Redis; only the slots are ours to undo
        blocked = int(_f(reply[1]))
        if blocked > len(d.limits) and waiter is not None:  # a parallel cap full on other replicas
            waiter.held = d.slots[blocked - len(d.limits) - 1]
            waiter.not_before = now + self.poll  # past its deadline: refused now, not polled again
        return False

    def _undo(self, f: asyncio.Future, lease: "Lease", lease_id: str) -> None:
        """The client left while TAKE ran: give back whatever it took."""
        if f.cancelled() or f.exception() is not None:
            lease.table.give_back(lease.demand, self.sched.clock())
            return
        if self._taken(f.result(), lease, lease_id, None):
            lease.release(None)

    # -- completion

    def release(self, lease: "Lease", deltas: list, nothing_used: bool,
                feedback: "tuple[ProviderLimits, float | None] | None" = None) -> None:
        """One SETTLE, off the request path; skipped when there is nothing to tell Redis."""
        lease_id = lease.remote
        slot_keys = self.held.pop(lease_id, ())
        entries: list[tuple[Any, str, float]] = [(lim, "d", delta) for lim, delta in deltas]
        pause_ms = 0
        if feedback is not None:
            limits, pause = feedback
            for lim in lease.lane.limits:
                window = limits.requests if lim.unit == REQUESTS else limits.token_bound()
                if window is not None:
                    entries.append((lim, "b", window.remaining))
            pause_ms = int((pause or 0) * 1000)
        if not entries and not slot_keys and not pause_ms:
            return
        p = self.prefix + "rl:"
        keys = [p + "pause:" + lease.lane.dep.id] + [p + lim.id for lim, _, _ in entries] + list(slot_keys)
        args: list[Any] = [len(entries), len(slot_keys), lease_id, pause_ms]
        for lim, op, value in entries:
            args += [repr(lim.capacity), repr(lim.rate), op, repr(float(value))]
        self.round_trips += 1
        self._spawn(self._settle_quietly(keys, args))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _recover(self) -> None:
        try:
            self._counted(await self.write_back())
        except Exception as exc:
            self._failed(exc)
        self.sched.pump_all()

    async def _settle_quietly(self, keys: list, args: list) -> None:
        try:
            await self._settle(keys=keys, args=args)
        except Exception as exc:  # the slot expires with its lease; tokens stay charged
            log.debug("scheduler_settle_failed", error=f"{type(exc).__name__}: {exc}")
            self._failed(exc)
