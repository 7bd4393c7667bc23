"""Shared fixtures: a recording fake upstream and an in-process proxy in front of it."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
from typing import Any, AsyncIterator, Callable

import pytest
from aiohttp.test_utils import TestServer
from hypothesis import settings

from llmproxy.config import parse_config
from llmproxy.plugins import Registry
from llmproxy.server import Gateway
from llmproxy.testing import FakeUpstream

settings.register_profile("ci", deadline=None, max_examples=100)
settings.register_profile("dev", deadline=None)
settings.load_profile("ci" if os.environ.get("CI") == "true" else "dev")

MASTER = "sk-test-master-0123456789abcdefghijklmnopqrstuv"


@pytest.fixture(scope="session", autouse=True)
def _private_cwd(tmp_path_factory):
    """Gateways without an explicit database write ./llmproxy.db: keep that out of the repo."""
    old = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("cwd"))
    yield
    os.chdir(old)


@pytest.fixture
async def upstream() -> AsyncIterator[FakeUpstream]:
    fake = await FakeUpstream().start()
    yield fake
    await fake.close()


class Proxy:
    def __init__(self, gateway: Gateway, server: TestServer) -> None:
        self.gateway = gateway
        self.server = server
        self.records: list[Any] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.port}"


class RecordingSink:
    def __init__(self, records: list) -> None:
        self.records = records

    def emit(self, record: Any) -> None:
        self.records.append(record)


@pytest.fixture
async def make_proxy(tmp_path) -> AsyncIterator[Callable[..., Any]]:
    servers: list[TestServer] = []

    async def make(config: dict[str, Any], registry: Registry | None = None) -> Proxy:
        config = dict(config)
        n = len(servers)
        config.setdefault("database", {"sqlite_path": str(tmp_path / f"proxy{n}.db")})
        # Every proxy its own spill file, also when the test sets other spend options: a
        # shared default path would let one test's spilled rows be replayed into another's.
        config["spend"] = {"spill_path": str(tmp_path / f"spill{n}.jsonl"), **config.get("spend", {})}
        cfg = parse_config(config)
        gateway = Gateway(cfg, registry)
        server = TestServer(gateway.app(), host="127.0.0.1")
        await server.start_server()
        servers.append(server)
        proxy = Proxy(gateway, server)
        gateway.sinks.append(RecordingSink(proxy.records))
        return proxy

    yield make
    for server in servers:
        await server.close()


def openai_config(upstream: FakeUpstream, **extra: Any) -> dict[str, Any]:
    """One OpenAI-style model and one Anthropic-style model, both on the fake upstream."""
    config: dict[str, Any] = {
        "master_key": MASTER,
        "models": [
            {"name": "gpt-test", "pricing": {"input_per_1m": 1, "output_per_1m": 2},
             "deployments": [{"provider": "openai", "model": "gpt-upstream", "api_base": upstream.url + "/v1",
                              "api_key": "sk-provider-secret", "timeout": 5}]},
            {"name": "claude-test",
             "deployments": [{"provider": "anthropic", "model": "claude-upstream", "api_base": upstream.url,
                              "api_key": "sk-ant-provider-secret", "timeout": 5}]},
        ],
        "router": {"num_retries": 1, "retry_after": 0, "cooldown_seconds": 30},
    }
    config.update(extra)
    return config


def needs(*middlewares: str) -> pytest.MarkDecorator:
    """Skip unless these built-in middlewares' packages are installed: each is a package of
    its own, and the rest of the suite runs without it (tests/test_layout.py)."""
    missing = [n for n in middlewares if importlib.util.find_spec(f"llmproxy.middlewares.{n}") is None]
    return pytest.mark.skipif(bool(missing), reason=f"middleware not installed: {', '.join(missing)}")


PG_URL = os.environ.get("LLMPROXY_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("LLMPROXY_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def service_missing(what: str, error: BaseException) -> None:
    """Skip with the reason, except under CI=true, where a missing service is a failure."""
    message = f"{what} not reachable: {type(error).__name__}: {error}"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


@contextlib.asynccontextmanager
async def fresh_database() -> AsyncIterator[str]:
    """A fresh PostgreSQL database on PG_URL's server, dropped afterwards."""
    import uuid

    import asyncpg

    name = "llmproxy_t_" + uuid.uuid4().hex[:12]
    try:
        admin = await asyncpg.connect(PG_URL, timeout=5)
    except (OSError, asyncpg.PostgresError, asyncio.TimeoutError) as exc:
        service_missing(f"PostgreSQL at {PG_URL}", exc)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    base, _, _ = PG_URL.rpartition("/")
    try:
        yield f"{base}/{name}"
    finally:
        admin = await asyncpg.connect(PG_URL, timeout=5)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


@pytest.fixture
async def pg_url() -> AsyncIterator[str]:
    """A fresh PostgreSQL database for one test, dropped afterwards."""
    async with fresh_database() as url:
        yield url


@pytest.fixture
async def redis_url() -> AsyncIterator[str]:
    import redis.asyncio as aioredis

    client = aioredis.from_url(REDIS_URL, socket_connect_timeout=2)
    try:
        await client.ping()
    except Exception as exc:
        service_missing(f"Redis at {REDIS_URL}", exc)
    finally:
        await client.aclose()
    yield REDIS_URL
