"""The subscription middleware (issue 14, items 1-5): the admin API, the `db` and `http`
sources and a plugin one, caching (negative, stale-if-error, single-flight, across
replicas through Redis), refresh, the limits and budget it adds, and `GET /v1/limits`.
Through the openai SDK against the fake upstream, which counts what reaches it."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from llmproxy.config import ConfigError, parse_config
from llmproxy.plugins import Registry, check_config
from llmproxy.store import SubscriptionInfo

from llmproxy.testing import reply_json

from .conftest import MASTER, needs, openai_config

pytestmark = needs("auth", "subscription", "scheduler")

ADMIN = {"Authorization": f"Bearer {MASTER}"}
HI = [{"role": "user", "content": "hi"}]


async def admin(proxy, method: str, path: str, **kw) -> tuple[int, Any]:
    async with aiohttp.ClientSession(headers=ADMIN) as s:
        async with s.request(method, proxy.url + path, **kw) as r:
            return r.status, await r.json()


async def get(proxy, path: str, key: str) -> tuple[int, Any]:
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {key}"}) as s:
        async with s.get(proxy.url + path) as r:
            return r.status, await r.json()


def sub_config(upstream, sub: dict | None = None, **extra) -> dict:
    config = openai_config(upstream, middlewares=["auth", {"subscription": sub or {}}, "scheduler"], **extra)
    config["models"].append({"name": "premium", "deployments": [{
        "provider": "openai", "model": "premium-upstream", "api_base": upstream.url + "/v1",
        "api_key": "sk-provider-secret", "timeout": 5}]})
    for model in config["models"]:  # a wait for a tenant's bucket longer than this is a 429 at once
        for dep in model["deployments"]:
            dep["max_queue_wait"] = 2
    return config


async def team_key(proxy, team: str, **key_fields) -> str:
    status, _ = await admin(proxy, "POST", "/team/new", json={"team_id": team})
    assert status == 200
    status, made = await admin(proxy, "POST", "/key/generate", json={"team_id": team, **key_fields})
    assert status == 200
    return made["key"]


def client(proxy, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key=key, max_retries=0)


async def chat(proxy, key: str, model: str = "gpt-test", **kw) -> Any:
    async with client(proxy, key) as c:
        return await c.chat.completions.create(model=model, messages=HI, **kw)


def lookups(proxy) -> dict[str, float]:
    counters = proxy.gateway.services.metrics
    text = counters.exposition().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith("llmproxy_subscription_lookups_total{"):
            label = line.split('source="', 1)[1].split('"', 1)[0]
            out[label] = float(line.rsplit(" ", 1)[1])
    return out


# ------------------------------------------------------------------------- the admin API


async def test_admin_api_manages_subscriptions(upstream, make_proxy):
    proxy = await make_proxy(sub_config(upstream))
    status, body = await admin(proxy, "POST", "/subscription/new", json={"team_id": "nope"})
    assert status == 400 and "not found" in body["error"]["message"]
    await team_key(proxy, "org-1")
    status, sub = await admin(proxy, "POST", "/subscription/new", json={
        "team_id": "org-1", "subscription_id": "sub-1", "models": ["gpt-test"],
        "limits": {"gpt-test": {"rpm": 5, "tpm": 1000}, "*": {"max_parallel_requests": 2}},
        "max_budget": 10, "budget_duration": "30d", "metadata": {"plan": "pro"}})
    assert status == 200, sub
    assert sub["subscription_id"] == "sub-1" and sub["enabled"] is True and sub["spend"] == 0
    assert sub["limits"] == {"gpt-test": {"rpm": 5, "tpm": 1000}, "*": {"max_parallel_requests": 2}}
    assert sub["budget_reset_at"] is not None
    status, body = await admin(proxy, "POST", "/subscription/new", json={"team_id": "org-1"})
    assert status == 400  # one per team
    assert (await admin(proxy, "GET", "/subscription/info", params={"team_id": "org-1"}))[1]["subscription_id"] == "sub-1"
    assert (await admin(proxy, "GET", "/subscription/info", params={"subscription_id": "sub-1"}))[0] == 200
    assert (await admin(proxy, "GET", "/subscription/info", params={"subscription_id": "x"}))[0] == 404
    status, sub = await admin(proxy, "POST", "/subscription/update", json={"subscription_id": "sub-1",
                                                                          "enabled": False, "limits": {}})
    assert status == 200 and sub["enabled"] is False and sub["limits"] == {}
    for bad in ({"limits": {"*": {"rpd": 1}}}, {"limits": {"*": {"rpm": -1}}}, {"limits": []},
                {"enabled": None}, {"models": "gpt-test"}, {"budget_duration": "soon"}, {"team_id": "org-2"}):
        status, body = await admin(proxy, "POST", "/subscription/update", json={"subscription_id": "sub-1", **bad})
        assert status == 400, (bad, body)
    status, listed = await admin(proxy, "POST", "/subscription/list", json={"team_id": "org-1"})
    assert status == 200 and [s["subscription_id"] for s in listed["subscriptions"]] == ["sub-1"]
    assert (await admin(proxy, "POST", "/subscription/delete", json={"subscription_ids": ["sub-1", "x"]}))[0] == 404
    status, body = await admin(proxy, "POST", "/subscription/delete", json={"subscription_id": "sub-1"})
    assert status == 200 and body["deleted_subscriptions"] == ["sub-1"]
    assert (await admin(proxy, "GET", "/subscription/info", params={"team_id": "org-1"}))[0] == 404
    actions = [r.action for r in proxy.records if r.api == "admin"]
    assert "subscription.new" in actions and "subscription.delete" in actions


async def test_deleting_a_team_deletes_its_subscription(upstream, make_proxy):
    proxy = await make_proxy(sub_config(upstream))
    await team_key(proxy, "org-1")
    assert (await admin(proxy, "POST", "/subscription/new", json={"team_id": "org-1"}))[0] == 200
    assert (await admin(proxy, "POST", "/team/delete", json={"team_ids": ["org-1"]}))[0] == 200
    assert await proxy.gateway.services.store.team_subscription("org-1") is None


# ----------------------------------------------------------------------- what it decides


async def test_disabled_subscription_and_models_outside_it_are_refused(upstream, make_proxy):
    config = sub_config(upstream)
    config["router"]["fallbacks"] = {"gpt-test": ["premium"]}
    proxy = await make_proxy(config)
    key = await team_key(proxy, "org-1")
    await chat(proxy, key, "premium")  # no subscription: served as before
    status, _ = await admin(proxy, "POST", "/subscription/new", json={"team_id": "org-1", "subscription_id": "s1",
                                                                      "models": ["gpt-test", "claude-test"]})
    assert status == 200
    with pytest.raises(openai.PermissionDeniedError) as denied:
        await chat(proxy, key, "premium")
    assert "not part of this team's subscription" in denied.value.message
    async with client(proxy, key) as c:
        assert [m.id for m in (await c.models.list()).data] == ["gpt-test", "claude-test"]

    # A fallback the subscription excludes is never tried: the failing model's error comes back.
    upstream.push(*[reply_json(500, {"error": {"message": "down"}})] * 2)  # the try and its retry
    before = len(upstream.requests)
    with pytest.raises(openai.InternalServerError):
        await chat(proxy, key)
    assert all(r.json["model"] != "premium-upstream" for r in upstream.requests[before:])

    assert (await admin(proxy, "POST", "/subscription/update", json={"subscription_id": "s1",
                                                                     "enabled": False}))[0] == 200
    before = len(upstream.requests)
    with pytest.raises(openai.PermissionDeniedError) as denied:
        await chat(proxy, key)
    assert denied.value.code == "subscription_disabled" and "disabled" in denied.value.message
    assert len(upstream.requests) == before
    assert (await get(proxy, "/v1/limits", key))[1]["subscription"]["enabled"] is False  # still says why


async def test_required_refuses_teams_without_a_subscription(upstream, make_proxy):
    proxy = await make_proxy(sub_config(upstream, {"required": True}))
    key = await team_key(proxy, "org-1")
    with pytest.raises(openai.PermissionDeniedError) as denied:
        await chat(proxy, key)
    assert denied.value.code == "no_subscription"
    _, loner = await admin(proxy, "POST", "/key/generate", json={})
    with pytest.raises(openai.PermissionDeniedError):
        await chat(proxy, loner["key"])
    await chat(proxy, MASTER)  # the master key is nobody's team


async def test_limits_are_the_tightest_of_key_team_and_subscription(upstream, make_proxy):
    proxy = await make_proxy(sub_config(upstream))
    key = await team_key(proxy, "org-1", rpm_limit=10)
    assert (await admin(proxy, "POST", "/subscription/new", json={
        "team_id": "org-1", "limits": {"*": {"rpm": 2}, "premium": {"rpm": 3}}}))[0] == 200
    for _ in range(2):
        await chat(proxy, key)
    before = len(upstream.requests)
    with pytest.raises(openai.RateLimitError) as limited:
        await chat(proxy, key)
    assert "subscription" in limited.value.message and "2 requests per minute" in limited.value.message
    assert limited.value.response.headers["x-ratelimit-limit-requests"] == "2"
    assert len(upstream.requests) == before
    for _ in range(3):  # its own entry: its own bucket
        await chat(proxy, key, "premium")
    with pytest.raises(openai.RateLimitError):
        await chat(proxy, key, "premium")

    # The key's own limit binds when it is the tighter one.
    key2 = (await admin(proxy, "POST", "/key/generate", json={"team_id": "org-1", "rpm_limit": 1}))[1]["key"]
    assert (await admin(proxy, "POST", "/subscription/update", json={
        "subscription_id": (await admin(proxy, "GET", "/subscription/info", params={"team_id": "org-1"}))[1][
            "subscription_id"], "limits": {"premium": {"rpm": 100}}}))[0] == 200
    await chat(proxy, key2, "premium")
    with pytest.raises(openai.RateLimitError) as limited:
        await chat(proxy, key2, "premium")
    assert "this key's limit of 1 requests" in limited.value.message


async def test_subscription_budget_is_enforced_like_a_teams(upstream, make_proxy):
    proxy = await make_proxy(sub_config(upstream))
    key = await team_key(proxy, "org-1")
    # each request costs $0.000025 (11 prompt + 7 completion tokens at $1/$2 per 1M)
    assert (await admin(proxy, "POST", "/subscription/new", json={
        "team_id": "org-1", "max_budget": 0.00005, "budget_duration": "1d"}))[0] == 200
    statuses = []
    for _ in range(4):
        try:
            await chat(proxy, key)
            statuses.append(200)
        except openai.RateLimitError as exc:
            assert exc.code == "budget_exceeded" and "subscription" in exc.message
            statuses.append(429)
        for mw in proxy.gateway.middlewares:
            if getattr(mw, "ledger", None) is not None:
                await mw.ledger.drain()
    assert statuses == [200, 200, 429, 429]


# ------------------------------------------------------------------------------ caching


class CountingSource:
    """A third-party source (`llmproxy.subscription_sources` plugin): a dict, counted."""

    def __init__(self, options, services) -> None:
        self.calls: list[str] = []
        self.table: dict[str, SubscriptionInfo] = {}
        self.fail = False
        self.delay = 0.0
        CountingSource.last = self

    async def fetch(self, team_id, key_id, user_id):
        self.calls.append(team_id)
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.fail:
            raise RuntimeError("the billing system is down")
        return self.table.get(team_id)


def plugin_registry() -> Registry:
    base = Registry.from_entry_points()
    return Registry(base.providers, base.middlewares, base.event_sinks,
                    {**base.subscription_sources, **Registry.from_classes(
                        subscription_sources={"counting": CountingSource}).subscription_sources})


class Clock:
    def __init__(self) -> None:
        self.now = time.monotonic()

    def __call__(self) -> float:
        return self.now


async def test_a_plugin_source_with_negative_caching_single_flight_and_stale_if_error(upstream, make_proxy):
    proxy = await make_proxy(sub_config(upstream, {"source": "counting", "ttl": 60, "stale_if_error": 100}),
                             plugin_registry())
    source = CountingSource.last
    clock = proxy.gateway.services.clock = Clock()
    key = await team_key(proxy, "org-1")

    # A cold team: 20 concurrent requests, one lookup; "no subscription" is cached too.
    source.delay = 0.2
    await asyncio.gather(*[chat(proxy, key) for _ in range(20)])
    source.delay = 0
    await chat(proxy, key)
    assert source.calls == ["org-1"]

    source.table["org-1"] = SubscriptionInfo(subscription_id="s", team_id="org-1", models=["gpt-test"])
    clock.now += 61  # past the ttl: read again
    with pytest.raises(openai.PermissionDeniedError):
        await chat(proxy, key, "premium")
    assert source.calls == ["org-1", "org-1"]

    # The source fails: the last good answer is served for stale_if_error past the ttl, never a denial.
    source.fail = True
    clock.now += 61
    await chat(proxy, key)
    with pytest.raises(openai.PermissionDeniedError):
        await chat(proxy, key, "premium")
    clock.now += 95  # 156 s old: still within 60 + 100
    await chat(proxy, key)
    clock.now += 10  # 166 s: too old to stand in
    with pytest.raises(openai.APIStatusError) as down:
        await chat(proxy, key)
    assert down.value.status_code == 503
    assert proxy.gateway.services.readiness["subscription_source"] == "unreachable"
    source.fail = False
    clock.now += 2  # past the one-second backoff after a failure
    await chat(proxy, key)
    assert proxy.gateway.services.readiness["subscription_source"] == "ok"
    counts = lookups(proxy)
    assert counts["source"] == 3 and counts["stale"] >= 3 and counts["error"] >= 1 and counts["cache"] >= 1


async def test_check_config_names_the_source_and_its_options(upstream):
    def problems(sub: Any, middlewares: list | None = None) -> str:
        cfg = parse_config(openai_config(upstream, middlewares=middlewares or ["auth", {"subscription": sub}]))
        with pytest.raises(ConfigError) as err:
            check_config(cfg, Registry.from_entry_points())
        return "\n".join(err.value.messages)

    assert "subscription source 'nope' is not installed (installed: db, http)" in problems({"source": "nope"})
    assert "url" in problems({"source": "http"})
    assert "timeout" in problems({"source": "http", "url": "http://x/", "timeout": -1})
    assert "unknown" in problems({"url": "http://x/"})  # the db source takes no options
    assert "needs the auth middleware (or another identity middleware) listed before it" in problems(
        {}, ["subscription", "auth"])
    check_config(parse_config(openai_config(upstream, middlewares=[
        "auth", {"subscription": {"source": "http", "url": "http://127.0.0.1:1/", "headers": {"x": "y"}}}])),
        Registry.from_entry_points())


class SourceServer:
    """The operator's subscription service, for the `http` source."""

    def __init__(self) -> None:
        self.calls: list[dict] = []
        self.headers: list[dict] = []
        self.answers: dict[str, Any] = {}
        self.mode = "ok"  # ok | 500 | hang

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.calls.append(body)
        self.headers.append(dict(request.headers))
        if self.mode == "hang":
            await asyncio.sleep(5)
        if self.mode == "500":
            return web.Response(status=500, text="oops")
        answer = self.answers.get(body["team_id"])
        if answer is None:
            return web.json_response({"error": "no such team"}, status=404)
        return web.json_response(answer)

    async def start(self) -> "SourceServer":
        app = web.Application()
        app.router.add_post("/subscription", self.handle)
        self.server = TestServer(app, host="127.0.0.1")
        await self.server.start_server()
        self.url = f"http://127.0.0.1:{self.server.port}/subscription"
        return self

    async def close(self) -> None:
        await self.server.close()


@pytest.fixture
async def source_server():
    server = await SourceServer().start()
    yield server
    await server.close()


async def test_http_source_timeout_404_stale_then_503_and_refresh(upstream, make_proxy, source_server):
    proxy = await make_proxy(sub_config(upstream, {
        "source": "http", "url": source_server.url, "headers": {"Authorization": "Bearer billing-token"},
        "timeout": 0.3, "retries": 1, "ttl": 30, "stale_if_error": 60}))
    clock = proxy.gateway.services.clock = Clock()
    key = await team_key(proxy, "org-1")
    _, made = await admin(proxy, "POST", "/key/generate", json={"team_id": "org-1", "user_id": "u-7"})

    await chat(proxy, key)  # 404: no subscription, served
    assert source_server.calls == [{"team_id": "org-1", "key_id": proxy.records[-1].key_id, "user_id": None}]
    assert source_server.headers[0]["Authorization"] == "Bearer billing-token"

    # The system of record changes; a refresh applies it at once (no wait for the ttl).
    source_server.answers["org-1"] = {"subscription_id": "ext-1", "models": ["gpt-test"],
                                      "limits": {"*": {"rpm": 100}}}
    await chat(proxy, key, "premium")  # still the cached "none"
    status, body = await admin(proxy, "POST", "/subscription/refresh", json={"team_id": "org-1"})
    assert status == 200 and body["subscription"]["subscription_id"] == "ext-1" and body["source"] == "http"
    with pytest.raises(openai.PermissionDeniedError):
        await chat(proxy, key, "premium")

    # Down (500s, then a hang past the timeout): retried once each time, the last good answer
    # serves within stale_if_error, then 503.
    calls = len(source_server.calls)
    source_server.mode = "500"
    clock.now += 31
    await chat(proxy, made["key"])
    assert len(source_server.calls) == calls + 2  # one retry
    source_server.mode = "hang"
    clock.now += 2
    proxy.gateway.middlewares[1]._cache["org-1"].valid = False  # as after an invalidation
    t0 = time.monotonic()
    await chat(proxy, key)
    assert time.monotonic() - t0 < 3  # bounded by the timeout, not the hang (5 s)
    clock.now += 60
    with pytest.raises(openai.APIStatusError) as down:
        await chat(proxy, key)
    assert down.value.status_code == 503
    status, _ = await admin(proxy, "POST", "/subscription/refresh", json={"team_id": "org-1"})
    assert status == 503


async def test_http_source_answer_that_is_no_subscription_is_a_failure(upstream, make_proxy, source_server):
    proxy = await make_proxy(sub_config(upstream, {"source": "http", "url": source_server.url,
                                                   "stale_if_error": 0}))
    key = await team_key(proxy, "org-1")
    source_server.answers["org-1"] = {"limits": {"*": {"rpm": "many"}}}
    with pytest.raises(openai.APIStatusError) as down:
        await chat(proxy, key)
    assert down.value.status_code == 503  # never read as "no subscription"


async def test_a_change_reaches_the_other_replica_through_redis(upstream, make_proxy, pg_url, redis_url):
    config = sub_config(upstream, {"ttl": 300}, database_url=pg_url, redis_url=redis_url)
    a, b = await make_proxy(config), await make_proxy(config)
    team = "team-" + str(time.monotonic_ns())
    key = await team_key(a, team)
    assert (await admin(a, "POST", "/subscription/new", json={"team_id": team, "subscription_id": team,
                                                              "models": ["gpt-test"]}))[0] == 200
    await chat(b, key)
    with pytest.raises(openai.PermissionDeniedError):
        await chat(b, key, "premium")
    await chat(a, key)  # a reads b's answer from Redis, not the database
    assert lookups(b).get("source") == 1 and lookups(a).get("redis") == 1 and "source" not in lookups(a)

    assert (await admin(a, "POST", "/subscription/update", json={"subscription_id": team,
                                                                 "models": ["gpt-test", "premium"]}))[0] == 200
    deadline = time.monotonic() + 1.0
    while True:  # within a second on b, whose cached copy was 300 s good
        try:
            await chat(b, key, "premium")
            break
        except openai.PermissionDeniedError:
            assert time.monotonic() < deadline, "the change did not reach the other replica within 1 s"
            await asyncio.sleep(0.05)
    assert (await admin(a, "POST", "/subscription/update", json={"subscription_id": team, "enabled": False}))[0] == 200
    deadline = time.monotonic() + 1.0
    while True:
        try:
            await chat(b, key)
        except openai.PermissionDeniedError as exc:
            assert exc.code == "subscription_disabled"
            break
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)


async def test_redis_down_reads_the_source(upstream, make_proxy):
    proxy = await make_proxy(sub_config(upstream, redis_url="redis://127.0.0.1:1/0"))
    key = await team_key(proxy, "org-1")
    assert (await admin(proxy, "POST", "/subscription/new", json={"team_id": "org-1", "models": ["gpt-test"]}))[0] == 200
    await chat(proxy, key)
    with pytest.raises(openai.PermissionDeniedError):
        await chat(proxy, key, "premium")
    assert lookups(proxy)["source"] == 1 and lookups(proxy)["cache"] == 1


# ------------------------------------------------------------------------------ /v1/limits


async def test_v1_limits_reports_effective_limits_usage_and_budgets(upstream, make_proxy):
    proxy = await make_proxy(sub_config(upstream))
    key = await team_key(proxy, "org-1", rpm_limit=50, max_budget=5)
    assert (await admin(proxy, "POST", "/team/update", json={"team_id": "org-1", "tpm_limit": 100000}))[0] == 200
    assert (await admin(proxy, "POST", "/subscription/new", json={
        "team_id": "org-1", "subscription_id": "s1", "models": ["gpt-test", "premium"], "max_budget": 1,
        "limits": {"*": {"rpm": 20, "max_parallel_requests": 3}, "premium": {"rpm": 4}}}))[0] == 200
    for _ in range(3):
        await chat(proxy, key)
    status, report = await get(proxy, "/v1/limits", key)
    assert status == 200
    assert sorted(report["models"]) == ["gpt-test", "premium"]
    rpm = report["models"]["gpt-test"]["rpm"]
    assert (rpm["from"], rpm["limit"]) == ("subscription", 20)
    assert 16 <= rpm["remaining"] <= 17 and 3 <= rpm["used"] <= 4 and 0 < rpm["resets_in_seconds"] <= 12
    assert {r["from"] for r in rpm["all"]} == {"key", "subscription"}
    assert report["models"]["gpt-test"]["tpm"]["from"] == "team"
    assert report["models"]["gpt-test"]["max_parallel_requests"] == {
        "from": "subscription", "limit": 3, "in_flight": 0, "remaining": 3,
        "all": [{"from": "subscription", "limit": 3, "in_flight": 0, "remaining": 3}]}
    assert report["models"]["premium"]["rpm"]["limit"] == 4 and report["models"]["premium"]["rpm"]["remaining"] == 4
    budgets = {b["scope"]: b for b in report["budgets"]}
    assert budgets["key"]["max_budget"] == 5 and budgets["subscription"]["max_budget"] == 1
    assert 0 < budgets["subscription"]["spend"] < 0.001 and budgets["subscription"]["resets_at"] is None
    assert report["subscription"]["subscription_id"] == "s1" and "metadata" not in report["subscription"]
    assert report["key"]["team_id"] == "org-1"
    assert (await get(proxy, "/v1/limits", "sk-nobody-knows-this-key-0000000000"))[0] == 401
