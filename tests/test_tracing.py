"""The `tracing` middleware (issue 13): the spans of a request through the real chain (an
in-memory exporter), rejections traced, W3C trace context to the upstream, and OTLP/HTTP
export from a real `llmproxy serve` to a local receiver that decodes the protobuf."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
import urllib.request
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import web

from .conftest import MASTER, needs, openai_config

pytestmark = needs("tracing")

AUTH = {"Authorization": f"Bearer {MASTER}"}
CLIENT_TRACE = "0af7651916cd43dd8448eb211c80319c"
CLIENT_PARENT = "b7ad6b7169203331"
TRACEPARENT = f"00-{CLIENT_TRACE}-{CLIENT_PARENT}-01"


def spans_of(proxy) -> Any:
    """An in-memory exporter on the proxy's tracing middleware."""
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from llmproxy.middlewares.tracing import Tracing

    (tracing,) = [m for m in proxy.gateway.middlewares if isinstance(m, Tracing)]
    exporter = InMemorySpanExporter()
    tracing.add_span_processor(SimpleSpanProcessor(exporter))
    return exporter


async def finished(exporter, n: int, bound: float = 5.0) -> list:
    """The spans once `n` have ended (a request's server span ends in its cleanups)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + bound
    while len(exporter.get_finished_spans()) < n and loop.time() < end:
        await asyncio.sleep(0.01)
    return list(exporter.get_finished_spans())


def by_name(spans) -> dict[str, Any]:
    return {s.name: s for s in spans}


async def make_key(proxy, **fields) -> str:
    async with aiohttp.ClientSession(headers=AUTH) as s:
        if "team_id" in fields:
            async with s.post(proxy.url + "/team/new", json={"team_id": fields["team_id"]}) as r:
                assert r.status == 200
        async with s.post(proxy.url + "/key/generate", json=fields) as r:
            assert r.status == 200
            return (await r.json())["key"]


@needs("auth", "pii", "scheduler")
async def test_a_streamed_chat_through_the_chain_makes_every_span(make_proxy, upstream):
    config = openai_config(upstream, middlewares=["tracing", "auth", {"pii": {"mode": "mask"}},
                                                  {"scheduler": {}}])
    config["models"][0]["deployments"][0]["model"] = "gpt-upstream"
    proxy = await make_proxy(config)
    exporter = spans_of(proxy)
    key = await make_key(proxy, key_alias="ci-bot", team_id="org-1", user_id="user-7")
    exporter.clear()
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key=key, max_retries=0)
    try:
        stream = await client.chat.completions.create(
            model="gpt-test", messages=[{"role": "user", "content": "mail jane.doe@example.com"}], stream=True,
            max_tokens=64, temperature=0.2, top_p=0.9, stream_options={"include_usage": True},
            metadata={"session_id": "chat-42"})
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    finally:
        await client.close()
    assert text == upstream.answer_text()
    spans = by_name(await finished(exporter, 5))
    server = spans["POST /v1/chat/completions"]
    attempt = spans["chat gpt-upstream"]
    from opentelemetry.trace import SpanKind

    assert server.kind == SpanKind.SERVER and attempt.kind == SpanKind.CLIENT
    assert server.attributes["http.response.status_code"] == 200
    assert server.attributes["http.request.method"] == "POST"
    assert server.attributes["url.path"] == "/v1/chat/completions"
    assert server.attributes["llmproxy.key_alias"] == "ci-bot" and server.attributes["llmproxy.team_id"] == "org-1"
    import re

    assert re.fullmatch(r"[0-9a-f]{24}", server.attributes["llmproxy.request_id"])  # the server's own id
    assert key not in json.dumps([dict(s.attributes) for s in spans.values()])  # never a key
    for name in ("llmproxy.auth", "llmproxy.pii", "llmproxy.scheduler.wait", "chat gpt-upstream"):
        span = spans[name]
        assert span.context.trace_id == server.context.trace_id and span.parent.span_id == server.context.span_id
    assert spans["llmproxy.pii"].attributes["llmproxy.pii.found"] == 1
    # Langfuse's trace user and session, and its generation type on the attempt
    assert (server.attributes["langfuse.user.id"], server.attributes["langfuse.session.id"]) == ("user-7", "chat-42")
    assert attempt.attributes["langfuse.observation.type"] == "generation"
    assert spans["llmproxy.scheduler.wait"].attributes["llmproxy.scheduler.wait_seconds"] >= 0
    a = attempt.attributes
    assert (a["gen_ai.operation.name"], a["gen_ai.provider.name"], a["gen_ai.request.model"]) == \
        ("chat", "openai", "gpt-upstream")
    assert (a["gen_ai.request.max_tokens"], a["gen_ai.request.temperature"], a["gen_ai.request.top_p"]) == \
        (64, 0.2, 0.9)
    assert (a["gen_ai.response.id"], a["gen_ai.response.model"], tuple(a["gen_ai.response.finish_reasons"])) == \
        ("chatcmpl-fake", "gpt-upstream", ("stop",))
    assert (a["gen_ai.usage.input_tokens"], a["gen_ai.usage.output_tokens"]) == (11, len(upstream.text_chunks))
    assert (a["server.address"], a["server.port"]) == ("127.0.0.1", upstream.port)
    assert a["llmproxy.time_to_first_chunk_s"] >= 0 and "error.type" not in a
    assert [e.name for e in attempt.events] == ["gen_ai.first_chunk"]
    assert attempt.end_time <= server.end_time  # the server span covers the whole stream
    # the upstream got the attempt's context, not the client's
    sent = upstream.requests[-1].headers["traceparent"].split("-")
    assert sent[:3] == ["00", f"{attempt.context.trace_id:032x}", f"{attempt.context.span_id:016x}"]
    assert int(sent[3], 16) & 1  # sampled


@needs("auth", "scheduler")
async def test_a_401_a_404_and_a_429_each_make_a_server_span(make_proxy, upstream):
    config = openai_config(upstream, middlewares=["tracing", "auth", {"scheduler": {}}])
    config["models"][0]["deployments"][0].update({"rpm": 1, "burst": 1, "max_queue_wait": 0})
    proxy = await make_proxy(config)
    exporter = spans_of(proxy)
    key = await make_key(proxy)
    exporter.clear()
    body = {"model": "gpt-test", "messages": [{"role": "user", "content": "x"}]}
    async with aiohttp.ClientSession() as s:
        async def post(headers, json_body):
            async with s.post(proxy.url + "/v1/chat/completions", headers=headers, json=json_body) as r:
                await r.read()
                return r.status
        statuses = [await post({}, body), await post({"Authorization": f"Bearer {key}"}, {**body, "model": "nope"}),
                    await post({"Authorization": f"Bearer {key}"}, body),
                    await post({"Authorization": f"Bearer {key}"}, body)]
    assert statuses == [401, 404, 200, 429]
    spans = await finished(exporter, 4 + 4)
    servers = [s for s in spans if s.name == "POST /v1/chat/completions"]
    assert [s.attributes["http.response.status_code"] for s in servers] == [401, 404, 200, 429]
    assert [s.attributes.get("llmproxy.error.code") for s in servers] == \
        ["invalid_api_key", "model_not_found", None, "rate_limit_exceeded"]
    waits = [s for s in spans if s.name == "llmproxy.scheduler.wait"]
    assert len(waits) == 2 and waits[1].attributes["error.type"] == "rate_limit_exceeded"


async def test_an_unknown_path_is_a_server_span_without_its_path_as_name(make_proxy, upstream):
    proxy = await make_proxy(openai_config(upstream, middlewares=["tracing"]))
    exporter = spans_of(proxy)
    async with aiohttp.ClientSession() as s:
        async with s.post(proxy.url + "/v1/" + "x" * 5000, headers=AUTH) as r:
            assert r.status == 404
    (span,) = await finished(exporter, 1)
    assert span.name == "POST" and span.attributes["http.response.status_code"] == 404
    assert len(span.attributes["url.path"]) == 256  # a client's text on a span is bounded


@pytest.mark.parametrize("link", [False, True])
async def test_the_client_trace_is_the_parent_or_a_link(make_proxy, upstream, link):
    proxy = await make_proxy(openai_config(upstream, middlewares=[{"tracing": {"link_client_trace": link}}]))
    exporter = spans_of(proxy)
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key=MASTER, max_retries=0,
                                default_headers={"traceparent": TRACEPARENT, "tracestate": "vendor=1"})
    try:
        await client.chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": "x"}])
    finally:
        await client.close()
    spans = by_name(await finished(exporter, 2))
    server, attempt = spans["POST /v1/chat/completions"], spans["chat gpt-upstream"]
    sent = upstream.requests[-1].headers["traceparent"].split("-")
    assert sent[2] == f"{attempt.context.span_id:016x}" != CLIENT_PARENT  # a new parent: the attempt
    assert sent[1] == f"{server.context.trace_id:032x}"
    if link:
        assert sent[1] != CLIENT_TRACE and server.parent is None
        assert [(f"{ln.context.trace_id:032x}", f"{ln.context.span_id:016x}") for ln in server.links] == \
            [(CLIENT_TRACE, CLIENT_PARENT)]
    else:
        assert sent[1] == CLIENT_TRACE and f"{server.parent.span_id:016x}" == CLIENT_PARENT
        assert upstream.requests[-1].headers["tracestate"] == "vendor=1"


async def test_the_trace_id_is_in_the_access_log_line(make_proxy, upstream):
    from structlog.testing import capture_logs

    from llmproxy.accesslog import AccessLog

    proxy = await make_proxy(openai_config(upstream, middlewares=["tracing"]))
    exporter = spans_of(proxy)
    with capture_logs() as logs:
        async with aiohttp.ClientSession() as s:
            async with s.post(proxy.url + "/v1/chat/completions", headers=AUTH,
                              json={"model": "gpt-test", "messages": [{"role": "user", "content": "x"}]}) as r:
                assert r.status == 200
                await r.read()
        (server,) = [s for s in await finished(exporter, 2) if s.name.startswith("POST")]
        for sink in proxy.gateway.sinks:
            if isinstance(sink, AccessLog):
                sink.flush()
    (line,) = [e for e in logs if e["event"] == "request"]
    assert line["trace_id"] == f"{server.context.trace_id:032x}"


# --- OTLP/HTTP from a real process ------------------------------------------------------------


class Receiver:
    """A stand-in OTLP/HTTP collector: decodes each ExportTraceServiceRequest it is sent."""

    def __init__(self, auth: str | None = None) -> None:
        self.spans: list[tuple[str, Any]] = []  # (service.name, span)
        self.headers: list[dict[str, str]] = []
        self.auth = auth
        self.runner: web.AppRunner | None = None
        self.port = 0

    async def start(self, port: int = 0) -> "Receiver":
        app = web.Application()
        app.router.add_post("/v1/traces", self.traces)
        app.router.add_post("/api/public/otel/v1/traces", self.traces)  # Langfuse's path
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        await self.runner.cleanup()

    async def traces(self, request: web.Request) -> web.Response:
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

        self.headers.append(dict(request.headers))
        if self.auth is not None and request.headers.get("Authorization") != self.auth:
            return web.Response(status=401)
        msg = ExportTraceServiceRequest()
        msg.ParseFromString(await request.read())
        for rs in msg.resource_spans:
            service = next(a.value.string_value for a in rs.resource.attributes if a.key == "service.name")
            for ss in rs.scope_spans:
                for span in ss.spans:
                    self.spans.append((service, span))
        return web.Response(body=b"", content_type="application/x-protobuf")


def _serve(tmp_path, port: int, tracing: dict, env: dict | None = None) -> subprocess.Popen:
    import os
    import sys

    import yaml

    from .test_cli import wait_live

    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({
        "server": {"port": port}, "master_key": MASTER, "spend": {"enabled": False},
        "middlewares": [{"tracing": {"schedule_delay": 0.1, "export_timeout": 1, **tracing}}],
        "models": [{"name": "mock", "deployments": [{"provider": "mock", "chunks": 2}]}]}))
    proc = subprocess.Popen([sys.executable, "-m", "llmproxy", "serve", "--config", str(cfg)], cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})
    wait_live(port, proc)
    return proc


def _chat(port: int) -> int:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", method="POST",
                                 data=b'{"model":"mock","messages":[{"role":"user","content":"x"}]}',
                                 headers={"Authorization": f"Bearer {MASTER}", "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        resp.read()
        return resp.status


async def _until(predicate, bound: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + bound
    while not predicate() and loop.time() < end:
        await asyncio.sleep(0.05)


async def test_spans_reach_an_otlp_receiver_and_a_receiver_down_costs_requests_nothing(tmp_path):
    from .test_cli import free_port, stop

    receiver = await Receiver().start()
    port = free_port()
    proc = await asyncio.to_thread(_serve, tmp_path, port, {}, {
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{receiver.port}", "OTEL_SERVICE_NAME": "gw-test"})
    try:
        for _ in range(3):
            assert await asyncio.to_thread(_chat, port) == 200
        await _until(lambda: sum(1 for _, s in receiver.spans if s.name == "chat mock") >= 3)
        names = [s.name for _, s in receiver.spans]
        assert names.count("POST /v1/chat/completions") == 3 and names.count("chat mock") == 3
        assert {service for service, _ in receiver.spans} == {"gw-test"}
        attempt = next(s for _, s in receiver.spans if s.name == "chat mock")
        attrs = {a.key: a.value for a in attempt.attributes}
        assert attrs["gen_ai.operation.name"].string_value == "chat"
        assert attrs["gen_ai.usage.output_tokens"].int_value > 0

        await receiver.stop()  # the collector goes away: requests go on, spans are dropped and counted
        for _ in range(20):
            assert await asyncio.to_thread(_chat, port) == 200

        def dropped() -> float:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
                text = resp.read().decode()
            return sum(float(line.split()[-1]) for line in text.splitlines()
                       if line.startswith("llmproxy_tracing_spans_dropped_total"))
        loop = asyncio.get_running_loop()
        end = loop.time() + 15
        while await asyncio.to_thread(dropped) < 40 and loop.time() < end:
            await asyncio.sleep(0.2)
        assert await asyncio.to_thread(dropped) >= 40  # 20 requests, 2 spans each
    finally:
        assert await asyncio.to_thread(stop, proc) == 0
    assert "Traceback" not in proc.stderr.read()


async def test_the_langfuse_recipe(tmp_path):
    """Langfuse takes OTLP/HTTP at {LANGFUSE_HOST}/api/public/otel with basic auth of the
    public and secret keys: the recipe the README gives, against a stand-in."""
    import base64

    from .test_cli import free_port, stop

    token = base64.b64encode(b"pk-lf-test:sk-lf-test").decode()
    receiver = await Receiver(auth=f"Basic {token}").start()
    port = free_port()
    proc = await asyncio.to_thread(_serve, tmp_path, port, {}, {
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{receiver.port}/api/public/otel",
        "OTEL_EXPORTER_OTLP_HEADERS": f"Authorization=Basic%20{token}"})
    try:
        assert await asyncio.to_thread(_chat, port) == 200
        await _until(lambda: any(s.name == "chat mock" for _, s in receiver.spans))
        assert any(s.name == "chat mock" for _, s in receiver.spans)
        assert all(h.get("Authorization") == f"Basic {token}" for h in receiver.headers)
    finally:
        assert await asyncio.to_thread(stop, proc) == 0
        await receiver.stop()


def test_bad_tracing_options_are_config_errors():
    from llmproxy.config import ConfigError
    from llmproxy.plugins import Registry, check_config
    from llmproxy.config import parse_config

    models = [{"name": "m", "deployments": [{"provider": "mock"}]}]
    for options, fragment in (({"sampler": "sometimes"}, "sampler: expected one of"),
                              ({"sampler": "traceidratio", "sampler_arg": "2"}, "between 0 and 1"),
                              ({"endpoint": "http://127.0.0.1:1", "headers": {"a": "b"}, "protocol": "smoke"},
                               "protocol")):
        with pytest.raises(ConfigError) as info:
            cfg = parse_config({"models": models, "middlewares": [{"tracing": options}]})
            check_config(cfg, Registry.from_entry_points())
            from llmproxy.server import Gateway

            Gateway(cfg)
        assert fragment in str(info.value), (options, str(info.value))


@pytest.mark.parametrize("tracing", [True, False])
async def test_the_trace_id_is_on_the_spend_row(make_proxy, upstream, tracing):
    """With tracing, the request's own trace id; without, the client's, when its traceparent
    is a W3C one (a malformed one leaves none)."""
    proxy = await make_proxy(openai_config(upstream, middlewares=["tracing"] if tracing else []))
    exporter = spans_of(proxy) if tracing else None
    async with aiohttp.ClientSession() as s:
        for tp in (TRACEPARENT, "00-" + "z" * 32 + "-" + "1" * 16 + "-01", None):
            headers = {**AUTH, **({"traceparent": tp} if tp else {})}
            async with s.post(proxy.url + "/v1/chat/completions", headers=headers,
                              json={"model": "gpt-test", "messages": [{"role": "user", "content": "x"}]}) as r:
                assert r.status == 200
                await r.read()
    store = proxy.gateway.services.store
    loop = asyncio.get_running_loop()
    end = loop.time() + 10
    rows: list = []
    while len(rows) < 3 and loop.time() < end:
        rows = await store.spend_logs(page_size=10)
        await asyncio.sleep(0.1)
    rows.sort(key=lambda r: r.started_at)
    if tracing:
        servers = sorted((s for s in await finished(exporter, 6) if s.name.startswith("POST")),
                         key=lambda s: s.start_time)
        assert [r.trace_id for r in rows] == [f"{s.context.trace_id:032x}" for s in servers]
        assert rows[0].trace_id == CLIENT_TRACE
    else:
        assert [r.trace_id for r in rows] == [CLIENT_TRACE, None, None]
    async with aiohttp.ClientSession(headers=AUTH) as s:
        async with s.get(proxy.url + "/spend/logs") as r:
            listed = await r.json()
    assert {row["trace_id"] for row in listed} == {r.trace_id for r in rows}


def test_our_otlp_encoding_is_the_sdks():
    """`otlp.encode` writes what the SDK's encoder writes (decoded with opentelemetry-proto's
    own classes and compared), for every kind of value, event, link and status spans hold."""
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.trace import (Link, NonRecordingSpan, SpanContext, SpanKind, Status, StatusCode, TraceFlags,
                                     TraceState, set_span_in_context)

    from llmproxy.middlewares.tracing.otlp import encode

    provider = TracerProvider(resource=Resource.create({"service.name": "enc-test"}))
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("llmproxy")
    remote = SpanContext(int(CLIENT_TRACE, 16), int(CLIENT_PARENT, 16), True, TraceFlags(1),
                         TraceState([("vendor", "1")]))
    server = tracer.start_span("POST /v1/chat/completions", context=set_span_in_context(NonRecordingSpan(remote)),
                               kind=SpanKind.SERVER, attributes={"s": "é" * 70, "b": True, "i": -5, "big": 2**62,
                                                                 "f": 0.5, "ss": ["x", "y"], "ii": [1, 2]})
    attempt = tracer.start_span("chat gpt", context=set_span_in_context(server), kind=SpanKind.CLIENT,
                                links=[Link(remote, {"k": 1})])
    attempt.add_event("gen_ai.first_chunk", {"t": 0.01})
    attempt.set_status(Status(StatusCode.ERROR, "boom"))
    attempt.end()
    root = tracer.start_span("root", links=[Link(remote)])
    root.set_status(Status(StatusCode.OK))
    root.end()
    server.end()
    spans = exporter.get_finished_spans()
    ours, theirs = ExportTraceServiceRequest(), ExportTraceServiceRequest()
    ours.ParseFromString(encode(spans))
    theirs.ParseFromString(encode_spans(spans).SerializeToString())
    assert ours == theirs and len(ours.resource_spans[0].scope_spans[0].spans) == 3


@pytest.mark.parametrize("sampler, traceparent, recorded", [
    ("always_off", None, False),
    ("parentbased_always_on", f"00-{CLIENT_TRACE}-{CLIENT_PARENT}-00", False),  # the client did not sample
    ("parentbased_always_on", TRACEPARENT, True),
    ("traceidratio", None, True),  # sampler_arg 1: every trace
])
async def test_sampling_keeps_the_trace_moving_without_recording(make_proxy, upstream, sampler, traceparent,
                                                                 recorded):
    options = {"sampler": sampler, **({"sampler_arg": "1"} if sampler == "traceidratio" else {})}
    proxy = await make_proxy(openai_config(upstream, middlewares=[{"tracing": options}]))
    exporter = spans_of(proxy)
    headers = {**AUTH, **({"traceparent": traceparent} if traceparent else {})}
    async with aiohttp.ClientSession() as s:
        async with s.post(proxy.url + "/v1/chat/completions", headers=headers,
                          json={"model": "gpt-test", "messages": [{"role": "user", "content": "x"}]}) as r:
            assert r.status == 200
            await r.read()
    spans = await finished(exporter, 2, bound=1.0 if not recorded else 5.0)
    assert len(spans) == (2 if recorded else 0)
    sent = upstream.requests[-1].headers["traceparent"].split("-")
    assert int(sent[3], 16) & 1 == (1 if recorded else 0)  # the upstream is told whether it is sampled
    if traceparent:
        assert sent[1] == CLIENT_TRACE  # same trace either way


@pytest.mark.parametrize("key_user, body, expected", [
    ("u-key", {"user": "u-body", "metadata": {"session_id": "s1"}}, ("u-key", "s1")),  # the key's wins
    (None, {"user": "u-body"}, ("u-body", None)),  # OpenAI's user
    (None, {"metadata": {"user_id": "u-meta"}}, ("u-meta", None)),  # Anthropic's metadata.user_id
    (None, {"user": "x" * 201, "metadata": {"session_id": ["not", "text"]}}, (None, None)),  # what Langfuse drops
    (None, None, (None, None)),
])
def test_langfuse_user_and_session(key_user, body, expected):
    from llmproxy.middlewares.tracing.spans import _langfuse_ids

    assert _langfuse_ids(key_user, body) == expected


# --- capture_content ---------------------------------------------------------------------------


def _events_of(span) -> list[tuple[str, dict]]:
    return [(e.name, dict(e.attributes)) for e in span.events if e.name != "gen_ai.first_chunk"]


@pytest.mark.parametrize("stream", [False, True])
async def test_capture_content_records_prompts_and_answers_as_events(make_proxy, upstream, stream):
    proxy = await make_proxy(openai_config(upstream, middlewares=[{"tracing": {"capture_content": True}}]))
    exporter = spans_of(proxy)
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key=MASTER, max_retries=0)
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]
    try:
        if stream:
            async for _ in await client.chat.completions.create(model="gpt-test", messages=messages, stream=True):
                pass
        else:
            await client.chat.completions.create(model="gpt-test", messages=messages)
    finally:
        await client.close()
    attempt = by_name(await finished(exporter, 2))["chat gpt-upstream"]
    events = _events_of(attempt)
    assert events[:2] == [("gen_ai.system.message", {"content": "be brief"}),
                          ("gen_ai.user.message", {"content": "hello there"})]
    name, choice = events[2]
    assert name == "gen_ai.choice" and (choice["index"], choice["finish_reason"]) == (0, "stop")
    assert json.loads(choice["message"]) == {"role": "assistant", "content": upstream.answer_text()}
    assert "llmproxy.content_truncated" not in attempt.attributes


async def test_capture_content_anthropic_and_bounded(make_proxy, upstream):
    proxy = await make_proxy(openai_config(upstream, middlewares=[{"tracing": {"capture_content": True}}]))
    exporter = spans_of(proxy)
    import anthropic

    from llmproxy.middlewares.tracing.content import MAX_CHARS

    client = anthropic.AsyncAnthropic(base_url=proxy.url, api_key=MASTER, max_retries=0)
    try:
        await client.messages.create(model="claude-test", max_tokens=10, system="sys",
                                     messages=[{"role": "user", "content": "y" * (MAX_CHARS + 5000)}])
    finally:
        await client.close()
    attempt = by_name(await finished(exporter, 2))["chat claude-upstream"]
    events = _events_of(attempt)
    assert events[0] == ("gen_ai.system.message", {"content": "sys"})
    assert len(events[1][1]["content"]) == MAX_CHARS - 3  # the span's bound, after "sys"
    assert attempt.attributes["llmproxy.content_truncated"] is True
    assert events[2][0] == "gen_ai.choice" and events[2][1]["finish_reason"] == "end_turn"


@needs("pii")
async def test_capture_content_with_pii_is_masked_or_refused(make_proxy, upstream):
    from llmproxy.config import ConfigError, parse_config
    from llmproxy.plugins import Registry, check_config

    mws = [{"tracing": {"capture_content": True}}, {"pii": {"mode": "mask"}}]
    with pytest.raises(ConfigError) as refused:
        check_config(parse_config(openai_config(upstream, middlewares=mws)), Registry.from_entry_points())
    assert "middlewares[0].tracing.capture_content: true would record" in str(refused.value)
    assert "capture_content: masked" in str(refused.value)

    proxy = await make_proxy(openai_config(upstream, middlewares=[{"tracing": {"capture_content": "masked"}},
                                                                  {"pii": {"mode": "mask"}}]))
    exporter = spans_of(proxy)
    async with aiohttp.ClientSession() as s:
        async with s.post(proxy.url + "/v1/chat/completions", headers=AUTH, json={
                "model": "gpt-test", "messages": [{"role": "user", "content": "mail jane.doe@example.com"}]}) as r:
            assert r.status == 200
    attempt = by_name(await finished(exporter, 2))["chat gpt-upstream"]
    (user,) = [a for n, a in _events_of(attempt) if n == "gen_ai.user.message"]
    assert user["content"] == "mail <EMAIL_ADDRESS_1>"  # what the upstream saw, never the address
    assert "jane.doe" not in json.dumps([dict(e.attributes) for e in attempt.events])


async def test_no_content_is_recorded_by_default(make_proxy, upstream):
    proxy = await make_proxy(openai_config(upstream, middlewares=["tracing"]))
    exporter = spans_of(proxy)
    async with aiohttp.ClientSession() as s:
        async with s.post(proxy.url + "/v1/chat/completions", headers=AUTH, json={
                "model": "gpt-test", "messages": [{"role": "user", "content": "private words"}]}) as r:
            assert r.status == 200
    spans = await finished(exporter, 2)
    assert all(not _events_of(s) for s in spans)
    assert "private words" not in json.dumps([dict(s.attributes) for s in spans])


@pytest.mark.parametrize("value, parsed", [
    (TRACEPARENT, (int(CLIENT_TRACE, 16), int(CLIENT_PARENT, 16), 1)),
    (" " + TRACEPARENT, (int(CLIENT_TRACE, 16), int(CLIENT_PARENT, 16), 1)),
    (TRACEPARENT + "-extra", None),  # version 00 has exactly four fields
    ("01" + TRACEPARENT[2:] + "-extra", (int(CLIENT_TRACE, 16), int(CLIENT_PARENT, 16), 1)),  # a later version may add
    ("ff" + TRACEPARENT[2:], None),
    (f"00-{'0' * 32}-{CLIENT_PARENT}-01", None),
    (f"00-{CLIENT_TRACE}-{'0' * 16}-01", None),
    ("00-" + "z" * 32 + "-" + "1" * 16 + "-01", None),
    ("", None), (None, None),
])
def test_traceparent_is_read_as_w3c_says(value, parsed):
    """One reading for the record's trace id and for the tracing middleware's parent."""
    from llmproxy.validate import parse_traceparent

    assert parse_traceparent(value) == parsed


async def test_a_tracestate_too_long_is_left_out_not_cut(make_proxy, upstream):
    proxy = await make_proxy(openai_config(upstream, middlewares=["tracing"]))
    spans_of(proxy)
    async with aiohttp.ClientSession() as s:
        async with s.post(proxy.url + "/v1/chat/completions",
                          headers={**AUTH, "traceparent": TRACEPARENT, "tracestate": "a=" + "b" * 600},
                          json={"model": "gpt-test", "messages": [{"role": "user", "content": "x"}]}) as r:
            assert r.status == 200
    sent = upstream.requests[-1].headers
    assert sent["traceparent"].split("-")[1] == CLIENT_TRACE and "tracestate" not in sent
