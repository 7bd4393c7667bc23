"""Token counting (issue 15, item 2): `POST /v1/messages/count_tokens` and
`POST /v1/responses/input_tokens`, forwarded to a deployment that speaks them, else
answered here with the tokenizer and marked estimated; never billed, never a `messages`
call, never in the spend log, and a small rate share of its own. Through the real SDKs."""

from __future__ import annotations

import aiohttp
import anthropic
import openai
import pytest

from llmproxy import tokenizer

from .conftest import MASTER, needs, openai_config

MESSAGES = [{"role": "user", "content": "How many tokens is this sentence, roughly?"}]


async def test_anthropic_count_tokens_is_forwarded_never_a_messages_call(upstream, make_proxy):
    proxy = await make_proxy(openai_config(upstream))
    async with anthropic.AsyncAnthropic(base_url=proxy.url, api_key=MASTER, max_retries=0) as ant:
        counted = await ant.messages.count_tokens(model="claude-test", messages=MESSAGES,
                                                  extra_query={"beta": "true"})  # as Claude Code's /context sends it
    assert counted.input_tokens == 42
    got = upstream.requests[-1]
    assert (got.path, got.query) == ("/v1/messages/count_tokens", "beta=true")
    assert got.json["model"] == "claude-upstream" and got.headers["x-api-key"] == "sk-ant-provider-secret"
    assert all(r.path != "/v1/messages" for r in upstream.requests)
    rec = proxy.records[-1]
    assert (rec.api, rec.status, rec.spend, rec.prompt_tokens, rec.completion_tokens) == ("count_tokens", 200, 0, 0, 0)
    writer = next(s for s in proxy.gateway.sinks if type(s).__name__ == "SpendWriter")
    assert not writer.queue  # never a spend row


async def test_a_model_without_a_counting_deployment_is_counted_here(upstream, make_proxy):
    proxy = await make_proxy({**openai_config(upstream), "models": openai_config(upstream)["models"] + [
        {"name": "mock", "deployments": [{"provider": "mock"}]}]})
    before = len(upstream.requests)
    async with anthropic.AsyncAnthropic(base_url=proxy.url, api_key=MASTER, max_retries=0) as ant:
        raw = await ant.messages.with_raw_response.count_tokens(model="mock", messages=MESSAGES)
        assert raw.headers["x-llmproxy-tokens-estimated"] == "true"
        assert (await raw.parse()).input_tokens == tokenizer.count_tokens(MESSAGES[0]["content"])
        # gpt-test's deployment speaks no Messages API, so no count_tokens either: counted here
        assert (await ant.messages.count_tokens(model="gpt-test", messages=MESSAGES)).input_tokens > 0
    assert len(upstream.requests) == before
    async with openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key=MASTER, max_retries=0) as oai:
        counted = await oai.responses.input_tokens.count(model="gpt-test", input="hello there")
        assert counted.input_tokens == 42  # the openai deployment counts it
        assert upstream.requests[-1].path == "/v1/responses/input_tokens"
        local = await oai.responses.input_tokens.count(model="mock", input="hello there", instructions="Be brief.")
        assert local.input_tokens == tokenizer.count_tokens("Be brief.\nhello there")
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {MASTER}"}) as s:
        async with s.post(proxy.url + "/v1/messages/count_tokens", json={"model": "mock"}) as r:
            assert r.status == 400  # messages are required, as for /v1/messages
        async with s.post(proxy.url + "/v1/messages/count_tokens", json={"model": "nope", "messages": MESSAGES}) as r:
            assert r.status == 404


@needs("auth", "scheduler")
async def test_counting_has_its_own_small_rate_and_no_budget(upstream, make_proxy):
    config = openai_config(upstream, middlewares=["auth", "scheduler"])
    dep = config["models"][1]["deployments"][0]
    dep.update(rpm=20, max_queue_wait=0)  # counting's share: 2 a minute
    proxy = await make_proxy(config)
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {MASTER}"}) as s:
        async with s.post(proxy.url + "/key/generate", json={"max_budget": 0.0, "rpm_limit": 1}) as r:
            key = (await r.json())["key"]
    async with anthropic.AsyncAnthropic(base_url=proxy.url, api_key=key, max_retries=0) as ant:
        for _ in range(2):  # a spent budget and the key's rpm of 1 do not stop counting
            await ant.messages.count_tokens(model="claude-test", messages=MESSAGES)
        with pytest.raises(anthropic.RateLimitError) as limited:
            await ant.messages.count_tokens(model="claude-test", messages=MESSAGES)
        assert "Try again in 30s" in limited.value.message  # the share refills 2 a minute
    async with anthropic.AsyncAnthropic(base_url=proxy.url, api_key=MASTER, max_retries=0) as ant:
        msg = await ant.messages.create(model="claude-test", max_tokens=5, messages=MESSAGES)  # messages' own bucket
    assert msg.content[0].text == upstream.answer_text()


@needs("pii")
async def test_counting_sends_only_masked_text_upstream(upstream, make_proxy):
    proxy = await make_proxy(openai_config(upstream, middlewares=[{"pii": {"mode": "mask"}}]))
    said = [{"role": "user", "content": "Mail jane.doe@example.com about card 4111 1111 1111 1111"}]
    async with anthropic.AsyncAnthropic(base_url=proxy.url, api_key=MASTER, max_retries=0) as ant:
        assert (await ant.messages.count_tokens(model="claude-test", messages=said)).input_tokens == 42
    sent = upstream.requests[-1].body.decode()
    assert "jane.doe@example.com" not in sent and "4111" not in sent
