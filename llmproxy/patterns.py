"""Model names and patterns: a configured model's `name`, or an entry of a key's, team's or
subscription's `models`, may end in `*` (`claude-*`, `gpt-4o*`, `*`), matching every name
that starts with what comes before it. An exact name wins over a pattern, and a longer
pattern over a shorter one.
"""

from __future__ import annotations

from typing import Generic, Iterable, Mapping, TypeVar

T = TypeVar("T")


def is_pattern(name: str) -> bool:
    return name.endswith("*")


def matches(pattern: str, name: str) -> bool:
    """Does `name` match `pattern` (an exact name or a trailing-`*` pattern)?"""
    return name.startswith(pattern[:-1]) if pattern.endswith("*") else name == pattern


class NameTable(Generic[T]):
    """Values by model name: exact names first, then the longest pattern that matches.
    A lookup is one dict probe plus one `startswith` per pattern (configs hold a handful)."""

    __slots__ = ("exact", "patterns")

    def __init__(self, items: Mapping[str, T]) -> None:
        self.exact = {n: v for n, v in items.items() if not is_pattern(n)}
        # longest first: the first match is the most specific
        self.patterns = sorted(((n[:-1], v) for n, v in items.items() if is_pattern(n)), key=lambda p: -len(p[0]))

    def get(self, name: str) -> T | None:
        found = self.exact.get(name)
        if found is not None or not self.patterns:
            return found
        for prefix, value in self.patterns:
            if name.startswith(prefix):
                return value
        return None


class ModelNames:
    """An allow-list of models (a key's, a team's, a subscription's): exact names and
    patterns. `everything()` is true for an empty list or one holding `*`."""

    __slots__ = ("exact", "prefixes")

    def __init__(self, names: Iterable[str]) -> None:
        names = list(names)
        self.exact = frozenset(n for n in names if not is_pattern(n))
        self.prefixes = tuple(sorted({n[:-1] for n in names if is_pattern(n)}))

    def everything(self) -> bool:
        return (not self.exact and not self.prefixes) or "" in self.prefixes

    def allows(self, name: str) -> bool:
        if name in self.exact:
            return True
        for prefix in self.prefixes:
            if name.startswith(prefix):
                return True
        return False

    def __eq__(self, other: object) -> bool:
        if isinstance(other, (set, frozenset)):  # comparing with a plain set of exact names
            return not self.prefixes and self.exact == other
        return isinstance(other, ModelNames) and (self.exact, self.prefixes) == (other.exact, other.prefixes)

    def __hash__(self) -> int:
        return hash((self.exact, self.prefixes))

    def __repr__(self) -> str:
        return f"ModelNames({sorted(self.exact) + [p + '*' for p in self.prefixes]})"


def allow_list(names: Iterable[str]) -> ModelNames | None:
    """A model list as an allow-list; None when it allows every model."""
    found = ModelNames(names)
    return None if found.everything() else found
