"""The offline `mock` provider: deterministic answers for chat, completions, embeddings
and messages, streamed or not, in each API's own wire format. Demos, tests and the
default config use it; it never touches the network.

Options: `latency_ms` (before the first byte), `chunks` (content pieces of a streamed
answer), `chunk_delay_ms` (between pieces). Usage is counted with the real tokenizer,
as a provider would report it.
"""

from __future__ import annotations

import asyncio
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


class MockProvider(Provider):
    apis: ClassVar[frozenset[str]] = frozenset({"chat", "completions", "embeddings", "messages"})
    requires_api_key: ClassVar[bool] = False
    offline: ClassVar[bool] = True
    Options: ClassVar[type] = MockOptions

    def __init__(self, deployment, options, services) -> None:
        super().__init__(deployment, options or MockOptions(), services)
        n = max(1, self.options.chunks)
        self.pieces = [WORDS[i % len(WORDS)] for i in range(n)]
        self.text = "".join(self.pieces)

    async def open(self, ctx: "Context") -> Upstream:
        opts = self.options
        if opts.latency_ms:
            await asyncio.sleep(opts.latency_ms / 1000)
        ptoks = tokenizer.count_tokens(ctx.prompt_text())
        model = self.deployment.model
        if ctx.api == "embeddings":
            return _fixed(self._embeddings(ctx, model, ptoks))
        ctoks = tokenizer.count_tokens(self.text)
        if ctx.api == "messages":
            if ctx.stream:
                return _streamed(self._anthropic_events(model, ptoks, ctoks), opts.chunk_delay_ms)
            return _fixed(self._anthropic_message(model, ptoks, ctoks))
        if ctx.stream:
            return _streamed(self._openai_events(ctx, model, ptoks, ctoks), opts.chunk_delay_ms)
        return _fixed(self._openai_answer(ctx, model, ptoks, ctoks))

    # --- OpenAI ---------------------------------------------------------------------

    def _openai_answer(self, ctx: "Context", model: str, ptoks: int, ctoks: int) -> bytes:
        usage = {"prompt_tokens": ptoks, "completion_tokens": ctoks, "total_tokens": ptoks + ctoks}
        created = int(time.time())
        if ctx.api == "completions":
            return orjson.dumps({
                "id": "cmpl-mock", "object": "text_completion", "created": created, "model": model,
                "choices": [{"index": 0, "text": self.text, "finish_reason": "stop", "logprobs": None}],
                "usage": usage,
            })
        return orjson.dumps({
            "id": "chatcmpl-mock", "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": self.text, "refusal": None}}],
            "usage": usage,
        })

    def _openai_events(self, ctx: "Context", model: str, ptoks: int, ctoks: int) -> list[bytes]:
        created = int(time.time())
        opts = ctx.body.get("stream_options")
        with_usage = isinstance(opts, dict) and opts.get("include_usage") is True
        chat = ctx.api == "chat"
        base = {"id": "chatcmpl-mock" if chat else "cmpl-mock",
                "object": "chat.completion.chunk" if chat else "text_completion",
                "created": created, "model": model}
        events = []
        for i, piece in enumerate(self.pieces):
            if chat:
                delta = {"role": "assistant", "content": piece} if i == 0 else {"content": piece}
                choice = {"index": 0, "delta": delta, "finish_reason": None}
            else:
                choice = {"index": 0, "text": piece, "finish_reason": None, "logprobs": None}
            chunk = {**base, "choices": [choice]}
            if with_usage:
                chunk["usage"] = None
            events.append(b"data: " + orjson.dumps(chunk) + b"\n\n")
        last = {"index": 0, "delta": {}, "finish_reason": "stop"} if chat else \
            {"index": 0, "text": "", "finish_reason": "stop", "logprobs": None}
        chunk = {**base, "choices": [last]}
        if with_usage:
            chunk["usage"] = None
        events.append(b"data: " + orjson.dumps(chunk) + b"\n\n")
        if with_usage:
            usage = {"prompt_tokens": ptoks, "completion_tokens": ctoks, "total_tokens": ptoks + ctoks}
            events.append(b"data: " + orjson.dumps({**base, "choices": [], "usage": usage}) + b"\n\n")
        events.append(b"data: [DONE]\n\n")
        return events

    def _embeddings(self, ctx: "Context", model: str, ptoks: int) -> bytes:
        inp = ctx.body.get("input")
        items = inp if isinstance(inp, list) and inp and not isinstance(inp[0], int) else [inp]
        dims = ctx.body.get("dimensions")
        dims = dims if isinstance(dims, int) and 0 < dims <= 4096 else self.options.embedding_dims
        data = [{"object": "embedding", "index": i, "embedding": _vector(orjson.dumps(item), dims)}
                for i, item in enumerate(items)]
        return orjson.dumps({"object": "list", "data": data, "model": model,
                             "usage": {"prompt_tokens": ptoks, "total_tokens": ptoks}})

    # --- Anthropic ------------------------------------------------------------------

    def _anthropic_message(self, model: str, ptoks: int, ctoks: int) -> bytes:
        return orjson.dumps({
            "id": "msg_mock", "type": "message", "role": "assistant", "model": model,
            "content": [{"type": "text", "text": self.text}],
            "stop_reason": "end_turn", "stop_sequence": None,
            "usage": {"input_tokens": ptoks, "output_tokens": ctoks},
        })

    def _anthropic_events(self, model: str, ptoks: int, ctoks: int) -> list[bytes]:
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
        for piece in self.pieces:
            events.append(ev("content_block_delta", {"type": "content_block_delta", "index": 0,
                                                     "delta": {"type": "text_delta", "text": piece}}))
        events += [
            ev("content_block_stop", {"type": "content_block_stop", "index": 0}),
            ev("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                                 "usage": {"output_tokens": ctoks}}),
            ev("message_stop", {"type": "message_stop"}),
        ]
        return events


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
