"""Restoring a streamed answer (OpenAI chat and completions, Anthropic messages, OpenAI
Responses) as it passes; the hold-back rule is in `llmproxy.middlewares.pii.masking`'s
docstring.

Responses streams: the deltas (`response.output_text.delta`, `.refusal.delta`,
`.function_call_arguments.delta`, `.custom_tool_call_input.delta`) are restored like chat's
content, one `TextRestorer` per (output_index, content_index), or per output item for
arguments; the events that repeat a whole text (`response.output_text.done`'s `text`,
`response.content_part.done`'s `part`, `response.output_item.done`'s `item`, the
`response` of `response.completed` / `.incomplete` / `.failed` and of the lifecycle events)
are restored whole. A value's held text goes out, as a delta event of its own, before the
event that ends the value (its `.done`, its part's or item's `.done`, the final event, an
error, the end of the stream); that event carries the `sequence_number` of the event before
it (the Responses API numbers its events; a client reads the number, none we know checks
that it grows by one)."""

from __future__ import annotations

from typing import Any, AsyncIterator

import orjson

from llmproxy.sse import Event, SSEParser
from .masking import TextRestorer, Vault, may_hold_lt, restore_item, restore_output

__all__ = ["RestoredStream"]

_BOM = b"\xef\xbb\xbf"

_ENVELOPE = ("id", "object", "created", "model", "system_fingerprint")
_ANTHROPIC_FLUSH_ALL = frozenset({"message_delta", "message_stop", "error"})
# Responses: a delta event -> (what its value is, JSON text?); a `.done` event -> (the delta
# event of its value, the field holding the whole text, JSON text?)
_RESPONSES_DELTAS = {"response.output_text.delta": False, "response.refusal.delta": False,
                     "response.function_call_arguments.delta": True, "response.custom_tool_call_input.delta": False}
_RESPONSES_DONE = {"response.output_text.done": ("response.output_text.delta", "text", False),
                   "response.refusal.done": ("response.refusal.delta", "refusal", False),
                   "response.function_call_arguments.done": ("response.function_call_arguments.delta", "arguments",
                                                             True),
                   "response.custom_tool_call_input.done": ("response.custom_tool_call_input.delta", "input", False)}
_RESPONSES_WHOLE = frozenset({"response.created", "response.in_progress", "response.queued"})
_RESPONSES_END = frozenset({"response.completed", "response.incomplete", "response.failed", "error"})
_IN_PART = frozenset({"response.output_text.delta", "response.refusal.delta"})  # keyed by content_index too


class RestoredStream:
    """An SSE body (OpenAI chat or completions, Anthropic messages, OpenAI Responses) with
    the originals restored as it streams; `llmproxy.middlewares.pii.masking` has the
    hold-back rule."""

    __slots__ = ("body", "vault", "api", "parser", "slots", "held", "envelope", "items", "done")

    def __init__(self, body: AsyncIterator[bytes], vault: Vault, api: str) -> None:
        self.body = body
        self.vault = vault
        self.api = api  # chat | completions | messages | responses
        self.parser = SSEParser()
        self.slots: dict[tuple, tuple[TextRestorer, str]] = {}  # key -> (restorer, kind)
        self.held: set[tuple] = set()  # keys of slots holding text back
        self.envelope: dict[str, Any] = {}  # OpenAI: the last chunk's id, model...; Responses: its sequence_number
        self.items: dict[tuple, Any] = {}  # Responses: a held value's key -> its item_id
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
        if not self.held and not parser.pending and chunk[-2:] == b"\n\n" and not may_hold_lt(chunk):
            return chunk  # whole events, nothing held, no `<` anywhere: as they came
        return b"".join([self.event(ev) for ev in parser.feed(chunk)])

    def finish(self) -> bytes:
        """Bytes to send once the upstream body has ended: what is left, what is held."""
        out = [self.event(ev) for ev in self.parser.close()]
        out.append(self._flush_all())
        return b"".join(out)

    def event(self, ev: Event) -> bytes:
        data = ev.data
        if not self.held and not may_hold_lt(data):
            return ev.raw
        if self.api == "messages":
            return self._anthropic(ev)
        if self.api == "responses":
            return self._responses(ev)
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
            elif self.api == "responses":
                out.append(self._responses_delta(key, kind, text))
            else:
                out.append(self._openai_delta(key, kind, text))
        return b"".join(out)

    # OpenAI --------------------------------------------------------------------------------

    def _openai(self, ev: Event) -> bytes:
        obj = _json_object(ev.data)
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
        if self.api == "completions":
            return self._restore_field(choice, "text", (i, "text"), ends)
        delta = choice.get("delta")
        if not isinstance(delta, dict):
            if not ends or not any(k[0] == i for k in self.held):
                return False
            delta = choice["delta"] = {}
        changed = self._restore_field(delta, "content", (i, "content"), ends)
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

    def _restore_field(self, container: dict, field: str, key: tuple, ends: bool) -> bool:
        """Restore `container[field]`, one text value tracked under `key` (its kind is
        key[1]); when the value ends here, what was held goes out with it. Whether the
        container changed."""
        text = container.get(field)
        if isinstance(text, str):
            new = self._feed(key, text, key[1])
            if ends:
                new += self._flush(key)
            if new == text:
                return False
            container[field] = new
            return True
        if ends and key in self.held:
            container[field] = self._flush(key)
            return True
        return False

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
        obj = _json_object(ev.data)
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


    # OpenAI Responses ------------------------------------------------------------------------

    def _responses(self, ev: Event) -> bytes:
        obj = _json_object(ev.data)
        kind = obj.get("type") if isinstance(obj, dict) else None
        if kind is None:
            return self._flush_all() + ev.raw if ev.event in _RESPONSES_END else ev.raw
        json = _RESPONSES_DELTAS.get(kind)
        if json is not None:
            out = self._responses_piece(ev, obj, kind, json)
        else:
            out = self._responses_whole(ev, obj, kind)
        if "sequence_number" in obj:
            self.envelope["sequence_number"] = obj["sequence_number"]
        return out

    def _responses_piece(self, ev: Event, obj: dict, kind: str, json: bool) -> bytes:
        text = obj.get("delta")
        if not isinstance(text, str):
            return ev.raw
        key = _responses_key(obj, kind)
        new = self._feed(key, text, kind, json)
        if key in self.held and key not in self.items:
            self.items[key] = obj.get("item_id")
        if new == text:
            return ev.raw
        obj["delta"] = new
        return _serialize(ev, obj)

    def _responses_whole(self, ev: Event, obj: dict, kind: str) -> bytes:
        """An event that ends values (what they hold goes out first) or repeats whole texts."""
        vault = self.vault
        changed = False
        held = b""
        done = _RESPONSES_DONE.get(kind)
        if done is not None:
            key = _responses_key(obj, done[0])
            held = self._responses_flush(key)
            text = obj.get(done[1])
            if isinstance(text, str):
                new = vault.restore(text, done[2])
                changed = new != text
                obj[done[1]] = new
        elif kind in ("response.content_part.done", "response.content_part.added"):
            held = self._responses_flush((obj.get("output_index", 0), obj.get("content_index", 0)))
            part = obj.get("part")
            if isinstance(part, dict):
                changed = restore_item({"type": "message", "content": [part]}, vault)
        elif kind in ("response.output_item.done", "response.output_item.added"):
            index = obj.get("output_index", 0)
            if self.held:
                held = b"".join([self._responses_flush(k) for k in sorted(self.held, key=repr) if k[0] == index])
            item = obj.get("item")
            if isinstance(item, dict):
                changed = restore_item(item, vault)
        elif kind in _RESPONSES_END or kind in _RESPONSES_WHOLE:
            if kind in _RESPONSES_END:
                held = self._flush_all()
            response = obj.get("response")
            if isinstance(response, dict):
                changed = restore_output(response, vault)
        return held + (_serialize(ev, obj) if changed else ev.raw)

    def _responses_flush(self, key: tuple) -> bytes:
        if key not in self.held:
            return b""
        return self._responses_delta(key, self.slots[key][1], self._flush(key))

    def _responses_delta(self, key: tuple, kind: str, text: str) -> bytes:
        """A delta event of its own for the text a value held back."""
        data: dict[str, Any] = {"type": kind, "sequence_number": self.envelope.get("sequence_number"),
                                "item_id": self.items.pop(key, None), "output_index": key[0]}
        if kind in _IN_PART:
            data["content_index"] = key[1]
        data["delta"] = text
        if kind == "response.output_text.delta":
            data["logprobs"] = []
        return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


def _responses_key(obj: dict, kind: str) -> tuple:
    """A Responses value: a content part's text (output_index, content_index), or an output
    item's arguments or input (output_index, the delta event's name)."""
    if kind in _IN_PART:
        return (obj.get("output_index", 0), obj.get("content_index", 0))
    return (obj.get("output_index", 0), kind)


def _json_object(data: bytes) -> Any:
    """An event's data parsed when it is a JSON object, else None ([DONE], a broken one)."""
    if data[:1] != b"{":
        return None
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return None


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
