"""The OpenAI Responses API (issue 15, item 1): `POST /v1/responses`, streamed and not,
forwarded byte for byte to `openai` deployments (and answered by `mock`), with usage from
the JSON body's `usage` or the stream's `response.completed`, the Responses error event
on a mid-stream failure, `store` / `previous_response_id` passed through, and records,
spend and limits as for chat. Through the real openai SDK."""

from __future__ import annotations

from decimal import Decimal

import aiohttp
import openai
import pytest

from llmproxy.testing import reply_json, reply_sse, responses_events, responses_object

from .conftest import MASTER, needs, openai_config


@pytest.fixture
async def proxy(upstream, make_proxy):
    return await make_proxy(openai_config(upstream))


def sdk(proxy, key: str = MASTER) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key=key, max_retries=0)


async def test_plain_response_forwarded_with_usage_and_spend(upstream, proxy):
    async with sdk(proxy) as client:
        r = await client.responses.create(model="gpt-test", input="hi", store=True, previous_response_id="resp_0")
    assert r.output_text == upstream.answer_text()
    got = upstream.requests[-1]
    assert got.path == "/v1/responses"
    assert got.json == {"model": "gpt-upstream", "input": "hi", "store": True, "previous_response_id": "resp_0"}
    rec = proxy.records[-1]
    assert (rec.api, rec.status, rec.model) == ("responses", 200, "gpt-test")
    assert (rec.prompt_tokens, rec.completion_tokens, rec.cached_tokens, rec.reasoning_tokens) == (11, 7, 3, 2)
    assert not rec.tokens_estimated and rec.spend == Decimal("0.000025")  # 11 x $1 + 7 x $2 per 1M


async def test_streamed_response_byte_for_byte_with_exact_counts(upstream, proxy):
    events = responses_events("gpt-upstream", ["Hel", "lo", "!"], usage={
        "input_tokens": 21, "output_tokens": 5, "total_tokens": 26,
        "input_tokens_details": {"cached_tokens": 0}, "output_tokens_details": {"reasoning_tokens": 1}})
    upstream.push(reply_sse(events))
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {MASTER}"}) as s:
        async with s.post(proxy.url + "/v1/responses", json={"model": "gpt-test", "input": "hi", "stream": True}) as r:
            assert r.status == 200 and r.headers["content-type"].startswith("text/event-stream")
            body = await r.read()
    assert body == b"".join(events)  # nothing added, nothing removed
    assert "stream_options" not in upstream.requests[-1].json  # a Responses stream always ends with usage
    rec = proxy.records[-1]
    assert (rec.prompt_tokens, rec.completion_tokens, rec.reasoning_tokens, rec.tokens_estimated) == (21, 5, 1, False)

    async with sdk(proxy) as client:  # and through the SDK's own stream reader
        stream = await client.responses.create(model="gpt-test", input="hi", stream=True)
        texts, final = [], None
        async for event in stream:
            if event.type == "response.output_text.delta":
                texts.append(event.delta)
            elif event.type == "response.completed":
                final = event.response
    assert "".join(texts) == upstream.answer_text() and final.usage.input_tokens == 11


async def test_a_stream_without_usage_is_estimated(upstream, proxy):
    events = [e for e in responses_events("gpt-upstream", ["some ", "words ", "here"]) if b"response.completed" not in e]
    upstream.push(reply_sse(events))
    async with sdk(proxy) as client:
        stream = await client.responses.create(model="gpt-test", input="hello there", stream=True)
        async for _ in stream:
            pass
    rec = proxy.records[-1]
    assert rec.tokens_estimated and rec.completion_tokens == 3 and rec.prompt_tokens > 0


async def test_a_cut_stream_ends_with_the_responses_error_event(upstream, proxy):
    events = responses_events("gpt-upstream", ["a", "b", "c", "d"])
    upstream.push(reply_sse(events, cut_after=4))
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {MASTER}"}) as s:
        async with s.post(proxy.url + "/v1/responses", json={"model": "gpt-test", "input": "hi", "stream": True}) as r:
            body = await r.read()
    last = body.rstrip(b"\n").rsplit(b"\n\n", 1)[-1]
    assert last.startswith(b"event: error\ndata: {") and b'"type":"error"' in last and b'"code":' in last
    assert proxy.records[-1].error_code is not None


async def test_upstream_4xx_reaches_the_client_and_bad_bodies_are_400(upstream, proxy):
    upstream.push(reply_json(400, {"error": {"message": "Previous response not found", "type": "invalid_request_error",
                                             "param": "previous_response_id", "code": "previous_response_not_found"}}))
    async with sdk(proxy) as client:
        with pytest.raises(openai.BadRequestError) as bad:
            await client.responses.create(model="gpt-test", input="x", previous_response_id="resp_gone")
        assert bad.value.code == "previous_response_not_found"
        with pytest.raises(openai.BadRequestError):
            await client.responses.create(model="gpt-test", input=42)
        with pytest.raises(openai.BadRequestError) as wrong:
            await client.responses.create(model="claude-test", input="x")  # an Anthropic-only model
        assert "/v1/messages" in wrong.value.message


async def test_mock_answers_the_responses_api(make_proxy):
    proxy = await make_proxy({"master_key": MASTER, "models": [{"name": "mock", "deployments": [{"provider": "mock"}]}]})
    async with sdk(proxy) as client:
        r = await client.responses.create(model="mock", input=[{"role": "user", "content": "hi"}], max_output_tokens=2)
        assert r.status == "incomplete" and r.usage.output_tokens <= 2
        stream = await client.responses.create(model="mock", input="hi", stream=True)
        kinds = [e.type async for e in stream]
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    assert proxy.records[-1].completion_tokens > 0 and not proxy.records[-1].tokens_estimated


@needs("auth", "scheduler")
async def test_limits_and_the_key_model_list_apply(upstream, make_proxy):
    config = openai_config(upstream, middlewares=["auth", "scheduler"])
    config["models"][0]["deployments"][0]["max_queue_wait"] = 0
    proxy = await make_proxy(config)
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {MASTER}"}) as s:
        async with s.post(proxy.url + "/key/generate", json={"rpm_limit": 1, "models": ["gpt-test"]}) as r:
            key = (await r.json())["key"]
    async with sdk(proxy, key) as client:
        await client.responses.create(model="gpt-test", input="hi")
        with pytest.raises(openai.RateLimitError):
            await client.responses.create(model="gpt-test", input="hi")
    async with aiohttp.ClientSession() as s:
        async with s.post(proxy.url + "/v1/responses", json={"model": "gpt-test", "input": "hi"}) as r:
            assert r.status == 401


@needs("pii")
async def test_pii_masks_the_responses_api_and_restores_its_answer(upstream, make_proxy):
    proxy = await make_proxy(openai_config(upstream, middlewares=[{"pii": {"mode": "mask"}}]))
    upstream.push(reply_json(200, responses_object("gpt-upstream", "Charged <CREDIT_CARD_1>.")))
    async with sdk(proxy) as client:
        r = await client.responses.create(model="gpt-test", input="my card is 4111 1111 1111 1111")
    assert upstream.requests[-1].json["input"] == "my card is <CREDIT_CARD_1>"  # never the number
    assert r.output_text == "Charged 4111 1111 1111 1111."  # the caller's own value back
