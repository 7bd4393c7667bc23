"""The `cache` middleware's pieces on their own: the controls, what samples, whose answer it
is, the stream <-> JSON conversions, the usage chunk, entries and the LRU; every step linear
in the size of its input (measured at n and 16n in one process: a ratio, never seconds); big
values hashed off the loop; the gateway without the cache package (the layout rule)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest

pytest.importorskip("llmproxy.middlewares.cache", reason="the cache middleware is not installed")
from llmproxy.middlewares.cache import Cache
from llmproxy.middlewares.cache.capture import Capture, tap
from llmproxy.middlewares.cache import key as cache_key
from llmproxy.middlewares.cache.convert import (json_to_sse, openai_stream_for, sse_to_json,
                                                usage_chunk_span)
from llmproxy.middlewares.cache.key import Controls, canonical, nondeterministic, take_controls, tenant
from llmproxy.middlewares.cache.store import ENTRY_OVERHEAD, Entry, LocalStore
from llmproxy.errors import ProxyError
from llmproxy.testing import TestPrincipal, anthropic_events, growth, make_context, openai_events

from . import test_layout
from .test_layout import BLOCKED_START, ROOT, imports, module_package

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": 0}


# --- controls, sampling, tenants -------------------------------------------------------------


@pytest.mark.parametrize("header, field, expected", [
    (None, None, Controls()),
    ("no-cache", None, Controls(lookup=False)),
    ("No-Store, max-age=30", None, Controls(store=False, max_age=30.0)),
    ("max-age=abc, no-cache", None, Controls(lookup=False)),  # a bad max-age is ignored, as HTTP caches do
    ("private", None, Controls()),
    (None, {"no-cache": True, "no-store": True}, Controls(lookup=False, store=False)),
    (None, {"ttl": 5, "s-maxage": 10, "namespace": "n"}, Controls(max_age=10.0, ttl=5.0, namespace="n")),
    ("max-age=60", {"s-maxage": 10}, Controls(max_age=10.0)),  # the stricter one
    (None, {"unknown": 1}, Controls()),
])
def test_controls(header, field, expected):
    body = {**CHAT, **({"cache": field} if field is not None else {})}
    ctx = make_context(body, headers={"Cache-Control": header} if header else None)
    assert take_controls(ctx) == expected
    assert "cache" not in ctx.body


@pytest.mark.parametrize("field", ["x", [], {"ttl": True}, {"ttl": float("nan")}, {"no-store": 1},
                                   {"namespace": "x" * 257}])
def test_bad_cache_fields_are_400(field):
    with pytest.raises(ProxyError) as info:
        take_controls(make_context({**CHAT, "cache": field}))
    assert info.value.status == 400 and info.value.param.startswith("cache")


@pytest.mark.parametrize("body, api, samples", [
    ({"temperature": 0}, "chat", False),
    ({"temperature": 0.0, "n": 1}, "chat", False),
    ({}, "messages", False),
    ({"temperature": 0.2}, "chat", True),
    ({"temperature": 1}, "messages", True),
    ({"n": 3, "temperature": 0}, "completions", True),
    ({"temperature": 2}, "embeddings", False),
])
def test_what_samples(body, api, samples):
    assert nondeterministic(body, api) is samples


@pytest.mark.parametrize("principal, scope, expected", [
    (TestPrincipal(key_id="k1", team_id="T"), "team", "t:T"),
    (TestPrincipal(key_id="k1", team_id=None), "team", "k:k1"),  # a key without a team: a tenant of its own
    (TestPrincipal(key_id="k1", team_id="T"), "key", "k:k1"),
    (TestPrincipal(key_id=None, is_master=True), "team", "master"),
    (TestPrincipal(key_id="k1", team_id="T"), "global", "*"),
    (None, "team", "-"),
])
def test_whose_answer_it_is(principal, scope, expected):
    ctx = make_context(CHAT)
    ctx.principal = principal
    assert tenant(ctx, scope) == expected


def test_the_canonical_form_ignores_key_order_and_delivery_fields():
    a = make_context({"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": 0})
    b = make_context({"temperature": 0, "stream": True, "user": "u", "metadata": {"a": 1},
                      "messages": [{"content": "x", "role": "user"}], "model": "m"})
    assert canonical(a, "team", "") == canonical(b, "team", "")
    assert canonical(a, "team", "") != canonical(a, "team", "ns")
    c = make_context(dict(a.body), api="completions")
    assert canonical(a, "team", "") != canonical(c, "team", "")


async def test_a_big_request_is_hashed_in_a_thread(monkeypatch):
    threads: list[Any] = []
    real = asyncio.to_thread

    async def spy(fn, *args):
        threads.append(fn)
        return await real(fn, *args)

    monkeypatch.setattr(cache_key.asyncio, "to_thread", spy)
    small = await cache_key.request_key(make_context(CHAT), "team", "")
    assert threads == []
    big_body = {**CHAT, "messages": [{"role": "user", "content": "x" * (300 * 1024)}]}
    big = await cache_key.request_key(make_context(big_body), "team", "")
    assert len(threads) == 1 and len(big) == len(small) == 32 and big != small


# --- conversions -----------------------------------------------------------------------------

CHAT_ANSWER = {
    "id": "chatcmpl-1", "object": "chat.completion", "created": 7, "model": "gpt",
    "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "Sure: <b>ok</b> \u00e9\u4e2d",
                                 "refusal": None}, "logprobs": None, "finish_reason": "stop"},
        {"index": 1, "message": {"role": "assistant", "content": None, "refusal": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"a": [1, "}"]}'}},
            {"id": "c2", "type": "function", "function": {"name": "g", "arguments": "{}"}}]},
         "logprobs": None, "finish_reason": "tool_calls"}],
    "usage": {"prompt_tokens": 5, "completion_tokens": 9, "total_tokens": 14,
              "prompt_tokens_details": {"cached_tokens": 2}},
    "system_fingerprint": "fp_1",
}
COMPLETION_ANSWER = {
    "id": "cmpl-1", "object": "text_completion", "created": 7, "model": "gpt",
    "choices": [{"text": "once upon", "index": 0, "logprobs": None, "finish_reason": "length"}],
    "usage": {"prompt_tokens": 2, "completion_tokens": 2, "total_tokens": 4},
}
MESSAGE_ANSWER = {
    "id": "msg_1", "type": "message", "role": "assistant", "model": "claude",
    "content": [{"type": "thinking", "thinking": "let me see", "signature": "sig=="},
                {"type": "redacted_thinking", "data": "opaque"},
                {"type": "text", "text": "Calling \"f\"\n"},
                {"type": "tool_use", "id": "tu_1", "name": "f", "input": {"q": "x", "n": [1, 2]}}],
    "stop_reason": "tool_use", "stop_sequence": None,
    "usage": {"input_tokens": 12, "output_tokens": 30, "cache_read_input_tokens": 4},
}


@pytest.mark.parametrize("api, answer", [("chat", CHAT_ANSWER), ("completions", COMPLETION_ANSWER),
                                         ("messages", MESSAGE_ANSWER)])
@pytest.mark.parametrize("wants_usage", [False, True])
def test_a_json_answer_written_as_a_stream_reads_back_the_same(api, answer, wants_usage):
    stream = json_to_sse(api, orjson.dumps(answer), wants_usage)
    if api != "messages":
        assert stream.endswith(b"data: [DONE]\n\n")
        assert (b'"choices":[],"usage":{' in stream) is wants_usage
    else:
        assert stream.endswith(b'event: message_stop\ndata: {"type":"message_stop"}\n\n')
    counts = (1, 2, 0, 0, 0)  # what the entry says it used: the usage of a stream that has none
    expected = answer if wants_usage or api == "messages" else {
        **answer, "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}}
    assert orjson.loads(sse_to_json(api, stream, counts)) == expected


def test_a_stream_assembles_into_its_answer():
    events = openai_events("gpt", ["Hel", "lo"], True, {"prompt_tokens": 3, "completion_tokens": 2,
                                                        "total_tokens": 5})
    answer = orjson.loads(sse_to_json("chat", b"".join(events), (9, 9, 0, 0, 0)))
    assert answer["choices"] == [{"index": 0, "message": {"role": "assistant", "content": "Hello", "refusal": None},
                                  "logprobs": None, "finish_reason": "stop"}]
    assert answer["usage"]["total_tokens"] == 5  # the stream's own usage
    without = b"".join(openai_events("gpt", ["a"], False))
    assert orjson.loads(sse_to_json("chat", without, (9, 4, 1, 0, 2)))["usage"] == {
        "prompt_tokens": 9, "completion_tokens": 4, "total_tokens": 13,
        "prompt_tokens_details": {"cached_tokens": 1}, "completion_tokens_details": {"reasoning_tokens": 2}}
    message = orjson.loads(sse_to_json("messages", b"".join(anthropic_events("c", ["a", "b"], 4)), (0,) * 5))
    assert message["content"] == [{"type": "text", "text": "ab"}] and message["usage"] == {
        "input_tokens": 4, "output_tokens": 2}


@pytest.mark.parametrize("api, body", [
    ("chat", b'data: {"error": {"message": "x"}}\n\n'),
    ("chat", b"data: not json\n\n"),
    ("messages", b"".join(anthropic_events("c", ["a"])[:-1])),  # no message_stop
    ("messages", b'event: error\ndata: {"type": "error"}\n\n'),
    ("embeddings", b"data: {}\n\n"),
])
def test_what_cannot_be_assembled_raises_value_error(api, body):
    with pytest.raises(ValueError):
        sse_to_json(api, body, (0,) * 5)


def test_the_usage_chunk_is_left_out_or_written_as_each_client_asks():
    usage = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    asked = b"".join(openai_events("gpt", ["a", "b"], True, usage))
    span = usage_chunk_span(asked)
    assert span is not None and asked[span[0]:span[1]].startswith(b'data: {"id"') and b'"choices":[]' in \
        asked[span[0]:span[1]]
    assert openai_stream_for(asked, span, (3, 2, 0, 0, 0), True) == asked
    left_out = openai_stream_for(asked, span, (3, 2, 0, 0, 0), False)
    assert usage_chunk_span(left_out) is None and left_out.endswith(b"data: [DONE]\n\n")

    plain = b"".join(openai_events("gpt", ["a", "b"], False))
    assert usage_chunk_span(plain) is None and openai_stream_for(plain, None, (3, 2, 0, 0, 0), False) == plain
    written = openai_stream_for(plain, None, (3, 2, 0, 0, 0), True)
    assert written.startswith(plain[:-len(b"data: [DONE]\n\n")]) and written.endswith(b"data: [DONE]\n\n")
    chunk = written[len(plain) - len(b"data: [DONE]\n\n"):-len(b"data: [DONE]\n\n")]
    assert orjson.loads(chunk[6:]) == {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 1,
                                       "model": "gpt", "choices": [], "usage": usage}


# --- entries and the LRU ---------------------------------------------------------------------


def entry(body: bytes = b"{}", at: float = 100.0, ttl: float = 10.0, **kw: Any) -> Entry:
    return Entry("json", body, "application/json", at, at + ttl, **kw)


def test_an_entry_survives_serialization_and_garbage_is_a_miss():
    e = Entry("sse", b"data: x\n\n" * 3, "text/event-stream", 1.5, 9.5, (1, 2, 3, 4, 5), (3, 9))
    assert Entry.loads(e.dumps()) == e
    for garbage in (b"", b"no newline", b"[1]\nbody", b'[2,"sse","t",1,2,[0,0,0,0,0],null]\nx',
                    b'[1,"html","t",1,2,[0,0,0,0,0],null]\nx', b"\xff\n"):
        assert Entry.loads(garbage) is None


def test_the_lru_is_bounded_in_bytes_and_drops_the_least_recently_used():
    size = 1000 + ENTRY_OVERHEAD
    store = LocalStore(max_bytes=3 * size)
    for k in (b"a", b"b", b"c"):
        store.put(k, entry(b"x" * 1000))
    assert store.get(b"a", 101.0) is not None  # a is now the most recently used
    store.put(b"d", entry(b"x" * 1000))
    assert sorted(store.entries) == [b"a", b"c", b"d"] and store.bytes == 3 * size
    store.put(b"huge", entry(b"x" * (4 * size)))  # larger than the whole store: not kept, nothing evicted
    assert len(store) == 3
    store.put(b"a", entry(b"y" * 10))  # replaced, the bytes follow
    assert store.bytes == 2 * size + 10 + ENTRY_OVERHEAD
    assert store.get(b"c", 109.0, max_age=5) is None and b"c" in store.entries  # too old for this client only
    assert store.get(b"c", 111.0) is None and b"c" not in store.entries  # expired: dropped


# --- linear growth ---------------------------------------------------------------------------




def _chat_body(n: int) -> Any:
    ctx = make_context({**CHAT, "messages": [{"role": "user", "content": f"message {i} " * 5} for i in range(n)]})
    return ctx


def _openai_stream(n: int) -> bytes:
    return b"".join(openai_events("gpt", [f"piece {i} " for i in range(n)], True))


def _anthropic_stream(n: int) -> bytes:
    return b"".join(anthropic_events("c", [f"piece {i} " for i in range(n)]))


def _answer(n: int) -> bytes:
    return orjson.dumps({**CHAT_ANSWER, "choices": [{**CHAT_ANSWER["choices"][0], "message": {
        "role": "assistant", "content": "word " * (20 * n), "refusal": None}}]})


def _fill(n: int) -> LocalStore:
    store = LocalStore(max_bytes=(n // 2) * (10 + ENTRY_OVERHEAD))  # every later put evicts one
    return store


def _puts(n: int) -> tuple[LocalStore, list[bytes]]:
    return _fill(n), [i.to_bytes(8, "big") for i in range(n)]


def _put_all(arg: tuple[LocalStore, list[bytes]]) -> None:
    store, keys = arg
    e = entry(b"x" * 10)
    for k in keys:
        store.put(k, e)


async def _drain(tap: Any) -> None:
    async for _ in tap:
        pass


def _tapped(n: int) -> Any:
    return [b"data: " + b"x" * 100 + b"\n\n"] * n


def _run_tap(chunks: list[bytes]) -> None:
    async def body():
        for c in chunks:
            yield c
    cache = Cache(None, None)
    capture = Capture(cache, make_context(CHAT), b"k", Controls(), None)
    asyncio.run(_drain(tap(body(), capture)))
    assert capture.complete and capture.parts is not None


@pytest.mark.parametrize("what, make, run, n", [
    ("the key", _chat_body, lambda ctx: canonical(ctx, "team", ""), 200),
    ("an OpenAI stream assembled", _openai_stream, lambda b: sse_to_json("chat", b, (0,) * 5), 200),
    ("an Anthropic stream assembled", _anthropic_stream, lambda b: sse_to_json("messages", b, (0,) * 5), 200),
    ("an answer written as a stream", _answer, lambda b: json_to_sse("chat", b, True), 200),
    ("the usage chunk found", _openai_stream, usage_chunk_span, 200),
    ("the usage chunk written", lambda n: b"".join(openai_events("gpt", ["p"] * n, False)),
     lambda b: openai_stream_for(b, None, (1, 2, 0, 0, 0), True), 200),
    ("puts that evict", _puts, _put_all, 2000),
])
def test_every_step_is_linear_in_its_input(what, make, run, n):
    ratio = min(growth(make, run, n) for _ in range(2))
    assert ratio < 40, f"{what}: 16x the input took {ratio:.1f}x the time"  # linear ~16x; quadratic ~256x


def test_copying_a_stream_for_the_cache_is_linear():
    ratio = min(growth(_tapped, _run_tap, 500) for _ in range(3))  # the least disturbed of three runs
    assert ratio < 40, ratio


# --- layout ----------------------------------------------------------------------------------


def test_the_cache_package_imports_only_the_core_and_itself():
    own = "llmproxy.middlewares.cache"
    offenders = [f"{path.relative_to(ROOT)} imports {name}"
                 for path in sorted((ROOT / "middlewares" / "cache").rglob("*.py"))
                 for name in imports(path, module_package(path))
                 if name.startswith("llmproxy.middlewares.") and not (name == own or name.startswith(own + "."))]
    assert offenders == []


def test_the_gateway_starts_and_serves_without_the_cache_package(tmp_path: Path):
    others = tuple(n for n in test_layout.BUILTIN if n != "cache")
    at = others.index("scheduler") if "scheduler" in others else len(others)  # SPEC §3's order
    code = BLOCKED_START.format(name="cache", builtin=others[:at] + ("cache",) + others[at:],
                                needs=getattr(test_layout, "NEEDS", {}))
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "db.sqlite")], capture_output=True,
                          text=True, timeout=60, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "served" in done.stdout and "'cache'" not in done.stdout.split("served")[-1]
