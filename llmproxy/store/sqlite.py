"""`Store` on one SQLite file through aiosqlite, the embedded default (no server needed):
`SqlStore` (sql.py) over `SqliteDialect`.

One connection per store, its calls serialised by an asyncio lock (aiosqlite runs them
on its own thread, so the event loop never blocks on the disk). WAL mode and a busy
timeout let other processes use the file at the same time, e.g. `llmproxy keys create`
while the server runs: readers never wait, a writer waits up to the busy timeout for
another's transaction, then raises StoreUnavailable. Writes take the lock up front
(`BEGIN IMMEDIATE`), so a transaction never fails half way on a lock upgrade.
`synchronous` stays at SQLite's default (FULL): a committed batch survives a power cut.

Column encodings (see migrations/sqlite/0001_init.sql): money as integer nano-dollars
(`*_nanos`), datetimes as integer microseconds since the epoch (`*_at_us`, so range
queries compare integers), booleans 0/1, models and metadata as JSON text.
"""

from __future__ import annotations

import asyncio
import operator
import os
import sqlite3
from contextlib import asynccontextmanager, nullcontext, suppress
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any, AsyncIterator, Callable, Sequence

import aiosqlite
import orjson

from . import schema
from .base import UTC, AlreadyExists, SpendRow, StoreUnavailable
from .sql import SPEND, SPEND_FIELDS, Params, SqlStore

MIGRATE_BUSY_TIMEOUT_MS = 600_000
PRUNE_CHUNK = 10_000
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_US = timedelta(microseconds=1)

# Primary result codes meaning "cannot use the file now" rather than "bad SQL".
_UNAVAILABLE_CODES = {
    sqlite3.SQLITE_BUSY,
    sqlite3.SQLITE_LOCKED,
    sqlite3.SQLITE_NOMEM,
    sqlite3.SQLITE_READONLY,
    sqlite3.SQLITE_IOERR,
    sqlite3.SQLITE_FULL,
    sqlite3.SQLITE_CANTOPEN,
    sqlite3.SQLITE_PROTOCOL,
}
_DUPLICATE = {sqlite3.SQLITE_CONSTRAINT_UNIQUE, sqlite3.SQLITE_CONSTRAINT_PRIMARYKEY}


def _micros(value: datetime) -> int:
    return (value - EPOCH) // _US


def _from_micros(value: int) -> datetime:
    return EPOCH + timedelta(microseconds=value)


def _nanos(value: Decimal) -> int:
    return int(value.scaleb(9))


def _from_nanos(value: int) -> Decimal:
    return Decimal(value).scaleb(-9)


def _json(value: Any) -> str:
    return orjson.dumps(value).decode()


# field -> (column, to the column, from the column); fields not named here are stored as
# is. None is never converted.
_ENCODINGS: dict[str, tuple[str, Callable[[Any], Any], Callable[[Any], Any]]] = {
    "max_budget": ("max_budget_nanos", _nanos, _from_nanos),
    "soft_budget": ("soft_budget_nanos", _nanos, _from_nanos),
    "tags": ("tags", lambda v: _json(list(v)), orjson.loads),
    "spend": ("spend_nanos", _nanos, _from_nanos),
    "expires_at": ("expires_at_us", _micros, _from_micros),
    "created_at": ("created_at_us", _micros, _from_micros),
    "updated_at": ("updated_at_us", _micros, _from_micros),
    "started_at": ("started_at_us", _micros, _from_micros),
    "at": ("at_us", _micros, _from_micros),
    "models": ("models", lambda v: _json(list(v)), orjson.loads),
    "metadata": ("metadata", _json, orjson.loads),
    "changes": ("changes", lambda v: _json(list(v)), orjson.loads),
    "blocked": ("blocked", int, bool),
    "enabled": ("enabled", int, bool),
    "limits": ("limits", _json, orjson.loads),
    "tokens_estimated": ("tokens_estimated", int, bool),
    "cache_hit": ("cache_hit", int, bool),
    "unpriced": ("unpriced", int, bool),
}
_DECODERS = {column: (name, decode) for name, (column, _, decode) in _ENCODINGS.items()}


def _column(field: str) -> str:
    return _ENCODINGS[field][0] if field in _ENCODINGS else field


# write_spend is the busiest write: the per-field encoders are looked up once here.
_SPEND_ENCODERS = [(i, _ENCODINGS[name][1]) for i, name in enumerate(SPEND_FIELDS) if name in _ENCODINGS]
_spend_values = operator.attrgetter(*SPEND_FIELDS)
_INSERT_SPEND = (
    f"INSERT INTO {SPEND} ({', '.join(map(_column, SPEND_FIELDS))})"
    f" VALUES ({', '.join('?' * len(SPEND_FIELDS))}) ON CONFLICT (request_id) DO NOTHING"
)


def split_statements(sql: str) -> list[str]:
    """A script's statements, split where SQLite itself says one is complete (so a `;`
    inside a string, a comment or a trigger body does not split)."""
    statements, start = [], 0
    for end, char in enumerate(sql):
        if char == ";" and sqlite3.complete_statement(sql[start : end + 1]):
            statement = sql[start : end + 1].strip()
            if statement.strip(";").strip():
                statements.append(statement)
            start = end + 1
    rest = [line for line in sql[start:].splitlines() if line.strip() and not line.strip().startswith("--")]
    if rest:
        raise ValueError(f"incomplete SQL statement at the end: {rest[0][:60]!r}")
    return statements


@asynccontextmanager
async def _transaction(db: aiosqlite.Connection) -> AsyncIterator[None]:
    """BEGIN IMMEDIATE (the write lock up front, waiting up to the busy timeout) ... COMMIT;
    ROLLBACK when the block raises."""
    await db.execute("BEGIN IMMEDIATE")
    try:
        yield
        await db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            with suppress(sqlite3.Error):
                await db.execute("ROLLBACK")
        raise


async def _set_wal(db: aiosqlite.Connection, busy_timeout_ms: int) -> str:
    """Switch to WAL. The switch needs the file to itself and SQLite answers "database is
    locked" at once (its busy handler does not wait for it) while another connection opening
    at the same moment holds a lock: retry within the busy timeout."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + busy_timeout_ms / 1000
    delay = 0.005
    while True:
        try:
            async with db.execute("PRAGMA journal_mode = WAL") as cursor:
                (mode,) = await cursor.fetchone()
            return mode
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or loop.time() + delay > deadline:
                raise
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.1)


class SqliteDialect:
    """aiosqlite's side of `Dialect`: the store's one connection, taken in turn."""

    def __init__(self, db: aiosqlite.Connection, path: str) -> None:
        self.db: aiosqlite.Connection | None = db
        self.path = path
        self._lock = asyncio.Lock()

    @property
    def prune_chunk(self) -> int:
        return PRUNE_CHUNK

    def param(self, n: int) -> str:
        return "?"

    def column(self, field: str) -> str:
        return _column(field)

    def encode(self, field: str, value: Any) -> Any:
        return _ENCODINGS[field][1](value) if field in _ENCODINGS and value is not None else value

    def decode(self, row: sqlite3.Row) -> dict[str, Any]:
        values = {}
        for column in row.keys():
            name, decode = _DECODERS.get(column, (column, None))
            value = row[column]
            values[name] = decode(value) if decode is not None and value is not None else value
        return values

    def in_list(self, column: str, values: Sequence[str], params: Params) -> str:
        return f"{column} IN (SELECT value FROM json_each({params.add(_json(list(values)))}))"

    @asynccontextmanager
    async def connection(self, *, write: bool = False) -> AsyncIterator[aiosqlite.Connection]:
        """The connection, alone; in a write transaction when `write`. SQLite's "cannot use
        the file now" raises StoreUnavailable, a duplicate key AlreadyExists."""
        async with self._lock:
            if self.db is None:
                raise StoreUnavailable("the store is closed")
            try:
                async with _transaction(self.db) if write else nullcontext():
                    yield self.db
            except sqlite3.OperationalError as exc:
                code = getattr(exc, "sqlite_errorcode", None)
                if code is not None and code & 0xFF in _UNAVAILABLE_CODES:
                    raise StoreUnavailable(f"SQLite database {self.path}: {exc}") from exc
                raise
            except sqlite3.IntegrityError as exc:
                if exc.sqlite_errorcode not in _DUPLICATE:
                    raise
                raise AlreadyExists(str(exc)) from exc

    async def fetch(self, sql: str, args: Sequence[Any] = (), *, write: bool = False) -> list[sqlite3.Row]:
        async with self.connection(write=write) as db:
            return list(await db.execute_fetchall(sql, args))

    async def execute(self, sql: str, args: Sequence[Any] = (), *, write: bool = False) -> int:
        async with self.connection(write=write) as db:
            async with db.execute(sql, args) as cursor:
                return cursor.rowcount

    async def insert_spend(self, rows: Sequence[SpendRow]) -> int:
        values = []
        for row in rows:
            fields = list(_spend_values(row))
            for i, encode in _SPEND_ENCODERS:
                value = fields[i]
                if value is not None:
                    fields[i] = encode(value)
            values.append(fields)
        async with self.connection(write=True) as db:
            async with db.executemany(_INSERT_SPEND, values) as cursor:
                return cursor.rowcount

    async def close(self) -> None:
        async with self._lock:
            db, self.db = self.db, None
        if db is not None:
            await db.close()


class SqliteStore(SqlStore):
    _d: SqliteDialect

    def __init__(self, dialect: SqliteDialect, busy_timeout_ms: int, journal_mode: str) -> None:
        super().__init__(dialect)
        self._busy_timeout_ms = busy_timeout_ms
        self.journal_mode = journal_mode  # "wal" for a file; "memory" for ":memory:"

    @classmethod
    async def open(cls, path: str = "./llmproxy.db", *, busy_timeout_ms: int = 5000) -> "SqliteStore":
        """Open (creating it, mode 0600: it holds key hashes) the database file at `path`.
        StoreUnavailable when it cannot be opened."""
        db = None
        try:
            if path != ":memory:":
                os.close(os.open(path, os.O_CREAT | os.O_RDWR, 0o600))
            pending = aiosqlite.connect(path, isolation_level=None)
            # aiosqlite's worker thread is not a daemon: one store left unclosed would keep
            # the interpreter from exiting. SQLite in WAL mode survives an abrupt end.
            pending._thread.daemon = True
            db = await pending
            db.row_factory = sqlite3.Row
            await db.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
            await db.execute("PRAGMA foreign_keys = ON")
            mode = await _set_wal(db, busy_timeout_ms)
        except (OSError, sqlite3.Error) as exc:
            if db is not None:
                with suppress(Exception):
                    await db.close()
            raise StoreUnavailable(f"SQLite database {path} cannot be opened: {exc}") from exc
        return cls(SqliteDialect(db, path), busy_timeout_ms, str(mode).lower())

    async def migrate(self) -> list[str]:
        applied: list[str] = []
        async with self._d.connection() as db:
            # Another process may hold the write lock for a whole migration: wait longer.
            await db.execute(f"PRAGMA busy_timeout = {MIGRATE_BUSY_TIMEOUT_MS}")
            try:
                async with _transaction(db):
                    await db.execute(
                        "CREATE TABLE IF NOT EXISTS llmproxy_schema_migrations ("
                        " version TEXT PRIMARY KEY NOT NULL, applied_at_us INTEGER NOT NULL) STRICT"
                    )
                for migration in schema.migrations("sqlite"):
                    async with _transaction(db):
                        if await db.execute_fetchall(
                            "SELECT 1 FROM llmproxy_schema_migrations WHERE version = ?", (migration.version,)
                        ):
                            continue
                        for statement in split_statements(migration.sql):
                            await db.execute(statement)
                        await db.execute(
                            "INSERT INTO llmproxy_schema_migrations (version, applied_at_us) VALUES (?, ?)",
                            (migration.version, _micros(datetime.now(UTC))),
                        )
                    applied.append(migration.version)
            finally:
                await db.execute(f"PRAGMA busy_timeout = {self._busy_timeout_ms}")
        return applied
