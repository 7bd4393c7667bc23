"""Bad input never produces a 500 (SPEC §2), and background work survives its own failures
(issue 12)."""

from __future__ import annotations

import asyncio
import importlib.util
from typing import Any

import orjson
import pytest
from structlog.testing import capture_logs

from .conftest import MASTER, needs

BODY = b'{"model":"mock","messages":[{"role":"user","content":"hi"}]}'
MOCK = [{"name": "mock", "deployments": [{"provider": "mock"}]}]


async def raw_request(port: int, head: bytes, body: bytes = b"") -> tuple[int, bytes]:
    """One HTTP/1.1 request written byte for byte (no client library would send these)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head + b"Content-Length: " + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body)
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
    status = int(answer.split(b" ", 2)[1])
    return status, answer.partition(b"\r\n\r\n")[2]


@pytest.mark.parametrize("mode", ["master_key", pytest.param("auth", marks=needs("auth"))])
@pytest.mark.parametrize("header", [b"Authorization: Bearer ", b"x-api-key: ", b"api-key: "])
@pytest.mark.parametrize("path", [b"POST /v1/chat/completions", b"GET /v1/models", b"GET /key/list"])
async def test_a_key_that_is_not_utf8_is_401(make_proxy, mode: str, header: bytes, path: bytes) -> None:
    config: dict[str, Any] = {"master_key": MASTER, "models": MOCK}
    if mode == "auth":
        config["middlewares"] = ["auth"]
    proxy = await make_proxy(config)
    with capture_logs() as logs:
        status, body = await raw_request(proxy.server.port, path + b" HTTP/1.1\r\nHost: x\r\n" + header +
                                         b"\xff\xfe\x80\r\nContent-Type: application/json\r\n", BODY)
    assert status == 401
    assert orjson.loads(body)["error"]["code"] == "invalid_api_key"
    assert not [e for e in logs if e.get("log_level") == "error"]


async def test_a_periodic_step_that_raises_is_logged_and_the_loop_goes_on() -> None:
    from llmproxy.periodic import every

    calls = []
    now = [0.0]

    def step() -> None:
        calls.append(1)
        now[0] += 1.0
        if len(calls) <= 150:
            raise RuntimeError("drain failed")

    with capture_logs() as logs:
        task = asyncio.create_task(every(0, step, "test_step", clock=lambda: now[0]))
        loop = asyncio.get_running_loop()
        end = loop.time() + 5
        while len(calls) < 200 and loop.time() < end:
            await asyncio.sleep(0.001)
        task.cancel()
    assert len(calls) >= 200  # it kept running past 150 failures
    events = [(e["event"], e.get("failures")) for e in logs]
    assert events[0] == ("periodic_task_failed", None)  # the first with its traceback
    assert ("periodic_task_failing", 60) in events  # then once a minute, with the count
    assert len(events) <= 4


async def test_the_metrics_flush_survives_a_failing_drain(make_proxy, monkeypatch) -> None:
    proxy = await make_proxy({"models": MOCK})
    metrics = proxy.gateway.services.metrics
    real, failures = metrics.drain, []

    def flaky() -> None:
        if len(failures) < 2:
            failures.append(1)
            raise RuntimeError("boom")
        real()

    monkeypatch.setattr(metrics, "drain", flaky)
    loop = asyncio.get_running_loop()
    end = loop.time() + 5
    while len(failures) < 2 and loop.time() < end:
        await asyncio.sleep(0.05)
    assert len(failures) == 2
    flusher = next(s for s in proxy.gateway.sinks if hasattr(s, "_flusher") and type(s).__name__ == "MetricsSink")
    await asyncio.sleep(1.2)
    assert not flusher._flusher.done()  # still running after two failed drains


# --- what the client learns of the upstream --------------------------------------------------


def closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the block ends: nothing listens there


async def test_an_unreachable_upstream_is_named_by_its_deployment_not_its_address(make_proxy) -> None:
    import openai

    port = closed_port()
    proxy = await make_proxy({"master_key": MASTER, "router": {"num_retries": 0, "cooldown_seconds": 0},
                              "models": [{"name": "gpt", "deployments": [{
                                  "provider": "openai", "model": "gpt-up", "api_base": f"http://127.0.0.1:{port}/v1",
                                  "api_key": "sk-provider", "timeout": 2}]}]})
    client = openai.AsyncOpenAI(api_key=MASTER, base_url=proxy.url + "/v1", max_retries=0)
    with capture_logs() as logs:
        with pytest.raises(openai.APIStatusError) as info:
            await client.chat.completions.create(model="gpt", messages=[{"role": "user", "content": "hi"}])
    assert info.value.status_code == 502
    message = info.value.body["message"] if isinstance(info.value.body, dict) else str(info.value.body)
    assert "openai:gpt-up" in message
    assert str(port) not in message and "127.0.0.1" not in message
    assert any(e["event"] == "upstream_unreachable" and str(port) in e["error"] for e in logs)


async def test_the_providers_account_headers_stay_with_the_proxy(upstream, make_proxy) -> None:
    from llmproxy.testing import reply_json

    from .conftest import openai_config

    proxy = await make_proxy(openai_config(upstream))
    upstream.push(reply_json(200, {"id": "c", "object": "chat.completion", "model": "gpt-upstream", "choices": [],
                                   "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}},
                             headers={"openai-organization": "org-operator", "openai-project": "proj_operator",
                                      "anthropic-organization-id": "ant-org", "openai-processing-ms": "12"}))
    import aiohttp

    async with aiohttp.ClientSession() as s:
        async with s.post(proxy.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {MASTER}"},
                          json={"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]}) as r:
            assert r.status == 200
            names = {n.lower() for n in r.headers}
    assert not names & {"openai-organization", "openai-project", "anthropic-organization-id"}
    assert "openai-processing-ms" in names  # what describes the answer still passes


# --- the first hour of an operator ------------------------------------------------------------


@pytest.mark.parametrize("middlewares", [[], pytest.param(["auth"], marks=needs("auth"))])
def test_a_master_key_whose_variable_is_unset_refuses_to_start(middlewares) -> None:
    from llmproxy.config import ConfigError, parse_config
    from llmproxy.plugins import Registry, check_config

    config = parse_config({"master_key": "os.environ/LLMPROXY_TEST_UNSET_MASTER", "models": MOCK,
                           "middlewares": middlewares}, env={})
    with pytest.raises(ConfigError) as info:
        check_config(config, Registry.from_entry_points())
    [message] = [m for m in info.value.messages if m.startswith("master_key:")]
    assert "LLMPROXY_TEST_UNSET_MASTER is not set" in message and "the admin API" in message
    assert ("auth" in message) == bool(middlewares)
    set_ = parse_config({"master_key": "os.environ/LLMPROXY_TEST_UNSET_MASTER", "models": MOCK,
                         "middlewares": middlewares}, env={"LLMPROXY_TEST_UNSET_MASTER": "sk-set"})
    check_config(set_, Registry.from_entry_points())  # set: fine


@needs("scheduler", "pii")
async def test_the_scheduler_before_pii_takes_no_quota_for_what_pii_refuses(upstream, make_proxy) -> None:
    """SPEC §3 worries that a scheduler listed before pii or cache spends provider quota on
    requests those answer or refuse. Here the scheduler only installs the admission step;
    the quota is taken when the forwarder sends upstream, so the order costs nothing."""
    import aiohttp

    from .conftest import openai_config

    config = openai_config(upstream, middlewares=[{"scheduler": {}}, {"pii": {"mode": "block"}}])
    config["models"][0]["deployments"][0].update({"rpm": 1, "burst": 1, "max_queue_wait": 0})
    with capture_logs() as logs:
        proxy = await make_proxy(config)
    # ... and the start says so, once (SPEC §3 reads as if it mattered)
    [note] = [e for e in logs if e["event"] == "middleware_order"]
    assert note["log_level"] == "warning" and "scheduler is listed before pii" in note["detail"]
    assert "take none" in note["detail"] and "changes nothing" in note["detail"]
    statuses = []
    async with aiohttp.ClientSession() as s:
        for content in ["mail jane.doe@example.com"] * 3 + ["hello", "hello again"]:
            async with s.post(proxy.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {MASTER}"},
                              json={"model": "gpt-test", "messages": [{"role": "user", "content": content}]}) as r:
                statuses.append(r.status)
    assert statuses == [400, 400, 400, 200, 429]  # the one request of quota went to the first clean one


@needs("scheduler", "pii")
async def test_the_recommended_order_logs_no_order_note(upstream, make_proxy) -> None:
    from .conftest import openai_config

    with capture_logs() as logs:
        await make_proxy(openai_config(upstream, middlewares=[{"pii": {"mode": "block"}}, {"scheduler": {}}]))
    assert not [e for e in logs if e["event"] == "middleware_order"]


# --- health as documented --------------------------------------------------------------------


async def test_health_alias_readiness_details_and_process_metrics(upstream, make_proxy) -> None:
    import aiohttp

    from .conftest import openai_config

    mws = [{"scheduler": {}}] if importlib.util.find_spec("llmproxy.middlewares.scheduler") else []
    proxy = await make_proxy(openai_config(upstream, middlewares=mws))
    async with aiohttp.ClientSession() as s:
        async with s.get(proxy.url + "/health") as r:
            assert r.status == 200 and (await r.json()) == {"status": "ok"}
        async with s.get(proxy.url + "/health/readiness") as r:
            state = await r.json()
        async with s.get(proxy.url + "/metrics") as r:
            text = await r.text()
    assert state["status"] == "ready"
    spend = state["details"]["spend_log"]
    assert {"state", "queued", "spilling", "spilled", "written"} <= set(spend) and spend["queued"] >= 0
    if mws:
        assert state["details"]["scheduler"] == {"mode": "local", "replicas": 1}
    assert "process_resident_memory_bytes" in text and "process_cpu_seconds_total" in text
