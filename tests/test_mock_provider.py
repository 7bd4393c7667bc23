"""The offline `mock` provider answers in the shape a client asked for (issue 15, item 9):
embeddings in the SDKs' default base64 encoding and `dimensions`, `max_tokens` /
`max_completion_tokens` cut the answer with the right finish reason, `n` choices, and
`echo` answers the last user message. Through the real SDKs."""

from __future__ import annotations

import anthropic
import openai
import pytest

MASTER = "sk-master-mock-0123456789"


def mock_config(**options) -> dict:
    return {"master_key": MASTER, "models": [{"name": "mock", "deployments": [{"provider": "mock", **options}]}]}


@pytest.fixture
async def oai(make_proxy):
    proxy = await make_proxy(mock_config())
    async with openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key=MASTER, max_retries=0) as client:
        yield client


async def test_embeddings_in_base64_decode_to_the_floats(oai):
    default = await oai.embeddings.create(model="mock", input=["one", "two"])  # the SDK asks for base64
    floats = await oai.embeddings.create(model="mock", input=["one", "two"], encoding_format="float")
    assert [len(d.embedding) for d in default.data] == [8, 8]
    for a, b in zip(default.data, floats.data):
        assert a.embedding == pytest.approx(b.embedding, abs=1e-6)
        assert any(abs(v) > 1e-3 for v in a.embedding)  # not the [0, 0] a misread would give
    sized = await oai.embeddings.create(model="mock", input="x", dimensions=32)
    assert len(sized.data[0].embedding) == 32


async def test_max_tokens_cuts_the_answer(oai):
    full = await oai.chat.completions.create(model="mock", messages=[{"role": "user", "content": "hi"}])
    assert full.choices[0].finish_reason == "stop" and full.usage.completion_tokens > 4
    cut = await oai.chat.completions.create(model="mock", max_tokens=3, messages=[{"role": "user", "content": "hi"}])
    assert cut.choices[0].finish_reason == "length" and 0 < cut.usage.completion_tokens <= 3
    assert full.choices[0].message.content.startswith(cut.choices[0].message.content)
    cut = await oai.chat.completions.create(model="mock", max_completion_tokens=2, stream=True,
                                            stream_options={"include_usage": True},
                                            messages=[{"role": "user", "content": "hi"}])
    chunks = [c async for c in cut]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens <= 2
    text = await oai.completions.create(model="mock", prompt="hi", max_tokens=1)
    assert text.choices[0].finish_reason == "length"


async def test_n_choices_plain_and_streamed(oai):
    many = await oai.chat.completions.create(model="mock", n=3, messages=[{"role": "user", "content": "hi"}])
    assert [c.index for c in many.choices] == [0, 1, 2]
    assert len({c.message.content for c in many.choices}) == 1
    assert many.usage.completion_tokens == 3 * (await oai.chat.completions.create(
        model="mock", messages=[{"role": "user", "content": "hi"}])).usage.completion_tokens
    stream = await oai.chat.completions.create(model="mock", n=2, stream=True,
                                               messages=[{"role": "user", "content": "hi"}])
    texts = {0: "", 1: ""}
    async for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
    assert texts[0] == texts[1] == many.choices[0].message.content


async def test_anthropic_max_tokens_and_echo(make_proxy):
    proxy = await make_proxy(mock_config(echo=True))
    async with anthropic.AsyncAnthropic(base_url=proxy.url, api_key=MASTER, max_retries=0) as ant:
        said = "My card is 4111 1111 1111 1111, call me."
        msg = await ant.messages.create(model="mock", max_tokens=100, messages=[{"role": "user", "content": said}])
        assert msg.content[0].text == said and msg.stop_reason == "end_turn"
        cut = await ant.messages.create(model="mock", max_tokens=2, messages=[{"role": "user", "content": said}])
        assert cut.stop_reason == "max_tokens" and said.startswith(cut.content[0].text) and cut.content[0].text != said
        async with ant.messages.stream(model="mock", max_tokens=100,
                                       messages=[{"role": "user", "content": [{"type": "text", "text": said}]}]) as s:
            assert "".join([t async for t in s.text_stream]) == said
    async with openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key=MASTER, max_retries=0) as oai:
        answer = await oai.chat.completions.create(model="mock", messages=[
            {"role": "user", "content": "first"}, {"role": "assistant", "content": "ok"},
            {"role": "user", "content": "second turn"}])
        assert answer.choices[0].message.content == "second turn"
