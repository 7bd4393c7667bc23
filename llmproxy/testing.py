"""Helpers for testing llmproxy and its plugins.

- `make_context(body, api=...)`: a fabricated `Context` for calling a middleware directly;
- `TestPrincipal(...)`: a `ctx.principal` as an identity middleware would set it;
- `collect(reply)`: a reply's whole body as bytes;
- `FakeUpstream`: a local HTTP server speaking the OpenAI and Anthropic wire formats that
  records every request it receives; push behaviours (`reply_json`, `reply_sse`, `hang`)
  to script the next answers.

A middleware test in five lines::

    async def test_adds_header():
        ctx = make_context({"model": "m", "messages": []})
        reply = await MyMiddleware(None, None)(ctx, lambda c: ok_reply())
        assert ("x-mine", "1") in reply.headers
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Awaitable, Callable

import orjson
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from .context import Context, Record, Reply
from .validate import client_key


def growth(make: Callable[[int], Any], run: Callable[[Any], Any], n: int) -> float:
    """How much longer `run` takes on an input 16x as large as `make(n)` (best of 5 runs of
    each, in this process): about 16 for linear work, 256 for quadratic. For tests of
    "linear in its input", which compare n and 16n rather than time anything."""
    def best(size: int) -> float:
        data = make(size)
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            run(data)
            times.append(time.perf_counter() - t0)
        return min(times)
    return best(16 * n) / best(n)


def make_context(body: dict[str, Any], api: str = "chat", headers: dict[str, str] | None = None,
                 stream: bool | None = None, model: Any = None) -> Context:
    """A context as the chain's stages leave it for a middleware: the body read and parsed;
    `model` is a `config.Model` when the code under test needs one (the forwarder does).
    It also carries a stand-in for the HTTP request with `body` as its bytes, so that a
    whole chain (`Gateway.chains[api]`, built-in stages included) can run on it."""
    record = Record("test-request", None, api, f"/v1/{api}", time.time(), model=body.get("model"))
    hdrs = CIMultiDictProxy(CIMultiDict(headers or {}))
    key = client_key(hdrs)
    return Context(api, record.path, hdrs, body, record, model=model,
                   stream=body.get("stream") is True if stream is None else stream, api_key=key,
                   request=FakeRequest("POST", record.path, hdrs, orjson.dumps(body)))  # type: ignore[arg-type]


@dataclass
class FakeRequest:
    """What the built-in stages read of aiohttp's request."""

    method: str
    path: str
    headers: Any
    body: bytes = b""
    query: Any = field(default_factory=dict)

    @property
    def content_length(self) -> int:
        return len(self.body)

    async def read(self) -> bytes:
        return self.body


@dataclass(frozen=True)
class TestPrincipal:
    """A `context.Principal` for tests: who is asking, as an identity middleware would set
    `ctx.principal`; `models` None allows every model."""

    key_id: str | None = "test-key"
    key_alias: str | None = None
    team_id: str | None = None
    user_id: str | None = None
    is_master: bool = False
    rpm_limit: int | None = None
    tpm_limit: int | None = None
    max_parallel_requests: int | None = None
    team: Any = None
    models: frozenset[str] | None = None

    __test__ = False  # not a test class, whatever pytest makes of the name

    def allows_model(self, name: str) -> bool:
        return self.models is None or name in self.models


def ok_reply(body: bytes = b'{"ok": true}') -> Reply:
    return Reply(200, [("Content-Type", "application/json")], body)


async def collect(reply: Reply | bytes | AsyncIterator[bytes]) -> bytes:
    body = reply.body if isinstance(reply, Reply) else reply
    if isinstance(body, (bytes, bytearray)):
        return bytes(body)
    return b"".join([chunk async for chunk in body])


@dataclass
class Received:
    method: str
    path: str
    headers: CIMultiDictProxy[str]
    body: bytes
    query: str = ""  # the query string as sent, without "?"

    @property
    def json(self) -> Any:
        return orjson.loads(self.body)


Behaviour = Callable[[web.Request, Received], Awaitable[web.StreamResponse]]


@dataclass
class FakeUpstream:
    """A recording fake provider on 127.0.0.1. Unscripted requests get `default` answers."""

    text_chunks: tuple[str, ...] = ("Hello", " from", " the", " fake", " upstream", ".")
    requests: list[Received] = field(default_factory=list)
    script: list[Behaviour] = field(default_factory=list)
    cancelled: int = 0  # handlers cancelled because the proxy closed the connection
    _runner: web.AppRunner | None = None
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> "FakeUpstream":
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.disconnected = asyncio.Event()
        return self

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def push(self, *behaviours: Behaviour) -> None:
        self.script.extend(behaviours)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        got = Received(request.method, request.path, request.headers, await request.read(),
                       request.rel_url.raw_query_string)
        self.requests.append(got)
        behaviour = self.script.pop(0) if self.script else self.default
        try:
            return await behaviour(request, got)
        except asyncio.CancelledError:
            self.cancelled += 1
            self.disconnected.set()
            raise

    # --- the default answers ------------------------------------------------------------

    def answer_text(self) -> str:
        return "".join(self.text_chunks)

    async def default(self, request: web.Request, got: Received) -> web.StreamResponse:
        body = got.json if got.body else {}
        path = request.path
        model = body.get("model", "unknown")
        if path.endswith("/embeddings"):
            return web.json_response({"object": "list", "model": model,
                                      "data": [{"object": "embedding", "index": 0, "embedding": [0.1, 0.2]}],
                                      "usage": {"prompt_tokens": 3, "total_tokens": 3}})
        if path.endswith("/count_tokens"):
            return web.json_response({"input_tokens": 42})
        if path.endswith("/input_tokens"):
            return web.json_response({"object": "response.input_tokens", "input_tokens": 42})
        if path.endswith("/responses"):
            if body.get("stream"):
                return await reply_sse(responses_events(model, self.text_chunks))(request, got)
            return web.json_response(responses_object(model, self.answer_text()))
        if path.endswith("/messages"):
            if body.get("stream"):
                return await reply_sse(anthropic_events(model, self.text_chunks))(request, got)
            return web.json_response({"id": "msg_fake", "type": "message", "role": "assistant", "model": model,
                                      "content": [{"type": "text", "text": self.answer_text()}],
                                      "stop_reason": "end_turn", "stop_sequence": None,
                                      "usage": {"input_tokens": 11, "output_tokens": 7}})
        if body.get("stream"):
            opts = body.get("stream_options") or {}
            return await reply_sse(openai_events(model, self.text_chunks, bool(opts.get("include_usage"))))(
                request, got)
        return web.json_response({"id": "chatcmpl-fake", "object": "chat.completion", "created": 1,
                                  "model": model,
                                  "choices": [{"index": 0, "finish_reason": "stop",
                                               "message": {"role": "assistant", "content": self.answer_text()}}],
                                  "usage": {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18}})


def openai_events(model: str, pieces: tuple[str, ...] | list[str], with_usage: bool,
                  usage: dict[str, Any] | None = None) -> list[bytes]:
    """An OpenAI chat stream as its SSE events, `[DONE]` included."""
    out = []
    for i, piece in enumerate(pieces):
        delta = {"role": "assistant", "content": piece} if i == 0 else {"content": piece}
        chunk: dict[str, Any] = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 1,
                                 "model": model, "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}
        if with_usage:
            chunk["usage"] = None
        out.append(b"data: " + orjson.dumps(chunk) + b"\n\n")
    last: dict[str, Any] = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 1, "model": model,
                            "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
    if with_usage:
        last["usage"] = None
    out.append(b"data: " + orjson.dumps(last) + b"\n\n")
    if with_usage:
        u = usage or {"prompt_tokens": 11, "completion_tokens": len(pieces), "total_tokens": 11 + len(pieces)}
        out.append(b"data: " + orjson.dumps({"id": "chatcmpl-fake", "object": "chat.completion.chunk",
                                             "created": 1, "model": model, "choices": [], "usage": u}) + b"\n\n")
    out.append(b"data: [DONE]\n\n")
    return out


def responses_object(model: str, text: str, usage: dict[str, Any] | None = None,
                     status: str = "completed") -> dict[str, Any]:
    """A Responses API response, as `POST /v1/responses` answers it."""
    return {"id": "resp_fake", "object": "response", "created_at": 1, "status": status, "model": model,
            "output": [{"type": "message", "id": "msg_fake", "status": "completed", "role": "assistant",
                        "content": [{"type": "output_text", "text": text, "annotations": []}]}],
            "parallel_tool_calls": True, "tool_choice": "auto", "tools": [],
            "usage": usage if usage is not None else {
                "input_tokens": 11, "input_tokens_details": {"cached_tokens": 3}, "output_tokens": 7,
                "output_tokens_details": {"reasoning_tokens": 2}, "total_tokens": 18}}


def responses_events(model: str, pieces: tuple[str, ...] | list[str], usage: dict[str, Any] | None = None,
                     final: str = "response.completed") -> list[bytes]:
    """A Responses API stream: created, text deltas, done events, then `final` with usage."""
    out: list[bytes] = []

    def ev(kind: str, **data: Any) -> None:
        out.append(b"event: " + kind.encode() + b"\ndata: "
                   + orjson.dumps({"type": kind, "sequence_number": len(out), **data}) + b"\n\n")

    text = "".join(pieces)
    ev("response.created", response={**responses_object(model, ""), "status": "in_progress", "output": [],
                                     "usage": None})
    ev("response.output_item.added", output_index=0,
       item={"type": "message", "id": "msg_fake", "status": "in_progress", "role": "assistant", "content": []})
    ev("response.content_part.added", item_id="msg_fake", output_index=0, content_index=0,
       part={"type": "output_text", "text": "", "annotations": []})
    for piece in pieces:
        ev("response.output_text.delta", item_id="msg_fake", output_index=0, content_index=0, delta=piece)
    ev("response.output_text.done", item_id="msg_fake", output_index=0, content_index=0, text=text)
    ev(final, response=responses_object(model, text, usage, "completed" if final == "response.completed"
                                        else final.rsplit(".", 1)[1]))
    return out


def anthropic_events(model: str, pieces: tuple[str, ...] | list[str], input_tokens: int = 11) -> list[bytes]:
    def ev(name: str, data: dict[str, Any]) -> bytes:
        return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"

    out = [ev("message_start", {"type": "message_start", "message": {
        "id": "msg_fake", "type": "message", "role": "assistant", "model": model, "content": [],
        "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": input_tokens, "output_tokens": 1}}}),
        ev("content_block_start", {"type": "content_block_start", "index": 0,
                                   "content_block": {"type": "text", "text": ""}})]
    for piece in pieces:
        out.append(ev("content_block_delta", {"type": "content_block_delta", "index": 0,
                                              "delta": {"type": "text_delta", "text": piece}}))
    out += [ev("content_block_stop", {"type": "content_block_stop", "index": 0}),
            ev("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn",
                                                                      "stop_sequence": None},
                                 "usage": {"output_tokens": len(pieces)}}),
            ev("message_stop", {"type": "message_stop"})]
    return out


def reply_json(status: int, body: Any, headers: dict[str, str] | None = None) -> Behaviour:
    async def behaviour(request: web.Request, got: Received) -> web.StreamResponse:
        raw = body if isinstance(body, bytes) else orjson.dumps(body)
        return web.Response(status=status, body=raw, headers=headers, content_type="application/json")
    return behaviour


def reply_sse(events: list[bytes], delay: float = 0.0, cut_after: int | None = None,
              headers: dict[str, str] | None = None, first_delay: float = 0.0) -> Behaviour:
    """Stream `events`, each its own write; `cut_after=n` drops the connection after n events
    without ending the chunked body (a mid-stream failure)."""
    async def behaviour(request: web.Request, got: Received) -> web.StreamResponse:
        if first_delay:
            await asyncio.sleep(first_delay)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", **(headers or {})})
        await resp.prepare(request)
        for i, event in enumerate(events):
            if cut_after is not None and i >= cut_after:
                assert request.transport is not None
                request.transport.close()
                return resp
            if delay and i:
                await asyncio.sleep(delay)
            await resp.write(event)
        await resp.write_eof()
        return resp
    return behaviour


def hang(seconds: float) -> Behaviour:
    """Answer nothing for `seconds` (a slow first byte); the wait is cancelled if the proxy
    closes the connection, which `FakeUpstream.disconnected` then shows."""
    async def behaviour(request: web.Request, got: Received) -> web.StreamResponse:
        await asyncio.sleep(seconds)
        return web.json_response({"late": True})
    return behaviour


class TcpProxy:
    """A TCP relay on 127.0.0.1 in front of a service (PostgreSQL, Redis) that a test can
    cut and restore, to break a dependency without touching the shared server."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self.cut_off = False
        self._server: asyncio.base_events.Server | None = None
        self._pipes: set[asyncio.Task] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> "TcpProxy":
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.cut_off:
            writer.close()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        self._writers.update((writer, up_writer))
        for src, dst in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pipe(src, dst))
            self._pipes.add(task)
            task.add_done_callback(self._pipes.discard)

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        try:
            while not self.cut_off:
                data = await src.read(65536)
                if not data:
                    break
                dst.write(data)
                await dst.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            dst.close()
            self._writers.discard(dst)

    def cut(self) -> None:
        """Drop every open connection and refuse new ones until `restore()`."""
        self.cut_off = True
        for w in list(self._writers):
            w.transport.abort()
        self._writers.clear()

    def restore(self) -> None:
        self.cut_off = False

    async def close(self) -> None:
        self.cut()
        for task in list(self._pipes):
            task.cancel()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
