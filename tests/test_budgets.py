"""Budgets: the ledger on its own (in-process and Redis: reserve, refuse, reconcile, period
counters, rebuild from the spend log, Redis down) and end to end through the `auth`
middleware (refusal with its headers, a team budget shared by keys and replicas, reset at
the next period, overshoot under concurrency within the documented bound)."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import time
import uuid
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import anthropic
import openai
import pytest
import redis.asyncio as aioredis
from aiohttp import web

from llmproxy import keys
pytest.importorskip("llmproxy.middlewares.auth", reason="the auth middleware is not installed")
from llmproxy.middlewares.auth.budgets import (Budget, BudgetExceeded, Ledger, estimate, estimate_request, nanos,
                              usd)
from llmproxy.config import Pricing
from llmproxy.store import SpendRow, StoreUnavailable, TeamInfo, open_store
from llmproxy.testing import make_context

from .conftest import REDIS_URL, openai_config, service_missing
from .test_auth import MESSAGES, add_key, auth_of, post

UTC = timezone.utc
DAY = 86400

# The fake upstream answers 11 prompt + 7 completion tokens; gpt-test costs $1 / $2 per 1M.
ACTUAL = 11 * 1000 + 7 * 2000  # nano-dollars per request: 25_000
# CHAT's estimate: "hi" is 1 token (2 chars / 4, rounded up), max_tokens 10.
ESTIMATE = 1 * 1000 + 10 * 2000  # 21_000


@pytest.fixture
async def store(tmp_path):
    s = await open_store(None, sqlite_path=str(tmp_path / "ledger.db"))
    await s.migrate()
    yield s
    await s.close()


@pytest.fixture(params=["local", "redis"])
async def backend(request) -> Any:
    """None for the in-process ledger, a Redis client for the shared one."""
    if request.param == "local":
        yield None
        return
    client = aioredis.from_url(await reachable_redis(), socket_timeout=0.25, socket_connect_timeout=0.25)
    yield client
    await client.aclose()


async def reachable_redis() -> str:
    """The shared Redis's URL; skips (fails under CI=true) when it does not answer."""
    client = aioredis.from_url(REDIS_URL, socket_connect_timeout=2)
    try:
        await client.ping()
    except Exception as exc:
        service_missing(f"Redis at {REDIS_URL}", exc)
    finally:
        await client.aclose()
    return REDIS_URL


_MINE: set[str] = set()  # key and team ids whose Redis counters this module created


def mine(ident: str) -> str:
    _MINE.add(ident)
    return ident


@pytest.fixture(autouse=True)
async def _drop_my_counters():
    """Delete the counters this test left in the shared Redis (only ours: others may be
    running their own tests against it)."""
    yield
    if not _MINE:
        return
    ids, _ = set(_MINE), _MINE.clear()
    client = aioredis.from_url(REDIS_URL, socket_timeout=0.5, socket_connect_timeout=0.5)
    try:
        for ident in ids:
            for scope in ("key", "team"):
                names = [n async for n in client.scan_iter(match=f"llmproxy:budget:{scope}:{ident}:*")]
                if names:
                    await client.delete(*names)
    except Exception:
        pass
    finally:
        await client.aclose()


async def add_budget_key(store, **fields: Any) -> str:
    key = await add_key(store, **fields)
    mine(keys.key_hash(key))
    return key


def new_team() -> str:
    return mine("org-" + uuid.uuid4().hex[:8])


def key_budget(limit: int, duration: timedelta | None = None, anchor: datetime | None = None) -> Budget:
    return Budget("key", mine("k-" + uuid.uuid4().hex), limit, anchor or datetime(2025, 1, 1, tzinfo=UTC), duration)


class Wall:
    def __init__(self, t: float | None = None) -> None:
        self.t = time.time() if t is None else t

    def __call__(self) -> float:
        return self.t


# ---------------------------------------------------------------------------- the ledger


async def test_reserve_refuse_reconcile(store, backend):
    ledger = Ledger(store, backend)
    b = key_budget(1000)
    r1 = await ledger.reserve([b], 600)
    assert await ledger.spent(b) == 600
    r2 = await ledger.reserve([b], 600)  # 600 < 1000: admitted (the overshoot the bound allows)
    assert await ledger.spent(b) == 1200
    with pytest.raises(BudgetExceeded) as info:
        await ledger.reserve([b], 1)
    assert info.value.spent == 1200 and info.value.budget == b and info.value.resets_at is None
    assert info.value.retry_after(time.time()) is None
    ledger.settle(r1, 100)
    ledger.settle(r2, 250)
    await ledger.drain()
    assert await ledger.spent(b) == 350
    await ledger.reserve([b], 0)  # a free model's request: admitted, adds nothing
    assert await ledger.spent(b) == 350


async def test_all_or_nothing_over_key_and_team(store, backend):
    ledger = Ledger(store, backend)
    kb = key_budget(10_000)
    tb = Budget("team", mine("t-" + uuid.uuid4().hex), 500)
    await ledger.reserve([kb, tb], 400)
    await ledger.reserve([kb, tb], 400)
    with pytest.raises(BudgetExceeded) as info:
        await ledger.reserve([kb, tb], 400)
    assert info.value.budget == tb
    assert (await ledger.spent(kb), await ledger.spent(tb)) == (800, 800)  # the key was not charged either


async def test_period_counters(store, backend):
    wall = Wall(datetime(2025, 3, 10, 12, tzinfo=UTC).timestamp())
    ledger = Ledger(store, backend, now=wall)
    anchor = datetime(2025, 3, 1, 6, tzinfo=UTC)
    b = key_budget(100, timedelta(days=1), anchor)
    period = datetime(2025, 3, 10, 6, tzinfo=UTC)
    c = ledger.counter(b, datetime.fromtimestamp(wall.t, UTC))
    assert c.name == f"llmproxy:budget:key:{b.id}:{int(period.timestamp())}"
    await ledger.reserve([b], 100)
    with pytest.raises(BudgetExceeded) as info:
        await ledger.reserve([b], 1)
    assert info.value.resets_at == period + timedelta(days=1)
    assert info.value.retry_after(wall.t) == 18 * 3600
    if backend is not None:  # expires a day after the period ends
        ttl = await backend.ttl(c.name)
        assert 18 * 3600 + DAY - 5 <= ttl <= 18 * 3600 + DAY
    wall.t += 18 * 3600  # the next period: a fresh counter
    await ledger.reserve([b], 100)
    assert await ledger.spent(b) == 100
    assert ledger.counter(b, datetime.fromtimestamp(wall.t, UTC)).name.endswith(
        str(int((period + timedelta(days=1)).timestamp())))


async def test_lifetime_counter_name_and_sliding_expiry(store, backend):
    ledger = Ledger(store, backend)
    b = key_budget(100)
    c = ledger.counter(b, datetime.now(UTC))
    assert c.name == f"llmproxy:budget:key:{b.id}:0"
    await ledger.reserve([b], 1)
    if backend is not None:
        assert 7 * DAY - 5 <= await backend.ttl(c.name) <= 7 * DAY + 1


async def _spend(store, key_id: str, amounts: list[tuple[datetime, str]], team_id: str | None = None) -> None:
    await store.write_spend([SpendRow(request_id=uuid.uuid4().hex, started_at=at, key_id=key_id, team_id=team_id,
                                      spend=Decimal(usd_amount)) for at, usd_amount in amounts])


async def test_absent_counter_rebuilt_from_spend_log(store, backend):
    now = datetime(2025, 3, 10, 12, tzinfo=UTC)
    ledger = Ledger(store, backend, now=Wall(now.timestamp()))
    b = key_budget(nanos(Decimal("1")), timedelta(days=1), datetime(2025, 3, 1, tzinfo=UTC))
    await _spend(store, b.id, [(datetime(2025, 3, 9, 23, tzinfo=UTC), "5"),        # last period
                               (datetime(2025, 3, 10, 1, tzinfo=UTC), "0.25"),     # this period
                               (datetime(2025, 3, 10, 11, tzinfo=UTC), "0.000000007")])
    await ledger.reserve([b], 3)
    assert await ledger.spent(b) == nanos(Decimal("0.250000007")) + 3
    team = Budget("team", mine("t-" + uuid.uuid4().hex), nanos(Decimal("0.5")))
    await _spend(store, "other", [(datetime(2024, 1, 1, tzinfo=UTC), "0.5")], team_id=team.id)
    with pytest.raises(BudgetExceeded):  # a lifetime team budget, spent in full long ago
        await ledger.reserve([team], 1)


async def test_rebuild_never_overwrites_live_counts(store, backend):
    """A rebuild that finishes after someone else created the counter leaves it alone (SET NX)."""
    ledger = Ledger(store, backend)
    b = key_budget(10**9)
    await _spend(store, b.id, [(datetime.now(UTC), "0.000001")])  # 1000 nanos in the log
    name = ledger.counter(b, datetime.now(UTC)).name
    real = store.key_spend

    class Racing:
        async def key_spend(self, key_id, since=None):
            total = await real(key_id, since=since)
            if backend is not None:  # another replica created the counter meanwhile
                await backend.set(name, 5)
            else:
                ledger._local[name] = [5, time.time() + 60]
            return total
    ledger.store = Racing()
    await ledger.reserve([b], 10)
    assert await ledger.spent(b) == 15


async def test_concurrent_rebuilds_share_one_query(store, backend):
    ledger = Ledger(store, backend)
    b = key_budget(10**9)
    calls = 0
    real = store.key_spend

    class Slow:
        async def key_spend(self, key_id, since=None):
            nonlocal calls
            calls += 1
            await asyncio.sleep(0.05)
            return await real(key_id, since=since)
    ledger.store = Slow()
    await asyncio.gather(*[ledger.reserve([b], 1) for _ in range(20)])
    assert calls == 1 and await ledger.spent(b) == 20


class DownSpend:
    async def key_spend(self, *a, **k):
        raise StoreUnavailable("down")

    team_spend = key_spend


async def test_database_down_during_rebuild_admits_untracked(backend):
    ledger = Ledger(DownSpend(), backend)
    b = key_budget(0)  # a spent budget, but its counter cannot be rebuilt
    r = await ledger.reserve([b], 100)
    assert r.counters == () and await ledger.spent(b) is None
    ledger.settle(r, 50)
    await ledger.drain()


# ---------------------------------------------------------------------------- Redis down


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
async def private_redis():
    """A redis-server of our own on a random port, killed by its PID (never the shared one)."""
    binary = shutil.which("redis-server")
    if binary is None:
        if os.environ.get("CI") == "true":
            pytest.fail("redis-server not installed")
        pytest.skip("redis-server not installed")
    port = _free_port()
    proc = subprocess.Popen([binary, "--port", str(port), "--save", "", "--appendonly", "no",
                             "--bind", "127.0.0.1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = aioredis.from_url(f"redis://127.0.0.1:{port}/0", socket_timeout=0.25, socket_connect_timeout=0.25)
    for _ in range(100):
        try:
            await client.ping()
            break
        except Exception:
            await asyncio.sleep(0.05)
    else:
        proc.kill()
        pytest.fail("private redis-server did not start")
    yield proc, client
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    await client.aclose()


async def test_redis_down_falls_back_to_local_counters(store, private_redis, capfd):
    proc, client = private_redis
    ledger = Ledger(store, client, redis_retry=0.2)
    b = key_budget(1000)
    r = await ledger.reserve([b], 600)
    assert r.backend == "redis" and int(await client.get(r.counters[0])) == 600
    proc.kill()
    proc.wait()
    t0 = time.perf_counter()
    ledger.settle(r, 500)  # lost with Redis: logged, not raised
    local = await ledger.reserve([b], 600)
    assert local.backend == "local"
    await ledger.reserve([b], 600)  # rebuilt from the (empty) log: 600 < 1000
    with pytest.raises(BudgetExceeded):
        await ledger.reserve([b], 1)
    await ledger.drain()
    assert time.perf_counter() - t0 < 2.0  # a dead Redis slows nothing beyond its timeouts
    out, err = capfd.readouterr()
    assert (out + err).count("budget_redis_unavailable") == 1  # once per outage


# ---------------------------------------------------------------------------- estimates


def test_estimate_and_money():
    p = Pricing(input_per_1m=Decimal("0.15"), output_per_1m=Decimal("0.6"))
    assert estimate(p, 1000, 1000) == 150_000 + 600_000
    assert estimate(Pricing(input_per_1m=Decimal("0.0000001")), 1, 0) == 1  # rounded up
    assert estimate(None, 10**6, 10**6) == 0
    assert nanos(Decimal("1.0000000005")) == 1_000_000_000 and nanos(Decimal("0.0000000015")) == 2
    assert usd(25_000) == Decimal("0.000025")


@pytest.mark.parametrize("api, body, tokens", [
    ("chat", {"model": "m", "messages": [{"role": "user", "content": "x" * 40}], "max_tokens": 5}, (10, 5)),
    ("chat", {"model": "m", "messages": [{"role": "user", "content": "x" * 41}], "max_completion_tokens": 7}, (11, 7)),
    ("chat", {"model": "m", "messages": [{"role": "user", "content": "abcd"}]}, (1, 1024)),
    ("messages", {"model": "m", "max_tokens": 3, "messages": [{"role": "user", "content": "abcdefgh"}]}, (2, 3)),
    ("embeddings", {"model": "m", "input": "abcdefgh"}, (2, 0)),
])
def test_estimate_request(api, body, tokens):
    class M:
        pricing = Pricing(input_per_1m=Decimal(1), output_per_1m=Decimal(2))

        def pricing_for(self, name):
            return self.pricing
    ctx = make_context(body, api=api, model=M())
    assert estimate_request(ctx) == tokens[0] * 1000 + tokens[1] * 2000
    M.pricing = None
    assert estimate_request(ctx) == 0


# ---------------------------------------------------------------------------- end to end


def budget_config(upstream, redis_url: str | None = None, **extra: Any) -> dict[str, Any]:
    config = openai_config(upstream, middlewares=[{"auth": {}}], **extra)
    if redis_url:
        config["redis_url"] = redis_url
    return config


@pytest.fixture(params=["local", "redis"])
async def shared(request) -> str | None:
    """None: in-process budgets; else the Redis URL."""
    if request.param == "local":
        return None
    return await reachable_redis()


async def drained(proxy) -> None:
    await auth_of(proxy).ledger.drain()


async def until_refused(proxy, key: str, limit: int = 20) -> tuple[int, tuple]:
    """Sequential requests until one is refused: (how many passed, the refusal)."""
    for n in range(limit):
        status, body, headers = await post(proxy, key)
        await drained(proxy)
        if status != 200:
            return n, (status, body, headers)
    pytest.fail("never refused")


async def test_key_budget_refuses_once_spent(upstream, make_proxy, shared):
    proxy = await make_proxy(budget_config(upstream, shared))
    key = await add_budget_key(proxy.gateway.services.store, max_budget=Decimal("0.0001"), budget_duration="30d")
    passed, (status, body, headers) = await until_refused(proxy, key)
    assert passed == 4  # 4 x $0.000025 reaches $0.0001
    assert status == 429
    assert body["error"]["type"] == "insufficient_quota" and body["error"]["code"] == "budget_exceeded"
    assert headers["x-should-retry"] == "false"
    assert 0 < int(headers["retry-after"]) <= 30 * DAY
    assert sum(r.spend for r in proxy.records) == Decimal("0.0001")
    assert not any(r.spend for r in proxy.records if r.status == 429)

    # The SDKs: no retry of a budget 429 (x-should-retry: false); Anthropic's shape.
    seen = len(proxy.records)
    oai = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key=key, max_retries=3)
    with pytest.raises(openai.RateLimitError) as info:
        await oai.chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": "hi"}])
    assert info.value.code == "budget_exceeded" and len(proxy.records) == seen + 1
    ant = anthropic.AsyncAnthropic(base_url=proxy.url, api_key=key, max_retries=0)
    with pytest.raises(anthropic.RateLimitError) as ainfo:
        await ant.messages.create(**MESSAGES)
    assert ainfo.value.body["error"]["type"] == "rate_limit_error"


async def test_lifetime_budget_has_no_retry_after(upstream, make_proxy):
    proxy = await make_proxy(budget_config(upstream))
    key = await add_budget_key(proxy.gateway.services.store, max_budget=0)
    status, body, headers = await post(proxy, key)
    assert status == 429 and headers["x-should-retry"] == "false" and "retry-after" not in headers
    status, body, headers = await post(proxy, key, MESSAGES, "/v1/messages", "x-api-key")
    assert status == 429 and body["error"]["type"] == "rate_limit_error"
    assert not upstream.requests


async def test_team_budget_shared_by_two_keys(upstream, make_proxy, shared):
    proxy = await make_proxy(budget_config(upstream, shared))
    store = proxy.gateway.services.store
    team = new_team()
    await store.create_team(TeamInfo(team_id=team, max_budget=Decimal("0.0001")))
    k1, k2 = await add_budget_key(store, team_id=team), await add_budget_key(store, team_id=team, max_budget=1)
    statuses = []
    for i in range(6):
        status, body, _ = await post(proxy, (k1, k2)[i % 2])
        await drained(proxy)
        statuses.append(status)
    assert statuses == [200, 200, 200, 200, 429, 429]
    assert body["error"]["message"].startswith(f"Budget exceeded: the budget of team '{team}' ($0.0001) is spent")


async def test_team_budget_across_two_replicas(upstream, make_proxy, redis_url, tmp_path):
    db = {"sqlite_path": str(tmp_path / "shared.db")}
    a = await make_proxy({**budget_config(upstream, redis_url), "database": db})
    b = await make_proxy({**budget_config(upstream, redis_url), "database": db})
    store = a.gateway.services.store
    team = new_team()
    await store.create_team(TeamInfo(team_id=team, max_budget=Decimal("0.0001"), budget_duration="1d"))
    k1, k2 = await add_budget_key(store, team_id=team), await add_budget_key(store, team_id=team)
    statuses = []
    for i in range(6):
        proxy = (a, b)[i % 2]
        status, _, _ = await post(proxy, (k1, k2)[i % 2])
        await drained(proxy)
        statuses.append(status)
    assert statuses == [200, 200, 200, 200, 429, 429]


async def test_budget_resets_next_period(upstream, make_proxy, shared):
    proxy = await make_proxy(budget_config(upstream, shared))
    services = proxy.gateway.services
    wall = Wall()
    services.wall = wall
    key = await add_budget_key(services.store, max_budget=Decimal("0.00005"), budget_duration="1d",
                        created_at=datetime.fromtimestamp(wall.t, UTC) - timedelta(hours=1))
    passed, (status, _, headers) = await until_refused(proxy, key)
    assert (passed, status) == (2, 429)
    assert abs(int(headers["retry-after"]) - 23 * 3600) <= 5
    wall.t += 23 * 3600 + 1
    passed, (status, _, _) = await until_refused(proxy, key)
    assert (passed, status) == (2, 429)


async def test_budget_change_applies_after_invalidation(upstream, make_proxy):
    proxy = await make_proxy(budget_config(upstream))
    services = proxy.gateway.services
    key = await add_budget_key(services.store, max_budget=0)
    assert (await post(proxy, key))[0] == 429
    await services.store.update_key(keys.key_hash(key), max_budget=Decimal(1))
    await services.invalidator.publish("key", keys.key_hash(key))
    assert (await post(proxy, key))[0] == 200


def slow_answer(delay: float):
    async def behaviour(request: web.Request, got) -> web.StreamResponse:
        await asyncio.sleep(delay)
        return web.json_response({"id": "c", "object": "chat.completion", "created": 1, "model": "m",
                                  "choices": [{"index": 0, "finish_reason": "stop",
                                               "message": {"role": "assistant", "content": "ok"}}],
                                  "usage": {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18}})
    return behaviour


async def test_concurrent_requests_overshoot_within_the_bound(upstream, make_proxy, shared):
    proxy = await make_proxy(budget_config(upstream, shared))
    store = proxy.gateway.services.store
    limit = nanos(Decimal("0.01"))
    key = await add_budget_key(store, max_budget=usd(limit))
    digest = keys.key_hash(key)
    already = limit - 3 * ESTIMATE + 1  # three more estimates fit below the limit
    await _spend(store, digest, [(datetime.now(UTC) - timedelta(minutes=1), str(usd(already)))])
    upstream.push(*[slow_answer(0.3) for _ in range(20)])
    results = await asyncio.gather(*[post(proxy, key) for _ in range(20)])
    await drained(proxy)
    admitted = sum(1 for s, _, _ in results if s == 200)
    refused = [b for s, b, _ in results if s == 429]
    assert admitted == 3 and len(refused) == 17
    assert all(b["error"]["code"] == "budget_exceeded" for b in refused)
    assert len(upstream.requests) == admitted
    spent = already + admitted * ACTUAL
    bound = admitted * max(0, ACTUAL - ESTIMATE) + ACTUAL  # the module's documented bound
    assert 0 < spent - limit <= bound
    ledger = auth_of(proxy).ledger
    assert await ledger.spent(Budget.of_key(await store.key(digest))) == spent  # reconciled exactly


async def test_an_absurd_estimate_reserves_at_most_a_budgets_worth(store, backend):
    """max_tokens 10^13 on a priced model: its estimate is more than any 64-bit counter in
    Redis holds. The reservation is capped at the budget, so Redis takes it (and the
    replica keeps counting there), and the next request finds the budget spent."""
    ledger = Ledger(store, backend)
    b = key_budget(1000)
    huge = 10**13 * 10**9  # nano-dollars
    r = await ledger.reserve([b], huge)
    assert r.amount == 1000 and await ledger.spent(b) == 1000
    if backend is not None:
        assert r.backend == "redis"
    with pytest.raises(BudgetExceeded):
        await ledger.reserve([b], 1)
    ledger.settle(r, 10)
    await ledger.drain()
    assert await ledger.spent(b) == 10
