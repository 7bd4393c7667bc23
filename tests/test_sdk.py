"""Through the real `openai` and `anthropic` SDKs, against a recording fake upstream."""

from __future__ import annotations

from decimal import Decimal

import anthropic
import openai

from llmproxy.testing import anthropic_events, openai_events, reply_sse

from .conftest import MASTER, openai_config


def oai(proxy) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key=MASTER, max_retries=0)


def ant(proxy) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url=proxy.url, api_key=MASTER, max_retries=0)


async def test_chat_non_stream(upstream, make_proxy):
    proxy = await make_proxy(openai_config(upstream))
    client = oai(proxy)
    resp = await client.chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": "hi"}],
                                                temperature=0.25, seed=7)
    assert resp.choices[0].message.content == upstream.answer_text()
    got = upstream.requests[-1]
    assert got.path == "/v1/chat/completions"
    assert got.json["model"] == "gpt-upstream"
    assert got.json["temperature"] == 0.25 and got.json["seed"] == 7  # unknown fields forwarded
    assert got.headers["authorization"] == "Bearer sk-provider-secret"
    assert MASTER not in str(dict(got.headers))
    rec = proxy.records[-1]
    assert (rec.status, rec.prompt_tokens, rec.completion_tokens, rec.tokens_estimated) == (200, 11, 7, False)
    assert rec.deployment == "openai:gpt-upstream"
    assert rec.spend == Decimal(11 * 1 + 7 * 2) / 1_000_000  # exact decimal, not a float


async def test_chat_stream_usage_injected_and_removed(upstream, make_proxy):
    proxy = await make_proxy(openai_config(upstream))
    client = oai(proxy)
    stream = await client.chat.completions.create(
        model="gpt-test", messages=[{"role": "user", "content": "hi"}], stream=True)
    chunks = [c async for c in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == upstream.answer_text()
    assert all(c.usage is None for c in chunks)
    assert all(c.choices for c in chunks)  # the usage-only chunk was removed
    assert upstream.requests[-1].json["stream_options"] == {"include_usage": True}
    rec = proxy.records[-1]
    assert (rec.prompt_tokens, rec.completion_tokens, rec.tokens_estimated) == (11, len(upstream.text_chunks), False)


async def test_chat_stream_client_asked_for_usage(upstream, make_proxy):
    proxy = await make_proxy(openai_config(upstream))
    stream = await oai(proxy).chat.completions.create(
        model="gpt-test", messages=[{"role": "user", "content": "hi"}], stream=True,
        stream_options={"include_usage": True})
    chunks = [c async for c in stream]
    assert chunks[-1].usage is not None and chunks[-1].usage.prompt_tokens == 11


async def test_messages_stream_and_not(upstream, make_proxy):
    proxy = await make_proxy(openai_config(upstream))
    client = ant(proxy)
    msg = await client.messages.create(model="claude-test", max_tokens=50,
                                       messages=[{"role": "user", "content": "hi"}])
    assert msg.content[0].text == upstream.answer_text()
    got = upstream.requests[-1]
    assert got.path == "/v1/messages"
    assert got.headers["x-api-key"] == "sk-ant-provider-secret"
    assert got.headers["anthropic-version"]
    assert MASTER not in str(dict(got.headers))
    async with client.messages.stream(model="claude-test", max_tokens=50,
                                      messages=[{"role": "user", "content": "hi"}]) as stream:
        text = "".join([t async for t in stream.text_stream])
    assert text == upstream.answer_text()
    rec = proxy.records[-1]
    assert (rec.prompt_tokens, rec.completion_tokens, rec.tokens_estimated) == (11, len(upstream.text_chunks), False)


async def test_embeddings_and_models(upstream, make_proxy):
    proxy = await make_proxy(openai_config(upstream))
    emb = await oai(proxy).embeddings.create(model="gpt-test", input="hello")
    assert emb.data[0].embedding == [0.1, 0.2]
    models = await oai(proxy).models.list()
    assert sorted(m.id for m in models.data) == ["claude-test", "gpt-test"]
    amodels = await ant(proxy).models.list()
    assert sorted(m.id for m in amodels.data) == ["claude-test"]  # only what speaks the Messages API
    assert all(m.type == "model" for m in amodels.data)


async def test_stream_bytes_unchanged(upstream, make_proxy):
    """When nothing needs changing (the client asked for usage), the body is upstream's, byte for byte."""
    import aiohttp

    events = openai_events("gpt-upstream", ["a", "b", "c"], with_usage=True)
    upstream.push(reply_sse(events))
    proxy = await make_proxy(openai_config(upstream))
    async with aiohttp.ClientSession() as s:
        async with s.post(proxy.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {MASTER}"},
                          json={"model": "gpt-test", "stream": True, "messages": [{"role": "user", "content": "x"}],
                                "stream_options": {"include_usage": True}}) as r:
            body = await r.read()
    assert body == b"".join(events)
    upstream.push(reply_sse(anthropic_events("claude-upstream", ["x", "y"])))
    async with aiohttp.ClientSession() as s:
        async with s.post(proxy.url + "/v1/messages", headers={"x-api-key": MASTER},
                          json={"model": "claude-test", "stream": True, "max_tokens": 5,
                                "messages": [{"role": "user", "content": "x"}]}) as r:
            body = await r.read()
    assert body == b"".join(anthropic_events("claude-upstream", ["x", "y"]))
