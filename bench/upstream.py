#!/usr/bin/env python3
"""Mock LLM provider for the llmproxy benchmark.

An aiohttp server (uvloop) that answers like an OpenAI-compatible provider, and like
Anthropic's Messages API, as cheaply as it can: every response body and every SSE event
is encoded once per model name and then only written.

    POST /v1/chat/completions   non-stream: a small chat.completion with usage
                                stream:     24 chat.completion.chunk events (one word
                                            each; "usage": null on each when
                                            stream_options.include_usage), then the
                                            usage-only chunk (choices: []) when asked,
                                            then data: [DONE]
                                With "bench_chunk_delay_ms": D in the body (an
                                unknown field, forwarded by any proxy), D ms pass
                                between two events, so each is read on its own
    POST /v1/messages           Anthropic Messages, stream or not
    GET  /health/liveliness     readiness probe for the harness
    GET  /bench/stats           {"requests": n, ...}: how many model calls were served

Usage: python bench/upstream.py --port 9001 [--host 127.0.0.1] [--api-key KEY]

With --api-key the server answers 401 unless the request carries that key
(`Authorization: Bearer KEY`, or `x-api-key: KEY` on /v1/messages), as a real provider
does; this checks that the proxy sends the deployment's key and not the client's.
"""
from __future__ import annotations

import argparse
import asyncio

import orjson
from aiohttp import web

WORDS = (
    "The quick brown fox jumps over the lazy dog while seven bright stars "
    "watch silently above a calm and endless sea of silver light"
).split()
assert len(WORDS) == 24
N_EVENTS = len(WORDS)
CREATED = 1_700_000_000
PROMPT_TOKENS = 9
COMPLETION_TOKENS = N_EVENTS
MAX_CANNED = 32  # distinct model names kept pre-encoded; beyond that, encode per request


def _sse(obj: object) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def _anthropic_event(name: str, obj: object) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(obj) + b"\n\n"


class Canned:
    """Pre-encoded responses for one model name."""

    def __init__(self, model: str) -> None:
        text = " ".join(WORDS)
        openai_usage = {
            "prompt_tokens": PROMPT_TOKENS,
            "completion_tokens": COMPLETION_TOKENS,
            "total_tokens": PROMPT_TOKENS + COMPLETION_TOKENS,
        }
        self.completion = orjson.dumps({
            "id": "chatcmpl-bench0001",
            "object": "chat.completion",
            "created": CREATED,
            "model": model,
            "system_fingerprint": "fp_bench",
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": text, "refusal": None},
                "logprobs": None,
                "finish_reason": "stop",
            }],
            "usage": openai_usage,
        })

        def chunk(i: int, with_usage_field: bool) -> bytes:
            delta: dict = {"content": WORDS[i] if i == N_EVENTS - 1 else WORDS[i] + " "}
            if i == 0:
                delta = {"role": "assistant", **delta}
            obj: dict = {
                "id": "chatcmpl-bench0001",
                "object": "chat.completion.chunk",
                "created": CREATED,
                "model": model,
                "system_fingerprint": "fp_bench",
                "choices": [{
                    "index": 0,
                    "delta": delta,
                    "logprobs": None,
                    "finish_reason": "stop" if i == N_EVENTS - 1 else None,
                }],
            }
            if with_usage_field:
                obj["usage"] = None
            return _sse(obj)

        self.chunks = [chunk(i, False) for i in range(N_EVENTS)]
        self.chunks_usage = [chunk(i, True) for i in range(N_EVENTS)]
        self.usage_chunk = _sse({
            "id": "chatcmpl-bench0001",
            "object": "chat.completion.chunk",
            "created": CREATED,
            "model": model,
            "system_fingerprint": "fp_bench",
            "choices": [],
            "usage": openai_usage,
        })

        self.message = orjson.dumps({
            "id": "msg_bench0001",
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [{"type": "text", "text": text}],
            "stop_reason": "end_turn",
            "stop_sequence": None,
            "usage": {"input_tokens": PROMPT_TOKENS, "output_tokens": COMPLETION_TOKENS},
        })
        events = [
            _anthropic_event("message_start", {
                "type": "message_start",
                "message": {
                    "id": "msg_bench0001", "type": "message", "role": "assistant",
                    "model": model, "content": [], "stop_reason": None,
                    "stop_sequence": None,
                    "usage": {"input_tokens": PROMPT_TOKENS, "output_tokens": 1},
                },
            }),
            _anthropic_event("content_block_start", {
                "type": "content_block_start", "index": 0,
                "content_block": {"type": "text", "text": ""},
            }),
            _anthropic_event("ping", {"type": "ping"}),
        ]
        for i in range(N_EVENTS):
            word = WORDS[i] if i == N_EVENTS - 1 else WORDS[i] + " "
            events.append(_anthropic_event("content_block_delta", {
                "type": "content_block_delta", "index": 0,
                "delta": {"type": "text_delta", "text": word},
            }))
        events += [
            _anthropic_event("content_block_stop", {"type": "content_block_stop", "index": 0}),
            _anthropic_event("message_delta", {
                "type": "message_delta",
                "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                "usage": {"output_tokens": COMPLETION_TOKENS},
            }),
            _anthropic_event("message_stop", {"type": "message_stop"}),
        ]
        self.message_events = events


_canned: dict[str, Canned] = {}


def canned(model: object) -> Canned:
    name = model if isinstance(model, str) else "unknown"
    c = _canned.get(name)
    if c is None:
        c = Canned(name)
        if len(_canned) < MAX_CANNED:
            _canned[name] = c
    return c


def _openai_error(status: int, message: str, type_: str, code: str | None = None) -> web.Response:
    body = {"error": {"message": message, "type": type_, "param": None, "code": code}}
    return web.Response(status=status, body=orjson.dumps(body), content_type="application/json")


def _anthropic_error(status: int, message: str, type_: str) -> web.Response:
    body = {"type": "error", "error": {"type": type_, "message": message}}
    return web.Response(status=status, body=orjson.dumps(body), content_type="application/json")


async def _json_body(request: web.Request) -> dict | None:
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        return None
    return body if isinstance(body, dict) else None


def _chunk_delay(body: dict) -> float:
    """Seconds to sleep between stream events: the body field bench_chunk_delay_ms
    (0..1000; a proxy forwards unknown fields untouched). 0 = write back to back."""
    ms = body.get("bench_chunk_delay_ms")
    if isinstance(ms, (int, float)) and not isinstance(ms, bool) and 0 < ms <= 1000:
        return ms / 1000.0
    return 0.0


async def _write_events(resp: web.StreamResponse, events: list[bytes], delay: float) -> None:
    for i, event in enumerate(events):
        if delay and i:
            await asyncio.sleep(delay)
        await resp.write(event)


def make_app(api_key: str | None) -> web.Application:
    stats = {"requests": 0, "chat": 0, "chat_stream": 0, "messages": 0,
             "messages_stream": 0, "include_usage": 0, "rejected": 0}
    bearer = f"Bearer {api_key}" if api_key else None

    async def chat(request: web.Request) -> web.StreamResponse:
        if bearer is not None and request.headers.get("Authorization") != bearer:
            stats["rejected"] += 1
            return _openai_error(401, "Incorrect API key provided (bench upstream).",
                                 "invalid_request_error", "invalid_api_key")
        body = await _json_body(request)
        if body is None:
            stats["rejected"] += 1
            return _openai_error(400, "Body is not a JSON object.", "invalid_request_error")
        stats["requests"] += 1
        c = canned(body.get("model"))
        if body.get("stream") is not True:
            stats["chat"] += 1
            return web.Response(body=c.completion, content_type="application/json")
        stats["chat_stream"] += 1
        opts = body.get("stream_options")
        include_usage = isinstance(opts, dict) and opts.get("include_usage") is True
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                           "Cache-Control": "no-cache"})
        await resp.prepare(request)
        delay = _chunk_delay(body)
        if include_usage:
            stats["include_usage"] += 1
            await _write_events(resp, c.chunks_usage, delay)
            await resp.write(c.usage_chunk)
        else:
            await _write_events(resp, c.chunks, delay)
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    async def messages(request: web.Request) -> web.StreamResponse:
        if api_key is not None and request.headers.get("x-api-key") != api_key \
                and request.headers.get("Authorization") != bearer:
            stats["rejected"] += 1
            return _anthropic_error(401, "invalid x-api-key (bench upstream)", "authentication_error")
        body = await _json_body(request)
        if body is None:
            stats["rejected"] += 1
            return _anthropic_error(400, "Body is not a JSON object.", "invalid_request_error")
        stats["requests"] += 1
        c = canned(body.get("model"))
        if body.get("stream") is not True:
            stats["messages"] += 1
            return web.Response(body=c.message, content_type="application/json")
        stats["messages_stream"] += 1
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                           "Cache-Control": "no-cache"})
        await resp.prepare(request)
        await _write_events(resp, c.message_events, _chunk_delay(body))
        await resp.write_eof()
        return resp

    async def liveliness(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def ingest(request: web.Request) -> web.Response:
        """A stand-in usage-event receiver for the webhook row: takes the batch, counts it."""
        stats["webhook_batches"] = stats.get("webhook_batches", 0) + 1
        await request.read()
        return web.json_response({"ok": True})

    async def otlp_traces(request: web.Request) -> web.Response:
        """A stand-in OTLP/HTTP collector for the tracing rows: takes the export, counts it."""
        stats["otlp_exports"] = stats.get("otlp_exports", 0) + 1
        stats["otlp_bytes"] = stats.get("otlp_bytes", 0) + len(await request.read())
        return web.Response(body=b"", content_type="application/x-protobuf")

    async def bench_stats(request: web.Request) -> web.Response:
        return web.Response(body=orjson.dumps(stats), content_type="application/json")

    app = web.Application(client_max_size=64 * 1024 * 1024)  # the 1 MB prompts, masked (longer)
    for prefix in ("/v1", ""):
        app.router.add_post(prefix + "/chat/completions", chat)
        app.router.add_post(prefix + "/messages", messages)
    app.router.add_get("/health/liveliness", liveliness)
    app.router.add_get("/bench/stats", bench_stats)
    app.router.add_post("/v1/traces", otlp_traces)
    app.router.add_post("/bench/ingest", ingest)
    return app


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--api-key", default=None, help="require this key on every model call")
    args = ap.parse_args()
    import uvloop

    # backlog as the proxy's (2048): the streams suite opens 1000 connections at once
    web.run_app(make_app(args.api_key), host=args.host, port=args.port, access_log=None,
                print=None, shutdown_timeout=2.0, backlog=2048, loop=uvloop.new_event_loop())


if __name__ == "__main__":
    main()
