"""The `cache` middleware with Redis (issue 14, item 6): two replicas share their answers
through it; values are compressed and expire with their entry; Redis down, cut or hung is
a miss (a 200 from upstream), never an error. Needs the Redis of `LLMPROXY_TEST_REDIS_URL`
(skipped without it, a failure under CI=true); the outages are a `TcpProxy` in front of it
that the test cuts, or a local server that never answers, never the shared Redis itself."""

from __future__ import annotations

import asyncio
import uuid
import zlib

import aiohttp
import openai
import orjson
import pytest
import redis.asyncio as aioredis

pytest.importorskip("llmproxy.middlewares.cache", reason="the cache middleware is not installed")
from llmproxy.middlewares.cache import Cache
from llmproxy.testing import TcpProxy

from .conftest import MASTER, openai_config

CHAT = {"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}], "temperature": 0}
TEXT = "Hello from the fake upstream."


@pytest.fixture
async def prefix(redis_url):
    """A key prefix of this test's own on the shared Redis; its keys are deleted afterwards."""
    name = f"llmproxy-test:cache:{uuid.uuid4().hex[:12]}:"
    yield name
    client = aioredis.from_url(redis_url)
    try:
        keys = [k async for k in client.scan_iter(match=name + "*", count=1000)]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


async def post(proxy, body: dict) -> tuple[int, str, bytes]:
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {MASTER}"}) as s:
        async with s.post(proxy.url + "/v1/chat/completions", json=body) as r:
            return r.status, r.headers.get("x-llmproxy-cache", ""), await r.read()


async def stored_keys(redis_url: str, prefix: str, at_least: int = 1) -> list[bytes]:
    """The entries under `prefix`, once at least `at_least` are there (writes go in the
    background); bounded wait."""
    client = aioredis.from_url(redis_url)
    try:
        for _ in range(100):
            keys = [k async for k in client.scan_iter(match=prefix + "*")]
            if len(keys) >= at_least:
                return keys
            await asyncio.sleep(0.02)
        return keys
    finally:
        await client.aclose()


async def test_two_replicas_share_answers_through_redis(upstream, make_proxy, redis_url, prefix):
    config = openai_config(upstream, redis_url=redis_url,
                           middlewares=[{"cache": {"ttl": 120, "redis_prefix": prefix}}])
    a, b = await make_proxy(config), await make_proxy(config)
    client_a = openai.AsyncOpenAI(base_url=a.url + "/v1", api_key=MASTER, max_retries=0)
    client_b = openai.AsyncOpenAI(base_url=b.url + "/v1", api_key=MASTER, max_retries=0)

    async def stream_bytes(client) -> tuple[str, bytes]:
        async with client.chat.completions.with_streaming_response.create(
                model="gpt-test", messages=[{"role": "user", "content": "hi"}], temperature=0, stream=True) as resp:
            return resp.headers["x-llmproxy-cache"], b"".join([c async for c in resp.iter_bytes()])

    first = await stream_bytes(client_a)
    assert first[0] == "miss"
    (key,) = await stored_keys(redis_url, prefix)
    client = aioredis.from_url(redis_url)
    try:
        raw, ttl = await client.get(key), await client.pttl(key)
    finally:
        await client.aclose()
    assert 110_000 < ttl <= 120_000  # the entry's own lifetime
    assert b"chatcmpl-fake" not in raw and b'"content":" upstream"' in zlib.decompress(raw)  # compressed
    assert key.decode().removeprefix(prefix).isalnum() and b"hi" not in key  # the key says nothing of the request

    assert await stream_bytes(client_b) == ("hit", first[1])  # the other replica, byte for byte
    raw_b = await client_b.chat.completions.with_raw_response.create(
        model="gpt-test", messages=[{"role": "user", "content": "hi"}], temperature=0)
    assert raw_b.headers["x-llmproxy-cache"] == "hit" and raw_b.parse().choices[0].message.content == TEXT
    assert len(upstream.requests) == 1
    assert [r.cache for r in b.records] == ["hit", "hit"]


async def test_redis_cut_is_a_miss_never_an_error(upstream, make_proxy, redis_url, prefix):
    host, port = redis_url.split("//")[1].split("/")[0].split(":")
    relay = await TcpProxy(host, int(port)).start()
    try:
        # No local LRU: every answer comes from Redis or upstream.
        proxy = await make_proxy(openai_config(upstream, middlewares=[{"cache": {
            "max_bytes": 0, "redis_url": f"redis://127.0.0.1:{relay.port}/0", "redis_prefix": prefix}}]))
        assert (await post(proxy, CHAT))[1] == "miss"
        await stored_keys(redis_url, prefix)
        assert (await post(proxy, CHAT))[1] == "hit"

        relay.cut()
        other = {**CHAT, "messages": [{"role": "user", "content": "during the outage"}]}
        for body in (CHAT, CHAT, other, other):
            status, result, data = await post(proxy, body)
            assert (status, result) == (200, "miss") and orjson.loads(data)["choices"][0]["message"]["content"] == TEXT
        assert len(upstream.requests) == 5
        cache = next(m for m in proxy.gateway.middlewares if isinstance(m, Cache))
        assert cache.health()["cache_redis_failures"] >= 4

        relay.restore()  # the entry stored before the outage serves again
        assert (await post(proxy, CHAT))[1] == "hit"
        assert len(upstream.requests) == 5
    finally:
        await relay.close()


async def test_a_hung_redis_is_a_miss_within_the_client_timeout(upstream, make_proxy):
    accepted: list[asyncio.StreamWriter] = []

    async def never_answers(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)
        await reader.read(1 << 20)  # takes the command, answers nothing

    server = await asyncio.start_server(never_answers, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        proxy = await make_proxy(openai_config(upstream, middlewares=[{"cache": {
            "max_bytes": 0, "redis_url": f"redis://127.0.0.1:{port}/0"}}]))
        results = await asyncio.gather(*[post(proxy, {**CHAT, "messages": [{"role": "user", "content": str(i)}]})
                                         for i in range(3)])
        assert [(s, r) for s, r, _ in results] == [(200, "miss")] * 3
        assert len(upstream.requests) == 3 and accepted  # it was asked, and did not answer
    finally:
        for w in accepted:
            w.close()
        server.close()
        await server.wait_closed()
