"""Wildcard model routes (issue 15, item 5): a model name ending in `*` serves every name
that starts with the rest, with the client's name sent upstream; exact names win, then the
longest pattern; key lists take patterns; pricing per pattern with overrides per name, and
a request no price covers is recorded as unpriced. Through the real SDKs."""

from __future__ import annotations

from decimal import Decimal

import aiohttp
import anthropic
import openai
import pytest

from llmproxy.config import ConfigError, parse_config

from .conftest import MASTER, needs


def wildcard_config(upstream) -> dict:
    def anthropic_dep(**kw):
        return {"provider": "anthropic", "api_base": upstream.url, "api_key": "sk-ant-secret", "timeout": 5, **kw}

    return {"master_key": MASTER, "models": [
        {"name": "claude-*", "deployments": [anthropic_dep()],
         "pricing": {"input_per_1m": 1, "output_per_1m": 2},
         "prices": {"claude-sonnet-5": {"input_per_1m": 10, "output_per_1m": 20}}},
        {"name": "claude-opus-*", "deployments": [anthropic_dep(model="opus-upstream")]},
        {"name": "claude-haiku-4-5", "deployments": [anthropic_dep(model="haiku-upstream")],
         "pricing": {"input_per_1m": 1, "output_per_1m": 1}},
        {"name": "*", "deployments": [{"provider": "openai", "api_base": upstream.url + "/v1",
                                       "api_key": "sk-oai-secret", "timeout": 5}]},
    ]}


async def ask(proxy, model: str, key: str = MASTER) -> str:
    async with anthropic.AsyncAnthropic(base_url=proxy.url, api_key=key, max_retries=0) as ant:
        msg = await ant.messages.create(model=model, max_tokens=10, messages=[{"role": "user", "content": "hi"}])
    return msg.content[0].text


async def test_patterns_route_with_the_clients_name_exact_first_then_longest(upstream, make_proxy):
    proxy = await make_proxy(wildcard_config(upstream))
    await ask(proxy, "claude-sonnet-5")
    assert upstream.requests[-1].json["model"] == "claude-sonnet-5"  # the name Claude Code asked for
    rec = proxy.records[-1]
    assert (rec.model, rec.requested_model, rec.served_model) == ("claude-*", "claude-sonnet-5", "claude-*")
    await ask(proxy, "claude-haiku-4-5")  # the exact name wins over claude-*
    assert upstream.requests[-1].json["model"] == "haiku-upstream"
    await ask(proxy, "claude-opus-4-8")  # the longer pattern wins
    assert upstream.requests[-1].json["model"] == "opus-upstream"
    assert proxy.records[-1].model == "claude-opus-*"
    async with openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key=MASTER, max_retries=0) as oai:
        await oai.chat.completions.create(model="gpt-9-turbo", messages=[{"role": "user", "content": "hi"}])
        assert upstream.requests[-1].json["model"] == "gpt-9-turbo" and upstream.requests[-1].path == "/v1/chat/completions"
        # patterns are not listed; a name one serves is found
        assert [m.id for m in (await oai.models.list()).data] == ["claude-haiku-4-5"]
        assert (await oai.models.retrieve("claude-sonnet-5")).id == "claude-sonnet-5"
    # the metric labels are the configured names, never the client's
    text = proxy.gateway.services.metrics.exposition().decode()
    assert 'model="claude-*"' in text and "claude-sonnet-5" not in text and "gpt-9-turbo" not in text


async def test_pricing_per_pattern_per_name_and_unpriced(upstream, make_proxy):
    proxy = await make_proxy(wildcard_config(upstream))
    await ask(proxy, "claude-sonnet-5")   # 11 in, 7 out at $10/$20 per 1M
    assert proxy.records[-1].spend == Decimal("0.00025") and not proxy.records[-1].unpriced
    await ask(proxy, "claude-3-7")        # the pattern's $1/$2
    assert proxy.records[-1].spend == Decimal("0.000025")
    await ask(proxy, "claude-opus-4-8")   # a pattern with no pricing: unknown, not free
    assert proxy.records[-1].unpriced and proxy.records[-1].spend == 0
    text = proxy.gateway.services.metrics.exposition().decode()
    assert 'llmproxy_unpriced_requests_total{model="claude-opus-*"} 1.0' in text
    writer = next(s for s in proxy.gateway.sinks if type(s).__name__ == "SpendWriter")
    while writer.queue:
        await writer._write_batch()
    rows = await proxy.gateway.services.store.spend_logs()
    assert [r.unpriced for r in rows] == [True, False, False]  # newest first
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {MASTER}"}) as s:
        async with s.get(proxy.url + "/spend/logs") as r:
            assert [row["unpriced"] for row in await r.json()] == [True, False, False]


@needs("auth")
async def test_a_key_limited_to_a_pattern(upstream, make_proxy):
    config = wildcard_config(upstream)
    config["middlewares"] = ["auth"]
    proxy = await make_proxy(config)
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {MASTER}"}) as s:
        async with s.post(proxy.url + "/key/generate", json={"models": ["claude-haiku-*"]}) as r:
            key = (await r.json())["key"]
    await ask(proxy, "claude-haiku-4-5", key)   # an exact route the pattern allows
    await ask(proxy, "claude-haiku-5", key)     # a name claude-* serves, the key's pattern allows
    with pytest.raises(anthropic.PermissionDeniedError):
        await ask(proxy, "claude-sonnet-5", key)
    async with openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key=key, max_retries=0) as oai:
        assert [m.id for m in (await oai.models.list()).data] == ["claude-haiku-4-5"]
        with pytest.raises(openai.NotFoundError):
            await oai.models.retrieve("claude-sonnet-5")


@pytest.mark.parametrize("models, message", [
    ([{"name": "cl*ude", "deployments": [{"provider": "mock"}]}], "a '*' may only end a name"),
    ([{"name": "exact", "deployments": [{"provider": "mock"}], "prices": {"exact": {"input_per_1m": 1,
                                                                               "output_per_1m": 1}}}],
     "only a pattern"),
    ([{"name": "claude-*", "deployments": [{"provider": "mock"}], "prices": {"gpt-4": {"input_per_1m": 1,
                                                                                  "output_per_1m": 1}}}],
     "prices.gpt-4: not a name 'claude-*' serves"),
    ([{"name": "a-*", "deployments": [{"provider": "mock", "model": "x-*"}]}], "'*' alone sends the client's name"),
])
def test_bad_patterns_are_config_errors(models, message):
    with pytest.raises(ConfigError) as err:
        parse_config({"models": models})
    assert any(message in m for m in err.value.messages), err.value.messages
