"""What real clients expect of the gateway's surface (issue 15, items 3, 4 and 8): model
lookup in both SDKs' shapes, the query string forwarded as sent, Anthropic's `request-id`
header, and an answer at the base URL. Through the real SDKs against the fake upstream."""

from __future__ import annotations

import aiohttp
import anthropic
import openai
import pytest

from .conftest import MASTER, needs, openai_config

ADMIN = {"Authorization": f"Bearer {MASTER}"}


async def test_models_retrieve_in_both_shapes(upstream, make_proxy):
    proxy = await make_proxy(openai_config(upstream))
    async with openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key=MASTER, max_retries=0) as oai:
        model = await oai.models.retrieve("gpt-test")
        assert (model.id, model.object) == ("gpt-test", "model")
        with pytest.raises(openai.NotFoundError):
            await oai.models.retrieve("nope")
    async with anthropic.AsyncAnthropic(base_url=proxy.url, api_key=MASTER, max_retries=0) as ant:
        model = await ant.models.retrieve("claude-test")
        assert (model.id, model.type) == ("claude-test", "model")
        listed = [m.id async for m in ant.models.list()]
        assert listed == ["claude-test"]  # gpt-test speaks no Messages API: not in Anthropic's list
        with pytest.raises(anthropic.NotFoundError):
            await ant.models.retrieve("gpt-test")


@needs("auth")
async def test_a_model_the_key_may_not_use_is_not_found(upstream, make_proxy):
    proxy = await make_proxy(openai_config(upstream, middlewares=["auth"]))
    async with aiohttp.ClientSession(headers=ADMIN) as s:
        async with s.post(proxy.url + "/key/generate", json={"models": ["gpt-test"]}) as r:
            key = (await r.json())["key"]
        async with s.get(proxy.url + "/v1/models/claude-test", headers={"Authorization": "Bearer sk-wrong"}) as r:
            assert r.status == 401  # nothing revealed without a key
    async with openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key=key, max_retries=0) as oai:
        assert (await oai.models.retrieve("gpt-test")).id == "gpt-test"
        with pytest.raises(openai.NotFoundError) as missing:
            await oai.models.retrieve("claude-test")
        assert "does not exist or you do not have access" in missing.value.message


async def test_query_string_reaches_upstream_as_sent(upstream, make_proxy):
    proxy = await make_proxy(openai_config(upstream))
    async with anthropic.AsyncAnthropic(base_url=proxy.url, api_key=MASTER, max_retries=0) as ant:
        await ant.messages.create(model="claude-test", max_tokens=10, messages=[{"role": "user", "content": "hi"}],
                                  extra_query={"beta": "true"})  # what Claude Code sends
    got = upstream.requests[-1]
    assert (got.path, got.query) == ("/v1/messages", "beta=true")
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {MASTER}"}) as s:
        async with s.post(proxy.url + "/v1/chat/completions?a=1&b=x%20y&a=2",
                          json={"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]}) as r:
            assert r.status == 200
    assert upstream.requests[-1].query == "a=1&b=x%20y&a=2"
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {MASTER}"}) as s:
        async with s.post(proxy.url + "/v1/chat/completions",
                          json={"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]}) as r:
            assert r.status == 200
    assert upstream.requests[-1].query == ""


async def test_request_id_headers_and_the_base_url(upstream, make_proxy):
    proxy = await make_proxy(openai_config(upstream))
    async with anthropic.AsyncAnthropic(base_url=proxy.url, api_key=MASTER, max_retries=0) as ant:
        msg = await ant.messages.create(model="claude-test", max_tokens=10, messages=[{"role": "user", "content": "hi"}])
        stream = await ant.messages.create(model="claude-test", max_tokens=10, stream=True,
                                           messages=[{"role": "user", "content": "hi"}])
        async for _ in stream:
            pass
    ids = [r.request_id for r in proxy.records if r.api == "messages"]
    assert msg._request_id == ids[0]
    assert stream.response.headers["request-id"] == stream.response.headers["x-request-id"] == ids[1]
    async with aiohttp.ClientSession() as s:
        async with s.get(proxy.url + "/") as r:
            assert r.status == 200 and (await r.json())["name"] == "llmproxy"
        async with s.head(proxy.url + "/") as r:
            assert r.status == 200
