"""The store's contract: keys, teams, subscriptions, the spend log and the audit log, whatever database holds them.

`Store` is implemented once, in SQL, by `SqlStore` (sql.py) over a small dialect object:
`PostgresStore` (asyncpg) and `SqliteStore` (aiosqlite) add only what really differs. One
contract suite (`tests/test_store.py`) runs against both. Callers see only what is
written here.

Money. Every amount (`spend`, `max_budget`) is a `Decimal` in USD, exact to the
nano-dollar: the data classes quantize it to 1e-9 with ROUND_HALF_EVEN when they are
built, so what is read back equals what was written, on both backends. PostgreSQL stores
`NUMERIC(24,12)`; SQLite, which has no decimal type, stores integer nano-dollars
(`spend_nanos`, `max_budget_nanos`), so its sums are integer sums: exact too. An amount
must lie strictly within +-1e9 USD (SQLite's 64-bit integers hold +-9.2e9 USD of nanos;
the margin is for sums). `SpendRow.spend` refuses a float (a float has already lost the
exactness); a budget accepts one through its shortest repr, since JSON bodies carry them.

Time. Every datetime is timezone-aware and read back in UTC; an aware datetime in another
zone is converted, a naive one is a ValueError (the store never guesses a zone).
PostgreSQL stores `TIMESTAMPTZ`; SQLite integer microseconds since the epoch (`*_at_us`).
Both keep microseconds, so values round-trip exactly. Ranges are half-open:
`start <= started_at < end`, `started_at >= since`, `started_at < before`.

Keys. The plaintext key never reaches the store: `create_key` takes its SHA-256 hex
(`hash_key`) and refuses anything else; `KeyInfo.id` (LiteLLM's "token") is that same
digest, `key_prefix` a display form such as `sk-...abcd` (`mask_key`). The store does not
judge keys: an expired or blocked key is still returned, the auth layer decides.

Failures. Connection refused, timed out, database locked past the busy timeout, pool or
store closed: `StoreUnavailable`, which the auth layer turns into 503 while serving the
keys it has cached. Anything else that escapes is a bug.
"""

from __future__ import annotations

import abc
import hashlib
import re
from dataclasses import dataclass, field, fields, replace
from datetime import datetime, timezone
from decimal import ROUND_HALF_EVEN, Decimal, InvalidOperation
from typing import Any, Sequence

from ..patterns import matches

UTC = timezone.utc
NANO = Decimal("1e-9")
MONEY_LIMIT = Decimal(10**9)
MAX_PAGE_SIZE = 1000
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


class StoreError(Exception):
    """Base of the store's errors."""


class NotFound(StoreError):
    """The key, team or subscription does not exist."""


class AlreadyExists(StoreError):
    """A key (same id or hash), team (same id) or subscription (same id, or one for the
    same team) is already there."""


class StoreUnavailable(StoreError):
    """The database cannot be reached now (refused, timed out, locked, closed); retry later."""


# ---------------------------------------------------------------------------- values


def hash_key(key: str) -> str:
    """A key's SHA-256 hex digest: what the store keeps, and the key's public id. Any
    string has one: what a client sends may hold lone surrogates (a header's bytes that
    are not UTF-8), which hash like any other text and match no key."""
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def mask_key(key: str) -> str:
    """The display form of a key, e.g. `sk-...abcd`."""
    return f"{key[:3]}...{key[-4:]}"


def money(value: Any, name: str, *, allow_float: bool = True) -> Decimal:
    """`value` as an exact Decimal quantized to 1e-9 USD, within +-1e9 USD."""
    if type(value) is Decimal and value.is_finite() and abs(value) < MONEY_LIMIT:  # the spend log's case
        return value.quantize(NANO, rounding=ROUND_HALF_EVEN)
    if isinstance(value, bool) or (isinstance(value, float) and not allow_float):
        raise TypeError(f"{name}: money is Decimal, int or str, not {type(value).__name__}")
    try:
        amount = Decimal(repr(value) if isinstance(value, float) else value)
    except (InvalidOperation, TypeError, ValueError):
        raise ValueError(f"{name}: not an amount: {value!r}") from None
    if not amount.is_finite() or abs(amount) >= MONEY_LIMIT:
        raise ValueError(f"{name}: amount out of range: {value!r}")
    return amount.quantize(NANO, rounding=ROUND_HALF_EVEN)


def utc(value: datetime, name: str) -> datetime:
    """`value` converted to UTC; a naive datetime is refused."""
    if type(value) is datetime and value.tzinfo is UTC:
        return value
    if not isinstance(value, datetime):
        raise TypeError(f"{name}: expected a datetime, got {type(value).__name__}")
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{name}: naive datetime {value!r}; pass a timezone-aware one")
    return value.astimezone(UTC)


def check_page(page: int, page_size: int) -> int:
    """The row offset of `page` (1-based) of `page_size` rows."""
    if page < 1 or not 1 <= page_size <= MAX_PAGE_SIZE:
        raise ValueError(f"page must be >= 1 and page_size within 1..{MAX_PAGE_SIZE}")
    return (page - 1) * page_size


def check_key_hash(key_hash: str) -> None:
    if not isinstance(key_hash, str) or not _SHA256_HEX.fullmatch(key_hash):
        raise ValueError("key_hash must be the key's SHA-256 hex digest (hash_key), never the key")


def stamped(info: "KeyInfo | TeamInfo | SubscriptionInfo") -> "Any":
    """`info` with its timestamps for creation: now, unless the caller gave them."""
    created = info.created_at or datetime.now(UTC)
    return replace(info, created_at=created, updated_at=info.updated_at or created)


def _set(obj: Any, name: str, value: Any) -> None:
    object.__setattr__(obj, name, value)


def _normalize_limits(obj: Any) -> None:
    """Shared by KeyInfo and TeamInfo: canonical types, so equal values compare equal."""
    if isinstance(obj.models, str):
        raise TypeError("models: a sequence of model names, not a string")
    _set(obj, "models", tuple(obj.models or ()))
    if obj.max_budget is not None:
        _set(obj, "max_budget", money(obj.max_budget, "max_budget"))
    _set(obj, "metadata", dict(obj.metadata or {}))
    _set(obj, "blocked", bool(obj.blocked))
    for name in ("created_at", "updated_at", "expires_at"):
        value = getattr(obj, name, None)
        if value is not None:
            _set(obj, name, utc(value, name))


# ---------------------------------------------------------------------------- records


@dataclass(frozen=True, kw_only=True, slots=True)
class KeyInfo:
    """A virtual key, without the key. `created_at`/`updated_at` are set by the store when
    None at creation. `models` empty means every model. Treat `metadata` as read-only:
    instances are shared by caches."""

    id: str
    key_prefix: str
    key_alias: str | None = None
    team_id: str | None = None
    user_id: str | None = None
    models: tuple[str, ...] = ()
    max_budget: Decimal | None = None
    budget_duration: str | None = None
    rpm_limit: int | None = None
    tpm_limit: int | None = None
    max_parallel_requests: int | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    expires_at: datetime | None = None
    blocked: bool = False
    created_at: datetime | None = None
    updated_at: datetime | None = None
    tags: tuple[str, ...] = ()  # LiteLLM's key tags: kept and shown, for the operator's own use
    soft_budget: Decimal | None = None  # USD; reported (`soft_budget_exceeded`), never enforced

    def __post_init__(self) -> None:
        _normalize_limits(self)
        if isinstance(self.tags, str):
            raise TypeError("tags: a sequence of tags, not a string")
        _set(self, "tags", tuple(self.tags or ()))
        if self.soft_budget is not None:
            _set(self, "soft_budget", money(self.soft_budget, "soft_budget"))


@dataclass(frozen=True, kw_only=True, slots=True)
class TeamInfo:
    """A team; its limits apply to all its keys together. Same conventions as KeyInfo."""

    team_id: str
    team_alias: str | None = None
    models: tuple[str, ...] = ()
    max_budget: Decimal | None = None
    budget_duration: str | None = None
    rpm_limit: int | None = None
    tpm_limit: int | None = None
    max_parallel_requests: int | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    blocked: bool = False
    created_at: datetime | None = None
    updated_at: datetime | None = None

    def __post_init__(self) -> None:
        _normalize_limits(self)


LIMIT_NAMES = ("rpm", "tpm", "max_parallel_requests")
MAX_LIMIT = 2**53  # rpm and tpm stay exact in JSON; max_parallel_requests fits an INTEGER anyway


def _normalize_model_limits(value: Any) -> dict[str, dict[str, int]]:
    """A subscription's `limits`: model name (or "*") -> {rpm, tpm, max_parallel_requests},
    each a positive integer; absent, null or 0 means no such limit (and is left out)."""
    if not isinstance(value, dict):
        raise TypeError("limits: an object of model name -> {rpm, tpm, max_parallel_requests}")
    out: dict[str, dict[str, int]] = {}
    for model, limits in value.items():
        if not isinstance(model, str) or not model:
            raise ValueError("limits: model names must be non-empty strings")
        if not isinstance(limits, dict):
            raise TypeError(f"limits[{model!r}]: an object with rpm, tpm, max_parallel_requests")
        unknown = sorted(set(limits) - set(LIMIT_NAMES))
        if unknown:
            raise ValueError(f"limits[{model!r}]: unknown limit {unknown[0]!r}; known: {', '.join(LIMIT_NAMES)}")
        kept = {}
        for name in LIMIT_NAMES:
            n = limits.get(name)
            if n is None:
                continue
            if type(n) is not int or not 0 <= n <= MAX_LIMIT:
                raise ValueError(f"limits[{model!r}].{name}: an integer between 0 and {MAX_LIMIT}")
            if n:
                kept[name] = n
        out[model] = kept
    return out


@dataclass(frozen=True, kw_only=True, slots=True)
class SubscriptionInfo:
    """A team's subscription (at most one per team): whether its keys may be served at all
    (`enabled`), which models (`models`, empty: every model), rate limits per model or
    `"*"` for every model not named (`limits`: {model: {rpm, tpm, max_parallel_requests}}),
    and a budget over the team's spend since the subscription began (`max_budget`, reset
    every `budget_duration` counted from `created_at`). Same conventions as KeyInfo."""

    subscription_id: str
    team_id: str
    enabled: bool = True
    models: tuple[str, ...] = ()
    limits: dict[str, dict[str, int]] = field(default_factory=dict)
    max_budget: Decimal | None = None
    budget_duration: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    created_at: datetime | None = None
    updated_at: datetime | None = None

    def __post_init__(self) -> None:
        if isinstance(self.models, str):
            raise TypeError("models: a sequence of model names, not a string")
        _set(self, "models", tuple(self.models or ()))
        _set(self, "enabled", bool(self.enabled))
        _set(self, "limits", _normalize_model_limits(self.limits or {}))
        if self.max_budget is not None:
            _set(self, "max_budget", money(self.max_budget, "max_budget"))
        _set(self, "metadata", dict(self.metadata or {}))
        for name in ("created_at", "updated_at"):
            value = getattr(self, name)
            if value is not None:
                _set(self, name, utc(value, name))

    def allows_model(self, name: str) -> bool:
        """Exact names and `claude-*` patterns (`llmproxy.patterns`); empty: every model."""
        return not self.models or any(matches(m, name) for m in self.models)

    def limits_for(self, model: str) -> tuple[str, dict[str, int]] | None:
        """(the entry that applies, its limits) for `model`: its own entry, else `"*"`'s;
        None when neither is set."""
        own = self.limits.get(model)
        if own is not None:
            return model, own
        star = self.limits.get("*")
        return ("*", star) if star is not None else None


@dataclass(frozen=True, kw_only=True, slots=True)
class SpendRow:
    """One request in the spend log, keyed by the server's own `request_id` (unique: a
    retried batch never doubles a row); `client_request_id` is the client's
    `x-request-id`, which clients may reuse."""

    request_id: str
    started_at: datetime
    client_request_id: str | None = None
    key_id: str | None = None
    team_id: str | None = None
    user_id: str | None = None
    model: str | None = None  # the model the client asked for
    deployment: str | None = None  # the deployment that served it
    prompt_tokens: int = 0
    completion_tokens: int = 0
    tokens_estimated: bool = False
    spend: Decimal = Decimal(0)
    status: int = 0
    duration_ms: float = 0.0
    ttfb_ms: float | None = None
    cache_hit: bool = False
    served_model: str | None = None  # the model that served it, priced at its prices (a fallback's may differ)
    trace_id: str | None = None  # the request's W3C trace id (32 hex), from tracing or the client's traceparent
    unpriced: bool = False  # its model has no pricing: `spend` 0 means unknown, not free

    def __post_init__(self) -> None:
        _set(self, "started_at", utc(self.started_at, "started_at"))
        _set(self, "spend", money(self.spend, "spend", allow_float=False))
        _set(self, "duration_ms", float(self.duration_ms))
        if self.ttfb_ms is not None:
            _set(self, "ttfb_ms", float(self.ttfb_ms))


@dataclass(frozen=True, kw_only=True, slots=True)
class AuditRow:
    """One admin write in the audit log: who (`actor`: "master" or an admin key's id, never
    a secret) did `action` (`key.generate`, `team.update`...) to `target_id`, how it ended
    (`status`, failures included), which fields it set (`changes`, names only: never the
    values, which may hold a budget or metadata the log should not copy) and the request
    it came in (`request_id`, as in the access log). `id` is given by the store."""

    at: datetime
    actor: str
    action: str
    status: int
    target_id: str | None = None
    changes: tuple[str, ...] = ()
    request_id: str | None = None
    id: int | None = None

    def __post_init__(self) -> None:
        _set(self, "at", utc(self.at, "at"))
        _set(self, "changes", tuple(self.changes))


KEY_UPDATABLE = frozenset(f.name for f in fields(KeyInfo)) - {"id", "created_at", "updated_at"}
TEAM_UPDATABLE = frozenset(f.name for f in fields(TeamInfo)) - {"team_id", "created_at", "updated_at"}
SUBSCRIPTION_UPDATABLE = frozenset(f.name for f in fields(SubscriptionInfo)) - {
    "subscription_id", "team_id", "created_at", "updated_at"}
_TEMPLATES = {
    "key": (KEY_UPDATABLE, KeyInfo(id="", key_prefix="")),
    "team": (TEAM_UPDATABLE, TeamInfo(team_id="")),
    "subscription": (SUBSCRIPTION_UPDATABLE, SubscriptionInfo(subscription_id="", team_id="")),
}


def clean_updates(kind: str, updates: dict[str, Any]) -> dict[str, Any]:
    """`updates` for `update_key`/`update_team`/`update_subscription`, checked and
    normalized like the data class would (unknown or read-only field: TypeError)."""
    allowed, template = _TEMPLATES[kind]
    unknown = sorted(set(updates) - allowed)
    if unknown:
        raise TypeError(f"update_{kind}() cannot set {', '.join(unknown)}")
    normalized = replace(template, **updates)
    return {name: getattr(normalized, name) for name in updates}


# ---------------------------------------------------------------------------- the store


class Store(abc.ABC):
    """Keys, teams and the spend log. Every method may raise `StoreUnavailable`.

    Paging is 1-based, `page_size` at most 1000 (else ValueError). Lists are in a stable
    order: keys and teams oldest first, spend rows newest first (ties by id).
    """

    # -- lifecycle

    @abc.abstractmethod
    async def migrate(self) -> list[str]:
        """Apply the migrations this database lacks, in order, each in its own transaction,
        under a lock so replicas starting together do not collide. Returns the versions
        applied by this call (empty when up to date). Versions recorded by a newer release
        are left alone (the schema is expand/contract: see migrations/README.md)."""

    @abc.abstractmethod
    async def ping(self) -> None:
        """One round trip; raises StoreUnavailable when the database does not answer."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Release connections; idempotent. Later calls raise StoreUnavailable."""

    # -- keys

    @abc.abstractmethod
    async def create_key(self, key_hash: str, info: KeyInfo) -> KeyInfo:
        """Store a new key under `key_hash` (see `hash_key`); returns it with its
        timestamps. AlreadyExists when the id or the hash is taken."""

    async def key_by_hash(self, key_hash: str) -> KeyInfo | None:
        """The key whose hash is `key_hash`: the auth layer's lookup."""
        return await self._one_key("key_hash", key_hash)

    async def key(self, id: str) -> KeyInfo | None:
        """The key with public id `id`."""
        return await self._one_key("id", id)

    async def update_key(self, id: str, **fields: Any) -> KeyInfo:
        """Set the given fields (any KeyInfo field but id and timestamps; TypeError
        otherwise) and `updated_at`, atomically; returns the key. NotFound."""
        return await self._updated("key", id, fields, self.key)

    async def _updated(self, kind: str, ident: str, fields: dict[str, Any], read: Any) -> Any:
        """`update_key`/`update_team`/`update_subscription`: the checked fields applied (or,
        with none, the record read), NotFound when there is no such record."""
        updates = clean_updates(kind, fields)
        found = await self._update_record(kind, ident, updates) if updates else await read(ident)
        if found is None:
            raise NotFound(f"{kind} {ident} not found")
        return found

    @abc.abstractmethod
    async def delete_keys(self, ids: Sequence[str]) -> list[str]:
        """Delete keys; returns the ids that existed, in the order given."""

    @abc.abstractmethod
    async def list_keys(
        self, team_id: str | None = None, user_id: str | None = None, page: int = 1, page_size: int = 100
    ) -> list[KeyInfo]:
        """Keys, filtered by team and/or user, oldest first."""

    # -- teams

    @abc.abstractmethod
    async def count_keys(self, team_id: str | None = None, user_id: str | None = None) -> int:
        """How many keys `list_keys` would page through with these filters."""

    @abc.abstractmethod
    async def create_team(self, info: TeamInfo) -> TeamInfo:
        """Store a new team; returns it with its timestamps. AlreadyExists."""

    @abc.abstractmethod
    async def team(self, team_id: str) -> TeamInfo | None:
        ...

    async def update_team(self, team_id: str, **fields: Any) -> TeamInfo:
        """Like `update_key`. NotFound."""
        return await self._updated("team", team_id, fields, self.team)

    # -- what the implementation (SqlStore) provides for the shared methods above

    @abc.abstractmethod
    async def _one_key(self, column: str, value: str) -> KeyInfo | None:
        """The key whose `column` (id or key_hash) equals `value`."""

    @abc.abstractmethod
    async def _update_record(self, kind: str, ident: str,
                             updates: dict[str, Any]) -> "KeyInfo | TeamInfo | SubscriptionInfo | None":
        """Apply checked `updates` (plus updated_at) to the key, team or subscription `ident`
        in one statement; the record after the update, or None when there is none."""

    @abc.abstractmethod
    async def delete_team(self, team_id: str) -> None:
        """Delete the team (its keys stay: the admin layer decides about them). NotFound."""

    @abc.abstractmethod
    async def list_teams(self, page: int = 1, page_size: int = 100) -> list[TeamInfo]:
        """Teams, oldest first."""

    # -- subscriptions

    @abc.abstractmethod
    async def create_subscription(self, info: SubscriptionInfo) -> SubscriptionInfo:
        """Store a new subscription; returns it with its timestamps. AlreadyExists when the
        id is taken or the team already has one. The team is not checked here."""

    @abc.abstractmethod
    async def subscription(self, subscription_id: str) -> SubscriptionInfo | None:
        ...

    @abc.abstractmethod
    async def team_subscription(self, team_id: str) -> SubscriptionInfo | None:
        """The team's subscription (the `db` subscription source's lookup)."""

    async def update_subscription(self, subscription_id: str, **fields: Any) -> SubscriptionInfo:
        """Like `update_key` (the team cannot change). NotFound."""
        return await self._updated("subscription", subscription_id, fields, self.subscription)

    @abc.abstractmethod
    async def delete_subscriptions(self, ids: Sequence[str]) -> list[SubscriptionInfo]:
        """Delete subscriptions; returns those that existed, in the order given."""

    @abc.abstractmethod
    async def list_subscriptions(self, team_id: str | None = None, page: int = 1,
                                 page_size: int = 100) -> list[SubscriptionInfo]:
        """Subscriptions (of one team, when given), oldest first."""

    # -- spend

    @abc.abstractmethod
    async def write_spend(self, rows: Sequence[SpendRow]) -> int:
        """Insert a batch in one round trip and one transaction; returns how many rows were
        new. Idempotent: a row whose request_id is already stored is skipped, so a retried
        batch never doubles a row."""

    @abc.abstractmethod
    async def spend_logs(
        self,
        key_id: str | None = None,
        team_id: str | None = None,
        user_id: str | None = None,
        start: datetime | None = None,
        end: datetime | None = None,
        page: int = 1,
        page_size: int = 100,
    ) -> list[SpendRow]:
        """Spend rows matching every given filter, `start <= started_at < end`, newest first."""

    @abc.abstractmethod
    async def spend_total(
        self, key_id: str | None = None, team_id: str | None = None, since: datetime | None = None
    ) -> Decimal:
        """The exact sum of spend over the matching rows (`started_at >= since`); used to
        rebuild budget counters. Decimal 0 when none match."""

    @abc.abstractmethod
    async def prune_spend(self, before: datetime) -> int:
        """Delete rows with `started_at < before`, in chunks (no long lock); returns the count."""

    # -- audit log

    @abc.abstractmethod
    async def write_audit(self, row: AuditRow) -> int:
        """Append one row; returns its id."""

    @abc.abstractmethod
    async def audit_logs(
        self,
        *,
        action: str | None = None,
        target_id: str | None = None,
        actor: str | None = None,
        start: datetime | None = None,
        end: datetime | None = None,
        page: int = 1,
        page_size: int = 100,
    ) -> list[AuditRow]:
        """Audit rows matching every given filter, `start <= at < end`, newest first."""

    async def key_spend(self, id: str, since: datetime | None = None) -> Decimal:
        """The key's spend, all time or since `since` (for /key/info)."""
        return await self.spend_total(key_id=id, since=since)

    async def team_spend(self, team_id: str, since: datetime | None = None) -> Decimal:
        """The team's spend, all time or since `since` (for /team/info)."""
        return await self.spend_total(team_id=team_id, since=since)
