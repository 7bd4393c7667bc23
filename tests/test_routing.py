"""Routing: load spread, cooldown and retry on another deployment, fallback models."""

from __future__ import annotations

import random

import aiohttp

from llmproxy.config import parse_config
from llmproxy.router import DeploymentState, Router
from llmproxy.testing import FakeUpstream, reply_json

from .conftest import MASTER

AUTH = {"Authorization": f"Bearer {MASTER}"}
BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def two_deployments(a: FakeUpstream, b: FakeUpstream, **router) -> dict:
    return {
        "master_key": MASTER,
        "models": [
            {"name": "m", "deployments": [
                {"provider": "openai", "model": "up-a", "api_base": a.url + "/v1", "api_key": "k"},
                {"provider": "openai", "model": "up-b", "api_base": b.url + "/v1", "api_key": "k"}]},
            {"name": "backup", "deployments": [
                {"provider": "openai", "model": "up-backup", "api_base": b.url + "/v1", "api_key": "k"}]},
        ],
        "router": {"num_retries": 1, "retry_after": 0, "cooldown_seconds": 60, **router},
    }


async def post(proxy, body=BODY):
    async with aiohttp.ClientSession() as s:
        async with s.post(proxy.url + "/v1/chat/completions", json=body, headers=AUTH) as r:
            return r.status, await r.json()


async def test_two_deployments_share_the_load(make_proxy):
    a, b = await FakeUpstream().start(), await FakeUpstream().start()
    try:
        proxy = await make_proxy(two_deployments(a, b))
        for _ in range(40):
            status, _ = await post(proxy)
            assert status == 200
        # sequential requests leave both idle: ties are broken at random
        assert len(a.requests) > 5 and len(b.requests) > 5
        assert len(a.requests) + len(b.requests) == 40
    finally:
        await a.close()
        await b.close()


async def test_failing_deployment_is_cooled_down_and_retried_elsewhere(make_proxy):
    a, b = await FakeUpstream().start(), await FakeUpstream().start()
    try:
        config = two_deployments(a, b)
        deps = config["models"][0]["deployments"]
        deps[0]["weight"], deps[1]["weight"] = 1e6, 1e-6  # idle ties go to `a` (almost surely)
        proxy = await make_proxy(config)
        a.push(*[reply_json(500, {"error": "boom"})] * 10)
        results = [await post(proxy) for _ in range(10)]
        assert all(status == 200 for status, _ in results)
        assert len(a.requests) == 1  # failed once, then skipped during its cooldown
        assert len(b.requests) == 10
        rec = next(r for r in proxy.records if len(r.attempts) == 2)
        assert [x.outcome for x in rec.attempts] == ["http_500", "ok"]
        assert rec.deployment == "openai:up-b"
    finally:
        await a.close()
        await b.close()


async def test_fallback_model_answers_when_all_deployments_fail(make_proxy):
    a, b = await FakeUpstream().start(), await FakeUpstream().start()
    try:
        config = two_deployments(a, b, fallbacks={"m": ["backup"]})
        config["models"][0]["deployments"] = config["models"][0]["deployments"][:1]
        proxy = await make_proxy(config)
        a.push(reply_json(503, {}), reply_json(503, {}))
        status, body = await post(proxy)
        assert status == 200
        assert len(a.requests) == 2  # 1 + num_retries on the first model
        assert b.requests[-1].json["model"] == "up-backup"
        assert [x.outcome for x in proxy.records[-1].attempts] == ["http_503", "http_503", "ok"]
    finally:
        await a.close()
        await b.close()


def _states(weights, clock):
    cfg = parse_config({"models": [{"name": "m", "deployments": [
        {"provider": "mock", "model": f"d{i}", "weight": w} for i, w in enumerate(weights)]}]})

    class P:
        apis = frozenset({"chat"})

    return Router({"m": [DeploymentState(d, P(), cfg.models[0]) for d in cfg.models[0].deployments]}, clock,
                  random.Random(1))


def test_least_inflight_per_weight():
    now = [0.0]
    router = _states([1, 3], lambda: now[0])
    picks = []
    for _ in range(8):
        s = router.pick("m", "chat")
        s.inflight += 1
        picks.append(s.deployment.model)
    assert picks.count("d1") == 6 and picks.count("d0") == 2


def test_idle_ties_follow_weight():
    router = _states([1, 3], lambda: 0.0)
    picks = [router.pick("m", "chat").deployment.model for _ in range(400)]
    assert 240 < picks.count("d1") < 360  # about 3 in 4 (seeded)


def test_all_cooling_picks_the_one_whose_cooldown_ends_first():
    now = [100.0]
    router = _states([1, 1], lambda: now[0])
    s0, s1 = router.states["m"]
    router.cool(s0, 30)
    router.cool(s1, 10)
    assert router.pick("m", "chat") is s1
    now[0] = 111.0
    assert router.pick("m", "chat") is s1  # s1 is live again, s0 still cooling
    now[0] = 131.0
    s1.inflight = 1
    assert router.pick("m", "chat") is s0
