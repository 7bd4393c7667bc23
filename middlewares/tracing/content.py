"""Prompts and answers as span events (`capture_content`), after the GenAI conventions'
events: one `gen_ai.{system,user,assistant,tool}.message` per message sent, with its
`content`, and one `gen_ai.choice` per choice of the answer, with `index`,
`finish_reason` and `message`.

Captured on the attempt span, so what is recorded is what the upstream saw (with `pii`
on, the masked text: `capture_content: masked`). Bounded: at most `MAX_CHARS` characters
of content per span (cut, and `llmproxy.content_truncated` says so), and the answer is
read from at most `MAX_ANSWER_BYTES` of it.
"""

from __future__ import annotations

from typing import Any

import orjson

MAX_CHARS = 64 * 1024
MAX_ANSWER_BYTES = 256 * 1024
ROLES = {"system": "gen_ai.system.message", "developer": "gen_ai.system.message", "user": "gen_ai.user.message",
         "assistant": "gen_ai.assistant.message", "tool": "gen_ai.tool.message"}


class Budget:
    """Characters of content left for one span."""

    __slots__ = ("left", "cut")

    def __init__(self) -> None:
        self.left = MAX_CHARS
        self.cut = False

    def take(self, text: str) -> str:
        if len(text) > self.left:
            text, self.cut = text[:self.left], True
        self.left -= len(text)
        return text


def _text(content: Any) -> str:
    return content if isinstance(content, str) else orjson.dumps(content).decode() if content is not None else ""


def input_events(api: str, body: Any, budget: Budget) -> list[tuple[str, dict[str, Any]]]:
    """The request's messages (chat, messages), or its prompt (completions)."""
    if not isinstance(body, dict):
        return []
    out: list[tuple[str, dict[str, Any]]] = []
    if api == "messages" and body.get("system") is not None:
        out.append(("gen_ai.system.message", {"content": budget.take(_text(body["system"]))}))
    if api in ("chat", "messages"):
        for message in body.get("messages") or []:
            if not isinstance(message, dict) or budget.left <= 0:
                continue
            name = ROLES.get(message.get("role"), "gen_ai.user.message")
            out.append((name, {"content": budget.take(_text(message.get("content")))}))
    elif api == "completions" and body.get("prompt") is not None:
        out.append(("gen_ai.user.message", {"content": budget.take(_text(body["prompt"]))}))
    return out


def output_events(api: str, stream: bool, data: bytes, budget: Budget) -> list[tuple[str, dict[str, Any]]]:
    """The answer's choices, from its JSON body or its stream's events (as far as `data`
    goes: the first MAX_ANSWER_BYTES)."""
    choices: dict[int, list[Any]] = {}  # index -> [text parts, finish reason]
    if stream:
        for line in data.split(b"\n"):
            if line.startswith(b"data:"):
                _stream_event(api, line[5:].strip(), choices)
    else:
        try:
            answer = orjson.loads(data)
        except orjson.JSONDecodeError:
            return []
        if api == "messages" and isinstance(answer, dict):
            parts = [b.get("text", "") for b in answer.get("content") or [] if isinstance(b, dict)]
            choices[0] = [parts, answer.get("stop_reason")]
        elif isinstance(answer, dict):
            for choice in answer.get("choices") or []:
                if isinstance(choice, dict):
                    message = choice.get("message") or {}
                    text = message.get("content") if isinstance(message, dict) else None
                    if text is None:
                        text = choice.get("text")  # completions
                    choices[int(choice.get("index") or 0)] = [[text or ""], choice.get("finish_reason")]
    out = []
    for index in sorted(choices):
        parts, finish = choices[index]
        text = budget.take("".join(p for p in parts if isinstance(p, str)))
        out.append(("gen_ai.choice", {"index": index, "finish_reason": str(finish or ""),
                                      "message": orjson.dumps({"role": "assistant", "content": text}).decode()}))
    return out


def _stream_event(api: str, raw: bytes, choices: dict[int, list[Any]]) -> None:
    if raw == b"[DONE]":
        return
    try:
        event = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return  # the last event, cut by the byte bound
    if not isinstance(event, dict):
        return
    if api == "messages":
        slot = choices.setdefault(0, [[], None])
        if event.get("type") == "content_block_delta":
            delta = event.get("delta") or {}
            slot[0].append(delta.get("text", "") if isinstance(delta, dict) else "")
        elif event.get("type") == "message_delta":
            delta = event.get("delta") or {}
            slot[1] = delta.get("stop_reason") if isinstance(delta, dict) else None
        return
    for choice in event.get("choices") or []:
        if not isinstance(choice, dict):
            continue
        slot = choices.setdefault(int(choice.get("index") or 0), [[], None])
        delta = choice.get("delta") or {}
        text = delta.get("content") if isinstance(delta, dict) else None
        if text is None:
            text = choice.get("text")  # completions
        if isinstance(text, str):
            slot[0].append(text)
        if choice.get("finish_reason"):
            slot[1] = choice["finish_reason"]
