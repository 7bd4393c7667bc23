"""Virtual keys: made from `secrets`, stored only as SHA-256, compared in constant time.

A key is `sk-` plus 43 URL-safe characters (32 random bytes). Its public id (LiteLLM's
"token") is the SHA-256 hex of the key: the store looks keys up by it, and nothing that
is logged or stored can be turned back into the key.
"""

from __future__ import annotations

import hmac
import re
import secrets
from datetime import datetime, timedelta, timezone

from .store.base import hash_key, mask_key

PREFIX = "sk-"
_DURATION = re.compile(r"^\s*(\d+)\s*([smhdw])\s*$")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def generate() -> str:
    return PREFIX + secrets.token_urlsafe(32)


# One definition each, shared with the store: the digest the store keys by, and what may be
# shown of a key after it was handed out (`sk-...abcd`).
key_hash = hash_key
display = mask_key


def same_secret(a: str, b: str) -> bool:
    """Constant-time equality of two secrets; any strings (a header's bytes that are not
    UTF-8 arrive as lone surrogates: they compare, and differ from every key)."""
    return hmac.compare_digest(a.encode("utf-8", "surrogatepass"), b.encode("utf-8", "surrogatepass"))


def parse_duration(text: str) -> timedelta:
    """`30s`, `10m`, `24h`, `7d` (and `2w`) as a timedelta; ValueError otherwise."""
    if not isinstance(text, str):
        raise ValueError(f"expected a duration such as '30s', '10m', '24h' or '7d', got {text!r}")
    m = _DURATION.match(text)
    if not m or int(m.group(1)) <= 0:
        raise ValueError(f"expected a duration such as '30s', '10m', '24h' or '7d', got {text!r}")
    return timedelta(seconds=int(m.group(1)) * _UNIT[m.group(2)])


def period_start(anchor: datetime, duration: timedelta, now: datetime) -> datetime:
    """Start of the budget period containing `now`, periods counted from `anchor` (the key's
    or team's creation, or its last explicit reset)."""
    if now <= anchor:
        return anchor
    n = (now - anchor) // duration
    return anchor + n * duration


def utcnow() -> datetime:
    return datetime.now(timezone.utc)
