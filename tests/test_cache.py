"""The `cache` middleware end to end (issue 14, items 6-10): a proxy in front of the recording
fake upstream (which counts the calls that reach it), driven over HTTP and through the real
`openai` and `anthropic` SDKs: hit, miss and bypass; the controls; tenants that never share;
streams replayed byte for byte and answered in the other form; what is never stored; a hit
that takes no scheduler quota; pii's masked requests; a stampede. Redis: test_cache_redis.py;
the pieces on their own: test_cache_units.py."""

from __future__ import annotations

import asyncio
import re
import time
from decimal import Decimal
from typing import Any

import aiohttp
import anthropic
import openai
import orjson
import pytest
from aiohttp import web

pytest.importorskip("llmproxy.middlewares.cache", reason="the cache middleware is not installed")
from llmproxy.middlewares.cache import Cache
from llmproxy.testing import (Received, TestPrincipal, anthropic_events, collect, make_context, ok_reply,
                              openai_events, reply_json, reply_sse)

from .conftest import MASTER, needs, openai_config

AUTH = {"Authorization": f"Bearer {MASTER}"}
CHAT = {"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}], "temperature": 0}
MESSAGES = {"model": "claude-test", "max_tokens": 20, "messages": [{"role": "user", "content": "hi"}],
            "temperature": 0}
TEXT = "Hello from the fake upstream."


def cached(upstream, options: dict[str, Any] | None = None, before: list | None = None,
           after: list | None = None, **extra: Any) -> dict[str, Any]:
    return openai_config(upstream, middlewares=[*(before or []), {"cache": options or {}}, *(after or [])], **extra)


def cache_of(proxy) -> Cache:
    return next(m for m in proxy.gateway.middlewares if isinstance(m, Cache))


async def post(proxy, body: dict, path: str = "/v1/chat/completions", headers: dict | None = None,
               key: str = MASTER) -> tuple[int, dict[str, str], bytes]:
    async with aiohttp.ClientSession() as s:
        async with s.post(proxy.url + path, json=body,
                          headers={"Authorization": f"Bearer {key}", **(headers or {})}) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, await r.read()


class Wall:
    """A wall clock the test moves: installed on the cache, which reads time only through it."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def frozen(proxy) -> Wall:
    wall = Wall()
    cache_of(proxy).wall = wall
    return wall


def answer_with(text: str):
    """An OpenAI chat answer with `text` (non-stream or stream, as asked)."""
    async def behaviour(request: web.Request, got: Received) -> web.StreamResponse:
        body = got.json
        if body.get("stream"):
            wants = bool((body.get("stream_options") or {}).get("include_usage"))
            return await reply_sse(openai_events("gpt-upstream", [text], wants))(request, got)
        return web.json_response({"id": "chatcmpl-2", "object": "chat.completion", "created": 2,
                                  "model": "gpt-upstream",
                                  "choices": [{"index": 0, "finish_reason": "stop",
                                               "message": {"role": "assistant", "content": text}}],
                                  "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}})
    return behaviour


# --- hit, miss, bypass ---------------------------------------------------------------------


async def test_a_miss_then_a_hit_that_costs_nothing_and_says_what_it_saved(upstream, make_proxy):
    proxy = await make_proxy(cached(upstream))
    status, h1, b1 = await post(proxy, CHAT)
    assert status == 200 and h1["x-llmproxy-cache"] == "miss" and "age" not in h1
    wall = frozen(proxy)
    wall.now += 7
    status, h2, b2 = await post(proxy, CHAT)
    assert status == 200 and h2["x-llmproxy-cache"] == "hit" and h2["age"] == "7"
    assert b2 == b1 and orjson.loads(b2)["choices"][0]["message"]["content"] == TEXT
    assert len(upstream.requests) == 1  # the hit never reached upstream

    miss, hit = proxy.records
    assert (miss.cache, hit.cache) == ("miss", "hit")
    assert miss.spend > 0 and miss.prompt_tokens == 11
    assert hit.spend == Decimal(0) and hit.prompt_tokens == hit.completion_tokens == 0
    assert hit.attempts == [] and hit.deployment is None and hit.status == 200
    assert hit.extra == {"cache_saved_prompt_tokens": 11, "cache_saved_completion_tokens": 7}
    # the key is never shown: no header of the hit but those a client expects
    assert {"x-llmproxy-cache", "age", "content-type", "x-request-id"} <= set(h2)
    assert not any(re.fullmatch(r"[0-9a-f]{64}", v) for v in h2.values())

    async with aiohttp.ClientSession() as s:
        async with s.get(proxy.url + "/metrics") as r:
            text = await r.text()
    assert 'llmproxy_cache_requests_total{result="hit"} 1.0' in text
    assert 'llmproxy_cache_requests_total{result="miss"} 1.0' in text


@pytest.mark.parametrize("change", [{"temperature": 0.7}, {"temperature": 1}, {"n": 2}])
async def test_sampled_answers_bypass_unless_cache_nondeterministic(upstream, make_proxy, change):
    body = {**CHAT, **change}
    proxy = await make_proxy(cached(upstream))
    assert [(await post(proxy, body))[1]["x-llmproxy-cache"] for _ in range(2)] == ["bypass", "bypass"]
    assert len(upstream.requests) == 2 and [r.cache for r in proxy.records] == ["bypass", "bypass"]

    sampling = await make_proxy(cached(upstream, {"cache_nondeterministic": True}))
    assert [(await post(sampling, body))[1]["x-llmproxy-cache"] for _ in range(2)] == ["miss", "hit"]
    assert len(upstream.requests) == 3


async def test_a_request_that_does_not_ask_for_samples_is_cached(upstream, make_proxy):
    proxy = await make_proxy(cached(upstream))
    body = {k: v for k, v in CHAT.items() if k != "temperature"}
    assert [(await post(proxy, body))[1]["x-llmproxy-cache"] for _ in range(2)] == ["miss", "hit"]
    assert (await post(proxy, {**body, "n": 1}))[1]["x-llmproxy-cache"] == "miss"  # n is keyed


@pytest.mark.parametrize("change, same", [
    ({"stream": False}, True),
    ({"user": "someone-else"}, True),
    ({"metadata": {"trace": "x"}}, True),
    ({"messages": [{"content": "hi", "role": "user"}]}, True),  # key order does not matter
    ({"max_tokens": 5}, False),
    ({"messages": [{"role": "user", "content": "hi!"}]}, False),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, False),
    ({"response_format": {"type": "json_object"}}, False),
    ({"seed": 1}, False),
    ({"some_new_parameter": True}, False),  # unknown fields are keyed: a miss, never a wrong answer
])
async def test_what_is_part_of_the_key(upstream, make_proxy, change, same):
    proxy = await make_proxy(cached(upstream))
    await post(proxy, CHAT)
    _, headers, _ = await post(proxy, {**CHAT, **change})
    assert headers["x-llmproxy-cache"] == ("hit" if same else "miss")
    assert len(upstream.requests) == (1 if same else 2)


async def test_an_anthropic_beta_header_is_another_request(upstream, make_proxy):
    proxy = await make_proxy(cached(upstream))
    await post(proxy, MESSAGES, "/v1/messages")
    assert (await post(proxy, MESSAGES, "/v1/messages"))[1]["x-llmproxy-cache"] == "hit"
    beta = {"anthropic-beta": "some-feature-2025-01-01"}
    assert (await post(proxy, MESSAGES, "/v1/messages", beta))[1]["x-llmproxy-cache"] == "miss"
    assert (await post(proxy, MESSAGES, "/v1/messages", beta))[1]["x-llmproxy-cache"] == "hit"


async def test_embeddings_are_cached(upstream, make_proxy):
    proxy = await make_proxy(cached(upstream))
    body = {"model": "gpt-test", "input": "some text"}
    first, second = [await post(proxy, body, "/v1/embeddings") for _ in range(2)]
    assert first[1]["x-llmproxy-cache"] == "miss" and second[1]["x-llmproxy-cache"] == "hit"
    assert orjson.loads(second[2])["data"][0]["embedding"] == [0.1, 0.2] and len(upstream.requests) == 1


# --- controls --------------------------------------------------------------------------------


async def test_cache_control_no_cache_answers_from_upstream_and_stores_that(upstream, make_proxy):
    proxy = await make_proxy(cached(upstream))
    await post(proxy, CHAT)
    upstream.push(answer_with("a newer answer"))
    status, headers, body = await post(proxy, CHAT, headers={"Cache-Control": "no-cache"})
    assert status == 200 and headers["x-llmproxy-cache"] == "bypass"
    assert orjson.loads(body)["choices"][0]["message"]["content"] == "a newer answer"
    _, headers, body = await post(proxy, CHAT)
    assert headers["x-llmproxy-cache"] == "hit"
    assert orjson.loads(body)["choices"][0]["message"]["content"] == "a newer answer"
    assert len(upstream.requests) == 2 and proxy.records[1].cache == "bypass"


async def test_cache_control_no_store_and_max_age(upstream, make_proxy):
    proxy = await make_proxy(cached(upstream))
    assert (await post(proxy, CHAT, headers={"Cache-Control": "no-store"}))[1]["x-llmproxy-cache"] == "miss"
    assert (await post(proxy, CHAT))[1]["x-llmproxy-cache"] == "miss"  # nothing was stored
    wall = frozen(proxy)
    wall.now += 30
    assert (await post(proxy, CHAT, headers={"Cache-Control": "max-age=60"}))[1]["x-llmproxy-cache"] == "hit"
    assert (await post(proxy, CHAT, headers={"Cache-Control": "max-age=10"}))[1]["x-llmproxy-cache"] == "miss"
    # the younger answer that miss stored serves both from now on
    assert (await post(proxy, CHAT, headers={"Cache-Control": "max-age=10"}))[1]["x-llmproxy-cache"] == "hit"
    assert len(upstream.requests) == 3


async def test_the_litellm_cache_field_works_and_never_reaches_upstream(upstream, make_proxy):
    proxy = await make_proxy(cached(upstream))
    wall = frozen(proxy)
    seen = []
    for field, expected in [
        ({"no-store": True}, "miss"),
        ({}, "miss"),  # no-store stored nothing
        ({"no-cache": True}, "bypass"),  # answered from upstream, and that stored
        ({}, "hit"),
        ({"namespace": "other"}, "miss"),
        ({"namespace": "other"}, "hit"),
        ({"namespace": "short", "ttl": 60}, "miss"),  # stored for 60 s instead of 3600
        ({"s-maxage": 0}, "miss"),  # only an answer younger than any stored one; it stores its own
    ]:
        _, headers, _ = await post(proxy, {**CHAT, "cache": field})
        seen.append(headers["x-llmproxy-cache"])
        assert seen[-1] == expected, (field, seen)
        wall.now += 1
    assert all("cache" not in r.json for r in upstream.requests)
    wall.now += 60
    assert (await post(proxy, {**CHAT, "cache": {"namespace": "short"}}))[1]["x-llmproxy-cache"] == "miss"
    assert (await post(proxy, CHAT))[1]["x-llmproxy-cache"] == "hit"  # 61 s old, within 3600
    assert (await post(proxy, {**CHAT, "cache": {"s-maxage": 30}}))[1]["x-llmproxy-cache"] == "miss"
    assert len(upstream.requests) == 8


@pytest.mark.parametrize("field, param", [
    ("yes", "cache"),
    ({"no-cache": "true"}, "cache.no-cache"),
    ({"ttl": -1}, "cache.ttl"),
    ({"s-maxage": "soon"}, "cache.s-maxage"),
    ({"namespace": 3}, "cache.namespace"),
])
async def test_a_cache_field_of_the_wrong_shape_is_a_400(upstream, make_proxy, field, param):
    proxy = await make_proxy(cached(upstream))
    status, _, body = await post(proxy, {**CHAT, "cache": field})
    assert status == 400 and orjson.loads(body)["error"]["param"] == param
    assert upstream.requests == []


async def test_entries_expire_after_ttl(upstream, make_proxy):
    proxy = await make_proxy(cached(upstream, {"ttl": 10}))
    wall = frozen(proxy)
    await post(proxy, CHAT)
    wall.now += 9
    assert (await post(proxy, CHAT))[1]["x-llmproxy-cache"] == "hit"
    wall.now += 2
    assert (await post(proxy, CHAT))[1]["x-llmproxy-cache"] == "miss"


# --- tenants ---------------------------------------------------------------------------------


async def admin(proxy, path: str, body: dict) -> dict:
    async with aiohttp.ClientSession(headers=AUTH) as s:
        async with s.post(proxy.url + path, json=body) as r:
            assert r.status == 200, await r.text()
            return await r.json()


@needs("auth")
@pytest.mark.parametrize("scope, shared_in_team, shared_across", [
    ("team", True, False), ("key", False, False), ("global", True, True)])
async def test_tenants_never_share_answers_beyond_the_scope(upstream, make_proxy, scope, shared_in_team,
                                                            shared_across):
    proxy = await make_proxy(cached(upstream, {"scope": scope}, before=["auth"]))
    for team in ("team-a", "team-b"):
        await admin(proxy, "/team/new", {"team_id": team})
    a1, a2, b1 = [(await admin(proxy, "/key/generate", {"team_id": t}))["key"]
                  for t in ("team-a", "team-a", "team-b")]
    clients = {k: openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key=k, max_retries=0) for k in (a1, a2, b1)}

    async def ask(key: str) -> str:
        raw = await clients[key].chat.completions.with_raw_response.create(
            model="gpt-test", messages=[{"role": "user", "content": "hi"}], temperature=0)
        assert raw.parse().choices[0].message.content == TEXT
        return raw.headers["x-llmproxy-cache"]

    assert await ask(a1) == "miss"
    assert await ask(a1) == "hit"
    assert await ask(a2) == ("hit" if shared_in_team else "miss")
    assert await ask(b1) == ("hit" if shared_across else "miss")
    calls = 1 + (not shared_in_team) + (not shared_across)
    assert len(upstream.requests) == calls
    assert [r.team_id for r in proxy.records[-4:]] == ["team-a", "team-a", "team-a", "team-b"]


# --- streams ---------------------------------------------------------------------------------


def oai(proxy) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key=MASTER, max_retries=0)


def ant(proxy) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url=proxy.url, api_key=MASTER, max_retries=0)


async def openai_stream_bytes(client: openai.AsyncOpenAI, **extra: Any) -> tuple[str, bytes]:
    async with client.chat.completions.with_streaming_response.create(
            model="gpt-test", messages=[{"role": "user", "content": "hi"}], temperature=0, stream=True,
            **extra) as resp:
        return resp.headers["x-llmproxy-cache"], b"".join([c async for c in resp.iter_bytes()])


async def test_an_openai_stream_is_stored_and_replayed_byte_for_byte(upstream, make_proxy):
    proxy = await make_proxy(cached(upstream))
    client = oai(proxy)
    first = await openai_stream_bytes(client)
    second = await openai_stream_bytes(client)
    assert first[0] == "miss" and second == ("hit", first[1])
    assert first[1].endswith(b"data: [DONE]\n\n") and b'"usage":{' not in first[1]  # the usage chunk removed
    stream = await client.chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": "hi"}],
                                                  temperature=0, stream=True)
    assert "".join([c.choices[0].delta.content or "" async for c in stream if c.choices]) == TEXT
    assert len(upstream.requests) == 1


async def test_a_hit_gives_the_usage_chunk_to_a_client_that_asks_for_it(upstream, make_proxy):
    proxy = await make_proxy(cached(upstream))
    client = oai(proxy)
    usage = {"stream_options": {"include_usage": True}}
    plain = await openai_stream_bytes(client)  # stored without the usage chunk (not asked for)
    status, with_usage = await openai_stream_bytes(client, **usage)
    assert status == "hit" and with_usage != plain[1]
    stream = await client.chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": "hi"}],
                                                  temperature=0, stream=True, **usage)
    chunks = [c async for c in stream]
    assert chunks[-1].choices == [] and (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (11, 6)

    # The other way: stored from a client that asked for it; given to each as it asks.
    other = await make_proxy(cached(upstream))
    client = oai(other)
    asked = await openai_stream_bytes(client, **usage)
    assert asked[0] == "miss" and b'"usage":{"prompt_tokens":11' in asked[1]
    assert await openai_stream_bytes(client, **usage) == ("hit", asked[1])
    status, not_asked = await openai_stream_bytes(client)
    assert status == "hit" and b'"usage":{' not in not_asked and not_asked.endswith(b"data: [DONE]\n\n")
    assert len(upstream.requests) == 2


async def test_an_anthropic_stream_is_stored_and_replayed_byte_for_byte(upstream, make_proxy):
    proxy = await make_proxy(cached(upstream))
    client = ant(proxy)

    async def raw() -> tuple[str, bytes]:
        async with client.messages.with_streaming_response.create(
                model="claude-test", max_tokens=20, stream=True,
                messages=[{"role": "user", "content": "hi"}]) as resp:
            return resp.headers["x-llmproxy-cache"], b"".join([c async for c in resp.iter_bytes()])

    first, second = await raw(), await raw()
    assert first[0] == "miss" and second == ("hit", first[1])
    assert first[1] == b"".join(anthropic_events("claude-upstream", upstream.text_chunks))
    async with client.messages.stream(model="claude-test", max_tokens=20,
                                      messages=[{"role": "user", "content": "hi"}]) as stream:
        message = await stream.get_final_message()
    assert message.content[0].text == TEXT and message.usage.output_tokens == len(upstream.text_chunks)
    assert len(upstream.requests) == 1


async def test_openai_stream_and_json_answer_each_other(upstream, make_proxy):
    # a stream stored, a JSON answer served from it
    proxy = await make_proxy(cached(upstream))
    client = oai(proxy)
    await openai_stream_bytes(client)
    raw = await client.chat.completions.with_raw_response.create(
        model="gpt-test", messages=[{"role": "user", "content": "hi"}], temperature=0)
    answer = raw.parse()
    assert raw.headers["x-llmproxy-cache"] == "hit" and raw.headers["content-type"].startswith("application/json")
    assert answer.choices[0].message.content == TEXT and answer.choices[0].finish_reason == "stop"
    assert answer.id == "chatcmpl-fake" and answer.object == "chat.completion"
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (11, 6)  # what the stream used

    # a JSON answer stored, a stream served from it
    other = await make_proxy(cached(upstream))
    client = oai(other)
    await client.chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": "hi"}],
                                         temperature=0)
    status, data = await openai_stream_bytes(client, stream_options={"include_usage": True})
    assert status == "hit" and data.endswith(b"data: [DONE]\n\n")
    stream = await client.chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": "hi"}],
                                                  temperature=0, stream=True, stream_options={"include_usage": True})
    chunks = [c async for c in stream]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == TEXT
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage.total_tokens == 18
    assert len(upstream.requests) == 2


async def test_anthropic_stream_and_json_answer_each_other(upstream, make_proxy):
    kw = dict(model="claude-test", max_tokens=20, messages=[{"role": "user", "content": "hi"}])
    proxy = await make_proxy(cached(upstream))
    client = ant(proxy)
    async with client.messages.stream(**kw) as stream:
        streamed = await stream.get_final_message()
    raw = await client.messages.with_raw_response.create(**kw)
    answer = await raw.parse()
    assert raw.headers["x-llmproxy-cache"] == "hit"
    assert answer.model_dump() == streamed.model_dump()

    other = await make_proxy(cached(upstream))
    client = ant(other)
    stored = await client.messages.create(**kw)
    async with client.messages.stream(**kw) as stream:
        texts = [t async for t in stream.text_stream]
        replayed = await stream.get_final_message()
    assert "".join(texts) == TEXT
    assert replayed.model_dump() == stored.model_dump()
    assert len(upstream.requests) == 2


async def test_a_json_answer_with_tool_calls_replays_as_a_stream(upstream, make_proxy):
    call = {"id": "call_1", "type": "function", "function": {"name": "lookup", "arguments": '{"q": "x"}'}}
    upstream.push(reply_json(200, {"id": "chatcmpl-t", "object": "chat.completion", "created": 5, "model": "m",
                                   "choices": [{"index": 0, "finish_reason": "tool_calls",
                                                "message": {"role": "assistant", "content": None,
                                                            "tool_calls": [call]}}],
                                   "usage": {"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6}}))
    proxy = await make_proxy(cached(upstream))
    client = oai(proxy)
    await client.chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": "hi"}],
                                         temperature=0)
    stream = await client.chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": "hi"}],
                                                  temperature=0, stream=True)
    chunks = [c async for c in stream]
    calls = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    assert [(tc.id, tc.function.name, tc.function.arguments) for tc in calls] == [("call_1", "lookup", '{"q": "x"}')]
    assert chunks[-1].choices[0].finish_reason == "tool_calls" and len(upstream.requests) == 1


# --- what is never stored --------------------------------------------------------------------


async def _cut_json(request: web.Request, got: Received) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": "application/json"})
    resp.content_length = 4000
    await resp.prepare(request)
    await resp.write(b'{"id": "chatcmpl-cut", "choices": [')
    assert request.transport is not None
    request.transport.close()
    return resp


NOT_STORED = {
    "a 400": (CHAT, "/v1/chat/completions", [reply_json(400, {"error": {"message": "bad", "type": "x"}})]),
    "a 502 after 5xx": (CHAT, "/v1/chat/completions", [reply_json(500, {}), reply_json(503, {})]),
    "a 201": (CHAT, "/v1/chat/completions", [reply_json(201, {"id": "x", "choices": []})]),
    "a JSON answer cut": (CHAT, "/v1/chat/completions", [_cut_json]),
    "an OpenAI stream cut": ({**CHAT, "stream": True}, "/v1/chat/completions",
                             [reply_sse(openai_events("m", ["a", "b", "c"], True), cut_after=2)]),
    "an OpenAI stream without [DONE]": ({**CHAT, "stream": True}, "/v1/chat/completions",
                                        [reply_sse(openai_events("m", ["a", "b"], True)[:-1])]),
    "an OpenAI stream with an error event": (
        {**CHAT, "stream": True}, "/v1/chat/completions",
        [reply_sse(openai_events("m", ["a"], True)[:1] + [b'data: {"error": {"message": "overloaded"}}\n\n'])]),
    "an Anthropic stream cut": ({**MESSAGES, "stream": True}, "/v1/messages",
                                [reply_sse(anthropic_events("m", ["a", "b"]), cut_after=3)]),
    "an Anthropic stream without message_stop": ({**MESSAGES, "stream": True}, "/v1/messages",
                                                 [reply_sse(anthropic_events("m", ["a", "b"])[:-1])]),
    "an Anthropic stream that ends in an error": (
        {**MESSAGES, "stream": True}, "/v1/messages",
        [reply_sse(anthropic_events("m", ["a"])[:3] + [
            b'event: error\ndata: {"type": "error", "error": {"type": "overloaded_error", "message": "x"}}\n\n'])]),
}


@pytest.mark.parametrize("case", NOT_STORED)
async def test_partial_failed_cut_or_non_200_answers_are_never_stored(upstream, make_proxy, case):
    body, path, behaviours = NOT_STORED[case]
    proxy = await make_proxy(cached(upstream))
    upstream.push(*behaviours)
    try:
        await post(proxy, body, path)
    except aiohttp.ClientError:
        pass  # a cut JSON answer closes the client's connection
    calls = len(upstream.requests)
    status, headers, _ = await post(proxy, body, path)
    assert status == 200 and headers["x-llmproxy-cache"] == "miss" and len(upstream.requests) == calls + 1
    assert (await post(proxy, body, path))[1]["x-llmproxy-cache"] == "hit"  # a whole answer is


async def test_a_stream_the_client_left_is_not_stored(upstream, make_proxy):
    proxy = await make_proxy(cached(upstream))
    upstream.push(reply_sse(openai_events("m", ["a"] * 20, False), delay=0.05))
    async with aiohttp.ClientSession(headers=AUTH) as s:
        async with s.post(proxy.url + "/v1/chat/completions", json={**CHAT, "stream": True}) as r:
            await r.content.readany()  # the first event, then gone
    for _ in range(100):  # bounded: the proxy notices the disconnect and ends the request
        if proxy.records:
            break
        await asyncio.sleep(0.02)
    assert proxy.records[0].client_disconnected
    assert (await post(proxy, {**CHAT, "stream": True}))[1]["x-llmproxy-cache"] == "miss"
    assert len(upstream.requests) == 2


async def test_answers_over_max_entry_bytes_are_not_stored(upstream, make_proxy):
    proxy = await make_proxy(cached(upstream, {"max_entry_bytes": 300}))
    assert (await post(proxy, CHAT))[1]["x-llmproxy-cache"] == "miss"  # ~270 bytes: stored
    assert (await post(proxy, CHAT))[1]["x-llmproxy-cache"] == "hit"
    stream = {**CHAT, "stream": True, "messages": [{"role": "user", "content": "another"}]}
    for _ in range(2):  # ~1.4 KB of SSE: passed on whole, never stored
        status, headers, body = await post(proxy, stream)
        assert status == 200 and headers["x-llmproxy-cache"] == "miss" and body.endswith(b"[DONE]\n\n")
    assert len(upstream.requests) == 3


# --- quota, pii, stampede --------------------------------------------------------------------


@needs("scheduler")
async def test_a_hit_takes_no_scheduler_quota_and_makes_no_upstream_call(upstream, make_proxy):
    config = cached(upstream, after=[{"scheduler": {"default_max_tokens": 10}}])
    for model in config["models"]:
        model["deployments"][0].update(rpm=1, burst=1, max_queue_size=0)
    proxy = await make_proxy(config)
    assert (await post(proxy, CHAT))[1]["x-llmproxy-cache"] == "miss"  # the one request of this minute
    for _ in range(5):
        status, headers, _ = await post(proxy, CHAT)
        assert status == 200 and headers["x-llmproxy-cache"] == "hit"
    status, headers, body = await post(proxy, {**CHAT, "messages": [{"role": "user", "content": "new"}]})
    assert status == 429 and orjson.loads(body)["error"]["type"] == "rate_limit_error"  # the bucket was empty
    assert headers["x-llmproxy-cache"] == "miss"
    assert len(upstream.requests) == 1


def echo(prefix: str):
    """Answers with `prefix` and the last user message as upstream received it."""
    async def behaviour(request: web.Request, got: Received) -> web.StreamResponse:
        text = got.json["messages"][-1]["content"]
        return web.json_response({"id": "chatcmpl-echo", "object": "chat.completion", "created": 1, "model": "m",
                                  "choices": [{"index": 0, "finish_reason": "stop",
                                               "message": {"role": "assistant", "content": prefix + text}}],
                                  "usage": {"prompt_tokens": 9, "completion_tokens": 9, "total_tokens": 18}})
    return behaviour


@needs("pii")
async def test_masked_requests_are_cached_and_restored_with_each_callers_values(upstream, make_proxy):
    proxy = await make_proxy(cached(upstream, before=[{"pii": {"mode": "mask"}}]))
    upstream.push(echo("Noted: "))
    client = oai(proxy)

    async def ask(email: str, stream: bool = False) -> tuple[str, str]:
        messages = [{"role": "user", "content": f"Write to {email} today."}]
        if stream:
            async with client.chat.completions.with_streaming_response.create(
                    model="gpt-test", messages=messages, temperature=0, stream=True) as resp:
                status = resp.headers["x-llmproxy-cache"]
                text = ""
                async for line in resp.iter_lines():
                    if line.startswith("data: {"):
                        text += orjson.loads(line[6:])["choices"][0]["delta"].get("content") or ""
                return status, text
        raw = await client.chat.completions.with_raw_response.create(model="gpt-test", messages=messages,
                                                                     temperature=0)
        return raw.headers["x-llmproxy-cache"], raw.parse().choices[0].message.content

    assert await ask("alice@example.com") == ("miss", "Noted: Write to alice@example.com today.")
    assert await ask("bob@example.org") == ("hit", "Noted: Write to bob@example.org today.")
    assert await ask("carol@example.net", stream=True) == ("hit", "Noted: Write to carol@example.net today.")
    assert len(upstream.requests) == 1
    assert upstream.requests[0].json["messages"][0]["content"] == "Write to <EMAIL_ADDRESS_1> today."
    stored = next(iter(cache_of(proxy).local.entries.values()))
    assert b"<EMAIL_ADDRESS_1>" in stored.body and b"@" not in stored.body  # only the masked answer is kept


def slow(seconds: float, then):
    async def behaviour(request: web.Request, got: Received) -> web.StreamResponse:
        await asyncio.sleep(seconds)
        return await then(request, got)
    return behaviour


@pytest.mark.parametrize("stream", [False, True])
async def test_a_stampede_of_50_identical_requests_is_one_upstream_call(upstream, make_proxy, stream):
    proxy = await make_proxy(cached(upstream))
    upstream.push(slow(0.3, upstream.default))
    body = {**CHAT, "stream": stream}
    results = await asyncio.gather(*[post(proxy, body) for _ in range(50)])
    assert len(upstream.requests) == 1
    assert all(status == 200 for status, _, _ in results)
    assert len({data for _, _, data in results}) == 1  # every one got the same answer
    outcomes = sorted(h["x-llmproxy-cache"] for _, h, _ in results)
    assert outcomes == ["hit"] * 49 + ["miss"]
    assert sum(r.cache == "hit" and r.spend == 0 for r in proxy.records) == 49
    assert cache_of(proxy).flights == {}


async def test_when_the_leader_of_a_stampede_fails_the_others_still_get_answers(upstream, make_proxy):
    proxy = await make_proxy(cached(upstream, {}, router={"num_retries": 0, "retry_after": 0}))
    upstream.push(slow(0.3, reply_json(400, {"error": {"message": "no", "type": "invalid_request_error"}})))
    results = await asyncio.gather(*[post(proxy, CHAT) for _ in range(10)])
    statuses = sorted(status for status, _, _ in results)
    assert statuses == [200] * 9 + [400]  # the waiting ones went upstream themselves
    assert 2 <= len(upstream.requests) <= 10 and cache_of(proxy).flights == {}


# --- the middleware on its own ----------------------------------------------------------------


async def test_the_middleware_called_directly():
    cache = Cache(None, None)
    calls = []

    async def upstream_stub(ctx):
        calls.append(ctx.body)
        return ok_reply(b'{"id": "x", "choices": []}')

    def context():
        ctx = make_context({**CHAT, "cache": {"ttl": 5}})
        ctx.principal = TestPrincipal(team_id="T")
        return ctx

    first = context()
    reply = await cache(first, upstream_stub)
    assert ("x-llmproxy-cache", "miss") in reply.headers and await collect(reply) == b'{"id": "x", "choices": []}'
    assert "cache" not in calls[0]  # taken out of the body before it goes on
    for cleanup in reversed(first.cleanups):  # what the writer does when the request ends
        first.record.status = 200
        cleanup()
    second = context()
    reply = await cache(second, upstream_stub)
    assert ("x-llmproxy-cache", "hit") in reply.headers and reply.body == b'{"id": "x", "choices": []}'
    assert len(calls) == 1 and second.record.cache == "hit"
