"""The request record: one per request, to every event sink, with usage and exact cost."""

from __future__ import annotations

from decimal import Decimal

import aiohttp
import pytest

from llmproxy.config import Pricing
from llmproxy.plugins import Registry
from llmproxy.pricing import cost
from llmproxy.testing import reply_json
from llmproxy.usage import Usage

from .conftest import MASTER, openai_config

AUTH = {"Authorization": f"Bearer {MASTER}"}


class CollectingSink:
    seen: list = []

    def __init__(self, options, services) -> None:
        self.tag = options.tag if options else None

    @classmethod
    def make_options(cls):
        from dataclasses import dataclass

        @dataclass(frozen=True)
        class Options:
            tag: str = "default"
        return Options

    def emit(self, record) -> None:
        CollectingSink.seen.append((self.tag, record))


CollectingSink.Options = CollectingSink.make_options()


@pytest.mark.parametrize("usage, expected", [
    (Usage(prompt_tokens=1000, completion_tokens=500), Decimal("0.00045")),
    # 400 of the prompt were cache reads, at the cache-read price
    (Usage(prompt_tokens=1000, completion_tokens=0, cached_tokens=400), Decimal("0.00012")),
    (Usage(prompt_tokens=1000, completion_tokens=0, cache_creation_tokens=1000), Decimal("0.00015")),
])
def test_cost_is_exact_decimal(usage, expected):
    pricing = Pricing(input_per_1m=Decimal("0.15"), output_per_1m=Decimal("0.60"),
                      cache_read_per_1m=Decimal("0.075"), cache_write_per_1m=Decimal("0.15"))
    assert cost(pricing, usage) == expected
    assert cost(None, usage) == 0


async def test_plugin_sink_gets_every_record_once(upstream, make_proxy):
    CollectingSink.seen = []
    registry = Registry.from_entry_points()
    registry.event_sinks.update(Registry.from_classes(event_sinks={"collect": CollectingSink}).event_sinks)
    config = openai_config(upstream, event_sinks=[{"collect": {"tag": "t1"}}])
    proxy = await make_proxy(config, registry)
    upstream.push(reply_json(200, {"id": "x", "object": "chat.completion", "model": "m", "choices": [],
                                   "usage": {"prompt_tokens": 10, "completion_tokens": 4,
                                             "prompt_tokens_details": {"cached_tokens": 6},
                                             "completion_tokens_details": {"reasoning_tokens": 3}}}))
    async with aiohttp.ClientSession() as s:
        for body in ({"model": "gpt-test", "messages": [{"role": "user", "content": "x"}]},
                     {"model": "nope", "messages": []}, b"{"):
            kw = {"data": body} if isinstance(body, bytes) else {"json": body}
            async with s.post(proxy.url + "/v1/chat/completions", headers=AUTH, **kw) as r:
                await r.read()
    assert [t for t, _ in CollectingSink.seen] == ["t1"] * 3
    ok, missing, bad = (r for _, r in CollectingSink.seen)
    assert (ok.prompt_tokens, ok.completion_tokens, ok.cached_tokens, ok.reasoning_tokens) == (10, 4, 6, 3)
    assert ok.spend == Decimal(4 * 1 + 6 * 1 + 4 * 2) / 1_000_000  # no cache price: cached at input price
    assert missing.status == 404 and bad.status == 400
    assert len({r.request_id for _, r in CollectingSink.seen}) == 3


async def test_metrics_endpoint_counts_requests_tokens_and_latency(upstream, make_proxy):
    import re

    proxy = await make_proxy(openai_config(upstream))
    async with aiohttp.ClientSession() as s:
        for _ in range(3):
            async with s.post(proxy.url + "/v1/chat/completions", headers=AUTH,
                              json={"model": "gpt-test", "messages": [{"role": "user", "content": "x"}]}) as r:
                await r.read()
        async with s.post(proxy.url + "/v1/chat/completions", headers=AUTH, json={"model": "nope",
                                                                                  "messages": []}) as r:
            await r.read()
        async with s.get(proxy.url + "/metrics") as r:
            text = await r.text()

    def value(pattern: str) -> float:
        found = re.search("^" + pattern + r" (\S+)$", text, re.M)
        assert found, pattern
        return float(found.group(1))

    ok = 'deployment="openai:gpt-upstream",model="gpt-test"'
    assert value(r'llmproxy_requests_total\{' + ok + r',status="200"\}') == 3
    assert value(r'llmproxy_requests_total\{deployment="",model="unknown",status="404"\}') == 1
    assert value(r'llmproxy_tokens_total\{' + ok + r',type="prompt"\}') == 33
    assert value(r'llmproxy_tokens_total\{' + ok + r',type="completion"\}') == 21
    assert value(r'llmproxy_request_duration_seconds_count\{' + ok + r'\}') == 3
    assert value(r'llmproxy_request_duration_seconds_bucket\{deployment="openai:gpt-upstream",le="600.0",'
                 r'model="gpt-test"\}') == 3
    assert value(r'llmproxy_spend_usd_total\{' + ok + r'\}') == pytest.approx(3 * (11 + 14) / 1e6)
    assert value("llmproxy_inflight_requests") == 0
