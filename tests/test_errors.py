"""SPEC §2's error table, row by row (the rows that need neither keys nor limits), on the
OpenAI paths in the OpenAI error shape and on /v1/messages in the Anthropic shape; plus
x-request-id, the header policy both ways and compressed upstream answers."""

from __future__ import annotations

import asyncio
import gzip
import socket
from dataclasses import dataclass
from typing import Any

import aiohttp
import anthropic
import openai
import orjson
import pytest
from aiohttp import web
from multidict import CIMultiDict

from llmproxy.testing import FakeUpstream, Received, hang, reply_json

from .conftest import MASTER, openai_config

# (path, api) for every POST endpoint, prefixed and not.
CHAT_ROUTES = [("/v1/chat/completions", "chat"), ("/chat/completions", "chat")]
MESSAGES_ROUTES = [("/v1/messages", "messages"), ("/messages", "messages")]
OTHER_ROUTES = [("/v1/completions", "completions"), ("/completions", "completions"),
                ("/v1/embeddings", "embeddings"), ("/embeddings", "embeddings")]
# The routes each case of the table is checked on: both OpenAI chat paths and Anthropic's.
ROUTES = CHAT_ROUTES + MESSAGES_ROUTES
ALL_ROUTES = CHAT_ROUTES + OTHER_ROUTES + MESSAGES_ROUTES

ANY = object()
PROVIDER_SECRETS = (b"sk-provider-secret", b"sk-ant-provider-secret")


def ids(routes):
    return [p for p, _ in routes]


def good_body(api: str, model: str | None = None) -> dict[str, Any]:
    if api == "messages":
        return {"model": model or "claude-test", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}
    if api == "completions":
        return {"model": model or "gpt-test", "prompt": "hi"}
    if api == "embeddings":
        return {"model": model or "gpt-test", "input": "hi"}
    return {"model": model or "gpt-test", "messages": [{"role": "user", "content": "hi"}]}


@dataclass
class Resp:
    status: int
    headers: CIMultiDict
    raw: bytes

    @property
    def json(self) -> Any:
        return orjson.loads(self.raw)


async def send(proxy, path: str, body: Any = None, *, data: Any = None, headers: dict[str, str] | None = None,
               method: str = "POST", auth: bool = True) -> Resp:
    """One raw request; the body comes back undecoded (no transparent gunzip)."""
    hdrs = {"Authorization": f"Bearer {MASTER}"} if auth else {}
    if method == "POST":
        hdrs["Content-Type"] = "application/json"
    hdrs.update(headers or {})
    if data is None and body is not None:
        data = orjson.dumps(body)
    async with aiohttp.ClientSession(auto_decompress=False) as s:
        async with s.request(method, proxy.url + path, data=data, headers=hdrs) as r:
            return Resp(r.status, CIMultiDict(r.headers), await r.read())


def check_error(resp: Resp, path: str, status: int, oa_type: str, oa_code: Any, ant_type: str,
                param: Any = ANY, contains: str | None = None) -> dict[str, Any]:
    """The error is in the right shape for `path`; returns the inner `error` object."""
    assert resp.status == status, (resp.status, resp.raw)
    assert resp.headers.get("Content-Type", "").startswith("application/json"), resp.headers
    assert resp.headers.get("x-request-id")
    body = resp.json
    if path.endswith("/messages"):
        assert set(body) == {"type", "error"}, body
        assert body["type"] == "error"
        err = body["error"]
        assert err["type"] == ant_type, body
        assert isinstance(err["message"], str) and err["message"]
    else:
        assert set(body) == {"error"}, body
        err = body["error"]
        assert set(err) == {"message", "type", "param", "code"}, body
        assert isinstance(err["message"], str) and err["message"]
        assert err["type"] == oa_type, body
        if oa_code is not ANY:
            assert err["code"] == oa_code, body
        if param is not ANY:
            assert err["param"] == param, body
        assert err["param"] is None or isinstance(err["param"], str)
        assert err["code"] is None or isinstance(err["code"], str)
    if contains is not None:
        assert contains in err["message"], err
    for secret in PROVIDER_SECRETS + (MASTER.encode(),):
        assert secret not in resp.raw
    return err


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (bound, noted, closed)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return port


def config(upstream: FakeUpstream, *, timeout: float | None = None, num_retries: int | None = None,
           api_base: str | None = None, **extra: Any) -> dict[str, Any]:
    cfg = openai_config(upstream, **extra)
    for model in cfg["models"]:
        for dep in model["deployments"]:
            if timeout is not None:
                dep["timeout"] = timeout
            if api_base is not None:
                dep["api_base"] = api_base + ("/v1" if dep["provider"] == "openai" else "")
    if num_retries is not None:
        cfg["router"] = {**cfg["router"], "num_retries": num_retries}
    return cfg


MOCK_CONFIG = {"models": [{"name": "mock", "deployments": [{"provider": "mock"}]}]}


# --- 400: the body ---------------------------------------------------------------------

MALFORMED = {
    "truncated": b'{"model": "gpt-test", "messages": [',
    "not_json": b"hello there",
    "empty": b"",
    "trailing_garbage": b'{"model": "gpt-test"}}',
    "not_utf8": b'{"model": "\xff\xfe"}',
    "nan": b'{"model": "gpt-test", "max_tokens": NaN}',
    "lone_surrogate": b'{"model": "\\ud800", "messages": []}',
    "huge_int": b'{"model": "gpt-test", "max_tokens": 123456789012345678901234567890}',
    "array": b"[]",
    "array_of_object": b'[{"model": "gpt-test"}]',
    "string": b'"gpt-test"',
    "number": b"42",
    "null": b"null",
    "true": b"true",
}


@pytest.mark.parametrize("case", list(MALFORMED))
@pytest.mark.parametrize("path,api", ALL_ROUTES, ids=ids(ALL_ROUTES))
async def test_malformed_or_non_object_body(upstream, make_proxy, path, api, case):
    proxy = await make_proxy(openai_config(upstream))
    resp = await send(proxy, path, data=MALFORMED[case])
    check_error(resp, path, 400, "invalid_request_error", ANY, "invalid_request_error")
    assert upstream.requests == []


_DROP = object()


def _field_cases(api: str) -> list[tuple[str, dict[str, Any], str]]:
    """(case id, fields to set (_DROP removes), the param the proxy should name)."""
    field = {"chat": "messages", "messages": "messages", "completions": "prompt", "embeddings": "input"}[api]
    cases = [
        ("model_int", {"model": 1}, "model"),
        ("model_list", {"model": ["gpt-test"]}, "model"),
        ("model_empty", {"model": ""}, "model"),
        ("model_missing", {"model": _DROP}, "model"),
        ("model_null", {"model": None}, "model"),
        (f"{field}_missing", {field: _DROP}, field),
        (f"{field}_null", {field: None}, field),
        (f"{field}_number", {field: 5}, field),
        (f"{field}_object", {field: {"role": "user"}}, field),
        ("stream_yes", {"stream": "yes"}, "stream"),
        ("stream_int", {"stream": 1}, "stream"),
        ("stream_options_list", {"stream_options": []}, "stream_options"),
        ("stream_options_str", {"stream_options": "include_usage"}, "stream_options"),
        ("include_usage_str", {"stream_options": {"include_usage": "yes"}}, "stream_options.include_usage"),
        ("max_tokens_negative", {"max_tokens": -1}, "max_tokens"),
        ("max_tokens_string", {"max_tokens": "10"}, "max_tokens"),
        ("max_tokens_float", {"max_tokens": 10.5}, "max_tokens"),
        ("max_tokens_bool", {"max_tokens": True}, "max_tokens"),
        ("max_completion_tokens_negative", {"max_completion_tokens": -5}, "max_completion_tokens"),
        ("max_completion_tokens_string", {"max_completion_tokens": "5"}, "max_completion_tokens"),
    ]
    if field == "messages":
        cases += [
            ("messages_string", {"messages": "hi"}, "messages"),
            ("message_not_object", {"messages": ["hi"]}, "messages[0]"),
            ("message_role_missing", {"messages": [{"content": "hi"}]}, "messages[0].role"),
            ("message_role_int", {"messages": [{"role": 1, "content": "hi"}]}, "messages[0].role"),
            ("message_content_int", {"messages": [{"role": "user", "content": 3}]}, "messages[0].content"),
            ("message_content_part_str", {"messages": [{"role": "user", "content": ["hi"]}]},
             "messages[0].content"),
            ("second_message_bad", {"messages": [{"role": "user", "content": "a"}, 7]}, "messages[1]"),
        ]
    if api == "messages":
        cases.append(("system_int", {"system": 5}, "system"))
    return cases


FIELD_PARAMS = [pytest.param(path, api, fields, param, id=f"{path}-{case}")
                for path, api in ALL_ROUTES for case, fields, param in _field_cases(api)]


@pytest.mark.parametrize("path,api,fields,param", FIELD_PARAMS)
async def test_wrong_field_types_and_missing_fields(upstream, make_proxy, path, api, fields, param):
    proxy = await make_proxy(openai_config(upstream))
    body = good_body(api)
    for name, value in fields.items():
        if value is _DROP:
            body.pop(name, None)
        else:
            body[name] = value
    resp = await send(proxy, path, body)
    check_error(resp, path, 400, "invalid_request_error", ANY, "invalid_request_error", param=param)
    assert upstream.requests == []


@pytest.mark.parametrize("path,api", ALL_ROUTES, ids=ids(ALL_ROUTES))
async def test_valid_bodies_pass_with_unknown_fields(upstream, make_proxy, path, api):
    """The control for the table above: the same bodies, valid, reach upstream untouched."""
    proxy = await make_proxy(openai_config(upstream))
    body = {**good_body(api), "max_tokens": 0, "some_future_param": {"x": [1, None]}, "stream": False}
    resp = await send(proxy, path, body)
    assert resp.status == 200, resp.raw
    assert len(upstream.requests) == 1
    assert upstream.requests[0].json["some_future_param"] == {"x": [1, None]}


# --- 401: the key ------------------------------------------------------------------------

KEY_FORMS = {
    "bearer": lambda k: {"Authorization": f"Bearer {k}"},
    "x-api-key": lambda k: {"x-api-key": k},
    "api-key": lambda k: {"api-key": k},
}
BAD_KEYS = {
    "missing": {},
    "bearer_wrong": {"Authorization": "Bearer sk-wrong"},
    "bearer_empty": {"Authorization": "Bearer "},
    "bearer_master_prefix": {"Authorization": f"Bearer {MASTER[:-1]}"},
    "basic_scheme": {"Authorization": f"Basic {MASTER}"},
    "x-api-key_wrong": {"x-api-key": "sk-wrong"},
    "x-api-key_empty": {"x-api-key": ""},
    "api-key_wrong": {"api-key": "sk-wrong"},
    "api-key_longer": {"api-key": MASTER + "x"},
}
AUTH_ROUTES = ALL_ROUTES + [("/v1/models", "models"), ("/models", "models")]


@pytest.mark.parametrize("case", list(BAD_KEYS))
@pytest.mark.parametrize("path,api", AUTH_ROUTES, ids=ids(AUTH_ROUTES))
async def test_missing_or_wrong_key(upstream, make_proxy, path, api, case):
    proxy = await make_proxy(openai_config(upstream))
    method = "GET" if api == "models" else "POST"
    body = None if api == "models" else good_body(api)
    resp = await send(proxy, path, body, method=method, auth=False, headers=BAD_KEYS[case])
    check_error(resp, path, 401, "authentication_error", "invalid_api_key", "authentication_error")
    assert upstream.requests == []


@pytest.mark.parametrize("case", ["missing", "x-api-key_wrong"])
async def test_models_wrong_key_anthropic_shape(upstream, make_proxy, case):
    """GET /v1/models from the anthropic SDK (it sends anthropic-version) gets Anthropic's shape."""
    proxy = await make_proxy(openai_config(upstream))
    resp = await send(proxy, "/v1/models", method="GET", auth=False,
                      headers={**BAD_KEYS[case], "anthropic-version": "2023-06-01"})
    assert resp.status == 401
    assert resp.json["type"] == "error" and resp.json["error"]["type"] == "authentication_error"


@pytest.mark.parametrize("form", list(KEY_FORMS))
@pytest.mark.parametrize("path,api", AUTH_ROUTES, ids=ids(AUTH_ROUTES))
async def test_right_key_in_each_header_form(upstream, make_proxy, path, api, form):
    proxy = await make_proxy(openai_config(upstream))
    method = "GET" if api == "models" else "POST"
    body = None if api == "models" else good_body(api)
    resp = await send(proxy, path, body, method=method, auth=False, headers=KEY_FORMS[form](MASTER))
    assert resp.status == 200, resp.raw
    assert resp.headers.get("x-request-id")


# --- 404: unknown model --------------------------------------------------------------------


@pytest.mark.parametrize("model", ["no-such-model", "GPT-TEST", "gpt-test ", "gpt-upstream"])
@pytest.mark.parametrize("path,api", ALL_ROUTES, ids=ids(ALL_ROUTES))
async def test_unknown_model(upstream, make_proxy, path, api, model):
    """Only configured names exist: not another case, not a deployment's upstream id."""
    proxy = await make_proxy(openai_config(upstream))
    resp = await send(proxy, path, good_body(api, model))
    check_error(resp, path, 404, "invalid_request_error", "model_not_found", "not_found_error")
    assert upstream.requests == []


# --- 413: body size -----------------------------------------------------------------------


def body_of_size(api: str, size: int, model: str | None = None) -> bytes:
    """A valid request body of exactly `size` bytes (padded with an unknown field)."""
    body = good_body(api, model)
    base = orjson.dumps({**body, "pad": ""})
    raw = orjson.dumps({**body, "pad": "hello world " * ((size - len(base)) // 12)})
    raw = orjson.dumps({**body, "pad": orjson.loads(raw)["pad"] + "x" * (size - len(raw))})
    assert len(raw) == size
    return raw


async def _chunked(data: bytes, piece: int = 700):
    for i in range(0, len(data), piece):
        yield data[i:i + piece]


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
@pytest.mark.parametrize("path,api", ALL_ROUTES, ids=ids(ALL_ROUTES))
async def test_body_over_max_body_bytes(upstream, make_proxy, path, api, chunked):
    proxy = await make_proxy(openai_config(upstream, server={"max_body_bytes": 2000}))
    raw = body_of_size(api, 2001)
    resp = await send(proxy, path, data=_chunked(raw) if chunked else raw)
    check_error(resp, path, 413, "invalid_request_error", "request_too_large", "request_too_large")
    assert upstream.requests == []
    raw = body_of_size(api, 50_000)
    resp = await send(proxy, path, data=_chunked(raw) if chunked else raw)
    check_error(resp, path, 413, "invalid_request_error", "request_too_large", "request_too_large")
    # The same proxy still serves (the rejected body did not wedge the connection or the app).
    resp = await send(proxy, path, good_body(api))
    assert resp.status == 200, resp.raw


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
@pytest.mark.parametrize("path,api", ROUTES, ids=ids(ROUTES))
async def test_body_of_exactly_max_body_bytes_is_accepted(upstream, make_proxy, path, api, chunked):
    proxy = await make_proxy(openai_config(upstream, server={"max_body_bytes": 2000}))
    raw = body_of_size(api, 2000)
    resp = await send(proxy, path, data=_chunked(raw) if chunked else raw)
    assert resp.status == 200, resp.raw
    assert upstream.requests[0].json["pad"] == orjson.loads(raw)["pad"]


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
@pytest.mark.parametrize("path,api", [("/v1/chat/completions", "chat"), ("/v1/messages", "messages"),
                                      ("/v1/embeddings", "embeddings")])
async def test_body_over_aiohttp_default_but_under_limit_is_accepted(make_proxy, path, api, chunked):
    """aiohttp's own default limit is 1 MiB; the configured 5 MiB is what applies."""
    proxy = await make_proxy({**MOCK_CONFIG, "server": {"max_body_bytes": 5 * 1024 * 1024}})
    raw = body_of_size(api, 1536 * 1024, model="mock")
    resp = await send(proxy, path, data=_chunked(raw, 64 * 1024) if chunked else raw)
    assert resp.status == 200, resp.raw[:300]
    assert isinstance(resp.json, dict)


# --- upstream failures ----------------------------------------------------------------------


STREAM = pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])


def body_for(api: str, stream: bool, model: str | None = None) -> dict[str, Any]:
    return {**good_body(api, model), "stream": True} if stream else good_body(api, model)


@STREAM
@pytest.mark.parametrize("path,api", ROUTES, ids=ids(ROUTES))
async def test_upstream_unreachable(upstream, make_proxy, path, api, stream):
    """A failure before the first byte is a plain HTTP error, streamed request or not."""
    proxy = await make_proxy(config(upstream, api_base=f"http://127.0.0.1:{free_port()}"))
    resp = await send(proxy, path, body_for(api, stream))
    check_error(resp, path, 502, "api_error", "upstream_error", "api_error")
    assert resp.headers.get("x-should-retry") == "false"
    assert proxy.records[-1].status == 502


@STREAM
@pytest.mark.parametrize("path,api", ROUTES, ids=ids(ROUTES))
async def test_upstream_timeout(upstream, make_proxy, path, api, stream):
    proxy = await make_proxy(config(upstream, timeout=0.3))
    upstream.push(hang(5), hang(5))  # 1 + num_retries attempts
    resp = await send(proxy, path, body_for(api, stream))
    check_error(resp, path, 504, "api_error", "upstream_timeout", "api_error")
    assert resp.headers.get("x-should-retry") == "false"
    # Both attempts timed out (the record says so; on a loaded machine the upstream may not
    # have finished reading the second request before the proxy gave up on it).
    loop = asyncio.get_running_loop()
    end = loop.time() + 2
    while not proxy.records and loop.time() < end:
        await asyncio.sleep(0.01)
    assert [a.outcome for a in proxy.records[-1].attempts] == ["timeout", "timeout"]
    assert 1 <= len(upstream.requests) <= 2


def _leaky(status: int) -> Any:
    return reply_json(status, {"error": {"message": "Incorrect API key provided: sk-provider-secret / "
                                                    "sk-ant-provider-secret", "type": "invalid_request_error",
                                         "code": "invalid_api_key"}},
                      headers={"x-upstream-detail": "sk-provider-secret"})


UPSTREAM_FAILURES = {
    # case: (pushed behaviours, status, OpenAI type, code, Anthropic type, x-should-retry false?)
    "401": ([_leaky(401), _leaky(401)], 502, "api_error", "upstream_auth_error", "api_error", True),
    "403": ([_leaky(403), _leaky(403)], 502, "api_error", "upstream_auth_error", "api_error", True),
    "401_then_403": ([_leaky(401), _leaky(403)], 502, "api_error", "upstream_auth_error", "api_error", True),
    "429_every_attempt": ([reply_json(429, {"error": {"message": "slow down"}})] * 2, 429, "rate_limit_error",
                          "upstream_rate_limited", "rate_limit_error", False),
    "500_after_retries": ([reply_json(500, {"error": "boom"})] * 2, 502, "api_error", "upstream_error",
                          "api_error", True),
    "503_then_502": ([reply_json(503, {"error": "boom"}), reply_json(502, b"<html>bad gateway</html>")], 502,
                     "api_error", "upstream_error", "api_error", True),
    "429_then_500": ([reply_json(429, {}), reply_json(500, {})], 502, "api_error", "upstream_error",
                     "api_error", True),
    "500_then_429": ([reply_json(500, {}), reply_json(429, {})], 502, "api_error", "upstream_error",
                     "api_error", True),
}


@STREAM
@pytest.mark.parametrize("case", list(UPSTREAM_FAILURES))
@pytest.mark.parametrize("path,api", ROUTES, ids=ids(ROUTES))
async def test_upstream_failure_after_retries(upstream, make_proxy, path, api, case, stream):
    pushes, status, oa_type, code, ant_type, final = UPSTREAM_FAILURES[case]
    proxy = await make_proxy(openai_config(upstream))
    upstream.push(*pushes)
    resp = await send(proxy, path, body_for(api, stream))
    check_error(resp, path, status, oa_type, code, ant_type)
    assert len(upstream.requests) == 2  # 1 + num_retries, then no more
    if final:
        assert resp.headers.get("x-should-retry") == "false"
    assert b"Incorrect API key" not in resp.raw
    assert "x-upstream-detail" not in resp.headers
    rec = proxy.records[-1]
    assert (rec.status, rec.error_code) == (status, code)


ANTHROPIC_ERROR_EVENT = (b'event: error\ndata: {"type": "error", "error": {"type": "overloaded_error", '
                         b'"message": "Overloaded"}}\n\n')


@pytest.mark.parametrize("path", ["/v1/messages", "/messages"])
async def test_anthropic_error_as_first_event_is_a_failure_before_the_first_byte(upstream, make_proxy, path):
    from llmproxy.testing import reply_sse

    proxy = await make_proxy(openai_config(upstream))
    upstream.push(reply_sse([ANTHROPIC_ERROR_EVENT]), reply_sse([ANTHROPIC_ERROR_EVENT]))
    resp = await send(proxy, path, body_for("messages", True))
    check_error(resp, path, 502, "api_error", "upstream_error", "api_error")
    assert resp.headers.get("x-should-retry") == "false"
    assert len(upstream.requests) == 2
    upstream.push(reply_sse([ANTHROPIC_ERROR_EVENT]))  # then the default stream: retried, 200
    resp = await send(proxy, path, body_for("messages", True))
    assert resp.status == 200 and resp.raw.startswith(b"event: message_start")


@pytest.mark.parametrize("path,api", ROUTES, ids=ids(ROUTES))
async def test_upstream_429_with_no_retries(upstream, make_proxy, path, api):
    proxy = await make_proxy(config(upstream, num_retries=0))
    upstream.push(reply_json(429, {"error": {"message": "slow down"}}, headers={"retry-after": "7"}))
    resp = await send(proxy, path, good_body(api))
    check_error(resp, path, 429, "rate_limit_error", "upstream_rate_limited", "rate_limit_error")
    assert len(upstream.requests) == 1
    assert resp.headers.get("Retry-After") == "7"


RECOVERED = {
    "429_then_200": reply_json(429, {"error": {"message": "slow down"}}),
    "500_then_200": reply_json(500, {"error": "boom"}),
    "503_then_200": reply_json(503, b"unavailable"),
    "401_then_200": reply_json(401, {"error": "bad key"}),
    "timeout_then_200": hang(5),
}


@STREAM
@pytest.mark.parametrize("case", list(RECOVERED))
@pytest.mark.parametrize("path,api", ROUTES, ids=ids(ROUTES))
async def test_upstream_failure_then_success_on_retry(upstream, make_proxy, path, api, case, stream):
    proxy = await make_proxy(config(upstream, timeout=0.5))
    upstream.push(RECOVERED[case])  # then the fake's default 200
    resp = await send(proxy, path, body_for(api, stream))
    assert resp.status == 200, resp.raw
    assert len(upstream.requests) == 2
    assert [a.outcome for a in proxy.records[-1].attempts][-1] == "ok"
    if stream:
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        assert b"upstream" in resp.raw and b'"error"' not in resp.raw
    elif api == "messages":
        assert resp.json["type"] == "message"
    else:
        assert resp.json["object"] == "chat.completion"


PASSTHROUGH = {
    "400_context_too_long": (400, orjson.dumps({"error": {"message": "context too long", "type":
                                                          "invalid_request_error", "param": "messages",
                                                          "code": "context_length_exceeded"}})),
    "400_anthropic": (400, b'{"type":"error","error":{"type":"invalid_request_error",'
                           b'"message":"prompt is too long: 300000 tokens > 200000 maximum"}}'),
    "404": (404, b'{"error": {"message": "The model does not exist", "type": "invalid_request_error"}}'),
    "409": (409, b'{"error": {"message": "conflict"}}'),
    "413": (413, b'{"error":{"message":"request too large for upstream"}}'),
    "422": (422, b'{"detail": [{"loc": ["body", "temperature"], "msg": "must be <= 2"}]}\n'),
}


@STREAM
@pytest.mark.parametrize("case", list(PASSTHROUGH))
@pytest.mark.parametrize("path,api", ROUTES, ids=ids(ROUTES))
async def test_other_upstream_4xx_passes_unchanged(upstream, make_proxy, path, api, case, stream):
    status, raw = PASSTHROUGH[case]
    proxy = await make_proxy(openai_config(upstream))
    upstream.push(reply_json(status, raw))
    resp = await send(proxy, path, body_for(api, stream))
    assert resp.status == status
    assert resp.raw == raw  # byte for byte
    assert resp.headers.get("Content-Type", "").startswith("application/json")
    assert resp.headers.get("x-request-id")
    assert len(upstream.requests) == 1  # not retried
    # nor counted against the deployment: the next request goes straight through
    state = proxy.gateway.router.states[good_body(api)["model"]][0]
    assert state.cooldown_until == 0
    resp = await send(proxy, path, good_body(api))
    assert resp.status == 200


WRONG_API = [
    ("/v1/chat/completions", "chat", "claude-test", "/v1/messages"),
    ("/chat/completions", "chat", "claude-test", "/v1/messages"),
    ("/v1/completions", "completions", "claude-test", "/v1/messages"),
    ("/v1/embeddings", "embeddings", "claude-test", "/v1/messages"),
    ("/v1/messages", "messages", "gpt-test", "/v1/chat/completions"),
    ("/messages", "messages", "gpt-test", "/v1/chat/completions"),
]


@pytest.mark.parametrize("path,api,model,use", WRONG_API)
async def test_model_served_by_the_other_api(upstream, make_proxy, path, api, model, use):
    proxy = await make_proxy(openai_config(upstream))
    resp = await send(proxy, path, good_body(api, model))
    err = check_error(resp, path, 400, "invalid_request_error", ANY, "invalid_request_error", contains=use)
    if not path.endswith("/messages"):
        assert err["param"] == "model"
    assert upstream.requests == []


# --- x-request-id ---------------------------------------------------------------------------


async def _scenario(name: str, upstream: FakeUpstream, make_proxy, path: str, api: str, headers: dict):
    if name == "ok":
        proxy = await make_proxy(openai_config(upstream))
        return proxy, await send(proxy, path, good_body(api), headers=headers), 200
    if name == "ok_stream":
        proxy = await make_proxy(openai_config(upstream))
        return proxy, await send(proxy, path, {**good_body(api), "stream": True}, headers=headers), 200
    if name == "400_json":
        proxy = await make_proxy(openai_config(upstream))
        return proxy, await send(proxy, path, data=b"{", headers=headers), 400
    if name == "400_field":
        proxy = await make_proxy(openai_config(upstream))
        return proxy, await send(proxy, path, {**good_body(api), "stream": "yes"}, headers=headers), 400
    if name == "401":
        proxy = await make_proxy(openai_config(upstream))
        return proxy, await send(proxy, path, good_body(api), auth=False, headers=headers), 401
    if name == "404_model":
        proxy = await make_proxy(openai_config(upstream))
        return proxy, await send(proxy, path, good_body(api, "nope"), headers=headers), 404
    if name == "413":
        proxy = await make_proxy(openai_config(upstream, server={"max_body_bytes": 100}))
        return proxy, await send(proxy, path, data=body_of_size(api, 500), headers=headers), 413
    if name == "429":
        proxy = await make_proxy(config(upstream, num_retries=0))
        upstream.push(reply_json(429, {}, headers={"x-request-id": "upstream-id"}))
        return proxy, await send(proxy, path, good_body(api), headers=headers), 429
    if name == "502":
        proxy = await make_proxy(config(upstream, num_retries=0))
        upstream.push(reply_json(500, {}, headers={"x-request-id": "upstream-id"}))
        return proxy, await send(proxy, path, good_body(api), headers=headers), 502
    if name == "504":
        proxy = await make_proxy(config(upstream, num_retries=0, timeout=0.2))
        upstream.push(hang(3))
        return proxy, await send(proxy, path, good_body(api), headers=headers), 504
    if name == "upstream_400":
        proxy = await make_proxy(openai_config(upstream))
        upstream.push(reply_json(400, {"error": {"message": "bad"}}, headers={"x-request-id": "upstream-id"}))
        return proxy, await send(proxy, path, good_body(api), headers=headers), 400
    if name == "ok_upstream_id":
        proxy = await make_proxy(openai_config(upstream))
        upstream.push(reply_json(200, {"id": "x", "object": "chat.completion", "choices": []},
                                 headers={"x-request-id": "upstream-id"}))
        return proxy, await send(proxy, path, good_body(api), headers=headers), 200
    raise AssertionError(name)


RID_SCENARIOS = ["ok", "ok_stream", "ok_upstream_id", "400_json", "400_field", "401", "404_model", "413", "429",
                 "502", "504", "upstream_400"]


@pytest.mark.parametrize("scenario", RID_SCENARIOS)
@pytest.mark.parametrize("path,api", ROUTES, ids=ids(ROUTES))
async def test_x_request_id_on_every_answer(upstream, make_proxy, path, api, scenario):
    proxy, resp, status = await _scenario(scenario, upstream, make_proxy, path, api, {})
    assert resp.status == status, resp.raw
    rid = resp.headers.get("x-request-id")
    assert rid and rid != "upstream-id"
    assert resp.headers.getall("x-request-id") == [rid]
    rec = proxy.records[-1]
    assert rec.request_id == rid and rec.client_request_id is None
    assert rec.status == status


@pytest.mark.parametrize("scenario", RID_SCENARIOS)
@pytest.mark.parametrize("path,api", ROUTES, ids=ids(ROUTES))
async def test_client_x_request_id_echoed_and_kept_apart(upstream, make_proxy, path, api, scenario):
    client_id = f"client-{scenario}-7f3a"
    proxy, resp, status = await _scenario(scenario, upstream, make_proxy, path, api, {"x-request-id": client_id})
    assert resp.status == status, resp.raw
    assert resp.headers.getall("x-request-id") == [client_id]
    rec = proxy.records[-1]
    assert rec.client_request_id == client_id
    assert rec.request_id and rec.request_id != client_id


async def test_server_request_ids_are_unique(upstream, make_proxy):
    proxy = await make_proxy(openai_config(upstream))
    for _ in range(3):
        await send(proxy, "/v1/chat/completions", good_body("chat"), headers={"x-request-id": "same"})
        await send(proxy, "/v1/messages", good_body("messages"))
        await send(proxy, "/v1/messages", data=b"nope")
    await send(proxy, "/v1/models", method="GET")
    ids_ = [r.request_id for r in proxy.records]
    assert len(ids_) == 10 and len(set(ids_)) == 10
    assert all(ids_)
    assert [r.client_request_id for r in proxy.records].count("same") == 3


@pytest.mark.parametrize("value", ["x" * 129, "bad\tid", ""])
async def test_unusable_client_request_id_gets_the_servers(upstream, make_proxy, value):
    proxy = await make_proxy(openai_config(upstream))
    resp = await send(proxy, "/v1/chat/completions", good_body("chat"), headers={"x-request-id": value})
    assert resp.status == 200
    rec = proxy.records[-1]
    assert resp.headers["x-request-id"] == rec.request_id
    assert rec.client_request_id is None


async def test_non_ascii_client_request_id(upstream, make_proxy):
    proxy = await make_proxy(openai_config(upstream))
    resp = await send(proxy, "/v1/chat/completions", good_body("chat"), headers={"x-request-id": "id-é-✓"})
    assert resp.status == 200
    assert resp.headers.get("x-request-id")


async def test_models_list_has_x_request_id(upstream, make_proxy):
    proxy = await make_proxy(openai_config(upstream))
    resp = await send(proxy, "/v1/models", method="GET", headers={"x-request-id": "abc"})
    assert resp.status == 200 and resp.headers["x-request-id"] == "abc"


@pytest.mark.parametrize("path", ["/v1/chat/completion", "/v2/messages"])
async def test_unknown_path_404_has_x_request_id(upstream, make_proxy, path):
    proxy = await make_proxy(openai_config(upstream))
    resp = await send(proxy, path, good_body("chat"), headers={"x-request-id": "abc"})
    assert resp.status == 404
    assert resp.headers.get("x-request-id") == "abc"


# --- header policy ----------------------------------------------------------------------------


def _reply_with_headers(status: int, body: bytes, headers: list[tuple[str, str]]):
    async def behaviour(request: web.Request, got: Received) -> web.StreamResponse:
        resp = web.Response(status=status, body=body, content_type="application/json")
        for name, value in headers:
            resp.headers.add(name, value)
        return resp
    return behaviour


UPSTREAM_HEADERS = [
    ("Set-Cookie", "session=upstream-session; Path=/"),
    ("Set-Cookie", "other=2"),
    ("Set-Cookie2", "old=1"),
    ("x-ratelimit-remaining-requests", "99"),
    ("x-ratelimit-limit-requests", "100"),
    ("x-ratelimit-remaining-tokens", "1000"),
    ("X-RateLimit-Reset-Tokens", "6ms"),
    ("anthropic-ratelimit-requests-remaining", "5"),
    ("anthropic-ratelimit-tokens-limit", "100000"),
    ("Connection", "x-hop-named, X-Other-Hop"),
    ("x-hop-named", "1"),
    ("x-other-hop", "2"),
    ("Keep-Alive", "timeout=5"),
    ("Proxy-Authenticate", "Basic"),
    ("Upgrade", "h2c"),
    ("Trailer", "x-trailer"),
    ("x-upstream-extra", "kept"),
]
DROPPED = ["Set-Cookie", "Set-Cookie2", "x-ratelimit-remaining-requests", "x-ratelimit-limit-requests",
           "x-ratelimit-remaining-tokens", "x-ratelimit-reset-tokens", "anthropic-ratelimit-requests-remaining",
           "anthropic-ratelimit-tokens-limit", "x-hop-named", "x-other-hop", "Keep-Alive", "Proxy-Authenticate",
           "Upgrade", "Trailer"]


@pytest.mark.parametrize("status", [200, 400])
@pytest.mark.parametrize("path,api", ROUTES, ids=ids(ROUTES))
async def test_upstream_response_headers_filtered(upstream, make_proxy, path, api, status):
    proxy = await make_proxy(openai_config(upstream))
    body = b'{"id": "x", "object": "chat.completion", "type": "message", "choices": []}'
    upstream.push(_reply_with_headers(status, body, UPSTREAM_HEADERS))
    resp = await send(proxy, path, good_body(api))
    assert resp.status == status
    assert resp.raw == body
    for name in DROPPED:
        assert name not in resp.headers, (name, dict(resp.headers))
    assert "x-hop-named" not in resp.headers.get("Connection", "").lower()
    assert resp.headers.get("x-upstream-extra") == "kept"  # the control: ordinary headers pass


@pytest.mark.parametrize("path,api", ROUTES, ids=ids(ROUTES))
async def test_upstream_response_headers_filtered_on_streams(upstream, make_proxy, path, api):
    from llmproxy.testing import anthropic_events, openai_events, reply_sse

    proxy = await make_proxy(openai_config(upstream))
    events = anthropic_events("m", ["a"]) if api == "messages" else openai_events("m", ["a"], with_usage=True)
    upstream.push(reply_sse(events, headers={"Set-Cookie": "s=1", "x-ratelimit-remaining-requests": "1",
                                             "anthropic-ratelimit-requests-remaining": "1",
                                             "Connection": "x-hop-named", "x-hop-named": "1",
                                             "x-upstream-extra": "kept"}))
    resp = await send(proxy, path, {**good_body(api), "stream": True, "stream_options": {"include_usage": True}}
                      if api == "chat" else {**good_body(api), "stream": True})
    assert resp.status == 200
    for name in ("Set-Cookie", "x-ratelimit-remaining-requests", "anthropic-ratelimit-requests-remaining",
                 "x-hop-named"):
        assert name not in resp.headers
    assert resp.headers.get("x-upstream-extra") == "kept"
    assert resp.raw == b"".join(events)


CLIENT_SECRET_HEADERS = {
    "Cookie": "sid=client-cookie",
    "OpenAI-Organization": "org-client",
    "OpenAI-Project": "proj-client",
    "x-api-key": MASTER,
    "api-key": MASTER,
    "Proxy-Authorization": "Basic Y2xpZW50",
}
CLIENT_PASSED_HEADERS = {
    "anthropic-version": "2023-06-01",
    "anthropic-beta": "prompt-caching-2024-07-31",
    "openai-beta": "assistants=v2",
    "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    "tracestate": "rojo=00f067aa0ba902b7",
}


@pytest.mark.parametrize("path,api", ROUTES + OTHER_ROUTES, ids=ids(ROUTES + OTHER_ROUTES))
async def test_client_headers_to_upstream(upstream, make_proxy, path, api):
    proxy = await make_proxy(openai_config(upstream))
    resp = await send(proxy, path, good_body(api), headers={**CLIENT_SECRET_HEADERS, **CLIENT_PASSED_HEADERS})
    assert resp.status == 200
    got = upstream.requests[-1].headers
    for name in ("Cookie", "OpenAI-Organization", "OpenAI-Project", "api-key", "Proxy-Authorization"):
        assert name not in got, name
    for name, value in CLIENT_PASSED_HEADERS.items():
        assert got.get(name) == value, name
    if api == "messages":
        assert got.get("x-api-key") == "sk-ant-provider-secret"
        assert "Authorization" not in got
    else:
        assert got.get("Authorization") == "Bearer sk-provider-secret"
        assert "x-api-key" not in got
    assert MASTER not in str(list(got.items()))
    assert "client-cookie" not in str(list(got.items()))


# --- compressed upstream answers ------------------------------------------------------------


@pytest.mark.parametrize("status", [200, 400])
@pytest.mark.parametrize("path,api", ROUTES, ids=ids(ROUTES))
async def test_gzip_upstream_answer_is_decoded(upstream, make_proxy, path, api, status):
    payload = (b'{"type": "message", "id": "msg_1", "content": [{"type": "text", "text": "zipped"}], '
               b'"usage": {"input_tokens": 3, "output_tokens": 4}}' if api == "messages" else
               b'{"id": "c1", "object": "chat.completion", "choices": [{"index": 0, "message": '
               b'{"role": "assistant", "content": "zipped"}}], "usage": {"prompt_tokens": 3, '
               b'"completion_tokens": 4, "total_tokens": 7}}')
    proxy = await make_proxy(openai_config(upstream))

    async def behaviour(request, got):
        return web.Response(status=status, body=gzip.compress(payload),
                            headers={"Content-Type": "application/json", "Content-Encoding": "gzip"})
    upstream.push(behaviour)
    resp = await send(proxy, path, good_body(api))  # the test client does not decompress
    assert resp.status == status
    assert "Content-Encoding" not in resp.headers
    assert resp.raw == payload
    assert upstream.requests[-1].headers.get("Accept-Encoding") == "identity"
    if status == 200:
        assert (proxy.records[-1].prompt_tokens, proxy.records[-1].completion_tokens) == (3, 4)


# --- through the SDKs -----------------------------------------------------------------------


def oai(proxy, key: str = MASTER, **kw) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key=key, max_retries=kw.pop("max_retries", 0), **kw)


def ant(proxy, key: str = MASTER, **kw) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url=proxy.url, api_key=key, max_retries=kw.pop("max_retries", 0), **kw)


MSG = [{"role": "user", "content": "hi"}]


async def test_sdk_openai_errors(upstream, make_proxy):
    proxy = await make_proxy(openai_config(upstream))
    with pytest.raises(openai.AuthenticationError) as exc:
        await oai(proxy, "sk-wrong").chat.completions.create(model="gpt-test", messages=MSG)
    assert exc.value.status_code == 401 and exc.value.code == "invalid_api_key"
    with pytest.raises(openai.NotFoundError) as exc:
        await oai(proxy).chat.completions.create(model="nope", messages=MSG)
    assert exc.value.code == "model_not_found" and exc.value.param == "model"
    with pytest.raises(openai.BadRequestError) as exc:
        await oai(proxy).chat.completions.create(model="claude-test", messages=MSG)
    assert "/v1/messages" in exc.value.message
    with pytest.raises(openai.BadRequestError) as exc:
        await oai(proxy).chat.completions.create(model="gpt-test", messages=MSG, max_tokens=-1)
    assert exc.value.param == "max_tokens"
    upstream.push(reply_json(429, {}), reply_json(429, {}))
    with pytest.raises(openai.RateLimitError) as exc:
        await oai(proxy).chat.completions.create(model="gpt-test", messages=MSG)
    assert exc.value.code == "upstream_rate_limited"
    with pytest.raises(openai.AuthenticationError):
        await oai(proxy, "sk-wrong").models.list()


async def test_sdk_openai_502_504(upstream, make_proxy):
    proxy = await make_proxy(config(upstream, api_base=f"http://127.0.0.1:{free_port()}"))
    with pytest.raises(openai.InternalServerError) as exc:
        await oai(proxy).chat.completions.create(model="gpt-test", messages=MSG)
    assert exc.value.status_code == 502 and exc.value.code == "upstream_error"
    with pytest.raises(openai.InternalServerError) as exc:
        await oai(proxy).embeddings.create(model="gpt-test", input="x")
    assert exc.value.status_code == 502
    proxy = await make_proxy(config(upstream, timeout=0.2, num_retries=0))
    upstream.push(hang(3))
    with pytest.raises(openai.APIStatusError) as exc:
        await oai(proxy).chat.completions.create(model="gpt-test", messages=MSG)
    assert exc.value.status_code == 504 and exc.value.code == "upstream_timeout"


async def test_sdk_anthropic_errors(upstream, make_proxy):
    proxy = await make_proxy(openai_config(upstream))
    with pytest.raises(anthropic.AuthenticationError) as exc:
        await ant(proxy, "sk-wrong").messages.create(model="claude-test", max_tokens=5, messages=MSG)
    assert exc.value.status_code == 401
    with pytest.raises(anthropic.NotFoundError) as exc:
        await ant(proxy).messages.create(model="nope", max_tokens=5, messages=MSG)
    assert exc.value.body["error"]["type"] == "not_found_error"
    with pytest.raises(anthropic.BadRequestError) as exc:
        await ant(proxy).messages.create(model="gpt-test", max_tokens=5, messages=MSG)
    assert "/v1/chat/completions" in exc.value.message
    upstream.push(reply_json(429, {}), reply_json(429, {}))
    with pytest.raises(anthropic.RateLimitError):
        await ant(proxy).messages.create(model="claude-test", max_tokens=5, messages=MSG)
    with pytest.raises(anthropic.AuthenticationError):
        await ant(proxy, "sk-wrong").models.list()
    upstream.push(_leaky(401), _leaky(401))
    with pytest.raises(anthropic.InternalServerError) as exc:
        await ant(proxy).messages.create(model="claude-test", max_tokens=5, messages=MSG)
    assert exc.value.status_code == 502
    assert "sk-ant-provider-secret" not in str(exc.value.body)


async def test_sdk_anthropic_502(upstream, make_proxy):
    proxy = await make_proxy(config(upstream, api_base=f"http://127.0.0.1:{free_port()}"))
    with pytest.raises(anthropic.InternalServerError) as exc:
        await ant(proxy).messages.create(model="claude-test", max_tokens=5, messages=MSG)
    assert exc.value.status_code == 502
    # a stream that fails before its first byte: the error comes as a status, not an SSE event
    with pytest.raises(anthropic.InternalServerError) as exc:
        async with ant(proxy).messages.stream(model="claude-test", max_tokens=5, messages=MSG) as stream:
            await stream.get_final_message()
    assert exc.value.status_code == 502


async def test_sdk_retries_suppressed_by_x_should_retry(upstream, make_proxy):
    """A 502 after the proxy's own retries says x-should-retry: false, so an SDK with retries on
    does not multiply them: the upstream sees exactly 1 + num_retries requests."""
    proxy = await make_proxy(config(upstream, num_retries=0))
    upstream.push(*[reply_json(500, {})] * 6)
    with pytest.raises(openai.InternalServerError):
        await oai(proxy, max_retries=2).chat.completions.create(model="gpt-test", messages=MSG)
    assert len(upstream.requests) == 1
    with pytest.raises(anthropic.InternalServerError):
        await ant(proxy, max_retries=2).messages.create(model="claude-test", max_tokens=5, messages=MSG)
    assert len(upstream.requests) == 2
