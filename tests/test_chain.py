"""The chain's mechanics: config order both ways, short-circuits, a middleware's own reply,
options, stream transforms, one record per request, cleanups for bodies never read.

Middlewares here are small in-test classes registered with `Registry.from_classes`, beside
the real providers and event sinks. Most tests call the composed chain directly with a
fabricated context; those about what the client sees go through a real proxy.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable

import aiohttp
import orjson
import pytest

from llmproxy.accesslog import AccessLog
from llmproxy.config import ConfigError, parse_config
from llmproxy.context import Context, Next, Reply
from llmproxy.errors import ProxyError
from llmproxy.metrics import MetricsSink
from llmproxy.plugins import Registry
from llmproxy.providers.anthropic import AnthropicProvider
from llmproxy.providers.mock import MockProvider
from llmproxy.providers.openai import OpenAIProvider
from llmproxy.server import Gateway
from llmproxy.testing import collect, make_context, reply_json

from .conftest import MASTER, openai_config

AUTH = {"Authorization": f"Bearer {MASTER}"}
CHAT = {"model": "mock", "messages": [{"role": "user", "content": "hi"}]}
GPT = {"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]}
CLAUDE = {"model": "claude-test", "max_tokens": 50, "messages": [{"role": "user", "content": "hi"}]}


def registry(**middlewares: Any) -> Registry:
    """The real providers and sinks, and exactly these middlewares."""
    return Registry.from_classes(
        providers={"mock": MockProvider, "openai": OpenAIProvider, "anthropic": AnthropicProvider},
        middlewares=middlewares, event_sinks={"metrics": MetricsSink, "access_log": AccessLog})


def mock_config(*middlewares: Any) -> dict[str, Any]:
    return {"models": [{"name": "mock", "deployments": [{"provider": "mock", "chunks": 3}]}],
            "middlewares": list(middlewares), "server": {"access_log": False}}


def gateway(config: dict[str, Any], reg: Registry) -> Gateway:
    return Gateway(parse_config(config), reg)


def fabricate(gw: Gateway, body: dict[str, Any], api: str = "chat") -> Context:
    """A context as the server would hand it to the chain."""
    ctx = make_context(body, api)
    ctx.model = gw.models[body["model"]]
    return ctx


async def finish(ctx: Context, reply: Reply) -> bytes:
    """What the writer does: read the body, close it, run the cleanups."""
    try:
        return await collect(reply)
    finally:
        aclose = getattr(reply.body, "aclose", None)
        if aclose is not None:
            await aclose()
        for cleanup in ctx.cleanups:
            cleanup()


async def post(proxy: Any, path: str, body: dict[str, Any], headers: dict[str, str] | None = None):
    async with aiohttp.ClientSession(headers=headers) as s, s.post(proxy.url + path, json=body) as r:
        return r.status, r.headers, await r.read()


async def one_record(proxy: Any) -> Any:
    """The request's record, after checking no second one follows it."""
    async with asyncio.timeout(2):
        while not proxy.records:
            await asyncio.sleep(0.005)
    await asyncio.sleep(0.05)
    assert len(proxy.records) == 1, proxy.records
    return proxy.records[0]


# --- in-test middlewares -------------------------------------------------------------------


def tracer(tag: str, log: list[str]) -> type:
    """Notes when it sees the request and when it sees the answer."""
    class Tracer:
        def __init__(self, options: Any, services: Any) -> None:
            self.options = options

        async def __call__(self, ctx: Context, call_next: Next) -> Reply:
            log.append(f"{tag}>")
            reply = await call_next(ctx)
            log.append(f"<{tag}")
            return reply
    return Tracer


class Deny:
    """Rejects every request before calling `call_next`."""

    def __init__(self, options: Any, services: Any) -> None:
        pass

    async def __call__(self, ctx: Context, call_next: Next) -> Reply:
        raise ProxyError(429, "Slow down.", "rate_limit_error", "denied", headers={"retry-after": "7"})


class Cached:
    """Answers by itself (a cache hit), as bytes or as a stream."""

    @dataclass(frozen=True)
    class Options:
        stream: bool = False

    def __init__(self, options: Cached.Options, services: Any) -> None:
        self.stream = options.stream

    async def __call__(self, ctx: Context, call_next: Next) -> Reply:
        ctx.record.cache = "hit"
        if not self.stream:
            return Reply(200, [("Content-Type", "application/json"), ("x-cache", "hit")], b'{"cached": true}')

        async def events() -> AsyncIterator[bytes]:
            yield b"data: cached\n\n"
            yield b"data: [DONE]\n\n"
        return Reply(200, [("Content-Type", "text/event-stream"), ("x-cache", "hit")], events())


class Greeter:
    """Options built from its dataclass; adds `x-greeting` to every answer."""

    @dataclass(frozen=True)
    class Options:
        greeting: str = "hello"
        times: int = field(default=1, metadata={"min": 1})

    def __init__(self, options: Greeter.Options, services: Any) -> None:
        self.options = options
        self.header = ("x-greeting", " ".join([options.greeting] * options.times))

    async def __call__(self, ctx: Context, call_next: Next) -> Reply:
        reply = await call_next(ctx)
        return reply.with_headers(reply.headers + [self.header])


class Upper:
    """Transforms the streamed answer: every chunk upper-cased."""

    def __init__(self, options: Any, services: Any) -> None:
        pass

    async def __call__(self, ctx: Context, call_next: Next) -> Reply:
        reply = await call_next(ctx)
        if isinstance(reply.body, (bytes, bytearray)):
            return reply.with_body(reply.body.upper())

        async def upper(body: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
            async for chunk in body:
                yield chunk.upper()
        return reply.with_body(upper(reply.body))


def suffix(tag: bytes) -> type:
    """Appends `|tag` to every chunk (to show in which order the body wrappers apply)."""
    class Suffix:
        def __init__(self, options: Any, services: Any) -> None:
            pass

        async def __call__(self, ctx: Context, call_next: Next) -> Reply:
            reply = await call_next(ctx)

            async def tagged(body: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
                async for chunk in body:
                    yield chunk + b"|" + tag
            return reply.with_body(tagged(reply.body))
    return Suffix


class Broken:
    """A bug: raises something that is not a ProxyError."""

    def __init__(self, options: Any, services: Any) -> None:
        pass

    async def __call__(self, ctx: Context, call_next: Next) -> Reply:
        raise RuntimeError("a bug in a middleware")


def counter(seen: dict[str, Any]) -> type:
    """Wraps the body with a generator and registers a cleanup; `seen` tells which ran."""
    class Counter:
        def __init__(self, options: Any, services: Any) -> None:
            pass

        async def __call__(self, ctx: Context, call_next: Next) -> Reply:
            reply = await call_next(ctx)
            state = {"chunks": 0, "started": False}

            async def counted(body: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
                state["started"] = True
                try:
                    async for chunk in body:
                        state["chunks"] += 1
                        yield chunk
                finally:
                    seen["generator_finally"] = True

            def cleanup() -> None:
                seen["cleanups"] = seen.get("cleanups", 0) + 1
                ctx.record.extra["counter"] = dict(state)
            ctx.cleanups.append(cleanup)
            return reply.with_body(counted(reply.body))
    return Counter


# --- order ----------------------------------------------------------------------------------


async def test_request_runs_in_config_order_and_answer_in_reverse() -> None:
    log: list[str] = []
    reg = registry(a=tracer("a", log), b=tracer("b", log), c=tracer("c", log))
    gw = gateway(mock_config("b", "c", "a"), reg)  # config order, not registry order
    ctx = fabricate(gw, CHAT)
    reply = await gw.chains[ctx.api](ctx)
    assert log == ["b>", "c>", "a>", "<a", "<c", "<b"]
    assert orjson.loads(await finish(ctx, reply))["object"] == "chat.completion"


async def test_body_wrappers_apply_inside_out() -> None:
    reg = registry(upper=Upper, a=suffix(b"a"), b=suffix(b"b"))
    gw = gateway(mock_config("upper", "a", "b"), reg)
    ctx = fabricate(gw, {**CHAT, "stream": True})
    reply = await gw.chains[ctx.api](ctx)
    chunks = [chunk async for chunk in reply.body]
    await finish(ctx, reply)
    assert len(chunks) == 5  # 3 pieces, the final chunk, [DONE]
    assert all(c.endswith(b"\n\n|B|A") for c in chunks)  # b (nearest upstream) first, upper last
    assert chunks[-1] == b"DATA: [DONE]\n\n|B|A"


# --- rejecting and answering early ----------------------------------------------------------


async def test_raising_before_call_next_short_circuits_the_chain() -> None:
    log: list[str] = []
    gw = gateway(mock_config("a", "deny", "b"), registry(a=tracer("a", log), deny=Deny, b=tracer("b", log)))
    ctx = fabricate(gw, CHAT)
    with pytest.raises(ProxyError) as info:
        await gw.chains[ctx.api](ctx)
    assert info.value.status == 429
    assert log == ["a>"]  # b never ran; nor did the forwarder
    assert ctx.deployment is None and ctx.record.attempts == [] and ctx.cleanups == []


@pytest.mark.parametrize("path, body, expect", [
    ("/v1/chat/completions", GPT,
     {"error": {"message": "Slow down.", "type": "rate_limit_error", "param": None, "code": "denied"}}),
    ("/v1/chat/completions", {**GPT, "stream": True},
     {"error": {"message": "Slow down.", "type": "rate_limit_error", "param": None, "code": "denied"}}),
    ("/v1/messages", CLAUDE, {"type": "error", "error": {"type": "rate_limit_error", "message": "Slow down."}}),
])
async def test_rejection_reaches_the_client_in_its_api_shape(upstream, make_proxy, path: str,
                                                             body: dict, expect: dict) -> None:
    proxy = await make_proxy(openai_config(upstream, middlewares=["deny"]),
                             registry(deny=Deny))
    status, headers, raw = await post(proxy, path, body, AUTH)
    assert status == 429 and orjson.loads(raw) == expect
    assert headers["retry-after"] == "7" and headers["content-type"].startswith("application/json")
    assert upstream.requests == []
    rec = await one_record(proxy)
    assert (rec.status, rec.error_type, rec.error_code) == (429, "rate_limit_error", "denied")


@pytest.mark.parametrize("stream, expect", [
    (False, b'{"cached": true}'),
    (True, b"data: cached\n\ndata: [DONE]\n\n"),
])
async def test_a_middleware_may_answer_by_itself(upstream, make_proxy, stream: bool, expect: bytes) -> None:
    log: list[str] = []
    reg = registry(cached=Cached, below=tracer("below", log))
    config = openai_config(upstream, middlewares=[{"cached": {"stream": stream}}, "below"])
    proxy = await make_proxy(config, reg)
    status, headers, raw = await post(proxy, "/v1/chat/completions", GPT, AUTH)
    assert (status, headers["x-cache"], raw) == (200, "hit", expect)
    assert upstream.requests == [] and log == []
    rec = await one_record(proxy)
    assert (rec.status, rec.cache, rec.attempts, rec.deployment) == (200, "hit", [], None)


# --- config ---------------------------------------------------------------------------------


@pytest.mark.parametrize("installed, message", [
    ({"a": tracer("a", []), "b": tracer("b", [])}, "middlewares[1].nope: middleware 'nope' is not installed "
                                                   "(installed: a, b)"),
    ({}, "middlewares[1].nope: middleware 'nope' is not installed (none installed)"),
])
def test_unknown_middleware_lists_the_installed_ones(installed: dict, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        gateway(mock_config("a", "nope"), registry(**installed))
    assert message in info.value.messages


@pytest.mark.parametrize("section, expect", [
    ("greeter", Greeter.Options()),
    ({"greeter": None}, Greeter.Options()),
    ({"greeter": {"greeting": "hi", "times": 2}}, Greeter.Options("hi", 2)),
])
async def test_options_are_built_from_the_dataclass(section: Any, expect: Greeter.Options) -> None:
    gw = gateway(mock_config(section, "plain"), registry(greeter=Greeter, plain=tracer("p", [])))
    greeter, plain = gw.middlewares
    assert greeter.options == expect
    assert plain.options is None  # no Options class: None
    ctx = fabricate(gw, CHAT)
    reply = await gw.chains[ctx.api](ctx)
    await finish(ctx, reply)
    assert ("x-greeting", " ".join([expect.greeting] * expect.times)) in reply.headers


@pytest.mark.parametrize("section, message", [
    ({"greeter": {"colour": "red"}}, "middlewares[0].greeter.colour: unknown key (known: greeting, times)"),
    ({"greeter": {"tims": 2}},
     "middlewares[0].greeter.tims: unknown key (known: greeting, times); did you mean 'times'?"),
    ({"greeter": {"times": 0}}, "middlewares[0].greeter.times: must be >= 1"),
    ({"greeter": {"times": "2"}}, "middlewares[0].greeter.times: expected integer, got '2'"),
    ({"greeter": ["hi"]}, "middlewares[0].greeter: options must be a mapping, got a list"),
    ({"plain": {"x": 1}}, "middlewares[0].plain: takes no options (got x)"),
])
def test_bad_options_fail_naming_the_path(section: Any, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        gateway(mock_config(section), registry(greeter=Greeter, plain=tracer("p", [])))
    assert info.value.messages == [message]


# --- transforming the stream ----------------------------------------------------------------


async def test_a_stream_transform_reaches_the_client(make_proxy) -> None:
    proxy = await make_proxy(mock_config("upper"), registry(upper=Upper))
    status, headers, raw = await post(proxy, "/v1/chat/completions", {**CHAT, "stream": True})
    assert status == 200 and "content-length" not in headers
    events = [e for e in raw.split(b"\n\n") if e]
    assert len(events) == 5 and events[-1] == b"DATA: [DONE]"
    assert b'"CONTENT":"THIS "' in events[0] and raw == raw.upper()
    rec = await one_record(proxy)
    assert rec.status == 200 and rec.completion_tokens > 0  # metered below the transform


# --- one record per request -----------------------------------------------------------------


def _upstream_500(upstream: Any) -> None:
    upstream.push(reply_json(500, {"error": "boom"}), reply_json(500, {"error": "boom"}))


def _upstream_400(upstream: Any) -> None:
    upstream.push(reply_json(400, {"error": {"message": "bad", "type": "invalid_request_error"}}))


@pytest.mark.parametrize("middlewares, script, body, status", [
    ([], None, GPT, 200),
    ([], None, {**GPT, "stream": True}, 200),
    (["deny"], None, GPT, 429),
    ([], _upstream_500, GPT, 502),  # both attempts failed
    ([], _upstream_400, GPT, 400),  # passed through unchanged
    (["broken"], None, GPT, 500),
], ids=["success", "stream", "rejection", "upstream-error", "upstream-4xx", "middleware-bug"])
async def test_record_is_emitted_exactly_once(upstream, make_proxy, middlewares: list, script: Callable | None,
                                              body: dict, status: int) -> None:
    if script is not None:
        script(upstream)
    proxy = await make_proxy(openai_config(upstream, middlewares=middlewares),
                             registry(deny=Deny, broken=Broken))
    got, _, _ = await post(proxy, "/v1/chat/completions", body, AUTH)
    assert got == status
    rec = await one_record(proxy)
    assert rec.status == status and not rec.client_disconnected


# --- cleanups run for bodies never read ------------------------------------------------------


class Veto:
    """Calls `call_next`, then refuses the answer it got back."""

    def __init__(self, options: Any, services: Any) -> None:
        pass

    async def __call__(self, ctx: Context, call_next: Next) -> Reply:
        await call_next(ctx)
        raise ProxyError(451, "Not this answer.", "invalid_request_error", "vetoed")


async def test_wrapper_never_started_when_an_outer_middleware_raises(make_proxy) -> None:
    seen: dict[str, Any] = {}
    proxy = await make_proxy(mock_config("veto", "counter"), registry(veto=Veto, counter=counter(seen)))
    status, _, raw = await post(proxy, "/v1/chat/completions", {**CHAT, "stream": True})
    assert status == 451 and orjson.loads(raw)["error"]["code"] == "vetoed"
    rec = await one_record(proxy)
    assert seen == {"cleanups": 1}  # the generator never started, so its `finally` never ran
    assert rec.extra["counter"] == {"chunks": 0, "started": False}
    assert (rec.status, rec.error_code, rec.deployment) == (451, "vetoed", "mock:mock")
    assert rec.prompt_tokens > 0  # the forwarder's own cleanup ran too


async def test_wrapper_never_started_when_the_client_leaves(make_proxy) -> None:
    seen: dict[str, Any] = {}
    holding = asyncio.Event()

    class Slow:
        """Holds the answer after `call_next` returned (say, a slow audit call)."""

        def __init__(self, options: Any, services: Any) -> None:
            pass

        async def __call__(self, ctx: Context, call_next: Next) -> Reply:
            reply = await call_next(ctx)
            holding.set()
            await asyncio.sleep(30)
            return reply

    proxy = await make_proxy(mock_config("slow", "counter"), registry(slow=Slow, counter=counter(seen)))
    client = asyncio.create_task(post(proxy, "/v1/chat/completions", {**CHAT, "stream": True}))
    async with asyncio.timeout(5):
        await holding.wait()
        client.cancel()  # the client goes away while the answer is held
        with pytest.raises(asyncio.CancelledError):
            await client
    rec = await one_record(proxy)
    assert seen == {"cleanups": 1}
    assert rec.extra["counter"] == {"chunks": 0, "started": False}
    assert rec.client_disconnected and rec.status == 499


async def test_wrapper_cleanup_runs_once_after_a_full_read(make_proxy) -> None:
    seen: dict[str, Any] = {}
    proxy = await make_proxy(mock_config("counter"), registry(counter=counter(seen)))
    status, _, raw = await post(proxy, "/v1/chat/completions", {**CHAT, "stream": True})
    assert status == 200
    rec = await one_record(proxy)
    assert seen == {"generator_finally": True, "cleanups": 1}
    assert rec.extra["counter"] == {"chunks": raw.count(b"\n\n"), "started": True}


# --- bugs in plugins -------------------------------------------------------------------------


class FailsAtStart:
    def __init__(self, options: Any, services: Any) -> None:
        raise ValueError("cannot reach the license server")


def test_a_middleware_failing_at_construction_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"middlewares\[0\]\.bad: failed to start: ValueError: cannot reach"):
        gateway(mock_config("bad"), registry(bad=FailsAtStart))


@pytest.mark.parametrize("path, shape", [("/v1/chat/completions", "openai"), ("/v1/messages", "anthropic")])
async def test_a_middleware_bug_is_a_500_in_the_api_shape(upstream, make_proxy, path: str, shape: str) -> None:
    proxy = await make_proxy(openai_config(upstream, middlewares=["broken"]), registry(broken=Broken))
    body = GPT if shape == "openai" else CLAUDE
    status, _, raw = await post(proxy, path, body, AUTH)
    assert status == 500
    err = orjson.loads(raw)
    if shape == "openai":
        assert (err["error"]["type"], err["error"]["code"]) == ("api_error", "internal_error")
    else:
        assert err["type"] == "error" and err["error"]["type"] == "api_error"
    assert "a bug in a middleware" not in raw.decode()  # internals stay in the log
    rec = await one_record(proxy)
    assert rec.status == 500 and rec.error_code == "internal_error"
