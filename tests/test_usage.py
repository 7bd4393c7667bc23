"""Usage from non-streamed bodies, the stream meters, and prompt text extraction."""

from __future__ import annotations

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmproxy.sse import Event, SSEParser
from llmproxy.tokenizer import count_tokens
from llmproxy.usage import (
    AnthropicStreamMeter,
    OpenAIStreamMeter,
    Usage,
    anthropic_usage,
    openai_usage,
    prompt_text,
)


def sse(payload: object, event: str | None = None) -> Event:
    data = payload if isinstance(payload, bytes) else orjson.dumps(payload)
    raw = (b"event: " + event.encode() + b"\n" if event else b"") + b"data: " + data + b"\n\n"
    (ev,) = SSEParser().feed(raw)
    return ev


def chat_chunk(content: str | None = None, **extra: object) -> dict:
    delta = {} if content is None else {"content": content}
    return {"id": "x", "object": "chat.completion.chunk",
            "choices": [{"index": 0, "delta": delta}], "usage": None} | extra


OPENAI_USAGE = {
    "prompt_tokens": 100,
    "completion_tokens": 20,
    "total_tokens": 120,
    "prompt_tokens_details": {"cached_tokens": 64, "audio_tokens": 0},
    "completion_tokens_details": {"reasoning_tokens": 12},
}

# -- non-streamed ------------------------------------------------------------------


@pytest.mark.parametrize(
    "body, expected",
    [
        ({"choices": []}, None),
        ({"usage": None}, None),
        ({"usage": OPENAI_USAGE}, Usage(100, 20, cached_tokens=64, reasoning_tokens=12)),
        ({"usage": {"prompt_tokens": 5, "completion_tokens": 3}}, Usage(5, 3)),
        ({"usage": {"prompt_tokens": 5, "completion_tokens": 3,
                    "prompt_tokens_details": None}}, Usage(5, 3)),
        ({"usage": {"prompt_tokens": 8, "total_tokens": 8}}, Usage(8, 0)),  # embeddings
        ({"usage": {"prompt_tokens": "x", "completion_tokens": True}}, Usage(0, 0)),
    ],
)
def test_openai_usage(body: dict, expected: Usage | None) -> None:
    assert openai_usage(body) == expected


@pytest.mark.parametrize(
    "body, expected",
    [
        ({"content": []}, None),
        ({"usage": {"input_tokens": 10, "output_tokens": 4}}, Usage(10, 4)),
        (
            {"usage": {"input_tokens": 10, "output_tokens": 4,
                       "cache_read_input_tokens": 300, "cache_creation_input_tokens": 50}},
            Usage(360, 4, cached_tokens=300, cache_creation_tokens=50),
        ),
        ({"usage": {"input_tokens": 10, "output_tokens": 4,
                    "cache_read_input_tokens": None}}, Usage(10, 4)),
    ],
)
def test_anthropic_usage(body: dict, expected: Usage | None) -> None:
    assert anthropic_usage(body) == expected


# -- OpenAI stream meter ------------------------------------------------------------


def openai_stream(with_usage: bool) -> list[Event]:
    events = [sse(chat_chunk(t)) for t in ("Hel", "lo", " there", "!")]
    role = {"choices": [{"index": 0, "delta": {"role": "assistant"}}]}
    events.insert(0, sse(chat_chunk(None) | role))
    if with_usage:
        events.append(sse({"id": "x", "choices": [], "usage": OPENAI_USAGE}))
    events.append(sse(b"[DONE]"))
    return events


@pytest.mark.parametrize("drop", [True, False])
def test_openai_usage_chunk_dropped_only_when_asked(drop: bool) -> None:
    meter = OpenAIStreamMeter(drop_usage_chunk=drop)
    events = openai_stream(with_usage=True)
    removed = [ev for ev in events if meter.feed(ev)]
    assert removed == ([events[-2]] if drop else [])
    assert meter.events_seen == len(events)
    usage = meter.result("ignored")
    assert usage == Usage(100, 20, cached_tokens=64, reasoning_tokens=12)


def test_openai_usage_null_chunks_kept_and_spacing_tolerated() -> None:
    meter = OpenAIStreamMeter(drop_usage_chunk=True)
    spaced = sse(b'{"choices":[{"index":0,"delta":{"content":"a"}}], "usage" : null}')
    assert meter.feed(spaced) is False
    assert meter.feed(sse(chat_chunk("b"))) is False
    usage_only = sse(b'{"choices": [], "usage" :\t {"prompt_tokens": 3, "completion_tokens": 2}}')
    assert meter.feed(usage_only) is True
    assert meter.feed(sse(b"[DONE]")) is False
    assert meter.result("") == Usage(3, 2)


def test_openai_usage_on_a_content_chunk_is_kept() -> None:
    meter = OpenAIStreamMeter(drop_usage_chunk=True)
    ev = sse(chat_chunk("hi", usage={"prompt_tokens": 1, "completion_tokens": 1}))
    assert meter.feed(ev) is False
    assert meter.result("") == Usage(1, 1)


def test_openai_word_usage_in_content_is_not_usage() -> None:
    meter = OpenAIStreamMeter(drop_usage_chunk=True)
    ev = sse(chat_chunk('{"usage": {"x": 1}} and "usage": {'))
    assert meter.feed(ev) is False
    result = meter.result("")
    assert result.estimated
    assert result.completion_tokens == count_tokens('{"usage": {"x": 1}} and "usage": {')


@pytest.mark.parametrize(
    "data, expected",
    [
        (b'{"choices":[],"usage":{"prompt_tokens":1}}', True),
        (b'{"choices":[],"usage" :\t{"prompt_tokens":1}}', True),
        (b'{"choices":[],"usage":null}', False),
        (b'{"choices":[]}', False),
        (b'{"usage":{"prompt_tokens":1},"choices":[{"delta":{"content":"say \\"usage"}}]}', True),
        (b'{"choices":[{"delta":{"content":"say \\"usage"}}],"usage":null}', False),
        (b'{"choices":[{"delta":{"content":"\\"usage\\": {"}}]}', False),
    ],
)
def test_usage_object_detection_on_bytes(data: bytes, expected: bool) -> None:
    from llmproxy.usage import _has_usage_object

    assert _has_usage_object(data) is expected
    meter = OpenAIStreamMeter(drop_usage_chunk=False)
    meter.feed(sse(data))
    assert (meter.usage is not None) is expected


def test_openai_estimate_without_usage() -> None:
    meter = OpenAIStreamMeter(drop_usage_chunk=False)
    for ev in openai_stream(with_usage=False):
        assert meter.feed(ev) is False
    prompt = "Say hello to the world, politely."
    usage = meter.result(prompt)
    assert usage.estimated
    assert usage.completion_tokens == count_tokens("Hello there!")
    assert usage.prompt_tokens == count_tokens(prompt)


def test_openai_estimate_tools_reasoning_and_legacy() -> None:
    meter = OpenAIStreamMeter(drop_usage_chunk=False)
    call = {"index": 0, "id": "c", "type": "function",
            "function": {"name": "get_weather", "arguments": ""}}
    chunks = [
        {"choices": [{"index": 0, "delta": {"reasoning_content": "Think"}}]},
        {"choices": [{"index": 0, "delta": {"reasoning_content": "ing."}}]},
        {"choices": [{"index": 0, "delta": {"tool_calls": [call]}}]},
        {"choices": [{"index": 0, "delta": {"tool_calls": [
            {"index": 0, "function": {"arguments": '{"city": '}}]}}]},
        {"choices": [{"index": 0, "delta": {"tool_calls": [
            {"index": 0, "function": {"arguments": '"Paris"}'}}]}}]},
        {"choices": [{"index": 0, "text": "legacy text"}]},
        {"error": {"message": "not a chunk"}},
        {"choices": "odd"},
    ]
    for chunk in chunks:
        meter.feed(sse(chunk))
    meter.feed(sse(b"not json"))
    usage = meter.result("")
    expected = (count_tokens("Thinking.") + count_tokens("get_weather")
                + count_tokens('{"city": "Paris"}') + count_tokens("legacy text"))
    assert usage.completion_tokens == expected and usage.estimated


# -- Anthropic stream meter -----------------------------------------------------------


def anthropic_events(*, start: bool = True, delta: dict | None = None,
                     blocks: list[dict] | None = None) -> list[Event]:
    events = []
    if start:
        events.append(sse({"type": "message_start", "message": {"id": "m", "usage": {
            "input_tokens": 20, "cache_read_input_tokens": 1000,
            "cache_creation_input_tokens": 30, "output_tokens": 1}}}, "message_start"))
    events.append(sse({"type": "ping"}, "ping"))
    for i, block in enumerate(blocks or [{"type": "text_delta", "text": "Hi there"}]):
        events.append(sse({"type": "content_block_delta", "index": i, "delta": block},
                          "content_block_delta"))
    if delta is not None:
        events.append(sse({"type": "message_delta", "delta": {"stop_reason": "end_turn"},
                           "usage": delta}, "message_delta"))
        events.append(sse({"type": "message_stop"}, "message_stop"))
    return events


def run_anthropic(events: list[Event], prompt: str = "") -> tuple[AnthropicStreamMeter, Usage]:
    meter = AnthropicStreamMeter()
    assert not any(meter.feed(ev) for ev in events)
    return meter, meter.result(prompt)


def test_anthropic_usage_with_cache() -> None:
    meter, usage = run_anthropic(anthropic_events(delta={"output_tokens": 15}))
    assert usage == Usage(1050, 15, cached_tokens=1000, cache_creation_tokens=30)
    assert meter.first_event_error is None
    assert meter.events_seen == 5


def test_anthropic_message_delta_repeats_input_fields() -> None:
    delta = {"input_tokens": 25, "cache_read_input_tokens": 900,
             "cache_creation_input_tokens": None, "output_tokens": 15}
    _, usage = run_anthropic(anthropic_events(delta=delta))
    assert usage == Usage(955, 15, cached_tokens=900, cache_creation_tokens=30)


def test_anthropic_estimates_output_when_cut() -> None:
    blocks = [
        {"type": "thinking_delta", "thinking": "Let me think."},
        {"type": "text_delta", "text": "The answer"},
        {"type": "input_json_delta", "partial_json": '{"q": 1}'},
        {"type": "signature_delta", "signature": "abc"},
    ]
    _, usage = run_anthropic(anthropic_events(blocks=blocks), prompt="unused")
    assert usage.estimated
    assert usage.prompt_tokens == 1050  # message_start arrived
    assert usage.completion_tokens == (count_tokens("Let me think.") + count_tokens("The answer")
                                       + count_tokens('{"q": 1}'))


def test_anthropic_estimates_prompt_without_message_start() -> None:
    prompt = "What is the capital of France?"
    _, usage = run_anthropic(anthropic_events(start=False, delta={"output_tokens": 3}), prompt)
    assert usage.estimated
    assert usage.prompt_tokens == count_tokens(prompt)
    assert usage.completion_tokens == 3


def test_anthropic_without_event_lines() -> None:
    events = [Event(None, ev.data, ev.raw) for ev in anthropic_events(delta={"output_tokens": 7})]
    _, usage = run_anthropic(events)
    assert usage == Usage(1050, 7, cached_tokens=1000, cache_creation_tokens=30)
    _, cut = run_anthropic([Event(None, ev.data, ev.raw) for ev in anthropic_events()])
    assert cut.completion_tokens == count_tokens("Hi there") and cut.estimated


ERROR = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}


@pytest.mark.parametrize("event_line", ["error", None])
def test_anthropic_first_event_error(event_line: str | None) -> None:
    meter = AnthropicStreamMeter()
    meter.feed(Event(None, b"", b": comment\n\n"))  # comments do not count as the first event
    meter.feed(sse(ERROR, event_line))
    assert meter.first_event_error == ERROR["error"]


def test_anthropic_later_error_is_not_first() -> None:
    meter = AnthropicStreamMeter()
    for ev in anthropic_events():
        meter.feed(ev)
    meter.feed(sse(ERROR, "error"))
    assert meter.first_event_error is None


# -- prompt text ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "body, api, expected",
    [
        ({"messages": [{"role": "user", "content": "hi"}]}, "chat", "hi"),
        ({"messages": [{"role": "user", "content": [
            {"type": "text", "text": "look"}, {"type": "image_url", "image_url": {"url": "x"}},
            {"type": "text", "text": "here"}]}]}, "chat", "look\nhere"),
        ({"messages": [{"role": "assistant", "content": None, "name": "bot", "tool_calls": [
            {"type": "function", "function": {"name": "f", "arguments": '{"a":1}'}}]},
            {"role": "tool", "content": "42"}]}, "chat", 'bot\nf\n{"a":1}\n42'),
        ({"messages": [], "tools": [{"type": "function", "function": {"name": "f"}}]},
         "chat", '{"name":"f"}'),
        ({"prompt": "once upon"}, "completions", "once upon"),
        ({"prompt": ["a", "b"]}, "completions", "a\nb"),
        ({"prompt": [1, 2, 3]}, "completions", ""),
        ({"prompt": [[1, 2], [3]]}, "completions", ""),
        ({"input": "embed me"}, "embeddings", "embed me"),
        ({"input": ["x", "y"]}, "embeddings", "x\ny"),
        ({"system": "be nice", "messages": [{"role": "user", "content": "hi"}]},
         "messages", "be nice\nhi"),
        ({"system": [{"type": "text", "text": "sys", "cache_control": {"type": "ephemeral"}}],
          "messages": [
              {"role": "assistant", "content": [
                  {"type": "text", "text": "calling"},
                  {"type": "tool_use", "id": "t", "name": "lookup", "input": {"q": "x"}}]},
              {"role": "user", "content": [
                  {"type": "tool_result", "tool_use_id": "t", "content": "found"},
                  {"type": "tool_result", "tool_use_id": "u",
                   "content": [{"type": "text", "text": "more"}]},
                  {"type": "image", "source": {}}]}]},
         "messages", 'sys\ncalling\nlookup\n{"q":"x"}\nfound\nmore'),
        ({"messages": [{"role": "user", "content": "q"}],
          "tools": [{"name": "t", "description": "d", "input_schema": {}}]},
         "messages", 'q\n{"name":"t","description":"d","input_schema":{}}'),
        ({"messages": "nope"}, "chat", ""),
        ({"messages": [None, 3, {"content": 5}]}, "messages", ""),
        ({"messages": [{"content": "x"}]}, "unknown-api", ""),
    ],
)
def test_prompt_text(body: dict, api: str, expected: str) -> None:
    assert prompt_text(body, api) == expected


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children) | st.dictionaries(
        st.sampled_from(["messages", "content", "type", "text", "input", "prompt", "system",
                         "tool_calls", "function", "arguments", "name", "tools", "x"]),
        children),
    max_leaves=30,
)


@settings(deadline=None)
@given(JSON, st.sampled_from(["chat", "completions", "embeddings", "messages"]))
def test_prompt_text_never_raises(body: object, api: str) -> None:
    assert isinstance(prompt_text(body, api), str)  # type: ignore[arg-type]


def test_prompt_text_huge_int_in_tool_input() -> None:
    body = {"messages": [{"role": "assistant", "content": [
        {"type": "tool_use", "name": "n", "input": {"v": 2**80}}]}]}
    assert prompt_text(body, "messages") == "n\n{'v': 1208925819614629174706176}"


# --- a long stream without usage: bounded memory, counted as it goes (issue 12) -------------


def _long_openai_stream(words: int) -> list[bytes]:
    return [b"data: " + orjson.dumps(chat_chunk(f" word{i % 50}")) + b"\n\n" for i in range(words)]


@pytest.mark.parametrize("as_chunks", [False, True], ids=["events", "skipped chunks"])
def test_a_long_stream_without_usage_is_kept_bounded_and_counted(as_chunks: bool) -> None:
    from llmproxy.usage import KEEP_BYTES, TEXT_CHARS

    meter = OpenAIStreamMeter(drop_usage_chunk=True)
    events = _long_openai_stream(60_000)  # about 5 MB of events, 400 KB of text
    parser = SSEParser()
    most_bytes = most_chars = 0
    for i in range(0, len(events), 20):
        chunk = b"".join(events[i:i + 20])
        if as_chunks and not meter.wants(chunk):
            meter.skip(chunk)
        else:
            for ev in parser.feed(chunk):
                meter.feed(ev)
        most_bytes = max(most_bytes, meter._kept.raw_bytes)
        most_chars = max(most_chars, meter._kept.chars)
    assert most_bytes <= KEEP_BYTES + 20 * len(events[0]) and most_chars <= TEXT_CHARS + 2_000
    usage = meter.result("")
    text = "".join(f" word{i % 50}" for i in range(60_000))
    assert usage.estimated and abs(usage.completion_tokens - count_tokens(text)) <= 0.01 * count_tokens(text)


def test_a_long_anthropic_stream_without_usage_is_kept_bounded() -> None:
    from llmproxy.usage import KEEP_BYTES

    meter = AnthropicStreamMeter()
    meter.feed(sse({"type": "message_start", "message": {"usage": {"input_tokens": 3}}}, "message_start"))
    most = 0
    for i in range(40_000):
        meter.feed(sse({"type": "content_block_delta", "index": 0,
                        "delta": {"type": "text_delta", "text": f" word{i % 50}"}}, "content_block_delta"))
        most = max(most, meter._deltas.raw_bytes)
    assert most <= KEEP_BYTES + 200
    text = "".join(f" word{i % 50}" for i in range(40_000))
    usage = meter.result("")
    assert usage.estimated and abs(usage.completion_tokens - count_tokens(text)) <= 0.01 * count_tokens(text)
