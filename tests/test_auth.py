"""The `auth` middleware end to end: virtual keys through the real SDKs, the error table's
401/403/503 rows, the key cache (hot path, negative entries, single flight, invalidation
within and across replicas, TTL bound) and a database outage."""

from __future__ import annotations

import asyncio
import glob
import uuid
from datetime import datetime, timedelta, timezone
from typing import Any

import aiohttp
import anthropic
import openai
import pytest

from llmproxy import keys
from llmproxy.store import KeyInfo, StoreUnavailable, TeamInfo
from llmproxy.testing import make_context, ok_reply
pytest.importorskip("llmproxy.middlewares.auth", reason="the auth middleware is not installed")
from llmproxy.middlewares.auth import Auth, Options, Principal, principal_of

from .conftest import MASTER, openai_config

UTC = timezone.utc
CHAT = {"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10}
MESSAGES = {"model": "claude-test", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}


def auth_config(upstream, *, redis_url: str | None = None, **options: Any) -> dict[str, Any]:
    extra: dict[str, Any] = {"middlewares": [{"auth": options}]}
    if redis_url:
        extra["redis_url"] = redis_url
    return openai_config(upstream, **extra)


def auth_of(proxy) -> Auth:
    return next(m for m in proxy.gateway.middlewares if isinstance(m, Auth))


async def add_key(store, **fields: Any) -> str:
    """A new key in the store (the admin API's job, done directly here); returns the key."""
    key = keys.generate()
    digest = keys.key_hash(key)
    await store.create_key(digest, KeyInfo(id=digest, key_prefix=keys.display(key), **fields))
    return key


class CountingStore:
    """The real store, counting `key_by_hash` calls."""

    def __init__(self, store) -> None:
        self.store = store
        self.lookups = 0

    async def key_by_hash(self, digest: str):
        self.lookups += 1
        await asyncio.sleep(0.01)  # a real round trip's worth: concurrent misses overlap
        return await self.store.key_by_hash(digest)

    def __getattr__(self, name: str):
        return getattr(self.store, name)


class DownStore:
    """A database that is down: every call raises StoreUnavailable."""

    def __init__(self) -> None:
        self.calls = 0

    def __getattr__(self, name: str):
        async def down(*args, **kwargs):
            self.calls += 1
            raise StoreUnavailable("connection refused")
        return down


class HungStore:
    """A database that never answers."""

    def __getattr__(self, name: str):
        async def hang(*args, **kwargs):
            await asyncio.sleep(3600)
        return hang


def spy(proxy) -> CountingStore:
    counting = CountingStore(proxy.gateway.services.store)
    proxy.gateway.services.store = counting
    return counting


async def post(proxy, key: str | None, body: dict = CHAT, path: str = "/v1/chat/completions",
               header: str = "authorization") -> tuple[int, dict, Any]:
    headers = {}
    if key is not None:
        headers[header] = f"Bearer {key}" if header == "authorization" else key
    async with aiohttp.ClientSession() as http:
        async with http.post(proxy.url + path, json=body, headers=headers) as resp:
            return resp.status, await resp.json(), resp.headers


async def models(proxy, key: str, anthropic_shape: bool = False) -> list[str]:
    headers = {"authorization": f"Bearer {key}"}
    if anthropic_shape:
        headers["anthropic-version"] = "2023-06-01"
    async with aiohttp.ClientSession() as http:
        async with http.get(proxy.url + "/v1/models", headers=headers) as resp:
            assert resp.status == 200
            return [m["id"] for m in (await resp.json())["data"]]


class Clock:
    """An injectable monotonic clock (services.clock)."""

    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


# ---------------------------------------------------------------------------- the SDKs


async def test_virtual_key_through_the_sdks(upstream, make_proxy):
    proxy = await make_proxy(auth_config(upstream))
    store = proxy.gateway.services.store
    await store.create_team(TeamInfo(team_id="org-1"))
    key = await add_key(store, team_id="org-1", user_id="session-1", key_alias="sandbox")
    oai = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key=key, max_retries=0)
    resp = await oai.chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": "hi"}])
    assert resp.choices[0].message.content == upstream.answer_text()
    stream = await oai.chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": "hi"}],
                                               stream=True)
    assert "".join([c.choices[0].delta.content or "" async for c in stream if c.choices]) == upstream.answer_text()
    ant = anthropic.AsyncAnthropic(base_url=proxy.url, api_key=key, max_retries=0)
    msg = await ant.messages.create(model="claude-test", max_tokens=10, messages=[{"role": "user", "content": "hi"}])
    assert msg.content[0].text == upstream.answer_text()
    assert [m.id async for m in oai.models.list()] == ["gpt-test", "claude-test"]
    assert [m.id async for m in ant.models.list()] == ["claude-test"]  # only what speaks the Messages API

    digest = keys.key_hash(key)
    served = [r for r in proxy.records if r.api != "models"]
    assert len(served) == 3 and all(r.status == 200 for r in served)
    for r in proxy.records:
        assert (r.key_id, r.key_alias, r.team_id, r.user_id) == (digest, "sandbox", "org-1", "session-1")
        assert key not in repr(r)
    for got in upstream.requests:
        assert key not in repr(dict(got.headers)) and key.encode() not in got.body


@pytest.mark.parametrize("header", ["authorization", "x-api-key", "api-key"])
async def test_every_key_header(upstream, make_proxy, header):
    proxy = await make_proxy(auth_config(upstream))
    key = await add_key(proxy.gateway.services.store)
    status, _, _ = await post(proxy, key, header=header)
    assert status == 200


async def test_master_key_sees_every_model(upstream, make_proxy):
    proxy = await make_proxy(auth_config(upstream))
    status, _, _ = await post(proxy, MASTER)
    assert status == 200
    assert await models(proxy, MASTER) == ["gpt-test", "claude-test"]
    assert proxy.records[0].key_id is None


# ---------------------------------------------------------------------------- rejections


async def test_missing_and_unknown_keys_are_401_and_unknown_is_cached(upstream, make_proxy):
    proxy = await make_proxy(auth_config(upstream, negative_ttl=60))
    status, body, _ = await post(proxy, None)
    assert status == 401 and body["error"]["code"] == "invalid_api_key"
    assert body["error"]["type"] == "authentication_error"
    status, body, _ = await post(proxy, None, MESSAGES, "/v1/messages", "x-api-key")
    assert status == 401 and body == {"type": "error", "error": {"type": "authentication_error",
                                                                 "message": body["error"]["message"]}}

    counting = spy(proxy)
    bad = keys.generate()
    results = await asyncio.gather(*[post(proxy, bad) for _ in range(25)])  # concurrent misses: one lookup
    results += [await post(proxy, bad) for _ in range(25)]  # then the negative entry
    assert all(s == 401 and b["error"]["code"] == "invalid_api_key" for s, b, _ in results)
    assert counting.lookups == 1
    assert not upstream.requests


async def test_negative_entry_expires(upstream, make_proxy):
    proxy = await make_proxy(auth_config(upstream, negative_ttl=5))
    clock = proxy.gateway.services.clock = Clock()
    counting = spy(proxy)
    bad = keys.generate()
    assert (await post(proxy, bad))[0] == 401
    clock.t += 4
    assert (await post(proxy, bad))[0] == 401
    assert counting.lookups == 1
    clock.t += 2
    assert (await post(proxy, bad))[0] == 401
    assert counting.lookups == 2


def _past() -> datetime:
    return datetime.now(UTC) - timedelta(seconds=1)


@pytest.mark.parametrize("key_fields, team_fields, code", [
    ({"expires_at": "past"}, None, "key_expired"),
    ({"blocked": True}, None, "key_blocked"),
    ({}, {"blocked": True}, "key_blocked"),
    ({"blocked": True, "expires_at": "past"}, None, "key_blocked"),
])
async def test_expired_and_blocked(upstream, make_proxy, key_fields, team_fields, code):
    proxy = await make_proxy(auth_config(upstream))
    store = proxy.gateway.services.store
    fields = {k: (_past() if v == "past" else v) for k, v in key_fields.items()}
    if team_fields is not None:
        await store.create_team(TeamInfo(team_id="t1", **team_fields))
        fields["team_id"] = "t1"
    key = await add_key(store, **fields)
    status, body, _ = await post(proxy, key)
    assert status == 401 and body["error"]["type"] == "authentication_error" and body["error"]["code"] == code
    status, body, _ = await post(proxy, key, MESSAGES, "/v1/messages", "x-api-key")
    assert status == 401 and body["error"]["type"] == "authentication_error"
    assert not upstream.requests
    assert proxy.records[-1].key_id == keys.key_hash(key)  # rejected requests are attributed too


async def test_key_expires_while_cached(upstream, make_proxy):
    proxy = await make_proxy(auth_config(upstream))
    wall = [datetime.now(UTC).timestamp()]
    proxy.gateway.services.wall = lambda: wall[0]
    key = await add_key(proxy.gateway.services.store,
                        expires_at=datetime.fromtimestamp(wall[0], UTC) + timedelta(seconds=30))
    assert (await post(proxy, key))[0] == 200
    wall[0] += 31
    status, body, _ = await post(proxy, key)
    assert status == 401 and body["error"]["code"] == "key_expired"


@pytest.mark.parametrize("key_models, team_models, allowed", [
    (["gpt-test"], None, ["gpt-test"]),
    ([], ["claude-test"], ["claude-test"]),
    (["gpt-test", "claude-test"], ["claude-test"], ["claude-test"]),
    (["gpt-test"], ["claude-test"], []),
    (["*"], [], ["gpt-test", "claude-test"]),
])
async def test_model_lists(upstream, make_proxy, key_models, team_models, allowed):
    proxy = await make_proxy(auth_config(upstream))
    store = proxy.gateway.services.store
    team_id = None
    if team_models is not None:
        team_id = "t-" + uuid.uuid4().hex[:8]
        await store.create_team(TeamInfo(team_id=team_id, models=team_models))
    key = await add_key(store, models=key_models, team_id=team_id)
    for body, path, name in ((CHAT, "/v1/chat/completions", "gpt-test"), (MESSAGES, "/v1/messages", "claude-test")):
        status, reply, _ = await post(proxy, key, body, path)
        if name in allowed:
            assert status == 200
        else:
            assert status == 403
            kind = reply["error"]["type"]
            assert kind == "permission_error"
    assert await models(proxy, key) == allowed
    # Anthropic's list: only the models that speak its Messages API
    assert await models(proxy, key, anthropic_shape=True) == [n for n in allowed if n == "claude-test"]


# ---------------------------------------------------------------------------- the cache


async def test_hot_path_makes_no_store_call(upstream, make_proxy):
    proxy = await make_proxy(auth_config(upstream))
    key = await add_key(proxy.gateway.services.store)
    counting = spy(proxy)
    for _ in range(20):
        assert (await post(proxy, key))[0] == 200
    assert counting.lookups == 1


async def test_invalidation_takes_effect_at_once(upstream, make_proxy):
    proxy = await make_proxy(auth_config(upstream))
    services = proxy.gateway.services
    key = await add_key(services.store)
    digest = keys.key_hash(key)
    assert (await post(proxy, key))[0] == 200
    await services.store.update_key(digest, blocked=True)
    assert (await post(proxy, key))[0] == 200  # cached: the change is not seen yet
    await services.invalidator.publish("key", digest)
    status, body, _ = await post(proxy, key)
    assert status == 401 and body["error"]["code"] == "key_blocked"


async def test_team_invalidation_drops_every_key_of_the_team(upstream, make_proxy):
    proxy = await make_proxy(auth_config(upstream))
    services = proxy.gateway.services
    await services.store.create_team(TeamInfo(team_id="t1"))
    k1, k2 = await add_key(services.store, team_id="t1"), await add_key(services.store, team_id="t1")
    other = await add_key(services.store)
    for k in (k1, k2, other):
        assert (await post(proxy, k))[0] == 200
    await services.store.update_team("t1", models=["claude-test"])
    await services.invalidator.publish("team", "t1")
    assert (await post(proxy, k1))[0] == 403 and (await post(proxy, k2))[0] == 403
    assert keys.key_hash(other) in auth_of(proxy)._cache  # others stay cached
    await services.invalidator.publish("*", "*")
    assert not auth_of(proxy)._cache


async def test_change_seen_after_cache_ttl_without_invalidation(upstream, make_proxy):
    proxy = await make_proxy(auth_config(upstream, cache_ttl=30))
    services = proxy.gateway.services
    clock = services.clock = Clock()
    key = await add_key(services.store)
    assert (await post(proxy, key))[0] == 200
    await services.store.update_key(keys.key_hash(key), blocked=True)
    clock.t += 29
    assert (await post(proxy, key))[0] == 200
    clock.t += 1.5
    assert (await post(proxy, key))[0] == 401


async def test_cache_is_bounded(upstream, make_proxy):
    proxy = await make_proxy(auth_config(upstream, cache_size=3))
    store = proxy.gateway.services.store
    ks = [await add_key(store) for _ in range(5)]
    for k in ks:
        assert (await post(proxy, k))[0] == 200
    cache = auth_of(proxy)._cache
    assert list(cache) == [keys.key_hash(k) for k in ks[2:]]


async def test_invalidation_across_replicas_through_redis(upstream, make_proxy, redis_url, tmp_path):
    db = {"sqlite_path": str(tmp_path / "shared.db")}
    a = await make_proxy({**auth_config(upstream, redis_url=redis_url), "database": db})
    b = await make_proxy({**auth_config(upstream, redis_url=redis_url), "database": db})
    seen: list[tuple[str, str]] = []
    b.gateway.services.invalidator.subscribe(lambda kind, ident: seen.append((kind, ident)))
    # B listens once a probe published on A reaches it.
    probe = "probe-" + uuid.uuid4().hex
    for _ in range(50):
        await a.gateway.services.invalidator.publish("key", probe)
        await asyncio.sleep(0.05)
        if ("key", probe) in seen:
            break
    else:
        pytest.fail("replica B never received a message through Redis")

    key = await add_key(a.gateway.services.store)
    digest = keys.key_hash(key)
    assert (await post(b, key))[0] == 200
    assert digest in auth_of(b)._cache
    await a.gateway.services.store.update_key(digest, blocked=True)
    t0 = asyncio.get_running_loop().time()
    await a.gateway.services.invalidator.publish("key", digest)
    while digest in auth_of(b)._cache:
        assert asyncio.get_running_loop().time() - t0 < 1.0, "B kept the entry for over a second"
        await asyncio.sleep(0.01)
    status, body, _ = await post(b, key)
    assert status == 401 and body["error"]["code"] == "key_blocked"


async def test_invalidation_during_a_lookup_is_not_lost(upstream, make_proxy):
    """A lookup that began before an invalidation must not cache what it read."""
    proxy = await make_proxy(auth_config(upstream))
    auth = auth_of(proxy)
    key = await add_key(proxy.gateway.services.store)
    counting = spy(proxy)  # each lookup takes 10 ms
    lookup = asyncio.create_task(auth.resolve(key))
    while not counting.lookups:
        await asyncio.sleep(0)
    auth.invalidate("key", keys.key_hash(key))
    assert isinstance(await lookup, Principal)
    assert keys.key_hash(key) not in auth._cache


# ---------------------------------------------------------------------------- database down


async def test_database_down_seen_keys_work_unseen_get_503(upstream, make_proxy):
    proxy = await make_proxy(auth_config(upstream, cache_ttl=10, stale_ttl=300))
    services = proxy.gateway.services
    clock = services.clock = Clock()
    seen = await add_key(services.store)
    unseen = await add_key(services.store)
    assert (await post(proxy, seen))[0] == 200
    real, services.store = services.store, DownStore()
    clock.t += 60  # past cache_ttl: the entry is stale, and still serves
    assert (await post(proxy, seen))[0] == 200
    status, body, headers = await post(proxy, unseen)
    assert status == 503 and body["error"]["type"] == "api_error"
    status, body, _ = await post(proxy, unseen, MESSAGES, "/v1/messages", "x-api-key")
    assert status == 503 and body["error"]["type"] == "api_error"
    assert services.readiness["database"] == "unreachable"
    async with aiohttp.ClientSession() as http:
        async with http.get(proxy.url + "/health/readiness") as resp:
            # shown, but still ready: this replica keeps serving the keys it has cached
            assert resp.status == 200 and (await resp.json())["database"] == "unreachable"
    clock.t += 300  # past stale_ttl: the seen key stops working too
    assert (await post(proxy, seen))[0] == 503
    services.store = real
    clock.t += 2
    assert (await post(proxy, seen))[0] == 200 and (await post(proxy, unseen))[0] == 200
    assert services.readiness["database"] == "ok"


async def test_hung_database_times_out_to_503(upstream, make_proxy):
    proxy = await make_proxy(auth_config(upstream, store_timeout=0.2))
    services = proxy.gateway.services
    real, services.store = services.store, HungStore()
    try:
        t0 = asyncio.get_running_loop().time()
        status, _, _ = await post(proxy, keys.generate())
        assert status == 503
        assert asyncio.get_running_loop().time() - t0 < 1.5
    finally:
        services.store = real


async def test_plaintext_key_in_no_log_line_nor_database(upstream, make_proxy, capfd, tmp_path):
    proxy = await make_proxy({**auth_config(upstream, cache_ttl=0),
                              "spend": {"flush_interval": 0.1, "spill_path": str(tmp_path / "spill.jsonl")}})
    services = proxy.gateway.services
    await services.store.create_team(TeamInfo(team_id="t1", blocked=False))
    good = await add_key(services.store, team_id="t1")
    blocked = await add_key(services.store, blocked=True)
    bad = keys.generate()
    for key in (good, blocked, bad):
        await post(proxy, key)
        await post(proxy, key, MESSAGES, "/v1/messages", "x-api-key")
    real, services.store = services.store, DownStore()
    for key in (good, bad):
        await post(proxy, key)
    services.store = real
    await asyncio.sleep(0.5)  # the spend rows reach the database (flushed every 0.1 s)
    assert await real.key_spend(keys.key_hash(good)) > 0
    out, err = capfd.readouterr()
    assert out or err  # something was logged
    for key in (good, blocked, bad):
        assert key not in out and key not in err
        for path in glob.glob(str(tmp_path / "*.db*")):
            with open(path, "rb") as f:
                assert key.encode() not in f.read()


# ---------------------------------------------------------------------------- unit


async def test_principal_of_key_and_team():
    team = TeamInfo(team_id="t", models=["a", "b"], rpm_limit=5, created_at=datetime.now(UTC), max_budget=3)
    key = KeyInfo(id="k" * 64, key_prefix="sk-...abcd", key_alias="al", team_id="t", user_id="u",
                  models=["b", "c"], rpm_limit=7, tpm_limit=9, max_parallel_requests=2, max_budget=1,
                  created_at=datetime.now(UTC))
    p = principal_of(key, team)
    assert p.allows_model("b") and not p.allows_model("a") and not p.allows_model("c")
    assert (p.rpm_limit, p.tpm_limit, p.max_parallel_requests, p.team.rpm_limit) == (7, 9, 2, 5)
    assert [b.scope for b in p.budgets] == ["key", "team"]
    assert principal_of(KeyInfo(id="x", key_prefix="p"), None).allows_model("anything")


async def test_middleware_called_directly(upstream, make_proxy):
    """The hook on a fabricated context (no HTTP): a rejection raises, a pass sets the principal."""
    proxy = await make_proxy(auth_config(upstream))
    auth = auth_of(proxy)
    key = await add_key(proxy.gateway.services.store, user_id="u1")
    ctx = make_context(dict(CHAT), model=proxy.gateway.models["gpt-test"])
    ctx.api_key = key

    async def ok(c):
        return ok_reply()
    reply = await auth(ctx, ok)
    assert reply.status == 200 and ctx.principal.user_id == "u1" and ctx.record.user_id == "u1"
    assert Options().cache_ttl == 30 and Options().stale_ttl == 300


# --- the cache under a flood of unknown keys (issue 12) --------------------------------------


async def test_a_flood_of_unknown_keys_never_evicts_a_known_one(upstream, make_proxy) -> None:
    proxy = await make_proxy(auth_config(upstream, cache_size=10, negative_cache_size=5))
    auth = auth_of(proxy)
    counting = CountingStore(proxy.gateway.services.store)
    key = await add_key(counting.store)
    assert await auth.resolve(key) is not None
    proxy.gateway.services.store = counting
    for n in range(200):  # random keys, each a store miss, cached as unknown
        assert await auth.resolve(f"sk-random-{n}") is None
    assert len(auth._unknown) == 5 and len(auth._cache) == 1
    misses = counting.lookups
    assert await auth.resolve(key) is not None
    assert counting.lookups == misses  # still answered by the cache


def test_evicting_the_oldest_costs_the_same_in_a_big_cache_as_in_a_small_one() -> None:
    """Each insert into a full cache evicts one entry: its cost must not grow with the size
    (a dict's first key is found past every slot deleted before it: O(n) per eviction)."""
    import time as clock

    from llmproxy.middlewares.auth import _Entry

    class Services:
        config = None
        metrics = type("M", (), {"define": lambda *a, **k: None, "inc": lambda *a, **k: None})()

    def per_insert(size: int) -> float:
        auth = Auth(Options(cache_size=size), Services())  # type: ignore[arg-type]
        p = principal_of(KeyInfo(id="k", key_prefix="sk-...k"), None)
        for i in range(size):  # fill it
            auth._put(f"{i:064x}", _Entry(p, 0.0))
        n = 20_000
        start = clock.perf_counter()
        for i in range(size, size + n):  # each insert evicts the oldest
            auth._put(f"{i:064x}", _Entry(p, 0.0))
        return (clock.perf_counter() - start) / n

    small, big = min(per_insert(2_000) for _ in range(3)), min(per_insert(32_000) for _ in range(3))
    assert big < 4 * small, (small, big)  # 16x the size; O(n) eviction would cost ~16x
