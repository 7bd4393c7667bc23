"""Issue 4 end to end: the sandbox platform's flow (seed 002, "Part A") over HTTP, then the
key in use through the real SDKs; on SQLite and on PostgreSQL; and one team budget held by
two replicas sharing PostgreSQL and Redis."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import aiohttp
import anthropic
import openai
import pytest

from .conftest import MASTER, needs, openai_config

ADMIN = {"Authorization": f"Bearer {MASTER}"}

pytestmark = needs("auth")


async def admin(proxy, method: str, path: str, **kw) -> tuple[int, dict]:
    async with aiohttp.ClientSession(headers=ADMIN) as s:
        async with s.request(method, proxy.url + path, **kw) as r:
            return r.status, await r.json()


async def test_seed_flow_on_sqlite(upstream, make_proxy, tmp_path):
    await seed_flow(upstream, await make_proxy(openai_config(
        upstream, middlewares=["auth"], database={"sqlite_path": str(tmp_path / "e2e.db")})))


async def test_seed_flow_on_postgres(upstream, make_proxy, pg_url):
    await seed_flow(upstream, await make_proxy(openai_config(upstream, middlewares=["auth"], database_url=pg_url)))


async def seed_flow(upstream, proxy) -> None:
    assert (await admin(proxy, "GET", "/team/info", params={"team_id": "org-1"}))[0] == 404
    status, team = await admin(proxy, "POST", "/team/new", json={"team_id": "org-1"})
    assert status == 200 and team["team_id"] == "org-1"
    assert (await admin(proxy, "POST", "/team/new", json={"team_id": "org-1"}))[0] == 400
    status, made = await admin(proxy, "POST", "/key/generate", json={
        "team_id": "org-1", "user_id": "session-1", "duration": "24h", "max_budget": 50})
    assert status == 200
    key = made["key"]
    assert key.startswith("sk-") and len(key) >= 35
    expires = datetime.fromisoformat(made["expires"].replace("Z", "+00:00"))
    assert timedelta(hours=23, minutes=59) < expires - datetime.now(timezone.utc) <= timedelta(hours=24)

    oai = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key=key, max_retries=0)
    resp = await oai.chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": "hi"}])
    assert resp.choices[0].message.content == upstream.answer_text()
    stream = await oai.chat.completions.create(model="gpt-test", stream=True,
                                               messages=[{"role": "user", "content": "hi"}])
    assert "".join([c.choices[0].delta.content or "" async for c in stream if c.choices]) == upstream.answer_text()
    ant = anthropic.AsyncAnthropic(base_url=proxy.url, api_key=key, max_retries=0)
    msg = await ant.messages.create(model="claude-test", max_tokens=20, messages=[{"role": "user", "content": "hi"}])
    assert msg.content[0].text == upstream.answer_text()
    assert all(key not in str(dict(r.headers)) for r in upstream.requests)  # provider keys only upstream

    rec = proxy.records[-1]
    assert (rec.key_id, rec.team_id, rec.user_id) == (made["token"], "org-1", "session-1")

    # The spend shows up in the key's info once the batch is written.
    writer = next(s for s in proxy.gateway.sinks if type(s).__name__ == "SpendWriter")
    await writer._write_batch() if writer.queue else None
    status, info = await admin(proxy, "GET", "/key/info", params={"key": key})
    assert status == 200 and info["info"]["spend"] > 0

    # Block, delete: the key stops working at once (the cache is invalidated).
    assert (await admin(proxy, "POST", "/key/block", json={"key": key}))[0] == 200
    with pytest.raises(openai.AuthenticationError) as blocked:
        await oai.chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": "hi"}])
    assert blocked.value.code == "key_blocked"
    assert (await admin(proxy, "POST", "/key/unblock", json={"key": key}))[0] == 200
    await oai.chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": "hi"}])
    status, deleted = await admin(proxy, "POST", "/key/delete", json={"keys": [key]})
    assert deleted["deleted_keys"] == [made["token"]]
    with pytest.raises(openai.AuthenticationError):
        await oai.chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": "hi"}])


async def test_two_replicas_on_postgres_and_redis_hold_one_team_budget(upstream, make_proxy, pg_url, redis_url):
    config = openai_config(upstream, middlewares=["auth"], database_url=pg_url, redis_url=redis_url)
    a = await make_proxy(config)
    b = await make_proxy(config)
    team = "team-" + datetime.now().strftime("%H%M%S%f")
    status, _ = await admin(a, "POST", "/team/new", json={"team_id": team, "max_budget": 0.0001,
                                                          "budget_duration": "1d"})
    assert status == 200
    keys = [(await admin(a, "POST", "/key/generate", json={"team_id": team}))[1]["key"] for _ in range(2)]
    statuses = []
    for i in range(6):
        proxy = (a, b)[i % 2]
        client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key=keys[i % 2], max_retries=0)
        try:
            await client.chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": "x"}])
            statuses.append(200)
        except openai.RateLimitError as exc:
            assert exc.code == "budget_exceeded"
            statuses.append(429)
        for p in (a, b):  # reconciliation is off the request path: let it land
            for mw in p.gateway.middlewares:
                if getattr(mw, "ledger", None) is not None:
                    await mw.ledger.drain()
    # each request costs $0.000025 (11 prompt + 7 completion tokens at $1/$2 per 1M)
    assert statuses == [200, 200, 200, 200, 429, 429]
