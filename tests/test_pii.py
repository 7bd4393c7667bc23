"""The `pii` middleware end to end: a recording fake upstream that echoes the last user
message (so whatever the provider saw comes back), the real `openai` and `anthropic` SDKs,
redact, block, per-team policies, a fake Presidio analyzer, metrics and logs."""

from __future__ import annotations

import asyncio
import re
from types import SimpleNamespace
from typing import Any

import aiohttp
import anthropic
import openai
import orjson
import pytest
from aiohttp import web

from llmproxy.accesslog import flush_logs
from llmproxy.config import ConfigError, parse_config
from llmproxy.plugins import Registry
from llmproxy.server import Gateway
pytest.importorskip("llmproxy.middlewares.pii", reason="the pii middleware is not installed")
from llmproxy.middlewares.pii import PII
from llmproxy.testing import Received, TestPrincipal, anthropic_events, openai_events

from .conftest import MASTER, openai_config

EMAIL = "jane.doe@example.com"
SSN = "536-22-8172"
IP = "203.0.113.7"
PROMPT = f"Mail {EMAIL} about SSN {SSN}; the server at {IP} is down. Cc {EMAIL}."
ORIGINALS = (EMAIL, SSN, IP)
AUTH = {"Authorization": f"Bearer {MASTER}"}


# --- the echoing upstream ---------------------------------------------------------------


def last_user_text(body: dict, api: str) -> str:
    if api == "completions":
        prompt = body["prompt"]
        return prompt if isinstance(prompt, str) else prompt[-1]
    for msg in reversed(body["messages"]):
        if msg.get("role") != "user":
            continue
        content = msg["content"]
        if isinstance(content, str):
            return content
        return "".join(p.get("text", "") for p in content if p.get("type") == "text")
    return ""


def pieces(text: str, size: int | None) -> list[str]:
    if size is None:
        return [text]
    return [text[i:i + size] for i in range(0, len(text), size)] or [""]


def _escape_lt(events: list[bytes]) -> list[bytes]:
    """As some servers write JSON: `<` as `\\u003c` (outside strings there is no `<`)."""
    return [e.replace(b"<", b"\\u003c") for e in events]


def _sse(name: str | None, data: Any) -> bytes:
    head = b"event: " + name.encode() + b"\n" if name else b""
    return head + b"data: " + orjson.dumps(data) + b"\n\n"


def echo(chunk: int | None = 1, escape: bool = False, tool: bool = False, pause: float = 0.0):
    """A behaviour for FakeUpstream: answers with the last user message's text (as a tool
    call's `{"text": ...}` arguments when `tool`), streamed `chunk` characters per SSE event
    when the request asks for a stream."""
    async def behaviour(request: web.Request, got: Received) -> web.StreamResponse:
        body = got.json
        path = request.path
        api = ("embeddings" if path.endswith("/embeddings") else "messages" if path.endswith("/messages")
               else "chat" if path.endswith("/chat/completions") else "completions")
        model = body.get("model", "m")
        if api == "embeddings":
            return web.json_response({"object": "list", "model": model, "data": [
                {"object": "embedding", "index": 0, "embedding": [0.5]}], "usage": {"prompt_tokens": 1,
                                                                                  "total_tokens": 1}})
        text = last_user_text(body, api)
        payload = orjson.dumps({"text": text}).decode() if tool else text
        if not body.get("stream"):
            return web.Response(body=_whole(api, model, payload, tool, escape), content_type="application/json")
        events = _events(api, model, pieces(payload, chunk), tool, bool((body.get("stream_options") or {})))
        if escape:
            events = _escape_lt(events)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for ev in events:
            await resp.write(ev)
            if pause:
                await asyncio.sleep(pause)
        await resp.write_eof()
        return resp
    return behaviour


def _whole(api: str, model: str, payload: str, tool: bool, escape: bool) -> bytes:
    if api == "messages":
        block = ({"type": "tool_use", "id": "toolu_1", "name": "save", "input": orjson.loads(payload)} if tool
                 else {"type": "text", "text": payload})
        out = {"id": "msg_1", "type": "message", "role": "assistant", "model": model, "content": [block],
               "stop_reason": "tool_use" if tool else "end_turn", "stop_sequence": None,
               "usage": {"input_tokens": 5, "output_tokens": 5}}
    elif api == "completions":
        out = {"id": "cmpl-1", "object": "text_completion", "created": 1, "model": model,
               "choices": [{"index": 0, "text": payload, "logprobs": None, "finish_reason": "stop"}],
               "usage": {"prompt_tokens": 5, "completion_tokens": 5, "total_tokens": 10}}
    else:
        message: dict[str, Any] = {"role": "assistant", "content": None if tool else payload}
        if tool:
            message["tool_calls"] = [{"id": "call_1", "type": "function",
                                      "function": {"name": "save", "arguments": payload}}]
        out = {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": model,
               "choices": [{"index": 0, "message": message, "finish_reason": "tool_calls" if tool else "stop"}],
               "usage": {"prompt_tokens": 5, "completion_tokens": 5, "total_tokens": 10}}
    raw = orjson.dumps(out)
    return raw.replace(b"<", b"\\u003c") if escape else raw


def _events(api: str, model: str, parts: list[str], tool: bool, usage: bool) -> list[bytes]:
    if api == "messages":
        if not tool:
            return anthropic_events(model, parts)
        out = [_sse("message_start", {"type": "message_start", "message": {
            "id": "msg_1", "type": "message", "role": "assistant", "model": model, "content": [],
            "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": 5, "output_tokens": 1}}}),
            _sse("content_block_start", {"type": "content_block_start", "index": 0, "content_block": {
                "type": "tool_use", "id": "toolu_1", "name": "save", "input": {}}})]
        out += [_sse("content_block_delta", {"type": "content_block_delta", "index": 0,
                                             "delta": {"type": "input_json_delta", "partial_json": p}})
                for p in parts]
        out += [_sse("content_block_stop", {"type": "content_block_stop", "index": 0}),
                _sse("message_delta", {"type": "message_delta", "delta": {"stop_reason": "tool_use",
                                                                           "stop_sequence": None},
                                       "usage": {"output_tokens": 5}}),
                _sse("message_stop", {"type": "message_stop"})]
        return out
    if api == "completions":
        head = {"id": "cmpl-1", "object": "text_completion", "created": 1, "model": model}
        out = [_sse(None, {**head, "choices": [{"index": 0, "text": p, "logprobs": None, "finish_reason": None}]})
               for p in parts]
        out.append(_sse(None, {**head, "choices": [{"index": 0, "text": "", "logprobs": None,
                                                    "finish_reason": "stop"}]}))
        return out + [b"data: [DONE]\n\n"]
    if not tool:
        return openai_events(model, parts, usage)
    head = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": model}
    out = [_sse(None, {**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": None, "tool_calls": [
        {"index": 0, "id": "call_1", "type": "function", "function": {"name": "save", "arguments": ""}}]},
        "finish_reason": None}]})]
    out += [_sse(None, {**head, "choices": [{"index": 0, "delta": {"tool_calls": [
        {"index": 0, "function": {"arguments": p}}]}, "finish_reason": None}]}) for p in parts]
    out.append(_sse(None, {**head, "choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]}))
    return out + [b"data: [DONE]\n\n"]


# --- helpers ------------------------------------------------------------------------------


def pii_config(upstream, **options: Any) -> dict[str, Any]:
    return openai_config(upstream, middlewares=[{"pii": options}] if options else ["pii"])


def pii_registry(**extra: Any) -> Registry:
    registry = Registry.from_entry_points()
    registry.middlewares.update(Registry.from_classes(middlewares={"pii": PII, **extra}).middlewares)
    return registry


async def pii_proxy(make_proxy, upstream, **options: Any):
    return await make_proxy(pii_config(upstream, **options), pii_registry())


_clients: list[Any] = []


@pytest.fixture(autouse=True)
async def _close_clients():
    yield
    while _clients:
        await _clients.pop().close()


def oai(proxy) -> openai.AsyncOpenAI:
    _clients.append(openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key=MASTER, max_retries=0))
    return _clients[-1]


def ant(proxy) -> anthropic.AsyncAnthropic:
    _clients.append(anthropic.AsyncAnthropic(base_url=proxy.url, api_key=MASTER, max_retries=0))
    return _clients[-1]


def assert_masked(got: Received) -> str:
    """What the provider saw has placeholders and none of the originals."""
    raw = got.body.decode()
    for value in ORIGINALS:
        assert value not in raw
    assert "<EMAIL_ADDRESS_1>" in raw
    return raw


# --- chat, completions, messages through the SDKs ----------------------------------------


async def test_chat_non_stream_masked_upstream_restored_for_client(upstream, make_proxy):
    proxy = await pii_proxy(make_proxy, upstream)
    upstream.push(echo())
    resp = await oai(proxy).chat.completions.create(
        model="gpt-test", messages=[{"role": "system", "content": f"Operator: {EMAIL}"},
                                    {"role": "user", "content": PROMPT}])
    assert resp.choices[0].message.content == PROMPT
    got = upstream.requests[-1].json
    assert_masked(upstream.requests[-1])
    # The same value gets the same placeholder everywhere in the request.
    assert got["messages"][0]["content"] == "Operator: <EMAIL_ADDRESS_1>"
    assert got["messages"][1]["content"].count("<EMAIL_ADDRESS_1>") == 2


@pytest.mark.parametrize("chunk", [1, 2, 7, None])
@pytest.mark.parametrize("escape", [False, True])
async def test_chat_stream_restored_at_any_chunking(upstream, make_proxy, chunk, escape):
    proxy = await pii_proxy(make_proxy, upstream)
    upstream.push(echo(chunk, escape))
    stream = await oai(proxy).chat.completions.create(
        model="gpt-test", messages=[{"role": "user", "content": PROMPT}], stream=True)
    chunks = [c async for c in stream]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == PROMPT
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert_masked(upstream.requests[-1])


async def test_chat_stream_with_text_parts_and_usage(upstream, make_proxy):
    proxy = await pii_proxy(make_proxy, upstream)
    upstream.push(echo(3))
    stream = await oai(proxy).chat.completions.create(
        model="gpt-test", messages=[{"role": "user", "content": [{"type": "text", "text": PROMPT}]}],
        stream=True, stream_options={"include_usage": True})
    chunks = [c async for c in stream]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == PROMPT
    assert chunks[-1].usage is not None
    assert_masked(upstream.requests[-1])


@pytest.mark.parametrize("stream", [False, True])
async def test_completions(upstream, make_proxy, stream):
    proxy = await pii_proxy(make_proxy, upstream)
    upstream.push(echo(1))
    client = oai(proxy)
    if stream:
        out = await client.completions.create(model="gpt-test", prompt=PROMPT, stream=True)
        text = "".join([c.choices[0].text async for c in out if c.choices])
    else:
        text = (await client.completions.create(model="gpt-test", prompt=[PROMPT])).choices[0].text
    assert text == PROMPT
    assert_masked(upstream.requests[-1])


async def test_anthropic_messages_stream_and_not(upstream, make_proxy):
    proxy = await pii_proxy(make_proxy, upstream)
    client = ant(proxy)
    upstream.push(echo(), echo(1))
    msg = await client.messages.create(model="claude-test", max_tokens=50, system=f"Operator: {EMAIL}",
                                       messages=[{"role": "user", "content": PROMPT}])
    assert msg.content[0].text == PROMPT
    got = upstream.requests[-1]
    assert_masked(got)
    assert got.json["system"] == "Operator: <EMAIL_ADDRESS_1>"
    async with client.messages.stream(model="claude-test", max_tokens=50, messages=[
            {"role": "user", "content": [{"type": "text", "text": PROMPT}]}]) as s:
        text = "".join([t async for t in s.text_stream])
        final = await s.get_final_message()
    assert text == PROMPT and final.content[0].text == PROMPT
    assert_masked(upstream.requests[-1])


async def test_placeholder_split_across_events_is_held_then_whole(upstream, make_proxy):
    """On the wire: no event carries a piece of a placeholder or of an original."""
    proxy = await pii_proxy(make_proxy, upstream)
    upstream.push(echo(1))
    async with aiohttp.ClientSession() as s:
        async with s.post(proxy.url + "/v1/chat/completions", headers=AUTH, json={
                "model": "gpt-test", "stream": True, "messages": [{"role": "user", "content": PROMPT}]}) as r:
            raw = await r.read()
    contents = []
    for block in raw.split(b"\n\n"):
        if block.startswith(b"data: {"):
            chunk = orjson.loads(block[6:])
            if chunk["choices"]:
                contents.append(chunk["choices"][0]["delta"].get("content") or "")
    assert "".join(contents) == PROMPT
    assert EMAIL in contents and SSN in contents and IP in contents  # each came out in one piece
    assert not any("<" in c for c in contents)


# --- tool calls ---------------------------------------------------------------------------


TOOL_HISTORY = [
    {"role": "user", "content": "Look the customer up."},
    {"role": "assistant", "content": None, "tool_calls": [{"id": "call_0", "type": "function", "function": {
        "name": "lookup", "arguments": orjson.dumps({"email": EMAIL, "note": f"ssn {SSN}"}).decode()}}]},
    {"role": "tool", "tool_call_id": "call_0", "content": f"found {EMAIL} at {IP}"},
    {"role": "user", "content": PROMPT},
]


@pytest.mark.parametrize("stream", [False, True])
async def test_chat_tool_calls_masked_and_restored(upstream, make_proxy, stream):
    proxy = await pii_proxy(make_proxy, upstream)
    upstream.push(echo(1, tool=True))
    client = oai(proxy)
    if stream:
        out = await client.chat.completions.create(model="gpt-test", messages=TOOL_HISTORY, stream=True)
        args = "".join([tc.function.arguments or "" async for c in out if c.choices
                        for tc in (c.choices[0].delta.tool_calls or [])])
    else:
        resp = await client.chat.completions.create(model="gpt-test", messages=TOOL_HISTORY)
        args = resp.choices[0].message.tool_calls[0].function.arguments
    assert orjson.loads(args) == {"text": PROMPT}  # restored, and still valid JSON
    got = upstream.requests[-1].json
    assert_masked(upstream.requests[-1])
    sent_args = orjson.loads(got["messages"][1]["tool_calls"][0]["function"]["arguments"])
    assert sent_args == {"email": "<EMAIL_ADDRESS_1>", "note": "ssn <US_SSN_1>"}
    assert got["messages"][2]["content"] == "found <EMAIL_ADDRESS_1> at <IP_ADDRESS_1>"


@pytest.mark.parametrize("stream", [False, True])
async def test_anthropic_tool_use_masked_and_restored(upstream, make_proxy, stream):
    proxy = await pii_proxy(make_proxy, upstream)
    upstream.push(echo(1, tool=True))
    messages = [
        {"role": "user", "content": "Look the customer up."},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_0", "name": "lookup",
                                           "input": {"who": {"email": EMAIL}, "ips": [IP]}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_0",
             "content": [{"type": "text", "text": f"ssn {SSN}"}]},
            {"type": "text", "text": PROMPT}]},
    ]
    client = ant(proxy)
    if stream:
        async with client.messages.stream(model="claude-test", max_tokens=50, messages=messages) as s:
            final = await s.get_final_message()
    else:
        final = await client.messages.create(model="claude-test", max_tokens=50, messages=messages)
    assert final.content[0].type == "tool_use"
    assert final.content[0].input == {"text": PROMPT}
    got = upstream.requests[-1].json
    assert_masked(upstream.requests[-1])
    assert got["messages"][1]["content"][0]["input"] == {"who": {"email": "<EMAIL_ADDRESS_1>"},
                                                         "ips": ["<IP_ADDRESS_1>"]}
    assert got["messages"][2]["content"][0]["content"][0]["text"] == "ssn <US_SSN_1>"


# --- embeddings, redact, block, collisions ----------------------------------------------


async def test_embeddings_masked_nothing_to_restore(upstream, make_proxy):
    proxy = await pii_proxy(make_proxy, upstream)
    upstream.push(echo())
    resp = await oai(proxy).embeddings.create(model="gpt-test", input=[PROMPT, "plain"])
    assert resp.data[0].embedding == [0.5]
    got = upstream.requests[-1].json
    assert_masked(upstream.requests[-1])
    assert got["input"][1] == "plain"


async def test_redact_replaces_without_restoring(upstream, make_proxy):
    proxy = await pii_proxy(make_proxy, upstream, mode="redact")
    upstream.push(echo())
    resp = await oai(proxy).chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": PROMPT}])
    expected = "Mail <EMAIL_ADDRESS> about SSN <US_SSN>; the server at <IP_ADDRESS> is down. Cc <EMAIL_ADDRESS>."
    assert upstream.requests[-1].json["messages"][0]["content"] == expected
    assert resp.choices[0].message.content == expected


@pytest.mark.parametrize("path,body,check", [
    ("/v1/chat/completions", {"model": "gpt-test", "messages": [{"role": "user", "content": PROMPT}]},
     lambda j: (j["error"]["type"], j["error"]["code"], j["error"]["message"])),
    ("/v1/messages", {"model": "claude-test", "max_tokens": 5, "messages": [{"role": "user", "content": PROMPT}]},
     lambda j: (j["error"]["type"], "pii_blocked", j["error"]["message"])),
])
async def test_block_names_types_never_values(upstream, make_proxy, path, body, check):
    proxy = await pii_proxy(make_proxy, upstream, mode="block")
    async with aiohttp.ClientSession() as s:
        async with s.post(proxy.url + path, headers=AUTH, json=body) as r:
            status, answer = r.status, await r.json()
    kind, code, message = check(answer)
    assert (status, kind, code) == (400, "invalid_request_error", "pii_blocked")
    for entity in ("EMAIL_ADDRESS", "US_SSN", "IP_ADDRESS"):
        assert entity in message
    for value in ORIGINALS:
        assert value not in message
    assert not upstream.requests
    assert proxy.records[-1].error_code == "pii_blocked"


async def test_block_lets_clean_requests_through(upstream, make_proxy):
    proxy = await pii_proxy(make_proxy, upstream, mode="block")
    resp = await oai(proxy).chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": "hi"}])
    assert resp.choices[0].message.content == upstream.answer_text()


async def test_placeholder_never_collides_with_text_already_in_the_request(upstream, make_proxy):
    proxy = await pii_proxy(make_proxy, upstream)
    text = f"Literal <EMAIL_ADDRESS_1> and <EMAIL_ADDRESS_2 stay; {EMAIL} is real, so is <US_SSN_1>"
    upstream.push(echo(1), echo())
    stream = await oai(proxy).chat.completions.create(
        model="gpt-test", messages=[{"role": "user", "content": text}], stream=True,
        tools=[{"type": "function", "function": {"name": "f", "description": "writes <EMAIL_ADDRESS_2>",
                                                 "parameters": {"type": "object", "properties": {}}}}])
    assert "".join([c.choices[0].delta.content or "" async for c in stream if c.choices]) == text
    sent = upstream.requests[-1].json["messages"][0]["content"]
    # 1 is in the text, 2 in a tool's description (a field the proxy does not scan), so 3.
    assert sent == "Literal <EMAIL_ADDRESS_1> and <EMAIL_ADDRESS_2 stay; <EMAIL_ADDRESS_3> is real, so is <US_SSN_1>"
    resp = await oai(proxy).chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": text}])
    assert resp.choices[0].message.content == text
    assert upstream.requests[-1].json["messages"][0]["content"].count("<EMAIL_ADDRESS_2>") == 1


async def test_distinct_values_distinct_placeholders(upstream, make_proxy):
    proxy = await pii_proxy(make_proxy, upstream)
    upstream.push(echo())
    text = "a@example.com, b@example.com, a@example.com"
    resp = await oai(proxy).chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": text}])
    assert resp.choices[0].message.content == text
    assert upstream.requests[-1].json["messages"][0]["content"] == \
        "<EMAIL_ADDRESS_1>, <EMAIL_ADDRESS_2>, <EMAIL_ADDRESS_1>"


async def test_upstream_error_passes_untouched_and_models_skipped(upstream, make_proxy):
    from llmproxy.testing import reply_json

    proxy = await pii_proxy(make_proxy, upstream)
    upstream.push(reply_json(400, {"error": {"message": "bad <EMAIL_ADDRESS_1>", "type": "invalid_request_error"}}))
    async with aiohttp.ClientSession() as s:
        async with s.post(proxy.url + "/v1/chat/completions", headers=AUTH, json={
                "model": "gpt-test", "messages": [{"role": "user", "content": PROMPT}]}) as r:
            assert r.status == 400
            assert (await r.json())["error"]["message"] == "bad <EMAIL_ADDRESS_1>"
        async with s.get(proxy.url + "/v1/models", headers=AUTH) as r:
            assert r.status == 200


async def test_entities_option_limits_what_is_masked(upstream, make_proxy):
    proxy = await pii_proxy(make_proxy, upstream, entities=["US_SSN"])
    upstream.push(echo())
    resp = await oai(proxy).chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": PROMPT}])
    assert resp.choices[0].message.content == PROMPT
    sent = upstream.requests[-1].json["messages"][0]["content"]
    assert EMAIL in sent and SSN not in sent and "<US_SSN_1>" in sent


# --- per-team policy --------------------------------------------------------------------


class FakeTeam:
    """Sets `ctx.principal` as the auth middleware would, with the team's metadata."""

    metadata: dict[str, Any] = {}

    def __init__(self, options, services) -> None:
        pass

    async def __call__(self, ctx, call_next):
        ctx.principal = TestPrincipal(team=SimpleNamespace(team_id="t1", metadata=FakeTeam.metadata))
        return await call_next(ctx)


async def test_team_metadata_overrides_the_default(upstream, make_proxy):
    config = openai_config(upstream, middlewares=["team", {"pii": {"mode": "mask"}}])
    proxy = await make_proxy(config, pii_registry(team=FakeTeam))
    pii = proxy.gateway.middlewares[1]
    body = {"model": "gpt-test", "messages": [{"role": "user", "content": PROMPT}]}
    async with aiohttp.ClientSession() as s:
        FakeTeam.metadata = {"pii": {"mode": "block"}}
        for _ in range(2):
            async with s.post(proxy.url + "/v1/chat/completions", headers=AUTH, json=body) as r:
                assert r.status == 400 and (await r.json())["error"]["code"] == "pii_blocked"
        assert len(pii._by_value) == 1  # built once per distinct metadata value
        assert not upstream.requests
        FakeTeam.metadata = {"pii": {"mode": "redact", "entities": ["IP_ADDRESS"]}}
        async with s.post(proxy.url + "/v1/chat/completions", headers=AUTH, json=body) as r:
            assert r.status == 200
        sent = upstream.requests[-1].json["messages"][0]["content"]
        assert "<IP_ADDRESS>" in sent and EMAIL in sent
        FakeTeam.metadata = {"pii": {"entities": []}}  # off for this team
        async with s.post(proxy.url + "/v1/chat/completions", headers=AUTH, json=body) as r:
            assert r.status == 200
        assert upstream.requests[-1].json["messages"][0]["content"] == PROMPT
        FakeTeam.metadata = {"other": 1}  # no pii key: the configured policy
        async with s.post(proxy.url + "/v1/chat/completions", headers=AUTH, json=body) as r:
            assert r.status == 200
        assert_masked(upstream.requests[-1])


async def test_invalid_team_policy_falls_back_to_configured(upstream, make_proxy, capfd):
    config = openai_config(upstream, middlewares=["team", {"pii": {"mode": "block"}}])
    proxy = await make_proxy(config, pii_registry(team=FakeTeam))
    FakeTeam.metadata = {"pii": {"mode": "blok"}}
    async with aiohttp.ClientSession() as s:
        async with s.post(proxy.url + "/v1/chat/completions", headers=AUTH, json={
                "model": "gpt-test", "messages": [{"role": "user", "content": PROMPT}]}) as r:
            assert r.status == 400
    flush_logs()
    out, err = capfd.readouterr()
    assert "pii_team_policy_invalid" in out + err


async def test_policy_cache_by_identity_and_value():
    pii = PII(None, None)
    meta = {"pii": {"mode": "redact"}}
    ctx = SimpleNamespace(principal=SimpleNamespace(team=SimpleNamespace(metadata=meta)))
    first = pii.policy_for(ctx)
    assert first.mode == "redact" and pii.policy_for(ctx) is first
    ctx2 = SimpleNamespace(principal=SimpleNamespace(team=SimpleNamespace(metadata={"pii": {"mode": "redact"}})))
    assert pii.policy_for(ctx2) is first  # equal value, another dict: same policy
    assert pii.policy_for(SimpleNamespace(principal=None)) is pii.default


# --- config -----------------------------------------------------------------------------


@pytest.mark.parametrize("options,fragment", [
    ({"mode": "mangle"}, "middlewares[0].pii.mode"),
    ({"entities": ["NAME"]}, "unknown entity 'NAME'"),
    ({"entitys": ["EMAIL_ADDRESS"]}, "did you mean 'entities'"),
    ({"presidio": {"on_error": "builtin"}}, "presidio.analyzer_url: required"),
    ({"presidio": {"analyzer_url": "http://x", "timeout": 0}}, "presidio.timeout: must be > 0"),
    ({"presidio": {"analyzer_url": "ftp://x"}}, "expected an http(s) URL"),
])
def test_bad_options_fail_at_start_naming_the_path(upstream, options, fragment):
    config = parse_config(openai_config(upstream, middlewares=[{"pii": options}]))
    with pytest.raises(ConfigError) as info:
        Gateway(config, pii_registry())
    assert fragment in str(info.value)


def test_presidio_allows_its_own_entity_names(upstream):
    config = parse_config(openai_config(upstream, middlewares=[{"pii": {
        "entities": ["PERSON", "EMAIL_ADDRESS"], "presidio": {"analyzer_url": "http://127.0.0.1:1"}}}]))
    Gateway(config, pii_registry())


# --- Presidio -----------------------------------------------------------------------------


class FakeAnalyzer:
    """A local Presidio analyzer: `POST /analyze` as Presidio documents it; finds emails
    (and PERSON "Jane") by regex, records the requests; `mode` fail/slow/garbage breaks it."""

    def __init__(self) -> None:
        self.requests: list[dict] = []
        self.mode = "ok"
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> "FakeAnalyzer":
        app = web.Application()
        app.router.add_post("/analyze", self.analyze)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
        return self

    async def analyze(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append(body)
        if self.mode == "fail":
            return web.json_response({"error": "boom"}, status=500)
        if self.mode == "slow":
            await asyncio.sleep(5)
        if self.mode == "garbage":
            return web.Response(body=b"<html>", content_type="text/html")
        text = body["text"]
        if self.mode == "bridge" and "\n\n" in text:  # a result across the texts joined
            cut = text.index("\n\n")
            return web.json_response([{"entity_type": "PERSON", "start": cut - 2, "end": cut + 4, "score": 0.9}])
        results = [{"entity_type": "EMAIL_ADDRESS", "start": m.start(), "end": m.end(), "score": 1.0,
                    "analysis_explanation": None, "recognition_metadata": {"recognizer_name": "EmailRecognizer"}}
                   for m in re.finditer(r"\S+@\S+\.\w+", text)]
        # an overlapping lower-score result, as Presidio's recognizers may give
        results += [{"entity_type": "URL", "start": m.start() + 5, "end": m.end(), "score": 0.6}
                    for m in re.finditer(r"\S+@\S+\.\w+", text)]
        results += [{"entity_type": "PERSON", "start": m.start(), "end": m.end(), "score": 0.85}
                    for m in re.finditer(r"\bJane\b", text)]
        results += [{"entity_type": "PERSON", "start": m.start(), "end": m.end(), "score": 0.2}
                    for m in re.finditer(r"\bCc\b", text)]  # under the threshold
        return web.json_response(results)

    async def close(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


@pytest.fixture
async def analyzer():
    fake = await FakeAnalyzer().start()
    yield fake
    await fake.close()


async def test_presidio_spans_masked_by_us(upstream, make_proxy, analyzer):
    proxy = await pii_proxy(make_proxy, upstream, entities=["EMAIL_ADDRESS", "PERSON", "URL"],
                            presidio={"analyzer_url": analyzer.url, "score_threshold": 0.5})
    upstream.push(echo(1))
    text = f"Jane wrote from {EMAIL}. Cc someone."
    stream = await oai(proxy).chat.completions.create(
        model="gpt-test", stream=True, messages=[{"role": "system", "content": "Be brief."},
                                                 {"role": "user", "content": text}])
    assert "".join([c.choices[0].delta.content or "" async for c in stream if c.choices]) == text
    assert upstream.requests[-1].json["messages"][1]["content"] == \
        "<PERSON_1> wrote from <EMAIL_ADDRESS_1>. Cc someone."
    assert [r["text"] for r in analyzer.requests] == ["Be brief.\n\n" + text]  # one call per request
    first = analyzer.requests[0]
    assert first["language"] == "en" and first["score_threshold"] == 0.5
    assert first["entities"] == ["EMAIL_ADDRESS", "PERSON", "URL"]


async def test_presidio_texts_batched_and_mapped_back(upstream, make_proxy, analyzer, monkeypatch):
    from llmproxy.middlewares.pii import presidio

    monkeypatch.setattr(presidio, "_BATCH_CHARS", 60)  # at most 60 characters per call
    proxy = await pii_proxy(make_proxy, upstream, presidio={"analyzer_url": analyzer.url})
    upstream.push(echo(None))
    texts = [f"mail {i}: user{i}@example.com please" for i in range(5)]  # 31-32 characters each
    await oai(proxy).chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": t} for t in texts])
    sent = [m["content"] for m in upstream.requests[-1].json["messages"]]
    assert sent == [f"mail {i}: <EMAIL_ADDRESS_{i + 1}> please" for i in range(5)]
    assert [r["text"].count("\n\n") + 1 for r in analyzer.requests] == [1, 1, 1, 1, 1]  # 2 × 31 + 2 > 60
    monkeypatch.setattr(presidio, "_BATCH_CHARS", 70)
    analyzer.requests.clear()
    upstream.push(echo(None))
    await oai(proxy).chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": t} for t in texts])
    assert sorted(r["text"].count("\n\n") + 1 for r in analyzer.requests) == [1, 2, 2]
    assert [m["content"] for m in upstream.requests[-1].json["messages"]] == sent


async def test_presidio_result_across_texts_asks_each_alone(upstream, make_proxy, analyzer):
    proxy = await pii_proxy(make_proxy, upstream, entities=["EMAIL_ADDRESS", "PERSON"],
                            presidio={"analyzer_url": analyzer.url})
    analyzer.mode = "bridge"
    upstream.push(echo(None))
    await oai(proxy).chat.completions.create(model="gpt-test", messages=[
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": f"Jane: {EMAIL}"}])
    assert [r["text"] for r in analyzer.requests] == ["Be brief.\n\n" + f"Jane: {EMAIL}", "Be brief.",
                                                      f"Jane: {EMAIL}"]
    sent = [m["content"] for m in upstream.requests[-1].json["messages"]]
    assert sent == ["Be brief.", "<PERSON_1>: <EMAIL_ADDRESS_1>"]


@pytest.mark.parametrize("mode", ["fail", "slow", "garbage", "down"])
async def test_presidio_failure_fails_closed(upstream, make_proxy, analyzer, mode, capfd):
    url = analyzer.url
    if mode == "down":
        await analyzer.close()
    analyzer.mode = mode
    proxy = await pii_proxy(make_proxy, upstream, presidio={"analyzer_url": url, "timeout": 0.3})
    async with aiohttp.ClientSession() as s:
        for _ in range(2):
            async with s.post(proxy.url + "/v1/chat/completions", headers=AUTH, json={
                    "model": "gpt-test", "messages": [{"role": "user", "content": PROMPT}]}) as r:
                assert r.status == 503
                error = (await r.json())["error"]
        async with s.post(proxy.url + "/v1/messages", headers=AUTH, json={
                "model": "claude-test", "max_tokens": 5, "messages": [{"role": "user", "content": PROMPT}]}) as r:
            assert r.status == 503 and (await r.json())["error"]["type"] == "api_error"
    assert (error["type"], error["code"]) == ("api_error", "pii_analyzer_unavailable")
    assert not upstream.requests
    flush_logs()
    out, err = capfd.readouterr()
    assert (out + err).count("pii_analyzer_failed") == 1  # logged once per outage
    for value in ORIGINALS:
        assert value not in out + err


async def test_presidio_failure_falls_back_to_builtin(upstream, make_proxy, analyzer, capfd):
    analyzer.mode = "fail"
    proxy = await pii_proxy(make_proxy, upstream, presidio={"analyzer_url": analyzer.url, "on_error": "builtin"})
    pii = proxy.gateway.middlewares[0]
    client = oai(proxy)
    for _ in range(3):
        upstream.push(echo())
        resp = await client.chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": PROMPT}])
        assert resp.choices[0].message.content == PROMPT
        assert_masked(upstream.requests[-1])
    assert pii.default.presidio._failing
    flush_logs()
    out, err = capfd.readouterr()
    assert (out + err).count("pii_analyzer_failed") == 1  # logged once per outage
    analyzer.mode = "ok"
    upstream.push(echo())
    await client.chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": PROMPT}])
    assert not pii.default.presidio._failing
    flush_logs()
    assert "pii_analyzer_recovered" in "".join(capfd.readouterr())


# --- nothing leaks; metrics ---------------------------------------------------------------


async def test_nothing_of_the_prompt_in_logs_or_records(upstream, make_proxy, capfd):
    config = pii_config(upstream)
    config["server"] = {"access_log": True}
    proxy = await make_proxy(config, pii_registry())
    client = oai(proxy)
    upstream.push(echo(1), echo())
    stream = await client.chat.completions.create(model="gpt-test", stream=True,
                                                  messages=[{"role": "user", "content": PROMPT}])
    assert "".join([c.choices[0].delta.content or "" async for c in stream if c.choices]) == PROMPT
    await client.chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": PROMPT}])
    blocked = await make_proxy(pii_config(upstream, mode="block"), pii_registry())
    with pytest.raises(openai.BadRequestError) as info:
        await oai(blocked).chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": PROMPT}])
    assert info.value.code == "pii_blocked"
    flush_logs()  # the access log writes in batches
    out, err = capfd.readouterr()
    for value in ORIGINALS:
        assert value not in out and value not in err
    for record in proxy.records + blocked.records:
        assert not any(value in repr(record) for value in ORIGINALS)


async def metric_lines(proxy, name: str) -> dict[str, float]:
    """The samples of metric `name` on the proxy's /metrics, by their label text."""
    async with aiohttp.ClientSession() as s:
        async with s.get(proxy.url + "/metrics") as r:
            text = await r.text()
    return {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines() if line.startswith(name)}


async def test_metrics_count_each_entity(upstream, make_proxy):
    proxy = await pii_proxy(make_proxy, upstream)
    upstream.push(echo())
    await oai(proxy).chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": PROMPT}])
    found = await metric_lines(proxy, "llmproxy_pii_redactions_total")
    assert found == {'llmproxy_pii_redactions_total{entity="EMAIL_ADDRESS"}': 2.0,
                     'llmproxy_pii_redactions_total{entity="US_SSN"}': 1.0,
                     'llmproxy_pii_redactions_total{entity="IP_ADDRESS"}': 1.0}


async def test_json_answer_cut_short_is_a_clean_502(upstream, make_proxy):
    proxy = await pii_proxy(make_proxy, upstream)

    async def cut(request: web.Request, got: Received) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "application/json", "Content-Length": "500"})
        await resp.prepare(request)
        await resp.write(b'{"choices": [{"index": 0, "message": {"content": "<EMAIL_')
        assert request.transport is not None
        request.transport.close()
        return resp

    upstream.push(cut)
    async with aiohttp.ClientSession() as s:
        async with s.post(proxy.url + "/v1/chat/completions", headers=AUTH, json={
                "model": "gpt-test", "messages": [{"role": "user", "content": PROMPT}]}) as r:
            assert r.status == 502
            error = (await r.json())["error"]
    assert (error["type"], error["code"]) == ("api_error", "upstream_error")
    assert proxy.records[-1].status == 502


# --- the span cache: a conversation's history is analysed once -------------------------------

HISTORY = (PROMPT + " ") * 6  # 400+ characters: long enough to be remembered


async def test_history_is_analysed_once_and_still_masked(upstream, make_proxy, monkeypatch):
    from llmproxy.middlewares.pii.recognizers import Recognizers

    analysed: list[str] = []
    real = Recognizers.analyze

    def spy(self, text):
        analysed.append(text)
        return real(self, text)

    monkeypatch.setattr(Recognizers, "analyze", spy)
    proxy = await pii_proxy(make_proxy, upstream)
    client = oai(proxy)
    for turn in range(3):
        upstream.push(echo(None))
        question = f"Turn {turn}: and what about {IP}?"
        answer = await client.chat.completions.create(model="gpt-test", messages=[
            {"role": "user", "content": HISTORY}, {"role": "assistant", "content": "Noted."},
            {"role": "user", "content": question}])
        assert answer.choices[0].message.content == question  # restored
        sent = upstream.requests[-1].json["messages"]
        assert EMAIL not in sent[0]["content"] and "<EMAIL_ADDRESS_1>" in sent[0]["content"]
        assert sent[2]["content"] == f"Turn {turn}: and what about <IP_ADDRESS_1>?"  # same value, same placeholder
    assert analysed.count(HISTORY) == 1  # then from the cache
    assert sum(t.startswith("Turn") for t in analysed) == 3  # short texts: every time
    lookups = await metric_lines(proxy, "llmproxy_pii_cache_lookups_total")
    assert lookups == {'llmproxy_pii_cache_lookups_total{result="hit"}': 2.0,
                       'llmproxy_pii_cache_lookups_total{result="miss"}': 1.0}


async def test_cache_is_per_entity_set_and_can_be_off(upstream, make_proxy):
    config = openai_config(upstream, middlewares=["team", {"pii": {"mode": "mask"}}])
    proxy = await make_proxy(config, pii_registry(team=FakeTeam))
    body = {"model": "gpt-test", "messages": [{"role": "user", "content": HISTORY},
                                              {"role": "user", "content": "Next?"}]}
    async with aiohttp.ClientSession() as s:
        for metadata in ({}, {"pii": {"entities": ["IP_ADDRESS"]}}, {}):
            FakeTeam.metadata = metadata
            async with s.post(proxy.url + "/v1/chat/completions", headers=AUTH, json=body) as r:
                assert r.status == 200
            sent = upstream.requests[-1].json["messages"][0]["content"]
            assert IP not in sent
            assert (EMAIL in sent) == bool(metadata)  # the IP-only team's result is its own
    assert len(proxy.gateway.middlewares[1].cache.table) == 2
    off = await pii_proxy(make_proxy, upstream, cache_size=0)
    assert off.gateway.middlewares[0].cache is None
    upstream.push(echo(None))
    await oai(off).chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": HISTORY}])
    assert EMAIL not in upstream.requests[-1].json["messages"][0]["content"]
    assert await metric_lines(off, "llmproxy_pii_cache_lookups_total") == {}


def test_span_cache_holds_no_text_and_stays_bounded():
    from llmproxy.middlewares.pii.cache import SpanCache
    from llmproxy.middlewares.pii.recognizers import Recognizers

    rec = Recognizers()
    cache = SpanCache(size=2, min_chars=10)
    texts = [f"{i}: write to {EMAIL} today" for i in range(3)]
    newest = f"and now to {EMAIL}, please"
    first = cache.analyze([*texts, newest], rec)
    assert [[text[s.start:s.end] for s in spans] for text, spans in zip([*texts, newest], first)] == [[EMAIL]] * 4
    assert len(cache.table) == 2 and (cache.hits, cache.misses) == (0, 3)  # the newest is not looked up
    assert cache.analyze([texts[2], newest], rec) == [first[2], first[3]] and cache.hits == 1
    assert cache.analyze([texts[0], newest], rec) == [first[0], first[3]] and cache.misses == 4  # the oldest went
    for key, packed in cache.table.items():
        assert isinstance(key, bytes) and len(key) == 4 + 16 and isinstance(packed, bytes)
        assert EMAIL.encode() not in key + packed
    assert cache.analyze(["short", newest], rec) == [[], first[3]] and cache.misses == 4  # short: not kept


async def test_presidio_history_sent_once_and_fallback_answers_not_kept(upstream, make_proxy, analyzer):
    proxy = await pii_proxy(make_proxy, upstream, presidio={"analyzer_url": analyzer.url, "on_error": "builtin"})
    client = oai(proxy)

    async def turn(n: int) -> list[str]:
        analyzer.requests.clear()
        upstream.push(echo(None))
        await client.chat.completions.create(model="gpt-test", messages=[
            {"role": "user", "content": HISTORY}, {"role": "user", "content": f"Turn {n}: reply to {EMAIL}"}])
        sent = upstream.requests[-1].json["messages"]
        assert EMAIL not in sent[0]["content"] and sent[1]["content"] == f"Turn {n}: reply to <EMAIL_ADDRESS_1>"
        return [r["text"] for r in analyzer.requests]

    analyzer.mode = "fail"
    assert await turn(0) == ["\n\n".join([HISTORY, "Turn 0: reply to " + EMAIL])]  # failed: the fallback masked
    analyzer.mode = "ok"
    assert await turn(1) == ["\n\n".join([HISTORY, "Turn 1: reply to " + EMAIL])]  # the fallback's was not kept
    assert await turn(2) == ["Turn 2: reply to " + EMAIL]  # the history's answer was


# --- large requests are analysed off the event loop (issue 12) ---------------------------


async def test_a_large_request_is_analysed_in_a_thread_with_the_same_result(upstream, make_proxy, monkeypatch):
    import threading

    from llmproxy.middlewares import pii as pii_module
    from llmproxy.middlewares.pii.recognizers import Recognizers

    threads: list[int] = []
    real = Recognizers.analyze

    def recording(self, text):
        threads.append(threading.get_ident())
        return real(self, text)
    monkeypatch.setattr(Recognizers, "analyze", recording)
    proxy = await pii_proxy(make_proxy, upstream)
    loop_thread = threading.get_ident()  # the test's loop is the proxy's
    filler = "lorem ipsum dolor sit amet " * (pii_module.OFF_LOOP_CHARS // 27 + 1)
    history = [{"role": "user", "content": f"{filler} {EMAIL}"}, {"role": "assistant", "content": "noted"}]
    for turn in range(2):
        upstream.push(echo())
        threads.clear()
        resp = await oai(proxy).chat.completions.create(
            model="gpt-test", messages=[*history, {"role": "user", "content": PROMPT}])
        assert resp.choices[0].message.content == PROMPT  # restored as on the loop
        assert_masked(upstream.requests[-1])
        sent = upstream.requests[-1].json["messages"]
        assert sent[0]["content"].endswith(" <EMAIL_ADDRESS_1>") and EMAIL not in sent[0]["content"]
        assert threads and loop_thread not in threads
        # turn 2: the big history text is a cache hit, so only the new texts are analysed
        assert len(threads) == (3 if turn == 0 else 2)

    threads.clear()
    upstream.push(echo())
    await oai(proxy).chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": PROMPT}])
    assert threads == [loop_thread]  # a small request stays on the loop: no thread hop
