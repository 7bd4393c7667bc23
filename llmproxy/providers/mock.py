"""The offline `mock` provider: deterministic answers for chat, completions, embeddings
and messages, streamed or not, in each API's own wire format. Demos, tests and the
default config use it; it never touches the network.

Options: `latency_ms` (before the first byte), `chunks` (content pieces of a streamed
answer), `chunk_delay_ms` (between pieces), `embedding_dims` (without `dimensions`),
`echo` (answer the last user message instead of the fixed text: for trying pii and other
middlewares without an upstream). Usage is counted with the real tokenizer, as a provider
would report it.

It honours what changes an answer's shape, so that a client is never handed a wrong one:
`max_tokens` / `max_completion_tokens` (the answer stops there, `finish_reason: length`,
Anthropic's `stop_reason: max_tokens`), `n` (that many choices), and for embeddings
`dimensions` and `encoding_format: base64` (little-endian float32, base64, as OpenAI
sends it: both OpenAI SDKs ask for it by default).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import struct
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, AsyncIterator, ClassVar

import orjson

from .. import tokenizer
from .base import Provider, Upstream

if TYPE_CHECKING:
    from ..context import Context

WORDS = ("This ", "is ", "a ", "mock ", "answer ", "from ", "llmproxy, ", "served ", "offline ", "and ",
         "deterministically. ")


@dataclass(frozen=True)
class MockOptions:
    latency_ms: float = 0.0
    chunks: int = 20
    chunk_delay_ms: float = 0.0
    embedding_dims: int = 8
    echo: bool = False


class MockProvider(Provider):
    apis: ClassVar[frozenset[str]] = frozenset({"chat", "completions", "embeddings", "messages", "responses"})
    requires_api_key: ClassVar[bool] = False
    offline: ClassVar[bool] = True
    Options: ClassVar[type] = MockOptions

    def __init__(self, deployment, options, services) -> None:
        super().__init__(deployment, options or MockOptions(), services)
        n = max(1, self.options.chunks)
        self.pieces = [WORDS[i % len(WORDS)] for i in range(n)]
        self.text = "".join(self.pieces)
        self.piece_tokens = [tokenizer.count_tokens(p) for p in self.pieces]

    async def open(self, ctx: "Context") -> Upstream:
        opts = self.options
        if opts.latency_ms:
            await asyncio.sleep(opts.latency_ms / 1000)
        ptoks = tokenizer.count_tokens(ctx.prompt_text())
        model = self.deployment.model
        if model == "*":  # a pattern's deployment: the name the client asked for
            model = str(ctx.body.get("model"))
        if ctx.api == "embeddings":
            return _fixed(self._embeddings(ctx, model, ptoks))
        pieces, cut = self._answer(ctx)
        ctoks = tokenizer.count_tokens("".join(pieces))
        if ctx.api == "responses":
            if ctx.stream:
                return _streamed(_responses_events(model, pieces, cut, ptoks, ctoks), opts.chunk_delay_ms)
            return _fixed(orjson.dumps(_response(model, "".join(pieces), cut, ptoks, ctoks)))
        if ctx.api == "messages":
            stop = "max_tokens" if cut else "end_turn"
            if ctx.stream:
                return _streamed(self._anthropic_events(model, pieces, stop, ptoks, ctoks), opts.chunk_delay_ms)
            return _fixed(self._anthropic_message(model, pieces, stop, ptoks, ctoks))
        n = ctx.body.get("n")
        n = n if type(n) is int and 1 <= n <= 128 else 1
        finish = "length" if cut else "stop"
        if ctx.stream:
            return _streamed(self._openai_events(ctx, model, pieces, finish, n, ptoks, ctoks), opts.chunk_delay_ms)
        return _fixed(self._openai_answer(ctx, model, "".join(pieces), finish, n, ptoks, ctoks))

    def _answer(self, ctx: "Context") -> tuple[list[str], bool]:
        """The answer's pieces (the fixed text, or the last user message with `echo`) within
        the request's `max_tokens` / `max_completion_tokens`, and whether they were cut."""
        if self.options.echo:
            text = _last_user_text(ctx)
            pieces = [w for w in _words(text)] or [""]
            counts = [tokenizer.count_tokens(p) for p in pieces]
        else:
            pieces, counts = self.pieces, self.piece_tokens
        body = ctx.body
        limit = body.get("max_tokens")
        if limit is None:
            limit = body.get("max_completion_tokens")
        if limit is None:
            limit = body.get("max_output_tokens")
        if type(limit) is not int or limit < 0:
            return list(pieces), False
        kept, used = [], 0
        for piece, count in zip(pieces, counts):
            if used + count > limit:
                return kept, True
            kept.append(piece)
            used += count
        return kept, False

    # --- OpenAI ---------------------------------------------------------------------

    def _openai_answer(self, ctx: "Context", model: str, text: str, finish: str, n: int, ptoks: int,
                       ctoks: int) -> bytes:
        usage = {"prompt_tokens": ptoks, "completion_tokens": ctoks * n, "total_tokens": ptoks + ctoks * n}
        created = int(time.time())
        if ctx.api == "completions":
            return orjson.dumps({
                "id": "cmpl-mock", "object": "text_completion", "created": created, "model": model,
                "choices": [{"index": i, "text": text, "finish_reason": finish, "logprobs": None} for i in range(n)],
                "usage": usage,
            })
        return orjson.dumps({
            "id": "chatcmpl-mock", "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": i, "finish_reason": finish,
                         "message": {"role": "assistant", "content": text, "refusal": None}} for i in range(n)],
            "usage": usage,
        })

    def _openai_events(self, ctx: "Context", model: str, pieces: list[str], finish: str, n: int, ptoks: int,
                       ctoks: int) -> list[bytes]:
        created = int(time.time())
        opts = ctx.body.get("stream_options")
        with_usage = isinstance(opts, dict) and opts.get("include_usage") is True
        chat = ctx.api == "chat"
        base = {"id": "chatcmpl-mock" if chat else "cmpl-mock",
                "object": "chat.completion.chunk" if chat else "text_completion",
                "created": created, "model": model}
        events = []

        def add(choice: dict) -> None:
            chunk = {**base, "choices": [choice]}
            if with_usage:
                chunk["usage"] = None
            events.append(b"data: " + orjson.dumps(chunk) + b"\n\n")

        for i, piece in enumerate(pieces):
            for index in range(n):  # the choices' pieces interleaved, as OpenAI sends them
                if chat:
                    delta = {"role": "assistant", "content": piece} if i == 0 else {"content": piece}
                    add({"index": index, "delta": delta, "finish_reason": None})
                else:
                    add({"index": index, "text": piece, "finish_reason": None, "logprobs": None})
        for index in range(n):
            add({"index": index, "delta": {}, "finish_reason": finish} if chat else
                {"index": index, "text": "", "finish_reason": finish, "logprobs": None})
        if with_usage:
            usage = {"prompt_tokens": ptoks, "completion_tokens": ctoks * n, "total_tokens": ptoks + ctoks * n}
            events.append(b"data: " + orjson.dumps({**base, "choices": [], "usage": usage}) + b"\n\n")
        events.append(b"data: [DONE]\n\n")
        return events

    def _embeddings(self, ctx: "Context", model: str, ptoks: int) -> bytes:
        inp = ctx.body.get("input")
        items = inp if isinstance(inp, list) and inp and not isinstance(inp[0], int) else [inp]
        dims = ctx.body.get("dimensions")
        dims = dims if isinstance(dims, int) and 0 < dims <= 4096 else self.options.embedding_dims
        b64 = ctx.body.get("encoding_format") == "base64"
        data = []
        for i, item in enumerate(items):
            vector = _vector(orjson.dumps(item), dims)
            encoded: Any = base64.b64encode(struct.pack(f"<{dims}f", *vector)).decode() if b64 else vector
            data.append({"object": "embedding", "index": i, "embedding": encoded})
        return orjson.dumps({"object": "list", "data": data, "model": model,
                             "usage": {"prompt_tokens": ptoks, "total_tokens": ptoks}})

    # --- Anthropic ------------------------------------------------------------------

    def _anthropic_message(self, model: str, pieces: list[str], stop: str, ptoks: int, ctoks: int) -> bytes:
        return orjson.dumps({
            "id": "msg_mock", "type": "message", "role": "assistant", "model": model,
            "content": [{"type": "text", "text": "".join(pieces)}],
            "stop_reason": stop, "stop_sequence": None,
            "usage": {"input_tokens": ptoks, "output_tokens": ctoks},
        })

    def _anthropic_events(self, model: str, pieces: list[str], stop: str, ptoks: int, ctoks: int) -> list[bytes]:
        def ev(name: str, data: dict[str, Any]) -> bytes:
            return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"

        events = [
            ev("message_start", {"type": "message_start", "message": {
                "id": "msg_mock", "type": "message", "role": "assistant", "model": model, "content": [],
                "stop_reason": None, "stop_sequence": None,
                "usage": {"input_tokens": ptoks, "output_tokens": 1}}}),
            ev("content_block_start", {"type": "content_block_start", "index": 0,
                                       "content_block": {"type": "text", "text": ""}}),
            ev("ping", {"type": "ping"}),
        ]
        for piece in pieces:
            events.append(ev("content_block_delta", {"type": "content_block_delta", "index": 0,
                                                     "delta": {"type": "text_delta", "text": piece}}))
        events += [
            ev("content_block_stop", {"type": "content_block_stop", "index": 0}),
            ev("message_delta", {"type": "message_delta", "delta": {"stop_reason": stop, "stop_sequence": None},
                                 "usage": {"output_tokens": ctoks}}),
            ev("message_stop", {"type": "message_stop"}),
        ]
        return events


def _response(model: str, text: str, cut: bool, ptoks: int, ctoks: int, status: str | None = None) -> dict:
    """A Responses API response object."""
    done = status is None
    message = {"type": "message", "id": "msg_mock", "status": "incomplete" if cut else "completed",
               "role": "assistant", "content": [{"type": "output_text", "text": text, "annotations": []}]}
    return {
        "id": "resp_mock", "object": "response", "created_at": int(time.time()),
        "status": status or ("incomplete" if cut else "completed"),
        "incomplete_details": {"reason": "max_output_tokens"} if cut and done else None,
        "error": None, "model": model, "output": [message] if done else [],
        "parallel_tool_calls": True, "tool_choice": "auto", "tools": [],
        "usage": {"input_tokens": ptoks, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": ctoks,
                  "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": ptoks + ctoks} if done else None,
    }


def _responses_events(model: str, pieces: list[str], cut: bool, ptoks: int, ctoks: int) -> list[bytes]:
    """A Responses API stream: created, the message's item and part, its text deltas, the
    closing events and `response.completed` (or `.incomplete`) with the usage."""
    events: list[bytes] = []

    def ev(kind: str, **data: Any) -> None:
        events.append(b"event: " + kind.encode() + b"\ndata: "
                      + orjson.dumps({"type": kind, "sequence_number": len(events), **data}) + b"\n\n")

    text = "".join(pieces)
    item = {"type": "message", "id": "msg_mock", "status": "in_progress", "role": "assistant", "content": []}
    part = {"type": "output_text", "text": "", "annotations": []}
    ev("response.created", response=_response(model, "", False, ptoks, 0, "in_progress"))
    ev("response.in_progress", response=_response(model, "", False, ptoks, 0, "in_progress"))
    ev("response.output_item.added", output_index=0, item=item)
    ev("response.content_part.added", item_id="msg_mock", output_index=0, content_index=0, part=part)
    for piece in pieces:
        ev("response.output_text.delta", item_id="msg_mock", output_index=0, content_index=0, delta=piece)
    ev("response.output_text.done", item_id="msg_mock", output_index=0, content_index=0, text=text)
    ev("response.content_part.done", item_id="msg_mock", output_index=0, content_index=0, part={**part, "text": text})
    final = _response(model, text, cut, ptoks, ctoks)
    ev("response.output_item.done", output_index=0, item=final["output"][0])
    ev("response.incomplete" if cut else "response.completed", response=final)
    return events


def _last_user_text(ctx: "Context") -> str:
    """The text of the request's last user turn (chat, messages, responses) or its prompt."""
    body = ctx.body
    if ctx.api == "completions":
        prompt = body.get("prompt")
        return prompt if isinstance(prompt, str) else ""
    if ctx.api == "responses":
        given = body.get("input")
        if isinstance(given, str):
            return given
        users = [i for i in given or [] if isinstance(i, dict) and i.get("role", "user") == "user"]
        if not users:
            return ""
        content = users[-1].get("content")
        if isinstance(content, str):
            return content
        return "".join(p.get("text", "") for p in content or [] if isinstance(p, dict) and isinstance(p.get("text"), str))
    for message in reversed(body.get("messages") or []):
        if isinstance(message, dict) and message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, str):
                return content
            if isinstance(content, list):
                return "".join(part.get("text", "") for part in content
                               if isinstance(part, dict) and isinstance(part.get("text"), str))
    return ""


def _words(text: str) -> list[str]:
    """`text` in pieces of one word and the spaces after it (joined back, the same text)."""
    out, start = [], 0
    for i in range(1, len(text)):
        if text[i - 1] == " " and text[i] != " ":
            out.append(text[start:i])
            start = i
    if text:
        out.append(text[start:])
    return out


def _vector(seed: bytes, dims: int) -> list[float]:
    out: list[float] = []
    counter = 0
    while len(out) < dims:
        digest = hashlib.sha256(seed + counter.to_bytes(4, "big")).digest()
        out.extend(round(v / 2**31, 6) for v in struct.unpack(">8i", digest))
        counter += 1
    return out[:dims]


_JSON = [("content-type", "application/json")]
_SSE = [("content-type", "text/event-stream; charset=utf-8"), ("cache-control", "no-cache")]


def _fixed(body: bytes) -> Upstream:
    async def once() -> AsyncIterator[bytes]:
        yield body

    return Upstream(200, list(_JSON), once(), _noop)


def _streamed(events: list[bytes], delay_ms: float) -> Upstream:
    async def gen() -> AsyncIterator[bytes]:
        for i, event in enumerate(events):
            if delay_ms and i:
                await asyncio.sleep(delay_ms / 1000)
            yield event

    return Upstream(200, list(_SSE), gen(), _noop)


def _noop() -> None:
    return None
