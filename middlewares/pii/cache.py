"""Spans of texts seen recently, so that a conversation's history is not analysed again on
every turn (a chat client sends the whole history with each request).

The last text of a request (its newest message) is not looked up or kept: it is new
almost every time, and hashing it would only add to its cost; it is kept once a later
request sends it again as history.

Keyed by the analyser's scope (the built-in recognizers' entity set, or a Presidio
analyzer's URL and options) and a 128-bit BLAKE2b digest of the text: the table holds no
text, only offsets, entity names and scores. Texts shorter than `min_chars` are analysed
every time (cheap, and they would crowd out the long ones). When full, the oldest entry
goes (first in, first out).

Keys and entries are plain bytes (spans packed with `struct`), not tuples of objects: an
entry lives for many requests, and objects the garbage collector tracks would make every
collection walk thousands of them; bytes hold no references and are never walked.
"""

from __future__ import annotations

import struct
from collections import deque
from hashlib import blake2b
from typing import TYPE_CHECKING, Sequence

from .recognizers import Span

if TYPE_CHECKING:
    from .recognizers import Recognizers

__all__ = ["SpanCache"]

_SPAN = struct.Struct("<IIHd")  # start, end, entity (index into `names`), score


class SpanCache:
    __slots__ = ("size", "min_chars", "table", "order", "scopes", "names", "index", "hits", "misses")

    def __init__(self, size: int, min_chars: int = 256) -> None:
        self.size = size
        self.min_chars = min_chars
        self.table: dict[bytes, bytes] = {}  # scope + digest -> packed spans
        # Insertion order, to evict the oldest in O(1) (the first key of a dict that keys
        # are deleted from is found by skipping the deleted slots: O(n) per eviction).
        self.order: deque[bytes] = deque()
        self.scopes: dict[str, bytes] = {}  # scope -> a short prefix of its keys
        self.names: list[str] = []  # entity names met so far (a config holds a few)
        self.index: dict[str, int] = {}
        self.hits = 0
        self.misses = 0

    def keys(self, scope: str, texts: list[str]) -> list[bytes | None]:
        """The table key of each of a request's texts for `scope`; None for a text too
        short to keep and for the last one (the newest message)."""
        prefix = self.scopes.get(scope)
        if prefix is None:
            prefix = self.scopes[scope] = len(self.scopes).to_bytes(4, "little")
        last = len(texts) - 1
        return [prefix + blake2b(t.encode("utf-8", "surrogatepass"), digest_size=16).digest()
                if i < last and len(t) >= self.min_chars else None for i, t in enumerate(texts)]

    def take_counts(self) -> tuple[int, int]:
        """Hits and misses since the last call."""
        counts = (self.hits, self.misses)
        self.hits = self.misses = 0
        return counts

    def get(self, key: bytes) -> list[Span] | None:
        packed = self.table.get(key)
        if packed is None:
            self.misses += 1
            return None
        self.hits += 1
        names = self.names
        return [Span(start, end, names[k], score) for start, end, k, score in _SPAN.iter_unpack(packed)]

    def put(self, key: bytes, spans: Sequence[Span]) -> None:
        index = self.index
        for s in spans:
            if s.entity not in index:
                if len(self.names) > 0xFFFF:
                    return  # more distinct entity names than any config holds: not kept
                index[s.entity] = len(self.names)
                self.names.append(s.entity)
        table = self.table
        if key not in table:
            if len(table) >= self.size:
                del table[self.order.popleft()]
            self.order.append(key)
        table[key] = b"".join([_SPAN.pack(s.start, s.end, index[s.entity], s.score) for s in spans])

    def analyze(self, texts: list[str], recognizers: Recognizers) -> list[list[Span]]:
        """`recognizers.analyze` of each text, from the table when it has been seen."""
        if len(texts) == 1:  # a request's only text is its newest: neither looked up nor kept
            return [recognizers.analyze(texts[0])]
        out: list[list[Span]] = []
        for text, key in zip(texts, self.keys(recognizers.key, texts)):
            spans = self.get(key) if key is not None else None
            if spans is None:
                spans = recognizers.analyze(text)
                if key is not None:
                    self.put(key, spans)
            out.append(spans)
        return out
