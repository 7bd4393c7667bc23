"""The router's admission hook (used by the scheduler) and the client session's capacity."""

from __future__ import annotations

import asyncio

import aiohttp

from llmproxy.plugins import Registry
from llmproxy.testing import FakeUpstream, hang, reply_json

from .conftest import MASTER, openai_config

AUTH = {"Authorization": f"Bearer {MASTER}"}


class Lease:
    def __init__(self, log, dep):
        self.log, self.dep = log, dep

    def release(self, usage):
        self.log.append(("release", self.dep, None if usage is None else usage.completion_tokens))


class Admission:
    def __init__(self, log):
        self.log = log

    async def acquire(self, ctx, deployment):
        self.log.append(("acquire", deployment.id))
        return Lease(self.log, deployment.id)

    def has_capacity(self, deployment):
        return True


class InstallsAdmission:
    log: list = []

    def __init__(self, options, services):
        pass

    async def __call__(self, ctx, call_next):
        ctx.admission = Admission(InstallsAdmission.log)
        return await call_next(ctx)


async def test_admission_taken_per_attempt_and_given_back(make_proxy):
    a, b = await FakeUpstream().start(), await FakeUpstream().start()
    try:
        InstallsAdmission.log = []
        registry = Registry.from_entry_points()
        registry.middlewares.update(Registry.from_classes(middlewares={"admit": InstallsAdmission}).middlewares)
        config = {"master_key": MASTER, "middlewares": ["admit"],
                  "router": {"num_retries": 1, "retry_after": 0},
                  "models": [{"name": "m", "deployments": [
                      {"provider": "openai", "model": "a", "api_base": a.url + "/v1", "api_key": "k", "weight": 1e6},
                      {"provider": "openai", "model": "b", "api_base": b.url + "/v1", "api_key": "k",
                       "weight": 1e-6}]}]}
        proxy = await make_proxy(config, registry)
        a.push(reply_json(503, {}))
        async with aiohttp.ClientSession() as s:
            async with s.post(proxy.url + "/v1/chat/completions", headers=AUTH, json={
                    "model": "m", "stream": True, "messages": [{"role": "user", "content": "x"}]}) as r:
                await r.read()
        assert InstallsAdmission.log == [
            ("acquire", "openai:a"), ("release", "openai:a", None),
            ("acquire", "openai:b"), ("release", "openai:b", len(b.text_chunks)),
        ]
    finally:
        await a.close()
        await b.close()


async def test_more_concurrent_streams_than_aiohttp_default_pool(upstream, make_proxy):
    """aiohttp's default connector caps at 100 connections; ours must not queue request 101."""
    n = 150
    upstream.push(*[hang(5)] * n)
    proxy = await make_proxy(openai_config(upstream))
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
        tasks = [asyncio.create_task(s.post(proxy.url + "/v1/chat/completions", headers=AUTH, json={
            "model": "gpt-test", "messages": [{"role": "user", "content": "x"}]})) for _ in range(n)]
        loop = asyncio.get_running_loop()
        end = loop.time() + 4
        while len(upstream.requests) < n and loop.time() < end:
            await asyncio.sleep(0.05)
        assert len(upstream.requests) == n  # all in flight upstream at once
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
