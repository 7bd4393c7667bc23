"""Where a request's texts are: the strings a provider would read, as slots that the PII
middleware can read and write back (chat messages and tool calls, Anthropic system and
content blocks, the legacy prompt, embeddings input, the Responses API's instructions and
input items). Only strings are slots; keys,
numbers and token-id lists are not text. Tool-call arguments are JSON text: their string
values are the slots, and the arguments are re-serialized when one of them changes, so
the masked arguments stay valid JSON."""

from __future__ import annotations

from typing import Any

import orjson

__all__ = ["Texts", "request_texts"]

_MAX_DEPTH = 64  # nested JSON values walked; the server already rejects deeper bodies


class Texts:
    """The strings of a request a provider would read, as (container, key) slots, plus the
    JSON-text fields (tool-call arguments) to re-serialize when a slot inside them changed."""

    __slots__ = ("slots", "json_fields")

    def __init__(self) -> None:
        self.slots: list[tuple[Any, Any]] = []
        # (container, key, holder, first slot, end slot): container[key] = dumps(holder[0])
        self.json_fields: list[tuple[Any, Any, list, int, int]] = []

    def values(self) -> list[str]:
        return [c[k] for c, k in self.slots]

    def write(self, new: dict[int, str]) -> None:
        """Set slot i to new[i]; re-serialize the JSON-text fields that hold a changed slot."""
        slots = self.slots
        for i, text in new.items():
            c, k = slots[i]
            c[k] = text
        for container, key, holder, first, end in self.json_fields:
            if any(first <= i < end for i in new):
                container[key] = orjson.dumps(holder[0]).decode()

    def add(self, container: Any, key: Any) -> None:
        value = container[key]
        if isinstance(value, str) and value:
            self.slots.append((container, key))

    def add_value(self, container: Any, key: Any, depth: int = 0) -> None:
        """Every string value (not keys) inside a JSON value."""
        value = container[key]
        if isinstance(value, str):
            if value:
                self.slots.append((container, key))
        elif depth > _MAX_DEPTH:
            return
        elif isinstance(value, dict):
            for k in value:
                self.add_value(value, k, depth + 1)
        elif isinstance(value, list):
            for i in range(len(value)):
                self.add_value(value, i, depth + 1)

    def add_json_text(self, container: Any, key: Any) -> None:
        """A string that holds JSON (tool-call arguments): its string values are the slots,
        so the masked text stays valid JSON; text that is not JSON is one plain slot."""
        text = container[key]
        if not isinstance(text, str) or not text:
            return
        try:
            holder = [orjson.loads(text)]
        except orjson.JSONDecodeError:
            self.slots.append((container, key))
            return
        first = len(self.slots)
        self.add_value(holder, 0)
        if len(self.slots) > first:
            self.json_fields.append((container, key, holder, first, len(self.slots)))


def request_texts(body: dict, api: str) -> Texts:
    """The slots of a request body for `api` (chat, completions, embeddings, messages,
    responses)."""
    texts = Texts()
    if api == "chat":
        for msg in _list(body.get("messages")):
            if not isinstance(msg, dict):
                continue
            _openai_content(texts, msg)
            for call in _list(msg.get("tool_calls")):
                fn = call.get("function") if isinstance(call, dict) else None
                if isinstance(fn, dict) and "arguments" in fn:
                    texts.add_json_text(fn, "arguments")
            fn = msg.get("function_call")
            if isinstance(fn, dict) and "arguments" in fn:
                texts.add_json_text(fn, "arguments")
    elif api in ("messages", "count_tokens"):  # counting sends the same text upstream
        if "system" in body:
            _anthropic_content(texts, body, "system")
        for msg in _list(body.get("messages")):
            if isinstance(msg, dict) and "content" in msg:
                _anthropic_content(texts, msg, "content")
    elif api in ("responses", "input_tokens"):
        _responses_request(texts, body)
    elif api in ("completions", "embeddings"):
        field = "prompt" if api == "completions" else "input"
        value = body.get(field)
        if isinstance(value, str):
            texts.add(body, field)
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if isinstance(item, str):  # lists of token ids are not text
                    texts.add(value, i)
    return texts


def _list(value: Any) -> list:
    return value if isinstance(value, list) else []


def _openai_content(texts: Texts, msg: dict) -> None:
    content = msg.get("content")
    if isinstance(content, str):
        texts.add(msg, "content")
    elif isinstance(content, list):
        for part in content:
            if isinstance(part, dict) and part.get("type") == "text" and "text" in part:
                texts.add(part, "text")


def _responses_request(texts: Texts, body: dict) -> None:
    """`instructions`; `input` as a string or items: messages (`content` a string or parts
    with `text`: input_text, and the output_text of earlier assistant turns), function and
    custom tool calls' `arguments` / `input` (arguments as JSON text) and their outputs
    (a string or parts); a reusable prompt's `variables`. Reasoning items (their
    `encrypted_content` is the provider's, their summaries its own words about a masked
    request) and references by id are left as they are."""
    if "instructions" in body:
        texts.add(body, "instructions")
    given = body.get("input")
    if isinstance(given, str):
        texts.add(body, "input")
    for i, item in enumerate(_list(given)):
        if isinstance(item, str):
            texts.add(given, i)
            continue
        if not isinstance(item, dict):
            continue
        kind = item.get("type")
        if kind is None or kind == "message":
            if "content" in item:
                _responses_parts(texts, item, "content")
        elif kind == "function_call":
            if "arguments" in item:
                texts.add_json_text(item, "arguments")
        elif kind == "custom_tool_call":
            if "input" in item:
                texts.add(item, "input")
        elif kind in ("function_call_output", "custom_tool_call_output"):
            if "output" in item:
                _responses_parts(texts, item, "output")
    prompt = body.get("prompt")
    variables = prompt.get("variables") if isinstance(prompt, dict) else None
    if isinstance(variables, dict):
        for name, value in variables.items():
            if isinstance(value, str):
                texts.add(variables, name)
            elif isinstance(value, dict) and value.get("type") == "input_text" and "text" in value:
                texts.add(value, "text")


def _responses_parts(texts: Texts, item: dict, key: str) -> None:
    """A string, or a list of parts whose `text` is read (input_text, output_text)."""
    content = item[key]
    if isinstance(content, str):
        texts.add(item, key)
    elif isinstance(content, list):
        for part in content:
            if isinstance(part, dict) and "text" in part and part.get("type") in _TEXT_PARTS:
                texts.add(part, "text")


_TEXT_PARTS = frozenset({"input_text", "output_text", "text", None})


def _anthropic_content(texts: Texts, container: dict, key: str, depth: int = 0) -> None:
    """A string, or a list of blocks: text, tool_use input, tool_result content (nested),
    text documents. Thinking blocks are signed by the provider and stay untouched."""
    content = container[key]
    if isinstance(content, str):
        texts.add(container, key)
        return
    if not isinstance(content, list) or depth > _MAX_DEPTH:
        return
    for block in content:
        if not isinstance(block, dict):
            continue
        kind = block.get("type")
        if kind == "text" and "text" in block:
            texts.add(block, "text")
        elif kind == "tool_use" and "input" in block:
            texts.add_value(block, "input")
        elif kind == "tool_result" and "content" in block:
            _anthropic_content(texts, block, "content", depth + 1)
        elif kind == "document":
            source = block.get("source")
            if isinstance(source, dict) and source.get("type") == "text" and "data" in source:
                texts.add(source, "data")
