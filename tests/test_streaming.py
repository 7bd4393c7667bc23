"""Streams: disconnects, upstream cuts, idle timeouts, retries before the first byte."""

from __future__ import annotations

import asyncio

import aiohttp
import anthropic
import openai
import orjson
import pytest

from llmproxy.tokenizer import count_tokens
from llmproxy.testing import anthropic_events, hang, openai_events, reply_sse

from .conftest import MASTER, openai_config

AUTH = {"Authorization": f"Bearer {MASTER}"}
CHAT = {"model": "gpt-test", "stream": True, "messages": [{"role": "user", "content": "count to a hundred"}]}
MSGS = {"model": "claude-test", "stream": True, "max_tokens": 100, "messages": [{"role": "user", "content": "hi"}]}


async def wait_for(predicate, timeout: float = 1.0) -> None:
    """A bounded wait for an event (not a timing assertion)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not predicate():
        if loop.time() > end:
            raise AssertionError("condition not reached within the bound")
        await asyncio.sleep(0.01)


async def test_client_disconnect_mid_stream_cancels_upstream(upstream, make_proxy):
    words = [f" w{i}" for i in range(200)]
    upstream.push(reply_sse(openai_events("gpt-upstream", words, with_usage=True), delay=0.02))
    proxy = await make_proxy(openai_config(upstream))
    async with aiohttp.ClientSession() as s:
        resp = await s.post(proxy.url + "/v1/chat/completions", json=CHAT, headers=AUTH)
        got = b""
        while got.count(b"\n\n") < 5:
            got += await resp.content.readany()
        resp.close()  # the client goes away mid-stream
    await asyncio.wait_for(upstream.disconnected.wait(), 1.0)
    await wait_for(lambda: proxy.records)
    rec = proxy.records[-1]
    assert rec.client_disconnected and rec.status == 499
    assert rec.tokens_estimated  # no usage chunk came: what was streamed is counted
    assert 5 <= rec.completion_tokens < 200


async def test_client_disconnect_while_waiting_for_first_byte(upstream, make_proxy):
    upstream.push(hang(30))
    proxy = await make_proxy(openai_config(upstream))
    async with aiohttp.ClientSession() as s:
        with pytest.raises(asyncio.TimeoutError):
            await s.post(proxy.url + "/v1/chat/completions", json=CHAT, headers=AUTH,
                         timeout=aiohttp.ClientTimeout(total=0.3))
    await asyncio.wait_for(upstream.disconnected.wait(), 1.0)
    await wait_for(lambda: proxy.records)
    assert proxy.records[-1].client_disconnected


def _events(body: bytes) -> list[bytes]:
    return [e for e in body.split(b"\n\n") if e]


async def test_upstream_cut_mid_stream_openai(upstream, make_proxy):
    words = [" one", " two", " three", " four", " five"]
    events = openai_events("gpt-upstream", words, with_usage=True)
    upstream.push(reply_sse(events, cut_after=3))
    proxy = await make_proxy(openai_config(upstream))
    async with aiohttp.ClientSession() as s:
        async with s.post(proxy.url + "/v1/chat/completions", json=CHAT, headers=AUTH) as r:
            assert r.status == 200
            body = await r.read()
    assert body.startswith(b"".join(events[:3]))
    tail = body[len(b"".join(events[:3])):]
    assert tail.startswith(b'data: {"error":') and tail.endswith(b"\n\n") and tail.count(b"\n\n") == 1
    err = orjson.loads(tail[len(b"data: "):])
    assert set(err["error"]) == {"message", "type", "param", "code"}
    assert (err["error"]["type"], err["error"]["code"]) == ("api_error", "upstream_error")
    assert b"[DONE]" not in body
    rec = proxy.records[-1]
    assert rec.status == 502 and rec.error_code == "upstream_error"
    assert rec.tokens_estimated and rec.completion_tokens == count_tokens(" one two three")


async def test_upstream_cut_mid_stream_anthropic(upstream, make_proxy):
    events = anthropic_events("claude-upstream", ["a", "b", "c", "d"])
    upstream.push(reply_sse(events, cut_after=4))
    proxy = await make_proxy(openai_config(upstream))
    async with aiohttp.ClientSession() as s:
        async with s.post(proxy.url + "/v1/messages", json=MSGS, headers={"x-api-key": MASTER}) as r:
            body = await r.read()
    sent = b"".join(events[:4])
    assert body.startswith(sent)
    tail = body[len(sent):]
    assert tail.startswith(b"event: error\ndata: ") and tail.endswith(b"\n\n")
    err = orjson.loads(tail[len(b"event: error\ndata: "):])
    assert err["type"] == "error" and err["error"]["type"] == "api_error" and set(err["error"]) == {"type", "message"}


async def test_upstream_cut_sdks_raise(upstream, make_proxy):
    proxy = await make_proxy(openai_config(upstream))
    upstream.push(reply_sse(openai_events("gpt-upstream", ["a", "b", "c"], with_usage=True), cut_after=2))
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key=MASTER, max_retries=0)
    with pytest.raises(openai.APIError):
        stream = await client.chat.completions.create(model="gpt-test", stream=True,
                                                      messages=[{"role": "user", "content": "x"}])
        async for _ in stream:
            pass
    upstream.push(reply_sse(anthropic_events("claude-upstream", ["a", "b", "c"]), cut_after=4))
    aclient = anthropic.AsyncAnthropic(base_url=proxy.url, api_key=MASTER, max_retries=0)
    with pytest.raises(anthropic.APIError):
        async with aclient.messages.stream(model="claude-test", max_tokens=10,
                                           messages=[{"role": "user", "content": "x"}]) as stream:
            async for _ in stream.text_stream:
                pass


async def test_stream_idle_timeout_ends_with_error(upstream, make_proxy):
    events = openai_events("gpt-upstream", ["a", "b"], with_usage=True)
    upstream.push(reply_sse(events, delay=2.0))
    config = openai_config(upstream)
    config["models"][0]["deployments"][0]["stream_idle_timeout"] = 0.3
    proxy = await make_proxy(config)
    async with aiohttp.ClientSession() as s:
        async with s.post(proxy.url + "/v1/chat/completions", json=CHAT, headers=AUTH) as r:
            body = await r.read()
    err = orjson.loads(_events(body)[-1][len(b"data: "):])
    assert err["error"]["code"] == "upstream_timeout"


async def test_anthropic_error_as_first_event_is_retried(upstream, make_proxy):
    overloaded = [b'event: error\ndata: {"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}\n\n']
    upstream.push(reply_sse(overloaded))
    proxy = await make_proxy(openai_config(upstream))
    client = anthropic.AsyncAnthropic(base_url=proxy.url, api_key=MASTER, max_retries=0)
    async with client.messages.stream(model="claude-test", max_tokens=10,
                                      messages=[{"role": "user", "content": "x"}]) as stream:
        text = "".join([t async for t in stream.text_stream])
    assert text == upstream.answer_text()
    assert len(upstream.requests) == 2
    assert [a.outcome for a in proxy.records[-1].attempts] == ["stream_error", "ok"]


async def test_stream_usage_false_is_estimated(upstream, make_proxy):
    config = openai_config(upstream)
    config["models"][0]["deployments"][0]["stream_usage"] = False
    proxy = await make_proxy(config)
    async with aiohttp.ClientSession() as s:
        async with s.post(proxy.url + "/v1/chat/completions", json=CHAT, headers=AUTH) as r:
            await r.read()
    assert "stream_options" not in upstream.requests[-1].json
    rec = proxy.records[-1]
    assert rec.tokens_estimated and rec.completion_tokens > 0 and rec.prompt_tokens > 0


async def test_split_events_are_reassembled_byte_for_byte(upstream, make_proxy):
    """Upstream writes events split at odd offsets: the client still gets exactly upstream's
    bytes minus the usage-only chunk it did not ask for."""
    events = openai_events("gpt-upstream", ["one", "two", "three"], with_usage=True)
    raw = b"".join(events)
    pieces = [raw[i:i + 7] for i in range(0, len(raw), 7)]
    upstream.push(reply_sse(pieces))
    proxy = await make_proxy(openai_config(upstream))
    async with aiohttp.ClientSession() as s:
        async with s.post(proxy.url + "/v1/chat/completions", json=CHAT, headers=AUTH) as r:
            body = await r.read()
    assert body == b"".join(e for e in events if b'"choices":[]' not in e)


async def test_json_body_cut_short_aborts_the_client_connection(upstream, make_proxy):
    from aiohttp import web

    async def cut(request, got):
        resp = web.StreamResponse(headers={"Content-Type": "application/json", "Content-Length": "1000"})
        await resp.prepare(request)
        await resp.write(b'{"id": "chatcmpl-x", "choices": [')
        request.transport.close()
        return resp

    upstream.push(cut)
    proxy = await make_proxy(openai_config(upstream))
    import logging

    seen: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = seen.append  # type: ignore[method-assign]
    logging.getLogger("aiohttp").addHandler(handler)
    try:
        async with aiohttp.ClientSession() as s:
            with pytest.raises(aiohttp.ClientPayloadError):
                async with s.post(proxy.url + "/v1/chat/completions", headers=AUTH,
                                  json={"model": "gpt-test", "messages": [{"role": "user", "content": "x"}]}) as r:
                    await r.read()
        await wait_for(lambda: proxy.records)
    finally:
        logging.getLogger("aiohttp").removeHandler(handler)
    assert proxy.records[-1].status == 502 and proxy.records[-1].error_code == "upstream_cut"
    assert not [r for r in seen if r.levelno >= logging.ERROR]  # no "Error handling request" traceback


async def test_a_client_that_resets_mid_answer_is_recorded_as_499(upstream, make_proxy, monkeypatch):
    """The client's connection resets while the writer sends the answer (the write raises,
    as it does when the peer sent a RST): the record says 499, not 200."""
    from aiohttp import web

    from llmproxy.testing import reply_sse

    events = [b'data: {"choices":[{"index":0,"delta":{"content":"a"}}]}\n\n'] * 5 + [b"data: [DONE]\n\n"]
    upstream.push(reply_sse(events, delay=0.01))
    proxy = await make_proxy(openai_config(upstream))
    real, writes = web.StreamResponse.write, []

    async def resetting(self, data):
        writes.append(data)
        if len(writes) > 1:
            raise ConnectionResetError(104, "Connection reset by peer")
        return await real(self, data)

    monkeypatch.setattr(web.StreamResponse, "write", resetting)
    async with aiohttp.ClientSession() as s:
        try:
            async with s.post(proxy.url + "/v1/chat/completions", headers=AUTH,
                              json={"model": "gpt-test", "stream": True,
                                    "messages": [{"role": "user", "content": "x"}]}) as r:
                await r.read()
        except aiohttp.ClientError:
            pass  # the answer was cut: what matters is what the record says
    await wait_for(lambda: proxy.records, timeout=5)
    assert proxy.records[-1].status == 499 and proxy.records[-1].client_disconnected
