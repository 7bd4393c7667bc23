"""Pass-through routes (issue 15, item 6): `{prefix}/...` forwarded to the route's `api_base`
as it is, through the same chain as the data plane. Through the real openai and anthropic
SDKs and raw HTTP against the recording fake upstream."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import aiohttp
import anthropic
import openai
import orjson
import pytest
from aiohttp import web
from yarl import URL

from llmproxy.config import RESERVED_SEGMENTS, ConfigError, Passthrough, parse_config
from llmproxy.passthrough import REQUEST_HEADERS
from llmproxy.server import Gateway
from llmproxy.testing import reply_json

from .conftest import MASTER, needs, openai_config
from .test_cli import run

ADMIN = {"Authorization": f"Bearer {MASTER}"}
ROUTE_KEY = "sk-route-openai-secret"
ANT_ROUTE_KEY = "sk-ant-route-secret"
FILE = {"id": "file-abc", "object": "file", "bytes": 5, "created_at": 1, "filename": "batch.jsonl",
        "purpose": "batch", "status": "processed"}


def config(upstream, **extra):
    routes = [{"prefix": "/openai", "provider": "openai", "api_base": upstream.url, "api_key": ROUTE_KEY,
               "timeout": 5},
              {"prefix": "/anthropic", "provider": "anthropic", "api_base": upstream.url,
               "api_key": ANT_ROUTE_KEY}]
    return openai_config(upstream, passthrough=extra.pop("passthrough", routes), **extra)


async def new_key(proxy, **fields) -> str:
    async with aiohttp.ClientSession(headers=ADMIN) as s:
        async with s.post(proxy.url + "/key/generate", json=fields) as r:
            assert r.status == 200, await r.text()
            return (await r.json())["key"]


def passthrough_records(proxy) -> list:
    return [r for r in proxy.records if r.api == "passthrough"]


def no_client_key(got, key: str) -> None:
    """Upstream saw the route's key and nothing of the client's."""
    assert key not in str(list(got.headers.items()))
    assert "x-llmproxy" not in str(list(got.headers.items())).lower()


# ---------------------------------------------------------------- uploads and downloads


@needs("auth")
async def test_sdk_file_upload_arrives_whole_with_the_routes_key(upstream, make_proxy):
    proxy = await make_proxy(config(upstream, middlewares=["auth"]))
    key = await new_key(proxy)
    content = os.urandom(300_000) + b"\r\n--not-a-boundary\r\n" + os.urandom(300_000)
    upstream.push(reply_json(200, FILE))
    async with openai.AsyncOpenAI(base_url=proxy.url + "/openai/v1", api_key=key, max_retries=0) as oai:
        made = await oai.files.create(file=("batch.jsonl", content, "application/jsonl"), purpose="batch")
    assert made.id == "file-abc"
    got = upstream.requests[-1]
    assert (got.method, got.path, got.query) == ("POST", "/v1/files", "")
    assert got.headers["Authorization"] == f"Bearer {ROUTE_KEY}"
    no_client_key(got, key)
    ctype = got.headers["Content-Type"]
    assert ctype.startswith("multipart/form-data; boundary=")
    boundary = ctype.split("boundary=", 1)[1].strip('"').encode()
    parts = got.body.split(b"--" + boundary)
    file_part = next(p for p in parts if b'name="file"' in p)
    assert file_part.split(b"\r\n\r\n", 1)[1][:-2] == content  # the file's bytes, exactly
    assert any(b'name="purpose"' in p and p.endswith(b"\r\n\r\nbatch\r\n") for p in parts)
    rec = proxy.records[-1]
    assert (rec.api, rec.status, rec.extra["passthrough"], rec.path) == ("passthrough", 200, "/openai", "/openai/v1/files")
    assert rec.key_id is not None and rec.deployment == "passthrough:/openai" and rec.provider == "openai"


async def test_raw_multipart_upload_is_byte_identical_and_not_bound_by_the_json_limit(upstream, make_proxy):
    """A body larger than server.max_body_bytes but within the route's max_body_bytes is
    streamed through (it is never read whole), byte for byte, with its Content-Length."""
    routes = [{"prefix": "/openai", "provider": "openai", "api_base": upstream.url, "api_key": ROUTE_KEY,
               "max_body_bytes": 800_000}]
    proxy = await make_proxy(config(upstream, passthrough=routes, server={"max_body_bytes": 100_000}))
    boundary = "llmproxy-test-boundary"
    content = os.urandom(700_000)  # past server.max_body_bytes; the fake upstream reads at most 1 MB
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x.bin\"\r\n"
            f"Content-Type: application/octet-stream\r\n\r\n").encode() + content + f"\r\n--{boundary}--\r\n".encode()
    upstream.push(reply_json(200, FILE))
    headers = {"Authorization": f"Bearer {MASTER}", "Content-Type": f"multipart/form-data; boundary={boundary}"}
    async with aiohttp.ClientSession() as s:
        async with s.post(proxy.url + "/openai/v1/files", data=body, headers=headers) as r:
            assert r.status == 200, await r.text()
            assert (await r.json())["id"] == "file-abc"
    got = upstream.requests[-1]
    assert got.body == body
    assert got.headers["Content-Type"] == f"multipart/form-data; boundary={boundary}"
    assert got.headers["Content-Length"] == str(len(body)) and "Transfer-Encoding" not in got.headers
    assert got.headers["Authorization"] == f"Bearer {ROUTE_KEY}"


async def test_uploads_over_the_routes_limit_get_413(upstream, make_proxy):
    routes = [{"prefix": "/openai", "provider": "openai", "api_base": upstream.url, "max_body_bytes": 1000}]
    proxy = await make_proxy(config(upstream, passthrough=routes))
    headers = {"Authorization": f"Bearer {MASTER}", "Content-Type": "application/octet-stream"}

    async def chunks():  # no Content-Length: the proxy only learns the size as it streams
        for _ in range(10):
            yield b"x" * 500

    async with aiohttp.ClientSession() as s:
        async with s.post(proxy.url + "/openai/v1/uploads/u/parts", data=b"x" * 1001, headers=headers) as r:
            assert r.status == 413 and (await r.json())["error"]["code"] == "request_too_large"
        async with s.post(proxy.url + "/openai/v1/uploads/u/parts", data=chunks(), headers=headers) as r:
            assert r.status == 413 and (await r.json())["error"]["code"] == "request_too_large"
    assert upstream.requests == []  # the first never left; the second was cut: upstream never saw its end
    assert [r.status for r in proxy.records] == [413, 413]


async def test_a_download_streams_chunk_by_chunk(upstream, make_proxy):
    """The second half of the file is sent upstream only once the client has the first:
    the proxy relays as it arrives (no wait on time)."""
    proxy = await make_proxy(config(upstream))
    first, second = os.urandom(70_000), os.urandom(90_000)
    client_has_first = asyncio.Event()

    async def download(request, got):
        resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream",
                                           "Content-Disposition": 'attachment; filename="out.jsonl"'})
        await resp.prepare(request)
        await resp.write(first)
        await asyncio.wait_for(client_has_first.wait(), 10)
        await resp.write(second)
        await resp.write_eof()
        return resp

    upstream.push(download)
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {MASTER}"}) as s:
        async with s.get(proxy.url + "/openai/v1/files/file-abc/content") as r:
            assert r.status == 200
            assert r.headers["Content-Disposition"] == 'attachment; filename="out.jsonl"'
            assert await r.content.readexactly(len(first)) == first
            client_has_first.set()
            assert await r.read() == second
    assert upstream.requests[-1].path == "/v1/files/file-abc/content"
    assert proxy.records[-1].status == 200 and proxy.records[-1].ttfb_s is not None


async def test_sdk_download_and_list_with_a_query(upstream, make_proxy):
    proxy = await make_proxy(config(upstream))
    page = {"object": "list", "data": [FILE], "has_more": False, "first_id": "file-abc", "last_id": "file-abc"}
    upstream.push(reply_json(200, page), reply_json(200, b"line one\nline two\n"))
    async with openai.AsyncOpenAI(base_url=proxy.url + "/openai/v1", api_key=MASTER, max_retries=0) as oai:
        listed = await oai.files.list(limit=2, purpose="batch")
        assert [f.id for f in listed.data] == ["file-abc"]
        content = await oai.files.content("file-abc")
        assert content.content == b"line one\nline two\n"
    got = upstream.requests[0]
    assert (got.method, got.path, got.query) == ("GET", "/v1/files", "limit=2&purpose=batch")
    assert got.headers["Authorization"] == f"Bearer {ROUTE_KEY}" and got.body == b""
    no_client_key(got, MASTER)
    assert upstream.requests[1].path == "/v1/files/file-abc/content"
    assert [(r.api, r.status, r.extra["passthrough"]) for r in proxy.records] == [("passthrough", 200, "/openai")] * 2


async def test_raw_json_get_keeps_the_query_as_sent(upstream, make_proxy):
    proxy = await make_proxy(config(upstream))
    upstream.push(reply_json(200, {"object": "list", "data": []}))
    url = URL(proxy.url + "/openai/v1/batches?limit=2&after=batch_%2Fx&tag=a+b", encoded=True)
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {MASTER}"}) as s:
        async with s.get(url) as r:
            assert r.status == 200 and await r.json() == {"object": "list", "data": []}
    got = upstream.requests[-1]
    assert (got.method, got.path, got.query) == ("GET", "/v1/batches", "limit=2&after=batch_%2Fx&tag=a+b")


async def test_any_method_and_a_204(upstream, make_proxy):
    proxy = await make_proxy(config(upstream))

    async def no_content(request, got):
        return web.Response(status=204)

    upstream.push(no_content, reply_json(200, {"ok": True}))
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {MASTER}"}) as s:
        async with s.delete(proxy.url + "/openai/v1/files/file-abc") as r:
            assert r.status == 204 and await r.read() == b""
        async with s.patch(proxy.url + "/openai/v1/things/1", json={"a": 1}) as r:
            assert r.status == 200
    assert [(g.method, g.path) for g in upstream.requests] == [("DELETE", "/v1/files/file-abc"),
                                                              ("PATCH", "/v1/things/1")]
    assert upstream.requests[1].json == {"a": 1}


# ------------------------------------------------------------------ auth and models


@needs("auth")
async def test_no_key_or_a_wrong_key_is_401_before_anything_goes_upstream(upstream, make_proxy):
    proxy = await make_proxy(config(upstream, middlewares=["auth"]))
    async with aiohttp.ClientSession() as s:
        for headers in ({}, {"Authorization": "Bearer sk-wrong"}, {"x-api-key": "sk-wrong"}):
            async with s.post(proxy.url + "/openai/v1/files", data=b"x", headers=headers) as r:
                assert r.status == 401
                assert (await r.json())["error"]["type"] == "authentication_error"
        async with s.get(proxy.url + "/anthropic/v1/messages/batches",
                         headers={"anthropic-version": "2023-06-01"}) as r:
            assert r.status == 401  # in Anthropic's shape on an Anthropic client's request
            assert (await r.json())["type"] == "error"
    assert upstream.requests == []
    assert [r.status for r in proxy.records] == [401] * 4 and {r.api for r in proxy.records} == {"passthrough"}


async def test_the_master_gate_guards_the_route_without_auth(upstream, make_proxy):
    proxy = await make_proxy(config(upstream))
    upstream.push(reply_json(200, {"object": "list", "data": []}))
    async with aiohttp.ClientSession() as s:
        async with s.get(proxy.url + "/openai/v1/batches") as r:
            assert r.status == 401
        async with s.get(proxy.url + "/openai/v1/batches", headers={"Authorization": "Bearer sk-nope"}) as r:
            assert r.status == 401
        async with s.get(proxy.url + "/openai/v1/batches", headers={"Authorization": f"Bearer {MASTER}"}) as r:
            assert r.status == 200
    assert len(upstream.requests) == 1
    no_client_key(upstream.requests[0], MASTER)


@needs("auth")
async def test_a_keys_model_list_applies_to_a_json_body_naming_a_model(upstream, make_proxy):
    proxy = await make_proxy(config(upstream, middlewares=["auth"]))
    key = await new_key(proxy, models=["gpt-test", "gpt-image-1"])
    image = {"created": 1, "data": [{"b64_json": "aGk="}],
             "usage": {"input_tokens": 12, "output_tokens": 30, "total_tokens": 42,
                       "input_tokens_details": {"text_tokens": 12, "image_tokens": 0}}}
    upstream.push(reply_json(200, image))
    async with openai.AsyncOpenAI(base_url=proxy.url + "/openai/v1", api_key=key, max_retries=0) as oai:
        with pytest.raises(openai.PermissionDeniedError) as denied:
            await oai.images.generate(model="dall-e-3", prompt="a cat")
        assert "dall-e-3" in denied.value.message
        made = await oai.images.generate(model="gpt-image-1", prompt="a cat")
        assert made.data[0].b64_json == "aGk="
        upstream.push(reply_json(200, image))
        await oai.images.generate(model="gpt-test", prompt="a cat")  # a configured name: the record's model
    assert len(upstream.requests) == 2  # the refused one never left
    got = upstream.requests[0]
    assert got.path == "/v1/images/generations" and got.json == {"model": "gpt-image-1", "prompt": "a cat"}
    no_client_key(got, key)
    refused, served, configured = passthrough_records(proxy)
    assert (refused.status, refused.requested_model, refused.error_type) == (403, "dall-e-3", "permission_error")
    assert (served.model, served.requested_model, configured.model) == (None, "gpt-image-1", "gpt-test")
    assert (served.status, served.prompt_tokens, served.completion_tokens) == (200, 12, 30)
    assert served.spend == 0


@needs("auth")
async def test_a_duplicate_model_key_reaches_upstream_as_checked(upstream, make_proxy):
    """The body that names a model goes upstream as parsed: a server that keeps the first of
    two `model` keys cannot be handed another model than the one allowed."""
    proxy = await make_proxy(config(upstream, middlewares=["auth"]))
    key = await new_key(proxy, models=["gpt-image-1"])
    upstream.push(reply_json(200, {"created": 1, "data": []}))
    raw = b'{"model": "dall-e-3", "prompt": "x", "model": "gpt-image-1"}'
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    async with aiohttp.ClientSession() as s:
        async with s.post(proxy.url + "/openai/v1/images/generations", data=raw, headers=headers) as r:
            assert r.status == 200
        for bad in (b'{"model": "gpt-image-1", "n": NaN}', b'{"model": 3}'):
            async with s.post(proxy.url + "/openai/v1/images/generations", data=bad, headers=headers) as r:
                assert r.status == 400
    assert upstream.requests[0].body == b'{"model":"gpt-image-1","prompt":"x"}'
    assert len(upstream.requests) == 1


async def test_a_json_body_without_a_model_goes_as_sent(upstream, make_proxy):
    proxy = await make_proxy(config(upstream))
    upstream.push(reply_json(200, {"id": "batch_1", "object": "batch"}))
    raw = b'{ "input_file_id": "file-abc",\n  "endpoint": "/v1/chat/completions", "completion_window": "24h" }'
    async with openai.AsyncOpenAI(base_url=proxy.url + "/openai/v1", api_key=MASTER, max_retries=0) as oai:
        await oai.batches.create(input_file_id="file-abc", endpoint="/v1/chat/completions", completion_window="24h")
    assert upstream.requests[0].json == {"input_file_id": "file-abc", "endpoint": "/v1/chat/completions",
                                         "completion_window": "24h"}
    upstream.push(reply_json(200, {"id": "batch_1", "object": "batch"}))
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {MASTER}"}) as s:
        async with s.post(proxy.url + "/openai/v1/batches", data=raw,
                          headers={"Content-Type": "application/json"}) as r:
            assert r.status == 200
    assert upstream.requests[1].body == raw  # byte for byte


# --------------------------------------------------------------------- records, usage


async def test_one_record_per_request_with_usage_from_a_json_answer(upstream, make_proxy):
    proxy = await make_proxy(config(upstream))
    upstream.push(
        reply_json(200, {"id": "modr-1", "results": [], "usage": {"prompt_tokens": 9, "total_tokens": 9}}),
        reply_json(200, {"object": "list", "data": []}),
        reply_json(400, {"error": {"message": "bad purpose", "type": "invalid_request_error"}}),
        reply_json(200, {"id": "msgbatch_1", "type": "message_batch",
                         "usage": {"input_tokens": 4, "output_tokens": 6, "cache_read_input_tokens": 2}}))
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {MASTER}"}) as s:
        async with s.post(proxy.url + "/openai/v1/moderations", json={"input": "hi"}) as r:
            assert r.status == 200
        async with s.get(proxy.url + "/openai/v1/files") as r:
            assert r.status == 200
        async with s.post(proxy.url + "/openai/v1/files", data=b"--x--", headers={"Content-Type": "text/plain"}) as r:
            assert r.status == 400 and (await r.json())["error"]["message"] == "bad purpose"  # upstream's, unchanged
        async with s.post(proxy.url + "/anthropic/v1/messages/batches", json={"requests": []},
                          headers={"anthropic-version": "2023-06-01"}) as r:
            assert r.status == 200
    assert [(r.api, r.status, r.extra["passthrough"], r.prompt_tokens, r.completion_tokens) for r in proxy.records] \
        == [("passthrough", 200, "/openai", 9, 0), ("passthrough", 200, "/openai", 0, 0),
            ("passthrough", 400, "/openai", 0, 0), ("passthrough", 200, "/anthropic", 6, 6)]
    assert proxy.records[3].cached_tokens == 2 and proxy.records[3].provider == "anthropic"
    assert [a.outcome for r in proxy.records for a in r.attempts] == ["ok", "ok", "http_400", "ok"]


async def test_usage_is_not_read_from_a_large_answer(upstream, make_proxy, monkeypatch):
    import llmproxy.passthrough as pt

    monkeypatch.setattr(pt, "SNIFF_BYTES", 100)
    proxy = await make_proxy(config(upstream))
    big = {"data": ["x" * 200], "usage": {"prompt_tokens": 5, "completion_tokens": 5}}
    upstream.push(reply_json(200, big), reply_json(200, {"usage": {"prompt_tokens": 5, "completion_tokens": 5}}))
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {MASTER}"}) as s:
        for _ in range(2):
            async with s.post(proxy.url + "/openai/v1/whatever", json={"q": 1}) as r:
                assert r.status == 200 and (await r.json())["usage"]["prompt_tokens"] == 5
    assert [r.prompt_tokens for r in proxy.records] == [0, 5]


# ------------------------------------------------------------------------- headers


async def test_header_hygiene_both_ways(upstream, make_proxy):
    proxy = await make_proxy(config(upstream))

    async def answer(request, got):
        return web.Response(body=b'{"ok": true}', content_type="application/json", headers={
            "Set-Cookie": "session=upstream", "x-ratelimit-remaining-requests": "10", "openai-organization": "op-org",
            "Connection": "keep-alive, x-hop", "x-hop": "1", "Retry-After": "7", "openai-processing-ms": "12",
            "Content-Disposition": "inline"})

    upstream.push(answer)
    sent = {"Authorization": f"Bearer {MASTER}", "x-api-key": MASTER, "api-key": MASTER, "Cookie": "c=1",
            "OpenAI-Organization": "org-client", "OpenAI-Project": "proj", "Connection": "x-client-hop",
            "x-client-hop": "1", "User-Agent": "client/1", "OpenAI-Beta": "assistants=v2",
            "Idempotency-Key": "idem-1", "Accept": "application/json", "X-Custom": "no",
            "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}
    async with aiohttp.ClientSession() as s:
        async with s.post(proxy.url + "/openai/v1/files", data=b"{}", headers=sent) as r:
            assert r.status == 200
            shown = {k.lower(): v for k, v in r.headers.items()}
    got = {k.lower(): v for k, v in upstream.requests[0].headers.items()}
    assert got["authorization"] == f"Bearer {ROUTE_KEY}" and got["accept-encoding"] == "identity"
    assert (got["openai-beta"], got["idempotency-key"], got["accept"]) == ("assistants=v2", "idem-1",
                                                                           "application/json")
    assert got["traceparent"].startswith("00-0af7651916cd43dd8448eb211c80319c-")
    for name in ("x-api-key", "api-key", "cookie", "openai-organization", "openai-project", "x-client-hop",
                 "x-custom"):
        assert name not in got
    assert got["user-agent"] != "client/1"
    no_client_key(upstream.requests[0], MASTER)
    # (sentry-trace and baggage: added to every outgoing request once a test has installed Sentry's
    # aiohttp integration, which patches the client session process-wide)
    assert set(got) - {"sentry-trace", "baggage"} <= set(REQUEST_HEADERS) | {
        "authorization", "accept-encoding", "host", "content-length", "user-agent"}
    for name in ("set-cookie", "x-ratelimit-remaining-requests", "openai-organization", "x-hop"):
        assert name not in shown
    assert (shown["retry-after"], shown["content-disposition"], shown["openai-processing-ms"]) == ("7", "inline", "12")
    assert shown["x-request-id"] == shown["request-id"]


async def test_the_anthropic_route_sends_x_api_key_and_a_version(upstream, make_proxy):
    proxy = await make_proxy(config(upstream))
    batches = {"data": [], "has_more": False, "first_id": None, "last_id": None}
    upstream.push(reply_json(200, batches), reply_json(200, batches))
    async with anthropic.AsyncAnthropic(base_url=proxy.url + "/anthropic", api_key=MASTER, max_retries=0) as ant:
        page = await ant.messages.batches.list(limit=3)
        assert page.data == []
    got = upstream.requests[0]
    assert (got.path, got.query, got.headers["x-api-key"]) == ("/v1/messages/batches", "limit=3", ANT_ROUTE_KEY)
    assert got.headers["anthropic-version"] == ant.default_headers["anthropic-version"]  # the client's, as sent
    assert "Authorization" not in got.headers
    no_client_key(got, MASTER)
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {MASTER}"}) as s:
        async with s.get(proxy.url + "/anthropic/v1/messages/batches") as r:  # no version sent: the default
            assert r.status == 200
    assert upstream.requests[1].headers["anthropic-version"] == "2023-06-01"


# ------------------------------------------------------------------ paths, failures


@pytest.mark.parametrize("path", [
    "/openai/v1/../../key/generate", "/openai/v1/files/../x", "/openai/%2e%2e/key", "/openai/v1/%2E./x",
    "/openai/./v1", "/openai/v1%2F..%2Fx", "/openai/v1/a%5Cb", "/openai//evil.example/x",
    "/openai/http://evil.example/x", "/openai/https:%2F%2Fevil.example/x", "/openai/v1//files",
])
async def test_a_path_leaving_the_route_is_refused(upstream, make_proxy, path):
    proxy = await make_proxy(config(upstream))
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.server.port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {MASTER}\r\n"
                 f"Connection: close\r\n\r\n".encode())
    answer = await reader.read()
    writer.close()
    assert answer.startswith(b"HTTP/1.1 400 "), answer[:200]
    assert b"plain path under the route" in answer
    assert upstream.requests == []
    assert proxy.records[-1].status == 400 and proxy.records[-1].api == "passthrough"


async def test_an_unreachable_upstream_is_502_and_a_path_outside_any_route_404(upstream, make_proxy):
    routes = [{"prefix": "/down", "provider": "openai", "api_base": "http://127.0.0.1:9", "api_key": ROUTE_KEY}]
    proxy = await make_proxy(config(upstream, passthrough=routes))
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {MASTER}"}) as s:
        async with s.get(proxy.url + "/down/v1/files") as r:
            assert r.status == 502
            text = await r.text()
            assert ROUTE_KEY not in text and "9" not in text.split("could not be reached")[0].split("of")[0]
        async with s.get(proxy.url + "/down") as r:  # the prefix alone is no route
            assert r.status == 404
        async with s.get(URL(proxy.url + "/d%6Fwn/v1/files", encoded=True)) as r:
            assert r.status == 404
    assert [a.outcome for a in proxy.records[0].attempts] == ["connect_error"]


@needs("auth", "scheduler")
async def test_the_keys_rpm_limit_applies(upstream, make_proxy):
    proxy = await make_proxy(config(upstream, middlewares=["auth", "scheduler"]))
    key = await new_key(proxy, rpm_limit=1)
    upstream.push(reply_json(200, {"object": "list", "data": []}))
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {key}"}) as s:
        async with s.get(proxy.url + "/openai/v1/files") as r:
            assert r.status == 200
        async with s.get(proxy.url + "/openai/v1/files") as r:
            assert r.status == 429  # a minute to wait is past the lane's max_queue_wait: refused at once
            assert (await r.json())["error"]["code"] == "rate_limit_exceeded"
            assert r.headers["x-ratelimit-limit-requests"] == "1"
    assert len(upstream.requests) == 1


@needs("auth", "scheduler")
async def test_the_keys_tpm_is_charged_with_the_answers_usage(upstream, make_proxy):
    proxy = await make_proxy(config(upstream, middlewares=["auth", "scheduler"]))
    key = await new_key(proxy, tpm_limit=100)
    upstream.push(reply_json(200, {"usage": {"prompt_tokens": 300, "completion_tokens": 0}}))
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {key}"}) as s:
        async with s.post(proxy.url + "/openai/v1/embeddings-like", json={"input": "x"}) as r:
            assert r.status == 200  # nothing reserved up front: it starts
        async with s.get(proxy.url + "/openai/v1/files") as r:
            assert r.status == 429  # the 300 tokens it used put the key's bucket in debt: 2 minutes to wait
    assert len(upstream.requests) == 1


# --------------------------------------------------------------------------- config


BASE = {"models": [{"name": "m", "deployments": [{"provider": "mock"}]}]}


@pytest.mark.parametrize("route,message", [
    ({"prefix": "openai", "provider": "openai", "api_base": "https://x"}, "passthrough[0].prefix: 'openai' must be a path"),
    ({"prefix": "/openai/", "provider": "openai", "api_base": "https://x"}, "passthrough[0].prefix"),
    ({"prefix": "/", "provider": "openai", "api_base": "https://x"}, "passthrough[0].prefix"),
    ({"prefix": "/a/../b", "provider": "openai", "api_base": "https://x"}, "passthrough[0].prefix"),
    ({"prefix": "/v1/files", "provider": "openai", "api_base": "https://x"},
     "passthrough[0].prefix: '/v1/files' collides with the gateway's own paths"),
    ({"prefix": "/key", "provider": "openai", "api_base": "https://x"}, "passthrough[0].prefix: '/key' collides"),
    ({"prefix": "/health", "provider": "openai", "api_base": "https://x"}, "collides"),
    ({"prefix": "/metrics", "provider": "openai", "api_base": "https://x"}, "collides"),
    ({"prefix": "/x", "provider": "cohere", "api_base": "https://x"},
     "passthrough[0].provider: expected one of 'openai', 'anthropic'"),
    ({"prefix": "/x", "provider": "openai"}, "passthrough[0].api_base: required"),
    ({"prefix": "/x", "provider": "openai", "api_base": "ftp://x"}, "passthrough[0].api_base: 'ftp://x' must be"),
    ({"prefix": "/x", "provider": "openai", "api_base": "https://x/?a=1"}, "passthrough[0].api_base"),
    ({"prefix": "/x", "provider": "openai", "api_base": "https://x", "api_key": "os.environ/LLMPROXY_TEST_UNSET"},
     "passthrough[0].api_key: required (environment variable LLMPROXY_TEST_UNSET is not set)"),
    ({"prefix": "/x", "provider": "openai", "api_base": "https://x", "headers": {"Content-Length": "1"}},
     "passthrough[0].headers.Content-Length: the proxy sets this header itself"),
    ({"prefix": "/x", "provider": "openai", "api_base": "https://x", "max_body_bytes": 0},
     "passthrough[0].max_body_bytes: must be >= 1"),
    ({"prefix": "/x", "provider": "openai", "api_base": "https://x", "url": "y"}, "passthrough[0].url: unknown key"),
])
def test_config_errors_name_the_entry(route, message):
    with pytest.raises(ConfigError) as err:
        parse_config({**BASE, "passthrough": [route]}, env={})
    assert message in str(err.value)


def test_overlapping_prefixes_are_refused_and_the_key_may_come_from_the_environment():
    routes = [{"prefix": "/openai", "provider": "openai", "api_base": "https://api.openai.com",
               "api_key": "os.environ/PT_KEY"},
              {"prefix": "/openai/v2", "provider": "openai", "api_base": "https://x"}]
    with pytest.raises(ConfigError) as err:
        parse_config({**BASE, "passthrough": routes}, env={"PT_KEY": "sk-from-env"})
    assert str(err.value) == "passthrough[1].prefix: '/openai/v2' overlaps passthrough[0].prefix '/openai'"
    config = parse_config({**BASE, "passthrough": routes[:1]}, env={"PT_KEY": "sk-from-env"})
    assert config.passthrough == (Passthrough(prefix="/openai", provider="openai", api_base="https://api.openai.com",
                                              api_key="sk-from-env"),)


def test_check_config_names_a_bad_entry(tmp_path: Path):
    path = tmp_path / "c.yaml"
    path.write_text("models:\n  - name: a\n    deployments: [{provider: mock}]\n"
                    "passthrough:\n  - {prefix: /ok, provider: openai, api_base: 'https://x'}\n"
                    "  - {prefix: /team, provider: openai, api_base: 'https://x'}\n")
    out = run("check-config", "--config", str(path))
    assert out.returncode == 2
    assert "passthrough[1].prefix: '/team' collides with the gateway's own paths" in out.stderr


def test_the_reserved_segments_cover_every_route_of_the_gateway(tmp_path):
    """A prefix may not shadow the gateway's own paths: each registered route's first
    segment is in RESERVED_SEGMENTS (a new top-level route must be added there)."""
    cfg = parse_config({**BASE, "database": {"sqlite_path": str(tmp_path / "x.db")},
                        "spend": {"spill_path": str(tmp_path / "s.jsonl")},
                        "passthrough": [{"prefix": "/openai", "provider": "openai", "api_base": "https://x"}]})
    app = Gateway(cfg).app()
    firsts = set()
    for resource in app.router.resources():
        canonical = resource.canonical
        if canonical in ("/{tail}", "/openai/{tail}"):
            continue
        firsts.add(canonical.split("/")[1].split("{")[0])
    assert firsts and firsts <= RESERVED_SEGMENTS, firsts - RESERVED_SEGMENTS


async def test_a_passthrough_record_is_counted_by_the_metrics(upstream, make_proxy):
    proxy = await make_proxy(config(upstream))
    upstream.push(reply_json(200, {"usage": {"prompt_tokens": 3, "completion_tokens": 4}}))
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {MASTER}"}) as s:
        async with s.post(proxy.url + "/openai/v1/x", json={}) as r:
            assert r.status == 200
        async with s.get(proxy.url + "/metrics") as r:
            text = await r.text()
    assert 'deployment="passthrough:/openai"' in text


async def test_every_identity_middleware_guards_the_route_whatever_it_lists():
    """The pass-through chain takes identity middlewares that do not list "passthrough"
    (a plugin written before the API existed), and only the others that do."""
    from llmproxy.pipeline import chain_for
    from llmproxy.testing import make_context, ok_reply

    seen = []

    class Gate:
        stage, apis = "identity", frozenset({"chat"})

        async def __call__(self, ctx, call_next):
            seen.append("gate")
            return await call_next(ctx)

    class Later:
        apis = frozenset({"chat"})

        async def __call__(self, ctx, call_next):
            seen.append("later")
            return await call_next(ctx)

    class Listed(Later):
        apis = frozenset({"passthrough"})

        async def __call__(self, ctx, call_next):
            seen.append("listed")
            return await call_next(ctx)

    async def terminal(ctx):
        seen.append("terminal")
        return ok_reply()

    chain = chain_for("passthrough", [Gate(), Later(), Listed()], terminal=terminal)
    await chain(make_context({}, api="passthrough"))
    assert seen == ["gate", "listed", "terminal"]


@needs("tracing", "auth")
async def test_a_traced_passthrough_request(upstream, make_proxy):
    from .test_tracing import finished, spans_of

    proxy = await make_proxy(config(upstream, middlewares=["tracing", "auth"]))
    exporter = spans_of(proxy)
    upstream.push(reply_json(200, {"object": "list", "data": []}))
    async with aiohttp.ClientSession() as s:
        async with s.get(proxy.url + "/openai/v1/files") as r:
            assert r.status == 401
        async with s.get(proxy.url + "/openai/v1/files", headers={"Authorization": f"Bearer {MASTER}"}) as r:
            assert r.status == 200
    spans = await finished(exporter, 3)
    names = sorted(s.name for s in spans)
    # the route's template names the span (few names), the path is its url.path
    assert names == ["GET /openai/{tail}", "GET /openai/{tail}", "llmproxy.passthrough"]
    assert {s.attributes["url.path"] for s in spans if s.name.startswith("GET")} == {"/openai/v1/files"}
    inner = next(s for s in spans if s.name == "llmproxy.passthrough")
    assert inner.attributes["llmproxy.passthrough.prefix"] == "/openai"
    assert all(r.trace_id for r in passthrough_records(proxy))


async def test_a_client_leaving_mid_download_cuts_the_upstream(upstream, make_proxy):
    proxy = await make_proxy(config(upstream))

    async def endless(request, got):
        resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        await resp.prepare(request)
        for _ in range(10_000):  # until the proxy closes the connection
            await resp.write(b"x" * 4096)
            await asyncio.sleep(0.005)
        return resp

    upstream.push(endless)
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {MASTER}"}) as s:
        resp = await s.get(proxy.url + "/openai/v1/files/file-abc/content")
        assert len(await resp.content.readexactly(20_000)) == 20_000
        resp.close()
    await asyncio.wait_for(upstream.disconnected.wait(), 10)
    loop = asyncio.get_running_loop()
    end = loop.time() + 10
    while not passthrough_records(proxy) and loop.time() < end:
        await asyncio.sleep(0.01)
    rec = passthrough_records(proxy)[-1]
    assert rec.client_disconnected and rec.status == 499
