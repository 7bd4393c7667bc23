"""One stored answer, either form it is asked in: a stream's SSE assembled into the JSON
answer of that API, a JSON answer written as that API's stream, and an OpenAI stream with
or without its usage-only chunk as the client asks (`stream_options.include_usage`).

APIs: OpenAI chat completions and legacy completions, Anthropic messages, OpenAI Responses
(embeddings are never streamed). A Responses stream's JSON answer is the `response` of its
`response.completed` (or `.incomplete`) event, which is the whole response object; a JSON
response is written as the events the API streams for it: `response.created` and
`.in_progress`, then per output item `.output_item.added`, its content parts (added, the
text or refusal as one delta, done) or its function call's arguments (one delta, done),
`.output_item.done`, and `response.completed` (or `.incomplete`) with the response. Every function here is one pass over the answer (text pieces are joined
once, at the end); a body it cannot read raises `ValueError`, and the caller serves a miss
rather than a broken answer.
"""

from __future__ import annotations

from typing import Any, Iterator

import orjson

from llmproxy.sse import SSEParser

_OPENAI_ENVELOPE = ("id", "created", "model", "system_fingerprint", "service_tier")
RESPONSES_DONE = frozenset({"response.completed", "response.incomplete"})  # the last event of a whole answer
SSE = "text/event-stream; charset=utf-8"
JSON = "application/json"


def _objects(body: bytes) -> Iterator[tuple[str | None, Any]]:
    """(event name, parsed data) of each event with data; `[DONE]` as the string."""
    parser = SSEParser()
    for ev in parser.feed(body) + parser.close():
        data = ev.data
        if not data:
            continue
        if data == b"[DONE]":
            yield ev.event, "[DONE]"
            continue
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError:
            raise ValueError("an event's data is not JSON") from None
        yield ev.event, obj


def openai_usage(usage: tuple[int, int, int, int, int]) -> dict[str, Any]:
    """An OpenAI `usage` object from an entry's counts."""
    prompt, completion, cached, _, reasoning = usage
    out: dict[str, Any] = {"prompt_tokens": prompt, "completion_tokens": completion,
                           "total_tokens": prompt + completion}
    if cached:
        out["prompt_tokens_details"] = {"cached_tokens": cached}
    if reasoning:
        out["completion_tokens_details"] = {"reasoning_tokens": reasoning}
    return out


# ---------------------------------------------------------------------- stream -> JSON


def sse_to_json(api: str, body: bytes, usage: tuple[int, int, int, int, int]) -> bytes:
    """The JSON answer a non-streamed request would have got for this stream."""
    if api == "messages":
        return orjson.dumps(_anthropic_message(body))
    if api in ("chat", "completions"):
        return orjson.dumps(_openai_answer(api, body, usage))
    if api == "responses":
        return orjson.dumps(_responses_object(body))
    raise ValueError(f"no stream form for {api}")


def responses_end(body: bytes) -> str | None:
    """The type of a Responses stream's last event (its `event:` line, else its data's
    `type`); None when there is none. Reads only the last event."""
    end = len(body)
    while end and body[end - 1] in b"\r\n":
        end -= 1
    lf, crlf = body.rfind(b"\n\n", 0, end), body.rfind(b"\r\n\r\n", 0, end)
    start = max(lf + 2 if lf >= 0 else 0, crlf + 4 if crlf >= 0 else 0)
    events = SSEParser().feed(body[start:end] + b"\n\n")
    if not events:
        return None
    ev = events[-1]
    if ev.event:
        return ev.event
    try:
        obj = orjson.loads(ev.data)
    except orjson.JSONDecodeError:
        return None
    kind = obj.get("type") if isinstance(obj, dict) else None
    return kind if isinstance(kind, str) else None


def whole_response(body: bytes) -> bool:
    """Whether a JSON Responses answer is a finished one (completed, or incomplete as the
    request's limits made it), not a failed, queued or in-progress one."""
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        return False
    return isinstance(obj, dict) and obj.get("status") in ("completed", "incomplete")


def _responses_object(body: bytes) -> dict[str, Any]:
    final = None
    for name, obj in _objects(body):
        if not isinstance(obj, dict):
            continue
        kind = obj.get("type", name)
        if kind in ("error", "response.failed"):
            raise ValueError("the stream holds an error")
        if kind in RESPONSES_DONE:
            final = obj.get("response")
    if not isinstance(final, dict):
        raise ValueError("the stream is not a whole response")
    return final


class _Choice:
    __slots__ = ("role", "content", "refusal", "reasoning", "tools", "logprobs", "finish_reason")

    def __init__(self) -> None:
        self.role = "assistant"
        self.content: list[str] = []
        self.refusal: list[str] = []
        self.reasoning: list[str] = []
        self.tools: dict[int, dict[str, Any]] = {}
        self.logprobs: list[Any] | None = None
        self.finish_reason: Any = None

    def add(self, choice: dict[str, Any], completions: bool) -> None:
        if choice.get("finish_reason") is not None:
            self.finish_reason = choice["finish_reason"]
        logprobs = choice.get("logprobs")
        if isinstance(logprobs, dict) and isinstance(logprobs.get("content"), list):
            (self.logprobs if self.logprobs is not None else self._start_logprobs()).extend(logprobs["content"])
        if completions:
            text = choice.get("text")
            if isinstance(text, str):
                self.content.append(text)
            return
        delta = choice.get("delta")
        if not isinstance(delta, dict):
            return
        if isinstance(delta.get("role"), str):
            self.role = delta["role"]
        for name, into in (("content", self.content), ("refusal", self.refusal),
                           ("reasoning_content", self.reasoning)):
            value = delta.get(name)
            if isinstance(value, str):
                into.append(value)
        calls = delta.get("tool_calls")
        for call in calls if isinstance(calls, list) else ():
            if not isinstance(call, dict):
                continue
            tool = self.tools.setdefault(call.get("index", 0), {"id": None, "type": "function", "name": [],
                                                                 "arguments": []})
            if call.get("id") is not None:
                tool["id"] = call["id"]
            if call.get("type") is not None:
                tool["type"] = call["type"]
            fn = call.get("function")
            if isinstance(fn, dict):
                for part in ("name", "arguments"):
                    if isinstance(fn.get(part), str):
                        tool[part].append(fn[part])

    def _start_logprobs(self) -> list[Any]:
        self.logprobs = []
        return self.logprobs

    def answer(self, index: Any, completions: bool) -> dict[str, Any]:
        logprobs = {"content": self.logprobs} if self.logprobs is not None else None
        if completions:
            return {"text": "".join(self.content), "index": index, "logprobs": logprobs,
                    "finish_reason": self.finish_reason}
        message: dict[str, Any] = {"role": self.role, "content": "".join(self.content) if self.content else None,
                                   "refusal": "".join(self.refusal) if self.refusal else None}
        if self.reasoning:
            message["reasoning_content"] = "".join(self.reasoning)
        if self.tools:
            message["tool_calls"] = [{"id": t["id"], "type": t["type"],
                                      "function": {"name": "".join(t["name"]), "arguments": "".join(t["arguments"])}}
                                     for _, t in sorted(self.tools.items(), key=lambda kv: str(kv[0]))]
        return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": self.finish_reason}


def _openai_answer(api: str, body: bytes, usage: tuple[int, int, int, int, int]) -> dict[str, Any]:
    completions = api == "completions"
    envelope: dict[str, Any] = {}
    choices: dict[Any, _Choice] = {}
    found_usage = None
    for _, obj in _objects(body):
        if obj == "[DONE]":
            continue
        if not isinstance(obj, dict) or "error" in obj:
            raise ValueError("the stream holds an error")
        for name in _OPENAI_ENVELOPE:
            if obj.get(name) is not None:
                envelope[name] = obj[name]
        if isinstance(obj.get("usage"), dict):
            found_usage = obj["usage"]
        for choice in obj.get("choices") or ():
            if isinstance(choice, dict):
                index = choice.get("index", 0)
                slot = choices.get(index)
                if slot is None:
                    slot = choices[index] = _Choice()
                slot.add(choice, completions)
    out: dict[str, Any] = {"id": envelope.pop("id", None),
                           "object": "text_completion" if completions else "chat.completion",
                           "created": envelope.pop("created", 0), "model": envelope.pop("model", None)}
    out["choices"] = [c.answer(i, completions) for i, c in sorted(choices.items(), key=lambda kv: str(kv[0]))]
    out["usage"] = found_usage if found_usage is not None else openai_usage(usage)
    out.update(envelope)  # system_fingerprint, service_tier
    return out


def _anthropic_message(body: bytes) -> dict[str, Any]:
    message: dict[str, Any] | None = None
    blocks: dict[Any, dict[str, Any]] = {}
    texts: dict[Any, dict[str, list[str]]] = {}  # index -> field -> pieces
    stopped = False
    for name, obj in _objects(body):
        if not isinstance(obj, dict):
            continue
        kind = obj.get("type", name)
        if kind == "message_start":
            message = dict(obj.get("message") or {})
            message["content"] = []
            message["usage"] = dict(message.get("usage") or {})
        elif kind == "content_block_start":
            index = obj.get("index", 0)
            block = blocks[index] = dict(obj.get("content_block") or {})
            pieces = texts[index] = {}
            for field in ("text", "thinking"):
                if isinstance(block.get(field), str):
                    pieces[field] = [block[field]]
            if "input" in block:
                pieces["partial_json"] = []
        elif kind == "content_block_delta":
            index = obj.get("index", 0)
            if index not in blocks:
                raise ValueError("a delta of a block that did not start")
            block, pieces = blocks[index], texts[index]
            delta = obj.get("delta") or {}
            dtype = delta.get("type")
            if dtype == "text_delta":
                pieces.setdefault("text", []).append(delta.get("text", ""))
            elif dtype == "thinking_delta":
                pieces.setdefault("thinking", []).append(delta.get("thinking", ""))
            elif dtype == "input_json_delta":
                pieces.setdefault("partial_json", []).append(delta.get("partial_json", ""))
            elif dtype == "signature_delta":
                block["signature"] = delta.get("signature", "")
            elif dtype == "citations_delta":
                block.setdefault("citations", []).append(delta.get("citation"))
        elif kind == "message_delta" and message is not None:
            message.update(obj.get("delta") or {})
            message["usage"].update(obj.get("usage") or {})
        elif kind == "message_stop":
            stopped = True
        elif kind == "error":
            raise ValueError("the stream holds an error")
    if message is None or not stopped:
        raise ValueError("the stream is not a whole message")
    for index, block in blocks.items():
        pieces = texts[index]
        for field in ("text", "thinking"):
            if field in pieces:
                block[field] = "".join(pieces[field])
        if "partial_json" in pieces:
            raw = "".join(pieces["partial_json"])
            try:
                block["input"] = orjson.loads(raw) if raw else block.get("input", {})
            except orjson.JSONDecodeError:
                raise ValueError("a tool input is not JSON") from None
    message["content"] = [blocks[i] for i in sorted(blocks, key=str)]
    return message


# ---------------------------------------------------------------------- JSON -> stream


def json_to_sse(api: str, body: bytes, wants_usage: bool) -> bytes:
    """The stream a streamed request would have got for this JSON answer."""
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise ValueError("the stored answer is not JSON") from None
    if not isinstance(obj, dict):
        raise ValueError("the stored answer is not an object")
    if api == "messages":
        return _anthropic_stream(obj)
    if api in ("chat", "completions"):
        return _openai_stream(api, obj, wants_usage)
    if api == "responses":
        return _responses_stream(obj)
    raise ValueError(f"no stream form for {api}")


def _data(obj: Any) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def _openai_stream(api: str, obj: dict[str, Any], wants_usage: bool) -> bytes:
    completions = api == "completions"
    envelope: dict[str, Any] = {"id": obj.get("id"),
                                "object": "text_completion" if completions else "chat.completion.chunk",
                                "created": obj.get("created", 0), "model": obj.get("model")}
    for name in ("system_fingerprint", "service_tier"):
        if name in obj:
            envelope[name] = obj[name]
    tail = {"usage": None} if wants_usage else {}
    out: list[bytes] = []
    for choice in obj.get("choices") or ():
        if not isinstance(choice, dict):
            raise ValueError("a choice is not an object")
        index = choice.get("index", 0)
        if completions:
            first: dict[str, Any] = {"text": choice.get("text") or "", "index": index,
                                     "logprobs": choice.get("logprobs"), "finish_reason": None}
            last: dict[str, Any] = {"text": "", "index": index, "logprobs": None,
                                    "finish_reason": choice.get("finish_reason")}
        else:
            message = choice.get("message") or {}
            delta: dict[str, Any] = {"role": message.get("role", "assistant"), "content": message.get("content")}
            if message.get("refusal") is not None:
                delta["refusal"] = message["refusal"]
            if message.get("reasoning_content") is not None:
                delta["reasoning_content"] = message["reasoning_content"]
            calls = message.get("tool_calls")
            if isinstance(calls, list) and calls:
                delta["tool_calls"] = [{"index": j, **call} for j, call in enumerate(calls) if isinstance(call, dict)]
            first = {"index": index, "delta": delta, "logprobs": choice.get("logprobs"), "finish_reason": None}
            last = {"index": index, "delta": {}, "logprobs": None, "finish_reason": choice.get("finish_reason")}
        out.append(_data({**envelope, "choices": [first], **tail}))
        out.append(_data({**envelope, "choices": [last], **tail}))
    if wants_usage and isinstance(obj.get("usage"), dict):
        out.append(_data({**envelope, "choices": [], "usage": obj["usage"]}))
    out.append(b"data: [DONE]\n\n")
    return b"".join(out)


def _event(name: str, obj: dict[str, Any]) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(obj) + b"\n\n"


def _anthropic_stream(msg: dict[str, Any]) -> bytes:
    usage = msg.get("usage") if isinstance(msg.get("usage"), dict) else {}
    start = {k: v for k, v in msg.items() if k != "content"}
    start.update(content=[], stop_reason=None, stop_sequence=None, usage={**usage, "output_tokens": 0})
    out = [_event("message_start", {"type": "message_start", "message": start})]
    content = msg.get("content")
    for index, block in enumerate(content if isinstance(content, list) else ()):
        if not isinstance(block, dict):
            raise ValueError("a content block is not an object")
        kind = block.get("type")
        deltas: list[dict[str, Any]] = []
        if kind == "text":
            first = {k: v for k, v in block.items() if k != "citations"}
            first["text"] = ""
            if block.get("text"):
                deltas.append({"type": "text_delta", "text": block["text"]})
            for citation in block.get("citations") or ():
                deltas.append({"type": "citations_delta", "citation": citation})
        elif kind == "thinking":
            first = {"type": "thinking", "thinking": ""}
            if block.get("thinking"):
                deltas.append({"type": "thinking_delta", "thinking": block["thinking"]})
            if block.get("signature") is not None:
                deltas.append({"type": "signature_delta", "signature": block["signature"]})
        elif "input" in block:  # tool_use, server_tool_use, mcp_tool_use...
            first = {**block, "input": {}}
            deltas.append({"type": "input_json_delta", "partial_json": orjson.dumps(block["input"]).decode()})
        else:  # redacted_thinking, tool results...: whole in the start event, as Anthropic streams them
            first = block
        out.append(_event("content_block_start", {"type": "content_block_start", "index": index,
                                                  "content_block": first}))
        for delta in deltas:
            out.append(_event("content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta}))
        out.append(_event("content_block_stop", {"type": "content_block_stop", "index": index}))
    out.append(_event("message_delta", {"type": "message_delta",
                                        "delta": {"stop_reason": msg.get("stop_reason"),
                                                  "stop_sequence": msg.get("stop_sequence")},
                                        "usage": {"output_tokens": usage.get("output_tokens", 0)}}))
    out.append(_event("message_stop", {"type": "message_stop"}))
    return b"".join(out)


def _responses_stream(obj: dict[str, Any]) -> bytes:
    status = obj.get("status")
    output = obj.get("output")
    if status not in ("completed", "incomplete") or not isinstance(output, list):
        raise ValueError("the stored answer is not a finished response")
    out: list[bytes] = []

    def ev(kind: str, **data: Any) -> None:
        out.append(_event(kind, {"type": kind, "sequence_number": len(out), **data}))

    start = {**obj, "status": "in_progress", "output": [], "usage": None}
    if "incomplete_details" in obj:
        start["incomplete_details"] = None
    ev("response.created", response=start)
    ev("response.in_progress", response=start)
    for i, item in enumerate(output):
        if not isinstance(item, dict):
            raise ValueError("an output item is not an object")
        kind, item_id = item.get("type"), item.get("id")
        if kind == "message":
            ev("response.output_item.added", output_index=i, item={**item, "status": "in_progress", "content": []})
            content = item.get("content")
            for j, part in enumerate(content if isinstance(content, list) else ()):
                if not isinstance(part, dict):
                    raise ValueError("a content part is not an object")
                at = {"item_id": item_id, "output_index": i, "content_index": j}
                ptype = part.get("type")
                if ptype == "output_text":
                    text = part.get("text") or ""
                    ev("response.content_part.added", **at, part={**part, "text": "", "annotations": []})
                    if text:
                        ev("response.output_text.delta", **at, delta=text, logprobs=[])
                    ev("response.output_text.done", **at, text=text, logprobs=[])
                elif ptype == "refusal":
                    refusal = part.get("refusal") or ""
                    ev("response.content_part.added", **at, part={**part, "refusal": ""})
                    if refusal:
                        ev("response.refusal.delta", **at, delta=refusal)
                    ev("response.refusal.done", **at, refusal=refusal)
                else:
                    ev("response.content_part.added", **at, part=part)
                ev("response.content_part.done", **at, part=part)
        elif kind == "function_call":
            args = item.get("arguments") or ""
            ev("response.output_item.added", output_index=i, item={**item, "arguments": "", "status": "in_progress"})
            if args:
                ev("response.function_call_arguments.delta", item_id=item_id, output_index=i, delta=args)
            ev("response.function_call_arguments.done", item_id=item_id, output_index=i, arguments=args)
        else:  # reasoning, tool calls of the provider's own...: whole when added, as they are done
            ev("response.output_item.added", output_index=i, item=item)
        ev("response.output_item.done", output_index=i, item=item)
    ev("response.completed" if status == "completed" else "response.incomplete", response=obj)
    return b"".join(out)


# ---------------------------------------------------------------- OpenAI usage chunk


def usage_chunk_span(body: bytes) -> tuple[int, int] | None:
    """Where the usage-only chunk (`choices` empty, `usage` an object) is in an OpenAI
    stream, as byte offsets; None when there is none."""
    parser = SSEParser()
    at = 0
    for ev in parser.feed(body) + parser.close():
        end = at + len(ev.raw)
        data = ev.data
        if data[:1] == b"{" and b'"usage"' in data:
            try:
                obj = orjson.loads(data)
            except orjson.JSONDecodeError:
                obj = None
            if isinstance(obj, dict) and isinstance(obj.get("usage"), dict) and not obj.get("choices"):
                return (at, end)
        at = end
    return None


def openai_stream_for(body: bytes, span: tuple[int, int] | None, usage: tuple[int, int, int, int, int],
                      wants_usage: bool) -> bytes:
    """A stored OpenAI stream for a client that does (not) ask for the usage chunk: the
    stored one left out, or one written from the counts before `[DONE]`."""
    if not wants_usage:
        return body if span is None else body[:span[0]] + body[span[1]:]
    if span is not None:
        return body
    envelope: dict[str, Any] = {}
    for _, obj in _objects(body):
        if isinstance(obj, dict):
            envelope = {k: obj[k] for k in ("id", "object", "created", "model", "system_fingerprint") if k in obj}
            break
    chunk = _data({**envelope, "choices": [], "usage": openai_usage(usage)})
    done = body.rfind(b"[DONE]")
    at = body.rfind(b"\n", 0, done) + 1 if done >= 0 else len(body)
    return body[:at] + chunk + body[at:]
