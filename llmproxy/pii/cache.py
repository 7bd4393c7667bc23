"""Spans of texts seen recently, so that a conversation's history is not analysed again on
every turn (a chat client sends the whole history with each request).

Keyed by the recognizers' entity set and a 128-bit BLAKE2b digest of the text: the table
holds no text, only offsets, entity names and scores. Texts shorter than `min_chars` are
analysed every time (cheap, and they would crowd out the long ones). When full, the
oldest entry goes (first in, first out).

Keys and entries are plain bytes (spans packed with `struct`), not tuples of objects: an
entry lives for many requests, and objects the garbage collector tracks would make every
collection walk thousands of them; bytes hold no references and are never walked.
"""

from __future__ import annotations

import struct
from collections import deque
from hashlib import blake2b
from typing import TYPE_CHECKING

from .recognizers import ENTITIES, Span

if TYPE_CHECKING:
    from .recognizers import Recognizers

__all__ = ["SpanCache"]

_NAMES = tuple(sorted(ENTITIES))  # the built-in entities: a span's entity is stored as its index
_INDEX = {name: i for i, name in enumerate(_NAMES)}
_SPAN = struct.Struct("<IIBd")  # start, end, entity index, score


class SpanCache:
    __slots__ = ("size", "min_chars", "table", "order", "scopes", "hits", "misses")

    def __init__(self, size: int, min_chars: int = 256) -> None:
        self.size = size
        self.min_chars = min_chars
        self.table: dict[bytes, bytes] = {}  # scope + digest -> packed spans
        # Insertion order, to evict the oldest in O(1) (the first key of a dict that keys
        # are deleted from is found by skipping the deleted slots: O(n) per eviction).
        self.order: deque[bytes] = deque()
        self.scopes: dict[str, bytes] = {}  # entity set -> a short prefix of its keys
        self.hits = 0
        self.misses = 0

    def analyze(self, texts: list[str], recognizers: Recognizers) -> list[list[Span]]:
        """`recognizers.analyze` of each text, from the table when it has been seen."""
        table = self.table
        scope = self.scopes.get(recognizers.key)
        if scope is None:
            scope = self.scopes[recognizers.key] = len(self.scopes).to_bytes(4, "little")
        out: list[list[Span]] = []
        for text in texts:
            if len(text) < self.min_chars:
                out.append(recognizers.analyze(text))
                continue
            key = scope + blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()
            packed = table.get(key)
            if packed is None:
                self.misses += 1
                spans = recognizers.analyze(text)
                if len(table) >= self.size:
                    del table[self.order.popleft()]
                table[key] = b"".join([_SPAN.pack(s.start, s.end, _INDEX[s.entity], s.score) for s in spans])
                self.order.append(key)
            else:
                self.hits += 1
                spans = [Span(start, end, _NAMES[k], score) for start, end, k, score in _SPAN.iter_unpack(packed)]
            out.append(spans)
        return out
