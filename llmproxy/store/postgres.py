"""`Store` on PostgreSQL through an asyncpg pool: `SqlStore` (sql.py) over `PostgresDialect`.

Every call is bounded: connecting and acquiring a pooled connection by `timeout`, each
statement by the pool's `command_timeout` (migrations get `MIGRATE_TIMEOUT`). Losing the
server, a timeout or a closed store raises `StoreUnavailable`; the pool replaces broken
connections by itself, so calls succeed again once the server is back.

Columns are the fields' own names and native types (NUMERIC, TIMESTAMPTZ, BOOLEAN,
TEXT[] for models); metadata is JSONB, bound and read as JSON text.
"""

from __future__ import annotations

import asyncio
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from operator import attrgetter
from typing import Any, AsyncIterator, Sequence
from urllib.parse import urlsplit

import asyncpg
import orjson

from . import schema
from .base import AlreadyExists, SpendRow, StoreError, StoreUnavailable
from .sql import SPEND, SPEND_FIELDS, Params, SqlStore

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

_SPEND_TYPES = {
    "request_id": "text", "started_at": "timestamptz", "client_request_id": "text",
    "key_id": "text", "team_id": "text", "user_id": "text", "model": "text",
    "deployment": "text", "prompt_tokens": "int8", "completion_tokens": "int8",
    "tokens_estimated": "bool", "spend": "numeric", "status": "int4",
    "duration_ms": "float8", "ttfb_ms": "float8", "cache_hit": "bool", "served_model": "text",
    "trace_id": "text", "unpriced": "bool",
}  # fmt: skip
# One round trip per batch: the rows go as one array per column.
_INSERT_SPEND = (
    f"INSERT INTO {SPEND} ({', '.join(SPEND_FIELDS)}) SELECT * FROM unnest("
    + ", ".join(f"${i}::{_SPEND_TYPES[name]}[]" for i, name in enumerate(SPEND_FIELDS, 1))
    + ") ON CONFLICT (request_id) DO NOTHING"
)
_spend_values = attrgetter(*SPEND_FIELDS)
_JSON_FIELDS = frozenset({"metadata", "limits"})
_ARRAY_FIELDS = frozenset({"models", "changes", "tags"})


def where(url: str) -> str:
    """`host:port/database` of a URL: for messages, never with the password."""
    parts = urlsplit(url)
    return f"{parts.hostname or 'localhost'}:{parts.port or 5432}{parts.path or '/'}"


def _describe(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


def _rowcount(status: str) -> int:
    return int(status.rsplit(" ", 1)[1])  # "DELETE <n>", "INSERT 0 <n>"


class PostgresDialect:
    """asyncpg's side of `Dialect`. A single statement is atomic on its own, so `write`
    asks for nothing more than a pooled connection."""

    def __init__(self, pool: asyncpg.Pool, where: str, timeout: float) -> None:
        self.pool: asyncpg.Pool | None = pool
        self.where = where
        self.timeout = timeout

    @property
    def prune_chunk(self) -> int:
        return PRUNE_CHUNK

    def param(self, n: int) -> str:
        return f"${n}"

    def column(self, field: str) -> str:
        return field

    def encode(self, field: str, value: Any) -> Any:
        if value is not None and field in _JSON_FIELDS:
            return orjson.dumps(value).decode()
        if value is not None and field in _ARRAY_FIELDS:
            return list(value)
        return value

    def decode(self, row: asyncpg.Record) -> dict[str, Any]:
        values = dict(row)
        for name in _JSON_FIELDS.intersection(values):
            values[name] = orjson.loads(values[name])
        return values

    def in_list(self, column: str, values: Sequence[str], params: Params) -> str:
        return f"{column} = ANY({params.add(list(values))}::text[])"

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[asyncpg.Connection]:
        """A pooled connection, acquired within the timeout; asyncpg's errors mapped."""
        if self.pool is None:
            raise StoreUnavailable("the store is closed")
        try:
            async with self.pool.acquire(timeout=self.timeout) as conn:
                yield conn
        except _UNAVAILABLE as exc:
            raise StoreUnavailable(f"PostgreSQL unavailable at {self.where}: {_describe(exc)}") from exc
        except asyncpg.UniqueViolationError as exc:
            raise AlreadyExists(_describe(exc)) from exc

    async def fetch(self, sql: str, args: Sequence[Any] = (), *, write: bool = False) -> list[asyncpg.Record]:
        async with self.connection() as conn:
            return await conn.fetch(sql, *args)

    async def execute(self, sql: str, args: Sequence[Any] = (), *, write: bool = False) -> int:
        async with self.connection() as conn:
            return _rowcount(await conn.execute(sql, *args))

    async def insert_spend(self, rows: Sequence[SpendRow]) -> int:
        return await self.execute(_INSERT_SPEND, [list(column) for column in zip(*map(_spend_values, rows))])

    async def close(self) -> None:
        pool, self.pool = self.pool, None
        if pool is None:
            return
        try:
            await asyncio.wait_for(pool.close(), self.timeout)
        except TimeoutError:
            pool.terminate()


class PostgresStore(SqlStore):
    _d: PostgresDialect

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
        return cls(PostgresDialect(pool, at, timeout))

    def _conn(self) -> AbstractAsyncContextManager[asyncpg.Connection]:
        """A pooled connection (an async context manager), for migrate and for tests."""
        return self._d.connection()

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
