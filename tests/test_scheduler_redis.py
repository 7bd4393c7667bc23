"""The scheduler's shared buckets: three proxies on one private Redis hold one global
limit; Redis killed mid-run, requests keep flowing on each replica's share; Redis back,
the replicas go back to it; one script per admission and one per completion."""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import time
from types import SimpleNamespace
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp.test_utils import TestServer

from llmproxy.config import parse_config
pytest.importorskip("llmproxy.middlewares.scheduler", reason="the scheduler middleware is not installed")
from llmproxy.middlewares.scheduler import Scheduler
from llmproxy.plugins import Registry
from llmproxy.server import Gateway
from llmproxy.testing import hang

from .conftest import MASTER, service_missing
from .test_scheduler import FakePrincipal

AUTH = {"Authorization": f"Bearer {MASTER}"}
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PrivateRedis:
    """A redis-server of our own on a random port, killed by its PID."""

    def __init__(self, tmp_path) -> None:
        self.port = _free_port()
        self.dir = tmp_path
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.dir)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.1).close()
                return
            except OSError:
                time.sleep(0.02)
        raise RuntimeError("redis-server did not start")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def private_redis(tmp_path):
    if shutil.which("redis-server") is None:
        service_missing("redis-server", FileNotFoundError("not on PATH"))
    r = PrivateRedis(tmp_path)
    r.start()
    yield r
    r.kill()


@pytest.fixture
async def proxies(tmp_path, upstream):
    servers: list[TestServer] = []

    async def start(n: int, redis_url: str, dep: dict[str, Any], scheduler: dict[str, Any] | None = None):
        out = []
        for _ in range(n):
            i = len(servers)
            cfg = parse_config({
                "master_key": MASTER, "redis_url": redis_url,
                "database": {"sqlite_path": str(tmp_path / f"p{i}.db")}, "spend": {"enabled": False},
                "middlewares": ["fake_principal", {"scheduler": {"heartbeat_interval": 0.3, **(scheduler or {})}}],
                "models": [{"name": "m", "deployments": [{"provider": "openai", "model": "up", "api_key": "k",
                                                          "api_base": upstream.url + "/v1", **dep}]}]})
            registry = Registry.from_entry_points()
            registry.middlewares.update(
                Registry.from_classes(middlewares={"fake_principal": FakePrincipal}).middlewares)
            gateway = Gateway(cfg, registry)
            server = TestServer(gateway.app(), host="127.0.0.1")
            await server.start_server()
            servers.append(server)
            sched = next(m for m in gateway.middlewares if isinstance(m, Scheduler))
            out.append(SimpleNamespace(url=f"http://127.0.0.1:{server.port}", gateway=gateway, sched=sched))
        return out

    yield start
    for server in servers:
        await server.close()


async def _hammer(s: aiohttp.ClientSession, url: str, until: float, log: list, headers: dict | None = None):
    """Requests one after another until `until` (loop time); each outcome logged with its time."""
    loop = asyncio.get_running_loop()
    while loop.time() < until:
        async with s.post(url + "/v1/chat/completions", json=CHAT, headers={**AUTH, **(headers or {})}) as r:
            await r.read()
            log.append((loop.time(), r.status))
        if r.status == 429:
            await asyncio.sleep(0.02)


async def _wait_replicas(ps, n: int) -> None:
    for _ in range(100):
        if all(p.sched.remote.replicas == n for p in ps):
            return
        await asyncio.sleep(0.05)
    raise AssertionError([p.sched.remote.replicas for p in ps])


async def test_three_replicas_share_one_bucket(private_redis, proxies):
    window, burst, per_s = 10.0, 5, 1.0
    ps = await proxies(3, private_redis.url, {"rpm": 60, "burst": burst, "max_queue_size": 0})
    await _wait_replicas(ps, 3)
    loop = asyncio.get_running_loop()
    log: list = []
    start = loop.time()
    async with aiohttp.ClientSession() as s:
        await asyncio.gather(*[_hammer(s, p.url, start + window, log) for p in ps for _ in range(2)])
    admitted = [t for t, status in log if status == 200]
    assert {status for _, status in log} == {200, 429}
    assert sum(1 for t in admitted if t <= start + window) <= burst + per_s * window + 1
    assert len(admitted) >= burst + per_s * window - 3  # and the shared bucket did refill
    per_proxy = [p.sched.remote.round_trips for p in ps]
    assert all(n > 0 for n in per_proxy)  # every replica took from the shared bucket


async def test_redis_killed_mid_run_then_back(private_redis, proxies):
    # 600 a minute, 30 at once, globally; a third of that per replica without Redis
    ps = await proxies(3, private_redis.url, {"rpm": 600, "burst": 30, "max_queue_size": 0})
    await _wait_replicas(ps, 3)
    loop = asyncio.get_running_loop()
    async with aiohttp.ClientSession() as s:
        before: list = []
        await asyncio.gather(*[_hammer(s, p.url, loop.time() + 1.0, before) for p in ps])
        private_redis.kill()
        killed = loop.time()
        after: list = []
        await asyncio.gather(*[_hammer(s, p.url, killed + 2.0, after, ) for p in ps])
        assert {status for _, status in after} <= {200, 429}  # no request failed because Redis did
        admitted = sum(1 for _, status in after if status == 200)
        assert admitted >= 10  # requests kept flowing
        assert admitted <= 3 * (10 + 10 / 3 * 2.0) + 3  # each replica kept to its share, not the whole
        for p in ps:
            assert p.sched.remote.fallback
            async with s.get(p.url + "/health/readiness") as r:
                assert orjson.loads(await r.read())["scheduler"] == "local-fallback"
        private_redis.start()  # same port: the heartbeat finds it and the replicas go back
        for _ in range(100):
            if not any(p.sched.remote.fallback for p in ps):
                break
            await asyncio.sleep(0.05)
        assert not any(p.sched.remote.fallback for p in ps)
        async with s.get(ps[0].url + "/health/readiness") as r:
            assert orjson.loads(await r.read())["scheduler"] == "ok"
        async with s.post(ps[0].url + "/v1/chat/completions", json=CHAT, headers=AUTH) as r:
            assert r.status == 200


@pytest.mark.parametrize("counts, per_request", [("reserved", 1), ("actual", 2)])
async def test_one_round_trip_per_admission_and_per_completion(private_redis, proxies, counts, per_request):
    import redis.asyncio as aioredis

    (p,) = await proxies(1, private_redis.url, {"rpm": 10 ** 6, "tpm": 10 ** 9, "tpm_counts": counts},
                         {"heartbeat_interval": 60})
    client = aioredis.from_url(private_redis.url)
    try:
        async def scripts() -> int:
            stats = await client.info("commandstats")
            return sum(stats.get(f"cmdstat_{c}", {}).get("calls", 0) for c in ("evalsha", "eval"))
        n = 20
        async with aiohttp.ClientSession() as s:
            before = await scripts()
            for _ in range(n):  # 51 tokens reserved, 18 used: only tpm_counts actual gives some back
                async with s.post(p.url + "/v1/chat/completions", json={**CHAT, "max_tokens": 50},
                                  headers=AUTH) as r:
                    assert r.status == 200
                    await r.read()
            await asyncio.sleep(0.1)
        assert await scripts() - before == n * per_request
    finally:
        await client.aclose()


async def test_parallel_cap_holds_across_replicas(private_redis, proxies, upstream):
    a, b = await proxies(2, private_redis.url, {"max_queue_wait": 0.6})
    par = {**AUTH, "x-test-key": "k", "x-test-parallel": "1"}
    upstream.push(hang(3))
    async with aiohttp.ClientSession() as s:
        slow = asyncio.create_task(s.post(a.url + "/v1/chat/completions", json=CHAT, headers=par))
        for _ in range(500):  # bounded: the slow request reaches the upstream within 5 s
            if upstream.requests or slow.done():
                break
            await asyncio.sleep(0.01)
        assert upstream.requests, "the first request never reached the upstream"
        t0 = time.monotonic()
        async with s.post(b.url + "/v1/chat/completions", json=CHAT, headers=par) as r:
            assert r.status == 429
            assert "in flight" in orjson.loads(await r.read())["error"]["message"]
        assert 0.4 <= time.monotonic() - t0 <= 1.5  # it waited its allowance, polling the shared cap
        slow.cancel()
        await asyncio.gather(slow, return_exceptions=True)
        for _ in range(50):  # the slot is freed in Redis: the other replica may go now
            async with s.post(b.url + "/v1/chat/completions", json=CHAT, headers=par) as r:
                if r.status == 200:
                    break
            await asyncio.sleep(0.05)
        assert r.status == 200


async def test_provider_429_pauses_the_deployment_on_every_replica(private_redis):
    """Feedback reaches the shared state with the release: another replica holds off too."""
    import redis.asyncio as aioredis

    from llmproxy.config import Deployment, Model
    from llmproxy.metrics import Metrics
    from llmproxy.middlewares.scheduler import RateScheduler
    from llmproxy.middlewares.scheduler.redis import RedisBuckets
    from llmproxy.testing import make_context

    dep = Deployment(provider="openai", id="openai:d", rpm=600, max_queue_wait=0.5)
    model = Model(name="m", deployments=(dep,))
    replicas = []
    try:
        for _ in range(2):
            sched = RateScheduler([dep], clock=time.monotonic, wall=time.time, metrics=Metrics())
            remote = RedisBuckets(aioredis.from_url(private_redis.url, socket_timeout=0.25), sched, readiness={},
                                  heartbeat=60)
            await remote.start()
            replicas.append((sched, remote))

        def ctx():
            return make_context({"model": "m", "messages": [{"role": "user", "content": "x"}]}, model=model)
        (a, _), (b, remote_b) = replicas
        lease = await a.acquire(ctx(), dep)
        lease.feedback(429, [("retry-after", "30")])
        lease.release(None)
        await asyncio.sleep(0.05)
        with pytest.raises(Exception) as exc:
            await b.acquire(ctx(), dep)
        assert exc.value.status == 429 and int(exc.value.headers["retry-after"]) >= 29
        assert not b.has_capacity(dep)  # B learnt the pause from the shared state
    finally:
        for _, remote in replicas:
            await remote.stop()
            await remote.redis.aclose()


# -- a Redis restart (issue 12): limits hold through it


def _pool_connections(pool) -> int:
    return len(getattr(pool, "_connections", []))


async def test_a_restart_costs_stale_pooled_connections_no_error(private_redis):
    """Every pooled connection is dead after a restart; each is retried once on a new
    connection instead of failing the call (which would flip limits to their fallback)."""
    from llmproxy.services import open_redis

    r = open_redis(private_redis.url, max_connections=8)
    try:
        await asyncio.gather(*(r.blpop(["nothing-here"], timeout=0.1) for _ in range(8)))
        private_redis.kill()
        private_redis.start()
        results = await asyncio.gather(*(r.ping() for _ in range(8)), return_exceptions=True)
        assert results == [True] * 8
        assert await r.ping()
    finally:
        await r.aclose()


async def _replicas_on(url: str, n: int, dep, clock=time.monotonic):
    import redis.asyncio as aioredis

    from llmproxy.metrics import Metrics
    from llmproxy.middlewares.scheduler import RateScheduler
    from llmproxy.middlewares.scheduler.redis import RedisBuckets

    out = []
    for _ in range(n):
        sched = RateScheduler([dep], clock=clock, wall=time.time, metrics=Metrics())
        remote = RedisBuckets(aioredis.from_url(url, socket_timeout=0.25), sched, readiness={}, heartbeat=60)
        await remote.start()
        out.append(remote)
    return out


def _ctx_for(model):
    from llmproxy.testing import make_context

    return make_context({"model": "m", "messages": [{"role": "user", "content": "x"}]}, model=model)


def _dep_and_model(**limits):
    from llmproxy.config import Deployment, Model

    dep = Deployment(provider="openai", id="openai:d", **limits)
    return dep, Model(name="m", deployments=(dep,))


async def _drain(remote, dep, model, n: int) -> None:
    from llmproxy.usage import Usage

    for _ in range(n):
        (await remote.sched.acquire(_ctx_for(model), dep)).release(Usage(1, 1))
    await asyncio.sleep(0.05)  # the settles land


async def _level(admin, dep) -> float:
    return float((await admin.hget(f"llmproxy:rl:dep:{dep.id}:requests", "l")).decode())


@pytest.fixture
async def three_replicas(private_redis):
    """(dep, model, a, b, c, admin): three replicas' Redis buckets for one deployment (4 at
    once, 6 a minute), and a plain client on the same private Redis."""
    import redis.asyncio as aioredis

    dep, model = _dep_and_model(rpm=6, burst=4, max_queue_size=0)
    replicas = await _replicas_on(private_redis.url, 3, dep)
    admin = aioredis.from_url(private_redis.url)
    yield (dep, model, *replicas, admin)
    for remote in replicas:
        await remote.stop()
        await remote.redis.aclose()
    await admin.aclose()


async def test_a_heartbeat_that_finds_redis_empty_writes_the_buckets_back(three_replicas):
    dep, model, a, b, c, admin = three_replicas
    for remote in (a, b, c):
        await remote.beat()
    assert [x.replicas for x in (a, b, c)] == [3, 3, 3]
    await _drain(a, dep, model, 4)  # the whole shared burst, taken on a
    await admin.flushall()  # what a restart without persistence does to the state
    await a.beat()
    assert a.reseeds == 1
    assert await _level(admin, dep) < 1  # written back as empty as it was, not refilled to 4
    with pytest.raises(Exception) as refused:  # b's own view is stale-full: Redis holds it
        await b.sched.acquire(_ctx_for(model), dep)
    assert refused.value.status == 429
    # The replica set holds one mark again, but the count stays 3 for the fallback share
    assert a.replicas == 3
    a._failed(ConnectionError("test"))
    assert a.sched.table.share == pytest.approx(1 / 3)
    bucket = a.sched.table.buckets[f"dep:{dep.id}:requests"]
    assert bucket.capacity == pytest.approx(4 / 3) and bucket.level < 1 / 3  # not refilled
    await a.beat()  # Redis answers again: back to the shared buckets, still not refilled
    assert not a.fallback and a.sched.table.share == 1.0
    assert a.sched.table.buckets[f"dep:{dep.id}:requests"].level < 1
    assert await _level(admin, dep) < 1


async def test_an_admission_that_finds_redis_empty_takes_nothing_until_written_back(three_replicas):
    """The replica that notices writes back first; the others at their next heartbeat (the
    new epoch tells them), each leaving the buckets at most as full as it saw them."""
    dep, model, a, b, c, admin = three_replicas
    await _drain(a, dep, model, 4)
    await _drain(b, dep, model, 0)
    await admin.flushall()
    lease = await b.sched.acquire(_ctx_for(model), dep)  # b saw the bucket full: its view is all it has
    lease.release(None)
    assert b.reseeds == 1 and await admin.exists("llmproxy:epoch")
    await a.beat()  # a sees the new epoch and writes back what it saw: empty
    assert a.reseeds == 1
    assert await _level(admin, dep) < 1
    with pytest.raises(Exception) as refused:
        await c.sched.acquire(_ctx_for(model), dep)
    assert refused.value.status == 429
    await c.beat()  # c knew the first epoch too; its view (full) changes nothing
    assert await _level(admin, dep) < 1


async def test_heartbeat_finds_the_state_lost_and_writes_back_slots(private_redis):
    """Without a request to notice, the next heartbeat notices: a parallel slot in flight
    is written back, so another replica still sees the cap full."""
    import redis.asyncio as aioredis

    from llmproxy.testing import make_context

    dep, model = _dep_and_model(max_queue_wait=0.2)
    (a,) = await _replicas_on(private_redis.url, 1, dep)
    admin = aioredis.from_url(private_redis.url)
    try:
        from llmproxy.testing import TestPrincipal

        ctx = make_context({"model": "m", "messages": [{"role": "user", "content": "x"}]}, model=model)
        ctx.principal = TestPrincipal(key_id="k", max_parallel_requests=1)
        lease = await a.sched.acquire(ctx, dep)
        assert a.held
        (slot_key,) = next(iter(a.held.values()))
        await admin.flushall()
        await a.beat()
        assert a.reseeds == 1 and not a.fallback
        assert await admin.zcard(slot_key) == 1
        assert await admin.exists("llmproxy:replicas") and await admin.exists("llmproxy:epoch")
        lease.release(None)
        await asyncio.sleep(0.05)
        assert await admin.zcard(slot_key) == 0
    finally:
        await a.stop()
        await a.redis.aclose()
        await admin.aclose()


async def test_limits_hold_through_a_redis_restart(private_redis, proxies):
    """Three replicas drain one bucket (10 at once, 1 a second); Redis restarts empty.
    What they admit in the next 2 s is what refilled, not a fresh bucket (10 more) nor a
    full local bucket each from a share computed as if alone (30 more)."""
    ps = await proxies(3, private_redis.url, {"rpm": 60, "burst": 10, "max_queue_size": 0})
    await _wait_replicas(ps, 3)
    loop = asyncio.get_running_loop()
    async with aiohttp.ClientSession() as s:
        before: list = []
        await asyncio.gather(*[_hammer(s, p.url, loop.time() + 1.0, before) for p in ps])
        assert 429 in {status for _, status in before}  # drained
        private_redis.kill()
        private_redis.start()
        after: list = []
        await asyncio.gather(*[_hammer(s, p.url, loop.time() + 2.0, after) for p in ps])
    assert {status for _, status in after} <= {200, 429}
    admitted = sum(1 for _, status in after if status == 200)
    assert admitted <= 1 + 2 * 1.0 + 3, admitted
    assert all(p.sched.remote.replicas == 3 for p in ps)
    assert sum(p.sched.remote.reseeds for p in ps) >= 1
