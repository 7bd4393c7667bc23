"""Admin calls take the record path: one record each (an `event: admin` access line and
`llmproxy_admin_requests_total`), and writes land in the audit log, read at `/audit/logs`."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import re
from typing import Any, AsyncIterator

import aiohttp
import pytest
from structlog.testing import capture_logs

from llmproxy.accesslog import AccessLog

from .conftest import MASTER, fresh_database, needs

# The admin API and its audit log are the core's; `auth` is on where it is installed (a
# virtual key needs it, and it is how the gateway runs in production).
WITH_AUTH = ["auth"] if importlib.util.find_spec("llmproxy.middlewares.auth") else []
AUTH = {"Authorization": f"Bearer {MASTER}"}
MODELS = [{"name": "cheap", "deployments": [{"provider": "mock", "model": "cheap"}]}]


@pytest.fixture(params=["sqlite", "postgres"])
async def proxy(request, make_proxy) -> AsyncIterator[Any]:
    config: dict[str, Any] = {"master_key": MASTER, "models": MODELS, "middlewares": WITH_AUTH,
                              "server": {"access_log": True}}
    async with contextlib.AsyncExitStack() as stack:
        if request.param == "postgres":
            config["database_url"] = await stack.enter_async_context(fresh_database())
        yield await make_proxy(config)


async def call(proxy: Any, method: str, path: str, body: Any = None, params: Any = None,
               headers: dict[str, str] | None = None) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as s:
        async with s.request(method, proxy.url + path, json=body, params=params,
                             headers=AUTH if headers is None else headers) as r:
            return r.status, await r.json()


async def test_every_admin_call_is_one_record_and_writes_are_audited(proxy) -> None:
    status, team = await call(proxy, "POST", "/team/new", {"team_id": "t1", "max_budget": 5})
    assert status == 200
    status, made = await call(proxy, "POST", "/key/generate", {"team_id": "t1", "key_alias": "a", "models": ["cheap"]})
    key_id = made["token"]
    assert (await call(proxy, "POST", "/key/update", {"key": made["key"], "rpm_limit": 10}))[0] == 200
    assert (await call(proxy, "GET", "/key/info", params={"key": key_id}))[0] == 200
    assert (await call(proxy, "POST", "/key/update", {"key": "sk-nope", "rpm_limit": 1}))[0] == 404
    assert (await call(proxy, "POST", "/key/generate", {"rpm_limit": -1}))[0] == 400
    assert (await call(proxy, "POST", "/key/block", {"key": key_id}, headers={}))[0] == 401
    records = [r for r in proxy.records if r.api == "admin"]
    assert [(r.action, r.status) for r in records] == [
        ("team.new", 200), ("key.generate", 200), ("key.update", 200), ("key.info", 200), ("key.update", 404),
        ("key.generate", 400), ("key.block", 401)]
    assert [r.target_id for r in records[:4]] == ["t1", key_id, key_id, key_id]
    assert [r.actor for r in records] == ["master"] * 6 + [None]
    assert len({r.request_id for r in records}) == 7
    # the record is kept of secrets: no key, no master key, anywhere in it
    for r in records:
        assert made["key"] not in repr(r) and MASTER not in repr(r)

    status, rows = await call(proxy, "GET", "/audit/logs")
    assert status == 200
    # writes only (not key.info, not the unauthorized call), newest first, field names not values
    assert [(r["action"], r["target_id"], r["status"], r["changes"]) for r in rows] == [
        ("key.generate", None, 400, ["rpm_limit"]),
        ("key.update", hashlib.sha256(b"sk-nope").hexdigest(), 404, ["rpm_limit"]),  # the id of the key named
        ("key.update", key_id, 200, ["rpm_limit"]),
        ("key.generate", key_id, 200, ["key_alias", "models", "team_id"]),
        ("team.new", "t1", 200, ["max_budget", "team_id"]),
    ]
    assert all(r["actor"] == "master" and r["request_id"] for r in rows)
    assert {r["request_id"] for r in rows} <= {r.request_id for r in records}


async def test_audit_logs_filter_and_page(proxy) -> None:
    for i in range(5):
        assert (await call(proxy, "POST", "/team/new", {"team_id": f"team-{i}"}))[0] == 200
    assert (await call(proxy, "POST", "/team/update", {"team_id": "team-3", "team_alias": "three"}))[0] == 200
    status, rows = await call(proxy, "GET", "/audit/logs", params={"action": "team.new", "page_size": "2"})
    assert status == 200 and [r["target_id"] for r in rows] == ["team-4", "team-3"]
    rows = (await call(proxy, "GET", "/audit/logs", params={"action": "team.new", "page_size": "2", "page": "3"}))[1]
    assert [r["target_id"] for r in rows] == ["team-0"]
    rows = (await call(proxy, "GET", "/audit/logs", params={"action": "team.new", "page_size": "2", "page": "4"}))[1]
    assert rows == []
    rows = (await call(proxy, "GET", "/audit/logs", params={"target_id": "team-3"}))[1]
    assert [r["action"] for r in rows] == ["team.update", "team.new"]
    assert rows[0]["changes"] == ["team_alias"]
    rows = (await call(proxy, "GET", "/audit/logs", params={"start_date": "2999-01-01"}))[1]
    assert rows == []
    rows = (await call(proxy, "GET", "/audit/logs", params={"end_date": "2000-01-01", "actor": "master"}))[1]
    assert rows == []
    rows = (await call(proxy, "GET", "/audit/logs", params={"start_date": "2000-01-01", "actor": "master"}))[1]
    assert len(rows) == 6
    status, err = await call(proxy, "GET", "/audit/logs", params={"page": "0"})
    assert status == 400 and err["error"]["param"] == "page"


@needs("auth")
async def test_a_virtual_key_gets_403_on_the_audit_log(proxy) -> None:
    made = (await call(proxy, "POST", "/key/generate", {}))[1]
    status, err = await call(proxy, "GET", "/audit/logs", headers={"Authorization": f"Bearer {made['key']}"})
    assert status == 403 and err["error"]["type"] == "permission_error"
    status, _ = await call(proxy, "GET", "/audit/logs", headers={})
    assert status == 401


async def test_admin_calls_are_access_lines_and_counted(proxy) -> None:
    await call(proxy, "POST", "/team/new", {"team_id": "t9"})
    await call(proxy, "POST", "/team/new", {"team_id": "t9"})  # exists already: 400
    await call(proxy, "GET", "/team/info", headers={})
    access = next(s for s in proxy.gateway.sinks if isinstance(s, AccessLog))
    with capture_logs() as logs:
        access.flush()
    lines = [e for e in logs if e["event"] == "admin"]
    assert [(e["action"], e["actor"], e["target_id"], e["status"]) for e in lines] == [
        ("team.new", "master", "t9", 200), ("team.new", "master", "t9", 400), ("team.info", None, None, 401)]
    assert all(isinstance(e["duration_ms"], float) and e["request_id"] for e in lines)
    assert not [e for e in logs if e["event"] == "request"]
    async with aiohttp.ClientSession() as s:
        async with s.get(proxy.url + "/metrics") as r:
            text = await r.text()

    def value(action: str, status: int) -> float:
        found = re.search(rf'^llmproxy_admin_requests_total\{{action="{action}",status="{status}"\}} (\S+)$', text, re.M)
        return float(found.group(1)) if found else 0.0
    assert (value("team.new", 200), value("team.new", 400), value("team.info", 401)) == (1.0, 1.0, 1.0)
    assert 'llmproxy_requests_total{deployment="",model="",status="401"}' not in text  # not a data-plane request
