"""SSE parser: unit table, a naive reference parser, and every split of real streams."""

from __future__ import annotations

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmproxy.sse import Event, SSEParser
from llmproxy.tokenizer import count_tokens
from llmproxy.usage import AnthropicStreamMeter, OpenAIStreamMeter

# -- helpers -----------------------------------------------------------------


def parse_chunks(chunks: list[bytes]) -> list[Event]:
    parser = SSEParser()
    events: list[Event] = []
    for chunk in chunks:
        events.extend(parser.feed(chunk))
    events.extend(parser.close())
    assert parser.pending == b""
    return events


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c for c in cuts if 0 < c < len(data)})
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:])]


def reference(stream: bytes) -> list[Event]:
    """A deliberately naive, whole-input parser to check the real one against."""
    lines: list[tuple[bytes, bytes]] = []  # (content, terminator)
    i, start, n = 0, 0, len(stream)
    while i < n:
        c = stream[i : i + 1]
        if c == b"\r":
            term = b"\r\n" if stream[i + 1 : i + 2] == b"\n" else b"\r"
        elif c == b"\n":
            term = b"\n"
        else:
            i += 1
            continue
        lines.append((stream[start:i], term))
        i += len(term)
        start = i
    if start < n:
        lines.append((stream[start:], b""))

    events: list[Event] = []
    group: list[tuple[bytes, bytes]] = []
    first = True

    def emit() -> None:
        nonlocal first
        event, data = None, None
        for k, (content, _) in enumerate(group):
            if first and k == 0 and content.startswith(b"\xef\xbb\xbf"):
                content = content[3:]
            if not content or content.startswith(b":"):
                continue
            name, sep, value = content.partition(b":")
            if sep and value.startswith(b" "):
                value = value[1:]
            if name == b"data":
                data = value if data is None else data + b"\n" + value
            elif name == b"event":
                event = value.decode("utf-8", "replace")
        raw = b"".join(c + t for c, t in group)
        events.append(Event(event, data or b"", raw))
        first = False
        group.clear()

    for content, term in lines:
        group.append((content, term))
        if content == b"" and term:
            emit()
    if group:
        emit()
    return events


# -- unit table ----------------------------------------------------------------

CASES = [
    ("simple", b"data: x\n\n", [(None, b"x")]),
    ("no space", b"data:x\n\n", [(None, b"x")]),
    ("only one space stripped", b"data:  x\n\n", [(None, b" x")]),
    ("multi data lines", b"data: a\ndata: b\n\n", [(None, b"a\nb")]),
    ("empty data line", b"data:\ndata: b\n\n", [(None, b"\nb")]),
    ("bare field name", b"data\n\n", [(None, b"")]),
    ("event field", b"event: ping\ndata: {}\n\n", [("ping", b"{}")]),
    ("event without data", b"event: ping\n\n", [("ping", b"")]),
    ("comment only", b": keep-alive\n\n", [(None, b"")]),
    ("id and retry ignored", b"id: 7\nretry: 10\ndata: x\n\n", [(None, b"x")]),
    ("unknown field", b"foo: bar\ndata: x\n\n", [(None, b"x")]),
    ("crlf", b"event: a\r\ndata: x\r\n\r\n", [("a", b"x")]),
    ("cr", b"data: x\rdata: y\r\r", [(None, b"x\ny")]),
    ("mixed", b"data: a\r\ndata: b\rdata: c\n\r\n", [(None, b"a\nb\nc")]),
    ("extra blank lines", b"data: a\n\n\n\r\n", [(None, b"a"), (None, b""), (None, b"")]),
    ("unterminated tail", b"data: a\n\ndata: b", [(None, b"a"), (None, b"b")]),
    ("tail with newline", b"data: a\n", [(None, b"a")]),
    ("comment tail", b"data: a\n\n: bye", [(None, b"a"), (None, b"")]),
    ("bom", b"\xef\xbb\xbfdata: a\n\n", [(None, b"a")]),
    ("colon in value", b'data: {"a":1}\n\n', [(None, b'{"a":1}')]),
    ("done", b"data: [DONE]\n\n", [(None, b"[DONE]")]),
    ("last event field wins", b"event: a\nevent: b\n\n", [("b", b"")]),
]


@pytest.mark.parametrize("stream, expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_unit_cases(stream: bytes, expected: list[tuple[str | None, bytes]]) -> None:
    events = parse_chunks([stream])
    assert [(e.event, e.data) for e in events] == expected
    assert b"".join(e.raw for e in events) == stream
    assert events == reference(stream)
    # ... and the same one byte at a time.
    assert parse_chunks([stream[i : i + 1] for i in range(len(stream))]) == events


def test_cr_at_chunk_end_then_lf() -> None:
    parser = SSEParser()
    assert parser.feed(b"data: x\r\n\r") == []  # might be "\r\n": wait
    assert parser.pending == b"data: x\r\n\r"
    events = parser.feed(b"\ndata: y\r\n\r\n")
    assert [e.raw for e in events] == [b"data: x\r\n\r\n", b"data: y\r\n\r\n"]
    assert parser.close() == []


def test_cr_at_chunk_end_then_other() -> None:
    parser = SSEParser()
    assert parser.feed(b"data: x\r\r") == []
    events = parser.feed(b"data: y\r\r")
    assert events == [Event(None, b"x", b"data: x\r\r")]
    assert parser.close() == [Event(None, b"y", b"data: y\r\r")]


def test_whole_events_returned_at_once_and_pending() -> None:
    parser = SSEParser()
    events = parser.feed(b"data: 1\n\ndata: 2\n\ndata: 3")
    assert [e.data for e in events] == [b"1", b"2"]
    assert parser.pending == b"data: 3"
    assert parser.feed(b"") == []
    assert parser.feed(b"4") == []  # no terminator: held without re-copying
    assert parser.feed(b"5") == []
    assert parser.pending == b"data: 345"
    assert parser.feed(b"\n\n") == [Event(None, b"345", b"data: 345\n\n")]
    assert parser.pending == b""


def test_long_event_in_many_chunks() -> None:
    payload = b"x" * 100_000
    stream = b"data: " + payload + b"\n\n"
    chunks = [stream[i : i + 97] for i in range(0, len(stream), 97)]
    assert parse_chunks(chunks) == [Event(None, payload, stream)]


def test_close_twice_and_empty() -> None:
    parser = SSEParser()
    assert parser.close() == []
    parser.feed(b"data: a")
    assert len(parser.close()) == 1
    assert parser.close() == []


# -- generated streams -----------------------------------------------------------

TERMINATORS = st.sampled_from([b"\n", b"\r\n", b"\r"])
VALUE = st.text(
    st.characters(blacklist_characters="\r\n", blacklist_categories=("Cs",)), max_size=12
).map(lambda s: s.encode())
LINE = st.one_of(
    VALUE.map(lambda v: b"data: " + v),
    VALUE.map(lambda v: b"data:" + v),
    st.just(b"data"),
    VALUE.map(lambda v: b"event: " + v.replace(b":", b"")),
    VALUE.map(lambda v: b":" + v),
    st.sampled_from([b"id: 1", b"retry: 1000", b"foo: bar", b"event:"]),
)


@st.composite
def sse_streams(draw: st.DrawFn) -> bytes:
    out = []
    if draw(st.booleans()):
        out.append(b"\xef\xbb\xbf" if draw(st.booleans()) else b"")
    for _ in range(draw(st.integers(0, 5))):
        for line in draw(st.lists(LINE, max_size=4)):
            out.append(line + draw(TERMINATORS))
        out.append(draw(TERMINATORS))  # blank line ends the event
    if draw(st.booleans()):  # unterminated last event
        out.append(draw(LINE))
        if draw(st.booleans()):
            out.append(draw(TERMINATORS))
    return b"".join(out)


@st.composite
def splits(draw: st.DrawFn, stream: bytes) -> list[bytes]:
    if draw(st.integers(0, 4)) == 0:
        return [stream[i : i + 1] for i in range(len(stream))]
    cuts = draw(st.lists(st.integers(0, len(stream)), max_size=max(len(stream), 1)))
    return split_at(stream, cuts)


@settings(deadline=None, max_examples=400)
@given(st.data())
def test_any_stream_any_split_matches_reference(data: st.DataObject) -> None:
    stream = data.draw(sse_streams())
    expected = reference(stream)
    events = parse_chunks(data.draw(splits(stream)))
    assert events == expected
    assert b"".join(e.raw for e in events) == stream


TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=20)


@st.composite
def openai_streams(draw: st.DrawFn) -> tuple[bytes, list[str], bool]:
    """(stream, generated texts, whether it has a usage chunk)"""
    eol = draw(st.sampled_from([b"\n", b"\r\n", b"\r", None]))

    def event(payload: bytes) -> bytes:
        if eol:
            return b"data: " + payload + eol + eol
        first = draw(TERMINATORS)
        # "\r" then "\n" would be one "\r\n" line end, not a blank line.
        options = [b"\r", b"\r\n"] if first == b"\r" else [b"\n", b"\r\n", b"\r"]
        blank = draw(st.sampled_from(options))
        return b"data: " + payload + first + blank

    texts = draw(st.lists(TEXT, min_size=1, max_size=6))
    base = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m"}
    out = []
    for text in texts:
        chunk = base | {"choices": [{"index": 0, "delta": {"content": text}}], "usage": None}
        sep = draw(st.sampled_from([b'"usage":null', b'"usage": null']))
        out.append(event(orjson.dumps(chunk).replace(b'"usage":null', sep)))
    has_usage = draw(st.booleans())
    if has_usage:
        usage = {
            "prompt_tokens": 11,
            "completion_tokens": 7,
            "total_tokens": 18,
            "prompt_tokens_details": {"cached_tokens": 3},
            "completion_tokens_details": {"reasoning_tokens": 2},
        }
        out.append(event(orjson.dumps(base | {"choices": [], "usage": usage})))
    out.append(event(b"[DONE]"))
    return b"".join(out), texts, has_usage


def meter_openai(events: list[Event], drop: bool) -> tuple[bytes, object]:
    meter = OpenAIStreamMeter(drop_usage_chunk=drop)
    kept = b"".join(e.raw for e in events if not meter.feed(e))
    return kept, meter.result("hello there")


@settings(deadline=None, max_examples=200)
@given(st.data())
def test_openai_stream_any_split(data: st.DataObject) -> None:
    stream, texts, has_usage = data.draw(openai_streams())
    whole = parse_chunks([stream])
    assert whole == reference(stream)
    events = parse_chunks(data.draw(splits(stream)))
    assert events == whole
    assert b"".join(e.raw for e in events) == stream
    for drop in (True, False):
        kept, usage = meter_openai(events, drop)
        assert (kept, usage) == meter_openai(whole, drop)
        if has_usage and drop:
            assert kept == b"".join(e.raw for e in events[:-2]) + events[-1].raw
        else:
            assert kept == stream
        if has_usage:
            assert (usage.prompt_tokens, usage.completion_tokens) == (11, 7)
            assert (usage.cached_tokens, usage.reasoning_tokens) == (3, 2)
            assert not usage.estimated
        else:
            assert usage.estimated
            assert usage.completion_tokens == count_tokens("".join(texts))


@st.composite
def anthropic_streams(draw: st.DrawFn) -> tuple[bytes, list[str]]:
    eol = draw(st.sampled_from([b"\n", b"\r\n", b"\r"]))

    def event(name: str, payload: dict) -> bytes:
        body = b"event: " + name.encode() + eol + b"data: " + orjson.dumps(payload) + eol
        return body + eol

    texts = draw(st.lists(TEXT, min_size=1, max_size=6))
    usage = {
        "input_tokens": 5,
        "cache_creation_input_tokens": 2,
        "cache_read_input_tokens": 4,
        "output_tokens": 1,
    }
    out = [
        event("message_start", {"type": "message_start", "message": {"id": "m", "usage": usage}}),
        event("content_block_start", {"type": "content_block_start", "index": 0,
                                      "content_block": {"type": "text", "text": ""}}),
        event("ping", {"type": "ping"}),
    ]
    for text in texts:
        delta = {"type": "content_block_delta", "index": 0,
                 "delta": {"type": "text_delta", "text": text}}
        out.append(event("content_block_delta", delta))
    out.append(event("content_block_stop", {"type": "content_block_stop", "index": 0}))
    out.append(event("message_delta", {"type": "message_delta",
                                       "delta": {"stop_reason": "end_turn"},
                                       "usage": {"output_tokens": 9}}))
    out.append(event("message_stop", {"type": "message_stop"}))
    return b"".join(out), texts


def meter_anthropic(events: list[Event]) -> tuple[bytes, object]:
    meter = AnthropicStreamMeter()
    kept = b"".join(e.raw for e in events if not meter.feed(e))
    return kept, meter.result("prompt")


@settings(deadline=None, max_examples=200)
@given(st.data())
def test_anthropic_stream_any_split(data: st.DataObject) -> None:
    stream, texts = data.draw(anthropic_streams())
    whole = parse_chunks([stream])
    assert whole == reference(stream)
    assert [e.event for e in whole][:3] == ["message_start", "content_block_start", "ping"]
    events = parse_chunks(data.draw(splits(stream)))
    assert events == whole
    kept, usage = meter_anthropic(events)
    assert (kept, usage) == meter_anthropic(whole)
    assert kept == stream
    assert usage.prompt_tokens == 11 and usage.completion_tokens == 9
    assert usage.cached_tokens == 4 and usage.cache_creation_tokens == 2
    assert not usage.estimated
    # Cut before message_delta (client gone): output estimated from the deltas.
    cut = [e for e in events if e.event not in ("message_delta", "message_stop")]
    _, partial = meter_anthropic(cut)
    assert partial.estimated and partial.prompt_tokens == 11
    assert partial.completion_tokens == count_tokens("".join(texts))
