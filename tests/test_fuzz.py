"""Nothing a client sends produces a 500 (SPEC §2), and every 4xx is JSON in its path's shape.

Hypothesis drives sync tests; the proxy (one per test function) lives on a background event
loop thread, so pytest-asyncio's own loop is not involved and `@given` works as usual.
"""

from __future__ import annotations

import asyncio
import json
import threading
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp.test_utils import TestServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmproxy.config import parse_config
from llmproxy.server import Gateway
from llmproxy.testing import FakeUpstream

MOCK_CONFIG = {"models": [{"name": "mock", "deployments": [{"provider": "mock"}]}]}

POST_PATHS = ["/v1/chat/completions", "/chat/completions", "/v1/completions", "/completions",
              "/v1/embeddings", "/embeddings", "/v1/messages", "/messages"]
GET_PATHS = ["/v1/models", "/models"]

def fuzz(max_examples: int) -> settings:
    # database=None: no .hypothesis/ directory in the tree; failures print their reproduction blob.
    return settings(deadline=None, database=None, max_examples=max_examples, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much])


# --- a proxy on a background loop -----------------------------------------------------------


class BackgroundLoop:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="fuzz-loop", daemon=True)
        self.thread.start()

    def run(self, coro, timeout: float = 60) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


class _Sink:
    def __init__(self, records: list) -> None:
        self.records = records

    def emit(self, record: Any) -> None:
        self.records.append(record)


class LiveProxy:
    """A gateway on 127.0.0.1 plus a client session, both owned by the background loop."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self.records: list[Any] = []

    async def start(self) -> "LiveProxy":
        self.gateway = Gateway(parse_config(self.config))
        self.gateway.sinks.append(_Sink(self.records))
        self.server = TestServer(self.gateway.app(), host="127.0.0.1")
        await self.server.start_server()
        self.url = f"http://127.0.0.1:{self.server.port}"
        self.session = aiohttp.ClientSession(auto_decompress=False)
        return self

    async def close(self) -> None:
        await self.session.close()
        await self.server.close()

    async def request(self, method: str, path: str, data: bytes | None = None,
                      headers: dict[str, str] | None = None) -> tuple[int, Any, bytes]:
        async with self.session.request(method, self.url + path, data=data, headers=headers or {}) as r:
            return r.status, r.headers.copy(), await r.read()


@pytest.fixture(scope="module")
def bg():
    loop = BackgroundLoop()
    yield loop
    loop.close()


@pytest.fixture
def proxy(bg):
    p = bg.run(LiveProxy(MOCK_CONFIG).start())
    yield p
    bg.run(p.close())


# --- the checks ---------------------------------------------------------------------------

OPENAI_TYPES = {"invalid_request_error", "authentication_error", "permission_error", "rate_limit_error",
                "insufficient_quota", "api_error"}
ANTHROPIC_TYPES = {"invalid_request_error", "authentication_error", "permission_error", "not_found_error",
                   "request_too_large", "rate_limit_error", "api_error", "overloaded_error"}


def check_answer(method: str, path: str, headers: dict[str, str], status: int, resp_headers: Any, raw: bytes,
                 proxy: LiveProxy | None = None) -> None:
    assert status < 500, (status, raw[:500])
    assert status in (200, 400, 404, 413), (status, raw[:500])
    assert resp_headers.get("x-request-id"), dict(resp_headers)
    lowered = {k.lower() for k in headers}
    anthropic_shape = path.endswith("/messages") or (path.endswith("/models") and "anthropic-version" in lowered)
    if status >= 400:
        assert resp_headers.get("Content-Type", "").startswith("application/json")
        body = orjson.loads(raw)
        if anthropic_shape:
            assert isinstance(body, dict) and set(body) == {"type", "error"}, body
            assert body["type"] == "error"
            err = body["error"]
            assert isinstance(err, dict) and set(err) >= {"type", "message"}, body
            assert err["type"] in ANTHROPIC_TYPES, body
            assert isinstance(err["message"], str) and err["message"]
            if status == 404:
                assert err["type"] == "not_found_error", body
        else:
            assert isinstance(body, dict) and set(body) == {"error"}, body
            err = body["error"]
            assert isinstance(err, dict) and set(err) == {"message", "type", "param", "code"}, body
            assert err["type"] in OPENAI_TYPES, body
            assert isinstance(err["message"], str) and err["message"]
            assert err["param"] is None or isinstance(err["param"], str), body
            assert err["code"] is None or isinstance(err["code"], str), body
            if status == 404:
                assert err["code"] == "model_not_found", body
        return
    # 2xx: a whole JSON answer, or a whole stream in the API's own format.
    ctype = resp_headers.get("Content-Type", "")
    if ctype.startswith("text/event-stream"):
        if path.endswith("/messages"):
            assert raw.startswith(b"event: message_start"), raw[:200]
            assert raw.endswith(b"event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n"), raw[-200:]
            assert b"event: error" not in raw
        else:
            assert raw.endswith(b"data: [DONE]\n\n"), raw[-200:]
            assert b'data: {"error"' not in raw
    else:
        assert ctype.startswith("application/json"), ctype
        body = orjson.loads(raw)
        assert isinstance(body, dict), body
        if path.endswith("/models"):
            assert [m["id"] for m in body["data"]] == ["mock"]
        elif path.endswith("/messages"):
            assert body["type"] == "message"
        elif path.endswith("/embeddings"):
            assert body["object"] == "list"
        else:
            assert body["choices"]


def check_records(proxy: LiveProxy) -> None:
    bad = [(r.path, r.status, r.error_code) for r in proxy.records if r.status >= 500 or r.status == 0]
    assert not bad, bad


# --- strategies -----------------------------------------------------------------------------

KEYS = ["model", "messages", "stream", "stream_options", "include_usage", "max_tokens", "max_completion_tokens",
        "prompt", "input", "system", "role", "content", "type", "text", "name", "tools", "tool_calls",
        "function", "arguments", "input_schema", "dimensions", "image_url", "tool_use_id", "source", "n"]

text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=30)
# Lone surrogates too: JSON can carry them as \ud800 escapes, which a proxy must refuse or survive.
weird_text = st.one_of(text, st.text(max_size=10), st.sampled_from(
    ["<|endoftext|>", "<|im_start|>", "\x00", "mock", "\u202e", "a" * 2000, "🙂" * 50, " "]))
scalars = st.one_of(
    st.none(), st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.integers(),  # big ints: orjson refuses those past 64 bits
    st.floats(allow_nan=True, allow_infinity=True),  # NaN/Infinity serialize as non-JSON tokens
    weird_text,
)
json_values = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(st.one_of(st.sampled_from(KEYS), text), children, max_size=5),
    ),
    max_leaves=20,
)
model = st.one_of(st.just("mock"), st.just("mock"), st.just("mock"), st.sampled_from(["Mock", "mock ", ""]),
                  json_values)
part = st.fixed_dictionaries(
    {"type": st.one_of(st.sampled_from(["text", "image_url", "image", "tool_use", "tool_result", "input_audio"]),
                       json_values)},
    optional={"text": st.one_of(weird_text, json_values), "content": json_values, "input": json_values,
              "name": st.one_of(weird_text, json_values), "image_url": json_values, "source": json_values,
              "tool_use_id": json_values})
content = st.one_of(weird_text, st.lists(part, max_size=3), st.lists(json_values, max_size=2), json_values)
message = st.fixed_dictionaries(
    {"role": st.one_of(st.sampled_from(["user", "assistant", "system", "tool", "developer"]), json_values)},
    optional={"content": content, "name": st.one_of(weird_text, json_values),
              "tool_calls": st.one_of(st.lists(st.fixed_dictionaries(
                  {"id": text, "type": st.just("function"),
                   "function": st.fixed_dictionaries({}, optional={"name": json_values, "arguments": json_values})}),
                  max_size=2), json_values)})
messages = st.one_of(st.lists(message, max_size=4), st.lists(json_values, max_size=3), json_values)
tools = st.one_of(st.lists(st.one_of(
    st.fixed_dictionaries({"type": st.just("function"),
                           "function": st.fixed_dictionaries({"name": text}, optional={"parameters": json_values})}),
    st.fixed_dictionaries({"name": text}, optional={"description": json_values, "input_schema": json_values}),
    json_values), max_size=3), json_values)
token_ids = st.lists(st.integers(min_value=-5, max_value=300000), max_size=8)
request_body = st.fixed_dictionaries(
    {},
    optional={
        "model": model,
        "messages": messages,
        "prompt": st.one_of(weird_text, st.lists(weird_text, max_size=3), token_ids, st.lists(token_ids, max_size=2),
                            json_values),
        "input": st.one_of(weird_text, st.lists(weird_text, max_size=3), token_ids, st.lists(token_ids, max_size=2),
                           json_values),
        "system": st.one_of(weird_text, st.lists(part, max_size=2), json_values),
        "stream": st.one_of(st.booleans(), st.booleans(), json_values),
        "stream_options": st.one_of(st.fixed_dictionaries({}, optional={"include_usage": st.one_of(
            st.booleans(), json_values)}), json_values),
        "max_tokens": st.one_of(st.integers(min_value=-3, max_value=2**70), json_values),
        "max_completion_tokens": st.one_of(st.integers(min_value=-3, max_value=10**9), json_values),
        "tools": tools,
        "dimensions": st.one_of(st.integers(min_value=-3, max_value=10000), json_values),
        "n": json_values,
        "temperature": json_values,
    },
)


def valid_body(path: str) -> st.SearchStrategy[dict[str, Any]]:
    """Bodies that pass validation, so the mock provider really runs on odd contents."""
    if path.endswith("/embeddings"):
        return st.fixed_dictionaries({"model": st.just("mock"), "input": st.one_of(
            weird_text, st.lists(weird_text, min_size=1, max_size=3), token_ids, st.lists(token_ids, max_size=2),
            st.lists(json_values, max_size=3))}, optional={"dimensions": json_values})
    if path.endswith("/completions") and "chat" not in path:
        return st.fixed_dictionaries({"model": st.just("mock"), "prompt": st.one_of(
            weird_text, st.lists(weird_text, max_size=3), token_ids, st.lists(json_values, max_size=3))},
            optional={"stream": st.booleans(), "stream_options": st.fixed_dictionaries(
                {}, optional={"include_usage": st.booleans()}), "max_tokens": st.integers(0, 10**6)})
    ok_content = st.one_of(weird_text, st.lists(part, max_size=3), st.none())
    ok_message = st.fixed_dictionaries({"role": st.one_of(st.sampled_from(["user", "assistant"]), text)},
                                       optional={"content": ok_content, "name": json_values,
                                                 "tool_calls": json_values})
    optional = {"stream": st.booleans(), "stream_options": st.fixed_dictionaries(
        {}, optional={"include_usage": st.booleans()}), "max_tokens": st.integers(0, 2**63 - 1),
        "tools": tools, "temperature": json_values, "metadata": json_values}
    if path.endswith("/messages"):
        optional["system"] = st.one_of(weird_text, st.lists(part, max_size=2))
    return st.fixed_dictionaries({"model": st.just("mock"), "messages": st.lists(ok_message, max_size=4)},
                                 optional=optional)


def encode(value: Any, ascii_only: bool) -> bytes:
    # The stdlib writes what orjson would refuse (ints past 64 bits, NaN, lone surrogates).
    return json.dumps(value, ensure_ascii=ascii_only, allow_nan=True).encode("utf-8", "surrogatepass")


# --- the tests ------------------------------------------------------------------------------


@pytest.mark.parametrize("path", POST_PATHS)
def test_fuzz_json_bodies(bg, proxy, path):
    @fuzz(150)
    @given(body=st.one_of(request_body, request_body, valid_body(path), json_values), ascii_only=st.booleans())
    def one(body, ascii_only):
        raw = encode(body, ascii_only)
        headers = {"Content-Type": "application/json"}
        status, resp_headers, resp = bg.run(proxy.request("POST", path, raw, headers))
        check_answer("POST", path, headers, status, resp_headers, resp)

    one()
    check_records(proxy)
    assert any(r.status == 200 for r in proxy.records), "no example reached the mock provider"


def _mutations() -> st.SearchStrategy[bytes]:
    base = st.sampled_from([
        b'{"model": "mock", "messages": [{"role": "user", "content": "hi"}]}',
        b'{"model": "mock", "messages": [{"role": "user", "content": "hi"}], "stream": true}',
        b'{"model": "mock", "prompt": "hi"}',
        b'{"model": "mock", "input": ["a", "b"]}',
        b'{"model": "mock", "max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "text", '
        b'"text": "x"}]}], "system": "s"}',
    ])

    @st.composite
    def mutate(draw) -> bytes:
        raw = bytearray(draw(base))
        for _ in range(draw(st.integers(1, 4))):
            i = draw(st.integers(0, len(raw)))
            op = draw(st.sampled_from(["cut", "insert", "flip", "delete"]))
            if op == "cut":
                raw = raw[:i]
            elif op == "insert":
                raw[i:i] = draw(st.binary(min_size=1, max_size=4))
            elif op == "flip" and i < len(raw):
                raw[i] = draw(st.integers(0, 255))
            elif i < len(raw):
                del raw[i]
        return bytes(raw)

    return mutate()


@pytest.mark.parametrize("path", POST_PATHS)
def test_fuzz_raw_bytes(bg, proxy, path):
    @fuzz(60)
    @given(raw=st.one_of(st.binary(max_size=300), _mutations(), _mutations()),
           ctype=st.sampled_from(["application/json", "text/plain", "application/octet-stream", None]))
    def one(raw, ctype):
        headers = {"Content-Type": ctype} if ctype else {}
        status, resp_headers, resp = bg.run(proxy.request("POST", path, raw, headers))
        check_answer("POST", path, headers, status, resp_headers, resp)

    one()
    check_records(proxy)


header_text = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x2FFF, blacklist_categories=("Cs", "Cc")),
                      max_size=200)


@pytest.mark.parametrize("path", POST_PATHS[::2] + GET_PATHS)
def test_fuzz_headers(bg, proxy, path):
    """Odd header values (ids, keys, versions, trace context) never break an answer."""
    names = ["x-request-id", "authorization", "x-api-key", "api-key", "anthropic-version", "anthropic-beta",
             "openai-beta", "traceparent", "tracestate", "accept", "cache-control", "content-type"]

    @fuzz(60)
    @given(headers=st.dictionaries(st.sampled_from(names), header_text, max_size=5),
           body=valid_body(path) if path not in GET_PATHS else st.none())
    def one(headers, body):
        method = "GET" if path in GET_PATHS else "POST"
        raw = encode(body, True) if body is not None else None
        status, resp_headers, resp = bg.run(proxy.request(method, path, raw, headers))
        check_answer(method, path, headers, status, resp_headers, resp)
        rid = headers.get("x-request-id", "").strip(" \t")  # HTTP drops the value's outer whitespace
        if rid and len(rid) <= 128 and rid.isprintable():
            assert resp_headers["x-request-id"] == rid

    one()
    check_records(proxy)


@pytest.mark.parametrize("path", GET_PATHS)
def test_fuzz_models_get(bg, proxy, path):
    @fuzz(40)
    @given(raw=st.one_of(st.none(), st.binary(max_size=100)),
           query=st.dictionaries(text, text, max_size=3),
           anthropic=st.booleans())
    def one(raw, query, anthropic):
        headers = {"anthropic-version": "2023-06-01"} if anthropic else {}

        async def go():
            async with proxy.session.get(proxy.url + path, data=raw, params=query, headers=headers) as r:
                return r.status, r.headers.copy(), await r.read()

        status, resp_headers, resp = bg.run(go())
        assert status == 200, resp
        check_answer("GET", path, headers, status, resp_headers, resp)
        body = orjson.loads(resp)
        if anthropic:
            assert body["data"][0]["type"] == "model" and body["has_more"] is False
        else:
            assert body["object"] == "list"

    one()
    check_records(proxy)


# --- deep nesting: valid JSON that orjson can read (depth < 1024) but not write (depth > 255) ----


_DEEP = "__deep__"


def nested(depth: int) -> str:
    return _DEEP + str(depth)


def deep_json(body: dict[str, Any]) -> bytes:
    """`body` as JSON with each `nested(depth)` placeholder made a list `depth` levels deep
    (orjson and the stdlib cannot write those past their recursion limits)."""
    raw = orjson.dumps(body)
    for depth in DEPTHS + [2]:
        raw = raw.replace(f'"{_DEEP}{depth}"'.encode(), b"[" * (depth - 1) + b'"x"' + b"]" * (depth - 1))
    assert _DEEP.encode() not in raw
    return raw


DEPTHS = [100, 200, 300, 1000, 1020]  # past ~255 levels orjson.dumps gives up


def deep_bodies(depth: int) -> dict[str, dict[str, Any]]:
    msg = [{"role": "user", "content": "hi"}]
    return {
        "chat_unknown_field": {"model": "mock", "messages": msg, "metadata": nested(depth)},
        "chat_tool_args": {"model": "mock", "messages": [{"role": "assistant", "tool_calls": [
            {"id": "1", "type": "function", "function": {"name": "f", "arguments": nested(depth)}}]}]},
        "chat_tools": {"model": "mock", "messages": msg, "tools": [{"type": "function", "function": {
            "name": "f", "parameters": nested(depth)}}]},
        "messages_tool_use": {"model": "mock", "max_tokens": 5, "messages": [{"role": "assistant", "content": [
            {"type": "tool_use", "id": "t", "name": "f", "input": nested(depth)}]}]},
        "messages_tools": {"model": "mock", "max_tokens": 5, "messages": msg,
                           "tools": [{"name": "f", "input_schema": nested(depth)}]},
        "completions_prompt": {"model": "mock", "prompt": nested(depth)},
        "embeddings_input": {"model": "mock", "input": nested(depth)},
    }


_PATH_OF = {"chat": "/v1/chat/completions", "messages": "/v1/messages", "completions": "/v1/completions",
            "embeddings": "/v1/embeddings"}


@pytest.mark.parametrize("case,depth", [
    pytest.param(case, depth, id=f"{case}-{depth}")
    for case in deep_bodies(2) for depth in DEPTHS])
def test_deeply_nested_bodies_mock(bg, proxy, case, depth):
    path = _PATH_OF[case.split("_")[0]]
    raw = deep_json(deep_bodies(depth)[case])
    status, resp_headers, resp = bg.run(proxy.request("POST", path, raw, {"Content-Type": "application/json"}))
    check_answer("POST", path, {}, status, resp_headers, resp)
    check_records(proxy)


@pytest.fixture
def http_proxy(bg):
    async def start():
        fake = await FakeUpstream().start()
        cfg = {"models": [
            {"name": "mock", "deployments": [{"provider": "openai", "model": "up", "api_base": fake.url + "/v1",
                                              "api_key": "sk-x"}]},
            {"name": "mock-ant", "deployments": [{"provider": "anthropic", "model": "up", "api_base": fake.url,
                                                  "api_key": "sk-x"}]}],
            "server": {"allow_anonymous": True}}
        return fake, await LiveProxy(cfg).start()

    fake, p = bg.run(start())
    yield p
    bg.run(p.close())
    bg.run(fake.close())


@pytest.mark.parametrize("case,depth", [
    pytest.param(case, depth, id=f"{case}-{depth}")
    for case in ["chat_unknown_field", "chat_tools", "messages_tool_use", "embeddings_input"]
    for depth in [200, 300, 1000]])
def test_deeply_nested_bodies_http_providers(bg, http_proxy, case, depth):
    """The HTTP providers re-serialize the body (the model name changes) with orjson, which writes
    at most 255 levels: deeper bodies are refused as 400 before anything is sent."""
    api = case.split("_")[0]
    body = deep_bodies(depth)[case]
    if api == "messages":
        body = {**body, "model": "mock-ant"}
    path = _PATH_OF[api]
    raw = deep_json(body)
    status, resp_headers, resp = bg.run(http_proxy.request("POST", path, raw, {"Content-Type": "application/json"}))
    check_answer("POST", path, {}, status, resp_headers, resp)
    check_records(http_proxy)
