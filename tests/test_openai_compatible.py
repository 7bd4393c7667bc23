"""`provider: openai` in front of an OpenAI-compatible server (vLLM, Ollama, LM Studio):
an `api_base`, no key, and `stream_usage: false` for a server that rejects
`stream_options`; through the real `openai` SDK against a fake such server."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import openai
import pytest
from aiohttp import web

from llmproxy.config import ConfigError, parse_config
from llmproxy.plugins import Registry, check_config
from llmproxy.testing import FakeUpstream, Received

from .conftest import MASTER


@dataclass
class FakeLocalServer(FakeUpstream):
    """A local server run without a key: any `Authorization` header is refused (401), as
    is `stream_options` (400, as some servers' strict schemas do)."""

    async def default(self, request: web.Request, got: Received) -> web.StreamResponse:
        if "authorization" in request.headers:
            return web.json_response({"error": {"message": "no keys here", "type": "auth"}}, status=401)
        if got.body and "stream_options" in got.json:
            return web.json_response({"error": {"message": "extra field: stream_options",
                                                "type": "invalid_request_error"}}, status=400)
        return await super().default(request, got)


@pytest.fixture
async def local():
    fake = await FakeLocalServer().start()
    yield fake
    await fake.close()


def local_config(fake: FakeLocalServer, **dep: Any) -> dict[str, Any]:
    return {"master_key": MASTER,
            "models": [{"name": "llama", "deployments": [
                {"provider": "openai", "model": "meta-llama/Llama-3.1-8B-Instruct", "api_base": fake.url + "/v1",
                 "stream_usage": False, "timeout": 5, **dep}]}],
            "router": {"num_retries": 0}}


def client(proxy) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key=MASTER, max_retries=0)


async def test_chat_stream_and_embeddings_without_a_key(local, make_proxy):
    proxy = await make_proxy(local_config(local))
    c = client(proxy)
    resp = await c.chat.completions.create(model="llama", messages=[{"role": "user", "content": "hi"}])
    assert resp.choices[0].message.content == local.answer_text()
    assert proxy.records[-1].prompt_tokens == 11 and not proxy.records[-1].tokens_estimated
    stream = await c.chat.completions.create(model="llama", messages=[{"role": "user", "content": "hi"}],
                                             stream=True)
    assert "".join([ch.choices[0].delta.content or "" async for ch in stream if ch.choices]) == local.answer_text()
    rec = proxy.records[-1]
    assert rec.status == 200 and rec.tokens_estimated and rec.completion_tokens > 0  # no usage sent: counted here
    emb = await c.embeddings.create(model="llama", input="hello", encoding_format="float")
    assert emb.data[0].embedding == [0.1, 0.2]
    for got in local.requests:
        assert got.path in ("/v1/chat/completions", "/v1/embeddings")
        assert "authorization" not in got.headers and "api-key" not in got.headers
        assert MASTER not in str(dict(got.headers))
        assert "stream_options" not in got.json
    assert local.requests[0].json["model"] == "meta-llama/Llama-3.1-8B-Instruct"


async def test_stream_usage_default_sends_stream_options(local, make_proxy):
    """Why `stream_usage: false` exists: by default the proxy asks for usage in streams."""
    proxy = await make_proxy(local_config(local, stream_usage=True))
    with pytest.raises(openai.BadRequestError):
        await client(proxy).chat.completions.create(
            model="llama", messages=[{"role": "user", "content": "hi"}], stream=True)
    assert local.requests[-1].json["stream_options"] == {"include_usage": True}


async def test_a_configured_key_is_sent(upstream, make_proxy):
    """An OpenAI-compatible server with a key (LM Studio, a vLLM with --api-key) gets it as Bearer."""
    config = local_config(upstream, api_key="local-secret")  # type: ignore[arg-type]
    proxy = await make_proxy(config)
    await client(proxy).chat.completions.create(model="llama", messages=[{"role": "user", "content": "hi"}])
    assert upstream.requests[-1].headers["authorization"] == "Bearer local-secret"


def problems(dep: dict) -> list[str]:
    data = {"master_key": MASTER, "models": [{"name": "m", "deployments": [{"provider": "openai", **dep}]}]}
    try:
        check_config(parse_config(data), Registry.from_entry_points())
    except ConfigError as exc:
        return exc.messages
    return []


KEY_REQUIRED = ["models[0].deployments[0].api_key: required"]


@pytest.mark.parametrize("dep, expected", [
    ({}, KEY_REQUIRED),  # OpenAI itself
    ({"api_base": "https://api.openai.com/v1"}, KEY_REQUIRED),
    ({"api_base": "https://API.OpenAI.com./v1"}, KEY_REQUIRED),
    ({"api_key": "sk-x"}, []),
    ({"api_base": "http://127.0.0.1:8000/v1"}, []),  # vLLM
    ({"api_base": "http://localhost:11434/v1"}, []),  # Ollama
    ({"api_base": "http://gpu-box.internal:1234/v1", "stream_usage": False}, []),  # LM Studio
    ({"api_base": "https://api.openai.com.example.net/v1"}, []),  # not OpenAI's host
])
def test_api_key_rule(dep: dict, expected: list[str]) -> None:
    assert problems(dep) == expected
