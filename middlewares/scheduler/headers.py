"""Rate-limit headers: the durations OpenAI writes (`6m0s`, `1.5s`, `20ms`), what a
provider's answer says about its limits, and the headers of our own 429s (SPEC §2).

Our `x-ratelimit-reset-*` values are written the way OpenAI writes them (Go durations:
`20ms`, `1s`, `1.5s`, `6m0s`, `1h0m0s`), so a client that parses OpenAI's parses ours.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from datetime import datetime
from email.utils import parsedate_to_datetime

_UNIT = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}
_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ms|us|µs|ns|h|m|s)")


def parse_duration(text: str) -> float | None:
    """Seconds in a Go-style duration (`6m0s`, `1.5s`, `20ms`) or a bare number of
    seconds; None when it is neither."""
    text = text.strip()
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        pass
    else:
        return value if math.isfinite(value) and value >= 0 else None
    pos, total = 0, 0.0
    for m in _PART.finditer(text):
        if m.start() != pos:
            return None
        total += float(m[1]) * _UNIT[m[2]]
        pos = m.end()
    return total if pos == len(text) else None


def format_duration(seconds: float) -> str:
    """A Go-style duration, at millisecond resolution: `0s`, `20ms`, `1.5s`, `6m0s`."""
    ms = max(0, math.ceil(seconds * 1000 - 1e-6))
    if ms == 0:
        return "0s"
    if ms < 1000:
        return f"{ms}ms"
    hours, rest = divmod(ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    secs = f"{rest // 1000}" if rest % 1000 == 0 else f"{rest / 1000:.3f}".rstrip("0")
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


def retry_after_seconds(value: float) -> str:
    """`Retry-After` in whole seconds, at least 1."""
    return str(max(1, math.ceil(value - 1e-9)))


# ------------------------------------------------------------------ provider feedback


@dataclass(frozen=True, slots=True)
class Window:
    """One provider limit as an answer reported it: what is left and seconds until it resets."""

    remaining: float
    reset: float | None


@dataclass(frozen=True, slots=True)
class ProviderLimits:
    """What one upstream answer says about the provider's limits (None: not said)."""

    requests: Window | None = None
    tokens: Window | None = None
    input_tokens: Window | None = None
    output_tokens: Window | None = None
    retry_after: float | None = None  # seconds, from `retry-after` (or `retry-after-ms`)

    def token_bound(self) -> Window | None:
        """One bound for a combined (prompt + completion) token bucket: `tokens` when
        given, else Anthropic's input plus output remaining, resetting with the later."""
        if self.tokens is not None:
            return self.tokens
        parts = [w for w in (self.input_tokens, self.output_tokens) if w is not None]
        if not parts:
            return None
        resets = [w.reset for w in parts if w.reset is not None]
        return Window(sum(w.remaining for w in parts), max(resets) if resets else None)

    def exhausted_until(self) -> float | None:
        """Seconds until the first exhausted window (remaining 0) resets, the longest
        when several are; None when none is exhausted."""
        out = None
        for w in (self.requests, self.tokens, self.input_tokens, self.output_tokens):
            if w is not None and w.remaining <= 0:
                reset = w.reset if w.reset is not None else 1.0
                out = reset if out is None else max(out, reset)
        return out

    def __bool__(self) -> bool:
        return any(v is not None for v in (self.requests, self.tokens, self.input_tokens,
                                           self.output_tokens, self.retry_after))


_OPENAI = {"requests": ("x-ratelimit-remaining-requests", "x-ratelimit-reset-requests"),
           "tokens": ("x-ratelimit-remaining-tokens", "x-ratelimit-reset-tokens")}
_ANTHROPIC = {"requests": "anthropic-ratelimit-requests-", "tokens": "anthropic-ratelimit-tokens-",
              "input_tokens": "anthropic-ratelimit-input-tokens-",
              "output_tokens": "anthropic-ratelimit-output-tokens-"}


def provider_limits(headers: list[tuple[str, str]] | dict[str, str], now_wall: float) -> ProviderLimits:
    """Parse OpenAI's `x-ratelimit-remaining-*` / `x-ratelimit-reset-*` (durations),
    Anthropic's `anthropic-ratelimit-{requests,tokens,input-tokens,output-tokens}-
    {remaining,reset}` (RFC 3339 times, made relative to `now_wall`, epoch seconds) and
    `retry-after` (seconds or an HTTP date) / `retry-after-ms`. Unparseable values are
    ignored; this never raises."""
    items = headers.items() if isinstance(headers, dict) else headers
    h: dict[str, str] = {}
    for name, value in items:
        low = name.lower()
        if low.startswith(("x-ratelimit-", "anthropic-ratelimit-", "retry-after")):
            h[low] = value
    if not h:
        return ProviderLimits()
    found: dict[str, Window] = {}
    for field, (rem, reset) in _OPENAI.items():
        remaining = _number(h.get(rem))
        if remaining is not None:
            found[field] = Window(remaining, parse_duration(h[reset]) if reset in h else None)
    for field, prefix in _ANTHROPIC.items():
        remaining = _number(h.get(prefix + "remaining"))
        if remaining is not None and field not in found:
            found[field] = Window(remaining, _until(h.get(prefix + "reset"), now_wall))
    retry = None
    if "retry-after-ms" in h:
        ms = _number(h["retry-after-ms"])
        retry = ms / 1000 if ms is not None else None
    if retry is None and "retry-after" in h:
        retry = _number(h["retry-after"])
        if retry is None:
            retry = _until(h["retry-after"], now_wall, http_date=True)
    return ProviderLimits(retry_after=retry, **found)


def _number(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        n = float(value.strip())
    except ValueError:
        return None
    return n if math.isfinite(n) and n >= 0 else None


def _until(value: str | None, now_wall: float, http_date: bool = False) -> float | None:
    """Seconds from `now_wall` until an RFC 3339 time (or an HTTP date), never negative."""
    if not value:
        return None
    try:
        if http_date:
            when = parsedate_to_datetime(value)
        else:
            when = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - now_wall)
