"""`llmproxy.middlewares.pii.masking` at unit level: mask-then-restore gives back the original text for
any text (placeholder look-alikes included) and any chunking, in plain text, in JSON text,
and through SSE events split at any byte; the hold-back is no longer than needed; events
without a change pass byte for byte. And the middleware called directly."""

from __future__ import annotations

import re
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("llmproxy.middlewares.pii", reason="the pii middleware is not installed")
from llmproxy.middlewares.pii.masking import TextRestorer, Vault, redact, restore_answer
from llmproxy.middlewares.pii.streams import RestoredStream
from llmproxy.middlewares.pii.texts import request_texts
from llmproxy.sse import SSEParser
from llmproxy.testing import collect, make_context

from llmproxy.context import Reply
from llmproxy.middlewares.pii import PII

from .test_pii import EMAIL, IP, PROMPT, SSN


class Span:
    __slots__ = ("start", "end", "entity")

    def __init__(self, start: int, end: int, entity: str) -> None:
        self.start, self.end, self.entity = start, end, entity


_EMAIL = re.compile(r"[a-z]+@[a-z]+\.[a-z]+")


def email_spans(text: str) -> list[Span]:
    return [Span(m.start(), m.end(), "EMAIL_ADDRESS") for m in _EMAIL.finditer(text)]


FRAGMENTS = ["<EMAIL_ADDRESS_1>", "<EMAIL_ADDRESS_2>", "<EMAIL_ADDRESS_", "<EMAIL_ADDRESS_1", "<US_SSN_1>",
             "<", ">", "_1>", "<E", "a@b.co", "jo@ex.com", "x@y.org", "\\u003c", '"', "\\", "\n", "é", "😀", " "]
texts = st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.text(max_size=4)), max_size=12).map("".join)


@st.composite
def text_and_spans(draw) -> tuple[str, list[Span]]:
    """Any text, and any sorted non-overlapping spans over it (of two entity types)."""
    text = draw(texts)
    cuts = sorted(set(draw(st.lists(st.integers(0, len(text)), max_size=6))))
    spans = []
    for a, b in zip(cuts[::2], cuts[1::2]):
        if a < b:
            spans.append(Span(a, b, draw(st.sampled_from(["EMAIL_ADDRESS", "US_SSN", "API_KEY"]))))
    return text, spans


def chunked(draw, text: str) -> list[str]:
    cuts = sorted(set(draw(st.lists(st.integers(0, len(text)), max_size=len(text) + 1))))
    bounds = [0, *cuts, len(text)]
    return [text[a:b] for a, b in zip(bounds, bounds[1:])]


def masked_request(text: str, spans: list[Span]) -> tuple[Vault, str]:
    vault = Vault.for_request({"messages": [{"role": "user", "content": text}]})
    return vault, vault.mask(text, spans)


def stream_restore(vault: Vault, pieces: list[str], json: bool = False) -> str:
    r = TextRestorer(vault, json)
    return "".join(r.feed(p) for p in pieces) + r.flush()


# --- the property: mask, chunk, restore ---------------------------------------------------


@settings(deadline=None, max_examples=400)
@given(case=text_and_spans(), data=st.data())
def test_mask_then_restore_any_spans_any_chunking(case, data):
    text, spans = case
    vault, masked = masked_request(text, spans)
    assert vault.restore(masked) == text
    assert stream_restore(vault, chunked(data.draw, masked)) == text


@settings(deadline=None, max_examples=300)
@given(text=texts, data=st.data())
def test_mask_then_restore_with_recognized_emails(text, data):
    vault, masked = masked_request(text, email_spans(text))
    for value in vault.originals.values():
        assert value not in masked.replace("<EMAIL_ADDRESS_", "")  # nothing of it left
    assert stream_restore(vault, chunked(data.draw, masked)) == text


@settings(deadline=None, max_examples=300)
@given(case=text_and_spans(), data=st.data())
def test_restore_inside_json_text_escapes_the_original(case, data):
    """Tool-call arguments: the model writes JSON holding the placeholders; what comes out
    is JSON holding the originals, whatever characters they have."""
    text, spans = case
    vault, masked = masked_request(text, spans)
    args = orjson.dumps({"text": masked, "n": [masked]}).decode()
    out = stream_restore(vault, chunked(data.draw, args), json=True)
    assert orjson.loads(out) == {"text": text, "n": [text]}
    assert orjson.loads(vault.restore(args, json=True)) == {"text": text, "n": [text]}


def test_recognizers_mask_then_restore():
    from llmproxy.middlewares.pii.recognizers import Recognizers

    rec = Recognizers()
    vault = Vault()
    masked = vault.mask(PROMPT, rec.analyze(PROMPT))
    for value in (EMAIL, SSN, IP):
        assert value not in masked
    assert stream_restore(vault, list(masked)) == PROMPT


# --- the hold-back rule ---------------------------------------------------------------------


def test_holds_back_only_a_possible_placeholder_start():
    vault = Vault()
    assert vault.placeholder("EMAIL_ADDRESS", EMAIL) == "<EMAIL_ADDRESS_1>"
    r = vault.stream()
    assert r.feed("Hello <EMAIL_ADD") == "Hello "  # might be a placeholder: held
    assert r.feed("RESS_1") == ""
    assert r.feed("> bye <") == f"{EMAIL} bye "
    assert r.feed("b>") == "<b>"  # not a placeholder after all: out at once
    assert r.feed("a < b, <EMAIL_ADDRESS_9") == "a < b, <EMAIL_ADDRESS_9"  # no placeholder starts so
    assert r.feed("x <EMAIL_ADDRESS_1") == "x "
    assert r.flush() == "<EMAIL_ADDRESS_1"  # the value ended: what was held, as it was
    assert r.feed("<EMAIL_ADDRESS_1><EMAIL_ADDRESS_1>") == EMAIL + EMAIL


def test_held_text_never_longer_than_a_placeholder():
    vault = Vault()
    vault.placeholder("EMAIL_ADDRESS", EMAIL)
    r = vault.stream()
    r.feed("<EMAIL_ADDRESS_1")
    assert r.pending == "<EMAIL_ADDRESS_1"
    assert r.feed("1") == "<EMAIL_ADDRESS_11" and r.pending == ""


def test_numbering_skips_what_the_request_holds():
    vault = Vault.for_request({"messages": [{"content": "<EMAIL_ADDRESS_1> <EMAIL_ADDRESS_3>"}],
                               "tools": [{"description": "<EMAIL_ADDRESS_2>"}]})
    assert vault.placeholder("EMAIL_ADDRESS", "a@b.co") == "<EMAIL_ADDRESS_4>"
    assert vault.placeholder("EMAIL_ADDRESS", "c@d.co") == "<EMAIL_ADDRESS_5>"
    assert vault.placeholder("EMAIL_ADDRESS", "a@b.co") == "<EMAIL_ADDRESS_4>"
    assert vault.placeholder("US_SSN", "a@b.co") == "<US_SSN_1>"
    assert vault.restore("<EMAIL_ADDRESS_1> <EMAIL_ADDRESS_4>") == "<EMAIL_ADDRESS_1> a@b.co"


def test_redact():
    assert redact("mail a@b.co now", email_spans("mail a@b.co now")) == "mail <EMAIL_ADDRESS> now"


# --- SSE: events split at any byte ------------------------------------------------------


def _vault_and_masked(text: str) -> tuple[Vault, str]:
    return masked_request(text, email_spans(text))


def openai_stream(pieces: list[str], escape: bool, tool: bool = False) -> bytes:
    head = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m"}
    out = []
    for p in pieces:
        delta = {"tool_calls": [{"index": 0, "function": {"arguments": p}}]} if tool else {"content": p}
        out.append({**head, "choices": [{"index": 0, "delta": delta, "finish_reason": None}]})
    out.append({**head, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    raw = b"".join(b"data: " + orjson.dumps(o) + b"\n\n" for o in out) + b"data: [DONE]\n\n"
    return raw.replace(b"<", b"\\u003c") if escape else raw


def anthropic_stream(pieces: list[str], escape: bool, tool: bool = False) -> bytes:
    def ev(name, data):
        return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"
    block = {"type": "tool_use", "id": "t", "name": "f", "input": {}} if tool else {"type": "text", "text": ""}
    out = [ev("message_start", {"type": "message_start", "message": {"id": "m", "content": []}}),
           ev("content_block_start", {"type": "content_block_start", "index": 0, "content_block": block})]
    for p in pieces:
        delta = {"type": "input_json_delta", "partial_json": p} if tool else {"type": "text_delta", "text": p}
        out.append(ev("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": delta}))
        out.append(ev("ping", {"type": "ping"}))
    out += [ev("content_block_stop", {"type": "content_block_stop", "index": 0}),
            ev("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn"}}),
            ev("message_stop", {"type": "message_stop"})]
    raw = b"".join(out)
    return raw.replace(b"<", b"\\u003c") if escape else raw


def split_bytes(draw, raw: bytes) -> list[bytes]:
    cuts = sorted(set(draw(st.lists(st.integers(1, max(1, len(raw) - 1)), max_size=12))))
    bounds = [0, *cuts, len(raw)]
    return [raw[a:b] for a, b in zip(bounds, bounds[1:]) if a < b]


def run_stream(vault: Vault, api: str, parts: list[bytes]) -> bytes:
    stream = RestoredStream(None, vault, api)  # type: ignore[arg-type]
    return b"".join(stream.chunk(p) for p in parts) + stream.finish()


def events(raw: bytes) -> list[tuple[str | None, Any]]:
    parser = SSEParser()
    out = []
    for ev in parser.feed(raw) + parser.close():
        if ev.data and ev.data != b"[DONE]":
            out.append((ev.event, orjson.loads(ev.data)))  # every event is valid JSON
    return out


def openai_text(raw: bytes, tool: bool = False) -> str:
    out = []
    for _, chunk in events(raw):
        for choice in chunk.get("choices", []):
            delta = choice.get("delta", {})
            if tool:
                out += [c["function"]["arguments"] for c in delta.get("tool_calls", [])]
            else:
                out.append(delta.get("content") or "")
    return "".join(out)


def anthropic_text(raw: bytes, field: str = "text") -> str:
    return "".join(d["delta"].get(field, "") for name, d in events(raw) if d["type"] == "content_block_delta")


@settings(deadline=None, max_examples=200)
@given(text=texts, data=st.data(), escape=st.booleans(), api=st.sampled_from(["chat", "messages"]),
       tool=st.booleans())
def test_sse_restored_at_any_chunking_and_byte_split(text, data, escape, api, tool):
    vault, masked = _vault_and_masked(text)
    payload = orjson.dumps({"q": masked}).decode() if tool else masked
    pieces = chunked(data.draw, payload)
    raw = openai_stream(pieces, escape, tool) if api == "chat" else anthropic_stream(pieces, escape, tool)
    out = run_stream(vault, api, split_bytes(data.draw, raw))
    if api == "chat":
        got = openai_text(out, tool)
    else:
        got = anthropic_text(out, "partial_json" if tool else "text")
    assert (orjson.loads(got) == {"q": text}) if tool else (got == text)


@settings(deadline=None, max_examples=100)
@given(text=texts, data=st.data())
def test_completions_stream_restored(text, data):
    vault, masked = _vault_and_masked(text)
    head = {"id": "x", "object": "text_completion", "created": 1, "model": "m"}
    chunks = [{**head, "choices": [{"index": 0, "text": p, "finish_reason": None}]}
              for p in chunked(data.draw, masked)]
    raw = b"".join(b"data: " + orjson.dumps(c) + b"\n\n" for c in chunks) + b"data: [DONE]\n\n"  # no finish
    out = run_stream(vault, "completions", split_bytes(data.draw, raw))
    assert "".join(c["choices"][0]["text"] for _, c in events(out)) == text
    assert out.endswith(b"data: [DONE]\n\n")  # what was held came before [DONE]


def test_unchanged_events_pass_byte_for_byte():
    vault = Vault()
    p = vault.placeholder("EMAIL_ADDRESS", EMAIL)
    raw = openai_stream(["Hello ", "there, ", p[:5], p[5:], " ok"], escape=False)
    out = run_stream(vault, "chat", [raw])
    original = raw.split(b"\n\n")
    restored = out.split(b"\n\n")
    assert restored[:2] == original[:2]  # no `<`, nothing held: as they came
    assert restored[-3:] == original[-3:]  # the finish chunk and [DONE]
    assert openai_text(out) == f"Hello there, {EMAIL} ok"


def test_restored_events_keep_their_id_event_retry_and_comment_lines():
    vault = Vault()
    p = vault.placeholder("EMAIL_ADDRESS", EMAIL)
    head = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m"}
    data = orjson.dumps({**head, "choices": [{"index": 0, "delta": {"content": f"to {p}"}}]})
    for newline in (b"\n", b"\r\n"):
        raw = newline.join([b": keep-alive", b"id: 41", b"event: chunk", b"retry: 3000", b"data: " + data, b"", b""])
        out = run_stream(vault, "chat", [raw])
        lines = out.split(b"\n")
        assert lines[:4] == [b": keep-alive", b"id: 41", b"event: chunk", b"retry: 3000"]
        assert orjson.loads(lines[4][6:])["choices"][0]["delta"]["content"] == f"to {EMAIL}"
        assert lines[5:] == [b"", b""]
    anthropic = anthropic_stream([f"x {p}"], escape=False).replace(b"event: content_block_delta\n",
                                                                    b"event: content_block_delta\nid: 7\n")
    out = run_stream(vault, "messages", [anthropic])
    assert b"event: content_block_delta\nid: 7\ndata: " in out
    assert anthropic_text(out) == f"x {EMAIL}"


def test_whole_chunks_without_placeholder_start_are_not_parsed():
    vault, _ = _vault_and_masked(EMAIL)
    stream = RestoredStream(None, vault, "chat")  # type: ignore[arg-type]
    chunk = openai_stream(["plain text"], escape=False)
    assert stream.chunk(chunk) is chunk


def test_held_text_flushed_at_finish_reason_into_the_finishing_chunk():
    vault = Vault()
    vault.placeholder("EMAIL_ADDRESS", EMAIL)
    raw = openai_stream(["a <EMAIL_ADD"], escape=False).replace(b"data: [DONE]\n\n", b"")
    out = events(run_stream(vault, "chat", [raw]))
    assert out[0][1]["choices"][0]["delta"]["content"] == "a "
    assert out[1][1]["choices"][0] == {"index": 0, "delta": {"content": "<EMAIL_ADD"}, "finish_reason": "stop"}


def test_anthropic_held_text_flushed_before_block_stop():
    vault = Vault()
    vault.placeholder("EMAIL_ADDRESS", EMAIL)
    out = events(run_stream(vault, "messages", [anthropic_stream(["x <EMAIL"], escape=False)]))
    kinds = [d["type"] for _, d in out]
    assert kinds.index("content_block_stop") == kinds.index("content_block_delta") + 3  # delta, ping, flush
    assert anthropic_text(run_stream(vault, "messages", [anthropic_stream(["x <EMAIL"], False)])) == "x <EMAIL"


def test_stream_cut_mid_placeholder_flushes_at_the_end_and_before_errors():
    vault = Vault()
    vault.placeholder("EMAIL_ADDRESS", EMAIL)
    head = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m"}
    raw = b"data: " + orjson.dumps({**head, "choices": [{"index": 0, "delta": {"content": "hi <EMA"}}]}) + b"\n\n"
    out = run_stream(vault, "chat", [raw])
    assert openai_text(out) == "hi <EMA"
    error = b'data: {"error": {"message": "x", "type": "api_error", "code": "upstream_error"}}\n\n'
    out = run_stream(vault, "chat", [raw, error])
    assert out.endswith(error) and openai_text(out) == "hi <EMA"


# --- the whole (non-streamed) answer --------------------------------------------------------


def test_restore_answer_content_tool_arguments_and_blocks():
    vault = Vault()
    p = vault.placeholder("EMAIL_ADDRESS", 'a"b@c.co')
    chat = {"choices": [{"index": 0, "message": {"content": f"hi {p}", "tool_calls": [
        {"function": {"name": "f", "arguments": orjson.dumps({"to": p}).decode()}}]}}]}
    out = orjson.loads(restore_answer(orjson.dumps(chat).replace(b"<", b"\\u003c"), vault, "chat"))
    assert out["choices"][0]["message"]["content"] == 'hi a"b@c.co'
    assert orjson.loads(out["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"]) == {"to": 'a"b@c.co'}
    msg = {"content": [{"type": "text", "text": p}, {"type": "tool_use", "input": {"x": [p]}}]}
    out = orjson.loads(restore_answer(orjson.dumps(msg), vault, "messages"))
    assert out["content"] == [{"type": "text", "text": 'a"b@c.co'}, {"type": "tool_use", "input": {"x": ['a"b@c.co']}}]
    plain = b'{"choices": [{"message": {"content": "no placeholder"}}]}'
    assert restore_answer(plain, vault, "chat") is plain


def test_request_texts_where_it_looks():
    body = {"messages": [
        {"role": "system", "content": "s"},
        {"role": "user", "content": [{"type": "text", "text": "t"}, {"type": "image_url", "image_url": {"url": "u"}}]},
        {"role": "assistant", "content": None, "tool_calls": [{"function": {"arguments": '{"a": ["b", 1]}'}}]},
        {"role": "assistant", "content": None, "tool_calls": [{"function": {"arguments": "not json"}}]},
        {"role": "tool", "content": "r"}]}
    assert request_texts(body, "chat").values() == ["s", "t", "b", "not json", "r"]
    body = {"system": [{"type": "text", "text": "s"}], "messages": [{"role": "user", "content": [
        {"type": "text", "text": "t"}, {"type": "tool_use", "input": {"k": {"v": "i"}}},
        {"type": "tool_result", "content": [{"type": "text", "text": "r"}]},
        {"type": "document", "source": {"type": "text", "data": "d"}},
        {"type": "thinking", "thinking": "signed"}]}]}
    assert request_texts(body, "messages").values() == ["s", "t", "i", "r", "d"]
    assert request_texts({"prompt": ["p", [1, 2]]}, "completions").values() == ["p"]
    assert request_texts({"input": "e"}, "embeddings").values() == ["e"]


# --- the middleware called directly ---------------------------------------------------------


async def test_middleware_direct_non_stream():
    pii = PII(None, None)
    ctx = make_context({"model": "m", "messages": [{"role": "user", "content": PROMPT}]})
    seen = {}

    async def call_next(c):
        seen["content"] = c.body["messages"][0]["content"]
        answer = {"choices": [{"index": 0, "message": {"role": "assistant", "content": seen["content"]}}]}
        return Reply(200, [("Content-Type", "application/json")], orjson.dumps(answer))

    reply = await pii(ctx, call_next)
    assert EMAIL not in seen["content"] and "<EMAIL_ADDRESS_1>" in seen["content"]
    assert orjson.loads(await collect(reply))["choices"][0]["message"]["content"] == PROMPT


async def test_middleware_direct_stream_iterator_closed_when_never_read():
    pii = PII(None, None)
    ctx = make_context({"model": "m", "stream": True, "messages": [{"role": "user", "content": PROMPT}]})
    closed = []

    class Body:
        def __aiter__(self):
            return self

        async def __anext__(self):
            raise StopAsyncIteration

        async def aclose(self):
            closed.append(True)

    async def call_next(c):
        return Reply(200, [], Body())

    reply = await pii(ctx, call_next)
    await reply.body.aclose()
    assert closed == [True]


async def test_middleware_untouched_without_entities():
    pii = PII(None, None)
    ctx = make_context({"model": "m", "stream": True, "messages": [{"role": "user", "content": "hello"}]})
    upstream_reply = Reply(200, [], b"data: [DONE]\n\n")

    async def call_next(c):
        return upstream_reply

    assert await pii(ctx, call_next) is upstream_reply


@pytest.mark.parametrize("api,body", [
    ("models", {}),
    ("chat", {"model": "m", "messages": []}),
    ("embeddings", {"model": "m", "input": [[1, 2, 3]]}),
])
async def test_middleware_nothing_to_scan(api, body):
    pii = PII(None, None)
    reply = Reply(200, [], b"{}")

    async def call_next(c):
        return reply

    assert await pii(make_context(body, api), call_next) is reply
