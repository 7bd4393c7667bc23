"""Placeholders for personal data: find a request's texts, mask them, restore the answer.

Placeholders: an entity found in the request becomes `<ENTITY_N>` (`<EMAIL_ADDRESS_1>`),
numbered per entity type in the order values are met; the same (type, value) gets the
same placeholder everywhere in the request. A placeholder never collides with text the
request already holds: every string of the form `<NAME_N>` in the whole request (tool
definitions and unknown fields included) is taken, and numbering skips it. So the only
`<NAME_N>` strings an answer can contain that the proxy restores are those it made.

Restoring works on decoded string values, never on raw JSON bytes, so an escape such as
`\\u003c` cannot hide a placeholder. Where the value is itself JSON text (tool-call
`arguments`, Anthropic `partial_json`), the original is written JSON-string-escaped.

Streams (`RestoredStream`): each text value is tracked on its own (an OpenAI choice's
content, each of its tool calls' arguments, a completions choice's text, an Anthropic
content block). The hold-back rule: after a chunk of text, only a trailing `<...` that is
a proper prefix of one of this request's placeholders is held back; everything else goes
out at once. A placeholder has no `<` inside, so at most one such tail exists, and it is
shorter than the longest placeholder. What is held goes out with the next text of the
same value, or when the value ends (`finish_reason`, `content_block_stop`, the end of the
stream, an error event, `[DONE]`). An event whose text did not change and that holds
nothing back passes byte for byte; the others are re-serialized with their `event:`,
`id:`, `retry:` and comment lines kept.
"""

from __future__ import annotations

import re
from typing import Any, AsyncIterator, Iterable, Protocol

import orjson

from ..sse import Event, SSEParser

__all__ = ["Vault", "TextRestorer", "RestoredStream", "request_texts", "restore_answer",
           "redact", "PLACEHOLDER"]

PLACEHOLDER = re.compile(r"<[A-Z][A-Z0-9_]*_[0-9]+>")
_PLACEHOLDER_BYTES = re.compile(rb"<[A-Z][A-Z0-9_]*_[0-9]+>")
_MAX_DEPTH = 64  # nested JSON values walked; the server already rejects deeper bodies
_BOM = b"\xef\xbb\xbf"


class SpanLike(Protocol):
    start: int
    end: int
    entity: str


def _may_hold_lt(data: bytes) -> bool:
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


# --- the request: where the texts are ----------------------------------------------------


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
    """The slots of a request body for `api` (chat, completions, embeddings, messages)."""
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
    elif api == "messages":
        if "system" in body:
            _anthropic_content(texts, body, "system")
        for msg in _list(body.get("messages")):
            if isinstance(msg, dict) and "content" in msg:
                _anthropic_content(texts, msg, "content")
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


# --- the answer, whole ------------------------------------------------------------------


def restore_answer(body: bytes, vault: Vault, api: str) -> bytes:
    """A non-streamed JSON answer with the originals restored; unchanged bytes when nothing
    in it can be a placeholder."""
    if not _may_hold_lt(body):
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


# --- the answer, streamed ---------------------------------------------------------------

_ENVELOPE = ("id", "object", "created", "model", "system_fingerprint")
_ANTHROPIC_FLUSH_ALL = frozenset({"message_delta", "message_stop", "error"})


class RestoredStream:
    """An SSE body (OpenAI chat or completions, Anthropic messages) with the originals
    restored as it streams; see the module docstring for the hold-back rule."""

    __slots__ = ("body", "vault", "api", "parser", "slots", "held", "envelope", "done")

    def __init__(self, body: AsyncIterator[bytes], vault: Vault, api: str) -> None:
        self.body = body
        self.vault = vault
        self.api = api  # chat | completions | messages
        self.parser = SSEParser()
        self.slots: dict[tuple, tuple[TextRestorer, str]] = {}  # key -> (restorer, kind)
        self.held: set[tuple] = set()  # keys of slots holding text back
        self.envelope: dict[str, Any] = {}  # OpenAI: the last chunk's id, model...
        self.done = False

    def __aiter__(self) -> "RestoredStream":
        return self

    async def __anext__(self) -> bytes:
        while not self.done:
            try:
                chunk = await self.body.__anext__()
            except StopAsyncIteration:
                self.done = True
                out = self.finish()
                if out:
                    return out
                break
            out = self.chunk(chunk)
            if out:
                return out
        raise StopAsyncIteration

    async def aclose(self) -> None:
        aclose = getattr(self.body, "aclose", None)
        if aclose is not None:
            await aclose()

    @classmethod
    def whole(cls, body: bytes, vault: Vault, api: str) -> bytes:
        """A complete SSE body (not an iterator) restored."""
        stream = cls(None, vault, api)  # type: ignore[arg-type]
        return stream.chunk(body) + stream.finish()

    # the work, synchronous (tests drive it directly) ------------------------------------

    def chunk(self, chunk: bytes) -> bytes:
        """Bytes to send for one upstream chunk."""
        parser = self.parser
        if not self.held and not parser.pending and chunk[-2:] == b"\n\n" and not _may_hold_lt(chunk):
            return chunk  # whole events, nothing held, no `<` anywhere: as they came
        return b"".join([self.event(ev) for ev in parser.feed(chunk)])

    def finish(self) -> bytes:
        """Bytes to send once the upstream body has ended: what is left, what is held."""
        out = [self.event(ev) for ev in self.parser.close()]
        out.append(self._flush_all())
        return b"".join(out)

    def event(self, ev: Event) -> bytes:
        data = ev.data
        if not self.held and not _may_hold_lt(data):
            return ev.raw
        if self.api == "messages":
            return self._anthropic(ev)
        return self._openai(ev)

    # slots -------------------------------------------------------------------------------

    def _feed(self, key: tuple, text: str, kind: str, json: bool = False) -> str:
        slot = self.slots.get(key)
        if slot is None:
            if "<" not in text:
                return text
            slot = self.slots[key] = (TextRestorer(self.vault, json), kind)
        restorer = slot[0]
        out = restorer.feed(text)
        if restorer.pending:
            self.held.add(key)
        else:
            self.held.discard(key)
        return out

    def _flush(self, key: tuple) -> str:
        if key not in self.held:
            return ""
        self.held.discard(key)
        return self.slots[key][0].flush()

    def _flush_all(self) -> bytes:
        """Events carrying every held text, for the end of the stream (or an error)."""
        if not self.held:
            return b""
        out = []
        for key in sorted(self.held, key=repr):
            kind = self.slots[key][1]
            text = self._flush(key)
            if self.api == "messages":
                out.append(_anthropic_delta(key[0], kind, text))
            else:
                out.append(self._openai_delta(key, kind, text))
        return b"".join(out)

    # OpenAI --------------------------------------------------------------------------------

    def _openai(self, ev: Event) -> bytes:
        try:
            obj = orjson.loads(ev.data) if ev.data[:1] == b"{" else None
        except orjson.JSONDecodeError:
            obj = None
        choices = obj.get("choices") if isinstance(obj, dict) else None
        if not isinstance(choices, list) or not choices:
            # [DONE], an error, the usage chunk: what is held goes out before it.
            return self._flush_all() + ev.raw
        self.envelope = {k: obj[k] for k in _ENVELOPE if k in obj}
        changed = False
        for choice in choices:
            if isinstance(choice, dict):
                changed |= self._openai_choice(choice)
        return _serialize(ev, obj) if changed else ev.raw

    def _openai_choice(self, choice: dict) -> bool:
        i = choice.get("index", 0)
        ends = choice.get("finish_reason") is not None
        changed = False
        if self.api == "completions":
            text = choice.get("text")
            if isinstance(text, str):
                new = self._feed((i, "text"), text, "text")
                if ends:
                    new += self._flush((i, "text"))
                if new != text:
                    choice["text"] = new
                    changed = True
            elif ends and (i, "text") in self.held:
                choice["text"] = self._flush((i, "text"))
                changed = True
            return changed
        delta = choice.get("delta")
        if not isinstance(delta, dict):
            if not ends or not any(k[0] == i for k in self.held):
                return False
            delta = choice["delta"] = {}
        content = delta.get("content")
        if isinstance(content, str):
            new = self._feed((i, "content"), content, "content")
            if ends:
                new += self._flush((i, "content"))
            if new != content:
                delta["content"] = new
                changed = True
        elif ends and (i, "content") in self.held:
            delta["content"] = self._flush((i, "content"))
            changed = True
        calls = delta.get("tool_calls")
        seen = set()
        if isinstance(calls, list):
            for call in calls:
                fn = call.get("function") if isinstance(call, dict) else None
                args = fn.get("arguments") if isinstance(fn, dict) else None
                if not isinstance(args, str):
                    continue
                key = (i, "tool", call.get("index", 0))
                seen.add(key)
                new = self._feed(key, args, "tool", json=True)
                if ends:
                    new += self._flush(key)
                if new != args:
                    fn["arguments"] = new
                    changed = True
        if ends:
            for key in sorted((k for k in self.held if k[0] == i and k[1] == "tool" and k not in seen),
                              key=lambda k: k[2]):
                if not isinstance(delta.get("tool_calls"), list):
                    delta["tool_calls"] = []
                delta["tool_calls"].append({"index": key[2], "function": {"arguments": self._flush(key)}})
                changed = True
        return changed

    def _openai_delta(self, key: tuple, kind: str, text: str) -> bytes:
        i = key[0]
        if kind == "text":
            choice: dict[str, Any] = {"index": i, "text": text, "logprobs": None, "finish_reason": None}
        elif kind == "tool":
            choice = {"index": i, "delta": {"tool_calls": [{"index": key[2], "function": {"arguments": text}}]},
                      "finish_reason": None}
        else:
            choice = {"index": i, "delta": {"content": text}, "finish_reason": None}
        return b"data: " + orjson.dumps({**self.envelope, "choices": [choice]}) + b"\n\n"

    # Anthropic -----------------------------------------------------------------------------

    def _anthropic(self, ev: Event) -> bytes:
        try:
            obj = orjson.loads(ev.data) if ev.data[:1] == b"{" else None
        except orjson.JSONDecodeError:
            obj = None
        kind = obj.get("type") if isinstance(obj, dict) else None
        if kind == "content_block_delta":
            delta = obj.get("delta")
            dtype = delta.get("type") if isinstance(delta, dict) else None
            if dtype == "text_delta":
                field, json = "text", False
            elif dtype == "input_json_delta":
                field, json = "partial_json", True
            else:
                return ev.raw
            text = delta.get(field)
            if not isinstance(text, str):
                return ev.raw
            new = self._feed((obj.get("index", 0),), text, dtype, json)
            if new == text:
                return ev.raw
            delta[field] = new
            return _serialize(ev, obj)
        if kind == "content_block_start":
            block = obj.get("content_block")
            text = block.get("text") if isinstance(block, dict) and block.get("type") == "text" else None
            if isinstance(text, str) and text:
                new = self._feed((obj.get("index", 0),), text, "text_delta")
                if new != text:
                    block["text"] = new
                    return _serialize(ev, obj)
            return ev.raw
        if kind == "content_block_stop":
            key = (obj.get("index", 0),)
            if key in self.held:
                dtype = self.slots[key][1]
                return _anthropic_delta(key[0], dtype, self._flush(key)) + ev.raw
            return ev.raw
        if kind in _ANTHROPIC_FLUSH_ALL or (obj is None and ev.event in _ANTHROPIC_FLUSH_ALL):
            return self._flush_all() + ev.raw
        return ev.raw  # ping, message_start, unknown: a placeholder may continue after it


def _anthropic_delta(index: Any, dtype: str, text: str) -> bytes:
    field = "partial_json" if dtype == "input_json_delta" else "text"
    data = {"type": "content_block_delta", "index": index, "delta": {"type": dtype, field: text}}
    return b"event: content_block_delta\ndata: " + orjson.dumps(data) + b"\n\n"


def _serialize(ev: Event, obj: Any) -> bytes:
    """`ev` with its data replaced by `obj`: its other lines (`event:`, `id:`, `retry:`,
    comments) are kept in their order, the new `data:` line where the first one was."""
    data = b"data: " + orjson.dumps(obj)
    raw = ev.raw
    if raw[:5] == b"data:" and raw.find(10) == len(raw) - 2:  # the usual event: one data line
        return data + b"\n\n"
    bom = raw[:3] == _BOM
    if bom:
        raw = raw[3:]
    if 13 in raw:
        raw = raw.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    lines: list[bytes] = []
    placed = False
    for line in raw.split(b"\n"):
        if not line:
            continue  # the blank line that ends the event
        if line[:5] == b"data:" or line == b"data":
            if not placed:
                lines.append(data)
                placed = True
            continue
        lines.append(line)
    if not placed:
        lines.append(data)
    out = b"\n".join(lines) + b"\n\n"
    return _BOM + out if bom else out
