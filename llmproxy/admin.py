"""The admin API (SPEC §4): virtual keys, teams, subscriptions, the spend log and the
audit log, behind the master key.

Shapes follow LiteLLM's key-management endpoints, so code written for them works
unchanged. Each endpoint is one row of `Admin.routes`: method, path, the field spec its
JSON body (POST) or query string (GET) is checked against, a handler that receives
the checked arguments, and which of those name its target. Checking is table-driven
(`Field`, `check`): an unknown field, a wrong type or a bad value is a 400 naming the
field. Store errors map to 404 (NotFound), 400 (AlreadyExists) and 503
(StoreUnavailable); nothing a client sends produces a 500.

Admin calls take the data plane's record path: the server makes the context and the
record, the chain of the "admin" API (the outer middlewares, such as tracing) runs, and
`Admin.__call__` is its terminal. Each call's record names the action (`key.generate`),
the actor (`master`; never a secret) and the target id; the event sinks make of it one
access-log line (`event: admin`) and `llmproxy_admin_requests_total{action,status}`.
Every write that got past authorization (whatever its outcome) also gets one row per
target in the audit log (`GET /audit/logs`), with the names of the fields it set, never
their values.

Who may call: the master key only (`Authorization: Bearer`, `x-api-key` or `api-key`,
compared in constant time). No key or an unknown one: 401; a valid virtual key: 403; no
`master_key` in the config: every call is 403.

Semantics worth knowing:
- A key is named by its plaintext or by its id (LiteLLM's "token", the SHA-256 hex); the
  plaintext is shown once, in the `/key/generate` answer, and nowhere else (`/key/delete`
  answers ids, error messages never echo a key).
- `duration` counts from the request (generate and update). In an update an absent field
  stays as it is and `null` clears it (`models: null` or `[]`: every model; `duration:
  null`: never expires; `max_budget: null`: no budget).
- Budget periods start at creation: `budget_reset_at` ends the current one, and `spend`
  in `/key/info` and `/team/info` is that period's (all time without `budget_duration`).
- Deleting a team deletes its keys too, as LiteLLM does; the answer lists both. A team
  named in `/team/delete` that does not exist is a 404 and nothing is deleted.
- `/spend/logs`: `start_date`/`end_date` take `YYYY-MM-DD` or ISO 8601 (naive = UTC); a
  date-only `end_date` includes that day, a datetime one is exclusive.
- Every write publishes an invalidation (`services.invalidator`), so the auth caches of
  every replica drop the key or team at once, and the subscription caches the team's
  subscription (the subscription middleware also drops its Redis copy first).
- A team has at most one subscription (`/subscription/new` for a team that has one is a
  400); deleting the team deletes it. `/subscription/refresh {team_id}` re-reads it from
  the subscription middleware's source at once (503 when the source cannot answer).
"""

from __future__ import annotations

import functools
import re
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Iterable, Mapping

import orjson
import structlog
from aiohttp import web

from . import errors, keys
from .context import Reply
from .errors import ProxyError
from .validate import read_bounded
from .store import (AlreadyExists, AuditRow, KeyInfo, NotFound, SpendRow, Store, StoreUnavailable,
                    SubscriptionInfo, TeamInfo)
from .store.base import LIMIT_NAMES, money

if TYPE_CHECKING:
    from .context import Context
    from .server import Gateway

log = structlog.get_logger("llmproxy.admin")

UTC = timezone.utc
MAX_BODY_BYTES = 1 << 20
MAX_DURATION = timedelta(days=36500)
MAX_INT4 = 2**31 - 1  # max_parallel_requests is an INTEGER column
MAX_INT8 = 2**53  # rpm/tpm are BIGINT; keep them exact in JSON too
MAX_METADATA_BYTES = 64 * 1024
MAX_METADATA_DEPTH = 32
TEAM_KEYS_SHOWN = 1000
_KEY_ID = re.compile(r"[0-9a-f]{64}")
_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")
_JSON = "application/json"


# ------------------------------------------------------------------------- field specs

Check = Callable[[str, Any], Any]  # (field name, raw value) -> checked value; raises a 400


@dataclass(frozen=True, slots=True)
class Field:
    check: Check
    required: bool = False
    nullable: bool = True


def bad(name: str, problem: str) -> ProxyError:
    return errors.invalid_request(f"'{name}' {problem}.", name)


def check(spec: Mapping[str, Field], data: Mapping[str, Any]) -> dict[str, Any]:
    """`data` checked against `spec`: only the fields given (plus none invented), each
    converted by its checker; a 400 naming the first field that is wrong."""
    for name in data:
        if name not in spec:
            shown = errors.shown(str(name))
            raise errors.invalid_request(f"Unknown field '{shown}'; accepted: {', '.join(spec)}.", shown)
    out: dict[str, Any] = {}
    for name, field in spec.items():
        if name not in data:
            if field.required:
                raise errors.invalid_request(f"Missing required field '{name}'.", name)
            continue
        value = data[name]
        if value is None:
            if not field.nullable:
                raise bad(name, "must not be null")
            out[name] = None
        else:
            out[name] = field.check(name, value)
    return out


def text(max_len: int = 256) -> Check:
    def check_text(name: str, value: Any) -> str:
        if not isinstance(value, str) or not value.strip():
            raise bad(name, "must be a non-empty string")
        if len(value) > max_len:
            raise bad(name, f"must be at most {max_len} characters")
        if not value.isprintable():
            raise bad(name, "must not contain control characters")
        return value
    return check_text


def text_list(max_items: int = 1000, item: Check = text()) -> Check:
    def check_list(name: str, value: Any) -> tuple[str, ...]:
        if not isinstance(value, list):
            raise bad(name, "must be an array of strings")
        if len(value) > max_items:
            raise bad(name, f"must have at most {max_items} items")
        return tuple(dict.fromkeys(item(f"{name}[{i}]", v) for i, v in enumerate(value)))
    return check_list


def count(maximum: int) -> Check:
    def check_count(name: str, value: Any) -> int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise bad(name, "must be an integer")
        if not 0 <= value <= maximum:
            raise bad(name, f"must be between 0 and {maximum}")
        return value
    return check_count


def amount(name: str, value: Any) -> Decimal:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise bad(name, "must be a number (USD)")
    if value < 0:
        raise bad(name, "must not be negative")
    try:
        return money(value, name)
    except ValueError:
        raise bad(name, "is out of range") from None


def duration(name: str, value: Any) -> str:
    """A duration such as "30s", "10m", "24h", "7d" (kept as text; parsed where used)."""
    try:
        length = keys.parse_duration(value)
    except (ValueError, OverflowError):
        raise bad(name, "must be a duration such as '30s', '10m', '24h' or '7d'") from None
    if length > MAX_DURATION:
        raise bad(name, f"must be at most {MAX_DURATION.days}d")
    return value.strip()


def flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise bad(name, "must be true or false")
    return value


_CHOSEN_KEY = re.compile(r"sk-[A-Za-z0-9_-]{20,256}")


def chosen_key(name: str, value: Any) -> str:
    """A key the caller brings (a LiteLLM key being moved over): `sk-` then 20 to 256
    URL-safe characters, as the keys this gateway makes (43) and LiteLLM's (22) are."""
    if not isinstance(value, str) or not _CHOSEN_KEY.fullmatch(value):
        raise bad(name, "must be 'sk-' followed by 20 to 256 letters, digits, '-' or '_'")
    return value


def json_object(name: str, value: Any) -> dict[str, Any]:
    """A JSON object both databases can store: bounded depth and size, no NUL characters."""
    if not isinstance(value, dict):
        raise bad(name, "must be a JSON object")
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_METADATA_DEPTH:
            raise bad(name, f"must be nested at most {MAX_METADATA_DEPTH} levels deep")
        if isinstance(item, dict):
            if any("\x00" in k for k in item):
                raise bad(name, "must not contain NUL characters")
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)
        elif isinstance(item, str) and "\x00" in item:
            raise bad(name, "must not contain NUL characters")
    if len(orjson.dumps(value)) > MAX_METADATA_BYTES:
        raise bad(name, f"must be at most {MAX_METADATA_BYTES} bytes as JSON")
    return value


def model_limits(name: str, value: Any) -> dict[str, dict[str, int | None]]:
    """A subscription's `limits`: model name (or "*") -> {rpm, tpm, max_parallel_requests}."""
    if not isinstance(value, dict):
        raise bad(name, "must be an object of model name (or \"*\") -> {rpm, tpm, max_parallel_requests}")
    if len(value) > 1000:
        raise bad(name, "must name at most 1000 models")
    out: dict[str, dict[str, int | None]] = {}
    for model, limits in value.items():
        model = text()(f"{name} key", model)
        where = f"{name}.{errors.shown(model)}"
        if not isinstance(limits, dict):
            raise bad(where, "must be an object with rpm, tpm and/or max_parallel_requests")
        for limit in limits:
            if limit not in LIMIT_NAMES:
                raise bad(f"{where}.{errors.shown(str(limit))}", f"is not a limit; use {', '.join(LIMIT_NAMES)}")
        out[model] = {limit: None if limits[limit] is None else
                      count(MAX_INT4 if limit == "max_parallel_requests" else MAX_INT8)(f"{where}.{limit}", limits[limit])
                      for limit in limits}
    return out


# Query strings carry text: these checkers parse it.

def query_int(low: int, high: int) -> Check:
    def check_int(name: str, value: str) -> int:
        if not (value.isascii() and value.isdigit() and len(value) <= 12) or not low <= int(value) <= high:
            raise bad(name, f"must be an integer between {low} and {high}")
        return int(value)
    return check_int


def query_flag(name: str, value: str) -> bool:
    if value.lower() not in ("true", "false", "1", "0"):
        raise bad(name, "must be true or false")
    return value.lower() in ("true", "1")


def query_time(end: bool) -> Check:
    def check_time(name: str, value: str) -> datetime:
        try:
            if _DATE.fullmatch(value):
                moment = datetime.fromisoformat(value).replace(tzinfo=UTC)
                return moment + timedelta(days=1) if end else moment  # a date-only end includes the day
            moment = datetime.fromisoformat(value)
            return (moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment).astimezone(UTC)
        except (ValueError, OverflowError):
            raise bad(name, "must be a date (YYYY-MM-DD) or an ISO 8601 datetime") from None
    return check_time


_NAME = Field(text())
_LIMITS = {
    "models": Field(text_list()),
    "max_budget": Field(amount),
    "budget_duration": Field(duration),
    "rpm_limit": Field(count(MAX_INT8)),
    "tpm_limit": Field(count(MAX_INT8)),
    "max_parallel_requests": Field(count(MAX_INT4)),
    "metadata": Field(json_object),
    "blocked": Field(flag, nullable=False),
}
_KEY_ONLY = {"tags": Field(text_list(64, text(128))), "soft_budget": Field(amount)}
KEY_FIELDS = {"key_alias": _NAME, "duration": Field(duration), "team_id": _NAME, "user_id": _NAME, **_LIMITS,
              **_KEY_ONLY}
TEAM_FIELDS = {"team_alias": _NAME, **_LIMITS}
_KEY_REF = Field(text(512), required=True, nullable=False)
_TEAM_REF = Field(text(), required=True, nullable=False)
_PAGE = Field(query_int(1, 10**6))

KEY_GENERATE = {"key": Field(chosen_key, nullable=False), **KEY_FIELDS}
KEY_UPDATE = {"key": _KEY_REF, **KEY_FIELDS}
KEY_REF = {"key": _KEY_REF}
KEY_DELETE = {"keys": Field(text_list(1000, text(512)), required=True, nullable=False)}
KEY_LIST = {"team_id": _NAME, "user_id": _NAME, "page": _PAGE, "size": Field(query_int(1, 1000)),
            "return_full_object": Field(query_flag)}
TEAM_NEW = {"team_id": Field(text(), nullable=False), **TEAM_FIELDS}
TEAM_UPDATE = {"team_id": _TEAM_REF, **TEAM_FIELDS}
TEAM_REF = {"team_id": _TEAM_REF}
TEAM_DELETE = {"team_ids": Field(text_list(100), nullable=False), "team_id": Field(text(), nullable=False)}
SUBSCRIPTION_FIELDS = {"enabled": Field(flag, nullable=False), "models": Field(text_list()),
                       "limits": Field(model_limits), "max_budget": Field(amount),
                       "budget_duration": Field(duration), "metadata": Field(json_object)}
_SUBSCRIPTION_REF = Field(text(), required=True, nullable=False)
SUBSCRIPTION_NEW = {"subscription_id": Field(text(), nullable=False), "team_id": _TEAM_REF, **SUBSCRIPTION_FIELDS}
SUBSCRIPTION_UPDATE = {"subscription_id": _SUBSCRIPTION_REF, **SUBSCRIPTION_FIELDS}
SUBSCRIPTION_INFO = {"subscription_id": Field(text(), nullable=False), "team_id": Field(text(), nullable=False)}
SUBSCRIPTION_DELETE = {"subscription_ids": Field(text_list(100), nullable=False),
                       "subscription_id": Field(text(), nullable=False)}
SUBSCRIPTION_LIST = {"team_id": _NAME, "page": Field(count(10**6)), "page_size": Field(count(1000))}
SUBSCRIPTION_REFRESH = {"team_id": _TEAM_REF}
SPEND_LOGS = {"api_key": Field(text(512)), "team_id": _NAME, "user_id": _NAME,
              "start_date": Field(query_time(end=False)), "end_date": Field(query_time(end=True)),
              "page": _PAGE, "page_size": Field(query_int(1, 1000))}
AUDIT_LOGS = {"action": Field(text(64)), "target_id": Field(text(512)), "actor": Field(text(128)),
              "start_date": Field(query_time(end=False)), "end_date": Field(query_time(end=True)),
              "page": _PAGE, "page_size": Field(query_int(1, 1000))}


# ----------------------------------------------------------------- shared with the CLI


def key_id(ref: str) -> str:
    """The id of a key named by its plaintext or by its id."""
    return ref if _KEY_ID.fullmatch(ref) else keys.key_hash(ref)


def budget_period(anchor: datetime | None, budget_duration: str | None,
                  now: datetime) -> tuple[datetime | None, datetime | None]:
    """(start, end) of the budget period containing `now`; (None, None) without one."""
    if anchor is None or not budget_duration:
        return None, None
    try:
        length = keys.parse_duration(budget_duration)
    except (ValueError, OverflowError):
        return None, None
    start = keys.period_start(anchor, length, now)
    return start, start + length


async def _require_team(store: Store, team_id: str | None) -> None:
    if team_id is not None and await store.team(team_id) is None:
        raise errors.invalid_request(f"'team_id': team '{team_id}' not found; create it with /team/new first.",
                                     "team_id")


async def key_changes(store: Store, fields: dict[str, Any], now: datetime) -> dict[str, Any]:
    """Checked KEY_FIELDS as KeyInfo fields: `duration` becomes `expires_at`; a team named
    must exist."""
    changes = dict(fields)
    if "duration" in changes:
        length = changes.pop("duration")
        changes["expires_at"] = None if length is None else now + keys.parse_duration(length)
    await _require_team(store, changes.get("team_id"))
    return changes


async def create_key(store: Store, fields: dict[str, Any], now: datetime) -> tuple[str, KeyInfo]:
    """A new key from fields checked against KEY_GENERATE: (the plaintext, shown once; its
    info). `key`: the caller's own (else a new random one); one already stored is refused."""
    fields = dict(fields)
    plaintext = fields.pop("key", None) or keys.generate()
    changes = await key_changes(store, fields, now)
    digest = keys.key_hash(plaintext)
    info = KeyInfo(id=digest, key_prefix=keys.display(plaintext), created_at=now, updated_at=now, **changes)
    return plaintext, await store.create_key(digest, info)


async def delete_keys(store: Store, refs: list[str] | tuple[str, ...], invalidator: Any) -> list[str]:
    """Delete keys named by plaintext or id; returns the ids that existed."""
    deleted = await store.delete_keys([key_id(ref) for ref in refs])
    for ident in deleted:
        if invalidator is not None:
            await invalidator.publish("key", ident)
    return deleted


async def _told(invalidator: Any, kind: str, ident: str) -> None:
    if invalidator is not None:
        await invalidator.publish(kind, ident)


async def create_team(store: Store, fields: dict[str, Any], now: datetime, invalidator: Any) -> TeamInfo:
    """A new team from fields checked against TEAM_NEW (a `team_id` of none: a new uuid)."""
    fields = dict(fields)
    team_id = fields.pop("team_id", None) or str(uuid.uuid4())
    info = await store.create_team(TeamInfo(team_id=team_id, created_at=now, updated_at=now, **fields))
    await _told(invalidator, "team", team_id)  # drops a cached "no such team"
    return info


async def delete_teams(store: Store, team_ids: list[str], invalidator: Any) -> list[str]:
    """Delete teams with their keys and subscriptions (every team must exist, else nothing
    is deleted): the team's keys first, then the team, then keys made meanwhile and its
    subscription, so that a failure half way leaves the team in place and the call can be
    repeated. Returns the deleted key ids."""
    missing = [t for t in team_ids if await store.team(t) is None]
    if missing:
        raise ProxyError(404, f"Team not found: {', '.join(missing)}; nothing was deleted.",
                         "invalid_request_error", "not_found", "team_ids")
    deleted_keys: list[str] = []
    for team_id in team_ids:
        deleted_keys += await _delete_team_keys(store, team_id, invalidator)
        try:
            await store.delete_team(team_id)
        except NotFound:
            pass  # deleted meanwhile by another call
        await _told(invalidator, "team", team_id)
        deleted_keys += await _delete_team_keys(store, team_id, invalidator)
        sub = await store.team_subscription(team_id)
        if sub is not None:
            await store.delete_subscriptions([sub.subscription_id])
            await _told(invalidator, "subscription", team_id)
    return deleted_keys


async def _delete_team_keys(store: Store, team_id: str, invalidator: Any) -> list[str]:
    deleted: list[str] = []
    while True:
        batch = await store.list_keys(team_id=team_id, page_size=1000)
        gone = await delete_keys(store, [k.id for k in batch], invalidator) if batch else []
        deleted += gone
        if not gone:
            return deleted


# ------------------------------------------------------------------------------ views


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def _usd(value: Decimal | None) -> float | None:
    return None if value is None else float(value)


def _limits(info: KeyInfo | TeamInfo, now: datetime) -> dict[str, Any]:
    _, reset = budget_period(info.created_at, info.budget_duration, now)
    return {
        "models": list(info.models),
        "max_budget": _usd(info.max_budget),
        "budget_duration": info.budget_duration,
        "budget_reset_at": _iso(reset),
        "rpm_limit": info.rpm_limit,
        "tpm_limit": info.tpm_limit,
        "max_parallel_requests": info.max_parallel_requests,
        "metadata": info.metadata,
        "blocked": info.blocked,
        "created_at": _iso(info.created_at),
        "updated_at": _iso(info.updated_at),
    }


def key_view(info: KeyInfo, now: datetime, spend: Decimal | None = None) -> dict[str, Any]:
    view = {"token": info.id, "key_name": info.key_prefix, "key_alias": info.key_alias,
            "team_id": info.team_id, "user_id": info.user_id, "expires": _iso(info.expires_at),
            **_limits(info, now), "tags": list(info.tags), "soft_budget": _usd(info.soft_budget)}
    if spend is not None:
        view["spend"] = float(spend)
        view["soft_budget_exceeded"] = info.soft_budget is not None and spend >= info.soft_budget
    return view


def team_view(info: TeamInfo, now: datetime, spend: Decimal) -> dict[str, Any]:
    return {"team_id": info.team_id, "team_alias": info.team_alias, **_limits(info, now), "spend": float(spend)}


def subscription_view(info: SubscriptionInfo, now: datetime, spend: Decimal | None = None) -> dict[str, Any]:
    _, reset = budget_period(info.created_at, info.budget_duration, now)
    view = {"subscription_id": info.subscription_id, "team_id": info.team_id, "enabled": info.enabled,
            "models": list(info.models), "limits": info.limits, "max_budget": _usd(info.max_budget),
            "budget_duration": info.budget_duration, "budget_reset_at": _iso(reset), "metadata": info.metadata,
            "created_at": _iso(info.created_at), "updated_at": _iso(info.updated_at)}
    if spend is not None:
        view["spend"] = float(spend)
    return view


def spend_view(row: SpendRow) -> dict[str, Any]:
    started = _iso(row.started_at)
    return {
        "request_id": row.request_id,
        "client_request_id": row.client_request_id,
        "api_key": row.key_id,
        "team_id": row.team_id,
        "user_id": row.user_id,
        "model": row.model,
        "served_model": row.served_model,
        "deployment": row.deployment,
        "prompt_tokens": row.prompt_tokens,
        "completion_tokens": row.completion_tokens,
        "total_tokens": row.prompt_tokens + row.completion_tokens,
        "tokens_estimated": row.tokens_estimated,
        "spend": float(row.spend),
        "status": row.status,
        "startTime": started,
        "endTime": _iso(row.started_at + timedelta(milliseconds=row.duration_ms)),
        "started_at": started,
        "duration_ms": row.duration_ms,
        "ttfb_ms": row.ttfb_ms,
        "cache_hit": row.cache_hit,
        "trace_id": row.trace_id,
        "unpriced": row.unpriced,
    }


def audit_view(row: AuditRow) -> dict[str, Any]:
    return {"id": row.id, "at": _iso(row.at), "actor": row.actor, "action": row.action,
            "target_id": row.target_id, "status": row.status, "changes": list(row.changes),
            "request_id": row.request_id}


# ------------------------------------------------------------------------ the endpoints

Handler = Callable[[dict[str, Any]], Awaitable[Any]]
# (the checked arguments, the handler's result or None when it failed) -> the target ids
Targets = Callable[[dict[str, Any], Any], list[str]]
ACTOR_MASTER = "master"


def _arg(name: str, convert: Callable[[str], str] = str) -> Targets:
    return lambda args, result: [convert(args[name])] if args.get(name) else []


def _result(name: str, fallback: Targets | None = None) -> Targets:
    """The id(s) under `name` in the result; before one exists (a failed call), `fallback`."""
    def targets(args: dict[str, Any], result: Any) -> list[str]:
        if isinstance(result, dict) and result.get(name) is not None:
            found = result[name]
            return [str(t) for t in found] if isinstance(found, list) else [str(found)]
        return fallback(args, result) if fallback is not None else []
    return targets


def _none(args: dict[str, Any], result: Any) -> list[str]:
    return []


def _team_ids(args: dict[str, Any], result: Any) -> list[str]:
    return _ids(args, "team_ids", "team_id")


def _subscription_ids(args: dict[str, Any], result: Any) -> list[str]:
    return _ids(args, "subscription_ids", "subscription_id")


def _ids(args: dict[str, Any], many: str, one: str) -> list[str]:
    return list(dict.fromkeys([*args.get(many, ()), *([args[one]] if args.get(one) else [])]))


def _key_refs(args: dict[str, Any], result: Any) -> list[str]:
    return [key_id(ref) for ref in args.get("keys", ())]


@dataclass(frozen=True, slots=True)
class Route:
    method: str
    path: str
    spec: Mapping[str, Field]
    handler: Handler
    targets: Targets
    idents: tuple[str, ...] = ()  # the fields that name the target, not changes to it

    @property
    def action(self) -> str:
        return self.path.strip("/").replace("/", ".")  # /key/generate -> key.generate

    @property
    def writes(self) -> bool:
        return self.method == "POST"


class Admin:
    """The admin endpoints of one gateway, the terminal of the "admin" chain.
    `register(app)` adds their routes to the data-plane app, unless `server.admin_port` is
    set: then `app()` is served on that port alone."""

    def __init__(self, gateway: "Gateway") -> None:
        self.gateway = gateway
        self.config = gateway.config
        self.services = gateway.services
        key, team = _arg("key", key_id), _arg("team_id")
        self.routes: list[Route] = [
            Route("POST", "/key/generate", KEY_GENERATE, self.key_generate, _result("token")),
            Route("POST", "/key/update", KEY_UPDATE, self.key_update, key, ("key",)),
            Route("POST", "/key/delete", KEY_DELETE, self.key_delete, _result("deleted_keys", _key_refs), ("keys",)),
            Route("GET", "/key/info", KEY_REF, self.key_info, key, ("key",)),
            Route("GET", "/key/list", KEY_LIST, self.key_list, _none),
            Route("POST", "/key/block", KEY_REF, self.key_block, key, ("key",)),
            Route("POST", "/key/unblock", KEY_REF, self.key_unblock, key, ("key",)),
            Route("POST", "/team/new", TEAM_NEW, self.team_new, _result("team_id", team)),
            Route("GET", "/team/info", TEAM_REF, self.team_info, team, ("team_id",)),
            Route("POST", "/team/update", TEAM_UPDATE, self.team_update, team, ("team_id",)),
            Route("POST", "/team/delete", TEAM_DELETE, self.team_delete, _team_ids, ("team_id", "team_ids")),
            Route("POST", "/subscription/new", SUBSCRIPTION_NEW, self.subscription_new,
                  _result("subscription_id", _arg("subscription_id"))),
            Route("GET", "/subscription/info", SUBSCRIPTION_INFO, self.subscription_info,
                  _result("subscription_id", _arg("subscription_id")), ("subscription_id", "team_id")),
            Route("POST", "/subscription/update", SUBSCRIPTION_UPDATE, self.subscription_update,
                  _arg("subscription_id"), ("subscription_id",)),
            Route("POST", "/subscription/delete", SUBSCRIPTION_DELETE, self.subscription_delete,
                  _subscription_ids, ("subscription_id", "subscription_ids")),
            Route("POST", "/subscription/list", SUBSCRIPTION_LIST, self.subscription_list, _none),
            Route("POST", "/subscription/refresh", SUBSCRIPTION_REFRESH, self.subscription_refresh, team,
                  ("team_id",)),
            Route("GET", "/spend/logs", SPEND_LOGS, self.spend_logs, _none),
            Route("GET", "/audit/logs", AUDIT_LOGS, self.audit_logs, _none),
        ]
        self._by_path = {(r.method, r.path): r for r in self.routes}
        self._methods: dict[str, list[str]] = {}
        for r in self.routes:
            self._methods.setdefault(r.path, []).append(r.method)
        self.actions = tuple(r.action for r in self.routes)

    def register(self, app: web.Application) -> None:
        if self.config.server.admin_port is None:
            self._add(app)

    def app(self) -> web.Application:
        """The admin endpoints alone, for `server.admin_port` (the store is opened by the
        data-plane app's startup, which must run first)."""
        app = web.Application(client_max_size=MAX_BODY_BYTES)
        self._add(app)
        app.router.add_route("*", "/{tail:.*}", functools.partial(self.gateway.serve, api="unknown"))
        return app

    def _add(self, app: web.Application) -> None:
        serve = functools.partial(self.gateway.serve, api="admin")
        for route in self.routes:
            app.router.add_route(route.method, route.path, serve)
        for path, methods in self._methods.items():  # a known path, another method: 405 (after the key)
            for method in ("GET", "POST", "PUT", "PATCH", "DELETE"):
                if method not in methods:
                    app.router.add_route(method, path, serve)

    @property
    def store(self) -> Store:
        return self.services.store

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self.services.wall(), UTC)

    async def _publish(self, kind: str, ident: str) -> None:
        if self.services.invalidator is not None:
            await self.services.invalidator.publish(kind, ident)

    # -- the terminal every endpoint shares

    async def __call__(self, ctx: "Context") -> Reply:
        """Authorize, check the fields, act, keep the audit row of a write, answer."""
        request = ctx.request
        assert request is not None
        route = self._by_path.get((request.method, request.path))
        record = ctx.record
        if route is None:  # a known path with another method (the only other way here)
            allowed = self._methods[request.path]
            record.action = self._by_path[(allowed[0], request.path)].action
            record.actor = await self._authorize(ctx.api_key)  # who may know the path exists
            raise ProxyError(405, f"{request.method} is not allowed on {request.path}; use {', '.join(allowed)}.",
                             "invalid_request_error", "method_not_allowed", headers={"Allow": ", ".join(allowed)})
        record.action = route.action
        record.actor = await self._authorize(ctx.api_key)
        args: dict[str, Any] = {}
        data: Any = {}
        result: Any = None
        status = 500
        try:
            data = _query(request) if route.method == "GET" else await _body(request)
            args = check(route.spec, data)
            result = await route.handler(dict(args))
            status = 200
        except ProxyError as exc:
            status = exc.status
            raise
        except StoreUnavailable:
            status = 503
            raise ProxyError(503, "The database is unavailable; retry later.", "api_error",
                             "database_unavailable") from None
        except NotFound as exc:
            status = 404
            raise ProxyError(404, f"{str(exc).capitalize()}.", "invalid_request_error", "not_found") from None
        except AlreadyExists as exc:
            status = 400
            raise errors.invalid_request(f"{str(exc).capitalize()}.") from None
        finally:
            targets = route.targets(args, result)
            if targets:
                record.target_id = targets[0] if len(targets) == 1 else f"{targets[0]} (+{len(targets) - 1} more)"
            if route.writes:  # a refused write keeps the (known) fields it tried to set
                sent = args if args or not isinstance(data, dict) else [n for n in data if n in route.spec]
                await self._audit(route, record, sent, targets, status)
        return Reply(200, [("Content-Type", _JSON)], orjson.dumps(result))

    async def _audit(self, route: Route, record: Any, args: Iterable[str], targets: list[str],
                     status: int) -> None:
        """One audit row per target of a write (one with no target when it has none)."""
        changes = tuple(sorted(name for name in args if name not in route.idents))
        at = self._now()
        for target in targets or [None]:
            row = AuditRow(at=at, actor=record.actor, action=route.action, target_id=target, status=status,
                           changes=changes, request_id=record.request_id)
            try:
                await self.store.write_audit(row)
            except Exception as exc:  # the action happened: say so loudly, but answer the caller
                log.error("audit_write_failed", action=route.action, actor=record.actor, target_id=target,
                          status=status, request_id=record.request_id, error=f"{type(exc).__name__}: {exc}")

    async def _authorize(self, key: str | None) -> str:
        """The actor of a call that may use the admin API, else a 401 or 403."""
        master = self.config.master_key
        if not master:
            raise ProxyError(403, "The admin API is disabled: set master_key in the config to use it.",
                             "permission_error")
        if key is None:
            raise errors.unauthorized("Missing master key: send it as 'Authorization: Bearer <master_key>'.")
        if keys.same_secret(key, master):
            return ACTOR_MASTER
        try:
            virtual = len(key) <= 512 and await self.store.key_by_hash(keys.key_hash(key)) is not None
        except StoreUnavailable:
            virtual = False  # cannot tell; it is not the master key either way
        if virtual:
            raise ProxyError(403, "This endpoint needs the master key; a virtual key cannot use the admin API.",
                             "permission_error")
        raise errors.unauthorized("Invalid master key.")

    # -- keys

    async def _key_info(self, info: KeyInfo, now: datetime) -> dict[str, Any]:
        since, _ = budget_period(info.created_at, info.budget_duration, now)
        return key_view(info, now, await self.store.key_spend(info.id, since=since))

    async def _key(self, ref: str) -> KeyInfo:
        info = await self.store.key(key_id(ref))
        if info is None:
            raise ProxyError(404, "Key not found.", "invalid_request_error", "not_found", "key")
        return info

    async def key_generate(self, args: dict[str, Any]) -> dict[str, Any]:
        now = self._now()
        plaintext, info = await create_key(self.store, args, now)
        log.info("admin_key_generated", key_id=info.id, key_alias=info.key_alias, team_id=info.team_id,
                 user_id=info.user_id)
        return {"key": plaintext, **key_view(info, now, Decimal(0))}

    async def key_update(self, args: dict[str, Any]) -> dict[str, Any]:
        now = self._now()
        ident = key_id(args.pop("key"))
        info = await self.store.update_key(ident, **await key_changes(self.store, args, now))
        await self._publish("key", ident)
        log.info("admin_key_updated", key_id=ident, fields=sorted(args))
        return await self._key_info(info, now)

    async def _set_blocked(self, ref: str, blocked: bool) -> dict[str, Any]:
        ident = key_id(ref)
        info = await self.store.update_key(ident, blocked=blocked)
        await self._publish("key", ident)
        log.info("admin_key_blocked" if blocked else "admin_key_unblocked", key_id=ident)
        return await self._key_info(info, self._now())

    async def key_block(self, args: dict[str, Any]) -> dict[str, Any]:
        return await self._set_blocked(args["key"], True)

    async def key_unblock(self, args: dict[str, Any]) -> dict[str, Any]:
        return await self._set_blocked(args["key"], False)

    async def key_delete(self, args: dict[str, Any]) -> dict[str, Any]:
        deleted = await delete_keys(self.store, args["keys"], self.services.invalidator)
        log.info("admin_keys_deleted", key_ids=deleted)
        return {"deleted_keys": deleted}

    async def key_info(self, args: dict[str, Any]) -> dict[str, Any]:
        info = await self._key(args["key"])
        return {"key": info.id, "info": await self._key_info(info, self._now())}

    async def key_list(self, args: dict[str, Any]) -> dict[str, Any]:
        page, size = args.get("page") or 1, args.get("size") or 10
        team, user = args.get("team_id"), args.get("user_id")
        found = await self.store.list_keys(team, user, page=page, page_size=size)
        more = bool(found) and bool(await self.store.list_keys(team, user, page=page * size + 1, page_size=1))
        now = self._now()
        views = [key_view(info, now) for info in found]
        result: dict[str, Any] = {"keys": views if args.get("return_full_object") else [i.id for i in found]}
        if not args.get("return_full_object"):
            result["key_infos"] = views
        result.update(current_page=page, page_size=size, has_more=more, total_count=await self.store.count_keys(team, user))
        return result


    # -- teams

    async def _team_info(self, info: TeamInfo, now: datetime) -> dict[str, Any]:
        since, _ = budget_period(info.created_at, info.budget_duration, now)
        return team_view(info, now, await self.store.team_spend(info.team_id, since=since))

    def _check_team_metadata(self, args: dict[str, Any]) -> None:
        """Each middleware that reads team metadata (`pii`'s `metadata.pii`) checks what
        would be stored, so that a policy it cannot use is a 400 now."""
        metadata = args.get("metadata")
        if not metadata:
            return
        for middleware in self.gateway.middlewares:
            check = getattr(middleware, "check_team_metadata", None)
            if check is not None:
                check(metadata)

    async def team_new(self, args: dict[str, Any]) -> dict[str, Any]:
        self._check_team_metadata(args)
        now = self._now()
        info = await create_team(self.store, args, now, self.services.invalidator)
        log.info("admin_team_created", team_id=info.team_id)
        return await self._team_info(info, now)

    async def team_info(self, args: dict[str, Any]) -> dict[str, Any]:
        team_id = args["team_id"]
        info = await self.store.team(team_id)
        if info is None:
            raise ProxyError(404, f"Team '{team_id}' not found.", "invalid_request_error", "not_found", "team_id")
        members = await self.store.list_keys(team_id=team_id, page_size=TEAM_KEYS_SHOWN)
        return {"team_id": team_id, "team_info": await self._team_info(info, self._now()),
                "keys": [k.id for k in members], "keys_truncated": len(members) == TEAM_KEYS_SHOWN}

    async def team_update(self, args: dict[str, Any]) -> dict[str, Any]:
        self._check_team_metadata(args)
        team_id = args.pop("team_id")
        info = await self.store.update_team(team_id, **args)
        await self._publish("team", team_id)
        log.info("admin_team_updated", team_id=team_id, fields=sorted(args))
        return await self._team_info(info, self._now())

    async def team_delete(self, args: dict[str, Any]) -> dict[str, Any]:
        team_ids = list(dict.fromkeys([*args.get("team_ids", ()), *([args["team_id"]] if "team_id" in args else [])]))
        if not team_ids:
            raise errors.invalid_request("Missing required field 'team_ids'.", "team_ids")
        deleted_keys = await delete_teams(self.store, team_ids, self.services.invalidator)
        log.info("admin_teams_deleted", team_ids=team_ids, key_ids=deleted_keys)
        return {"deleted_teams": team_ids, "deleted_keys": deleted_keys}

    # -- subscriptions

    async def _subscription_changed(self, team_id: str) -> None:
        """Drop every replica's cached copy: the subscription middleware's shared one in
        Redis first, then the local ones (the invalidation)."""
        for middleware in self.gateway.middlewares:
            changed = getattr(middleware, "subscription_changed", None)
            if changed is not None:
                await changed(team_id)
        await self._publish("subscription", team_id)

    async def _subscription_info(self, info: SubscriptionInfo, now: datetime) -> dict[str, Any]:
        since, _ = budget_period(info.created_at, info.budget_duration, now)
        if since is None or (info.created_at is not None and since < info.created_at):
            since = info.created_at
        return subscription_view(info, now, await self.store.team_spend(info.team_id, since=since))

    async def _subscription(self, ident: str) -> SubscriptionInfo:
        info = await self.store.subscription(ident)
        if info is None:
            raise ProxyError(404, f"Subscription '{ident}' not found.", "invalid_request_error", "not_found",
                             "subscription_id")
        return info

    async def subscription_new(self, args: dict[str, Any]) -> dict[str, Any]:
        now = self._now()
        await _require_team(self.store, args["team_id"])
        fields = dict(args)
        ident = fields.pop("subscription_id", None) or str(uuid.uuid4())
        info = await self.store.create_subscription(
            SubscriptionInfo(subscription_id=ident, created_at=now, updated_at=now, **fields))
        await self._subscription_changed(info.team_id)  # drops a cached "no subscription"
        log.info("admin_subscription_created", subscription_id=ident, team_id=info.team_id)
        return await self._subscription_info(info, now)

    async def subscription_info(self, args: dict[str, Any]) -> dict[str, Any]:
        if "subscription_id" in args:
            info = await self._subscription(args["subscription_id"])
        elif "team_id" in args:
            info = await self.store.team_subscription(args["team_id"])
            if info is None:
                raise ProxyError(404, f"Team '{args['team_id']}' has no subscription.", "invalid_request_error",
                                 "not_found", "team_id")
        else:
            raise errors.invalid_request("Give 'subscription_id' or 'team_id'.", "subscription_id")
        return await self._subscription_info(info, self._now())

    async def subscription_update(self, args: dict[str, Any]) -> dict[str, Any]:
        ident = args.pop("subscription_id")
        info = await self.store.update_subscription(ident, **args)
        await self._subscription_changed(info.team_id)
        log.info("admin_subscription_updated", subscription_id=ident, team_id=info.team_id, fields=sorted(args))
        return await self._subscription_info(info, self._now())

    async def subscription_delete(self, args: dict[str, Any]) -> dict[str, Any]:
        ids = _subscription_ids(args, None)
        if not ids:
            raise errors.invalid_request("Missing required field 'subscription_ids'.", "subscription_ids")
        missing = [i for i in ids if await self.store.subscription(i) is None]
        if missing:
            raise ProxyError(404, f"Subscription not found: {', '.join(missing)}; nothing was deleted.",
                             "invalid_request_error", "not_found", "subscription_ids")
        deleted = await self.store.delete_subscriptions(ids)
        for info in deleted:
            await self._subscription_changed(info.team_id)
        log.info("admin_subscriptions_deleted", subscription_ids=[d.subscription_id for d in deleted])
        return {"deleted_subscriptions": [d.subscription_id for d in deleted]}

    async def subscription_list(self, args: dict[str, Any]) -> dict[str, Any]:
        page, size = args.get("page") or 1, args.get("page_size") or 100
        found = await self.store.list_subscriptions(args.get("team_id"), page=page, page_size=size + 1)
        now = self._now()
        return {"subscriptions": [subscription_view(info, now) for info in found[:size]], "page": page,
                "page_size": size, "has_more": len(found) > size}

    async def subscription_refresh(self, args: dict[str, Any]) -> dict[str, Any]:
        team_id = args["team_id"]
        refreshers = [m for m in self.gateway.middlewares if hasattr(m, "refresh_subscription")]
        if refreshers:
            info = None
            for middleware in refreshers:
                info = await middleware.refresh_subscription(team_id)
            source = getattr(refreshers[0], "source_name", "db")
        else:  # no subscription middleware here: nothing is cached to refresh but other replicas'
            info, source = await self.store.team_subscription(team_id), "db"
        await self._publish("subscription", team_id)
        log.info("admin_subscription_refreshed", team_id=team_id, found=info is not None, source=source)
        return {"team_id": team_id, "source": source,
                "subscription": None if info is None else subscription_view(info, self._now())}

    # -- spend

    async def spend_logs(self, args: dict[str, Any]) -> list[dict[str, Any]]:
        api_key = args.get("api_key")
        rows = await self.store.spend_logs(
            key_id=None if api_key is None else key_id(api_key), team_id=args.get("team_id"),
            user_id=args.get("user_id"), start=args.get("start_date"), end=args.get("end_date"),
            page=args.get("page") or 1, page_size=args.get("page_size") or 100)
        return [spend_view(row) for row in rows]

    # -- audit

    async def audit_logs(self, args: dict[str, Any]) -> list[dict[str, Any]]:
        rows = await self.store.audit_logs(
            action=args.get("action"), target_id=args.get("target_id"), actor=args.get("actor"),
            start=args.get("start_date"), end=args.get("end_date"), page=args.get("page") or 1,
            page_size=args.get("page_size") or 100)
        return [audit_view(row) for row in rows]


# ---------------------------------------------------------------------------- plumbing


def _query(request: web.BaseRequest) -> dict[str, str]:
    query = request.query
    data: dict[str, str] = {}
    for name in query:
        values = query.getall(name)
        if len(values) > 1:
            raise errors.invalid_request(f"'{name[:100]}' is given more than once.", name[:100])
        data[name] = values[0]
    return data


async def _body(request: web.BaseRequest) -> dict[str, Any]:
    raw = await read_bounded(request, MAX_BODY_BYTES)
    if not raw.strip():
        return {}
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise errors.invalid_request(f"The request body is not valid JSON ({exc}).") from None
    if not isinstance(body, dict):
        raise errors.invalid_request("The request body must be a JSON object.")
    return body

