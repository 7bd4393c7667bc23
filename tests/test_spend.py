"""The spend log: one row per request, batched off the request path, nothing lost when the
database fails (PostgreSQL behind a TCP proxy the test cuts), nothing doubled."""

from __future__ import annotations

import asyncio
import os
from decimal import Decimal
from urllib.parse import urlparse

import aiohttp

from llmproxy.testing import TcpProxy

from .conftest import MASTER, openai_config

AUTH = {"Authorization": f"Bearer {MASTER}"}
BODY = {"model": "gpt-test", "messages": [{"role": "user", "content": "x"}]}


async def send(proxy, n: int, stream: bool = False) -> None:
    async with aiohttp.ClientSession() as s:
        for _ in range(n):
            async with s.post(proxy.url + "/v1/chat/completions", headers=AUTH,
                              json={**BODY, "stream": stream}) as r:
                assert r.status == 200
                await r.read()


async def rows_eventually(store, n: int, bound: float = 15.0) -> list:
    loop = asyncio.get_running_loop()
    end = loop.time() + bound
    rows: list = []
    while loop.time() < end:
        try:
            rows = await store.spend_logs(page_size=1000)
        except Exception:
            rows = []
        if len(rows) >= n:
            return rows
        await asyncio.sleep(0.1)
    raise AssertionError(f"{len(rows)} spend rows after {bound}s, expected {n}")


async def test_each_request_becomes_one_row(upstream, make_proxy):
    proxy = await make_proxy(openai_config(upstream))
    await send(proxy, 3)
    await send(proxy, 2, stream=True)
    rows = await rows_eventually(proxy.gateway.services.store, 5)
    assert len(rows) == 5
    assert {r.request_id for r in rows} == {r.request_id for r in proxy.records}
    row = next(r for r in rows if r.request_id == proxy.records[0].request_id)
    assert (row.model, row.deployment, row.status, row.prompt_tokens, row.completion_tokens) == \
        ("gpt-test", "openai:gpt-upstream", 200, 11, 7)
    assert row.spend == Decimal(11 * 1 + 7 * 2) / 1_000_000  # exact
    assert row.duration_ms > 0 and row.ttfb_ms is not None


async def test_database_cut_loses_no_row_and_doubles_none(upstream, make_proxy, pg_url, tmp_path):
    """PostgreSQL goes away mid-traffic (a TCP proxy in front of it is cut), the queue
    overflows into the spill file, the database comes back: every row is there once."""
    target = urlparse(pg_url)
    relay = await TcpProxy(target.hostname, target.port or 5432).start()
    try:
        url = pg_url.replace(f"{target.hostname}:{target.port or 5432}", f"127.0.0.1:{relay.port}")
        spill = tmp_path / "spill.jsonl"
        config = openai_config(upstream, database_url=url,
                               spend={"flush_interval": 0.1, "queue_size": 4, "spill_path": str(spill)})
        proxy = await make_proxy(config)
        store = proxy.gateway.services.store
        await send(proxy, 3)
        await rows_eventually(store, 3)
        relay.cut()
        await send(proxy, 10)  # served all the same: the spend log is off the request path
        await asyncio.sleep(0.5)
        assert spill.exists()  # the bounded queue overflowed into the spill file
        relay.restore()
        rows = await rows_eventually(store, 13)
        ids = [r.request_id for r in rows]
        assert len(ids) == len(set(ids)) == 13
        assert set(ids) == {r.request_id for r in proxy.records}
        await asyncio.sleep(0.3)
        assert not spill.exists()  # replayed and removed
    finally:
        await relay.close()


async def test_shutdown_flushes_the_queue(upstream, make_proxy, tmp_path):
    config = openai_config(upstream, spend={"flush_interval": 3600})  # only a full batch or shutdown writes
    proxy = await make_proxy(config)
    await send(proxy, 4)
    writer = next(s for s in proxy.gateway.sinks if type(s).__name__ == "SpendWriter")
    assert len(writer.queue) == 4
    store = proxy.gateway.services.store
    await writer.shutdown()
    assert len(await store.spend_logs()) == 4


async def test_a_retried_batch_never_doubles_a_row(upstream, make_proxy):
    from llmproxy.spend import row_of

    proxy = await make_proxy(openai_config(upstream))
    await send(proxy, 2)
    store = proxy.gateway.services.store
    await rows_eventually(store, 2)
    rows = [row_of(r) for r in proxy.records]
    assert await store.write_spend(rows) == 0  # the same request ids again
    assert len(await store.spend_logs()) == 2


def test_spill_round_trip_is_exact():
    from datetime import datetime, timezone

    from llmproxy.spend import _from_json, _to_json
    from llmproxy.store import SpendRow

    row = SpendRow(request_id="r1", started_at=datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=timezone.utc),
                   spend=Decimal("0.000000015"), key_id="k", prompt_tokens=3, ttfb_ms=1.5, cache_hit=True)
    assert _from_json(_to_json(row)) == row
    assert os.linesep not in _to_json(row).decode()


async def test_retention_prunes_old_rows(upstream, make_proxy, tmp_path):
    from datetime import datetime, timedelta, timezone

    from llmproxy.store import SpendRow, open_store

    path = str(tmp_path / "retention.db")
    early = await open_store(None, sqlite_path=path)  # the old row is there before the server starts
    await early.migrate()
    await early.write_spend([SpendRow(request_id="ancient", started_at=datetime.now(timezone.utc) - timedelta(days=31))])
    await early.close()
    proxy = await make_proxy(openai_config(upstream, database={"sqlite_path": path},
                                           spend={"flush_interval": 0.05, "retention_days": 30}))
    store = proxy.gateway.services.store
    await send(proxy, 1)
    loop = asyncio.get_running_loop()
    end = loop.time() + 5
    while loop.time() < end:
        ids = {r.request_id for r in await store.spend_logs()}
        if "ancient" not in ids and len(ids) == 1:
            break
        await asyncio.sleep(0.05)
    assert ids == {proxy.records[-1].request_id}  # the 31-day-old row is gone, today's is kept


# --- one bad row never holds back the others (issue 12) --------------------------------------


def records_of(proxy, n: int, **fields) -> list:
    """`n` records like the server makes, with `fields` set on the last."""
    import time

    from llmproxy.context import Record

    out = []
    for i in range(n):
        r = Record(f"bad-batch-{i:04d}", None, "chat", "/v1/chat/completions", time.time(), model="gpt-test")
        r.status = 200
        out.append(r)
    for name, value in fields.items():
        setattr(out[-1], name, value)
    return out


def writer_of(proxy):
    from llmproxy.spend import SpendWriter

    return next(s for s in proxy.gateway.sinks if isinstance(s, SpendWriter))


async def metric(proxy, name: str) -> float:
    async with aiohttp.ClientSession() as s, s.get(proxy.url + "/metrics") as r:
        text = await r.text()
    line = next((ln for ln in text.splitlines() if ln.startswith(name + " ")), f"{name} 0")
    return float(line.split()[1])


async def test_a_row_no_column_can_hold_is_set_apart_and_the_batch_lands(upstream, make_proxy, tmp_path):
    proxy = await make_proxy(openai_config(upstream, spend={"flush_interval": 0.05,
                                                             "spill_path": str(tmp_path / "spill.jsonl")}))
    writer = writer_of(proxy)
    records = records_of(proxy, 11, spend=Decimal(10) ** 12, prompt_tokens=10**30)  # past NUMERIC(24,12)
    records.insert(3, records.pop())  # in the middle of the batch
    for r in records:
        writer.emit(r)
    rows = await rows_eventually(proxy.gateway.services.store, 10)
    assert len(rows) == 10 and "bad-batch-0010" not in {r.request_id for r in rows}
    rejected = tmp_path / "spill.jsonl.rejected"
    loop = asyncio.get_running_loop()
    end = loop.time() + 5
    while not rejected.exists() and loop.time() < end:
        await asyncio.sleep(0.05)
    import orjson

    [kept] = [orjson.loads(line) for line in rejected.read_bytes().splitlines()]
    assert kept["request_id"] == "bad-batch-0010" and "amount out of range" in kept["rejected_because"]
    await asyncio.sleep(1.1)  # the metrics flush
    assert await metric(proxy, "llmproxy_spend_rows_rejected_total") == 1


async def test_text_postgresql_cannot_hold_is_made_storable(upstream, make_proxy, pg_url):
    proxy = await make_proxy(openai_config(upstream, database_url=pg_url, spend={"flush_interval": 0.05}))
    writer = writer_of(proxy)
    records = records_of(proxy, 3, user_id="team\x00user", key_alias="a", client_request_id="cr-\udcff")
    for r in records:
        writer.emit(r)
    rows = await rows_eventually(proxy.gateway.services.store, 3)
    bad = next(r for r in rows if r.request_id == "bad-batch-0002")
    assert bad.user_id == "team\ufffduser" and bad.client_request_id == "cr-\ufffd"
    await send(proxy, 1)  # and the log goes on
    await rows_eventually(proxy.gateway.services.store, 4)


async def test_a_batch_the_database_refuses_is_written_row_by_row(upstream, make_proxy, tmp_path, monkeypatch):
    """A data error from the database (not an outage): the rows it takes land, the one it
    refuses is set apart, and the writer goes on (no retrying the same batch for ever)."""
    proxy = await make_proxy(openai_config(upstream, spend={"flush_interval": 0.05,
                                                             "spill_path": str(tmp_path / "spill.jsonl")}))
    store = proxy.gateway.services.store
    real = store.write_spend

    async def picky(rows):
        if any(r.request_id == "bad-batch-0004" for r in rows):
            raise RuntimeError("invalid byte sequence for encoding UTF8")
        return await real(rows)

    monkeypatch.setattr(store, "write_spend", picky)
    for r in records_of(proxy, 8):
        writer_of(proxy).emit(r)
    rows = await rows_eventually(store, 7)
    assert {r.request_id for r in rows} == {f"bad-batch-{i:04d}" for i in range(8)} - {"bad-batch-0004"}
    loop = asyncio.get_running_loop()
    end = loop.time() + 5
    rejected = tmp_path / "spill.jsonl.rejected"
    while not rejected.exists() and loop.time() < end:
        await asyncio.sleep(0.05)
    assert b"bad-batch-0004" in rejected.read_bytes() and b"invalid byte sequence" in rejected.read_bytes()
    await send(proxy, 2)
    await rows_eventually(store, 9)


# --- spilling stays off the event loop; nothing a crash leaves is forgotten (issue 12) --------


async def test_overflow_is_spilled_off_the_loop_with_one_log_line(upstream, make_proxy, tmp_path, monkeypatch):
    import threading

    from structlog.testing import capture_logs

    from llmproxy.store import StoreUnavailable

    spill = tmp_path / "spill.jsonl"
    proxy = await make_proxy(openai_config(upstream, spend={"flush_interval": 0.05, "queue_size": 4,
                                                             "spill_path": str(spill)}))
    store = proxy.gateway.services.store

    async def down(rows):
        raise StoreUnavailable("down for the test")

    monkeypatch.setattr(store, "write_spend", down)
    loop_thread, fsyncs = threading.get_ident(), []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: fsyncs.append(threading.get_ident()) or real_fsync(fd))
    writer = writer_of(proxy)
    with capture_logs() as logs:
        for r in records_of(proxy, 60):
            writer.emit(r)  # the request path: no file touched here
        assert not fsyncs and not spill.exists()
        loop = asyncio.get_running_loop()
        end = loop.time() + 5
        while (not spill.exists() or len(spill.read_bytes().splitlines()) < 56) and loop.time() < end:
            await asyncio.sleep(0.02)
    assert len(spill.read_bytes().splitlines()) == 56  # all but the 4 the queue holds
    assert fsyncs and loop_thread not in fsyncs
    assert len([e for e in logs if e["event"] == "spend_rows_spilled"]) == 1


async def test_a_replay_a_crash_cut_short_is_finished_at_the_next_start(upstream, make_proxy, tmp_path):
    from datetime import datetime, timezone

    from llmproxy.spend import _to_json
    from llmproxy.store import SpendRow

    spill = tmp_path / "spill.jsonl"
    now = datetime.now(timezone.utc)
    (tmp_path / "spill.jsonl.replaying").write_bytes(
        b"".join(_to_json(SpendRow(request_id=f"stranded-{i}", started_at=now, status=200)) + b"\n" for i in range(3))
        + b'{"request_id": "cut-mid-wri')  # the crash cut this line
    spill.write_bytes(_to_json(SpendRow(request_id="spilled-0", started_at=now, status=200)) + b"\n")
    proxy = await make_proxy(openai_config(upstream, spend={"flush_interval": 0.05, "spill_path": str(spill)}))
    rows = await rows_eventually(proxy.gateway.services.store, 4)
    assert {r.request_id for r in rows} == {"stranded-0", "stranded-1", "stranded-2", "spilled-0"}
    loop = asyncio.get_running_loop()
    end = loop.time() + 5
    while (spill.exists() or (tmp_path / "spill.jsonl.replaying").exists()) and loop.time() < end:
        await asyncio.sleep(0.05)
    assert not spill.exists() and not (tmp_path / "spill.jsonl.replaying").exists()
    assert b"replaying:4" in (tmp_path / "spill.jsonl.rejected").read_bytes()  # the cut line, kept aside


async def test_model_lists_and_unknown_paths_make_no_spend_row(upstream, make_proxy):
    proxy = await make_proxy(openai_config(upstream, spend={"flush_interval": 0.05}))
    async with aiohttp.ClientSession() as s:
        for path in ("/v1/models", "/v1/nope"):
            async with s.get(proxy.url + path, headers=AUTH) as r:
                await r.read()
    await send(proxy, 1)
    rows = await rows_eventually(proxy.gateway.services.store, 1)
    await asyncio.sleep(0.2)
    rows = await proxy.gateway.services.store.spend_logs()
    assert [(r.model, r.status) for r in rows] == [("gpt-test", 200)]


async def test_an_unmapped_database_failure_is_retried_not_set_apart(upstream, make_proxy, tmp_path, monkeypatch):
    """Every row of a batch fails alone too (the driver's error is none the store maps to
    StoreUnavailable): the database is failing, not the data; the rows wait and land later."""
    proxy = await make_proxy(openai_config(upstream, spend={"flush_interval": 0.05,
                                                             "spill_path": str(tmp_path / "spill.jsonl")}))
    store = proxy.gateway.services.store
    real, down = store.write_spend, [True]

    async def failing(rows):
        if down[0]:
            raise RuntimeError("cannot perform operation: connection is closing")
        return await real(rows)

    monkeypatch.setattr(store, "write_spend", failing)
    for r in records_of(proxy, 5):
        writer_of(proxy).emit(r)
    await asyncio.sleep(0.4)
    assert not (tmp_path / "spill.jsonl.rejected").exists()
    down[0] = False
    rows = await rows_eventually(store, 5)
    assert len(rows) == 5
