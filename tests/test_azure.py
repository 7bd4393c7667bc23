"""The `azure` provider through the real `openai` SDK, against a fake Azure OpenAI that
answers only Azure's wire format: `/openai/deployments/{name}/...`, `api-version` in the
query, the key in `api-key`; streams that open with a `prompt_filter_results` chunk."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs

import aiohttp
import openai
import orjson
import pytest
from aiohttp import web

from llmproxy.config import ConfigError, parse_config
from llmproxy.plugins import Registry, check_config
from llmproxy.providers.azure import DEFAULT_API_VERSION
from llmproxy.testing import FakeUpstream, Received, reply_sse

from .conftest import MASTER

AZURE_KEY = "azure-provider-secret-0123456789"
PROMPT_FILTER = {"prompt_index": 0, "content_filter_results": {"hate": {"filtered": False, "severity": "safe"}}}
FILTER_400 = {"error": {
    "message": "The response was filtered due to the prompt triggering Azure OpenAI's content management policy.",
    "type": None, "param": "prompt", "code": "content_filter", "status": 400,
    "innererror": {"code": "ResponsibleAIPolicyViolation",
                   "content_filter_result": {"violence": {"filtered": True, "severity": "high"}}}}}


def sse(obj: Any) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


@dataclass
class FakeAzure(FakeUpstream):
    """Azure's side: 404 off its paths, 401 without `api-key`, 400 without `api-version`;
    a prompt containing "violent" is refused (400 content_filter), one containing
    "borderline" is answered and cut (200, `finish_reason: content_filter`)."""

    async def default(self, request: web.Request, got: Received) -> web.StreamResponse:
        parts = request.path.split("/")  # "", "openai", "deployments", name, rest...
        if parts[1:3] != ["openai", "deployments"] or len(parts) < 5:
            return web.json_response({"error": {"code": "404", "message": "Resource not found"}}, status=404)
        if "api-key" not in request.headers:
            return web.json_response({"error": {"code": "401", "message": "Access denied"}}, status=401)
        if "api-version" not in request.query:
            return web.json_response({"error": {"code": "404", "message": "Resource not found"}}, status=404)
        body = got.json
        deployment, api = parts[3], "/".join(parts[4:])
        if api == "embeddings":
            return web.json_response({"object": "list", "model": "text-embedding-3-small",
                                      "data": [{"object": "embedding", "index": 0, "embedding": [0.5, -0.25]}],
                                      "usage": {"prompt_tokens": 4, "total_tokens": 4}})
        prompt = orjson.dumps(body.get("messages") or body.get("prompt")).decode()
        if "violent" in prompt:
            return web.json_response(FILTER_400, status=400)
        filtered = "borderline" in prompt
        if body.get("stream"):
            return await reply_sse(self.events(deployment, filtered, body))(request, got)
        choice: dict[str, Any] = {"index": 0, "finish_reason": "content_filter" if filtered else "stop",
                                  "content_filter_results": {"hate": {"filtered": filtered, "severity": "safe"}}}
        if api == "completions":
            choice["text"] = "" if filtered else self.answer_text()
        else:
            choice["message"] = {"role": "assistant", "content": None if filtered else self.answer_text()}
        return web.json_response({"id": "chatcmpl-az", "object": "chat.completion", "created": 1,
                                  "model": "gpt-4o-2024-08-06", "prompt_filter_results": [PROMPT_FILTER],
                                  "choices": [choice],
                                  "usage": {"prompt_tokens": 13, "completion_tokens": 6, "total_tokens": 19}})

    def events(self, deployment: str, filtered: bool, body: dict) -> list[bytes]:
        base = {"id": "chatcmpl-az", "object": "chat.completion.chunk", "created": 1, "model": "gpt-4o-2024-08-06"}
        with_usage = (body.get("stream_options") or {}).get("include_usage") is True
        out = [sse({"id": "", "object": "", "created": 0, "model": "", "choices": [],
                    "prompt_filter_results": [PROMPT_FILTER]})]
        pieces = self.text_chunks[:2] if filtered else self.text_chunks
        for i, piece in enumerate(pieces):
            delta = {"role": "assistant", "content": piece} if i == 0 else {"content": piece}
            out.append(sse({**base, "choices": [{"index": 0, "delta": delta, "finish_reason": None,
                                                 "content_filter_results": {}}],
                            **({"usage": None} if with_usage else {})}))
        out.append(sse({**base, "choices": [{"index": 0, "delta": {}, "content_filter_results": {},
                                             "finish_reason": "content_filter" if filtered else "stop"}],
                        **({"usage": None} if with_usage else {})}))
        if with_usage:
            out.append(sse({**base, "choices": [], "usage": {"prompt_tokens": 13, "completion_tokens": len(pieces),
                                                              "total_tokens": 13 + len(pieces)}}))
        return out + [b"data: [DONE]\n\n"]


@pytest.fixture
async def azure():
    fake = await FakeAzure().start()
    yield fake
    await fake.close()


def azure_config(fake: FakeAzure, *deployments: dict, **extra: Any) -> dict[str, Any]:
    deps = list(deployments) or [{"model": "gpt-4o"}]
    return {
        "master_key": MASTER,
        "models": [
            {"name": "gpt-4o", "deployments": [
                {"provider": "azure", "api_base": fake.url, "api_key": AZURE_KEY, "timeout": 5, **d} for d in deps]},
            {"name": "embed", "deployments": [
                {"provider": "azure", "api_base": fake.url, "api_key": AZURE_KEY, "model": "text-embedding-3-small",
                 "deployment": "emb-prod", "timeout": 5}]},
        ],
        "router": {"num_retries": 1, "retry_after": 0, "cooldown_seconds": 30},
        **extra,
    }


def client(proxy, **kw: Any) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key=MASTER, max_retries=0, **kw)


def assert_azure_request(got: Received, path: str, version: str = DEFAULT_API_VERSION) -> None:
    assert got.path == path
    assert parse_qs(got.query)["api-version"] == [version]
    assert got.headers["api-key"] == AZURE_KEY
    assert "authorization" not in got.headers
    assert MASTER not in str(dict(got.headers))


async def test_chat(azure, make_proxy):
    proxy = await make_proxy(azure_config(azure))
    resp = await client(proxy).chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert resp.choices[0].message.content == azure.answer_text()
    got = azure.requests[-1]
    assert_azure_request(got, "/openai/deployments/gpt-4o/chat/completions")
    assert got.json["model"] == "gpt-4o"
    rec = proxy.records[-1]
    assert (rec.status, rec.prompt_tokens, rec.completion_tokens, rec.tokens_estimated) == (200, 13, 6, False)
    assert (rec.provider, rec.deployment) == ("azure", "azure:gpt-4o")


async def test_deployment_name_and_api_version_options(azure, make_proxy):
    proxy = await make_proxy(azure_config(azure, {"model": "gpt-4o", "deployment": "prod east/1",
                                                  "api_version": "2025-01-01-preview"}))
    raw_paths = []

    async def on_the_wire(request: web.Request, got: Received) -> web.StreamResponse:
        raw_paths.append(request.raw_path)
        return await azure.default(request, got)

    azure.push(on_the_wire)
    await client(proxy).chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert raw_paths == ["/openai/deployments/prod%20east%2F1/chat/completions?api-version=2025-01-01-preview"]
    assert azure.requests[-1].json["model"] == "gpt-4o"  # the body names the deployment's model


async def test_client_api_version_never_overrides_the_deployments(azure, make_proxy):
    proxy = await make_proxy(azure_config(azure))
    c = client(proxy, default_query={"api-version": "2023-05-15", "foo": "a b"})
    await c.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    query = parse_qs(azure.requests[-1].query)
    assert query == {"foo": ["a b"], "api-version": [DEFAULT_API_VERSION]}
    async with aiohttp.ClientSession() as s:  # however it is spelled
        async with s.post(proxy.url + "/v1/chat/completions?API-Version=1&api%2Dversion=2&x=1&x=2",
                          headers={"Authorization": f"Bearer {MASTER}"},
                          json={"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}) as r:
            assert r.status == 200
    assert azure.requests[-1].query == f"x=1&x=2&api-version={DEFAULT_API_VERSION}"


async def test_client_key_in_api_key_header_is_replaced(azure, make_proxy):
    """A client may send its key as `api-key` (as Azure clients do): Azure gets the deployment's."""
    proxy = await make_proxy(azure_config(azure))
    async with aiohttp.ClientSession() as s:
        async with s.post(proxy.url + "/v1/chat/completions", headers={"api-key": MASTER},
                          json={"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}) as r:
            assert r.status == 200
    assert_azure_request(azure.requests[-1], "/openai/deployments/gpt-4o/chat/completions")


async def test_stream_counts_usage_and_hides_the_usage_chunk(azure, make_proxy):
    proxy = await make_proxy(azure_config(azure))
    stream = await client(proxy).chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "hi"}], stream=True)
    chunks = [c async for c in stream]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == azure.answer_text()
    assert chunks[0].choices == [] and chunks[0].prompt_filter_results  # Azure's first chunk passes
    assert all(c.usage is None for c in chunks)
    assert len([c for c in chunks if not c.choices]) == 1  # the usage-only chunk was removed
    got = azure.requests[-1]
    assert_azure_request(got, "/openai/deployments/gpt-4o/chat/completions")
    assert got.json["stream_options"] == {"include_usage": True}
    rec = proxy.records[-1]
    n = len(azure.text_chunks)
    assert (rec.prompt_tokens, rec.completion_tokens, rec.tokens_estimated) == (13, n, False)


async def test_stream_client_asked_for_usage(azure, make_proxy):
    proxy = await make_proxy(azure_config(azure))
    stream = await client(proxy).chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "hi"}], stream=True,
        stream_options={"include_usage": True})
    chunks = [c async for c in stream]
    assert chunks[-1].usage is not None and chunks[-1].usage.prompt_tokens == 13
    assert proxy.records[-1].prompt_tokens == 13


async def test_stream_usage_false_estimates(azure, make_proxy):
    """An older api-version without `stream_options`: `stream_usage: false` never sends it."""
    proxy = await make_proxy(azure_config(azure, {"model": "gpt-4o", "stream_usage": False}))
    stream = await client(proxy).chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "hi"}], stream=True)
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text == azure.answer_text()
    assert "stream_options" not in azure.requests[-1].json
    rec = proxy.records[-1]
    assert rec.tokens_estimated and rec.completion_tokens > 0 and rec.prompt_tokens > 0


async def test_embeddings_and_completions(azure, make_proxy):
    proxy = await make_proxy(azure_config(azure))
    emb = await client(proxy).embeddings.create(model="embed", input="hello", encoding_format="float")
    assert emb.data[0].embedding == [0.5, -0.25]
    assert_azure_request(azure.requests[-1], "/openai/deployments/emb-prod/embeddings")
    assert azure.requests[-1].json["model"] == "text-embedding-3-small"
    assert proxy.records[-1].prompt_tokens == 4
    done = await client(proxy).completions.create(model="gpt-4o", prompt="say hi")
    assert done.choices[0].text == azure.answer_text()
    assert_azure_request(azure.requests[-1], "/openai/deployments/gpt-4o/completions")


async def test_content_filter_400_reaches_the_client_without_a_retry(azure, make_proxy):
    proxy = await make_proxy(azure_config(azure, {"model": "gpt-4o"}, {"model": "gpt-4o", "deployment": "second"}))
    for stream in (False, True):
        before = len(azure.requests)
        with pytest.raises(openai.BadRequestError) as info:
            await client(proxy).chat.completions.create(
                model="gpt-4o", messages=[{"role": "user", "content": "something violent"}], stream=stream)
        assert info.value.status_code == 400
        assert info.value.code == "content_filter"
        assert info.value.body["innererror"]["code"] == "ResponsibleAIPolicyViolation"
        assert len(azure.requests) == before + 1  # no retry, no other deployment
        rec = proxy.records[-1]
        assert rec.status == 400 and [a.outcome for a in rec.attempts] == ["http_400"]
    # a refusal is about the request, not the deployment: neither was cooled down
    assert [s.cooldown_until for s in proxy.gateway.router.states["gpt-4o"]] == [0.0, 0.0]


async def test_content_filtered_answer_is_an_answer(azure, make_proxy):
    proxy = await make_proxy(azure_config(azure))
    resp = await client(proxy).chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "borderline"}])
    assert resp.choices[0].finish_reason == "content_filter"
    assert resp.choices[0].message.content is None
    assert (proxy.records[-1].status, proxy.records[-1].prompt_tokens) == (200, 13)
    stream = await client(proxy).chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "borderline"}], stream=True)
    chunks = [c async for c in stream]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "content_filter"
    rec = proxy.records[-1]
    assert (rec.status, rec.prompt_tokens, rec.completion_tokens, rec.tokens_estimated) == (200, 13, 2, False)
    assert len(azure.requests) == 2


def check(*deployments: dict) -> list[str]:
    data = {"master_key": MASTER, "models": [{"name": "m", "deployments": list(deployments)}]}
    try:
        check_config(parse_config(data), Registry.from_entry_points())
    except ConfigError as exc:
        return exc.messages
    return []


@pytest.mark.parametrize("deployment, expected", [
    ({"provider": "azure", "model": "gpt-4o", "api_base": "https://r.openai.azure.com", "api_key": "k"}, []),
    ({"provider": "azure", "model": "gpt-4o", "api_base": "https://r.openai.azure.com", "api_key": "k",
      "api_version": "2024-06-01", "deployment": "d"}, []),
    ({"provider": "azure", "model": "gpt-4o", "api_key": "k"},
     ["models[0].deployments[0].api_base: required for azure (https://<resource>.openai.azure.com)"]),
    ({"provider": "azure", "model": "gpt-4o", "api_base": "https://r.openai.azure.com"},
     ["models[0].deployments[0].api_key: required"]),
    ({"provider": "azure", "model": "gpt-4o", "api_base": "https://r.openai.azure.com", "api_key": "k",
      "api_version": ""}, ["models[0].deployments[0].api_version: must not be empty"]),
    ({"provider": "azure", "model": "gpt-4o", "api_base": "https://r.openai.azure.com", "api_key": "k",
      "api_version": 2024}, ["models[0].deployments[0].api_version: expected string, got 2024"]),
    ({"provider": "azure", "model": "*", "api_base": "https://r.openai.azure.com", "api_key": "k"},
     ["models[0].deployments[0].deployment: required when model is '*' (the Azure deployment name is part "
      "of the URL, which a client never chooses)"]),
])
def test_check_config(deployment: dict, expected: list[str]) -> None:
    assert check(deployment) == expected


def test_check_config_unknown_option_names_the_path() -> None:
    [problem] = check({"provider": "azure", "model": "gpt-4o", "api_base": "https://r.openai.azure.com",
                       "api_key": "k", "apiversion": "x"})
    assert problem.startswith("models[0].deployments[0].apiversion: unknown key")
    assert "api_version" in problem
