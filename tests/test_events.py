"""Usage events (issue 13): the `jsonl` event sink, one event per model request with the
spend row's fields, the trace id and the attempts, never prompt text; rotated by size."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiohttp

from .conftest import MASTER, openai_config

AUTH = {"Authorization": f"Bearer {MASTER}"}
SECRET_PROMPT = "the launch code is 0000-swordfish"


async def _chat(s: aiohttp.ClientSession, url: str, **extra) -> int:
    body = {"model": "gpt-test", "messages": [{"role": "user", "content": SECRET_PROMPT}], **extra}
    async with s.post(url + "/v1/chat/completions", headers=AUTH, json=body) as r:
        await r.read()
        return r.status


def _events(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


async def _until(predicate, bound: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + bound
    while not predicate() and loop.time() < end:
        await asyncio.sleep(0.02)


async def test_each_model_request_is_one_event_with_no_prompt_text(make_proxy, upstream, tmp_path):
    path = tmp_path / "events.jsonl"
    proxy = await make_proxy(openai_config(upstream, event_sinks=[{"jsonl": {"path": str(path),
                                                                             "flush_interval": 0.05}}]))
    async with aiohttp.ClientSession() as s:
        assert await _chat(s, proxy.url) == 200
        assert await _chat(s, proxy.url, stream=True) == 200
        assert await _chat(s, proxy.url, model="nope") == 404
        async with s.get(proxy.url + "/v1/models", headers=AUTH) as r:  # not a model request: no event
            assert r.status == 200
    await _until(lambda: len(_events(path)) >= 3)
    events = _events(path)
    assert [(e["status"], e["stream"]) for e in events] == [(200, False), (200, True), (404, False)]
    ok = events[0]
    assert (ok["model"], ok["deployment"], ok["prompt_tokens"], ok["completion_tokens"]) == \
        ("gpt-test", "openai:gpt-upstream", 11, 7)
    assert ok["spend"] == str(ok["spend"]) and float(ok["spend"]) > 0  # exact decimal, as text
    assert ok["attempts"] == [{"deployment": "openai:gpt-upstream", "outcome": "ok",
                               "duration_ms": ok["attempts"][0]["duration_ms"]}]
    assert {"request_id", "trace_id", "started_at", "key_id", "team_id", "user_id", "served_model",
            "ttfb_ms", "cache"} <= set(ok)
    assert events[2]["error"] == "model_not_found" and events[2]["model"] is None
    assert SECRET_PROMPT not in path.read_text()
    async with aiohttp.ClientSession() as s:
        async with s.get(proxy.url + "/health/readiness") as r:
            jsonl = (await r.json())["details"]["jsonl"]
        async with s.get(proxy.url + "/metrics") as r:
            text = await r.text()
    assert jsonl["written"] == 3 and jsonl["dropped"] == 0 and jsonl["path"] == str(path)
    assert 'llmproxy_event_sink_queue_depth{sink="jsonl"}' in text


async def test_the_file_rotates_by_size_keeping_backups(make_proxy, upstream, tmp_path):
    path = tmp_path / "events.jsonl"
    proxy = await make_proxy(openai_config(upstream, event_sinks=[{"jsonl": {
        "path": str(path), "max_bytes": 2048, "backups": 2, "flush_interval": 0.02}}]))
    from llmproxy.events import JsonlSink

    (sink,) = [x for x in proxy.gateway.sinks if isinstance(x, JsonlSink)]
    async with aiohttp.ClientSession() as s:
        for _ in range(12):  # an event is ~700 bytes: a file holds two, then rotates
            assert await _chat(s, proxy.url) == 200
            await sink.flush()
    files = sorted(p.name for p in tmp_path.glob("events.jsonl*"))
    assert files == ["events.jsonl", "events.jsonl.1", "events.jsonl.2"]  # no more than `backups` old ones
    assert all(p.stat().st_size <= 2048 for p in tmp_path.glob("events.jsonl*"))
    newest = _events(path) + []
    assert newest and all(e["status"] == 200 for e in newest)
    assert sink.written == 12


async def test_a_full_queue_drops_and_counts_instead_of_growing(make_proxy, upstream, tmp_path):
    path = tmp_path / "no-such-dir" / "events.jsonl"  # every write fails: the queue fills
    proxy = await make_proxy(openai_config(upstream, event_sinks=[{"jsonl": {
        "path": str(path), "queue_size": 3, "flush_interval": 30}}]))
    from llmproxy.events import JsonlSink

    (sink,) = [x for x in proxy.gateway.sinks if isinstance(x, JsonlSink)]
    async with aiohttp.ClientSession() as s:
        for _ in range(5):
            assert await _chat(s, proxy.url) == 200  # the request path never waits for the disk
    assert len(sink.pending) == 3 and sink.dropped == 2
    await sink.flush()  # fails: kept for the next try, within the bound
    assert sink.failures == 1 and len(sink.pending) == 3
    path.parent.mkdir()
    await sink.flush()
    assert len(_events(path)) == 3 and sink.pending == []
