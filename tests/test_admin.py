"""The admin API (SPEC §4) over HTTP: the seed's "Part A" flow on SQLite and PostgreSQL,
who may call, bad input as 400 naming the field (never a 500), `/spend/logs`, and the
plaintext key kept out of the database and the logs."""

from __future__ import annotations

import asyncio
import os
import hashlib
import json
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmproxy.admin import Admin
from llmproxy.store import SpendRow

from .conftest import MASTER, openai_config

AUTH = {"Authorization": f"Bearer {MASTER}"}
UTC = timezone.utc


class Api:
    """JSON calls against one proxy; `headers=None` sends no key."""

    def __init__(self, proxy: Any, session: aiohttp.ClientSession) -> None:
        self.proxy = proxy
        self.session = session

    async def call(self, method: str, path: str, body: Any = None, query: Any = None,
                   headers: dict[str, str] | None = AUTH, raw: bytes | None = None) -> tuple[int, Any]:
        kwargs: dict[str, Any] = {"headers": dict(headers or {})}
        if raw is not None:
            kwargs["data"] = raw
        elif body is not None:
            kwargs["json"] = body
        if query is not None:
            kwargs["params"] = query
        async with self.session.request(method, self.proxy.url + path, **kwargs) as resp:
            text = await resp.text()
            assert resp.content_type == "application/json", (resp.status, text)
            return resp.status, json.loads(text)

    async def ok(self, method: str, path: str, body: Any = None, query: Any = None) -> Any:
        status, data = await self.call(method, path, body, query)
        assert status == 200, data
        return data

    async def error(self, method: str, path: str, body: Any = None, query: Any = None,
                    headers: dict[str, str] | None = AUTH, raw: bytes | None = None) -> tuple[int, dict]:
        status, data = await self.call(method, path, body, query, headers, raw)
        assert status >= 400, data
        assert set(data) == {"error"} and set(data["error"]) == {"message", "type", "param", "code"}, data
        return status, data["error"]


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request) -> dict[str, Any]:
    """Config extras for the store: a private SQLite file (make_proxy's default) or a fresh
    PostgreSQL database (skipped when unreachable, failed under CI=true)."""
    if request.param == "sqlite":
        return {}
    return {"database_url": request.getfixturevalue("pg_url")}


@pytest.fixture
async def api(make_proxy, upstream):
    proxy = await make_proxy(openai_config(upstream))
    async with aiohttp.ClientSession() as session:
        yield Api(proxy, session)


def recorded_invalidations(proxy: Any) -> list[tuple[str, str]]:
    seen: list[tuple[str, str]] = []
    proxy.gateway.services.invalidator.subscribe(lambda kind, ident: seen.append((kind, ident)))
    return seen


def when(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


# --- the seed's flow -------------------------------------------------------------------------


async def test_seed_flow(make_proxy, upstream, backend, tmp_path, capfd):
    proxy = await make_proxy(openai_config(upstream, **backend))
    invalidated = recorded_invalidations(proxy)
    async with aiohttp.ClientSession() as session:
        api = Api(proxy, session)
        # 1. The org's team does not exist yet; create it; a second create is refused.
        status, err = await api.error("GET", "/team/info", query={"team_id": "org-1"})
        assert status == 404 and err["type"] == "invalid_request_error"
        team = await api.ok("POST", "/team/new", {"team_id": "org-1"})
        assert team["team_id"] == "org-1" and team["spend"] == 0.0 and team["models"] == []
        status, err = await api.error("POST", "/team/new", {"team_id": "org-1"})
        assert status == 400 and "already exists" in err["message"]

        # 2. A key for a session of the org, 24 hours, $50.
        before = datetime.now(UTC)
        made = await api.ok("POST", "/key/generate",
                            {"team_id": "org-1", "user_id": "session-1", "duration": "24h", "max_budget": 50})
        key = made["key"]
        assert key.startswith("sk-") and len(key) >= 3 + 32
        assert made["token"] == hashlib.sha256(key.encode()).hexdigest()
        assert made["key_name"] == f"sk-...{key[-4:]}"
        assert abs(when(made["expires"]) - (before + timedelta(hours=24))) < timedelta(seconds=30)
        assert (made["team_id"], made["user_id"], made["max_budget"]) == ("org-1", "session-1", 50.0)
        token = made["token"]

        # 3. Its info, by key and by id; never the key again.
        for ref in (key, token):
            info = await api.ok("GET", "/key/info", query={"key": ref})
            assert info["key"] == token
            assert info["info"]["spend"] == 0.0 and info["info"]["blocked"] is False
            assert info["info"]["expires"] == made["expires"] and info["info"]["budget_reset_at"] is None
            assert key not in json.dumps(info)
        listed = await api.ok("GET", "/key/list", query={"team_id": "org-1"})
        assert listed["keys"] == [token] and listed["current_page"] == 1 and listed["has_more"] is False
        assert listed["key_infos"][0]["user_id"] == "session-1" and key not in json.dumps(listed)

        # 4. Update, block, unblock: each answers the info and invalidates the key.
        updated = await api.ok("POST", "/key/update", {"key": key, "models": ["gpt-test"], "budget_duration": "30d"})
        assert updated["models"] == ["gpt-test"] and updated["max_budget"] == 50.0
        assert when(updated["budget_reset_at"]) - when(updated["created_at"]) == timedelta(days=30)
        assert (await api.ok("POST", "/key/block", {"key": token}))["blocked"] is True
        assert (await api.ok("GET", "/key/info", query={"key": key}))["info"]["blocked"] is True
        assert (await api.ok("POST", "/key/unblock", {"key": key}))["blocked"] is False
        assert invalidated == [("team", "org-1")] + [("key", token)] * 3  # team/new drops a cached "no team"

        # 5. The team: update, info with its keys.
        team = await api.ok("POST", "/team/update", {"team_id": "org-1", "max_budget": 100, "team_alias": "Org"})
        assert team["max_budget"] == 100.0 and team["team_alias"] == "Org"
        assert invalidated[-1] == ("team", "org-1")
        info = await api.ok("GET", "/team/info", query={"team_id": "org-1"})
        assert info["team_id"] == "org-1" and info["keys"] == [token] and info["team_info"]["spend"] == 0.0

        # 6. Delete the key (twice: the second deletes nothing); it is gone.
        assert await api.ok("POST", "/key/delete", {"keys": [key]}) == {"deleted_keys": [token]}
        assert invalidated[-1] == ("key", token)
        assert await api.ok("POST", "/key/delete", {"keys": [key]}) == {"deleted_keys": []}
        status, _ = await api.error("GET", "/key/info", query={"key": key})
        assert status == 404

        # 7. Deleting the team deletes the keys it still has.
        other = (await api.ok("POST", "/key/generate", {"team_id": "org-1"}))["token"]
        gone = await api.ok("POST", "/team/delete", {"team_ids": ["org-1"]})
        assert gone == {"deleted_teams": ["org-1"], "deleted_keys": [other]}
        assert {("key", other), ("team", "org-1")} <= set(invalidated)
        assert (await api.error("GET", "/team/info", query={"team_id": "org-1"}))[0] == 404
        assert (await api.error("GET", "/key/info", query={"key": other}))[0] == 404

    # The plaintext key is in neither the database files nor the logs.
    out, err = capfd.readouterr()
    assert "admin_key_generated" in out + err  # the log was captured...
    assert key not in out + err  # ...and holds no key
    if not backend:
        files = list(tmp_path.glob("proxy*.db*"))
        assert files
        for path in files:
            assert key.encode() not in path.read_bytes(), path.name


# --- who may call ----------------------------------------------------------------------------

ENDPOINTS = [
    ("POST", "/key/generate", {}), ("POST", "/key/update", {"key": "sk-x"}), ("POST", "/key/delete", {"keys": []}),
    ("GET", "/key/info", {"key": "sk-x"}), ("GET", "/key/list", {}), ("POST", "/key/block", {"key": "sk-x"}),
    ("POST", "/key/unblock", {"key": "sk-x"}), ("POST", "/team/new", {}), ("GET", "/team/info", {"team_id": "t"}),
    ("POST", "/team/update", {"team_id": "t"}), ("POST", "/team/delete", {"team_id": "t"}),
    ("GET", "/spend/logs", {}),
]


async def call_endpoint(api: Api, method: str, path: str, args: dict, headers: dict | None) -> tuple[int, dict]:
    if method == "GET":
        return await api.error(method, path, query=args, headers=headers)
    return await api.error(method, path, args, headers=headers)


@pytest.mark.parametrize("headers, why", [
    (None, "no key"),
    ({"Authorization": "Bearer sk-not-the-master"}, "wrong bearer"),
    ({"x-api-key": "sk-not-the-master"}, "wrong x-api-key"),
    ({"Authorization": f"Basic {MASTER}"}, "not a bearer"),
    ({"Authorization": f"Bearer {MASTER}x"}, "master plus a character"),
])
async def test_unauthenticated_is_401(api, headers, why):
    for method, path, args in ENDPOINTS:
        status, err = await call_endpoint(api, method, path, args, headers)
        assert (status, err["type"], err["code"]) == (401, "authentication_error", "invalid_api_key"), (path, why)


async def test_virtual_key_is_403(api):
    key = (await api.ok("POST", "/key/generate", {}))["key"]
    for header in ("Authorization", "x-api-key", "api-key"):
        value = f"Bearer {key}" if header == "Authorization" else key
        for method, path, args in ENDPOINTS:
            status, err = await call_endpoint(api, method, path, args, {header: value})
            assert (status, err["type"]) == (403, "permission_error"), (path, header)
            assert key not in err["message"]


@pytest.mark.parametrize("header, value", [
    ("Authorization", f"Bearer {MASTER}"), ("authorization", f"bearer {MASTER}"),
    ("x-api-key", MASTER), ("api-key", MASTER),
])
async def test_master_key_headers(api, header, value):
    status, data = await api.call("GET", "/key/list", headers={header: value})
    assert status == 200 and data["keys"] == []


async def test_without_master_key_everything_is_403(make_proxy, upstream):
    config = openai_config(upstream, server={"allow_anonymous": True})
    del config["master_key"]
    proxy = await make_proxy(config)
    async with aiohttp.ClientSession() as session:
        api = Api(proxy, session)
        for headers in (None, AUTH):
            for method, path, args in ENDPOINTS:
                status, err = await call_endpoint(api, method, path, args, headers)
                assert (status, err["type"]) == (403, "permission_error") and "master_key" in err["message"]


async def test_undecodable_key_header_is_401(api):
    """A header that is not UTF-8 reaches the handler as surrogates: still a 401."""
    reader, writer = await asyncio.open_connection("127.0.0.1", api.proxy.server.port)
    writer.write(b"GET /key/list HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sk-\xff\xfe\r\nConnection: close\r\n\r\n")
    await writer.drain()
    answer = await reader.read()
    writer.close()
    assert answer.startswith(b"HTTP/1.1 401") and b'"invalid_api_key"' in answer


async def test_database_down_is_503(api):
    await api.proxy.gateway.services.store.close()
    status, err = await api.error("POST", "/key/generate", {})
    assert (status, err["code"]) == (503, "database_unavailable")
    status, _ = await api.error("GET", "/key/list", headers={"Authorization": "Bearer sk-some-virtual-key"})
    assert status == 401  # not the master key, whatever the database would say


# --- bad input: 400 naming the field -----------------------------------------------------------

DEEP: dict = {}
_node = DEEP
for _ in range(40):
    _node["a"] = {}
    _node = _node["a"]

BAD_BODIES = [
    ("/key/generate", {"duration": "7x"}, "duration"),
    ("/key/generate", {"duration": "0s"}, "duration"),
    ("/key/generate", {"duration": 24}, "duration"),
    ("/key/generate", {"duration": "99999999999999999999d"}, "duration"),
    ("/key/generate", {"budget_duration": "1mo"}, "budget_duration"),
    ("/key/generate", {"max_budget": -1}, "max_budget"),
    ("/key/generate", {"max_budget": "5"}, "max_budget"),
    ("/key/generate", {"max_budget": True}, "max_budget"),
    ("/key/generate", {"max_budget": 1e300}, "max_budget"),
    ("/key/generate", {"models": "gpt-test"}, "models"),
    ("/key/generate", {"models": ["gpt-test", 1]}, "models[1]"),
    ("/key/generate", {"models": [""]}, "models[0]"),
    ("/key/generate", {"rpm_limit": 1.5}, "rpm_limit"),
    ("/key/generate", {"rpm_limit": -1}, "rpm_limit"),
    ("/key/generate", {"tpm_limit": "100"}, "tpm_limit"),
    ("/key/generate", {"max_parallel_requests": 2**40}, "max_parallel_requests"),
    ("/key/generate", {"metadata": []}, "metadata"),
    ("/key/generate", {"metadata": {"a": "nul\u0000"}}, "metadata"),
    ("/key/generate", {"metadata": {"nul\u0000": 1}}, "metadata"),
    ("/key/generate", {"metadata": DEEP}, "metadata"),
    ("/key/generate", {"metadata": {"big": "x" * 70000}}, "metadata"),
    ("/key/generate", {"team_id": ""}, "team_id"),
    ("/key/generate", {"team_id": "t" * 300}, "team_id"),
    ("/key/generate", {"team_id": "a\u0000b"}, "team_id"),
    ("/key/generate", {"team_id": "no-such-team"}, "team_id"),
    ("/key/generate", {"user_id": ["u"]}, "user_id"),
    ("/key/generate", {"key_alias": "line\nbreak"}, "key_alias"),
    ("/key/generate", {"blocked": None}, "blocked"),
    ("/key/generate", {"blocked": "yes"}, "blocked"),
    ("/key/generate", {"spend": 1}, "spend"),
    ("/key/generate", {"key": "sk-chosen-by-client"}, "key"),
    ("/key/update", {}, "key"),
    ("/key/update", {"key": 5}, "key"),
    ("/key/update", {"key": None}, "key"),
    ("/key/update", {"key": "sk-x", "duration": "forever"}, "duration"),
    ("/key/delete", {}, "keys"),
    ("/key/delete", {"keys": "sk-x"}, "keys"),
    ("/key/delete", {"keys": [None]}, "keys[0]"),
    ("/key/block", {}, "key"),
    ("/key/unblock", {"key": ""}, "key"),
    ("/team/new", {"team_id": None}, "team_id"),
    ("/team/new", {"team_id": 7}, "team_id"),
    ("/team/new", {"tpm_limit": "10"}, "tpm_limit"),
    ("/team/new", {"team_alias": {}}, "team_alias"),
    ("/team/new", {"user_id": "u"}, "user_id"),
    ("/team/update", {"team_alias": "x"}, "team_id"),
    ("/team/update", {"team_id": "t", "max_budget": -0.01}, "max_budget"),
    ("/team/delete", {}, "team_ids"),
    ("/team/delete", {"team_ids": "t"}, "team_ids"),
]


@pytest.mark.parametrize("path, body, field", BAD_BODIES, ids=[f"{p}:{f}" for p, _, f in BAD_BODIES])
async def test_bad_body_is_400_naming_the_field(api, path, body, field):
    status, err = await api.error("POST", path, body)
    assert (status, err["type"], err["param"]) == (400, "invalid_request_error", field), err
    assert f"'{field}'" in err["message"] or f"'{field.split('[')[0]}'" in err["message"]


BAD_QUERIES = [
    ("/key/info", {}, "key"),
    ("/key/info", {"key": ""}, "key"),
    ("/key/list", {"page": "0"}, "page"),
    ("/key/list", {"page": "abc"}, "page"),
    ("/key/list", {"page": "²"}, "page"),
    ("/key/list", {"size": "5000"}, "size"),
    ("/key/list", {"team": "org-1"}, "team"),
    ("/key/list", [("team_id", "a"), ("team_id", "b")], "team_id"),
    ("/key/list", {"return_full_object": "maybe"}, "return_full_object"),
    ("/team/info", {}, "team_id"),
    ("/team/info", {"team_id": "a\u0000b"}, "team_id"),
    ("/spend/logs", {"start_date": "yesterday"}, "start_date"),
    ("/spend/logs", {"end_date": "9999-12-31"}, "end_date"),
    ("/spend/logs", {"end_date": "2025-02-30"}, "end_date"),
    ("/spend/logs", {"page_size": "1001"}, "page_size"),
    ("/spend/logs", {"api_key": "k" * 600}, "api_key"),
]


@pytest.mark.parametrize("path, query, field", BAD_QUERIES, ids=[f"{p}:{f}" for p, _, f in BAD_QUERIES])
async def test_bad_query_is_400_naming_the_field(api, path, query, field):
    status, err = await api.error("GET", path, query=query)
    assert (status, err["type"], err["param"]) == (400, "invalid_request_error", field), err


@pytest.mark.parametrize("raw, fragment", [
    (b"{", "not valid JSON"), (b"[1, 2]", "JSON object"), (b'"x"', "JSON object"), (b"\xff", "not valid JSON"),
    (b'{"team_id": "\\ud800"}', "not valid JSON"),
])
async def test_bad_json_is_400(api, raw, fragment):
    status, err = await api.error("POST", "/team/new", raw=raw, headers={**AUTH, "Content-Type": "application/json"})
    assert status == 400 and fragment in err["message"]


@pytest.mark.parametrize("method, path, args", [
    ("POST", "/key/update", {"key": "sk-missing"}),
    ("POST", "/key/block", {"key": "0" * 64}),
    ("POST", "/key/unblock", {"key": "sk-missing"}),
    ("GET", "/key/info", {"key": "sk-missing"}),
    ("POST", "/team/update", {"team_id": "missing"}),
    ("POST", "/team/delete", {"team_ids": ["missing"]}),
    ("GET", "/team/info", {"team_id": "missing"}),
])
async def test_missing_is_404(api, method, path, args):
    status, err = await call_endpoint(api, method, path, args, AUTH)
    assert status == 404 and err["code"] == "not_found"
    assert "sk-missing" not in err["message"]


async def test_team_delete_is_all_or_nothing(api):
    await api.ok("POST", "/team/new", {"team_id": "a"})
    status, err = await api.error("POST", "/team/delete", {"team_ids": ["a", "b"]})
    assert status == 404 and "b" in err["message"]
    assert (await api.ok("GET", "/team/info", query={"team_id": "a"}))["team_id"] == "a"
    assert await api.ok("POST", "/team/delete", {"team_id": "a"}) == {"deleted_teams": ["a"], "deleted_keys": []}


# --- the fields themselves -------------------------------------------------------------------


async def test_generate_every_field_and_update_semantics(api):
    await api.ok("POST", "/team/new", {"team_id": "t1", "team_alias": "T", "models": ["gpt-test"], "rpm_limit": 5,
                                      "tpm_limit": 100, "max_parallel_requests": 2, "budget_duration": "1d",
                                      "max_budget": 0.5, "metadata": {"plan": "pro"}})
    made = await api.ok("POST", "/key/generate", {
        "key_alias": "ci", "duration": "10m", "models": ["gpt-test", "claude-test"], "max_budget": 5.25,
        "budget_duration": "30d", "team_id": "t1", "user_id": "u1", "rpm_limit": 60, "tpm_limit": 1000,
        "max_parallel_requests": 3, "metadata": {"session": "s", "n": [1, 2]}, "blocked": False})
    expected = {"key_alias": "ci", "models": ["gpt-test", "claude-test"], "max_budget": 5.25, "budget_duration": "30d",
                "team_id": "t1", "user_id": "u1", "rpm_limit": 60, "tpm_limit": 1000, "max_parallel_requests": 3,
                "metadata": {"session": "s", "n": [1, 2]}, "blocked": False}
    assert {k: made[k] for k in expected} == expected
    assert when(made["budget_reset_at"]) == when(made["created_at"]) + timedelta(days=30)
    assert when(made["expires"]) - when(made["created_at"]) == timedelta(minutes=10)
    info = (await api.ok("GET", "/key/info", query={"key": made["token"]}))["info"]
    assert {k: info[k] for k in expected} == expected

    # Absent fields stay; null clears; duration counts from the update.
    updated = await api.ok("POST", "/key/update", {"key": made["key"], "models": None, "max_budget": None,
                                                   "duration": None, "metadata": None, "team_id": None})
    assert (updated["models"], updated["max_budget"], updated["expires"], updated["metadata"], updated["team_id"]) \
        == ([], None, None, {}, None)
    assert (updated["key_alias"], updated["rpm_limit"], updated["user_id"]) == ("ci", 60, "u1")
    later = await api.ok("POST", "/key/update", {"key": made["token"], "duration": "7d"})
    assert abs(when(later["expires"]) - (datetime.now(UTC) + timedelta(days=7))) < timedelta(seconds=30)
    status, err = await api.error("POST", "/key/update", {"key": made["token"], "team_id": "nope"})
    assert (status, err["param"]) == (400, "team_id")

    team = (await api.ok("GET", "/team/info", query={"team_id": "t1"}))["team_info"]
    assert (team["team_alias"], team["models"], team["rpm_limit"], team["max_budget"], team["metadata"]) == \
        ("T", ["gpt-test"], 5, 0.5, {"plan": "pro"})
    assert when(team["budget_reset_at"]) == when(team["created_at"]) + timedelta(days=1)


async def test_team_new_generates_an_id(api):
    team = await api.ok("POST", "/team/new", {})
    assert len(team["team_id"]) == 36
    assert (await api.ok("GET", "/team/info", query={"team_id": team["team_id"]}))["keys"] == []


async def test_key_list_filters_and_pages(api):
    await api.ok("POST", "/team/new", {"team_id": "t"})
    made = [(await api.ok("POST", "/key/generate", {"team_id": "t", "user_id": f"u{i % 2}"}))["token"]
            for i in range(5)]
    await api.ok("POST", "/key/generate", {})
    pages = [await api.ok("GET", "/key/list", query={"team_id": "t", "size": "2", "page": str(p)}) for p in (1, 2, 3)]
    assert [p["keys"] for p in pages] == [made[0:2], made[2:4], made[4:]]
    assert [p["has_more"] for p in pages] == [True, True, False]
    assert [p["total_count"] for p in pages] == [5, 5, 5]  # LiteLLM's field: every matching key
    by_user = await api.ok("GET", "/key/list", query={"team_id": "t", "user_id": "u1"})
    assert by_user["total_count"] == 2
    assert by_user["keys"] == [made[1], made[3]]
    full = await api.ok("GET", "/key/list", query={"user_id": "u0", "return_full_object": "true"})
    assert [k["token"] for k in full["keys"]] == [made[0], made[2], made[4]] and "key_infos" not in full
    assert (await api.ok("GET", "/key/list", query={"size": "100"}))["keys"][:5] == made


async def test_admin_port_serves_the_admin_api_alone(make_proxy, upstream):
    proxy = await make_proxy(openai_config(upstream, server={"admin_port": 4999}))
    async with aiohttp.ClientSession() as session:
        status, _ = await Api(proxy, session).error("GET", "/key/list")
        assert status == 404  # not on the data-plane port
        admin = TestServer(Admin(proxy.gateway).app(), host="127.0.0.1")
        await admin.start_server()
        try:
            api = Api(type("P", (), {"url": f"http://127.0.0.1:{admin.port}"})(), session)
            assert (await api.ok("GET", "/key/list"))["keys"] == []
            status, err = await api.error("GET", "/v1/models")
            assert status == 404 and err["code"] == "not_found"
        finally:
            await admin.close()


# --- /spend/logs and spend in the info ---------------------------------------------------------


def spend_row(n: int, started: datetime, **fields: Any) -> SpendRow:
    return SpendRow(request_id=f"req-{n:03d}", started_at=started, model="gpt-test", served_model="gpt-test",
                    deployment="openai:gpt-upstream",
                    prompt_tokens=10 * n, completion_tokens=n, spend=Decimal("0.001") * n, status=200,
                    duration_ms=1500.0, ttfb_ms=120.5, **fields)


async def test_spend_logs(make_proxy, upstream, backend):
    proxy = await make_proxy(openai_config(upstream, **backend))
    store = proxy.gateway.services.store
    async with aiohttp.ClientSession() as session:
        api = Api(proxy, session)
        await api.ok("POST", "/team/new", {"team_id": "org-1"})
        made = await api.ok("POST", "/key/generate", {"team_id": "org-1", "user_id": "s1", "budget_duration": "30d"})
        plain = await api.ok("POST", "/key/generate", {"team_id": "org-1", "user_id": "s2"})
        created = when(made["created_at"])
        day = datetime(2025, 3, 1, tzinfo=UTC)
        rows = [spend_row(i, day + timedelta(hours=i), key_id=made["token"], team_id="org-1", user_id="s1",
                          client_request_id=f"c{i}") for i in range(1, 6)]
        rows += [spend_row(10, day + timedelta(days=1, hours=1), key_id=plain["token"], team_id="org-1", user_id="s2",
                           cache_hit=True, tokens_estimated=True)]
        rows += [spend_row(20, created + timedelta(seconds=1), key_id=made["token"], team_id="org-1", user_id="s1"),
                 spend_row(30, created + timedelta(seconds=2), key_id=plain["token"], team_id="org-1", user_id="s2")]
        assert await store.write_spend(rows) == len(rows)

        everything = await api.ok("GET", "/spend/logs")
        assert [r["request_id"] for r in everything] == \
            ["req-030", "req-020", "req-010", "req-005", "req-004", "req-003", "req-002", "req-001"]
        first = next(r for r in everything if r["request_id"] == "req-001")
        assert first == {
            "request_id": "req-001", "client_request_id": "c1", "api_key": made["token"], "team_id": "org-1",
            "user_id": "s1", "model": "gpt-test", "served_model": "gpt-test", "deployment": "openai:gpt-upstream",
            "prompt_tokens": 10,
            "completion_tokens": 1, "total_tokens": 11, "tokens_estimated": False, "spend": 0.001, "status": 200,
            "startTime": first["started_at"], "endTime": first["endTime"], "started_at": first["started_at"],
            "duration_ms": 1500.0, "ttfb_ms": 120.5, "cache_hit": False, "trace_id": None, "unpriced": False}
        assert when(first["started_at"]) == day + timedelta(hours=1)
        assert when(first["endTime"]) == day + timedelta(hours=1, milliseconds=1500)

        async def ids(**query: str) -> list[str]:
            return [r["request_id"] for r in await api.ok("GET", "/spend/logs", query=query)]

        assert await ids(api_key=made["key"]) == await ids(api_key=made["token"]) == \
            ["req-020", "req-005", "req-004", "req-003", "req-002", "req-001"]
        assert await ids(user_id="s2") == ["req-030", "req-010"]
        assert await ids(team_id="org-1", page_size="3", page="2") == ["req-005", "req-004", "req-003"]
        assert await ids(team_id="org-2") == []
        assert await ids(start_date="2025-03-01", end_date="2025-03-01") == \
            ["req-005", "req-004", "req-003", "req-002", "req-001"]  # a date-only end includes its day
        assert await ids(start_date="2025-03-01T03:00:00Z", end_date="2025-03-02T01:00:00+00:00") == \
            ["req-005", "req-004", "req-003"]  # a datetime end is exclusive
        assert await ids(start_date="2025-03-02T01:00:00", end_date="2025-03-02") == ["req-010"]  # naive = UTC

        # Spend in the info: the current budget period's (from creation) or all time.
        info = (await api.ok("GET", "/key/info", query={"key": made["key"]}))["info"]
        assert info["spend"] == pytest.approx(0.020)
        info = (await api.ok("GET", "/key/info", query={"key": plain["token"]}))["info"]
        assert info["spend"] == pytest.approx(0.040)
        team = (await api.ok("GET", "/team/info", query={"team_id": "org-1"}))["team_info"]
        assert team["spend"] == pytest.approx(0.075)
        await api.ok("POST", "/team/update", {"team_id": "org-1", "budget_duration": "1d"})
        team = (await api.ok("GET", "/team/info", query={"team_id": "org-1"}))["team_info"]
        assert team["spend"] == pytest.approx(0.050)


# --- nothing a client sends makes a 500 --------------------------------------------------------

FIELDS = sorted({"key", "keys", "team_id", "team_ids", "key_alias", "team_alias", "duration", "models", "max_budget",
                 "budget_duration", "user_id", "rpm_limit", "tpm_limit", "max_parallel_requests", "metadata",
                 "blocked", "other"})
json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70),
                         st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=12),
                         st.sampled_from(["24h", "7x", "sk-x", "0" * 64, "org-1", "", "\x00", "1d", "-5"]))
json_values = st.recursive(json_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=5), inner, max_size=3)), max_leaves=8)
POSTS = [path for method, path, _ in ENDPOINTS if method == "POST"]
GETS = [path for method, path, _ in ENDPOINTS if method == "GET"]


@settings(deadline=None, database=None, max_examples=150,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(path=st.sampled_from(POSTS), body=st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=4))
async def test_fuzz_bodies_never_500(api, path, body):
    raw = json.dumps(body).encode("utf-8", "surrogatepass")
    status, data = await api.call("POST", path, raw=raw, headers={**AUTH, "Content-Type": "application/json"})
    assert status in (200, 400, 404), (status, data)


@settings(deadline=None, database=None, max_examples=100,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(path=st.sampled_from(GETS),
       query=st.dictionaries(st.sampled_from(["key", "team_id", "user_id", "api_key", "page", "size", "page_size",
                                              "start_date", "end_date", "other"]), st.text(max_size=20), max_size=3))
async def test_fuzz_queries_never_500(api, path, query):
    status, data = await api.call("GET", path, query=query)
    assert status in (200, 400, 404), (status, data)


async def test_a_known_path_with_another_method_is_405_for_the_master_key_only(api):
    status, err = await api.error("POST", "/key/list", body={})
    assert status == 405 and err["code"] == "method_not_allowed" and "GET" in err["message"]
    async with api.session.post(api.proxy.url + "/key/info", headers=AUTH, json={}) as resp:
        assert resp.status == 405 and resp.headers["Allow"] == "GET"
    status, err = await api.error("GET", "/key/generate")
    assert status == 405
    # who holds no valid key learns nothing about which paths exist
    status, err = await api.error("POST", "/key/list", body={}, headers={})
    assert status == 401
    status, err = await api.error("DELETE", "/key/generate", headers={"Authorization": "Bearer sk-wrong"})
    assert status == 401


# --- LiteLLM's key fields (issue 12): tags, soft_budget, a key the caller brings --------------


async def test_tags_soft_budget_and_a_key_the_caller_brings(make_proxy, upstream, backend, tmp_path):
    import importlib.util

    if importlib.util.find_spec("llmproxy.middlewares.auth") is None:
        pytest.skip("middleware not installed: auth")
    proxy = await make_proxy(openai_config(upstream, middlewares=["auth"], **backend))
    brought = "sk-" + "Lite_LLM-key-0123456789"  # 23 characters after sk-, as LiteLLM's keys are
    async with aiohttp.ClientSession() as session:
        api = Api(proxy, session)
        made = await api.ok("POST", "/key/generate", {"key": brought, "tags": ["team-a", "ci", "ci"],
                                                      "soft_budget": 1.5, "key_alias": "moved"})
        assert made["key"] == brought and made["token"] == hashlib.sha256(brought.encode()).hexdigest()
        assert (made["tags"], made["soft_budget"], made["soft_budget_exceeded"]) == (["team-a", "ci"], 1.5, False)
        async with session.post(proxy.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {brought}"},
                                json={"model": "gpt-test", "messages": [{"role": "user", "content": "x"}]}) as r:
            assert r.status == 200  # the brought key authenticates like a made one
        info = (await api.ok("GET", "/key/info", query={"key": brought}))["info"]
        assert (info["tags"], info["soft_budget"]) == (["team-a", "ci"], 1.5)
        listed = await api.ok("GET", "/key/list", query={"return_full_object": "true"})
        assert listed["keys"][0]["tags"] == ["team-a", "ci"]

        updated = await api.ok("POST", "/key/update", {"key": brought, "tags": ["b"], "soft_budget": 0})
        assert (updated["tags"], updated["soft_budget"], updated["soft_budget_exceeded"]) == (["b"], 0.0, True)
        cleared = await api.ok("POST", "/key/update", {"key": made["token"], "tags": None, "soft_budget": None})
        assert (cleared["tags"], cleared["soft_budget"], cleared["soft_budget_exceeded"]) == ([], None, False)

        status, err = await api.error("POST", "/key/generate", {"key": brought})
        assert status == 400 and "already exists" in err["message"] and brought not in err["message"]
        for bad_key in ("sk-short", "pk-" + "a" * 30, "sk-" + "a" * 20 + " b", "sk-" + "a" * 257, 12, "",
                        "sk-" + "é" * 25):
            status, err = await api.error("POST", "/key/generate", {"key": bad_key})
            assert (status, err["param"]) == (400, "key"), bad_key
        for body, field in (({"tags": "a"}, "tags"), ({"tags": ["x" * 129]}, "tags[0]"),
                            ({"tags": [str(i) for i in range(65)]}, "tags"), ({"soft_budget": -1}, "soft_budget")):
            status, err = await api.error("POST", "/key/generate", body)
            assert (status, err["param"]) == (400, field), body
    if not backend:
        db = proxy.gateway.config.database.sqlite_path
        stored = b"".join(open(p, "rb").read() for p in (db, db + "-wal") if os.path.exists(p))
        assert brought.encode() not in stored  # kept as its hash only, like any key


@pytest.mark.parametrize("middlewares, checked", [([{"pii": {"mode": "mask"}}], True), ([], False)])
async def test_team_metadata_pii_is_checked_when_written(make_proxy, upstream, middlewares, checked):
    import importlib.util

    if checked and importlib.util.find_spec("llmproxy.middlewares.pii") is None:
        pytest.skip("middleware not installed: pii")
    proxy = await make_proxy(openai_config(upstream, middlewares=middlewares))
    async with aiohttp.ClientSession() as session:
        api = Api(proxy, session)
        good = await api.ok("POST", "/team/new", {"team_id": "t-ok", "metadata": {"pii": {"mode": "block"}}})
        assert good["metadata"] == {"pii": {"mode": "block"}}
        for pii in ({"mode": "shout"}, "block", {"entities": ["NOT_AN_ENTITY"]}, {"no_such_option": 1}):
            status, data = await api.call("POST", "/team/new", {"team_id": "t-bad", "metadata": {"plan": "x", "pii": pii}})
            if checked:
                assert status == 400 and data["error"]["param"] == "metadata.pii", (pii, data)
                assert data["error"]["message"].startswith("metadata.pii"), data
            else:  # no middleware reads metadata.pii: kept as any other metadata
                assert status == 200
                await api.ok("POST", "/team/delete", {"team_ids": ["t-bad"]})
        status, data = await api.call("POST", "/team/update", {"team_id": "t-ok", "metadata": {"pii": {"mode": "x"}}})
        assert status == (400 if checked else 200)
        if checked:
            team = (await api.ok("GET", "/team/info", query={"team_id": "t-ok"}))["team_info"]
            assert team["metadata"] == {"pii": {"mode": "block"}}  # the refused update changed nothing
