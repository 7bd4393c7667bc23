"""The store contract, run against both implementations: SQLite on a temporary file, and
PostgreSQL on a fresh database per test (created on `LLMPROXY_TEST_DATABASE_URL`'s server,
dropped afterwards). Without a reachable PostgreSQL the postgres cases skip, or fail
under CI=true."""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
import sqlite3
import stat
import threading
import time
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmproxy.store import (
    AlreadyExists,
    AuditRow,
    KeyInfo,
    NotFound,
    SubscriptionInfo,
    SpendRow,
    Store,
    StoreUnavailable,
    TeamInfo,
    hash_key,
    mask_key,
    open_store,
)
from llmproxy.store import postgres as pg_module
from llmproxy.store import sqlite as sqlite_module
from llmproxy.store.schema import DIALECTS, migrations
from llmproxy.store.sqlite import SqliteStore, split_statements

PG_URL = os.environ.get("LLMPROXY_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")
T0 = datetime(2025, 3, 1, 12, 0, tzinfo=timezone.utc)
VERSIONS = [m.version for m in migrations("sqlite")]


def pg_unreachable(error: BaseException) -> None:
    reason = f"PostgreSQL not reachable at {pg_module.where(PG_URL)}: {error!r}"
    if os.environ.get("CI") == "true":
        pytest.fail(reason)
    pytest.skip(reason)


class SqliteBackend:
    name = "sqlite"

    def __init__(self, tmp_path) -> None:
        self.tmp_path = tmp_path
        self.stores: list[Store] = []

    async def new_database(self) -> str:
        return str(self.tmp_path / f"{secrets.token_hex(4)}.db")

    async def open(self, location: str) -> Store:
        store = await open_store(None, sqlite_path=location)
        self.stores.append(store)
        return store

    async def fetch(self, location: str, sql: str) -> list[tuple]:
        with sqlite3.connect(location) as conn:
            return conn.execute(sql).fetchall()

    async def close(self) -> None:
        for store in self.stores:
            await store.close()


class PostgresBackend:
    name = "postgres"

    def __init__(self) -> None:
        self.stores: list[Store] = []
        self.databases: list[str] = []

    async def admin(self) -> asyncpg.Connection:
        try:
            return await asyncpg.connect(PG_URL, timeout=3)
        except (OSError, asyncio.TimeoutError, asyncpg.PostgresError) as exc:
            pg_unreachable(exc)

    async def new_database(self) -> str:
        name = f"llmproxy_test_{secrets.token_hex(6)}"
        admin = await self.admin()
        try:
            await admin.execute(f'CREATE DATABASE "{name}"')
        finally:
            await admin.close()
        self.databases.append(name)
        return urlunsplit(urlsplit(PG_URL)._replace(path=f"/{name}"))

    async def open(self, location: str, **options) -> Store:
        store = await open_store(location, **options)
        self.stores.append(store)
        return store

    async def fetch(self, location: str, sql: str) -> list[tuple]:
        conn = await asyncpg.connect(location, timeout=3)
        try:
            return [tuple(row) for row in await conn.fetch(sql)]
        finally:
            await conn.close()

    async def close(self) -> None:
        for store in self.stores:
            await store.close()
        if self.databases:
            admin = await asyncpg.connect(PG_URL, timeout=3)
            try:
                for name in self.databases:
                    await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            finally:
                await admin.close()


@pytest.fixture(params=["sqlite", "postgres"])
async def backend(request, tmp_path):
    backend = SqliteBackend(tmp_path) if request.param == "sqlite" else PostgresBackend()
    try:
        yield backend
    finally:
        await backend.close()


@pytest.fixture
async def location(backend) -> str:
    return await backend.new_database()


@pytest.fixture
async def store(backend, location) -> Store:
    store = await backend.open(location)
    await store.migrate()
    return store


def key_info(n: int = 1, **fields) -> tuple[str, KeyInfo]:
    """A key's hash and info, as the admin layer would make them (id = the hash)."""
    plaintext = f"sk-test{n:04d}" + "x" * 32
    digest = hash_key(plaintext)
    return digest, KeyInfo(id=digest, key_prefix=mask_key(plaintext), **fields)


def spend_row(n: int, **fields) -> SpendRow:
    values = dict(request_id=f"req-{n:04d}", started_at=T0 + timedelta(seconds=n), status=200, duration_ms=12.5)
    return SpendRow(**(values | fields))


# ---------------------------------------------------------------------------- migrations


def test_every_dialect_has_the_same_versions() -> None:
    assert VERSIONS == ["0001_init", "0002_audit_served_model", "0003_key_tags_soft_budget", "0004_spend_trace_id",
                        "0005_subscriptions", "0006_spend_unpriced"]
    for dialect in DIALECTS:
        assert [m.version for m in migrations(dialect)] == VERSIONS


def test_split_statements_respects_strings_comments_and_triggers() -> None:
    script = """
        -- a comment; with a semicolon
        CREATE TABLE t (a TEXT DEFAULT ';');
        CREATE TRIGGER tr AFTER INSERT ON t BEGIN UPDATE t SET a = 'x;y'; END;
        INSERT INTO t VALUES ('1'); INSERT INTO t VALUES ('2');
        -- trailing comment
    """
    statements = split_statements(script)
    assert len(statements) == 4
    assert statements[1].startswith("CREATE TRIGGER") and statements[1].endswith("END;")
    with pytest.raises(ValueError, match="incomplete"):
        split_statements("CREATE TABLE t (a TEXT); SELECT 1")


async def test_migrate_applies_each_version_once(backend, location) -> None:
    first = await backend.open(location)
    assert await first.migrate() == VERSIONS
    assert await first.migrate() == []
    second = await backend.open(location)
    assert await second.migrate() == []
    rows = await backend.fetch(location, "SELECT version FROM llmproxy_schema_migrations")
    assert sorted(r[0] for r in rows) == VERSIONS


async def test_replicas_migrating_at_the_same_moment_both_succeed(backend, location) -> None:
    replicas = await asyncio.gather(*(backend.open(location) for _ in range(3)))
    results = await asyncio.gather(*(r.migrate() for r in replicas))
    assert sorted(v for applied in results for v in applied) == VERSIONS  # each version once
    rows = await backend.fetch(location, "SELECT version FROM llmproxy_schema_migrations")
    assert [r[0] for r in rows] == VERSIONS
    await replicas[0].create_team(TeamInfo(team_id="org-1"))
    assert (await replicas[2].team("org-1")) is not None


async def test_migrate_ignores_versions_of_a_newer_release(backend, location, store) -> None:
    """Rolling upgrade: a newer replica migrated first; this one must still start."""
    if backend.name == "sqlite":
        with sqlite3.connect(location) as conn:
            conn.execute("INSERT INTO llmproxy_schema_migrations VALUES ('9999_future', 0)")
    else:
        conn = await asyncpg.connect(location)
        await conn.execute("INSERT INTO llmproxy_schema_migrations (version) VALUES ('9999_future')")
        await conn.close()
    assert await store.migrate() == []
    await store.ping()


# ---------------------------------------------------------------------------- keys


async def test_key_round_trips_every_field(store) -> None:
    digest, info = key_info(
        key_alias="session-1",
        team_id="org-1",
        user_id="session-1",
        models=["gpt-4o-mini", "claude-3-5-haiku"],
        max_budget=Decimal("50"),
        budget_duration="30d",
        rpm_limit=60,
        tpm_limit=100_000,
        max_parallel_requests=4,
        metadata={"org": "acme", "nested": {"a": [1, 2.5, None, True]}, "unicode": "é✓"},
        expires_at=datetime(2030, 1, 2, 3, 4, 5, 123456, tzinfo=timezone(timedelta(hours=2))),
        blocked=True,
    )
    created = await store.create_key(digest, info)
    assert created.created_at is not None and created.created_at.tzinfo is not None
    assert created.updated_at == created.created_at
    assert created == replace(info, created_at=created.created_at, updated_at=created.updated_at)
    assert created.models == ("gpt-4o-mini", "claude-3-5-haiku")
    assert created.expires_at == datetime(2030, 1, 2, 1, 4, 5, 123456, tzinfo=timezone.utc)
    assert created.expires_at.utcoffset() == timedelta(0)
    assert await store.key_by_hash(digest) == created
    assert await store.key(info.id) == created
    assert await store.key_by_hash(hash_key("sk-unknown")) is None
    assert await store.key("nope") is None


async def test_key_defaults_round_trip(store) -> None:
    digest, info = key_info(created_at=T0)
    created = await store.create_key(digest, info)
    assert created.created_at == T0
    assert (created.models, created.metadata, created.blocked, created.max_budget) == ((), {}, False, None)
    assert created.expires_at is None and created.key_alias is None
    assert await store.key(info.id) == created


async def test_budget_accepts_json_numbers_exactly(store) -> None:
    digest, info = key_info(max_budget=12.3)  # a float, as JSON bodies give it
    created = await store.create_key(digest, info)
    assert created.max_budget == Decimal("12.3")
    assert (await store.update_key(info.id, max_budget="0.000000015")).max_budget == Decimal("0.000000015")


async def test_create_key_twice_raises_already_exists(store) -> None:
    digest, info = key_info(1)
    await store.create_key(digest, info)
    with pytest.raises(AlreadyExists):
        await store.create_key(digest, info)
    other_digest, _ = key_info(2)
    with pytest.raises(AlreadyExists):  # same id, another hash
        await store.create_key(other_digest, info)
    with pytest.raises(AlreadyExists):  # same hash, another id
        await store.create_key(digest, replace(info, id="other-id"))


async def test_create_key_refuses_anything_but_a_hash(store) -> None:
    plaintext = "sk-" + "a" * 40
    _, info = key_info()
    with pytest.raises(ValueError, match="SHA-256"):
        await store.create_key(plaintext, info)


async def test_update_key(store) -> None:
    digest, info = key_info(max_budget=10, expires_at=T0, created_at=T0)
    await store.create_key(digest, info)
    updated = await store.update_key(
        info.id, blocked=True, models=["gpt-4o"], max_budget=None, expires_at=None, metadata={"k": 1}
    )
    assert updated.blocked and updated.models == ("gpt-4o",) and updated.metadata == {"k": 1}
    assert updated.max_budget is None and updated.expires_at is None
    assert updated.created_at == T0 and updated.updated_at > T0
    assert await store.key(info.id) == updated
    assert await store.update_key(info.id) == updated  # nothing to change
    assert (await store.update_key(info.id, blocked=False)).blocked is False
    with pytest.raises(TypeError, match="bogus"):
        await store.update_key(info.id, bogus=1)
    with pytest.raises(TypeError, match="created_at"):
        await store.update_key(info.id, created_at=T0)
    with pytest.raises(NotFound):
        await store.update_key("missing", blocked=True)
    with pytest.raises(NotFound):
        await store.update_key("missing")


async def test_delete_keys_returns_those_that_existed(store) -> None:
    infos = [key_info(n) for n in range(3)]
    for digest, info in infos:
        await store.create_key(digest, info)
    ids = [info.id for _, info in infos]
    assert await store.delete_keys([ids[2], "missing", ids[0], ids[2]]) == [ids[2], ids[0]]
    assert await store.key(ids[0]) is None and await store.key_by_hash(infos[0][0]) is None
    assert await store.key(ids[1]) is not None
    assert await store.delete_keys([]) == []
    assert await store.delete_keys([ids[0]]) == []


async def test_list_keys_pages_and_filters(store) -> None:
    created = []
    for n in range(7):
        digest, info = key_info(
            n, team_id="a" if n % 2 else "b", user_id="u1" if n < 3 else "u2", created_at=T0 + timedelta(seconds=n)
        )
        created.append(await store.create_key(digest, info))
    assert await store.list_keys() == created  # oldest first
    assert await store.list_keys(page=1, page_size=3) == created[:3]
    assert await store.list_keys(page=3, page_size=3) == created[6:]
    assert await store.list_keys(page=4, page_size=3) == []
    assert await store.list_keys(team_id="a") == [k for k in created if k.team_id == "a"]
    assert await store.list_keys(user_id="u1") == created[:3]
    assert await store.list_keys(team_id="b", user_id="u2") == [created[4], created[6]]
    assert await store.list_keys(team_id="b", user_id="u2", page=2, page_size=1) == [created[6]]
    assert await store.list_keys(team_id="nobody") == []
    assert (await store.count_keys(), await store.count_keys(team_id="a"), await store.count_keys(user_id="u1"),
            await store.count_keys(team_id="b", user_id="u2"), await store.count_keys(team_id="nobody")) == (7, 3, 3, 2, 0)
    for bad in ({"page": 0}, {"page_size": 0}, {"page_size": 1001}):
        with pytest.raises(ValueError):
            await store.list_keys(**bad)


# ---------------------------------------------------------------------------- teams


async def test_team_crud(store) -> None:
    assert await store.team("org-1") is None
    team = await store.create_team(
        TeamInfo(team_id="org-1", team_alias="Acme", models=["gpt-4o"], max_budget=Decimal("100.5"),
                 budget_duration="1d", rpm_limit=10, tpm_limit=1000, max_parallel_requests=2,
                 metadata={"tier": "pro"})
    )  # fmt: skip
    assert team.created_at is not None and team.models == ("gpt-4o",) and team.max_budget == Decimal("100.5")
    assert await store.team("org-1") == team
    with pytest.raises(AlreadyExists):
        await store.create_team(TeamInfo(team_id="org-1"))
    updated = await store.update_team("org-1", team_alias="Acme Inc", blocked=True, max_budget=None)
    assert (updated.team_alias, updated.blocked, updated.max_budget) == ("Acme Inc", True, None)
    assert updated.updated_at >= team.updated_at and updated.created_at == team.created_at
    assert await store.team("org-1") == updated
    with pytest.raises(TypeError):
        await store.update_team("org-1", team_id="org-2")
    with pytest.raises(NotFound):
        await store.update_team("org-9", blocked=True)

    digest, info = key_info(team_id="org-1")
    await store.create_key(digest, info)
    await store.delete_team("org-1")
    assert await store.team("org-1") is None
    assert await store.key(info.id) is not None  # keys are the admin layer's business
    with pytest.raises(NotFound):
        await store.delete_team("org-1")


async def test_list_teams_pages(store) -> None:
    teams = [await store.create_team(TeamInfo(team_id=f"t{n}", created_at=T0 + timedelta(minutes=n))) for n in range(5)]
    assert await store.list_teams() == teams
    assert await store.list_teams(page=2, page_size=2) == teams[2:4]
    assert await store.list_teams(page=9, page_size=2) == []


# ---------------------------------------------------------------------------- subscriptions


async def test_subscription_crud(store) -> None:
    assert await store.subscription("sub-1") is None and await store.team_subscription("org-1") is None
    sub = await store.create_subscription(SubscriptionInfo(
        subscription_id="sub-1", team_id="org-1", enabled=True, models=["gpt-4o", "claude"],
        limits={"gpt-4o": {"rpm": 10, "tpm": 1000, "max_parallel_requests": 2}, "*": {"rpm": 5, "tpm": 0}},
        max_budget=Decimal("12.000000001"), budget_duration="30d", metadata={"plan": "pro"}))
    assert sub.created_at is not None and sub.updated_at == sub.created_at
    assert sub.limits == {"gpt-4o": {"rpm": 10, "tpm": 1000, "max_parallel_requests": 2}, "*": {"rpm": 5}}
    assert sub.max_budget == Decimal("12.000000001") and sub.models == ("gpt-4o", "claude")
    assert await store.subscription("sub-1") == sub
    assert await store.team_subscription("org-1") == sub
    with pytest.raises(AlreadyExists):  # one per team
        await store.create_subscription(SubscriptionInfo(subscription_id="sub-2", team_id="org-1"))
    with pytest.raises(AlreadyExists):
        await store.create_subscription(SubscriptionInfo(subscription_id="sub-1", team_id="org-2"))
    updated = await store.update_subscription("sub-1", enabled=False, limits={"*": {"rpm": 1}}, max_budget=None)
    assert (updated.enabled, updated.limits, updated.max_budget) == (False, {"*": {"rpm": 1}}, None)
    assert updated.created_at == sub.created_at and updated.updated_at >= sub.updated_at
    assert await store.team_subscription("org-1") == updated
    with pytest.raises(TypeError):
        await store.update_subscription("sub-1", team_id="org-2")
    with pytest.raises(NotFound):
        await store.update_subscription("sub-9", enabled=True)
    assert await store.delete_subscriptions(["sub-9", "sub-1", "sub-1"]) == [updated]
    assert await store.subscription("sub-1") is None
    assert await store.create_subscription(SubscriptionInfo(subscription_id="sub-3", team_id="org-1"))


def test_subscription_limits_are_checked() -> None:
    with pytest.raises(ValueError, match="unknown limit 'rpd'"):
        SubscriptionInfo(subscription_id="s", team_id="t", limits={"*": {"rpd": 1}})
    with pytest.raises(ValueError, match="rpm"):
        SubscriptionInfo(subscription_id="s", team_id="t", limits={"*": {"rpm": -1}})
    with pytest.raises(TypeError):
        SubscriptionInfo(subscription_id="s", team_id="t", limits={"*": 5})
    sub = SubscriptionInfo(subscription_id="s", team_id="t", models=["a"],
                           limits={"a": {}, "*": {"tpm": 7}})
    assert sub.limits_for("a") == ("a", {}) and sub.limits_for("b") == ("*", {"tpm": 7})
    assert sub.allows_model("a") and not sub.allows_model("b")
    assert SubscriptionInfo(subscription_id="s", team_id="t").allows_model("b")


async def test_list_subscriptions_pages_and_filters(store) -> None:
    subs = [await store.create_subscription(SubscriptionInfo(
        subscription_id=f"s{n}", team_id=f"t{n}", created_at=T0 + timedelta(minutes=n))) for n in range(5)]
    assert await store.list_subscriptions() == subs
    assert await store.list_subscriptions(page=2, page_size=2) == subs[2:4]
    assert await store.list_subscriptions(team_id="t3") == [subs[3]]
    assert await store.list_subscriptions(team_id="none") == []


# ---------------------------------------------------------------------------- spend


async def test_write_spend_is_idempotent_on_request_id(store) -> None:
    batch = [spend_row(n, key_id="k1") for n in range(3)]
    assert await store.write_spend(batch) == 3
    assert await store.write_spend(batch) == 0  # a retried batch
    assert await store.write_spend(batch[1:] + [spend_row(3, key_id="k1")]) == 1
    assert await store.write_spend([spend_row(4), spend_row(4)]) == 1  # a duplicate within a batch
    assert await store.write_spend([]) == 0
    assert len(await store.spend_logs()) == 5
    # the first write wins: a retry never changes a stored row
    assert await store.write_spend([spend_row(0, key_id="k1", spend=Decimal(9))]) == 0
    assert await store.spend_total() == 0


async def test_spend_rows_round_trip_every_field(store) -> None:
    rows = [
        SpendRow(
            request_id="req-full", client_request_id="client-1", key_id="k1", team_id="org-1", user_id="u1",
            model="gpt-4o-mini", deployment="openai-eu", prompt_tokens=1234, completion_tokens=56,
            tokens_estimated=True, spend=Decimal("0.000123456"), status=200,
            started_at=datetime(2025, 3, 1, 13, 0, 0, 654321, tzinfo=timezone(timedelta(hours=1))),
            duration_ms=1234.5678, ttfb_ms=0.1 + 0.2, cache_hit=True, served_model="gpt-4o",
        ),
        SpendRow(request_id="req-bare", started_at=T0, status=401),
    ]  # fmt: skip
    assert await store.write_spend(rows) == 2
    assert await store.spend_logs() == rows  # both started at 12:00 UTC: ties by request_id, descending
    assert (await store.spend_logs())[0].started_at.utcoffset() == timedelta(0)


async def test_audit_rows_round_trip_and_get_increasing_ids(store) -> None:
    full = AuditRow(
        at=datetime(2025, 3, 1, 13, 0, 0, 654321, tzinfo=timezone(timedelta(hours=1))), actor="master",
        action="key.update", target_id="key-1", status=200, changes=["max_budget", "models"], request_id="req-1",
    )  # fmt: skip
    bare = AuditRow(at=T0 + timedelta(seconds=1), actor="admin-key", action="team.delete", status=404)
    first, second = await store.write_audit(full), await store.write_audit(bare)
    assert second > first
    assert await store.audit_logs() == [replace(bare, id=second), replace(full, id=first)]
    assert (await store.audit_logs())[1].changes == ("max_budget", "models")
    assert (await store.audit_logs())[1].at.utcoffset() == timedelta(0)


async def test_audit_logs_filter_and_page_newest_first(store) -> None:
    rows = [
        AuditRow(at=T0 + timedelta(seconds=n), actor="master" if n % 2 else "k9", action=f"team.{'new' if n < 6 else 'update'}",
                 target_id=f"team-{n % 3}", status=200, request_id=f"req-{n}")
        for n in range(10)
    ]  # fmt: skip
    ids = [await store.write_audit(row) for row in rows]
    stored = [replace(row, id=id) for row, id in zip(rows, ids)][::-1]
    assert await store.audit_logs() == stored
    assert await store.audit_logs(page=2, page_size=4) == stored[4:8]
    assert await store.audit_logs(action="team.update") == stored[:4]
    assert await store.audit_logs(target_id="team-0") == [r for r in stored if r.target_id == "team-0"]
    assert await store.audit_logs(actor="k9", action="team.new") == [r for r in stored[4:] if r.actor == "k9"]
    start, end = T0 + timedelta(seconds=2), T0 + timedelta(seconds=5)
    assert [r.request_id for r in await store.audit_logs(start=start, end=end)] == ["req-4", "req-3", "req-2"]
    same_time = [await store.write_audit(replace(rows[0], at=T0 + timedelta(days=1))) for _ in range(3)]
    assert [r.id for r in await store.audit_logs(page_size=3)] == same_time[::-1]  # ties: newest id first
    with pytest.raises(ValueError):
        await store.audit_logs(page=0)
    with pytest.raises(ValueError, match="naive"):
        await store.audit_logs(end=datetime(2025, 1, 1))


async def test_money_is_exact(store) -> None:
    thirds = [spend_row(n, key_id="k1", team_id="t1", spend=Decimal(v)) for n, v in enumerate(["0.1", "0.2", "0.3"])]
    tiny = [spend_row(10 + n, key_id="k2", team_id="t1", spend=Decimal("0.000000015")) for n in range(3)]
    await store.write_spend(thirds + tiny)
    assert await store.spend_total(key_id="k1") == Decimal("0.6")
    assert await store.key_spend("k2") == Decimal("0.000000045")
    assert await store.team_spend("t1") == Decimal("0.600000045")
    assert await store.spend_total(key_id="nobody") == Decimal(0)
    assert [r.spend for r in await store.spend_logs(key_id="k2")] == [Decimal("0.000000015")] * 3


def test_money_is_quantized_half_even_and_never_float() -> None:
    assert spend_row(1, spend=Decimal("0.0000000005")).spend == 0
    assert spend_row(1, spend=Decimal("0.0000000015")).spend == Decimal("0.000000002")
    assert spend_row(1, spend="1.25").spend == Decimal("1.25")
    with pytest.raises(TypeError):
        spend_row(1, spend=0.1)
    with pytest.raises(ValueError):
        spend_row(1, spend=Decimal("1e9"))
    with pytest.raises(ValueError):
        spend_row(1, spend=Decimal("NaN"))
    with pytest.raises(ValueError, match="naive"):
        spend_row(1, started_at=datetime(2025, 1, 1))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(amounts=st.lists(st.decimals(min_value=0, max_value=10**6, places=9), min_size=1, max_size=20))
async def test_sums_are_exact_for_any_amounts(store, amounts) -> None:
    key_id = secrets.token_hex(8)
    rows = [spend_row(n, request_id=f"{key_id}-{n}", key_id=key_id, spend=a) for n, a in enumerate(amounts)]
    assert await store.write_spend(rows) == len(rows)
    assert await store.spend_total(key_id=key_id) == sum(amounts, Decimal(0))
    assert sorted(r.spend for r in await store.spend_logs(key_id=key_id)) == sorted(amounts)


async def test_spend_logs_filters_and_pages_newest_first(store) -> None:
    rows = [
        spend_row(n, key_id=f"k{n % 2}", team_id="t1" if n < 6 else "t2", user_id=f"u{n % 3}", spend=Decimal(n))
        for n in range(10)
    ]
    await store.write_spend(rows)
    newest_first = rows[::-1]
    assert await store.spend_logs() == newest_first
    assert await store.spend_logs(page=1, page_size=4) == newest_first[:4]
    assert await store.spend_logs(page=3, page_size=4) == newest_first[8:]
    assert await store.spend_logs(key_id="k1") == [r for r in newest_first if r.key_id == "k1"]
    assert await store.spend_logs(team_id="t2") == newest_first[:4]
    assert await store.spend_logs(user_id="u0") == [r for r in newest_first if r.user_id == "u0"]
    start, end = T0 + timedelta(seconds=2), T0 + timedelta(seconds=5)
    assert await store.spend_logs(start=start, end=end) == [rows[4], rows[3], rows[2]]  # start <= t < end
    assert await store.spend_logs(key_id="k0", team_id="t1", start=start) == [rows[4], rows[2]]
    assert await store.spend_logs(user_id="nobody") == []
    with pytest.raises(ValueError, match="naive"):
        await store.spend_logs(start=datetime(2025, 1, 1))


async def test_spend_logs_order_is_stable_when_times_tie(store) -> None:
    rows = [spend_row(n, started_at=T0) for n in range(6)]
    await store.write_spend(rows)
    pages = [await store.spend_logs(page=p, page_size=2) for p in (1, 2, 3)]
    assert [r.request_id for page in pages for r in page] == [f"req-{n:04d}" for n in range(5, -1, -1)]


async def test_spend_total_since(store) -> None:
    await store.write_spend([spend_row(n, key_id="k1", team_id="t1", spend=Decimal("1.5")) for n in range(10)])
    assert await store.spend_total() == Decimal(15)
    assert await store.spend_total(key_id="k1", since=T0 + timedelta(seconds=7)) == Decimal("4.5")
    assert await store.spend_total(team_id="t1", since=T0 + timedelta(seconds=10)) == 0
    assert await store.team_spend("t1", since=T0 + timedelta(seconds=9)) == Decimal("1.5")
    assert await store.key_spend("k1", since=T0) == Decimal(15)


async def test_prune_spend_deletes_older_rows_in_chunks(store, monkeypatch) -> None:
    monkeypatch.setattr(sqlite_module, "PRUNE_CHUNK", 3)
    monkeypatch.setattr(pg_module, "PRUNE_CHUNK", 3)
    rows = [spend_row(n) for n in range(10)]
    await store.write_spend(rows)
    assert await store.prune_spend(T0 + timedelta(seconds=7)) == 7
    assert await store.spend_logs() == rows[:6:-1]
    assert await store.prune_spend(T0) == 0
    assert await store.prune_spend(T0 + timedelta(days=1)) == 3


# ---------------------------------------------------------------------------- safety


async def test_the_plaintext_key_is_never_stored(backend, location, store) -> None:
    plaintext = "sk-" + secrets.token_urlsafe(32)
    digest = hash_key(plaintext)
    await store.create_key(digest, KeyInfo(id=digest, key_prefix=mask_key(plaintext), key_alias="a"))
    await store.write_spend([spend_row(1, key_id=digest)])
    if backend.name == "sqlite":
        await store.close()  # nothing left in memory only
        data = b"".join(
            open(location + suffix, "rb").read() for suffix in ("", "-wal", "-shm") if os.path.exists(location + suffix)
        )
    else:
        tables = ["llmproxy_keys", "llmproxy_teams", "llmproxy_spend_logs", "llmproxy_schema_migrations"]
        data = b""
        for table in tables:
            data += str(await backend.fetch(location, f"SELECT t::text FROM {table} t")).encode()
    assert digest.encode() in data  # the search works
    assert plaintext.encode() not in data
    assert plaintext[3:20].encode() not in data


async def test_a_closed_store_is_unavailable(store) -> None:
    await store.close()
    await store.close()  # idempotent
    with pytest.raises(StoreUnavailable):
        await store.key("x")
    with pytest.raises(StoreUnavailable):
        await store.write_spend([spend_row(1)])


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def test_postgres_at_a_closed_port_is_unavailable_quickly() -> None:
    started = time.monotonic()
    with pytest.raises(StoreUnavailable, match="not reachable") as caught:
        await open_store(f"postgresql://postgres:secret-pw@127.0.0.1:{closed_port()}/x")
    assert time.monotonic() - started < 3
    assert "secret-pw" not in str(caught.value)
    assert isinstance(caught.value.__cause__, OSError)


async def test_sqlite_that_cannot_be_opened_is_unavailable(tmp_path) -> None:
    with pytest.raises(StoreUnavailable, match="cannot be opened"):
        await open_store(None, sqlite_path=str(tmp_path / "missing-dir" / "x.db"))


@pytest.mark.parametrize("url", ["mysql://u@h/db", "redis://localhost:6379", "sqlite:/relative.db", "localhost:5432"])
async def test_open_store_refuses_other_schemes(url) -> None:
    with pytest.raises(ValueError, match=repr(url.split(":")[0])):
        await open_store(url)


async def test_open_store_takes_a_sqlite_url(tmp_path) -> None:
    path = tmp_path / "via-url.db"
    store = await open_store(f"sqlite:///{path}")  # sqlite:////abs/path
    try:
        assert isinstance(store, SqliteStore)
        assert await store.migrate() == VERSIONS
        assert path.exists()
    finally:
        await store.close()


# ---------------------------------------------------------------------------- SQLite


@pytest.fixture
async def sqlite_file(tmp_path):
    path = str(tmp_path / "llmproxy.db")
    store = await open_store(None, sqlite_path=path)
    await store.migrate()
    yield path, store
    await store.close()


async def test_sqlite_runs_in_wal_mode_with_a_private_file(sqlite_file) -> None:
    path, store = sqlite_file
    assert store.journal_mode == "wal"
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


async def test_sqlite_second_process_writes_while_the_server_runs(sqlite_file) -> None:
    """`llmproxy keys create` while the server has the file open."""
    path, server = sqlite_file
    await server.write_spend([spend_row(1)])
    cli = await open_store(None, sqlite_path=path)
    try:
        digest, info = key_info()
        await cli.create_key(digest, info)
        assert (await server.key_by_hash(digest)).id == info.id
        await server.update_key(info.id, blocked=True)
        assert (await cli.key(info.id)).blocked
    finally:
        await cli.close()


async def test_sqlite_writer_waits_for_another_writer(sqlite_file) -> None:
    path, store = sqlite_file
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")  # another process holds the write lock for a moment
    timer = threading.Timer(0.3, other.execute, ("COMMIT",))
    timer.start()
    try:
        started = time.monotonic()
        assert await store.write_spend([spend_row(1)]) == 1
        assert time.monotonic() - started >= 0.2
    finally:
        timer.join()
        other.close()


async def test_sqlite_writer_gives_up_after_the_busy_timeout(tmp_path) -> None:
    path = str(tmp_path / "busy.db")
    store = await SqliteStore.open(path, busy_timeout_ms=100)
    try:
        await store.migrate()
        other = sqlite3.connect(path, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")
        try:
            with pytest.raises(StoreUnavailable, match="locked"):
                await store.write_spend([spend_row(1)])
            assert len(await store.spend_logs()) == 0  # readers are not blocked in WAL mode
        finally:
            other.execute("ROLLBACK")
            other.close()
        assert await store.write_spend([spend_row(1)]) == 1  # no transaction was left open
    finally:
        await store.close()


# ---------------------------------------------------------------------------- PostgreSQL


@pytest.fixture
async def pg_backend():
    backend = PostgresBackend()
    try:
        yield backend
    finally:
        await backend.close()


@pytest.mark.parametrize("statement_cache", [True, False])
async def test_postgres_statement_cache_can_be_turned_off(pg_backend, statement_cache) -> None:
    """PgBouncer in transaction mode: no named prepared statements may outlive a call."""
    url = (await pg_backend.new_database()).replace("postgresql://", "postgres://", 1)
    store = await pg_backend.open(url, statement_cache=statement_cache)
    assert await store.migrate() == VERSIONS
    for n in range(3):  # the same statements, again and again
        digest, info = key_info(n)
        await store.create_key(digest, info)
        assert await store.key_by_hash(digest) is not None
    async with store._conn() as conn:  # the pool's one idle connection: its session's statements
        named = await conn.fetchval("SELECT count(*) FROM pg_prepared_statements")
    assert (named > 0) is statement_cache


class TcpRelay:
    """A TCP relay to PostgreSQL the test can cut and restore: a database outage."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = closed_port()
        self.server: asyncio.Server | None = None
        self.writers: set[asyncio.StreamWriter] = set()
        self.hung = False  # accept and swallow bytes, answer nothing: a hung server

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)

    async def cut(self) -> None:
        self.server.close()
        for writer in list(self.writers):
            writer.transport.abort()
        await self.server.wait_closed()

    async def _serve(self, reader, writer) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.target)
        self.writers |= {writer, up_writer}

        async def pipe(src, dst) -> None:
            try:
                while data := await src.read(65536):
                    if self.hung:
                        continue
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                dst.transport.abort()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))


async def test_postgres_outage_is_unavailable_then_recovers(pg_backend) -> None:
    url = await pg_backend.new_database()
    parts = urlsplit(url)
    relay = TcpRelay((parts.hostname, parts.port or 5432))
    await relay.start()
    store = await pg_backend.open(urlunsplit(parts._replace(netloc=f"{parts.username}@127.0.0.1:{relay.port}")))
    await store.migrate()
    await store.ping()

    await relay.cut()
    started = time.monotonic()
    for _ in range(2):  # the broken pooled connection, then a refused new one
        with pytest.raises(StoreUnavailable):
            await store.key("x")
    assert time.monotonic() - started < 5

    await relay.start()
    await store.ping()
    assert await store.write_spend([spend_row(1)]) == 1
    await relay.cut()


async def test_postgres_that_hangs_is_unavailable_after_the_timeout(pg_backend) -> None:
    url = await pg_backend.new_database()
    parts = urlsplit(url)
    relay = TcpRelay((parts.hostname, parts.port or 5432))
    await relay.start()
    via_relay = urlunsplit(parts._replace(netloc=f"{parts.username}@127.0.0.1:{relay.port}"))
    store = await pg_module.PostgresStore.open(via_relay, timeout=0.5)
    pg_backend.stores.append(store)
    await store.migrate()

    relay.hung = True
    for _ in range(2):  # the pooled connection's query, then a new connection's handshake
        started = time.monotonic()
        with pytest.raises(StoreUnavailable):
            await store.key("x")
        assert time.monotonic() - started < 2

    relay.hung = False
    await store.ping()
    assert await store.key("x") is None
    await relay.cut()
