"""`Store` on PostgreSQL through an asyncpg pool.

Every call is bounded: connecting and acquiring a pooled connection by `timeout`, each
statement by the pool's `command_timeout` (migrations get `MIGRATE_TIMEOUT`). Losing the
server, a timeout or a closed store raises `StoreUnavailable`; the pool replaces broken
connections by itself, so calls succeed again once the server is back.
"""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager
from dataclasses import fields
from datetime import datetime
from decimal import Decimal
from operator import attrgetter
from typing import Any, AsyncIterator, Sequence
from urllib.parse import urlsplit

import asyncpg
import orjson

from . import schema
from .base import (
    NANO,
    UTC,
    AlreadyExists,
    KeyInfo,
    NotFound,
    SpendRow,
    Store,
    StoreError,
    StoreUnavailable,
    TeamInfo,
    check_key_hash,
    check_page,
    stamped,
    utc,
)

MIGRATE_TIMEOUT = 600.0
MIGRATION_LOCK = int.from_bytes(b"llmproxy", "big")  # pg_advisory_xact_lock key
PRUNE_CHUNK = 10_000

# What "the database cannot be reached now" looks like from asyncpg: socket errors,
# timeouts (connect, acquire, command), lost connections (class 08), shutdown or
# cancellation by the server (57), too many connections / out of resources (53).
_UNAVAILABLE = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.InsufficientResourcesError,
)

_KEY_FIELDS = [f.name for f in fields(KeyInfo)]
_TEAM_FIELDS = [f.name for f in fields(TeamInfo)]
_SPEND_FIELDS = [f.name for f in fields(SpendRow)]
_KEY_SELECT = ", ".join(_KEY_FIELDS)
_TEAM_SELECT = ", ".join(_TEAM_FIELDS)
_SPEND_SELECT = ", ".join(_SPEND_FIELDS)
_SPEND_TYPES = {
    "request_id": "text", "started_at": "timestamptz", "client_request_id": "text",
    "key_id": "text", "team_id": "text", "user_id": "text", "model": "text",
    "deployment": "text", "prompt_tokens": "int8", "completion_tokens": "int8",
    "tokens_estimated": "bool", "spend": "numeric", "status": "int4",
    "duration_ms": "float8", "ttfb_ms": "float8", "cache_hit": "bool",
}  # fmt: skip
# One round trip per batch: the rows go as one array per column.
_INSERT_SPEND = (
    f"INSERT INTO llmproxy_spend_logs ({_SPEND_SELECT}) SELECT * FROM unnest("
    + ", ".join(f"${i}::{_SPEND_TYPES[name]}[]" for i, name in enumerate(_SPEND_FIELDS, 1))
    + ") ON CONFLICT (request_id) DO NOTHING"
)
_spend_values = attrgetter(*_SPEND_FIELDS)


def where(url: str) -> str:
    """`host:port/database` of a URL: for messages, never with the password."""
    parts = urlsplit(url)
    return f"{parts.hostname or 'localhost'}:{parts.port or 5432}{parts.path or '/'}"


def _describe(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


def _encode(name: str, value: Any) -> Any:
    if name == "metadata":
        return orjson.dumps(value).decode()
    if name == "models":
        return list(value)
    return value


def _decode(row: asyncpg.Record) -> dict[str, Any]:
    values = dict(row)
    if "metadata" in values:
        values["metadata"] = orjson.loads(values["metadata"])
    return values


def _spend_filter(
    key_id: str | None, team_id: str | None, user_id: str | None,
    start: datetime | None, end: datetime | None, args: list[Any],
) -> str:  # fmt: skip
    conditions = []
    for column, value in (("key_id", key_id), ("team_id", team_id), ("user_id", user_id)):
        if value is not None:
            args.append(value)
            conditions.append(f"{column} = ${len(args)}")
    for op, value, name in ((">=", start, "start"), ("<", end, "end")):
        if value is not None:
            args.append(utc(value, name))
            conditions.append(f"started_at {op} ${len(args)}")
    return f"WHERE {' AND '.join(conditions)}" if conditions else ""


class PostgresStore(Store):
    def __init__(self, pool: asyncpg.Pool, where: str, timeout: float) -> None:
        self._pool: asyncpg.Pool | None = pool
        self._where = where
        self._timeout = timeout

    @classmethod
    async def open(
        cls,
        url: str,
        *,
        statement_cache: bool = True,
        timeout: float = 5.0,
        min_size: int = 1,
        max_size: int = 10,
    ) -> "PostgresStore":
        """Connect a pool. `statement_cache=False` for PgBouncer in transaction mode.
        StoreUnavailable when the server cannot be reached within `timeout`."""
        at = where(url)
        try:
            pool = await asyncpg.create_pool(
                url,
                min_size=min_size,
                max_size=max_size,
                timeout=timeout,
                command_timeout=timeout,
                statement_cache_size=100 if statement_cache else 0,
                server_settings={"application_name": "llmproxy"},
            )
        except _UNAVAILABLE as exc:
            raise StoreUnavailable(f"PostgreSQL not reachable at {at}: {_describe(exc)}") from exc
        except asyncpg.PostgresError as exc:  # wrong password, no such database...
            raise StoreError(f"PostgreSQL at {at}: {_describe(exc)}") from exc
        return cls(pool, at, timeout)

    @asynccontextmanager
    async def _conn(self) -> AsyncIterator[asyncpg.Connection]:
        if self._pool is None:
            raise StoreUnavailable("the store is closed")
        try:
            async with self._pool.acquire(timeout=self._timeout) as conn:
                yield conn
        except _UNAVAILABLE as exc:
            raise StoreUnavailable(f"PostgreSQL unavailable at {self._where}: {_describe(exc)}") from exc

    # -- lifecycle

    async def migrate(self) -> list[str]:
        applied: list[str] = []
        lock = "SELECT pg_advisory_xact_lock($1)"
        async with self._conn() as conn:
            async with conn.transaction():
                await conn.execute(lock, MIGRATION_LOCK, timeout=MIGRATE_TIMEOUT)
                await conn.execute(
                    "CREATE TABLE IF NOT EXISTS llmproxy_schema_migrations ("
                    " version TEXT PRIMARY KEY, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"
                )
            for migration in schema.migrations("postgresql"):
                async with conn.transaction():
                    await conn.execute(lock, MIGRATION_LOCK, timeout=MIGRATE_TIMEOUT)
                    done = await conn.fetchval(
                        "SELECT 1 FROM llmproxy_schema_migrations WHERE version = $1", migration.version
                    )
                    if done:
                        continue
                    await conn.execute(migration.sql, timeout=MIGRATE_TIMEOUT)
                    await conn.execute(
                        "INSERT INTO llmproxy_schema_migrations (version) VALUES ($1)", migration.version
                    )
                applied.append(migration.version)
        return applied

    async def ping(self) -> None:
        async with self._conn() as conn:
            await conn.fetchval("SELECT 1")

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is None:
            return
        try:
            await asyncio.wait_for(pool.close(), self._timeout)
        except TimeoutError:
            pool.terminate()

    # -- keys and teams

    async def _insert(self, table: str, names: list[str], values: list[Any], select: str) -> asyncpg.Record:
        placeholders = ", ".join(f"${i}" for i in range(1, len(names) + 1))
        sql = f"INSERT INTO {table} ({', '.join(names)}) VALUES ({placeholders}) RETURNING {select}"
        async with self._conn() as conn:
            return await conn.fetchrow(sql, *values)

    async def _update(self, table: str, id_column: str, id: str, updates: dict[str, Any], select: str):
        updates["updated_at"] = datetime.now(UTC)
        args = [_encode(name, value) for name, value in updates.items()]
        sets = ", ".join(f"{name} = ${i}" for i, name in enumerate(updates, 1))
        sql = f"UPDATE {table} SET {sets} WHERE {id_column} = ${len(args) + 1} RETURNING {select}"
        async with self._conn() as conn:
            return await conn.fetchrow(sql, *args, id)

    async def create_key(self, key_hash: str, info: KeyInfo) -> KeyInfo:
        check_key_hash(key_hash)
        info = stamped(info)
        values = [_encode(name, getattr(info, name)) for name in _KEY_FIELDS] + [key_hash]
        try:
            row = await self._insert("llmproxy_keys", _KEY_FIELDS + ["key_hash"], values, _KEY_SELECT)
        except asyncpg.UniqueViolationError:
            raise AlreadyExists(f"key {info.id} already exists") from None
        return KeyInfo(**_decode(row))

    async def _one_key(self, column: str, value: str) -> KeyInfo | None:
        async with self._conn() as conn:
            row = await conn.fetchrow(f"SELECT {_KEY_SELECT} FROM llmproxy_keys WHERE {column} = $1", value)
        return None if row is None else KeyInfo(**_decode(row))

    async def _update_record(self, kind: str, ident: str, updates: dict[str, Any]) -> KeyInfo | TeamInfo | None:
        if kind == "key":
            row = await self._update("llmproxy_keys", "id", ident, updates, _KEY_SELECT)
            return None if row is None else KeyInfo(**_decode(row))
        row = await self._update("llmproxy_teams", "team_id", ident, updates, _TEAM_SELECT)
        return None if row is None else TeamInfo(**_decode(row))

    async def delete_keys(self, ids: Sequence[str]) -> list[str]:
        if not ids:
            return []
        async with self._conn() as conn:
            rows = await conn.fetch("DELETE FROM llmproxy_keys WHERE id = ANY($1::text[]) RETURNING id", list(ids))
        deleted = {row["id"] for row in rows}
        return [id for id in dict.fromkeys(ids) if id in deleted]

    async def list_keys(
        self, team_id: str | None = None, user_id: str | None = None, page: int = 1, page_size: int = 100
    ) -> list[KeyInfo]:
        offset = check_page(page, page_size)
        args: list[Any] = []
        conditions = []
        for column, value in (("team_id", team_id), ("user_id", user_id)):
            if value is not None:
                args.append(value)
                conditions.append(f"{column} = ${len(args)}")
        where_sql = f"WHERE {' AND '.join(conditions)}" if conditions else ""
        sql = (
            f"SELECT {_KEY_SELECT} FROM llmproxy_keys {where_sql} ORDER BY created_at, id"
            f" LIMIT ${len(args) + 1} OFFSET ${len(args) + 2}"
        )
        async with self._conn() as conn:
            rows = await conn.fetch(sql, *args, page_size, offset)
        return [KeyInfo(**_decode(row)) for row in rows]

    async def create_team(self, info: TeamInfo) -> TeamInfo:
        info = stamped(info)
        values = [_encode(name, getattr(info, name)) for name in _TEAM_FIELDS]
        try:
            row = await self._insert("llmproxy_teams", _TEAM_FIELDS, values, _TEAM_SELECT)
        except asyncpg.UniqueViolationError:
            raise AlreadyExists(f"team {info.team_id} already exists") from None
        return TeamInfo(**_decode(row))

    async def team(self, team_id: str) -> TeamInfo | None:
        async with self._conn() as conn:
            row = await conn.fetchrow(f"SELECT {_TEAM_SELECT} FROM llmproxy_teams WHERE team_id = $1", team_id)
        return None if row is None else TeamInfo(**_decode(row))

    async def delete_team(self, team_id: str) -> None:
        async with self._conn() as conn:
            status = await conn.execute("DELETE FROM llmproxy_teams WHERE team_id = $1", team_id)
        if status == "DELETE 0":
            raise NotFound(f"team {team_id} not found")

    async def list_teams(self, page: int = 1, page_size: int = 100) -> list[TeamInfo]:
        offset = check_page(page, page_size)
        async with self._conn() as conn:
            rows = await conn.fetch(
                f"SELECT {_TEAM_SELECT} FROM llmproxy_teams ORDER BY created_at, team_id LIMIT $1 OFFSET $2",
                page_size,
                offset,
            )
        return [TeamInfo(**_decode(row)) for row in rows]

    # -- spend

    async def write_spend(self, rows: Sequence[SpendRow]) -> int:
        if not rows:
            return 0
        columns = [list(column) for column in zip(*map(_spend_values, rows))]
        async with self._conn() as conn:
            status = await conn.execute(_INSERT_SPEND, *columns)
        return int(status.rsplit(" ", 1)[1])  # "INSERT 0 <n>"

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
        offset = check_page(page, page_size)
        args: list[Any] = []
        where_sql = _spend_filter(key_id, team_id, user_id, start, end, args)
        sql = (
            f"SELECT {_SPEND_SELECT} FROM llmproxy_spend_logs {where_sql}"
            f" ORDER BY started_at DESC, request_id DESC LIMIT ${len(args) + 1} OFFSET ${len(args) + 2}"
        )
        async with self._conn() as conn:
            rows = await conn.fetch(sql, *args, page_size, offset)
        return [SpendRow(**dict(row)) for row in rows]

    async def spend_total(
        self, key_id: str | None = None, team_id: str | None = None, since: datetime | None = None
    ) -> Decimal:
        args: list[Any] = []
        where_sql = _spend_filter(key_id, team_id, None, since, None, args)
        async with self._conn() as conn:
            total = await conn.fetchval(f"SELECT COALESCE(SUM(spend), 0) FROM llmproxy_spend_logs {where_sql}", *args)
        return Decimal(total).quantize(NANO)

    async def prune_spend(self, before: datetime) -> int:
        before = utc(before, "before")
        deleted = 0
        while True:
            async with self._conn() as conn:
                status = await conn.execute(
                    "DELETE FROM llmproxy_spend_logs WHERE request_id IN (SELECT request_id"
                    " FROM llmproxy_spend_logs WHERE started_at < $1 LIMIT $2)",
                    before,
                    PRUNE_CHUNK,
                )
            count = int(status.rsplit(" ", 1)[1])
            deleted += count
            if count < PRUNE_CHUNK:
                return deleted
