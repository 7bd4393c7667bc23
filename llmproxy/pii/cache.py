"""Spans of texts seen recently, so that a conversation's history is not analysed again on
every turn (a chat client sends the whole history with each request).

Keyed by the recognizers' entity set and a 128-bit BLAKE2b digest of the text: the table
holds no text, only offsets and entity names. Texts shorter than `min_chars` are analysed
every time (cheap, and they would crowd out the long ones). When full, the oldest entry
goes (first in, first out). The spans are stored as tuples, shared by the requests that
hit them, and never changed.
"""

from __future__ import annotations

from hashlib import blake2b
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .recognizers import Recognizers, Span

__all__ = ["SpanCache"]


class SpanCache:
    __slots__ = ("size", "min_chars", "table", "hits", "misses")

    def __init__(self, size: int, min_chars: int = 256) -> None:
        self.size = size
        self.min_chars = min_chars
        self.table: dict[tuple[str, bytes], tuple[Span, ...]] = {}
        self.hits = 0
        self.misses = 0

    def analyze(self, texts: list[str], recognizers: Recognizers) -> list[tuple[Span, ...] | list[Span]]:
        """`recognizers.analyze` of each text, from the table when it has been seen."""
        table = self.table
        scope = recognizers.key
        out: list[tuple[Span, ...] | list[Span]] = []
        for text in texts:
            if len(text) < self.min_chars:
                out.append(recognizers.analyze(text))
                continue
            key = (scope, blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest())
            spans = table.get(key)
            if spans is None:
                self.misses += 1
                spans = tuple(recognizers.analyze(text))
                if len(table) >= self.size:
                    del table[next(iter(table))]
                table[key] = spans
            else:
                self.hits += 1
            out.append(spans)
        return out
