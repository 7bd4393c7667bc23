"""The `pii` middleware on the OpenAI Responses API (issue 15, item 1): what a request holds
(`instructions`, `input` as a string or items: messages and their text parts, earlier
assistant turns' output_text, function calls' JSON `arguments`, tool outputs) reaches the
provider masked, and the answer comes back with the caller's values: a JSON response's
output items, and a stream's deltas (a placeholder split across two of them), its `.done`
events and its final `response`. Through the real openai SDK against the recording fake
upstream, and the stream restorer on its own at any byte split."""

from __future__ import annotations

import re
from typing import Any, Callable

import openai
import orjson
import pytest
from aiohttp import web
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("llmproxy.middlewares.pii", reason="the pii middleware is not installed")
from llmproxy.middlewares.pii.masking import Vault, restore_answer
from llmproxy.middlewares.pii.streams import RestoredStream
from llmproxy.middlewares.pii.texts import request_texts
from llmproxy.sse import SSEParser
from llmproxy.testing import Received, growth, reply_sse, responses_object

from .conftest import MASTER, openai_config
from .test_pii_stream import chunked, email_spans, split_bytes, texts

EMAIL = "jane.doe@example.com"
CARD = "4111 1111 1111 1111"
PLACEHOLDERS = re.compile(r"<(?:EMAIL_ADDRESS|CREDIT_CARD)_[0-9]+>")


def never_seen(got: Received) -> str:
    """What the provider saw holds neither the card number (in any spacing) nor the e-mail."""
    raw = got.body.decode()
    assert EMAIL not in raw and "jane.doe" not in raw
    assert "4111" not in raw.replace(" ", "")
    return raw


async def proxy_with(make_proxy, upstream, **options: Any):
    return await make_proxy(openai_config(upstream, middlewares=[{"pii": {"mode": "mask", **options}}]))


def sdk(proxy) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key=MASTER, max_retries=0)


# A conversation as a Responses client sends it back: every place text can be.
ITEMS = [
    {"role": "user", "content": f"My card is {CARD}."},
    {"type": "message", "role": "user", "content": [{"type": "input_text", "text": f"Write to {EMAIL}"},
                                                    {"type": "input_image", "image_url": "https://x.test/a.png"}]},
    {"type": "message", "role": "assistant", "id": "msg_0", "status": "completed",
     "content": [{"type": "output_text", "text": f"I will write to {EMAIL} about {CARD}.", "annotations": []}]},
    {"type": "function_call", "id": "fc_0", "call_id": "call_0", "name": "send",
     "arguments": orjson.dumps({"to": EMAIL, "card": CARD, "n": 1}).decode()},
    {"type": "function_call_output", "call_id": "call_0", "output": f"sent to {EMAIL}"},
]


def placeholders(got: Received) -> tuple[str, str]:
    found = sorted(set(PLACEHOLDERS.findall(got.body.decode())))
    email = next(p for p in found if p.startswith("<EMAIL"))
    card = next(p for p in found if p.startswith("<CREDIT"))
    return email, card


def answer_from(build: Callable[[str, str], Any]):
    """A behaviour answering with what `build(email placeholder, card placeholder)` makes
    of the placeholders the upstream received (a dict: JSON; a list of events: a stream)."""
    async def behaviour(request: web.Request, got: Received) -> web.StreamResponse:
        out = build(*placeholders(got))
        if isinstance(out, list):
            return await reply_sse(out)(request, got)
        return web.json_response(out)
    return behaviour


def answer_object(email: str, card: str) -> dict[str, Any]:
    obj = responses_object("gpt-upstream", f"Done: {email}, card {card}.")
    obj["output"].append({"type": "function_call", "id": "fc_1", "call_id": "call_1", "name": "send",
                          "arguments": orjson.dumps({"to": email, "cc": [email]}).decode(), "status": "completed"})
    return obj


async def test_a_plain_request_is_masked_everywhere_and_its_answer_restored(upstream, make_proxy):
    proxy = await proxy_with(make_proxy, upstream)
    upstream.push(answer_from(answer_object))
    async with sdk(proxy) as client:
        r = await client.responses.create(model="gpt-test", instructions=f"The operator is {EMAIL}.", input=ITEMS)
    got = upstream.requests[-1]
    never_seen(got)
    sent = got.json
    email, card = placeholders(got)
    assert sent["instructions"] == f"The operator is {email}."
    assert sent["input"][0]["content"] == f"My card is {card}."
    assert sent["input"][1]["content"][0]["text"] == f"Write to {email}"
    assert sent["input"][1]["content"][1] == ITEMS[1]["content"][1]  # an image is not text
    assert sent["input"][2]["content"][0]["text"] == f"I will write to {email} about {card}."
    assert orjson.loads(sent["input"][3]["arguments"]) == {"to": email, "card": card, "n": 1}  # still JSON
    assert sent["input"][4]["output"] == f"sent to {email}"
    assert sent["input"][3]["call_id"] == "call_0" and sent["input"][3]["name"] == "send"

    assert r.output_text == f"Done: {EMAIL}, card {CARD}."
    assert orjson.loads(r.output[1].arguments) == {"to": EMAIL, "cc": [EMAIL]}
    assert r.usage.input_tokens == 11  # the rest of the answer as upstream wrote it


async def test_input_as_a_string_and_a_prompt_templates_variables(upstream, make_proxy):
    proxy = await proxy_with(make_proxy, upstream)
    upstream.push(answer_from(answer_object))
    async with sdk(proxy) as client:
        r = await client.responses.create(model="gpt-test", input=f"Card {CARD}, mail {EMAIL}",
                                          prompt={"id": "pmpt_1", "variables": {
                                              "who": EMAIL, "note": {"type": "input_text", "text": f"c {CARD}"}}})
    got = upstream.requests[-1]
    never_seen(got)
    email, card = placeholders(got)
    assert got.json["input"] == f"Card {card}, mail {email}"
    assert got.json["prompt"]["variables"] == {"who": email, "note": {"type": "input_text", "text": f"c {card}"}}
    assert r.output_text == f"Done: {EMAIL}, card {CARD}."


def stream_events(email: str, card: str) -> list[bytes]:
    """A Responses stream whose text and function-call arguments split the placeholders
    across deltas, with every event that repeats a whole text."""
    text = f"Mail {email} about {card}."
    cut = text.index(email) + 6  # inside the e-mail's placeholder
    pieces = [text[:cut], text[cut:]]
    args = orjson.dumps({"to": email}).decode()
    arg_pieces = [args[:9], args[9:]]
    message = {"type": "message", "id": "msg_1", "status": "completed", "role": "assistant",
               "content": [{"type": "output_text", "text": text, "annotations": []}]}
    call = {"type": "function_call", "id": "fc_1", "call_id": "call_1", "name": "send", "arguments": args,
            "status": "completed"}
    final = {**responses_object("gpt-upstream", text), "output": [message, call]}
    out: list[bytes] = []

    def ev(kind: str, **data: Any) -> None:
        out.append(b"event: " + kind.encode() + b"\ndata: "
                   + orjson.dumps({"type": kind, "sequence_number": len(out), **data}) + b"\n\n")

    ev("response.created", response={**final, "status": "in_progress", "output": [], "usage": None})
    ev("response.output_item.added", output_index=0, item={**message, "status": "in_progress", "content": []})
    ev("response.content_part.added", item_id="msg_1", output_index=0, content_index=0,
       part={"type": "output_text", "text": "", "annotations": []})
    for piece in pieces:
        ev("response.output_text.delta", item_id="msg_1", output_index=0, content_index=0, delta=piece, logprobs=[])
    ev("response.output_text.done", item_id="msg_1", output_index=0, content_index=0, text=text, logprobs=[])
    ev("response.content_part.done", item_id="msg_1", output_index=0, content_index=0, part=message["content"][0])
    ev("response.output_item.done", output_index=0, item=message)
    ev("response.output_item.added", output_index=1, item={**call, "arguments": "", "status": "in_progress"})
    for piece in arg_pieces:
        ev("response.function_call_arguments.delta", item_id="fc_1", output_index=1, delta=piece)
    ev("response.function_call_arguments.done", item_id="fc_1", output_index=1, arguments=args)
    ev("response.output_item.done", output_index=1, item=call)
    ev("response.completed", response=final)
    return out


async def test_a_stream_is_restored_a_placeholder_split_across_deltas_included(upstream, make_proxy):
    proxy = await proxy_with(make_proxy, upstream)
    upstream.push(answer_from(stream_events))
    async with sdk(proxy) as client:
        stream = await client.responses.create(model="gpt-test", input=ITEMS, stream=True)
        events = [e async for e in stream]
    never_seen(upstream.requests[-1])
    sent = [e.delta for e in events if e.type == "response.output_text.delta"]
    text = f"Mail {EMAIL} about {CARD}."
    assert "".join(sent) == text and sent[0] == "Mail "  # the placeholder's start was held, then went out whole
    assert [e.text for e in events if e.type == "response.output_text.done"] == [text]
    assert [e.part.text for e in events if e.type == "response.content_part.done"] == [text]
    args = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    assert orjson.loads(args) == {"to": EMAIL}
    assert orjson.loads(next(e.arguments for e in events if e.type == "response.function_call_arguments.done")) \
        == {"to": EMAIL}
    done = [e.item for e in events if e.type == "response.output_item.done"]
    assert done[0].content[0].text == text and orjson.loads(done[1].arguments) == {"to": EMAIL}
    final = events[-1]
    assert final.type == "response.completed" and final.response.output_text == text
    assert orjson.loads(final.response.output[1].arguments) == {"to": EMAIL}
    for e in events:
        assert not PLACEHOLDERS.search(e.model_dump_json())  # nothing of the masking reaches the client


async def test_block_refuses_and_nothing_goes_upstream(upstream, make_proxy):
    proxy = await proxy_with(make_proxy, upstream, mode="block")
    async with sdk(proxy) as client:
        for given in (f"card {CARD}", [ITEMS[3]], [ITEMS[4]]):
            with pytest.raises(openai.BadRequestError) as refused:
                await client.responses.create(model="gpt-test", input=given)
            assert refused.value.code == "pii_blocked" and EMAIL not in refused.value.message
        await client.responses.create(model="gpt-test", input="nothing personal")
    assert len(upstream.requests) == 1


async def test_redact_writes_the_entity_type_and_restores_nothing(upstream, make_proxy):
    proxy = await proxy_with(make_proxy, upstream, mode="redact")
    async with sdk(proxy) as client:
        await client.responses.create(model="gpt-test", input=f"mail {EMAIL}")
    assert upstream.requests[-1].json["input"] == "mail <EMAIL_ADDRESS>"


async def test_a_stored_conversation_with_personal_data_is_refused_in_mask_mode(upstream, make_proxy):
    """The provider's stored turns hold placeholders this request would number again for
    other values: refused rather than restored with the wrong person's data."""
    proxy = await proxy_with(make_proxy, upstream)
    async with sdk(proxy) as client:
        for extra in ({"previous_response_id": "resp_0"}, {"conversation": "conv_0"}):
            with pytest.raises(openai.BadRequestError) as refused:
                await client.responses.create(model="gpt-test", input=f"and {EMAIL}", **extra)
            assert refused.value.code == "pii_stored_conversation"
        with pytest.raises(openai.BadRequestError):
            await client.responses.create(model="gpt-test", input=[{"type": "item_reference", "id": "msg_0"},
                                                                   {"role": "user", "content": EMAIL}])
        assert len(upstream.requests) == 0
        r = await client.responses.create(model="gpt-test", input="go on", previous_response_id="resp_0")
    assert r.output_text == upstream.answer_text() and upstream.requests[-1].json["previous_response_id"] == "resp_0"


# --- the pieces on their own ---------------------------------------------------------------


def test_request_texts_where_it_looks():
    body = {"instructions": "i", "input": [
        "s", {"role": "user", "content": "u"},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "t"},
                                                        {"type": "input_file", "file_data": "f"}]},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "o"}]},
        {"type": "function_call", "arguments": '{"a": ["b", 2]}', "name": "n", "call_id": "c"},
        {"type": "function_call", "arguments": "not json"},
        {"type": "function_call_output", "call_id": "c", "output": "r"},
        {"type": "function_call_output", "output": [{"type": "input_text", "text": "r2"}]},
        {"type": "custom_tool_call", "input": "ci"},
        {"type": "reasoning", "summary": [{"type": "summary_text", "text": "kept"}], "encrypted_content": "x"},
        {"type": "item_reference", "id": "msg_0"}],
        "tools": [{"type": "function", "name": "n", "description": "d"}]}
    assert request_texts(body, "responses").values() == ["i", "s", "u", "t", "o", "b", "not json", "r", "r2", "ci"]
    assert request_texts({"input": "x"}, "responses").values() == ["x"]
    assert request_texts({"input": [{"role": "user", "content": "x"}]}, "input_tokens").values() == ["x"]


def test_restore_answer_of_a_response_object():
    vault = Vault()
    p = vault.placeholder("EMAIL_ADDRESS", 'a"b@c.co')
    obj = {"output": [
        {"type": "reasoning", "summary": [{"type": "summary_text", "text": p}]},
        {"type": "message", "content": [{"type": "output_text", "text": f"hi {p}"}, {"type": "refusal",
                                                                                  "refusal": p}]},
        {"type": "function_call", "arguments": orjson.dumps({"to": p}).decode()}]}
    out = orjson.loads(restore_answer(orjson.dumps(obj).replace(b"<", b"\\u003c"), vault, "responses"))
    assert out["output"][0] == obj["output"][0]  # reasoning as the provider wrote it
    assert out["output"][1]["content"] == [{"type": "output_text", "text": 'hi a"b@c.co'},
                                           {"type": "refusal", "refusal": 'a"b@c.co'}]
    assert orjson.loads(out["output"][2]["arguments"]) == {"to": 'a"b@c.co'}


def responses_stream(text_pieces: list[str], arg_pieces: list[str], escape: bool, end: bool = True) -> bytes:
    out = []

    def ev(kind: str, **data: Any) -> None:
        out.append(b"event: " + kind.encode() + b"\ndata: " + orjson.dumps({"type": kind, **data}) + b"\n\n")

    for piece in text_pieces:
        ev("response.output_text.delta", item_id="m", output_index=0, content_index=0, delta=piece)
    if end:
        ev("response.output_text.done", item_id="m", output_index=0, content_index=0, text="".join(text_pieces))
    for piece in arg_pieces:
        ev("response.function_call_arguments.delta", item_id="f", output_index=1, delta=piece)
    if end:
        ev("response.completed", response={"output": [
            {"type": "message", "content": [{"type": "output_text", "text": "".join(text_pieces)}]},
            {"type": "function_call", "arguments": "".join(arg_pieces)}]})
    raw = b"".join(out)
    return raw.replace(b"<", b"\\u003c") if escape else raw


def parsed(raw: bytes) -> list[dict[str, Any]]:
    parser = SSEParser()
    out = []
    for ev in parser.feed(raw) + parser.close():
        obj = orjson.loads(ev.data)  # every event is valid JSON
        assert ev.event == obj["type"]  # and says what it is on its event: line
        out.append(obj)
    return out


def restore(vault: Vault, parts: list[bytes]) -> list[dict[str, Any]]:
    stream = RestoredStream(None, vault, "responses")  # type: ignore[arg-type]
    return parsed(b"".join(stream.chunk(p) for p in parts) + stream.finish())


@settings(deadline=None, max_examples=200)
@given(text=texts, data=st.data(), escape=st.booleans(), end=st.booleans())
def test_a_responses_stream_restored_at_any_chunking_and_byte_split(text, data, escape, end):
    vault = Vault.for_request({"input": text})
    masked = vault.mask(text, email_spans(text))
    args = orjson.dumps({"q": masked}).decode()
    raw = responses_stream(chunked(data.draw, masked), chunked(data.draw, args), escape, end)
    out = restore(vault, split_bytes(data.draw, raw))
    deltas = [e for e in out if e["type"].endswith(".delta")]
    assert "".join(e["delta"] for e in deltas if e["output_index"] == 0) == text
    assert orjson.loads("".join(e["delta"] for e in deltas if e["output_index"] == 1)) == {"q": text}
    if end:
        assert [e["text"] for e in out if e["type"] == "response.output_text.done"] == [text]
        final = out[-1]["response"]["output"]
        assert final[0]["content"][0]["text"] == text and orjson.loads(final[1]["arguments"]) == {"q": text}
        kinds = [e["type"] for e in out]
        last_text = max(i for i, e in enumerate(out) if e["type"] == "response.output_text.delta")
        assert last_text < kinds.index("response.output_text.done")  # held text went out before its end


def test_held_text_goes_out_as_its_own_delta_before_the_value_ends():
    vault = Vault()
    vault.placeholder("EMAIL_ADDRESS", EMAIL)
    raw = responses_stream(["to <EMAIL_ADD"], [], escape=False)
    out = restore(vault, [raw])
    assert [(e["type"], e.get("delta") or e.get("text")) for e in out[:3]] == [
        ("response.output_text.delta", "to "), ("response.output_text.delta", "<EMAIL_ADD"),
        ("response.output_text.done", "to <EMAIL_ADD")]
    assert out[1]["item_id"] == "m" and (out[1]["output_index"], out[1]["content_index"]) == (0, 0)
    plain = responses_stream(["nothing to restore"], [], escape=False)
    stream = RestoredStream(None, vault, "responses")  # type: ignore[arg-type]
    assert stream.chunk(plain) is plain  # no `<`: as it came




def _many_items(n: int) -> dict[str, Any]:
    return {"input": [ITEMS[i % len(ITEMS)] for i in range(n)]}


def _long_stream(n: int) -> tuple[Vault, bytes]:
    vault = Vault()
    p = vault.placeholder("EMAIL_ADDRESS", EMAIL)
    return vault, responses_stream([f"w {p[:4]}", f"{p[4:]} x"] * n, [], escape=False)


@pytest.mark.parametrize("what, make, run, n", [
    ("the texts of input items", _many_items, lambda body: request_texts(body, "responses").values(), 200),
    ("a stream restored", _long_stream, lambda a: restore(a[0], [a[1]]), 100),
])
def test_every_step_is_linear_in_its_input(what, make, run, n):
    ratio = min(growth(make, run, n) for _ in range(2))
    assert ratio < 40, f"{what}: 16x the input took {ratio:.1f}x the time"  # linear ~16x; quadratic ~256x
