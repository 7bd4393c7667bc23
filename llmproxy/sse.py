"""Incremental Server-Sent Events parser that keeps every byte.

Feed it upstream chunks as they arrive; it returns complete events, each with its
parsed ``event``/``data`` fields and the exact ``raw`` bytes it was made of. Joining
the ``raw`` of every event returned by :meth:`SSEParser.feed` and
:meth:`SSEParser.close` gives back the input byte for byte, so a caller can forward
events unchanged or drop one without re-serializing anything.

Parsing follows the WHATWG SSE rules: lines end with ``\\n``, ``\\r\\n`` or ``\\r``; a
blank line ends an event; ``field: value`` loses one space after the colon; ``data``
lines are joined with ``\\n``; a line without a colon is a field with an empty value;
comments (``:``), ``id`` and ``retry`` are kept in ``raw`` and otherwise ignored; a
leading UTF-8 BOM is ignored. Unlike a browser, the parser also returns events
that carry neither ``data`` nor ``event`` (only comments, or a lone blank line) with
``data=b""``, so their bytes can still be forwarded.

A ``\\r`` that ends a chunk may be the first half of ``\\r\\n``. When such a ``\\r``
is the blank line closing an event, that event is held until the next byte (or
:meth:`SSEParser.close`) says which, so the result never depends on how the stream
was split. Servers that use ``\\n`` or ``\\r\\n`` are never delayed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["Event", "SSEParser"]

# A line terminator followed by another one: the end of a blank line. The first
# terminator's lone "\r" must not be the start of a "\r\n" pair.
_BLANK_LINE = re.compile(rb"(?:\r\n|\n|\r(?!\n))(?:\r\n|\n|\r)")
_BOM = b"\xef\xbb\xbf"


@dataclass(slots=True)
class Event:
    """One SSE event; ``raw`` includes its terminating blank line."""

    event: str | None  # value of the last ``event:`` field, None if absent
    data: bytes  # ``data:`` values joined with b"\n"; b"" if none
    raw: bytes  # the exact bytes received for this event


def _parse(raw: bytes, body: bytes) -> Event:
    """Build an Event from ``body``: ``raw`` with LF line ends only, and no BOM."""
    end = body.find(10)
    if end == len(body) - 2 and body[-1] == 10 and body[:5] == b"data:":
        # The usual event: one data line and the blank line.
        return Event(None, body[6:end] if body[5:6] == b" " else body[5:end], raw)
    if body[:6] == b"event:" and body[end + 1 : end + 6] == b"data:":
        # "event: x" then one data line (Anthropic's shape).
        second = body.find(10, end + 1)
        if second == len(body) - 2 and body[-1] == 10:
            name = body[7:end] if body[6:7] == b" " else body[6:end]
            start = end + 7 if body[end + 6 : end + 7] == b" " else end + 6
            return Event(name.decode("utf-8", "replace"), body[start:second], raw)
    event: str | None = None
    data: list[bytes] = []
    for line in body.split(b"\n"):
        if line[:5] == b"data:":
            data.append(line[6:] if line[5:6] == b" " else line[5:])
            continue
        if not line or line[:1] == b":":
            continue
        colon = line.find(b":")
        if colon < 0:
            name, value = line, b""
        else:
            name, value = line[:colon], line[colon + 1 :]
            if value[:1] == b" ":
                value = value[1:]
        if name == b"data":
            data.append(value)
        elif name == b"event":
            event = value.decode("utf-8", "replace")
    if not data:
        return Event(event, b"", raw)
    return Event(event, data[0] if len(data) == 1 else b"\n".join(data), raw)


def _parse_any(raw: bytes, strip_bom: bool = False) -> Event:
    """Build an Event from ``raw`` with any line ends, after a BOM if ``strip_bom``."""
    body = raw.replace(b"\r\n", b"\n").replace(b"\r", b"\n") if 13 in raw else raw
    if strip_bom and body[:3] == _BOM:
        body = body[3:]
    return _parse(raw, body)


class SSEParser:
    """Turns a byte stream, split anywhere, into complete :class:`Event` objects."""

    __slots__ = ("_buf", "_held", "_scan", "_bom_checked")

    def __init__(self) -> None:
        self._buf = b""  # start of the unfinished event
        self._held: list[bytes] = []  # later chunks without any line terminator
        self._scan = 0  # offset in _buf before which no blank line can start
        self._bom_checked = False

    @property
    def pending(self) -> bytes:
        """Bytes received that do not yet form a complete event."""
        if self._held:
            self._buf = b"".join((self._buf, *self._held))
            self._held.clear()
        return self._buf

    def feed(self, chunk: bytes) -> list[Event]:
        """Add ``chunk``; return the events it completed, in order."""
        if not chunk:
            return []
        buf = self._buf
        if not buf:
            return self._split(chunk, 0, final=False)
        if 10 not in chunk and 13 not in chunk and buf[-1] != 13:
            # Cannot end an event: avoid re-copying a long event on every chunk.
            self._held.append(chunk)
            return []
        if self._held:
            buf = b"".join((buf, *self._held, chunk))
            self._held.clear()
        else:
            buf += chunk
        return self._split(buf, self._scan, final=False)

    def close(self) -> list[Event]:
        """End of stream: return what is left, including an unterminated last event.

        Any leftover bytes become an event (``data=b""`` if they hold no field), so
        no input is ever lost.
        """
        buf = self.pending
        if not buf:
            return []
        events = self._split(buf, self._scan, final=True)
        if self._buf:
            events.append(_parse_any(self._buf, strip_bom=not self._bom_checked))
            self._bom_checked = True
        self._buf = b""
        self._scan = 0
        return events

    def _split(self, buf: bytes, scan: int, final: bool) -> list[Event]:
        """Cut every complete event off the front of ``buf``; keep the rest."""
        events: list[Event] = []
        append = events.append
        pos = 0
        size = len(buf)
        if 13 not in buf:
            # Fast path: "\n" line endings only.
            while pos < size:
                if buf[pos] == 10:  # blank line right at an event start
                    end = pos + 1
                else:
                    # Next "\n\n". (Int arguments take CPython's memchr path, several
                    # times faster than searching for a bytes pattern.)
                    end = buf.find(10, scan if scan > pos else pos)
                    while end >= 0:
                        end += 1
                        if end < size and buf[end] == 10:
                            break
                        end = buf.find(10, end)
                    if end < 0:
                        break
                    end += 1
                raw = buf[pos:end]
                append(_parse(raw, raw))
                pos = end
        else:
            while pos < size:
                first = buf[pos]
                if first == 10:
                    end = pos + 1
                elif first == 13:
                    if pos + 1 < size:
                        end = pos + 2 if buf[pos + 1] == 10 else pos + 1
                    elif final:
                        end = size
                    else:
                        break  # "\r" ends the buffer: wait to see whether "\n" follows
                else:
                    m = _BLANK_LINE.search(buf, scan if scan > pos else pos)
                    if m is None:
                        break
                    end = m.end()
                    if end == size and buf[end - 1] == 13 and not final:
                        break  # as above
                append(_parse_any(buf[pos:end]))
                pos = end
        if events and not self._bom_checked:
            self._bom_checked = True
            if events[0].raw[:3] == _BOM:
                events[0] = _parse_any(events[0].raw, strip_bom=True)
        rest = buf[pos:] if pos else buf
        self._buf = rest
        # A blank line ("\r\n\r\n" at most) not found yet must end in bytes still to
        # come, or be held back for its final "\r": it starts in the last 3 bytes.
        self._scan = len(rest) - 3 if len(rest) > 3 else 0
        return events
