"""The one implementation of the `Store` records (keys, teams, subscriptions, the spend and audit logs) in SQL, over
a `Dialect`: the little that PostgreSQL (postgres.py) and SQLite (sqlite.py) really do
differently. Opening, migrating and closing stay with each backend.

Every statement here is written once. A value goes into SQL only through `Params` (so
the dialect writes the placeholder) and a field's column only through `Dialect.column`
(SQLite keeps `started_at` in `started_at_us`), then `Dialect.encode`/`decode` turn
field values into what the column holds and back.
"""

from __future__ import annotations

from dataclasses import fields
from datetime import datetime
from decimal import Decimal
from typing import Any, Callable, Protocol, Sequence

from .base import (
    NANO,
    UTC,
    AlreadyExists,
    AuditRow,
    KeyInfo,
    NotFound,
    SpendRow,
    Store,
    SubscriptionInfo,
    TeamInfo,
    check_key_hash,
    check_page,
    stamped,
    utc,
)

KEYS = "llmproxy_keys"
TEAMS = "llmproxy_teams"
SPEND = "llmproxy_spend_logs"
AUDIT = "llmproxy_audit_log"
SUBSCRIPTIONS = "llmproxy_subscriptions"
KEY_FIELDS = tuple(f.name for f in fields(KeyInfo))
TEAM_FIELDS = tuple(f.name for f in fields(TeamInfo))
SPEND_FIELDS = tuple(f.name for f in fields(SpendRow))
AUDIT_FIELDS = tuple(f.name for f in fields(AuditRow))
SUBSCRIPTION_FIELDS = tuple(f.name for f in fields(SubscriptionInfo))
# kind -> (record class, table, id column) of the records `_update_record` changes
_RECORDS = {"key": (KeyInfo, KEYS, "id"), "team": (TeamInfo, TEAMS, "team_id"),
            "subscription": (SubscriptionInfo, SUBSCRIPTIONS, "subscription_id")}


class Dialect(Protocol):
    """What differs between the databases. `fetch`, `execute` and `insert_spend` each take
    a connection for one statement and give it back; they raise StoreUnavailable when the
    database cannot be used now (closed store included) and AlreadyExists on a duplicate
    unique key (the caller words the message)."""

    prune_chunk: int  # rows deleted per statement by prune_spend

    def param(self, n: int) -> str:
        """The n-th (1-based) bind parameter: `$1` or `?`."""

    def column(self, field: str) -> str:
        """The column holding `field`; a name that is no field is its own column."""

    def encode(self, field: str, value: Any) -> Any:
        """`value` of `field` as the driver binds it to the column (None stays None)."""

    def decode(self, row: Any) -> dict[str, Any]:
        """A fetched row as field -> value: the inverse of `column` and `encode`."""

    def in_list(self, column: str, values: Sequence[str], params: "Params") -> str:
        """A condition true when `column` equals one of `values`, bound as one parameter."""

    async def fetch(self, sql: str, args: Sequence[Any] = (), *, write: bool = False) -> list[Any]:
        """The rows of one statement; `write`: in a write transaction."""

    async def execute(self, sql: str, args: Sequence[Any] = (), *, write: bool = False) -> int:
        """Run one statement; how many rows it changed."""

    async def insert_spend(self, rows: Sequence[SpendRow]) -> int:
        """Insert rows (not empty) in one round trip and one transaction, skipping request ids
        already stored; how many were new."""

    async def close(self) -> None:
        """Release the connections; idempotent."""


class Params(list):
    """The bind values of a statement being built, in order."""

    def __init__(self, dialect: Dialect) -> None:
        super().__init__()
        self._dialect = dialect

    def add(self, value: Any) -> str:
        """Bind `value` as is; returns its placeholder."""
        self.append(value)
        return self._dialect.param(len(self))

    def field(self, name: str, value: Any) -> str:
        """Bind `value` of field `name`, encoded for its column; returns its placeholder."""
        return self.add(self._dialect.encode(name, value))

    def where(self, *conditions: tuple[str, str, Any]) -> str:
        """`WHERE` over the (field, operator, value) conditions whose value is not None, ANDed."""
        column = self._dialect.column
        sql = [f"{column(name)} {op} {self.field(name, value)}" for name, op, value in conditions if value is not None]
        return f"WHERE {' AND '.join(sql)}" if sql else ""


def _utc(value: datetime | None, name: str) -> datetime | None:
    return None if value is None else utc(value, name)


class SqlStore(Store):
    """`Store` in SQL over `dialect`; a backend subclass adds `open` and `migrate`."""

    def __init__(self, dialect: Dialect) -> None:
        self._d = dialect
        select = lambda names: ", ".join(map(dialect.column, names))  # noqa: E731
        self._key_select = select(KEY_FIELDS)
        self._team_select = select(TEAM_FIELDS)
        self._spend_select = select(SPEND_FIELDS)
        self._audit_select = select(AUDIT_FIELDS)
        self._subscription_select = select(SUBSCRIPTION_FIELDS)
        self._selects = {"key": self._key_select, "team": self._team_select,
                         "subscription": self._subscription_select}

    async def ping(self) -> None:
        await self._d.fetch("SELECT 1")

    async def close(self) -> None:
        await self._d.close()

    async def _insert(self, table: str, values: dict[str, Any], returning: str) -> Any:
        params = Params(self._d)
        columns = ", ".join(map(self._d.column, values))
        placeholders = ", ".join(params.field(name, value) for name, value in values.items())
        sql = f"INSERT INTO {table} ({columns}) VALUES ({placeholders}) RETURNING {returning}"
        return (await self._d.fetch(sql, params, write=True))[0]

    async def _select(self, make: Callable[..., Any], sql: str, params: Sequence[Any]) -> list[Any]:
        return [make(**self._d.decode(row)) for row in await self._d.fetch(sql, params)]

    # -- keys and teams

    async def create_key(self, key_hash: str, info: KeyInfo) -> KeyInfo:
        check_key_hash(key_hash)
        info = stamped(info)
        values = {name: getattr(info, name) for name in KEY_FIELDS} | {"key_hash": key_hash}
        try:
            row = await self._insert(KEYS, values, self._key_select)
        except AlreadyExists:
            raise AlreadyExists(f"key {info.id} already exists") from None
        return KeyInfo(**self._d.decode(row))

    async def _one_key(self, column: str, value: str) -> KeyInfo | None:
        params = Params(self._d)
        found = await self._select(
            KeyInfo, f"SELECT {self._key_select} FROM {KEYS} WHERE {column} = {params.add(value)}", params
        )
        return found[0] if found else None

    async def _update_record(self, kind: str, ident: str,
                             updates: dict[str, Any]) -> KeyInfo | TeamInfo | SubscriptionInfo | None:
        make, table, id_column = _RECORDS[kind]
        select = self._selects[kind]
        params = Params(self._d)
        updates = updates | {"updated_at": datetime.now(UTC)}
        sets = ", ".join(f"{self._d.column(name)} = {params.field(name, value)}" for name, value in updates.items())
        sql = f"UPDATE {table} SET {sets} WHERE {id_column} = {params.add(ident)} RETURNING {select}"
        rows = await self._d.fetch(sql, params, write=True)
        return make(**self._d.decode(rows[0])) if rows else None

    async def delete_keys(self, ids: Sequence[str]) -> list[str]:
        unique = list(dict.fromkeys(ids))
        if not unique:
            return []
        params = Params(self._d)
        sql = f"DELETE FROM {KEYS} WHERE {self._d.in_list('id', unique, params)} RETURNING id"
        deleted = {row[0] for row in await self._d.fetch(sql, params, write=True)}
        return [id for id in unique if id in deleted]

    async def list_keys(
        self, team_id: str | None = None, user_id: str | None = None, page: int = 1, page_size: int = 100
    ) -> list[KeyInfo]:
        offset = check_page(page, page_size)
        params = Params(self._d)
        where = params.where(("team_id", "=", team_id), ("user_id", "=", user_id))
        sql = (
            f"SELECT {self._key_select} FROM {KEYS} {where} ORDER BY {self._d.column('created_at')}, id"
            f" LIMIT {params.add(page_size)} OFFSET {params.add(offset)}"
        )
        return await self._select(KeyInfo, sql, params)

    async def count_keys(self, team_id: str | None = None, user_id: str | None = None) -> int:
        params = Params(self._d)
        where = params.where(("team_id", "=", team_id), ("user_id", "=", user_id))
        rows = await self._d.fetch(f"SELECT COUNT(*) FROM {KEYS} {where}", params)
        return int(rows[0][0])

    async def create_team(self, info: TeamInfo) -> TeamInfo:
        info = stamped(info)
        try:
            row = await self._insert(TEAMS, {name: getattr(info, name) for name in TEAM_FIELDS}, self._team_select)
        except AlreadyExists:
            raise AlreadyExists(f"team {info.team_id} already exists") from None
        return TeamInfo(**self._d.decode(row))

    async def team(self, team_id: str) -> TeamInfo | None:
        params = Params(self._d)
        found = await self._select(
            TeamInfo, f"SELECT {self._team_select} FROM {TEAMS} WHERE team_id = {params.add(team_id)}", params
        )
        return found[0] if found else None

    async def delete_team(self, team_id: str) -> None:
        params = Params(self._d)
        sql = f"DELETE FROM {TEAMS} WHERE team_id = {params.add(team_id)}"
        if not await self._d.execute(sql, params, write=True):
            raise NotFound(f"team {team_id} not found")

    async def list_teams(self, page: int = 1, page_size: int = 100) -> list[TeamInfo]:
        offset = check_page(page, page_size)
        params = Params(self._d)
        sql = (
            f"SELECT {self._team_select} FROM {TEAMS} ORDER BY {self._d.column('created_at')}, team_id"
            f" LIMIT {params.add(page_size)} OFFSET {params.add(offset)}"
        )
        return await self._select(TeamInfo, sql, params)

    # -- subscriptions

    async def create_subscription(self, info: SubscriptionInfo) -> SubscriptionInfo:
        info = stamped(info)
        values = {name: getattr(info, name) for name in SUBSCRIPTION_FIELDS}
        try:
            row = await self._insert(SUBSCRIPTIONS, values, self._subscription_select)
        except AlreadyExists:
            raise AlreadyExists(f"subscription {info.subscription_id} or one for team {info.team_id} "
                                "already exists") from None
        return SubscriptionInfo(**self._d.decode(row))

    async def _subscriptions(self, column: str, value: str) -> list[SubscriptionInfo]:
        params = Params(self._d)
        sql = f"SELECT {self._subscription_select} FROM {SUBSCRIPTIONS} WHERE {column} = {params.add(value)}"
        return await self._select(SubscriptionInfo, sql, params)

    async def subscription(self, subscription_id: str) -> SubscriptionInfo | None:
        found = await self._subscriptions("subscription_id", subscription_id)
        return found[0] if found else None

    async def team_subscription(self, team_id: str) -> SubscriptionInfo | None:
        found = await self._subscriptions("team_id", team_id)
        return found[0] if found else None

    async def delete_subscriptions(self, ids: Sequence[str]) -> list[SubscriptionInfo]:
        unique = list(dict.fromkeys(ids))
        if not unique:
            return []
        params = Params(self._d)
        sql = (f"DELETE FROM {SUBSCRIPTIONS} WHERE {self._d.in_list('subscription_id', unique, params)}"
               f" RETURNING {self._subscription_select}")
        deleted = {s.subscription_id: s for s in await self._select(SubscriptionInfo, sql, params)}
        return [deleted[i] for i in unique if i in deleted]

    async def list_subscriptions(self, team_id: str | None = None, page: int = 1,
                                 page_size: int = 100) -> list[SubscriptionInfo]:
        offset = check_page(page, page_size)
        params = Params(self._d)
        where = params.where(("team_id", "=", team_id))
        sql = (
            f"SELECT {self._subscription_select} FROM {SUBSCRIPTIONS} {where}"
            f" ORDER BY {self._d.column('created_at')}, subscription_id"
            f" LIMIT {params.add(page_size)} OFFSET {params.add(offset)}"
        )
        return await self._select(SubscriptionInfo, sql, params)

    # -- spend

    async def write_spend(self, rows: Sequence[SpendRow]) -> int:
        return await self._d.insert_spend(rows) if rows else 0

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
        params = Params(self._d)
        where = params.where(
            ("key_id", "=", key_id), ("team_id", "=", team_id), ("user_id", "=", user_id),
            ("started_at", ">=", _utc(start, "start")), ("started_at", "<", _utc(end, "end")),
        )  # fmt: skip
        sql = (
            f"SELECT {self._spend_select} FROM {SPEND} {where}"
            f" ORDER BY {self._d.column('started_at')} DESC, request_id DESC"
            f" LIMIT {params.add(page_size)} OFFSET {params.add(offset)}"
        )
        return await self._select(SpendRow, sql, params)

    async def spend_total(
        self, key_id: str | None = None, team_id: str | None = None, since: datetime | None = None
    ) -> Decimal:
        params = Params(self._d)
        where = params.where(
            ("key_id", "=", key_id), ("team_id", "=", team_id), ("started_at", ">=", _utc(since, "start"))
        )
        spend = self._d.column("spend")  # the sum is named like the column, so it decodes like it
        rows = await self._d.fetch(f"SELECT COALESCE(SUM({spend}), 0) AS {spend} FROM {SPEND} {where}", params)
        return self._d.decode(rows[0])["spend"].quantize(NANO)

    async def prune_spend(self, before: datetime) -> int:
        cutoff = self._d.encode("started_at", utc(before, "before"))
        chunk = self._d.prune_chunk
        params = Params(self._d)
        sql = (
            f"DELETE FROM {SPEND} WHERE request_id IN (SELECT request_id FROM {SPEND}"
            f" WHERE {self._d.column('started_at')} < {params.add(cutoff)} LIMIT {params.add(chunk)})"
        )
        deleted = 0
        while True:  # one transaction per chunk: no long lock
            count = await self._d.execute(sql, params, write=True)
            deleted += count
            if count < chunk:
                return deleted

    # -- audit log

    async def write_audit(self, row: AuditRow) -> int:
        values = {name: getattr(row, name) for name in AUDIT_FIELDS if name != "id"}
        return (await self._insert(AUDIT, values, "id"))[0]

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
        offset = check_page(page, page_size)
        params = Params(self._d)
        where = params.where(
            ("action", "=", action), ("target_id", "=", target_id), ("actor", "=", actor),
            ("at", ">=", _utc(start, "start")), ("at", "<", _utc(end, "end")),
        )  # fmt: skip
        sql = (
            f"SELECT {self._audit_select} FROM {AUDIT} {where} ORDER BY {self._d.column('at')} DESC, id DESC"
            f" LIMIT {params.add(page_size)} OFFSET {params.add(offset)}"
        )
        return await self._select(AuditRow, sql, params)
