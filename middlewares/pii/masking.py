"""Placeholders for personal data: mask a request's texts, restore the answer.

Placeholders: an entity found in the request becomes `<ENTITY_N>` (`<EMAIL_ADDRESS_1>`),
numbered per entity type in the order values are met; the same (type, value) gets the
same placeholder everywhere in the request. A placeholder never collides with text the
request already holds: every string of the form `<NAME_N>` in the whole request (tool
definitions and unknown fields included) is taken, and numbering skips it. So the only
`<NAME_N>` strings an answer can contain that the proxy restores are those it made.

Restoring works on decoded string values, never on raw JSON bytes, so an escape such as
`\\u003c` cannot hide a placeholder. Where the value is itself JSON text (tool-call
`arguments`, Anthropic `partial_json`), the original is written JSON-string-escaped.

Streams (`llmproxy.middlewares.pii.streams.RestoredStream`): each text value is tracked on its own
(an OpenAI choice's content, each of its tool calls' arguments, a completions choice's
text, an Anthropic content block, a Responses output item's content part or its function
call's arguments). The hold-back rule: after a chunk of text, only a
trailing `<...` that is a proper prefix of one of this request's placeholders is held
back; everything else goes out at once. A placeholder has no `<` inside, so at most one such tail exists, and it is
shorter than the longest placeholder. What is held goes out with the next text of the
same value, or when the value ends (`finish_reason`, `content_block_stop`, a Responses
`.done` event, the end of the stream, an error event, `[DONE]`). An event whose text did not change and that holds
nothing back passes byte for byte; the others are re-serialized with their `event:`,
`id:`, `retry:` and comment lines kept.
"""

from __future__ import annotations

import re
from typing import Any, Iterable, Protocol

import orjson

__all__ = ["Vault", "TextRestorer", "restore_answer", "restore_item", "restore_output", "redact", "may_hold_lt",
           "PLACEHOLDER"]

PLACEHOLDER = re.compile(r"<[A-Z][A-Z0-9_]*_[0-9]+>")
_PLACEHOLDER_BYTES = re.compile(rb"<[A-Z][A-Z0-9_]*_[0-9]+>")
_MAX_DEPTH = 64  # nested JSON values walked; the server already rejects deeper bodies


class SpanLike(Protocol):
    start: int
    end: int
    entity: str


def may_hold_lt(data: bytes) -> bool:
    """Whether JSON bytes may hold a `<` in some string (literal or `\\u003c`-escaped)."""
    return b"<" in data or b"\\u003c" in data or b"\\u003C" in data


def _json_escaped(value: str) -> str:
    return orjson.dumps(value)[1:-1].decode()


def redact(text: str, spans: Iterable[SpanLike]) -> str:
    """`text` with each span replaced by `<ENTITY>`; nothing to restore."""
    out, pos = [], 0
    for s in spans:
        out.append(text[pos:s.start])
        out.append(f"<{s.entity}>")
        pos = s.end
    out.append(text[pos:])
    return "".join(out)


class Vault:
    """One request's placeholders and the originals behind them."""

    __slots__ = ("taken", "originals", "longest", "_by_value", "_counters", "_prefixes", "_escaped")

    def __init__(self, taken: Iterable[str] = ()) -> None:
        self.taken = set(taken)  # placeholder-shaped text already in the request
        self.originals: dict[str, str] = {}  # placeholder -> original value
        self.longest = 0  # the longest placeholder's length
        self._by_value: dict[tuple[str, str], str] = {}
        self._counters: dict[str, int] = {}
        self._prefixes: frozenset[str] | None = None
        self._escaped: dict[str, str] | None = None

    @classmethod
    def for_request(cls, body: Any) -> "Vault":
        """A vault whose placeholders avoid every `<NAME_N>` already in `body` (any field)."""
        raw = orjson.dumps(body)
        taken = {m.decode() for m in _PLACEHOLDER_BYTES.findall(raw)} if b"<" in raw else ()
        return cls(taken)

    def placeholder(self, entity: str, value: str) -> str:
        found = self._by_value.get((entity, value))
        if found is None:
            found = self._new(entity, value)
        return found

    def _new(self, entity: str, value: str) -> str:
        n = self._counters.get(entity, 0) + 1
        found = f"<{entity}_{n}>"
        while found in self.taken:
            n += 1
            found = f"<{entity}_{n}>"
        self._counters[entity] = n
        self._by_value[(entity, value)] = found
        self.originals[found] = value
        if len(found) > self.longest:
            self.longest = len(found)
        if self._prefixes is not None or self._escaped is not None:
            self._prefixes = self._escaped = None
        return found

    def mask(self, text: str, spans: Iterable[SpanLike]) -> str:
        """`text` with each span (sorted, non-overlapping) replaced by its placeholder."""
        out: list[str] = []
        pos = 0
        by_value = self._by_value
        for s in spans:
            start = s.start
            value = text[start:s.end]
            found = by_value.get((s.entity, value))
            if found is None:
                found = self._new(s.entity, value)
            out += (text[pos:start], found)
            pos = s.end
        out.append(text[pos:])
        return "".join(out)

    def restore(self, text: str, json: bool = False) -> str:
        """`text` with this vault's placeholders replaced by the originals (JSON-string-escaped
        when `json`: the text is JSON itself). Other `<NAME_N>` text stays as it is."""
        if "<" not in text or not self.originals:
            return text
        table = self.escaped if json else self.originals
        return PLACEHOLDER.sub(lambda m: table.get(m.group(), m.group()), text)

    @property
    def escaped(self) -> dict[str, str]:
        if self._escaped is None:
            self._escaped = {p: _json_escaped(v) for p, v in self.originals.items()}
        return self._escaped

    @property
    def prefixes(self) -> frozenset[str]:
        """Every proper prefix of every placeholder: what a stream may hold back."""
        if self._prefixes is None:
            self._prefixes = frozenset(p[:i] for p in self.originals for i in range(1, len(p)))
        return self._prefixes

    def stream(self, json: bool = False) -> "TextRestorer":
        return TextRestorer(self, json)


class TextRestorer:
    """Restores one text value that arrives in pieces. `feed` returns what can go out now;
    `flush` what was held back, once the value has ended."""

    __slots__ = ("vault", "json", "pending")

    def __init__(self, vault: Vault, json: bool = False) -> None:
        self.vault = vault
        self.json = json
        self.pending = ""

    def feed(self, text: str) -> str:
        if self.pending:
            text = self.pending + text
            self.pending = ""
        lt = text.rfind("<")
        if lt < 0:
            return text
        vault = self.vault
        if len(text) - lt < vault.longest and text[lt:] in vault.prefixes:
            self.pending = text[lt:]
            text = text[:lt]
        return vault.restore(text, self.json)

    def flush(self) -> str:
        held, self.pending = self.pending, ""
        return held

# --- the answer, whole ------------------------------------------------------------------


def _list(value: Any) -> list:
    return value if isinstance(value, list) else []


def restore_answer(body: bytes, vault: Vault, api: str) -> bytes:
    """A non-streamed JSON answer with the originals restored; unchanged bytes when nothing
    in it can be a placeholder."""
    if not may_hold_lt(body):
        return body
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        return body
    if not isinstance(obj, dict):
        return body
    changed = False
    if api == "messages":
        for block in _list(obj.get("content")):
            if not isinstance(block, dict):
                continue
            if block.get("type") == "text":
                changed |= _restore_at(block, "text", vault, False)
            elif block.get("type") == "tool_use" and "input" in block:
                changed |= _restore_value(block, "input", vault, 0)
    elif api == "responses":
        changed = restore_output(obj, vault)
    elif api in ("chat", "completions"):
        for choice in _list(obj.get("choices")):
            if not isinstance(choice, dict):
                continue
            if api == "completions":
                changed |= _restore_at(choice, "text", vault, False)
                continue
            msg = choice.get("message")
            if not isinstance(msg, dict):
                continue
            content = msg.get("content")
            if isinstance(content, str):
                changed |= _restore_at(msg, "content", vault, False)
            elif isinstance(content, list):
                for part in content:
                    if isinstance(part, dict):
                        changed |= _restore_at(part, "text", vault, False)
            for call in _list(msg.get("tool_calls")):
                fn = call.get("function") if isinstance(call, dict) else None
                if isinstance(fn, dict):
                    changed |= _restore_at(fn, "arguments", vault, True)
            fn = msg.get("function_call")
            if isinstance(fn, dict):
                changed |= _restore_at(fn, "arguments", vault, True)
    return orjson.dumps(obj) if changed else body


def restore_output(response: dict, vault: Vault) -> bool:
    """A Responses API response object's `output` restored in place; whether it changed."""
    changed = False
    for item in _list(response.get("output")):
        if isinstance(item, dict):
            changed |= restore_item(item, vault)
    return changed


def restore_item(item: dict, vault: Vault) -> bool:
    """One output item restored in place: a message's text (and refusal) parts, a function
    call's `arguments` (JSON text), a custom tool call's `input`. Reasoning is left as the
    provider wrote it (its summary speaks of the masked request)."""
    kind = item.get("type")
    if kind == "message":
        changed = False
        for part in _list(item.get("content")):
            if isinstance(part, dict):
                changed |= _restore_at(part, "text", vault, False) | _restore_at(part, "refusal", vault, False)
        return changed
    if kind == "function_call":
        return _restore_at(item, "arguments", vault, True)
    if kind == "custom_tool_call":
        return _restore_at(item, "input", vault, False)
    return False


def _restore_at(container: dict, key: str, vault: Vault, json: bool) -> bool:
    text = container.get(key)
    if not isinstance(text, str):
        return False
    new = vault.restore(text, json)
    if new is text or new == text:
        return False
    container[key] = new
    return True


def _restore_value(container: Any, key: Any, vault: Vault, depth: int) -> bool:
    value = container[key]
    if isinstance(value, str):
        new = vault.restore(value)
        if new != value:
            container[key] = new
            return True
        return False
    changed = False
    if depth <= _MAX_DEPTH:
        if isinstance(value, dict):
            for k in value:
                changed |= _restore_value(value, k, vault, depth + 1)
        elif isinstance(value, list):
            for i in range(len(value)):
                changed |= _restore_value(value, i, vault, depth + 1)
    return changed
