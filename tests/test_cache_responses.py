"""The `cache` middleware on the OpenAI Responses API (issue 15, item 1, by issue 14's rules):
a miss then a hit that makes no upstream call; a stored stream replayed byte for byte; a
stored stream answering a JSON request with its `response.completed` response, and a
stored JSON response answering a stream request with valid Responses events (read by the
openai SDK's own stream accumulator); what is keyed (`previous_response_id`, `store` as it
means); what is never cached (`conversation`, `background`) or stored (failed, cut); pii's
masked requests. Through the real openai SDK against the counting fake upstream."""

from __future__ import annotations

from decimal import Decimal
from typing import Any, Callable

import openai
import orjson
import pytest
from aiohttp import web

pytest.importorskip("llmproxy.middlewares.cache", reason="the cache middleware is not installed")
from llmproxy.middlewares.cache.convert import json_to_sse, responses_end, sse_to_json
from llmproxy.testing import Received, growth, reply_json, reply_sse, responses_events, responses_object

from .conftest import MASTER, needs, openai_config

ASK = {"model": "gpt-test", "input": "hi", "temperature": 0}


def cached(upstream, before: list | None = None) -> dict[str, Any]:
    return openai_config(upstream, middlewares=[*(before or []), {"cache": {}}])


def sdk(proxy) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key=MASTER, max_retries=0)


async def ask(client: openai.AsyncOpenAI, **extra: Any) -> tuple[str, Any]:
    raw = await client.responses.with_raw_response.create(**{**ASK, **extra})
    return raw.headers["x-llmproxy-cache"], raw.parse()


async def ask_stream(client: openai.AsyncOpenAI, **extra: Any) -> tuple[str, bytes]:
    async with client.responses.with_streaming_response.create(**{**ASK, **extra}, stream=True) as resp:
        return resp.headers["x-llmproxy-cache"], b"".join([c async for c in resp.iter_bytes()])


def with_call(model: str, text: str) -> dict[str, Any]:
    """A response with a message and a function call."""
    obj = responses_object(model, text)
    obj["output"].append({"type": "function_call", "id": "fc_1", "call_id": "call_1", "name": "lookup",
                          "arguments": '{"q": "x"}', "status": "completed"})
    return obj


# --- hit and miss ------------------------------------------------------------------------------


async def test_a_miss_then_a_hit_that_makes_no_upstream_call(upstream, make_proxy):
    proxy = await make_proxy(cached(upstream))
    async with sdk(proxy) as client:
        first = await ask(client)
        second = await ask(client)
    assert (first[0], second[0]) == ("miss", "hit")
    assert second[1].model_dump() == first[1].model_dump() and second[1].output_text == upstream.answer_text()
    assert len(upstream.requests) == 1
    miss, hit = proxy.records
    assert (miss.cache, hit.cache, hit.api) == ("miss", "hit", "responses")
    assert hit.spend == Decimal(0) and hit.extra == {"cache_saved_prompt_tokens": 11,
                                                     "cache_saved_completion_tokens": 7}


async def test_a_stream_is_stored_and_replayed_byte_for_byte(upstream, make_proxy):
    proxy = await make_proxy(cached(upstream))
    async with sdk(proxy) as client:
        first = await ask_stream(client)
        second = await ask_stream(client)
        stream = await client.responses.create(**ASK, stream=True)
        deltas = [e.delta async for e in stream if e.type == "response.output_text.delta"]
    assert first[0] == "miss" and second == ("hit", first[1])
    assert first[1] == b"".join(responses_events("gpt-upstream", upstream.text_chunks))  # as upstream sent it
    assert "".join(deltas) == upstream.answer_text() and len(upstream.requests) == 1


async def test_a_stored_stream_answers_a_json_request(upstream, make_proxy):
    proxy = await make_proxy(cached(upstream))
    async with sdk(proxy) as client:
        _, streamed = await ask_stream(client)
        status, answer = await ask(client)
        raw = await client.responses.with_raw_response.create(**ASK)
    final = orjson.loads(streamed.rstrip().rsplit(b"\n\n", 1)[-1].split(b"data: ", 1)[1])
    assert final["type"] == "response.completed"
    assert status == "hit" and raw.headers["content-type"].startswith("application/json")
    assert orjson.loads(raw.content) == final["response"]  # the response object the stream ended with
    assert answer.output_text == upstream.answer_text() and answer.usage.input_tokens == 11
    assert len(upstream.requests) == 1


async def test_a_stored_json_response_answers_a_stream_request(upstream, make_proxy):
    upstream.push(reply_json(200, with_call("gpt-upstream", "Looking it up.")))
    proxy = await make_proxy(cached(upstream))
    async with sdk(proxy) as client:
        _, stored = await ask(client)
        status, data = await ask_stream(client)
        stream = await client.responses.create(**ASK, stream=True)
        events = [e async for e in stream]
        # the SDK's own accumulator checks every event against what it has built so far
        async with client.responses.stream(**ASK) as helper:
            accumulated = await helper.get_final_response()
    assert status == "hit" and data.startswith(b"event: response.created\n")
    kinds = [e.type for e in events]
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == "Looking it up."
    args = [e.delta for e in events if e.type == "response.function_call_arguments.delta"]
    assert args == ['{"q": "x"}']
    assert events[-1].response.model_dump() == stored.model_dump()
    assert accumulated.output_text == "Looking it up." and accumulated.output[1].arguments == '{"q": "x"}'
    assert len(upstream.requests) == 1


# --- what is keyed, what is never cached ---------------------------------------------------------


@pytest.mark.parametrize("first, then, same", [
    ({}, {"stream": True}, True),
    ({}, {"metadata": {"run": "7"}, "user": "someone"}, True),
    ({}, {"store": True}, True),  # the provider's default
    ({}, {"store": False}, False),  # an id the provider never kept must not answer one that will be followed up
    ({"store": False}, {"store": False}, True),
    ({"previous_response_id": "resp_a"}, {"previous_response_id": "resp_a"}, True),
    ({"previous_response_id": "resp_a"}, {"previous_response_id": "resp_b"}, False),
    ({}, {"previous_response_id": "resp_a"}, False),
    ({}, {"instructions": "be brief"}, False),
])
async def test_what_is_part_of_the_key(upstream, make_proxy, first, then, same):
    proxy = await make_proxy(cached(upstream))
    async with sdk(proxy) as client:
        assert (await ask(client, **first))[0] == "miss"
        if then.get("stream"):
            status = (await ask_stream(client, **{k: v for k, v in then.items() if k != "stream"}))[0]
        else:
            status = (await ask(client, **then))[0]
    assert status == ("hit" if same else "miss")
    assert len(upstream.requests) == (1 if same else 2)


async def test_a_hit_hands_on_an_id_the_provider_kept_and_a_follow_up_is_keyed_by_it(upstream, make_proxy):
    proxy = await make_proxy(cached(upstream))
    async with sdk(proxy) as client:
        _, first = await ask(client)  # store defaults to true: the provider keeps resp_fake
        status, again = await ask(client, store=True)
        assert status == "hit" and again.id == first.id == "resp_fake"
        follow = {"input": "and then?", "previous_response_id": again.id}
        assert (await ask(client, **follow))[0] == "miss"
        assert upstream.requests[-1].json["previous_response_id"] == "resp_fake"
        assert (await ask(client, **follow))[0] == "hit"
    assert len(upstream.requests) == 2


@pytest.mark.parametrize("extra", [{"conversation": "conv_1"}, {"background": True}])
async def test_a_request_that_changes_stored_state_is_never_cached(upstream, make_proxy, extra):
    proxy = await make_proxy(cached(upstream))
    async with sdk(proxy) as client:
        assert [(await ask(client, **extra))[0] for _ in range(2)] == ["bypass", "bypass"]
    assert len(upstream.requests) == 2 and [r.cache for r in proxy.records] == ["bypass", "bypass"]


def _events_then(last: bytes) -> list[bytes]:
    return responses_events("m", ["a", "b"])[:-1] + [last]


NOT_STORED = {
    "a stream that fails": (True, [reply_sse(responses_events("m", ["a"], final="response.failed"))]),
    "a stream cut": (True, [reply_sse(responses_events("m", ["a", "b", "c"]), cut_after=3)]),
    "a stream without its final event": (True, [reply_sse(responses_events("m", ["a", "b"])[:-1])]),
    "a stream that ends in an error event": (True, [reply_sse(_events_then(
        b'event: error\ndata: {"type": "error", "code": "server_error", "message": "x", "param": null}\n\n'))]),
    "a failed response": (False, [reply_json(200, {**responses_object("m", ""), "status": "failed"})]),
    "a queued response": (False, [reply_json(200, {**responses_object("m", ""), "status": "queued"})]),
}


@pytest.mark.parametrize("case", NOT_STORED)
async def test_failed_or_partial_answers_are_never_stored(upstream, make_proxy, case):
    stream, behaviours = NOT_STORED[case]
    proxy = await make_proxy(cached(upstream))
    upstream.push(*behaviours)
    async with sdk(proxy) as client:
        try:
            await (ask_stream(client) if stream else ask(client))
        except openai.APIError:
            pass
        calls = len(upstream.requests)
        assert (await ask(client))[0] == "miss" and len(upstream.requests) == calls + 1
        assert (await ask(client))[0] == "hit"  # a whole answer is


# --- with pii ----------------------------------------------------------------------------------


def echo(request_text: Callable[[dict], str]):
    async def behaviour(request: web.Request, got: Received) -> web.StreamResponse:
        return web.json_response(responses_object("gpt-upstream", "Noted: " + request_text(got.json)))
    return behaviour


@needs("pii")
async def test_masked_requests_are_cached_and_restored_with_each_callers_values(upstream, make_proxy):
    from llmproxy.middlewares.cache import Cache

    proxy = await make_proxy(cached(upstream, before=[{"pii": {"mode": "mask"}}]))
    upstream.push(echo(lambda body: body["input"][0]["content"][0]["text"]))

    def said(email: str) -> list[dict[str, Any]]:
        return [{"role": "user", "content": [{"type": "input_text", "text": f"Write to {email} today."}]}]

    async with sdk(proxy) as client:
        assert await ask(client, input=said("alice@example.com")) is not None
        status, answer = await ask(client, input=said("bob@example.org"))
        assert status == "hit" and answer.output_text == "Noted: Write to bob@example.org today."
        stream = await client.responses.create(**{**ASK, "input": said("carol@example.net")}, stream=True)
        text = "".join([e.delta async for e in stream if e.type == "response.output_text.delta"])
    assert text == "Noted: Write to carol@example.net today." and len(upstream.requests) == 1
    assert upstream.requests[0].json["input"][0]["content"][0]["text"] == "Write to <EMAIL_ADDRESS_1> today."
    entry = next(iter(next(m for m in proxy.gateway.middlewares if isinstance(m, Cache)).local.entries.values()))
    assert b"<EMAIL_ADDRESS_1>" in entry.body and b"@" not in entry.body


# --- the conversions on their own ---------------------------------------------------------------


def test_conversions_round_trip_and_refuse_what_is_not_whole():
    obj = with_call("m", "text")
    stream = json_to_sse("responses", orjson.dumps(obj), False)
    assert responses_end(stream) == "response.completed"
    assert orjson.loads(sse_to_json("responses", stream, (0,) * 5)) == obj
    incomplete = {**obj, "status": "incomplete", "incomplete_details": {"reason": "max_output_tokens"}}
    assert responses_end(json_to_sse("responses", orjson.dumps(incomplete), False)) == "response.incomplete"
    assert responses_end(b"data: " + orjson.dumps({"type": "response.completed"}) + b"\r\n\r\n") == \
        "response.completed"  # no event: line, CRLF
    for bad in ({**obj, "status": "failed"}, {**obj, "output": None}):
        with pytest.raises(ValueError):
            json_to_sse("responses", orjson.dumps(bad), False)
    with pytest.raises(ValueError):
        sse_to_json("responses", b"".join(responses_events("m", ["a"])[:-1]), (0,) * 5)
    with pytest.raises(ValueError):
        sse_to_json("responses", b"".join(responses_events("m", ["a"], final="response.failed")), (0,) * 5)




def _stream(n: int) -> bytes:
    return b"".join(responses_events("m", [f"piece {i} " for i in range(n)]))


def _answer(n: int) -> bytes:
    obj = with_call("m", "word " * 20)
    obj["output"] = obj["output"] * n
    return orjson.dumps(obj)


@pytest.mark.parametrize("what, make, run, n", [
    ("a stream assembled", _stream, lambda b: sse_to_json("responses", b, (0,) * 5), 200),
    ("its last event found", _stream, responses_end, 200),
    ("an answer written as a stream", _answer, lambda b: json_to_sse("responses", b, False), 100),
])
def test_every_step_is_linear_in_its_input(what, make, run, n):
    ratio = min(growth(make, run, n) for _ in range(2))
    assert ratio < 40, f"{what}: 16x the input took {ratio:.1f}x the time"  # linear ~16x; quadratic ~256x
