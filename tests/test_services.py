"""Shared services: the Redis client holds up under more concurrent calls than its pool."""

from __future__ import annotations

import asyncio

from llmproxy.services import open_redis


async def test_redis_client_waits_for_a_connection_instead_of_failing(redis_url):
    # what is under test is the waiting, not the speed: a loaded machine gets time to connect
    client = open_redis(redis_url, max_connections=8, timeout=5)
    try:
        answers = await asyncio.gather(*[client.ping() for _ in range(300)])
        assert all(answers)
    finally:
        await client.aclose()
