"""A finished request leaves no reference cycle behind (its objects go with their last
reference, not with the next collection of the garbage collector: a cycle per request made
the collector run every ~17 requests and cost a tenth of the proxy's CPU). The forwarder's
cleanup holds the context it cleans up; the writer drops the cleanups once they ran."""

from __future__ import annotations

import gc

import aiohttp

from llmproxy.context import Context

from .conftest import MASTER, openai_config


async def test_a_served_request_leaves_no_cycle_holding_its_context(upstream, make_proxy):
    proxy = await make_proxy(openai_config(upstream))
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {MASTER}"}) as s:
        async def ask(stream: bool) -> None:
            async with s.post(proxy.url + "/v1/chat/completions", json={
                    "model": "gpt-test", "stream": stream, "messages": [{"role": "user", "content": "hi"}]}) as r:
                assert r.status == 200
                await r.read()

        await ask(False)  # warm: what the first request creates for good
        gc.collect()
        gc.set_debug(gc.DEBUG_SAVEALL)
        try:
            for i in range(40):
                await ask(stream=i % 2 == 1)
            gc.collect()
            held = [o for o in gc.garbage if isinstance(o, Context)]
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
    assert len(proxy.records) == 41
    assert held == []  # before the fix: one per request


async def test_the_whole_chain_leaves_no_cycle_holding_its_context(upstream, make_proxy):
    from .conftest import needs  # noqa: F401  (the chain below needs every built-in)

    import importlib.util
    names = ["tracing", "auth", "subscription", "pii", "cache", "scheduler"]
    middlewares = [n for n in names if importlib.util.find_spec(f"llmproxy.middlewares.{n}") is not None]
    proxy = await make_proxy(openai_config(upstream, middlewares=middlewares))
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {MASTER}"}) as s:
        async def ask(i: int, stream: bool) -> None:
            async with s.post(proxy.url + "/v1/chat/completions", json={
                    "model": "gpt-test", "stream": stream,
                    "messages": [{"role": "user", "content": f"hi {i}, mail me at a{i}@example.com"}]}) as r:
                assert r.status == 200
                await r.read()

        await ask(-1, False)
        gc.collect()
        gc.set_debug(gc.DEBUG_SAVEALL)
        try:
            for i in range(30):
                await ask(i, stream=i % 2 == 1)
            gc.collect()
            held = [o for o in gc.garbage if isinstance(o, Context)]
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
    assert held == []
