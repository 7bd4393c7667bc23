"""The body sent upstream: the client's own bytes with only `model` (and, on an OpenAI
stream, `stream_options`) changed, whenever no middleware changed the body; serialised
again otherwise. And the prompt text derived once per request."""

from __future__ import annotations

import json
from typing import Any

import aiohttp
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmproxy.context import Context
from llmproxy.providers.base import upstream_body
from llmproxy.testing import make_context

from .conftest import MASTER, openai_config
from .test_chain import registry

AUTH = {"Authorization": f"Bearer {MASTER}", "Content-Type": "application/json"}


def kept(body: dict[str, Any], raw: bytes) -> Context:
    ctx = make_context(body)
    ctx.raw_body = raw
    return ctx


def test_unchanged_fields_forward_the_clients_bytes_as_sent() -> None:
    raw = b'{ "messages" : [ {"role":"user","content":"caf\\u00e9"} ],\n "model": "gpt-upstream", "n": 1 }'
    assert upstream_body(kept(orjson.loads(raw), raw), "gpt-upstream") is raw


def test_the_model_is_spliced_and_nothing_else_moves() -> None:
    raw = b'{"messages": [{"role": "user", "content": "a \\"quoted\\" word"}],  "model" :\t"gpt-test", "top_p": 1.0}'
    out = upstream_body(kept(orjson.loads(raw), raw), "gpt-upstream")
    assert out == raw.replace(b'"gpt-test"', b'"gpt-upstream"')


def test_include_usage_is_added_as_the_first_member() -> None:
    raw = b'  {"model": "gpt-test", "stream": true, "messages": []}'
    out = upstream_body(kept(orjson.loads(raw), raw), "up", include_usage=True)
    assert out == b'  {"stream_options":{"include_usage":true},"model": "up", "stream": true, "messages": []}'


@pytest.mark.parametrize("raw", [
    b'{"model": "gpt-test", "messages": [{"role": "model", "content": "x"}]}',  # "model" twice in the bytes
    b'{"mod\\u0065l": "gpt-test", "messages": [{"role": "user", "content": "\\"model\\": 1"}]}',  # escaped key
    b'{"mod\\u0065l": "gpt-test", "tools": [{"model": "gpt-test"}]}',  # the lone literal one is not top level
    b'{"model": "gpt-other", "model": "gpt-test"}',  # a duplicate key: the parsed body says gpt-test
])
def test_ambiguous_bytes_are_serialised_again(raw: bytes) -> None:
    body = orjson.loads(raw)
    out = upstream_body(kept(body, raw), "gpt-upstream")
    assert orjson.loads(out) == {**body, "model": "gpt-upstream"}
    assert out.count(b'"model"') == 1 or b"\\u006" not in out


def test_existing_stream_options_are_merged_by_serialising() -> None:
    raw = b'{"model": "m", "stream": true, "stream_options": {"x": 1}}'
    out = upstream_body(kept(orjson.loads(raw), raw), "m", include_usage=True)
    assert orjson.loads(out)["stream_options"] == {"x": 1, "include_usage": True}


def test_without_the_clients_bytes_the_body_is_serialised() -> None:
    ctx = make_context({"model": "gpt-test", "messages": []})
    assert ctx.raw_body is None
    assert orjson.loads(upstream_body(ctx, "up")) == {"model": "up", "messages": []}


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(extra=st.dictionaries(st.text(max_size=8), json_values, max_size=5), model=st.text(min_size=1, max_size=12),
       target=st.text(min_size=1, max_size=12), ensure_ascii=st.booleans(), indent=st.sampled_from([None, 1]),
       model_first=st.booleans(), include_usage=st.booleans())
def test_any_body_goes_upstream_as_the_parsed_body_with_the_two_fields_set(
        extra, model, target, ensure_ascii, indent, model_first, include_usage) -> None:
    extra.pop("model", None)
    body = {"model": model, **extra} if model_first else {**extra, "model": model}
    raw = json.dumps(body, ensure_ascii=ensure_ascii, indent=indent).encode()
    parsed = orjson.loads(raw)
    out = upstream_body(kept(parsed, raw), target, include_usage=include_usage)
    expect = {**parsed, "model": target}
    if include_usage:
        opts = parsed.get("stream_options")
        expect["stream_options"] = {**(opts if isinstance(opts, dict) else {}), "include_usage": True}
    assert orjson.loads(out) == expect
    # a JSON reader that keeps the first of two equal keys must read the same thing
    assert json.loads(out, object_pairs_hook=lambda pairs: dict(reversed(pairs))) == expect


# --- through the gateway ---------------------------------------------------------------------


class Editor:
    """A third-party middleware that changes the body in place and says nothing."""

    def __init__(self, options: Any, services: Any) -> None:
        pass

    async def __call__(self, ctx: Context, call_next: Any) -> Any:
        ctx.body["user"] = "edited"
        return await call_next(ctx)


class Reader:
    """One that declares it never changes the body."""

    edits_body = False

    def __init__(self, options: Any, services: Any) -> None:
        pass

    async def __call__(self, ctx: Context, call_next: Any) -> Any:
        ctx.record.extra["prompt_chars"] = len(ctx.prompt_text())
        return await call_next(ctx)


RAW = (b'{"messages":[ {"role":"user","content":"Hello there"} ],\n  "model":"gpt-test",'
       b' "temperature":0.5, "stream":false}')


async def post(proxy: Any, raw: bytes, path: str = "/v1/chat/completions") -> int:
    async with aiohttp.ClientSession() as s:
        async with s.post(proxy.url + path, data=raw, headers=AUTH) as r:
            await r.read()
            return r.status


async def test_the_upstream_gets_the_clients_bytes_when_nothing_edits(upstream, make_proxy) -> None:
    proxy = await make_proxy(openai_config(upstream, middlewares=["reader"]), registry(reader=Reader))
    assert await post(proxy, RAW) == 200
    assert upstream.requests[-1].body == RAW.replace(b'"gpt-test"', b'"gpt-upstream"')
    assert proxy.records[-1].extra["prompt_chars"] == len("Hello there")
    messages = b'{"max_tokens": 20, "model": "claude-test", "messages": [{"role": "user", "content": "Hi"}]}'
    assert await post(proxy, messages, "/v1/messages") == 200
    assert upstream.requests[-1].body == messages.replace(b'"claude-test"', b'"claude-upstream"')


async def test_a_middleware_that_may_edit_gets_its_edit_forwarded(upstream, make_proxy) -> None:
    proxy = await make_proxy(openai_config(upstream, middlewares=["reader", "editor"]),
                             registry(reader=Reader, editor=Editor))
    assert await post(proxy, RAW) == 200
    sent = upstream.requests[-1]
    assert sent.json == {**orjson.loads(RAW), "model": "gpt-upstream", "user": "edited"}


async def test_pii_masking_is_forwarded_and_a_clean_prompt_keeps_its_bytes(upstream, make_proxy) -> None:
    pytest.importorskip("llmproxy.middlewares.pii")
    from llmproxy.middlewares.pii import PII

    proxy = await make_proxy(openai_config(upstream, middlewares=[{"pii": {"mode": "redact"}}]), registry(pii=PII))
    assert await post(proxy, RAW) == 200
    assert upstream.requests[-1].body == RAW.replace(b'"gpt-test"', b'"gpt-upstream"')
    secret = RAW.replace(b"Hello there", b"mail jane.doe@example.com")
    assert await post(proxy, secret) == 200
    sent = upstream.requests[-1]
    assert b"jane.doe@example.com" not in sent.body
    assert sent.json["messages"][0]["content"] != "mail jane.doe@example.com"


def test_the_prompt_text_is_derived_once_until_the_body_changes(monkeypatch) -> None:
    import llmproxy.usage as usage

    calls = []
    real = usage.prompt_text
    monkeypatch.setattr(usage, "prompt_text", lambda body, api: calls.append(api) or real(body, api))
    ctx = make_context({"model": "m", "messages": [{"role": "user", "content": "abc"}]})
    assert [ctx.prompt_text() for _ in range(3)] == ["abc"] * 3
    assert calls == ["chat"]
    ctx.body["messages"][0]["content"] = "abcdef"
    ctx.raw_body = b"{}"
    ctx.body_changed()
    assert ctx.prompt_text() == "abcdef" and ctx.raw_body is None
    assert calls == ["chat", "chat"]
