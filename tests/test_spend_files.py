"""The spend log's files (issue 12): one spill file per worker, whatever an earlier run left
replayed at the next start (by worker 0 for workers that no longer exist), and the
`durability: wal` write-ahead segments that bound what a kill -9 loses."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

import pytest

from llmproxy.config import parse_config
from llmproxy.context import Record
from llmproxy.metrics import Metrics
from llmproxy.services import Services, worker_slot
from llmproxy.spend import SpendWriter, _to_json
from llmproxy.store import SpendRow, StoreUnavailable

from .test_cli import PY, free_port, stop, wait_live


class FakeStore:
    """Keeps rows by request id (as the real stores do: a row written twice lands once);
    `down` makes every write fail as a database outage does."""

    def __init__(self) -> None:
        self.rows: dict[str, SpendRow] = {}
        self.down = False

    async def write_spend(self, rows: list[SpendRow]) -> None:
        if self.down:
            raise StoreUnavailable("the test's database is down")
        for r in rows:
            self.rows.setdefault(r.request_id, r)


def writer(tmp_path: Path, store: FakeStore, worker=(0, 1), **spend) -> SpendWriter:
    cfg = parse_config({"models": [{"name": "m", "deployments": [{"provider": "mock"}]}],
                        "spend": {"spill_path": str(tmp_path / "spill.jsonl"), "flush_interval": 0.02, **spend}})
    services = Services(config=cfg, metrics=Metrics(), store=store, worker=worker)
    return SpendWriter(None, services)


def record(request_id: str) -> Record:
    return Record(request_id, None, "chat", "/v1/chat/completions", time.time(), model="m", status=200)


def row_line(request_id: str) -> bytes:
    return _to_json(SpendRow(request_id=request_id, started_at=datetime.now(timezone.utc), status=200)) + b"\n"


async def until(predicate, bound: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + bound
    while not predicate():
        if loop.time() > end:
            raise AssertionError("not within the bound")
        await asyncio.sleep(0.02)


def ids_in(path: Path) -> set[str]:
    return {json.loads(line)["request_id"] for line in path.read_bytes().splitlines() if line.strip()}


def test_the_supervisor_tells_each_worker_its_place(monkeypatch):
    monkeypatch.setenv("LLMPROXY_WORKER", "2/3")
    assert worker_slot() == (2, 3)
    for bad in ("", "x", "3/3", "-1/2", "1"):
        monkeypatch.setenv("LLMPROXY_WORKER", bad)
        assert worker_slot() == (0, 1)


async def test_each_worker_spills_to_its_own_file(tmp_path):
    store = FakeStore()
    store.down = True
    writers = [writer(tmp_path, store, (i, 2), queue_size=2) for i in range(2)]
    for w in writers:
        await w.startup()
    try:
        for i, w in enumerate(writers):
            for n in range(6):
                w.emit(record(f"w{i}-{n}"))
        spills = [tmp_path / "spill.jsonl.0", tmp_path / "spill.jsonl.1"]
        await until(lambda: all(p.exists() and len(ids_in(p)) == 4 for p in spills))
        assert ids_in(spills[0]) == {f"w0-{n}" for n in range(4)}  # the oldest four, its own only
        assert ids_in(spills[1]) == {f"w1-{n}" for n in range(4)}
        assert not (tmp_path / "spill.jsonl").exists()
        store.down = False
        await until(lambda: len(store.rows) == 12)
        await until(lambda: not any(p.exists() for p in spills))
    finally:
        for w in writers:
            await w.shutdown()


async def test_what_earlier_runs_left_is_replayed_by_its_owner_or_worker_0(tmp_path):
    files = {
        "spill.jsonl": "single-process",  # a run before workers: 2
        "spill.jsonl.replaying": "single-process-replaying",
        "spill.jsonl.0.replaying": "w0-crashed-mid-replay",
        "spill.jsonl.1": "w1-spilled",
        "spill.jsonl.1.wal.0badc0de.3": "w1-wal",
        "spill.jsonl.3": "w3-of-an-earlier-run-with-4",
        "spill.jsonl.3.wal.feedf00d.0": "w3-wal",
    }
    for name, request_id in files.items():
        (tmp_path / name).write_bytes(row_line(request_id) + row_line(request_id + "-b"))
    (tmp_path / "spill.jsonl.3.rejected").write_bytes(b'{"kept": "for a person"}\n')
    (tmp_path / "spill.jsonl.notes").write_bytes(b"not ours\n")
    stores = [FakeStore(), FakeStore()]
    writers = [writer(tmp_path, stores[i], (i, 2)) for i in range(2)]
    for w in writers:
        await w.startup()
    try:
        await until(lambda: len(stores[0].rows) == 10 and len(stores[1].rows) == 4)
        w1 = {"w1-spilled", "w1-wal"}
        assert {r.split("-b")[0] for r in stores[1].rows} == w1
        assert {r.split("-b")[0] for r in stores[0].rows} == set(files.values()) - w1
        await until(lambda: not any((tmp_path / name).exists() for name in files))
        assert (tmp_path / "spill.jsonl.3.rejected").exists() and (tmp_path / "spill.jsonl.notes").exists()
    finally:
        for w in writers:
            await w.shutdown()


async def test_a_leftover_that_cannot_be_written_moves_to_this_runs_spill_file(tmp_path):
    (tmp_path / "spill.jsonl.wal.0badc0de.0").write_bytes(row_line("left-0") + row_line("left-1"))
    store = FakeStore()
    store.down = True
    w = writer(tmp_path, store)
    w._spill_pending = True  # what a spill does: try the files while the database is down
    await w.startup()
    try:
        w.emit(record("now-0"))  # a write fails: the replay waits for the database
        await until(lambda: (tmp_path / "spill.jsonl").exists() or w._failures > 0)
        store.down = False
        await until(lambda: set(store.rows) == {"left-0", "left-1", "now-0"}, bound=10)
        await until(lambda: not list(tmp_path.glob("spill.jsonl*")))
    finally:
        await w.shutdown()


async def test_the_wal_holds_each_row_until_the_database_has_it(tmp_path):
    store = FakeStore()
    store.down = True
    w = writer(tmp_path, store, durability="wal", wal_sync_interval=0.02)
    await w.startup()
    try:
        for n in range(5):
            w.emit(record(f"r{n}"))

        def segments() -> list[Path]:
            return list(tmp_path.glob("spill.jsonl.wal.*"))
        await until(lambda: len(segments()) == 1 and len(ids_in(segments()[0])) == 5)
        assert not store.rows
        store.down = False
        await until(lambda: len(store.rows) == 5, bound=10)
        await until(lambda: not segments())  # caught up: the segment held nothing needed any more
        w.emit(record("r5"))
        await until(lambda: len(store.rows) == 6)
        await until(lambda: not segments())
    finally:
        await w.shutdown()
    assert not list(tmp_path.glob("spill.jsonl*"))


async def test_rows_of_a_writer_that_died_come_back_from_its_wal(tmp_path):
    """A kill -9 in miniature: the writer's tasks stop without its shutdown; the queue
    is gone; the next run replays the segment."""
    store = FakeStore()
    store.down = True
    w = writer(tmp_path, store, durability="wal", wal_sync_interval=0.02)
    await w.startup()
    for n in range(7):
        w.emit(record(f"r{n}"))
    await until(lambda: any(len(ids_in(p)) == 7 for p in tmp_path.glob("spill.jsonl.wal.*")))
    for task in (w._task, w._wal_task):
        task.cancel()
    await asyncio.gather(w._task, w._wal_task, return_exceptions=True)
    store.down = False
    again = writer(tmp_path, store, durability="wal")
    await again.startup()
    try:
        await until(lambda: len(store.rows) == 7)
        await until(lambda: not list(tmp_path.glob("spill.jsonl.wal.*")))
    finally:
        await again.shutdown()


# --- kill -9 through the real server ---------------------------------------------------------


def _serve(tmp_path: Path, port: int, durability: str) -> subprocess.Popen:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"server: {{port: {port}}}\nmaster_key: sk-master-test\n"
                   f"spend: {{flush_interval: 30, durability: {durability}, wal_sync_interval: 0.05}}\n"
                   "models:\n  - name: mock\n    deployments: [{provider: mock, chunks: 2}]\n")
    proc = subprocess.Popen([PY, "-m", "llmproxy", "serve", "--config", str(cfg)], cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_live(port, proc)
    return proc


def _chat(port: int) -> None:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", method="POST",
                                 data=b'{"model":"mock","messages":[{"role":"user","content":"x"}]}',
                                 headers={"Authorization": "Bearer sk-master-test"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert resp.status == 200
        resp.read()


def _spend_rows(port: int) -> int:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/spend/logs?page_size=1000",
                                 headers={"Authorization": "Bearer sk-master-test"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        body = json.loads(resp.read())
    return len(body["data"] if isinstance(body, dict) else body)


@pytest.mark.parametrize("durability, kept", [("wal", True), ("memory", False)])
def test_kill_9(tmp_path, durability: str, kept: bool):
    """40 answered requests, none written yet (flush_interval 30 s), then kill -9. With the
    WAL every one comes back at the next start; in memory only, every one is lost (the
    window the README states)."""
    port = free_port()
    proc = _serve(tmp_path, port, durability)
    try:
        n = 40
        for _ in range(n):
            _chat(port)
        if durability == "wal":  # bounded wait for the event: the segment holds all 40
            end = time.monotonic() + 5
            while time.monotonic() < end and sum(
                    len(p.read_bytes().splitlines()) for p in tmp_path.glob("llmproxy-spend-spill.jsonl.wal.*")) < n:
                time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    proc = _serve(tmp_path, port, durability)
    try:
        end = time.monotonic() + 10
        rows = _spend_rows(port)
        while kept and rows < n and time.monotonic() < end:
            time.sleep(0.1)
            rows = _spend_rows(port)
        assert rows == (n if kept else 0)
        assert not list(tmp_path.glob("llmproxy-spend-spill.jsonl.wal.*")) or not kept
    finally:
        assert stop(proc) == 0


async def test_under_load_the_writer_writes_full_batches_not_a_stream_of_small_ones(tmp_path):
    """Rows keep arriving while a batch is written. The writer used to drain the queue to
    empty after each full batch, writing the few rows that came meanwhile as batches of
    their own (each a transaction and an fsync); what is left waits for the next full
    batch or the interval."""
    sizes: list[int] = []

    class SlowStore(FakeStore):
        async def write_spend(self, rows):
            sizes.append(len(rows))
            await asyncio.sleep(0.02)  # a write takes a while...
            await super().write_spend(rows)

    store = SlowStore()
    w = writer(tmp_path, store, batch_size=50, flush_interval=0.5)
    await w.startup()
    try:
        await asyncio.sleep(0.05)  # the start's pass is done
        sizes.clear()
        for n in range(230):  # ... while requests keep coming: 230 rows over ~0.23 s
            w.emit(record(f"r{n}"))
            await asyncio.sleep(0.001)
        await until(lambda: len(store.rows) == 230, bound=5)
        assert sizes[:-1] == [50] * (len(sizes) - 1) and 0 < sizes[-1] <= 50, sizes
        assert len(sizes) == 5
    finally:
        await w.shutdown()
