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
    newest = _events(path)
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


# --- webhook ----------------------------------------------------------------------------------


class Receiver:
    """A billing service stand-in: 503 until `ok_at` (loop time), then takes each batch;
    counts each event by request id, and keeps every Idempotency-Key it saw."""

    def __init__(self) -> None:
        from aiohttp import web

        self.web = web
        self.ok_at = 0.0
        self.seen: dict[str, int] = {}
        self.keys: list[str | None] = []
        self.refuse: set[str] = set()  # request ids answered 400 when alone in a batch
        self.runner = None
        self.port = 0

    async def start(self, port: int = 0) -> "Receiver":
        app = self.web.Application()
        app.router.add_post("/ingest", self.ingest)
        self.runner = self.web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = self.web.TCPSite(self.runner, "127.0.0.1", port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        await self.runner.cleanup()

    async def ingest(self, request):
        if asyncio.get_running_loop().time() < self.ok_at:
            return self.web.Response(status=503)
        events = (await request.json())["events"]
        ids = [e["request_id"] for e in events]
        if set(ids) & self.refuse:
            return self.web.Response(status=400)
        self.keys.append(request.headers.get("Idempotency-Key"))
        for rid in ids:
            self.seen[rid] = self.seen.get(rid, 0) + 1
        return self.web.json_response({"ok": True})

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/ingest"


async def test_webhook_retries_through_an_outage_and_sets_apart_a_refused_event(make_proxy, upstream, tmp_path):
    receiver = await Receiver().start()
    try:
        receiver.ok_at = asyncio.get_running_loop().time() + 1.5
        proxy = await make_proxy(openai_config(upstream, event_sinks=[{"webhook": {
            "url": receiver.url, "flush_interval": 0.05, "batch_size": 4,
            "spill_path": str(tmp_path / "webhook.jsonl"), "headers": {"Authorization": "Bearer ingest-token"}}}]))
        ids = []
        async with aiohttp.ClientSession() as s:
            for _ in range(10):
                async with s.post(proxy.url + "/v1/chat/completions", headers=AUTH, json={
                        "model": "gpt-test", "messages": [{"role": "user", "content": SECRET_PROMPT}]}) as r:
                    assert r.status == 200  # the request path never waits for the receiver
                    ids.append(r.headers["x-request-id"])
        await _until(lambda: set(receiver.seen) == set(ids), bound=15)
        assert set(receiver.seen) == set(ids) and all(n == 1 for n in receiver.seen.values())
        assert all(receiver.keys) and len(set(receiver.keys)) == len(receiver.keys)
        from llmproxy.events import WebhookSink

        (sink,) = [x for x in proxy.gateway.sinks if isinstance(x, WebhookSink)]
        assert sink.health()["webhook"]["state"] == "ok"

        receiver.refuse = {"poison"}  # a receiver that refuses one event: the rest still land
        from llmproxy.context import Record
        import time as _time

        for rid in ("poison", "fine-1", "fine-2"):
            sink.emit(Record(rid, None, "chat", "/v1/chat/completions", _time.time(), status=200))
        await _until(lambda: {"fine-1", "fine-2"} <= set(receiver.seen), bound=10)
        assert "poison" not in receiver.seen
        await _until(lambda: (tmp_path / "webhook.jsonl.rejected").exists())
        assert b'"poison"' in (tmp_path / "webhook.jsonl.rejected").read_bytes()
        await asyncio.sleep(0.3)
        assert sink._failures == 0 and sink.health()["webhook"]["state"] == "ok"  # set apart, not retried
    finally:
        await receiver.stop()


async def test_webhook_events_survive_a_receiver_outage_and_a_sigterm(tmp_path):
    """A real `llmproxy serve`: the receiver fails for 5 s; the gateway gets SIGTERM in the
    middle of it (the unsent events go to the spill file) and starts again; every event
    arrives, once each after dedupe by request id."""
    import subprocess
    import sys
    import urllib.request

    import yaml

    from .test_cli import free_port, stop, wait_live

    receiver = await Receiver().start()
    try:
        loop = asyncio.get_running_loop()
        receiver.ok_at = loop.time() + 5.0
        port = free_port()
        cfg = tmp_path / "c.yaml"
        cfg.write_text(yaml.safe_dump({
            "server": {"port": port}, "master_key": MASTER, "spend": {"enabled": False},
            "event_sinks": [{"webhook": {"url": receiver.url, "flush_interval": 0.1, "batch_size": 10}}],
            "models": [{"name": "mock", "deployments": [{"provider": "mock", "chunks": 2}]}]}))

        def serve():
            proc = subprocess.Popen([sys.executable, "-m", "llmproxy", "serve", "--config", str(cfg)], cwd=tmp_path,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            wait_live(port, proc)
            return proc

        def chat() -> str:
            req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", method="POST",
                                         data=b'{"model":"mock","messages":[{"role":"user","content":"x"}]}',
                                         headers={"Authorization": f"Bearer {MASTER}"})
            with urllib.request.urlopen(req, timeout=10) as resp:
                resp.read()
                return resp.headers["x-request-id"]

        proc = await asyncio.to_thread(serve)
        ids = [await asyncio.to_thread(chat) for _ in range(25)]
        assert await asyncio.to_thread(stop, proc) == 0  # SIGTERM while the receiver still fails
        assert loop.time() < receiver.ok_at, "the test machine was too slow to cut the outage"
        assert (tmp_path / "llmproxy-webhook-spill.jsonl").exists()
        proc = await asyncio.to_thread(serve)
        try:
            ids += [await asyncio.to_thread(chat) for _ in range(10)]
            await _until(lambda: set(receiver.seen) >= set(ids), bound=25)
        finally:
            assert await asyncio.to_thread(stop, proc) == 0
        assert set(receiver.seen) == set(ids)  # every event, after dedupe by request id
        assert not (tmp_path / "llmproxy-webhook-spill.jsonl").exists()
    finally:
        await receiver.stop()
