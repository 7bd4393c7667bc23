"""`Store` on one SQLite file through aiosqlite: the embedded default, no server needed.

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
import os
import operator
import sqlite3
from contextlib import asynccontextmanager, suppress
from dataclasses import fields
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any, AsyncIterator, Callable, Sequence

import aiosqlite
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
    StoreUnavailable,
    TeamInfo,
    check_key_hash,
    check_page,
    stamped,
    utc,
)

MIGRATE_BUSY_TIMEOUT_MS = 600_000
PRUNE_CHUNK = 10_000
_DELETE_CHUNK = 500  # ids per statement, well under SQLite's bound-parameter limit
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


def _micros(value: datetime | None) -> int | None:
    return None if value is None else (value - EPOCH) // _US


def _from_micros(value: int | None) -> datetime | None:
    return None if value is None else EPOCH + timedelta(microseconds=value)


def _nanos(value: Decimal | None) -> int | None:
    return None if value is None else int(value.scaleb(9))


def _from_nanos(value: int | None) -> Decimal | None:
    return None if value is None else Decimal(value).scaleb(-9)


def _json(value: Any) -> str:
    return orjson.dumps(value).decode()


# field -> (column, to the column, from the column); fields not named here are stored as is.
_ENCODINGS: dict[str, tuple[str, Callable[[Any], Any], Callable[[Any], Any]]] = {
    "max_budget": ("max_budget_nanos", _nanos, _from_nanos),
    "spend": ("spend_nanos", _nanos, _from_nanos),
    "expires_at": ("expires_at_us", _micros, _from_micros),
    "created_at": ("created_at_us", _micros, _from_micros),
    "updated_at": ("updated_at_us", _micros, _from_micros),
    "started_at": ("started_at_us", _micros, _from_micros),
    "models": ("models", lambda v: _json(list(v)), orjson.loads),
    "metadata": ("metadata", _json, orjson.loads),
    "blocked": ("blocked", int, bool),
    "tokens_estimated": ("tokens_estimated", int, bool),
    "cache_hit": ("cache_hit", int, bool),
}
_DECODERS = {column: (name, decode) for name, (column, _, decode) in _ENCODINGS.items()}


def _column(name: str) -> str:
    return _ENCODINGS[name][0] if name in _ENCODINGS else name


def _encode(name: str, value: Any) -> Any:
    return _ENCODINGS[name][1](value) if name in _ENCODINGS and value is not None else value


def _decode(row: sqlite3.Row) -> dict[str, Any]:
    values = {}
    for column in row.keys():
        name, decode = _DECODERS.get(column, (column, None))
        value = row[column]
        values[name] = decode(value) if decode is not None and value is not None else value
    return values


_KEY_FIELDS = [f.name for f in fields(KeyInfo)]
_TEAM_FIELDS = [f.name for f in fields(TeamInfo)]
_SPEND_FIELDS = [f.name for f in fields(SpendRow)]
_KEY_SELECT = ", ".join(map(_column, _KEY_FIELDS))
_TEAM_SELECT = ", ".join(map(_column, _TEAM_FIELDS))
_SPEND_SELECT = ", ".join(map(_column, _SPEND_FIELDS))
# write_spend is the busiest write: the per-field encoders are looked up once here.
_SPEND_ENCODERS = [_ENCODINGS[name][1] if name in _ENCODINGS else None for name in _SPEND_FIELDS]
attrgetter_spend = operator.attrgetter(*_SPEND_FIELDS)
_INSERT_SPEND = (
    f"INSERT INTO llmproxy_spend_logs ({_SPEND_SELECT}) VALUES ({', '.join('?' * len(_SPEND_FIELDS))})"
    " ON CONFLICT (request_id) DO NOTHING"
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


def _spend_filter(
    key_id: str | None, team_id: str | None, user_id: str | None,
    start: datetime | None, end: datetime | None, args: list[Any],
) -> str:  # fmt: skip
    conditions = []
    for column, value in (("key_id", key_id), ("team_id", team_id), ("user_id", user_id)):
        if value is not None:
            args.append(value)
            conditions.append(f"{column} = ?")
    for op, value, name in ((">=", start, "start"), ("<", end, "end")):
        if value is not None:
            args.append(_micros(utc(value, name)))
            conditions.append(f"started_at_us {op} ?")
    return f"WHERE {' AND '.join(conditions)}" if conditions else ""


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


class SqliteStore(Store):
    def __init__(self, db: aiosqlite.Connection, path: str, busy_timeout_ms: int, journal_mode: str) -> None:
        self._db: aiosqlite.Connection | None = db
        self._path = path
        self._busy_timeout_ms = busy_timeout_ms
        self._lock = asyncio.Lock()
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
        return cls(db, path, busy_timeout_ms, str(mode).lower())

    @asynccontextmanager
    async def _use(self) -> AsyncIterator[aiosqlite.Connection]:
        """The connection, alone, with SQLite's "cannot use the file now" as StoreUnavailable."""
        async with self._lock:
            if self._db is None:
                raise StoreUnavailable("the store is closed")
            try:
                yield self._db
            except sqlite3.OperationalError as exc:
                code = getattr(exc, "sqlite_errorcode", None)
                if code is not None and code & 0xFF in _UNAVAILABLE_CODES:
                    raise StoreUnavailable(f"SQLite database {self._path}: {exc}") from exc
                raise

    @asynccontextmanager
    async def _write(self) -> AsyncIterator[aiosqlite.Connection]:
        """A write transaction: committed when the block ends, rolled back if it raises."""
        async with self._use() as db, _transaction(db):
            yield db

    async def _fetch(self, sql: str, args: Sequence[Any] = ()) -> list[sqlite3.Row]:
        async with self._use() as db:
            return list(await db.execute_fetchall(sql, args))

    # -- lifecycle

    async def migrate(self) -> list[str]:
        applied: list[str] = []
        async with self._use() as db:
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

    async def ping(self) -> None:
        await self._fetch("SELECT 1")

    async def close(self) -> None:
        async with self._lock:
            db, self._db = self._db, None
        if db is not None:
            await db.close()

    # -- keys and teams

    async def _insert(self, table: str, names: list[str], values: list[Any], select: str) -> sqlite3.Row:
        columns = ", ".join(map(_column, names))
        sql = f"INSERT INTO {table} ({columns}) VALUES ({', '.join('?' * len(names))}) RETURNING {select}"
        async with self._write() as db:
            return (await db.execute_fetchall(sql, values))[0]

    async def _update(self, table: str, id_column: str, id: str, updates: dict[str, Any], select: str):
        updates["updated_at"] = datetime.now(UTC)
        sets = ", ".join(f"{_column(name)} = ?" for name in updates)
        args = [_encode(name, value) for name, value in updates.items()]
        sql = f"UPDATE {table} SET {sets} WHERE {id_column} = ? RETURNING {select}"
        async with self._write() as db:
            rows = await db.execute_fetchall(sql, [*args, id])
        return rows[0] if rows else None

    async def create_key(self, key_hash: str, info: KeyInfo) -> KeyInfo:
        check_key_hash(key_hash)
        info = stamped(info)
        values = [_encode(name, getattr(info, name)) for name in _KEY_FIELDS] + [key_hash]
        try:
            row = await self._insert("llmproxy_keys", _KEY_FIELDS + ["key_hash"], values, _KEY_SELECT)
        except sqlite3.IntegrityError as exc:
            if exc.sqlite_errorcode not in _DUPLICATE:
                raise
            raise AlreadyExists(f"key {info.id} already exists") from None
        return KeyInfo(**_decode(row))

    async def _one_key(self, column: str, value: str) -> KeyInfo | None:
        rows = await self._fetch(f"SELECT {_KEY_SELECT} FROM llmproxy_keys WHERE {column} = ?", (value,))
        return KeyInfo(**_decode(rows[0])) if rows else None

    async def _update_record(self, kind: str, ident: str, updates: dict[str, Any]) -> KeyInfo | TeamInfo | None:
        if kind == "key":
            row = await self._update("llmproxy_keys", "id", ident, updates, _KEY_SELECT)
            return None if row is None else KeyInfo(**_decode(row))
        row = await self._update("llmproxy_teams", "team_id", ident, updates, _TEAM_SELECT)
        return None if row is None else TeamInfo(**_decode(row))

    async def delete_keys(self, ids: Sequence[str]) -> list[str]:
        unique = list(dict.fromkeys(ids))
        deleted: set[str] = set()
        async with self._write() as db:
            for i in range(0, len(unique), _DELETE_CHUNK):
                chunk = unique[i : i + _DELETE_CHUNK]
                sql = f"DELETE FROM llmproxy_keys WHERE id IN ({', '.join('?' * len(chunk))}) RETURNING id"
                deleted.update(row[0] for row in await db.execute_fetchall(sql, chunk))
        return [id for id in unique if id in deleted]

    async def list_keys(
        self, team_id: str | None = None, user_id: str | None = None, page: int = 1, page_size: int = 100
    ) -> list[KeyInfo]:
        offset = check_page(page, page_size)
        args: list[Any] = []
        conditions = []
        for column, value in (("team_id", team_id), ("user_id", user_id)):
            if value is not None:
                args.append(value)
                conditions.append(f"{column} = ?")
        where_sql = f"WHERE {' AND '.join(conditions)}" if conditions else ""
        sql = f"SELECT {_KEY_SELECT} FROM llmproxy_keys {where_sql} ORDER BY created_at_us, id LIMIT ? OFFSET ?"
        return [KeyInfo(**_decode(row)) for row in await self._fetch(sql, [*args, page_size, offset])]

    async def create_team(self, info: TeamInfo) -> TeamInfo:
        info = stamped(info)
        values = [_encode(name, getattr(info, name)) for name in _TEAM_FIELDS]
        try:
            row = await self._insert("llmproxy_teams", _TEAM_FIELDS, values, _TEAM_SELECT)
        except sqlite3.IntegrityError as exc:
            if exc.sqlite_errorcode not in _DUPLICATE:
                raise
            raise AlreadyExists(f"team {info.team_id} already exists") from None
        return TeamInfo(**_decode(row))

    async def team(self, team_id: str) -> TeamInfo | None:
        rows = await self._fetch(f"SELECT {_TEAM_SELECT} FROM llmproxy_teams WHERE team_id = ?", (team_id,))
        return TeamInfo(**_decode(rows[0])) if rows else None

    async def delete_team(self, team_id: str) -> None:
        async with self._write() as db:
            rows = await db.execute_fetchall(
                "DELETE FROM llmproxy_teams WHERE team_id = ? RETURNING team_id", (team_id,)
            )
        if not rows:
            raise NotFound(f"team {team_id} not found")

    async def list_teams(self, page: int = 1, page_size: int = 100) -> list[TeamInfo]:
        offset = check_page(page, page_size)
        rows = await self._fetch(
            f"SELECT {_TEAM_SELECT} FROM llmproxy_teams ORDER BY created_at_us, team_id LIMIT ? OFFSET ?",
            (page_size, offset),
        )
        return [TeamInfo(**_decode(row)) for row in rows]

    # -- spend

    async def write_spend(self, rows: Sequence[SpendRow]) -> int:
        if not rows:
            return 0
        encoders = _SPEND_ENCODERS
        values = [tuple(v if (enc is None or v is None) else enc(v)
                        for v, enc in zip(attrgetter_spend(row), encoders)) for row in rows]
        async with self._write() as db:
            async with db.executemany(_INSERT_SPEND, values) as cursor:
                return cursor.rowcount

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
            " ORDER BY started_at_us DESC, request_id DESC LIMIT ? OFFSET ?"
        )
        return [SpendRow(**_decode(row)) for row in await self._fetch(sql, [*args, page_size, offset])]

    async def spend_total(
        self, key_id: str | None = None, team_id: str | None = None, since: datetime | None = None
    ) -> Decimal:
        args: list[Any] = []
        where_sql = _spend_filter(key_id, team_id, None, since, None, args)
        rows = await self._fetch(f"SELECT COALESCE(SUM(spend_nanos), 0) FROM llmproxy_spend_logs {where_sql}", args)
        return Decimal(rows[0][0]).scaleb(-9).quantize(NANO)

    async def prune_spend(self, before: datetime) -> int:
        cutoff = _micros(utc(before, "before"))
        deleted = 0
        while True:  # in chunks, releasing the write lock between them
            async with self._write() as db:
                async with db.execute(
                    "DELETE FROM llmproxy_spend_logs WHERE rowid IN (SELECT rowid"
                    " FROM llmproxy_spend_logs WHERE started_at_us < ? LIMIT ?)",
                    (cutoff, PRUNE_CHUNK),
                ) as cursor:
                    count = cursor.rowcount
            deleted += count
            if count < PRUNE_CHUNK:
                return deleted
