"""Token usage of an answer: read from the provider when it says, else estimated.

Non-streamed answers: :func:`openai_usage` and :func:`anthropic_usage` read the
``usage`` object of the decoded body.

Streamed answers: a meter sees every :class:`~llmproxy.sse.Event` as it passes. On
the hot path it works on bytes: it decodes JSON only for the few events that carry
usage, and otherwise keeps the event's ``data`` bytes (a list append). Only if the
stream ends without usage does :meth:`result` decode those bytes, gather the
generated text and count it with :mod:`llmproxy.tokenizer` (``estimated=True``).

Anthropic note: its ``input_tokens`` excludes cache reads and cache writes. Here
``prompt_tokens`` is always the whole prompt, so for Anthropic it is
``input_tokens + cache_read_input_tokens + cache_creation_input_tokens``. Cost code
prices ``prompt_tokens - cached_tokens - cache_creation_tokens`` at the input price
and the other two at their cache prices, for either provider.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import orjson

from llmproxy.sse import Event
from llmproxy.tokenizer import count_tokens

__all__ = [
    "AnthropicStreamMeter",
    "OpenAIStreamMeter",
    "ResponsesStreamMeter",
    "Usage",
    "anthropic_usage",
    "openai_usage",
    "prompt_text",
    "responses_usage",
]


@dataclass(slots=True)
class Usage:
    """Tokens of one request. ``prompt_tokens`` includes cached and cache-write tokens."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    # OpenAI prompt_tokens_details.cached_tokens; Anthropic cache_read_input_tokens
    cached_tokens: int = 0
    cache_creation_tokens: int = 0  # Anthropic cache_creation_input_tokens
    reasoning_tokens: int = 0  # OpenAI completion_tokens_details.reasoning_tokens
    estimated: bool = False

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


MAX_TOKENS = 10**12  # per count: far above any real answer, well inside a 64-bit column


def _int(value: Any) -> int:
    """A token count from JSON: ints only (not bools), clamped to 0..MAX_TOKENS, else 0."""
    if type(value) is int:
        return value if 0 < value <= MAX_TOKENS else (MAX_TOKENS if value > 0 else 0)
    if type(value) is float and value > 0:
        return int(value) if value <= MAX_TOKENS else MAX_TOKENS
    return 0


def _dict(value: Any) -> dict:
    return value if isinstance(value, dict) else {}


def _from_openai(usage: dict) -> Usage:
    prompt = _int(usage.get("prompt_tokens"))
    completion = _int(usage.get("completion_tokens"))
    if not completion and "completion_tokens" not in usage:
        # Embeddings give only prompt_tokens and total_tokens.
        completion = max(_int(usage.get("total_tokens")) - prompt, 0)
    return Usage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        cached_tokens=_int(_dict(usage.get("prompt_tokens_details")).get("cached_tokens")),
        reasoning_tokens=_int(
            _dict(usage.get("completion_tokens_details")).get("reasoning_tokens")
        ),
    )


def openai_usage(body: dict) -> Usage | None:
    """Usage of a non-streamed OpenAI answer (chat, completions, embeddings)."""
    usage = body.get("usage") if isinstance(body, dict) else None
    return _from_openai(usage) if isinstance(usage, dict) else None


def anthropic_usage(body: dict) -> Usage | None:
    """Usage of a non-streamed Anthropic Messages answer; prompt includes cache tokens."""
    usage = body.get("usage") if isinstance(body, dict) else None
    if not isinstance(usage, dict):
        return None
    read = _int(usage.get("cache_read_input_tokens"))
    write = _int(usage.get("cache_creation_input_tokens"))
    return Usage(
        prompt_tokens=_int(usage.get("input_tokens")) + read + write,
        completion_tokens=_int(usage.get("output_tokens")),
        cached_tokens=read,
        cache_creation_tokens=write,
    )


def _from_responses(usage: dict) -> Usage:
    """The Responses API's usage: `input_tokens` (cached ones included, as for chat),
    `output_tokens` (reasoning included), and their details."""
    return Usage(
        prompt_tokens=_int(usage.get("input_tokens")),
        completion_tokens=_int(usage.get("output_tokens")),
        cached_tokens=_int(_dict(usage.get("input_tokens_details")).get("cached_tokens")),
        reasoning_tokens=_int(_dict(usage.get("output_tokens_details")).get("reasoning_tokens")),
    )


def responses_usage(body: dict) -> Usage | None:
    """Usage of a non-streamed Responses API answer (`POST /v1/responses`)."""
    usage = body.get("usage")
    return _from_responses(usage) if isinstance(usage, dict) else None


def _loads(data: bytes) -> dict | None:
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    return obj if isinstance(obj, dict) else None


def _count_pieces(pieces: dict[Any, list[str]]) -> int:
    """Count each run of text as one string, as the model produced it."""
    return sum(count_tokens("".join(parts)) for parts in pieces.values())


# What follows `"usage"` when it is a key (a string value is never followed by a
# colon); group 1 is "{" when the value is an object, empty for `"usage": null`.
_AFTER_KEY = re.compile(rb"[ \t\r\n]*:[ \t\r\n]*(\{?)")


_USAGE_ANYWHERE = re.compile(rb'"usage"[ \t\r\n]*:[ \t\r\n]*\{')


class _Chunk(bytes):
    """Raw bytes of whole events kept unparsed by a meter's `skip`."""


def _datas(kept: list[bytes]) -> Iterator[bytes]:
    """Event data in arrival order from what a meter kept: event data as is, skipped
    chunks parsed now (only when an estimate is needed)."""
    from .sse import SSEParser

    for item in kept:
        if isinstance(item, _Chunk):
            parser = SSEParser()
            for ev in parser.feed(bytes(item)) + parser.close():
                if ev.data:
                    yield ev.data
        else:
            yield item


KEEP_BYTES = 64 * 1024  # event data a meter keeps unparsed, before it is folded into text
TEXT_CHARS = 64 * 1024  # generated text kept before it is counted in tokens


class _Kept:
    """What a meter keeps for an estimate (in case no usage comes), bounded whatever the
    stream's length: event data as it came (nothing parsed: usage usually does come) up
    to KEEP_BYTES; past that it is folded, `collect` taking each event's generated text
    into `pieces`; past TEXT_CHARS of text, the pieces are counted in tokens and
    dropped. So a 50 MB stream holds at most about 128 KB here, and the tokenizer runs in
    steps of TEXT_CHARS as the stream goes, never on the whole answer at its end."""

    __slots__ = ("raw", "raw_bytes", "pieces", "chars", "tokens", "collect")

    def __init__(self, collect: Callable[[bytes, dict[Any, list[str]]], int]) -> None:
        self.collect = collect  # (event data, pieces) -> characters of text added
        self.raw: list[bytes] = []
        self.raw_bytes = 0
        self.pieces: dict[Any, list[str]] = {}
        self.chars = 0
        self.tokens = 0

    def add(self, item: bytes) -> None:
        self.raw.append(item)
        self.raw_bytes += len(item)
        if self.raw_bytes > KEEP_BYTES:
            self._fold()

    def clear(self) -> None:
        self.raw.clear()
        self.pieces.clear()
        self.raw_bytes = self.chars = self.tokens = 0

    def _fold(self) -> None:
        for data in _datas(self.raw):
            self.chars += self.collect(data, self.pieces)
        self.raw.clear()
        self.raw_bytes = 0
        if self.chars > TEXT_CHARS:
            self.tokens += _count_pieces(self.pieces)
            self.pieces.clear()
            self.chars = 0

    def count(self) -> int:
        """Tokens of all the generated text kept so far."""
        self._fold()
        return self.tokens + _count_pieces(self.pieces)


def _has_usage_object(data: bytes) -> bool:
    """Whether the chunk's ``usage`` key holds an object, judged on bytes.

    Searches from the end, where OpenAI-style servers put ``usage``. A ``"usage"``
    inside text content is escaped (``\\"usage\\"``) or not followed by a colon,
    and is skipped.
    """
    i = data.rfind(b'"usage"')
    while i >= 0:
        m = _AFTER_KEY.match(data, i + 7)
        if m is not None:
            return bool(m.group(1))
        i = data.rfind(b'"usage"', 0, i)
    return False


class OpenAIStreamMeter:
    """Reads usage from an OpenAI chat/completions stream; may hide the usage-only chunk."""

    __slots__ = ("_drop", "_usage", "_kept", "_events")

    # The forwarder's fast path: a chunk of whole events that `wants` declines goes out as
    # is and is only remembered (`skip`), unparsed, in case it must be counted at the end.

    def __init__(self, drop_usage_chunk: bool) -> None:
        self._drop = bool(drop_usage_chunk)
        self._usage: Usage | None = None
        self._kept = _Kept(_openai_text)  # for an estimate, if no usage comes
        self._events = 0

    @property
    def events_seen(self) -> int:
        return self._events

    @property
    def drop_usage_chunk(self) -> bool:
        """Whether this meter removes the usage-only chunk."""
        return self._drop

    @property
    def usage(self) -> Usage | None:
        """The usage the server sent, if any so far."""
        return self._usage

    def wants(self, chunk: bytes) -> bool:
        """Whether a chunk of whole events may hold a usage object (then it must be fed
        event by event); a cheap bytes check with false positives only."""
        return _USAGE_ANYWHERE.search(chunk) is not None

    def skip(self, chunk: bytes) -> None:
        """Remember a chunk of whole events that `wants` declined."""
        if self._usage is None:
            self._kept.add(_Chunk(chunk))

    def feed(self, ev: Event) -> bool:
        """Look at one event; True means remove it before the client sees it.

        Only the usage-only chunk (``choices`` empty or absent, ``usage`` an object) is
        removed, and only when the meter was made with ``drop_usage_chunk=True``.
        """
        self._events += 1
        data = ev.data
        if not _has_usage_object(data):
            if self._usage is None and data[:1] == b"{":
                self._kept.add(data)
            return False
        obj = _loads(data)
        if obj is None:
            return False
        usage = obj.get("usage")
        if not isinstance(usage, dict):
            if self._usage is None:
                self._kept.add(data)
            return False
        self._usage = _from_openai(usage)
        self._kept.clear()
        return self._drop and not obj.get("choices")

    def result(self, prompt_text: "str | Callable[[], str]") -> Usage:
        """The server's usage, else an estimate from the streamed text and ``prompt_text``
        (or what it returns: it is called only when the server sent no usage)."""
        if self._usage is not None:
            return self._usage
        return Usage(
            prompt_tokens=count_tokens(_text(prompt_text)),
            completion_tokens=self._kept.count(),
            estimated=True,
        )


def _openai_text(data: bytes, pieces: dict[Any, list[str]]) -> int:
    """Add the generated text of one streamed chunk's choices to ``pieces``; its length."""
    obj = _loads(data)
    choices = obj.get("choices") if obj is not None else None
    if not isinstance(choices, list):
        return 0
    return sum(_collect_choice(choice, pieces) for choice in choices if isinstance(choice, dict))


def _collect_choice(choice: dict, pieces: dict[Any, list[str]]) -> int:
    """Add the generated text of one streamed choice to ``pieces``; its length."""
    added = 0
    index = choice.get("index")
    text = choice.get("text")  # legacy completions
    if isinstance(text, str):
        pieces.setdefault((index, "text"), []).append(text)
        added += len(text)
    delta = choice.get("delta")
    if not isinstance(delta, dict):
        return added
    for key in ("content", "reasoning_content", "reasoning"):
        value = delta.get(key)
        if isinstance(value, str):
            pieces.setdefault((index, key), []).append(value)
            added += len(value)
    calls = delta.get("tool_calls")
    if isinstance(calls, list):
        for call in calls:
            if not isinstance(call, dict):
                continue
            function = _dict(call.get("function"))
            for key in ("name", "arguments"):
                value = function.get(key)
                if isinstance(value, str):
                    pieces.setdefault((index, call.get("index"), key), []).append(value)
                    added += len(value)
    return added


class ResponsesStreamMeter:
    """Reads usage from a Responses API stream: the `response` object of its last event
    (`response.completed`, or `response.incomplete` / `response.failed`, which carry the
    usage too); never removes an event. Without one, the `response.output_text.delta`
    and argument deltas are counted."""

    __slots__ = ("_usage", "_kept", "_events")

    def __init__(self) -> None:
        self._usage: Usage | None = None
        self._kept = _Kept(_responses_text)
        self._events = 0

    @property
    def events_seen(self) -> int:
        return self._events

    @property
    def usage(self) -> Usage | None:
        return self._usage

    def wants(self, chunk: bytes) -> bool:
        return _USAGE_ANYWHERE.search(chunk) is not None

    def skip(self, chunk: bytes) -> None:
        if self._usage is None:
            self._kept.add(_Chunk(chunk))

    def feed(self, ev: Event) -> bool:
        self._events += 1
        data = ev.data
        if _has_usage_object(data):
            obj = _loads(data)
            response = _dict(obj.get("response")) if obj is not None else {}
            usage = response.get("usage")
            if isinstance(usage, dict):
                self._usage = _from_responses(usage)
                self._kept.clear()
                return False
        if self._usage is None and data[:1] == b"{":
            self._kept.add(data)
        return False

    def result(self, prompt_text: "str | Callable[[], str]") -> Usage:
        if self._usage is not None:
            return self._usage
        return Usage(prompt_tokens=count_tokens(_text(prompt_text)), completion_tokens=self._kept.count(),
                     estimated=True)


_RESPONSES_DELTAS = {"response.output_text.delta", "response.function_call_arguments.delta",
                     "response.reasoning_text.delta", "response.reasoning_summary_text.delta",
                     "response.refusal.delta"}


def _responses_text(data: bytes, pieces: dict[Any, list[str]]) -> int:
    obj = _loads(data)
    if obj is None or obj.get("type") not in _RESPONSES_DELTAS:
        return 0
    delta = obj.get("delta")
    if not isinstance(delta, str):
        return 0
    pieces.setdefault((obj.get("output_index"), obj.get("content_index"), obj.get("type")), []).append(delta)
    return len(delta)


# content_block_delta: delta type -> the field holding generated text
_ANTHROPIC_DELTA_KEYS = {
    "text_delta": "text",
    "input_json_delta": "partial_json",
    "thinking_delta": "thinking",
}


class AnthropicStreamMeter:
    """Reads usage from an Anthropic Messages stream; never removes an event."""

    __slots__ = (
        "_events",
        "_started",
        "_input",
        "_cache_read",
        "_cache_write",
        "_output",
        "_has_start",
        "_has_output",
        "_deltas",
        "_first_error",
    )

    def __init__(self) -> None:
        self._events = 0
        self._started = False  # saw an event with a type or data
        self._input = self._cache_read = self._cache_write = self._output = 0
        self._has_start = False
        self._has_output = False
        self._deltas = _Kept(_anthropic_text)  # content_block_delta data, for an estimate
        self._first_error: dict | None = None

    @property
    def events_seen(self) -> int:
        return self._events

    def wants(self, chunk: bytes) -> bool:
        """Whether a chunk of whole events may hold usage (message_start, message_delta)."""
        return b"message_start" in chunk or b"message_delta" in chunk

    def skip(self, chunk: bytes) -> None:
        """Remember a chunk of whole events that `wants` declined (deltas, for estimation)."""
        if not self._has_output:
            self._deltas.add(_Chunk(chunk))

    @property
    def first_event_error(self) -> dict | None:
        """The ``error`` object when the stream's first event is an ``error`` event.

        Events with neither ``event`` nor ``data`` (comments, blank lines) do not
        count as the first event.
        """
        return self._first_error

    def feed(self, ev: Event) -> bool:
        """Look at one event; always returns False (nothing is removed)."""
        self._events += 1
        kind = ev.event
        data = ev.data
        obj: dict | None = None
        if kind is None:
            if not data:
                return False
            kind, obj = self._sniff(data)
        first = not self._started
        self._started = True
        if kind == "content_block_delta":
            if not self._has_output:
                self._deltas.add(data)
        elif kind == "message_start":
            obj = obj if obj is not None else _loads(data)
            if obj is not None:
                self._read_usage(_dict(_dict(obj.get("message")).get("usage")), start=True)
        elif kind == "message_delta":
            obj = obj if obj is not None else _loads(data)
            if obj is not None:
                self._read_usage(_dict(obj.get("usage")), start=False)
        elif kind == "error" and first:
            obj = obj if obj is not None else _loads(data)
            error = obj.get("error") if obj is not None else None
            if not isinstance(error, dict):
                error = {"type": "api_error", "message": data.decode("utf-8", "replace")}
            self._first_error = error
        return False

    @staticmethod
    def _sniff(data: bytes) -> tuple[str | None, dict | None]:
        """Event type from ``data`` when the ``event:`` line is missing (rare).

        Only events that may matter are decoded; deltas are recognised by bytes.
        """
        if b'"message_' in data or b'"error"' in data:
            obj = _loads(data)
            if obj is not None:
                kind = obj.get("type")
                return (kind if isinstance(kind, str) else None), obj
        elif b'"content_block_delta"' in data:
            return "content_block_delta", None
        return None, None

    def _read_usage(self, usage: dict, start: bool) -> None:
        """Take the fields present; message_delta's output_tokens is cumulative."""
        value = usage.get("input_tokens")
        if value is not None:
            self._input = _int(value)
            self._has_start = True
        elif start:
            self._has_start = True
        value = usage.get("cache_read_input_tokens")
        if value is not None:
            self._cache_read = _int(value)
        value = usage.get("cache_creation_input_tokens")
        if value is not None:
            self._cache_write = _int(value)
        value = usage.get("output_tokens")
        if value is not None:
            self._output = _int(value)
            if not start:
                self._has_output = True
                self._deltas.clear()

    def result(self, prompt_text: "str | Callable[[], str]") -> Usage:
        """Usage from the stream; output (and prompt, if no message_start) estimated if missing
        (``prompt_text`` is called only then, when it is a callable)."""
        usage = Usage(
            prompt_tokens=self._input + self._cache_read + self._cache_write,
            completion_tokens=self._output,
            cached_tokens=self._cache_read,
            cache_creation_tokens=self._cache_write,
        )
        if not self._has_output:
            usage.completion_tokens = self._deltas.count()
            usage.estimated = True
        if not self._has_start:
            usage.prompt_tokens = max(
                count_tokens(_text(prompt_text)), self._cache_read + self._cache_write
            )
            usage.estimated = True
        return usage


def _anthropic_text(data: bytes, pieces: dict[Any, list[str]]) -> int:
    """Add the generated text of one content_block_delta to ``pieces``; its length."""
    obj = _loads(data)
    if obj is None or obj.get("type") != "content_block_delta":
        return 0
    delta = _dict(obj.get("delta"))
    key = _ANTHROPIC_DELTA_KEYS.get(delta.get("type"))  # type: ignore[arg-type]
    value = delta.get(key) if key else None
    if not isinstance(value, str):
        return 0
    pieces.setdefault(obj.get("index"), []).append(value)
    return len(value)


def _json_text(value: Any) -> str:
    """JSON text of a structured value (tool inputs, schemas), for counting."""
    if isinstance(value, str):
        return value
    try:
        return orjson.dumps(value).decode()
    except (TypeError, orjson.JSONEncodeError):
        return str(value)


def _parts_text(content: Any, out: list[str]) -> None:
    """OpenAI message content: a string or a list of parts; text parts only."""
    if isinstance(content, str):
        out.append(content)
    elif isinstance(content, list):
        for part in content:
            if isinstance(part, dict) and part.get("type") == "text":
                text = part.get("text")
                if isinstance(text, str):
                    out.append(text)
            elif isinstance(part, str):
                out.append(part)


def _chat_text(body: dict, out: list[str]) -> None:
    messages = body.get("messages")
    for message in messages if isinstance(messages, list) else ():
        if not isinstance(message, dict):
            continue
        _parts_text(message.get("content"), out)
        name = message.get("name")
        if isinstance(name, str):
            out.append(name)
        calls = message.get("tool_calls")
        for call in calls if isinstance(calls, list) else ():
            function = _dict(_dict(call).get("function"))
            for key in ("name", "arguments"):
                value = function.get(key)
                if isinstance(value, str):
                    out.append(value)
    tools = body.get("tools")
    for tool in tools if isinstance(tools, list) else ():
        function = _dict(tool).get("function")
        if isinstance(function, dict):
            out.append(_json_text(function))


def _strings(value: Any, out: list[str]) -> None:
    """A str or a list of str (lists of token ids are ignored)."""
    if isinstance(value, str):
        out.append(value)
    elif isinstance(value, list):
        out.extend(item for item in value if isinstance(item, str))


def _anthropic_blocks(content: Any, out: list[str]) -> None:
    if isinstance(content, str):
        out.append(content)
        return
    if not isinstance(content, list):
        return
    for block in content:
        if not isinstance(block, dict):
            continue
        kind = block.get("type")
        if kind == "text":
            text = block.get("text")
            if isinstance(text, str):
                out.append(text)
        elif kind == "tool_use":
            name = block.get("name")
            if isinstance(name, str):
                out.append(name)
            if "input" in block:
                out.append(_json_text(block.get("input")))
        elif kind == "tool_result":
            _anthropic_blocks(block.get("content"), out)


def _messages_text(body: dict, out: list[str]) -> None:
    _anthropic_blocks(body.get("system"), out)
    messages = body.get("messages")
    for message in messages if isinstance(messages, list) else ():
        if isinstance(message, dict):
            _anthropic_blocks(message.get("content"), out)
    tools = body.get("tools")
    for tool in tools if isinstance(tools, list) else ():
        if isinstance(tool, dict):
            keys = ("name", "description", "input_schema")
            out.append(_json_text({k: tool[k] for k in keys if k in tool}))


def _text(text: "str | Callable[[], str]") -> str:
    return text if isinstance(text, str) else text()


def _responses_input(value: Any, out: list[str], depth: int = 0) -> None:
    """The Responses API's `input`: a string, or items (messages whose `content` is a string
    or parts with `text`, function calls and their outputs)."""
    if isinstance(value, str):
        out.append(value)
        return
    if not isinstance(value, list) or depth > 8:
        return
    for item in value:
        if isinstance(item, str):
            out.append(item)
            continue
        if not isinstance(item, dict):
            continue
        content = item.get("content")
        if isinstance(content, str):
            out.append(content)
        elif isinstance(content, list):
            for part in content:
                if isinstance(part, dict) and isinstance(part.get("text"), str):
                    out.append(part["text"])
        for key in ("arguments", "output", "name"):
            value_ = item.get(key)
            if isinstance(value_, str):
                out.append(value_)


def _responses_text_of(body: dict, out: list[str]) -> None:
    instructions = body.get("instructions")
    if isinstance(instructions, str):
        out.append(instructions)
    _responses_input(body.get("input"), out)
    tools = body.get("tools")
    for tool in tools if isinstance(tools, list) else ():
        if isinstance(tool, dict):
            out.append(_json_text(tool))


def prompt_text(body: dict, api: str) -> str:
    """The text of a request a tokenizer should count, for ``api`` in
    "chat", "completions", "embeddings", "messages" or "responses". Never raises; what
    is not text (images, token ids, unknown shapes) is skipped. Tool definitions are
    included as JSON.
    """
    if not isinstance(body, dict):
        return ""
    out: list[str] = []
    try:
        if api == "chat":
            _chat_text(body, out)
        elif api == "completions":
            _strings(body.get("prompt"), out)
        elif api == "embeddings":
            _strings(body.get("input"), out)
        elif api in ("messages", "count_tokens"):
            _messages_text(body, out)
        elif api in ("responses", "input_tokens"):
            _responses_text_of(body, out)
    except RecursionError:  # absurdly nested tool_result content
        pass
    return "\n".join(out)
