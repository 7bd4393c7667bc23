"""The forwarder's chunk relay: the fast path (whole events passed unparsed) and the full
path (event by event) give the same bytes and the same counts for every chunking."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from llmproxy.forwarder import _pass
from llmproxy.sse import SSEParser
from llmproxy.testing import anthropic_events, openai_events
from llmproxy.tokenizer import count_tokens
from llmproxy.usage import AnthropicStreamMeter, OpenAIStreamMeter

WORDS = [" alpha", " beta", " gamma", "\u00e9t\u00e9", " \"usage\": {", " 42", "\n", " delta"]


def relay(raw: bytes, cuts: list[int], meter) -> bytes:
    parser = SSEParser()
    points = sorted({c % (len(raw) + 1) for c in cuts} | {0, len(raw)})
    out = []
    for a, b in zip(points, points[1:]):
        out.append(_pass(parser, meter, raw[a:b]))
    for ev in parser.close():
        if not meter.feed(ev):
            out.append(ev.raw)
    return b"".join(out)


@settings(max_examples=200)
@given(st.lists(st.sampled_from(WORDS), min_size=1, max_size=12), st.lists(st.integers(0, 10_000), max_size=30),
       st.booleans())
def test_openai_any_chunking(words, cuts, with_usage):
    events = openai_events("m", words, with_usage=with_usage,
                           usage={"prompt_tokens": 5, "completion_tokens": 9, "total_tokens": 14})
    raw = b"".join(events)
    meter = OpenAIStreamMeter(drop_usage_chunk=True)
    out = relay(raw, cuts, meter)
    assert out == b"".join(e for e in events if b'"choices":[]' not in e)
    usage = meter.result("the prompt")
    if with_usage:
        assert (usage.prompt_tokens, usage.completion_tokens, usage.estimated) == (5, 9, False)
    else:
        assert usage.estimated and usage.completion_tokens == count_tokens("".join(words))


@settings(max_examples=200)
@given(st.lists(st.sampled_from(WORDS), min_size=1, max_size=12), st.lists(st.integers(0, 10_000), max_size=30),
       st.booleans())
def test_anthropic_any_chunking(words, cuts, with_delta_usage):
    events = anthropic_events("m", words, input_tokens=7)
    if not with_delta_usage:
        events = [e for e in events if b"message_delta" not in e]
    raw = b"".join(events)
    meter = AnthropicStreamMeter()
    assert relay(raw, cuts, meter) == raw
    usage = meter.result("the prompt")
    assert usage.prompt_tokens == 7
    if with_delta_usage:
        assert (usage.completion_tokens, usage.estimated) == (len(words), False)
    else:
        assert usage.estimated and usage.completion_tokens == count_tokens("".join(words))
