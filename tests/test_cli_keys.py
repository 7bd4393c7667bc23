"""`llmproxy migrate` and `llmproxy keys create|list|revoke` as an operator runs them: real
processes on a config file, including while a proxy serves from the same SQLite file."""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import subprocess
import sys
import time
import urllib.request
from datetime import datetime, timedelta, timezone
from pathlib import Path

import aiohttp
import pytest
import yaml

from .conftest import MASTER, openai_config
from .test_cli import free_port, stop, wait_live

AUTH = {"Authorization": f"Bearer {MASTER}"}


def write_config(tmp_path: Path, **extra) -> tuple[str, str]:
    """A config file whose store is a SQLite file in tmp_path: (config path, database path)."""
    db = str(tmp_path / "keys.db")
    config = {"master_key": MASTER, "database": {"sqlite_path": db},
              "models": [{"name": "demo", "deployments": [{"provider": "mock"}]}], **extra}
    path = tmp_path / "llmproxy.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path), db


async def cli(*args: str) -> tuple[int, str, str]:
    """`python -m llmproxy ARGS` without blocking the event loop (a proxy may be serving on it)."""
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "llmproxy", *args,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode, out.decode(), err.decode()


async def test_migrate_sqlite(tmp_path):
    config, db = write_config(tmp_path)
    code, out, _ = await cli("migrate", "--config", config)
    assert code == 0 and out.strip() == f"sqlite {db}: applied 0001_init, 0002_audit_served_model, 0003_key_tags_soft_budget, 0004_spend_trace_id, 0005_subscriptions, 0006_spend_unpriced"
    code, out, _ = await cli("migrate", "--config", config)
    assert code == 0 and out.strip() == f"sqlite {db}: up to date"


async def test_migrate_postgres(tmp_path, pg_url):
    path = tmp_path / "pg.yaml"
    path.write_text(yaml.safe_dump({"database_url": pg_url, "models": [{"name": "d", "deployments": [{"provider": "mock"}]}]}))
    code, out, _ = await cli("migrate", "--config", str(path))
    assert code == 0 and out.strip().endswith(": applied 0001_init, 0002_audit_served_model, 0003_key_tags_soft_budget, 0004_spend_trace_id, 0005_subscriptions, 0006_spend_unpriced") and out.startswith("postgresql ")
    code, out, _ = await cli("migrate", "--config", str(path))
    assert code == 0 and out.strip().endswith(": up to date")


async def test_keys_while_a_proxy_serves_the_same_file(tmp_path, make_proxy, upstream):
    config, db = write_config(tmp_path)
    proxy = await make_proxy(openai_config(upstream, database={"sqlite_path": db}))
    async with aiohttp.ClientSession(headers=AUTH) as http:
        async with http.post(proxy.url + "/team/new", json={"team_id": "org-1"}) as r:
            assert r.status == 200

        # create: the key once, its id and expiry; the running proxy sees it at once.
        code, out, err = await cli("keys", "create", "--config", config, "--alias", "ci", "--team", "org-1",
                                   "--user", "session-1", "--models", "gpt-test, claude-test", "--duration", "24h",
                                   "--max-budget", "5", "--budget-duration", "30d", "--rpm", "10", "--tpm", "1000",
                                   "--max-parallel", "2")
        assert code == 0, err
        fields = dict(re.findall(r"^(key|id|expires):\s+(\S+)$", out, re.M))
        key, key_id = fields["key"], fields["id"]
        assert key.startswith("sk-") and key_id == hashlib.sha256(key.encode()).hexdigest()
        expires = datetime.fromisoformat(fields["expires"])
        assert abs(expires - datetime.now(timezone.utc) - timedelta(hours=24)) < timedelta(seconds=60)
        assert "shown only this once" in err
        async with http.get(proxy.url + "/key/info", params={"key": key}) as r:
            info = (await r.json())["info"]
        assert (info["key_alias"], info["team_id"], info["user_id"], info["models"], info["max_budget"],
                info["budget_duration"], info["rpm_limit"], info["tpm_limit"], info["max_parallel_requests"]) == \
            ("ci", "org-1", "session-1", ["gpt-test", "claude-test"], 5.0, "30d", 10, 1000, 2)

        # The proxy writes too, meanwhile.
        async with http.post(proxy.url + "/key/generate", json={"user_id": "session-2"}) as r:
            other = await r.json()
        code, out, _ = await cli("keys", "create", "--config", config, "--json")
        assert code == 0
        third = json.loads(out)

        # list: a table of every key, never a key.
        code, out, _ = await cli("keys", "list", "--config", config)
        assert code == 0
        lines = out.strip().splitlines()
        assert lines[0].split() == ["ID", "ALIAS", "TEAM", "USER", "MODELS", "EXPIRES", "BLOCKED"]
        assert lines[1].split()[:5] == [key_id[:12], "ci", "org-1", "session-1", "gpt-test,claude-test"]
        assert lines[1].split()[-1] == "no"
        assert lines[2].split() == [other["token"][:12], "-", "-", "session-2", "*", "never", "no"]
        assert lines[3].startswith(third["token"][:12]) and len(lines) == 4
        assert key not in out and other["key"] not in out and third["key"] not in out
        code, out, _ = await cli("keys", "list", "--config", config, "--team", "org-1")
        assert len(out.strip().splitlines()) == 2
        code, out, _ = await cli("keys", "list", "--config", config, "--user", "nobody")
        assert len(out.strip().splitlines()) == 1

        # revoke, by key and by id; an unknown one is reported and makes the exit code 1.
        code, out, err = await cli("keys", "revoke", "--config", config, key, other["token"], "sk-never-issued-0000")
        assert code == 1
        assert out.splitlines() == [f"deleted {key_id} (sk-...{key[-4:]})", f"deleted {other['token']}"]
        assert "not found: sk-...0000" in err and key not in out + err
        for ref in (key, other["token"]):
            async with http.get(proxy.url + "/key/info", params={"key": ref}) as r:
                assert r.status == 404
        code, out, _ = await cli("keys", "revoke", "--config", config, third["token"])
        assert code == 0

    assert key.encode() not in Path(db).read_bytes() + Path(db + "-wal").read_bytes()


@pytest.mark.parametrize("args, fragment", [
    (["--team", "no-such-team"], "team 'no-such-team' not found"),
    (["--duration", "7x"], "'duration' must be a duration"),
    (["--max-budget", "-1"], "'max_budget' must not be negative"),
    (["--models", ","], None),  # an empty list: every model
])
async def test_keys_create_bad_options(tmp_path, args, fragment):
    config, _ = write_config(tmp_path)
    code, out, err = await cli("keys", "create", "--config", config, *args)
    if fragment is None:
        assert code == 0 and out.startswith("key:")
    else:
        assert code == 2 and fragment in err and "sk-" not in out


async def test_keys_without_a_database(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"database_url": "postgresql://nobody@127.0.0.1:1/none",
                                    "models": [{"name": "d", "deployments": [{"provider": "mock"}]}]}))
    code, _, err = await cli("keys", "list", "--config", str(path))
    assert code == 1 and err.startswith("database unavailable")
    code, _, err = await cli("keys", "list", "--config", str(tmp_path / "missing.yaml"))
    assert code == 2 and "cannot read the config file" in err


async def test_revoke_reaches_a_running_proxy_through_redis(tmp_path, make_proxy, upstream, redis_url):
    config, db = write_config(tmp_path, redis_url=redis_url)
    proxy = await make_proxy(openai_config(upstream, database={"sqlite_path": db}, redis_url=redis_url))
    seen: list[tuple[str, str]] = []
    proxy.gateway.services.invalidator.subscribe(lambda kind, ident: seen.append((kind, ident)))
    loop = asyncio.get_running_loop()
    end = loop.time() + 10
    while ("*", "*") not in seen and loop.time() < end:  # the proxy's subscription is live
        await asyncio.sleep(0.02)
    code, out, _ = await cli("keys", "create", "--config", config)
    key_id = re.search(r"^id:\s+(\S+)$", out, re.M)[1]
    code, out, _ = await cli("keys", "revoke", "--config", config, key_id)
    assert code == 0
    while ("key", key_id) not in seen and loop.time() < end:
        await asyncio.sleep(0.02)
    assert ("key", key_id) in seen


def test_admin_port_serves_the_admin_api_alone(tmp_path):
    port, admin_port = free_port(), free_port()
    config, _ = write_config(tmp_path, server={"port": port, "admin_port": admin_port})
    proc = subprocess.Popen([sys.executable, "-m", "llmproxy", "serve", "--config", config],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_live(port, proc)

        def get(p: int, path: str) -> int:
            request = urllib.request.Request(f"http://127.0.0.1:{p}{path}", headers=AUTH)
            try:
                with urllib.request.urlopen(request, timeout=5) as resp:
                    return resp.status
            except urllib.error.HTTPError as exc:
                return exc.code

        end = time.monotonic() + 10
        while get(admin_port, "/key/list") != 200 and time.monotonic() < end:
            time.sleep(0.05)
        assert get(admin_port, "/key/list") == 200
        assert get(port, "/key/list") == 404
        assert get(admin_port, "/v1/models") == 404
    finally:
        assert stop(proc) == 0


async def test_revoke_takes_the_short_id_that_list_prints(tmp_path):
    from llmproxy.store import KeyInfo, open_store

    config, db = write_config(tmp_path)
    store = await open_store(None, sqlite_path=db)
    await store.migrate()
    past = datetime.now(timezone.utc) - timedelta(days=1)
    made = {}
    for ident in ("abcdef01" + "0" * 56, "abcdef02" + "0" * 56, "123456ff" + "0" * 56):  # two share a prefix
        made[ident] = await store.create_key(ident, KeyInfo(id=ident, key_prefix="sk-...", blocked=ident[0] == "1",
                                                            expires_at=past if ident[0] == "1" else None))
    await store.close()

    code, out, err = await cli("keys", "list", "--config", config)
    assert code == 0 and f"sqlite {db}: 3 keys" in err
    line = next(ln for ln in out.splitlines() if ln.startswith("123456ff0000"))
    assert "(expired)" in line and line.split()[-1] == "yes"  # expired and blocked, said so

    code, out, err = await cli("keys", "revoke", "--config", config, "abcdef")  # two keys start so
    assert code == 1 and "ambiguous: abcdef is the start of 2 keys" in err and not out
    code, out, err = await cli("keys", "revoke", "--config", config, "123456ff0000")  # the short id
    assert code == 0 and out.strip() == f"deleted {'123456ff' + '0' * 56} (123456ff0000)"
    assert f"sqlite {db}: 1 deleted" in err and "within their auth cache_ttl" in err
    code, out, err = await cli("keys", "revoke", "--config", config, "ffffff")
    assert code == 1 and "not found: ffffff" in err


async def test_teams_create_list_delete_while_a_proxy_serves(tmp_path, make_proxy, upstream):
    """`llmproxy teams`: what /team/new, the team list and /team/delete do, from a shell,
    on the store a running proxy uses (which sees each change)."""
    config, db = write_config(tmp_path)
    proxy = await make_proxy(openai_config(upstream, database={"sqlite_path": db}))
    code, out, err = await cli("teams", "create", "--config", config, "--id", "org-1", "--alias", "Org One",
                               "--models", "gpt-test", "--max-budget", "12.5", "--budget-duration", "30d",
                               "--rpm", "60", "--tpm", "1000", "--max-parallel", "3")
    assert code == 0, err
    assert out.strip() == "team:    org-1 (Org One)"
    assert f"sqlite {db}: created" in err and "keys create --team org-1" in err
    code, out, _ = await cli("teams", "create", "--config", config, "--json")
    assert code == 0
    other = json.loads(out)
    assert re.fullmatch(r"[0-9a-f-]{36}", other["team_id"]) and other["models"] == []
    code, _, err = await cli("teams", "create", "--config", config, "--id", "org-1")
    assert code == 2 and "team org-1 already exists" in err and "Traceback" not in err
    code, _, err = await cli("teams", "create", "--config", config, "--rpm", "-1")
    assert code == 2 and "'rpm_limit'" in err

    async with aiohttp.ClientSession(headers=AUTH) as http:
        async with http.get(proxy.url + "/team/info", params={"team_id": "org-1"}) as r:
            info = (await r.json())["team_info"]
        assert (info["team_alias"], info["models"], info["max_budget"], info["budget_duration"], info["rpm_limit"],
                info["tpm_limit"], info["max_parallel_requests"]) == ("Org One", ["gpt-test"], 12.5, "30d", 60, 1000, 3)
        keys = []
        for _ in range(2):
            async with http.post(proxy.url + "/key/generate", json={"team_id": "org-1"}) as r:
                keys.append((await r.json())["key"])

        code, out, err = await cli("teams", "list", "--config", config)
        assert code == 0 and f"sqlite {db}: 2 teams" in err
        lines = out.strip().splitlines()
        assert lines[0].split() == ["ID", "ALIAS", "MODELS", "BUDGET", "RPM", "TPM", "PARALLEL", "KEYS", "BLOCKED"]
        rows = {line.split()[0]: line for line in lines[1:]}
        assert rows["org-1"].split() == ["org-1", "Org", "One", "gpt-test", "$12.5/30d", "60", "1000", "3", "2", "no"]
        assert rows[other["team_id"]].split() == [other["team_id"], "-", "*", "-", "-", "-", "-", "0", "no"]

        code, _, err = await cli("teams", "delete", "--config", config, "org-1", "no-such-team")
        assert code == 2 and "Team not found: no-such-team; nothing was deleted." in err
        code, out, err = await cli("teams", "delete", "--config", config, "org-1")
        assert code == 0 and out.strip() == "deleted team org-1"
        assert "1 team and 2 keys deleted" in err and "cache_ttl" in err
        async with http.get(proxy.url + "/team/info", params={"team_id": "org-1"}) as r:
            assert r.status == 404
        for key in keys:
            async with http.get(proxy.url + "/key/info", params={"key": key}) as r:
                assert r.status == 404
    code, out, _ = await cli("teams", "list", "--config", config)
    assert len(out.strip().splitlines()) == 2
