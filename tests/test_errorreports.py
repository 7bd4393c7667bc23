"""Error reports (issue 13): with SENTRY_DSN, a 500 and an error-level log line reach Sentry
(a fake Sentry endpoint on 127.0.0.1 decodes the envelopes), tagged with the request and
trace ids, with no key, provider key or prompt text in them."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
import structlog
from aiohttp import web

from llmproxy.plugins import Registry

from .conftest import MASTER, openai_config

sentry_sdk = pytest.importorskip("sentry_sdk", reason="sentry-sdk is not installed (the sentry extra)")

PROMPT = "the vault combination is 31-7-42"


class Boom:
    """A middleware with a bug: what a 500 is."""

    def __init__(self, options, services) -> None:
        pass

    async def __call__(self, ctx, call_next):
        raise RuntimeError(f"cannot handle the request of {ctx.api_key}")


class FakeSentry:
    def __init__(self) -> None:
        self.envelopes: list[str] = []
        self.runner: web.AppRunner | None = None
        self.port = 0

    async def start(self) -> "FakeSentry":
        app = web.Application()
        app.router.add_post("/api/{project}/envelope/", self.envelope)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]
        return self

    async def envelope(self, request: web.Request) -> web.Response:
        raw = await request.read()  # (aiohttp undoes the Content-Encoding the SDK used)
        self.envelopes.append(raw.decode("utf-8", "replace"))
        return web.json_response({})

    @property
    def dsn(self) -> str:
        return f"http://public@127.0.0.1:{self.port}/1"


@pytest.fixture
async def sentry():
    from llmproxy import errorreports

    fake = await FakeSentry().start()
    processors = list(structlog.get_config().get("processors", []))
    yield fake
    errorreports.uninstall()
    structlog.configure(processors=processors)
    await fake.runner.cleanup()


async def _until(predicate, bound: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + bound
    while not predicate() and loop.time() < end:
        await asyncio.sleep(0.05)


async def test_a_500_and_an_error_line_reach_sentry_scrubbed(make_proxy, upstream, sentry):
    from llmproxy import errorreports

    registry = Registry.from_entry_points()
    registry.middlewares.update(Registry.from_classes(middlewares={"boom": Boom}).middlewares)
    config = openai_config(upstream, middlewares=["boom"])
    proxy = await make_proxy(config, registry)
    assert errorreports.install(proxy.gateway.config, env={"SENTRY_DSN": sentry.dsn})
    traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    async with aiohttp.ClientSession() as s:
        async with s.post(proxy.url + "/v1/chat/completions",
                          headers={"Authorization": f"Bearer {MASTER}", "traceparent": traceparent,
                                   "x-api-key": "sk-ant-client-secret-0000000000"},
                          json={"model": "gpt-test", "messages": [{"role": "user", "content": PROMPT}]}) as r:
            assert r.status == 500
            request_id = r.headers["x-request-id"]
    structlog.get_logger("llmproxy.test").error("something_failed", request_id="req-line",
                                                detail="provider key sk-provider-secret was refused")
    await asyncio.to_thread(sentry_sdk.flush, 5)
    await _until(lambda: len(sentry.envelopes) >= 2)
    sent = "\n".join(sentry.envelopes)
    assert "RuntimeError" in sent and "request_failed" in sent and request_id in sent
    assert "0af7651916cd43dd8448eb211c80319c" in sent  # the trace id, as a tag
    assert "something_failed" in sent and "req-line" in sent
    for secret in (MASTER, "sk-provider-secret", "sk-ant-provider-secret", "sk-ant-client-secret", PROMPT,
                   "31-7-42"):
        assert secret not in sent, secret
    assert "[Filtered]" in sent  # the key in the exception's message, replaced

    # With Sentry on, an upstream request carries no sentry-trace or baggage (the DSN's key)
    plain = await make_proxy(openai_config(upstream))
    async with aiohttp.ClientSession() as s:
        async with s.post(plain.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {MASTER}"},
                          json={"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]}) as r:
            assert r.status == 200
    sent_headers = {k.lower() for k in upstream.requests[-1].headers}
    assert "sentry-trace" not in sent_headers and "baggage" not in sent_headers


def test_without_a_dsn_nothing_is_installed():
    from llmproxy import errorreports
    from llmproxy.config import parse_config

    cfg = parse_config({"models": [{"name": "m", "deployments": [{"provider": "mock"}]}]})
    assert errorreports.install(cfg, env={}) is False


def test_scrub_filters_headers_bodies_and_every_secret_string():
    from llmproxy.errorreports import scrub

    event = {"request": {"headers": {"Authorization": "Bearer sk-master-0123456789abcdef", "User-Agent": "ua",
                                     "X-Api-Key": "k"}, "data": PROMPT, "cookies": "c",
                         "query_string": "key=provider-key-123"},
             "exception": {"values": [{"value": "failed with provider-key-123 and sk-abcdefghijklmnopqrstu"}]},
             "extra": {"nested": [("provider-key-123",), {"x": "fine"}]}}
    out = scrub(event, ["provider-key-123"])
    assert out["request"] == {"headers": {"User-Agent": "ua"}, "query_string": "key=[Filtered]"}
    assert out["exception"]["values"][0]["value"] == "failed with [Filtered] and [Filtered]"
    assert out["extra"]["nested"] == [("[Filtered]",), {"x": "fine"}]
