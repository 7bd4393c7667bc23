"""One chain for every request: an outer middleware sees every outcome, a request without a
valid key learns nothing (401 whatever it sends), fallbacks honour the caller's model list,
and nothing a client sends becomes a metric label or an unbounded echo."""

from __future__ import annotations

import asyncio
import importlib
import re
import sys
import textwrap
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import openai
import orjson
import pytest

from llmproxy.config import ConfigError, parse_config
from llmproxy.plugins import Registry
from llmproxy.server import Gateway
from llmproxy.testing import reply_json

from .conftest import MASTER, needs

CHEAP = {"model": "cheap", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}

PROBE_PLUGIN = '''
from llmproxy.context import ALL_APIS
from llmproxy.errors import ProxyError

SEEN = []


class Probe:
    """Outermost: notes each request's outcome and its record."""

    stage = "outer"
    apis = ALL_APIS

    def __init__(self, options, services):
        pass

    async def __call__(self, ctx, call_next):
        try:
            reply = await call_next(ctx)
        except ProxyError as exc:
            SEEN.append((exc.status, ctx.record))
            raise
        SEEN.append((reply.status, ctx.record))
        return reply
'''


@pytest.fixture
def probe_plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """A test plugin installed the way pip leaves one: a module and a dist-info folder
    declaring the entry point `probe` in `llmproxy.middlewares`, on sys.path."""
    site = tmp_path / "site"
    (site / "llmproxy_probe_test.dist-info").mkdir(parents=True)
    (site / "llmproxy_probe_test.py").write_text(textwrap.dedent(PROBE_PLUGIN))
    (site / "llmproxy_probe_test.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: llmproxy-probe-test\nVersion: 0.1\n")
    (site / "llmproxy_probe_test.dist-info" / "entry_points.txt").write_text(
        "[llmproxy.middlewares]\nprobe = llmproxy_probe_test:Probe\n")
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()
    yield
    sys.modules.pop("llmproxy_probe_test", None)


def mock_models(**pricing: Any) -> list[dict[str, Any]]:
    return [{"name": name, **({"pricing": pricing[name]} if name in pricing else {}),
             "deployments": [{"provider": "mock", "model": name}]} for name in ("cheap", "premium")]


async def post(proxy: Any, path: str, body: Any, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    kw = {"data": body} if isinstance(body, bytes) else {"json": body}
    async with aiohttp.ClientSession() as s:
        async with s.post(proxy.url + path, headers=headers or {}, **kw) as r:
            return r.status, await r.read()


async def new_key(proxy: Any, **fields: Any) -> str:
    status, raw = await post(proxy, "/key/generate", fields, {"Authorization": f"Bearer {MASTER}"})
    assert status == 200, raw
    return orjson.loads(raw)["key"]


# --- an outer middleware sees every outcome ---------------------------------------------


@needs("auth")
async def test_outermost_plugin_sees_every_outcome_once(probe_plugin, make_proxy) -> None:
    config = {"master_key": MASTER, "models": mock_models(), "server": {"max_body_bytes": 4096},
              "middlewares": ["probe", "auth"]}
    proxy = await make_proxy(config, Registry.from_entry_points())
    probe = importlib.import_module("llmproxy_probe_test")
    key = await new_key(proxy, key_alias="tenant-a")
    probe.SEEN.clear()
    proxy.records.clear()
    auth = {"Authorization": f"Bearer {key}"}
    cases = [
        (401, CHEAP, {}),
        (400, b'{"model": "cheap", ', auth),
        (404, {**CHEAP, "model": "nope"}, auth),
        (413, {**CHEAP, "messages": [{"role": "user", "content": "x" * 5000}]}, auth),
        (200, CHEAP, auth),
    ]
    for expected, body, headers in cases:
        status, _ = await post(proxy, "/v1/chat/completions", body, headers)
        assert status == expected
    assert [status for status, _ in probe.SEEN] == [401, 400, 404, 413, 200]
    # the probe saw the very records the sinks got, each filled as far as the request went
    assert [r.request_id for _, r in probe.SEEN] == [r.request_id for r in proxy.records]
    assert [r.status for r in proxy.records] == [401, 400, 404, 413, 200]
    unauth, bad, missing, big, ok = (r for _, r in probe.SEEN)
    assert unauth.key_alias is None and unauth.error_code == "invalid_api_key"
    assert {r.key_alias for r in (bad, missing, big, ok)} == {"tenant-a"}
    assert (missing.model, missing.requested_model, missing.error_code) == (None, "nope", "model_not_found")
    assert (ok.model, ok.served_model, ok.deployment) == ("cheap", "cheap", "mock:cheap")


@needs("auth")
async def test_unknown_path_is_404_for_everyone_and_outer_middlewares_see_it(probe_plugin, make_proxy) -> None:
    config = {"master_key": MASTER, "models": mock_models(), "middlewares": ["probe", "auth"]}
    proxy = await make_proxy(config, Registry.from_entry_points())
    probe = importlib.import_module("llmproxy_probe_test")
    probe.SEEN.clear()
    for headers in ({}, {"Authorization": "Bearer sk-wrong"}, {"Authorization": f"Bearer {MASTER}"}):
        status, raw = await post(proxy, "/v1/nothing/here", CHEAP, headers)
        assert status == 404 and orjson.loads(raw)["error"]["code"] == "not_found"
    assert [s for s, _ in probe.SEEN] == [404, 404, 404]


@needs("pii")
def test_a_request_middleware_before_an_identity_one_is_a_config_error() -> None:
    from llmproxy.middlewares.auth import Auth
    from llmproxy.middlewares.pii import PII
    from llmproxy.providers.mock import MockProvider

    config = parse_config({"master_key": MASTER, "models": mock_models(), "middlewares": ["pii", "auth"]})
    with pytest.raises(ConfigError) as info:
        Gateway(config, Registry.from_classes(middlewares={"pii": PII, "auth": Auth}, providers={"mock": MockProvider}))
    assert info.value.messages == ["middlewares[0].pii: acts on the parsed request, so it must be listed after "
                                   "middlewares[1].auth (an identity middleware)"]


# --- the order of checks ------------------------------------------------------------------


def expected_status(mode: str, key: str, model: str, body: str) -> int:
    if key != "valid":
        return 401
    if body == "invalid":
        return 400
    if model == "unknown":
        return 404
    if model == "forbidden" and mode == "auth":
        return 403  # the virtual key may use only `cheap`; the master key may use every model
    return 200


@pytest.mark.parametrize("mode", ["master_key", pytest.param("auth", marks=needs("auth"))])
async def test_without_a_valid_key_every_request_is_401(make_proxy, mode: str) -> None:
    config = {"master_key": MASTER, "models": mock_models()}
    if mode == "auth":
        config["middlewares"] = ["auth"]
    proxy = await make_proxy(config)
    valid = await new_key(proxy, models=["cheap"]) if mode == "auth" else MASTER
    blocked = await new_key(proxy, models=["cheap"], blocked=True) if mode == "auth" else "sk-not-the-master"
    key_headers = {"none": {}, "wrong": {"Authorization": "Bearer sk-wrong-0123456789"},
                   "blocked": {"x-api-key": blocked}, "valid": {"Authorization": f"Bearer {valid}"}}
    names = {"known": "cheap", "unknown": "no-such-model", "forbidden": "premium"}
    got, want = {}, {}
    for key, headers in key_headers.items():
        for model, name in names.items():
            for body in ("valid", "invalid"):
                raw = orjson.dumps({**CHEAP, "model": name}) if body == "valid" else f'{{"model": "{name}"'.encode()
                for path in ("/v1/chat/completions", "/v1/messages"):
                    status, answer = await post(proxy, path, raw, headers)
                    got[(key, model, body, path)] = status
                    want[(key, model, body, path)] = expected_status(mode, key, model, body)
                    if status == 401:  # nothing of what was sent comes back
                        assert name.encode() not in answer
    assert got == want
    async with aiohttp.ClientSession() as s:
        for headers in (key_headers["none"], key_headers["wrong"]):
            async with s.get(proxy.url + "/v1/models", headers=headers) as r:
                assert r.status == 401


# --- fallbacks honour the caller -------------------------------------------------------------


def fallback_config(upstream: Any) -> dict[str, Any]:  # spend rows written every 50 ms
    def model(name: str, price: int) -> dict[str, Any]:
        return {"name": name, "pricing": {"input_per_1m": price, "output_per_1m": price},
                "deployments": [{"provider": "openai", "model": f"{name}-upstream", "api_base": upstream.url + "/v1",
                                 "api_key": "sk-provider", "timeout": 5}]}
    return {"master_key": MASTER, "models": [model("cheap", 1), model("premium", 1000)],
            "middlewares": ["auth"], "spend": {"flush_interval": 0.05},
            "router": {"num_retries": 0, "retry_after": 0, "cooldown_seconds": 0, "fallbacks": {"cheap": ["premium"]}}}


def sdk(proxy: Any, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(api_key=key, base_url=proxy.url + "/v1", max_retries=0)


@needs("auth")
async def test_a_fallback_the_caller_may_not_use_is_skipped(upstream, make_proxy) -> None:
    proxy = await make_proxy(fallback_config(upstream))
    key = await new_key(proxy, models=["cheap"])
    upstream.push(reply_json(500, {"error": {"message": "down"}}))
    with pytest.raises(openai.APIStatusError) as info:
        await sdk(proxy, key).chat.completions.create(model="cheap", messages=[{"role": "user", "content": "hi"}])
    assert info.value.status_code == 502
    assert [r.json["model"] for r in upstream.requests] == ["cheap-upstream"]  # never premium
    with pytest.raises(openai.PermissionDeniedError):
        await sdk(proxy, key).chat.completions.create(model="premium", messages=[{"role": "user", "content": "hi"}])
    assert len(upstream.requests) == 1
    record = next(r for r in proxy.records if r.api == "chat")
    assert (record.model, record.served_model, record.spend) == ("cheap", None, 0)


@needs("auth")
async def test_an_allowed_fallback_is_priced_at_the_served_model(upstream, make_proxy) -> None:
    proxy = await make_proxy(fallback_config(upstream))
    key = await new_key(proxy, models=["cheap", "premium"])
    usage = {"prompt_tokens": 1000, "completion_tokens": 1000, "total_tokens": 2000}
    upstream.push(reply_json(500, {"error": {"message": "down"}}),
                  reply_json(200, {"id": "c1", "object": "chat.completion", "model": "premium-upstream",
                                   "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"},
                                                "finish_reason": "stop"}], "usage": usage}))
    done = await sdk(proxy, key).chat.completions.create(model="cheap", messages=[{"role": "user", "content": "hi"}])
    assert done.choices[0].message.content == "ok"
    assert [r.json["model"] for r in upstream.requests] == ["cheap-upstream", "premium-upstream"]
    record = next(r for r in proxy.records if r.api == "chat")
    assert (record.model, record.served_model, record.deployment) == ("cheap", "premium", "openai:premium-upstream")
    assert record.spend == Decimal(2000 * 1000) / 1_000_000  # premium's prices, not cheap's (which would be 0.002)
    store = proxy.gateway.services.store
    loop = asyncio.get_running_loop()
    end = loop.time() + 5
    while not (rows := await store.spend_logs(key_id=record.key_id)) and loop.time() < end:
        await asyncio.sleep(0.05)  # the spend log writes in batches
    assert [(r.model, r.served_model, r.deployment, r.spend) for r in rows] == [
        ("cheap", "premium", "openai:premium-upstream", record.spend)]


# --- bounded labels and echoes ---------------------------------------------------------------


async def test_a_huge_model_name_is_neither_a_label_nor_echoed(make_proxy) -> None:
    proxy = await make_proxy({"master_key": MASTER, "models": mock_models()})
    name = "m" * 100_000
    status, raw = await post(proxy, "/v1/chat/completions", {**CHEAP, "model": name},
                             {"Authorization": f"Bearer {MASTER}"})
    assert status == 404 and len(raw) < 1000
    assert orjson.loads(raw)["error"]["message"].startswith("The model 'mmmm")
    status, raw = await post(proxy, "/v1/chat/completions", {**CHEAP, "model": name})
    assert status == 401 and b"mmmm" not in raw
    async with aiohttp.ClientSession() as s:
        async with s.get(proxy.url + "/metrics") as r:
            text = await r.text()
    assert "mmmmmmmmmm" not in text
    assert re.search(r'^llmproxy_requests_total\{deployment="",model="unknown",status="404"\} 1\.0$', text, re.M)
    assert len(proxy.records[-2].requested_model) <= 128
