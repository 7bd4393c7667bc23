"""Keys, teams, subscriptions, the spend log and the audit log: one `Store` interface (base.py), on PostgreSQL or SQLite.

    store = await open_store(config.database_url)   # None: SQLite at ./llmproxy.db
    await store.migrate()
"""

from __future__ import annotations

from .base import (
    AlreadyExists,
    AuditRow,
    KeyInfo,
    NotFound,
    SpendRow,
    Store,
    StoreError,
    StoreUnavailable,
    SubscriptionInfo,
    TeamInfo,
    hash_key,
    mask_key,
)

__all__ = [
    "AlreadyExists",
    "AuditRow",
    "KeyInfo",
    "NotFound",
    "SpendRow",
    "Store",
    "StoreError",
    "StoreUnavailable",
    "SubscriptionInfo",
    "TeamInfo",
    "hash_key",
    "mask_key",
    "open_store",
    "parse_database_url",
]


async def open_store(
    database_url: str | None, *, sqlite_path: str = "./llmproxy.db", statement_cache: bool = True
) -> Store:
    """The store for `database_url`: `postgresql://` or `postgres://` -> PostgreSQL (an
    asyncpg pool; `statement_cache=False` for PgBouncer in transaction mode); None -> SQLite
    at `sqlite_path`; `sqlite:///path` -> SQLite at `path` (`sqlite:////abs/path` for an
    absolute one). Another scheme: ValueError naming it. StoreUnavailable when the
    database cannot be reached. Does not migrate: call `store.migrate()`."""
    kind, where = parse_database_url(database_url)
    if kind == "postgresql":
        from .postgres import PostgresStore

        return await PostgresStore.open(where, statement_cache=statement_cache)
    from .sqlite import SqliteStore

    return await SqliteStore.open(sqlite_path if where is None else where)


def parse_database_url(database_url: str | None) -> tuple[str, str | None]:
    """("postgresql", the URL) or ("sqlite", the file's path; None: the default path);
    ValueError naming what is wrong (check-config reports it before anything starts)."""
    if database_url is None:
        return "sqlite", None
    scheme, sep, rest = database_url.partition("://")
    scheme = scheme.lower()
    if sep and scheme in ("postgresql", "postgres"):
        return "postgresql", database_url
    if sep and scheme == "sqlite":
        if not rest.startswith("/") or len(rest) < 2:
            raise ValueError("database_url: a SQLite URL looks like sqlite:///path/to/file.db")
        return "sqlite", rest[1:]
    shown = (scheme if sep else database_url.split(":", 1)[0])[:32]
    raise ValueError(
        f"database_url: unsupported scheme {shown!r}; use postgresql://..., sqlite:///path, or leave it unset for SQLite"
    )
