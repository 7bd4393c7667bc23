"""The body sent upstream is the parsed body as the chain left it, naming the deployment's
model (and, on an OpenAI stream, asking for usage); the prompt text is derived once per
request."""

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

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=200, deadline=None)
@given(extra=st.dictionaries(st.text(max_size=8), json_values, max_size=5), model=st.text(min_size=1, max_size=12),
       target=st.text(min_size=1, max_size=12), include_usage=st.booleans())
def test_the_body_goes_upstream_with_the_two_fields_set(extra, model, target, include_usage) -> None:
    body = {**extra, "model": model}
    out = upstream_body(make_context(body), target, include_usage=include_usage)
    expect = {**body, "model": model if target == "*" else target}  # "*": the client's own name (a pattern)
    if include_usage:
        opts = body.get("stream_options")
        expect["stream_options"] = {**(opts if isinstance(opts, dict) else {}), "include_usage": True}
    assert orjson.loads(out) == expect
    assert list(orjson.loads(out)) == list(expect)  # key order kept


class Editor:
    """A third-party middleware that changes the body in place."""

    def __init__(self, options: Any, services: Any) -> None:
        pass

    async def __call__(self, ctx: Context, call_next: Any) -> Any:
        ctx.body["user"] = "edited"
        return await call_next(ctx)


async def post(proxy: Any, raw: bytes, path: str = "/v1/chat/completions") -> int:
    async with aiohttp.ClientSession() as s:
        async with s.post(proxy.url + path, data=raw, headers=AUTH) as r:
            await r.read()
            return r.status


async def test_upstream_reads_what_the_gateway_routed_and_an_edit_goes_with_it(upstream, make_proxy) -> None:
    proxy = await make_proxy(openai_config(upstream, middlewares=["editor"]), registry(editor=Editor))
    # a key twice: JSON readers differ on which one wins; the gateway routed the last one
    raw = b'{"model": "claude-test", "messages": [{"role": "user", "content": "hi"}], "model": "gpt-test"}'
    assert await post(proxy, raw) == 200
    sent = upstream.requests[-1]
    assert sent.body.count(b'"model"') == 1
    assert sent.json == {"model": "gpt-upstream", "messages": [{"role": "user", "content": "hi"}], "user": "edited"}
    assert proxy.records[-1].model == "gpt-test"


async def test_pii_masking_reaches_upstream(upstream, make_proxy) -> None:
    pytest.importorskip("llmproxy.middlewares.pii")
    from llmproxy.middlewares.pii import PII

    proxy = await make_proxy(openai_config(upstream, middlewares=[{"pii": {"mode": "redact"}}]), registry(pii=PII))
    secret = json.dumps({"model": "gpt-test", "messages": [{"role": "user", "content": "mail jane.doe@example.com"}]})
    assert await post(proxy, secret.encode()) == 200
    sent = upstream.requests[-1]
    assert b"jane.doe@example.com" not in sent.body
    assert sent.json["messages"][0]["content"].startswith("mail ")


def test_the_prompt_text_is_derived_once_until_the_body_changes(monkeypatch) -> None:
    import llmproxy.context
    from llmproxy.usage import prompt_text

    calls = []
    monkeypatch.setattr(llmproxy.context, "_prompt_text", lambda body, api: calls.append(api) or prompt_text(body, api))
    ctx = make_context({"model": "m", "messages": [{"role": "user", "content": "abc"}]})
    assert [ctx.prompt_text() for _ in range(3)] == ["abc"] * 3
    assert calls == ["chat"]
    ctx.body["messages"][0]["content"] = "abcdef"
    ctx.body_changed()
    assert ctx.prompt_text() == "abcdef"
    assert calls == ["chat", "chat"]


async def test_pii_masking_renews_the_prompt_text(make_proxy) -> None:
    pytest.importorskip("llmproxy.middlewares.pii")
    from llmproxy.middlewares.pii import PII

    seen = []

    class After:
        def __init__(self, options: Any, services: Any) -> None:
            pass

        async def __call__(self, ctx: Context, call_next: Any) -> Any:
            seen.append(ctx.prompt_text())
            return await call_next(ctx)

    class Before(After):
        pass

    config = {"master_key": MASTER, "models": [{"name": "mock", "deployments": [{"provider": "mock"}]}],
              "middlewares": ["before", {"pii": {"mode": "redact"}}, "after"]}
    proxy = await make_proxy(config, registry(before=Before, pii=PII, after=After))
    body = orjson.dumps({"model": "mock", "messages": [{"role": "user", "content": "mail jane.doe@example.com"}]})
    assert await post(proxy, body) == 200
    assert seen[0] == "mail jane.doe@example.com"
    assert "jane.doe@example.com" not in seen[1]
