"""The spend log writer: every request's record becomes one row, written in batches off
the request path, and no row is lost when the database fails.

- `emit` (the request path) only appends the row to a bounded in-memory queue;
- a background task writes up to `batch_size` rows every `flush_interval` seconds, or at
  once when a batch is full;
- a failed write is retried with exponential backoff (0.5 s doubling to 30 s); rows wait
  in the queue meanwhile; past `queue_size` the oldest rows are appended to `spill_path`
  (JSON lines, written in a thread, one fsync per batch) rather than dropped, and the
  spill file is replayed into the database once it answers again;
- what a crash left (a `.replaying` file cut short, WAL segments) is replayed at the next
  start; with `server.workers: N` each worker has its own files (`<spill_path>.<i>`, see
  `spill_stem`) and worker 0 also replays the files of workers that no longer exist;
- `durability: wal` also appends every record to a write-ahead segment
  (`<stem>.wal.<run>.<n>`, fsync'd every `wal_sync_interval` in a thread), dropped each time
  the writer has caught up (every row before it is in the database, set apart or spilled):
  a kill -9 then loses at most `wal_sync_interval` of rows, not the whole queue;
- a row no database can hold is set apart in `<spill_path>.rejected` with its reason,
  and the rest of its batch lands;
- on shutdown (SIGTERM) the queue is flushed once more; what still cannot be written goes
  to the spill file;
- each row is keyed by the server's own request id, so a batch retried after a timeout
  that did commit never doubles a row.
"""

from __future__ import annotations

import asyncio
import os
import re
from collections import deque
from dataclasses import dataclass
from datetime import datetime, timezone
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import orjson
import structlog

from .context import BILLED_APIS
from .periodic import every
from .store import SpendRow, StoreUnavailable
from .usage import MAX_TOKENS

if TYPE_CHECKING:
    from .context import Record
    from .services import Services

log = structlog.get_logger("llmproxy.spend")
REJECTED = "llmproxy_spend_rows_rejected_total"
SPILL_LOG_EVERY = 10.0  # seconds between two "rows spilled" lines while the queue overflows


def storable(text: str | None) -> str | None:
    """`text` as every database can hold it: PostgreSQL's TEXT holds no NUL, and neither
    database takes a lone surrogate (what a header's non-UTF-8 bytes decode to). Each such
    character becomes U+FFFD; any other text is returned as it is."""
    if text is None or (text.isascii() and "\x00" not in text):
        return text
    return text.replace("\x00", "\ufffd").encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def row_of(r: "Record") -> SpendRow:
    """The spend row of a record; raises (TypeError, ValueError) for a record no row can
    hold (a spend past the column's range), which the writer sets apart."""
    return SpendRow(
        request_id=r.request_id,
        client_request_id=storable(r.client_request_id),
        started_at=datetime.fromtimestamp(r.started_at, timezone.utc),
        key_id=storable(r.key_id),
        team_id=storable(r.team_id),
        user_id=storable(r.user_id),
        model=storable(r.model),
        deployment=storable(r.deployment),
        prompt_tokens=min(r.prompt_tokens, MAX_TOKENS),  # a plugin's record may say anything
        completion_tokens=min(r.completion_tokens, MAX_TOKENS),
        tokens_estimated=r.tokens_estimated,
        spend=r.spend,
        status=r.status,
        duration_ms=round(r.duration_s * 1000, 3),
        ttfb_ms=None if r.ttfb_s is None else round(r.ttfb_s * 1000, 3),
        cache_hit=r.cache == "hit",
        served_model=storable(r.served_model),
        trace_id=storable(r.trace_id),
        unpriced=r.unpriced,
    )


def _rejected_json(item: Any, reason: str) -> bytes:
    """A rejected record or row as one JSON object, with why: whatever its fields hold."""
    if isinstance(item, dict):  # a row that is already JSON-shaped (a usage event)
        data = dict(item)
    else:
        fields = getattr(item, "__dataclass_fields__", None) or item.__slots__
        data = {name: getattr(item, name, None) for name in fields}
    for name, value in data.items():
        if type(value) is int and not -(2**63) <= value < 2**63:  # orjson writes 64-bit ints only
            data[name] = str(value)
    data["rejected_because"] = reason
    return orjson.dumps(data, default=str)


@dataclass(frozen=True)
class _Unreadable:
    """A spill file's line that is no row (cut by a crash mid-write): kept as rejected."""

    request_id: str


def _read_spill(path: str, decode: Any = None) -> tuple[list[Any], list[tuple[int, str]]]:
    """The rows of a spill file, and (line number, why) for each line that is none."""
    decode = decode or _from_json
    rows, bad = [], []
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(decode(line))
            except (ValueError, TypeError, KeyError) as exc:
                bad.append((n, f"{type(exc).__name__}: {exc}"))
    return rows, bad


def spill_stem(base: str, worker: tuple[int, int]) -> str:
    """The name this worker's spend files start with: `spill_path` itself for a single
    process, `<spill_path>.<i>` for worker i of several (two workers never share a file)."""
    i, n = worker
    return base if n == 1 else f"{base}.{i}"


_LEFT = re.compile(r"(\.\d+)?(\.replaying|\.wal\.[0-9a-f]+\.\d+)?")


def _leftovers(base: str, worker: tuple[int, int], run: str) -> list[str]:
    """What earlier runs left for this worker to replay: its own `.replaying` file and WAL
    segments (not this run's), and for worker 0 every spend file of a stem no current
    worker owns (a run with more workers, or a single process before `workers: N`)."""
    i, n = worker
    folder, name = os.path.split(os.path.abspath(base))
    try:
        entries = sorted(os.listdir(folder or "."))
    except FileNotFoundError:
        return []
    own = os.path.abspath(spill_stem(base, worker))
    owned = {os.path.abspath(spill_stem(base, (k, n))) for k in range(n)}
    out = []
    for entry in entries:
        m = _LEFT.fullmatch(entry[len(name):]) if entry.startswith(name) else None
        if m is None or (m[2] or "").startswith(f".wal.{run}."):
            continue
        stem, path = os.path.join(folder, name + (m[1] or "")), os.path.join(folder, entry)
        if stem == own:
            if m[2]:  # the plain spill file is this run's own, replayed as such
                out.append(path)
        elif i == 0 and stem not in owned:
            out.append(path)
    return out


def _append(path: str, lines: list[bytes]) -> None:
    with open(path, "ab") as f:
        f.writelines(lines)
        f.flush()
        os.fsync(f.fileno())


def _to_json(row: SpendRow) -> bytes:
    d = {name: getattr(row, name) for name in row.__dataclass_fields__}
    d["started_at"] = row.started_at.isoformat()
    d["spend"] = str(row.spend)
    return orjson.dumps(d)


def _from_json(line: bytes) -> SpendRow:
    d = orjson.loads(line)
    d["started_at"] = datetime.fromisoformat(d["started_at"])
    d["spend"] = Decimal(d["spend"])
    return SpendRow(**d)


class SpendWriter:
    """Event sink: request records to the spend log (see the module's docstring).

    The machinery (queue, batches, backoff, spill and replay, rejected rows, WAL) is for
    any destination of rows: a subclass names itself (`kind`: its log events, readiness
    and files say so), says where its settings are (`settings`), what a record becomes
    (`convert`), how rows are written (`write`: raise StoreUnavailable to be retried, any
    other error for the batch to be tried row by row) and how a row is kept in a file
    (`encode`, `decode`). The `webhook` usage-event sink is one (`llmproxy.events`)."""

    kind = "spend"  # log events `spend_...`; readiness `spend_log`
    readiness_key = "spend_log"
    rejected_metric = REJECTED
    rejected_help = "Spend rows no database takes (kept in <spill_path>.rejected)."
    row_type: type = SpendRow

    def settings(self, options: Any) -> Any:
        """batch_size, flush_interval, queue_size, spill_path, retention_days, durability,
        wal_sync_interval."""
        return self.services.config.spend

    def convert(self, record: "Record") -> Any:
        return row_of(record)

    async def write(self, rows: list[Any]) -> None:
        await self.services.store.write_spend(rows)

    def encode(self, row: Any) -> bytes:
        return _to_json(row)

    def decode(self, line: bytes) -> Any:
        return _from_json(line)

    def _row(self, item: Any) -> Any:
        return item if isinstance(item, self.row_type) else self.convert(item)

    def __init__(self, options: Any, services: "Services") -> None:
        self.services = services
        cfg = self.settings(options)
        self.batch_size = cfg.batch_size
        self.interval = cfg.flush_interval
        self.queue_size = cfg.queue_size
        self.spill_path = spill_stem(cfg.spill_path, services.worker)
        self._spill_base = cfg.spill_path
        self.retention_days = getattr(cfg, "retention_days", None)
        self.queue: deque[Any] = deque()  # records, or rows back from a failed write
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._failures = 0
        # The spill file is replayed once the database answers; what an earlier run left
        # (found by the first replay, in a thread) before it.
        self._spill_pending = False
        self._leftovers: list[str] | None = None
        self.wal = getattr(cfg, "durability", "memory") == "wal"
        self._wal_interval = getattr(cfg, "wal_sync_interval", 0.05)
        self._run_id = os.urandom(4).hex()  # this run's WAL segments are not leftovers
        self._wal_seq = 0
        self._wal_buf: list[Any] = []  # records not yet in the current segment
        self._wal_dirty = False  # the current segment holds rows
        self._wal_lock = asyncio.Lock()
        self._wal_task: asyncio.Task | None = None
        self._overflow: list[Any] = []  # past queue_size, on its way to the spill file (off the loop)
        self._spiller: asyncio.Task | None = None
        self._spill_lock = asyncio.Lock()  # one file operation at a time: appends, the replay's rename
        self._spill_logged_at = -SPILL_LOG_EVERY
        self._spilled_unlogged = 0
        self.written = 0
        self.spilled = 0
        services.metrics.define(self.rejected_metric, "counter", self.rejected_help, ())

    # --- the request path --------------------------------------------------------------

    def emit(self, record: "Record") -> None:
        if record.api not in BILLED_APIS:  # model lists, token counts, unknown paths, admin calls cost nothing
            return
        self.queue.append(record)  # converted to a row off the request path
        if self.wal:
            self._wal_buf.append(record)
        if len(self.queue) >= self.batch_size:
            self._wake.set()
        if len(self.queue) > self.queue_size:  # the oldest go to the spill file, written off the loop
            self._overflow.extend(self.queue.popleft() for _ in range(len(self.queue) - self.queue_size))
            if self._spiller is None or self._spiller.done():
                self._spiller = asyncio.get_running_loop().create_task(self._spill_overflow())

    def health(self) -> dict[str, Any]:
        """For /health/readiness: how the spend log is doing."""
        return {self.readiness_key: {"state": self.services.readiness.get(self.readiness_key, "ok"),
                                     "queued": len(self.queue),
                              "spilling": len(self._overflow), "spilled": self.spilled, "written": self.written,
                              "spill_file": self._spill_pending or bool(self._leftovers)}}

    # --- lifecycle ------------------------------------------------------------------------

    async def startup(self) -> None:
        self._task = asyncio.create_task(self._run(), name="llmproxy-spend-writer")
        if self.wal:
            self._wal_task = asyncio.create_task(every(self._wal_interval, self._wal_sync, "spend_wal_sync"))

    async def shutdown(self) -> None:
        for task in (self._task, self._wal_task):
            if task is not None:
                task.cancel()
                try:
                    await task
                except asyncio.CancelledError:
                    pass
        try:
            while self.queue:
                await asyncio.wait_for(self._write_batch(), 5)
        except Exception as exc:  # whatever failed, the rows go to the spill file below
            log.warning(f"{self.kind}_flush_failed", error=f"{type(exc).__name__}: {exc}", rows=len(self.queue))
        if self._spiller is not None:
            await asyncio.gather(self._spiller, return_exceptions=True)
        if self.queue or self._overflow:
            await self._spill([*self._overflow, *self._drain()])
            self._overflow.clear()
            log.warning(f"{self.kind}_spilled_at_shutdown", path=self.spill_path)
        if self.wal:  # every row is in the database, set apart or spilled
            await self._wal_caught_up()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        next_prune = loop.time()
        due = True  # at once: what an earlier run left is written back at start
        while True:
            if not due:
                try:
                    await asyncio.wait_for(self._wake.wait(), self.interval)
                except asyncio.TimeoutError:
                    due = True
            self._wake.clear()
            try:
                # Full batches whenever there are; what is left (less than a batch) only when
                # the interval is up. Draining to empty after each full batch would write a
                # stream of tiny batches under load (the rows that arrived during the last
                # write), each its own transaction and fsync: measured 20-row batches cost
                # 36 µs of CPU per row on SQLite, 500-row ones 13.
                while len(self.queue) >= self.batch_size or (due and self.queue):
                    await self._write_batch()
                due = False
                if (self.wal and not self.queue and not self._overflow
                        and (self._spiller is None or self._spiller.done())):
                    await self._wal_caught_up()
                if self._failures:
                    log.info(f"{self.kind}_log_recovered", after_failures=self._failures)
                    self._failures = 0
                    self.services.readiness[self.readiness_key] = "ok"
                if self._spill_pending or self._leftovers is None or self._leftovers:
                    self._spill_pending = False  # set again by a spill (or a failed replay) meanwhile
                    try:
                        await self._replay_spill()
                    except BaseException:
                        self._spill_pending = True
                        raise
                if self.retention_days and loop.time() >= next_prune:
                    next_prune = loop.time() + 3600
                    await self._prune()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the database failed: keep the rows, back off
                self._failures += 1
                self.services.readiness[self.readiness_key] = "retrying"
                delay = min(30.0, 0.5 * 2 ** min(self._failures - 1, 6))
                log.warning(f"{self.kind}_write_failed", error=f"{type(exc).__name__}: {exc}", queued=len(self.queue),
                            retry_in=delay)
                await asyncio.sleep(delay)

    async def _write_batch(self) -> None:
        n = min(self.batch_size, len(self.queue))
        batch = [self.queue.popleft() for _ in range(n)]
        rows: list[SpendRow] = []
        rejected: list[tuple[Any, str]] = []
        for item in batch:  # one record no row can hold is set apart; the rest goes on
            try:
                rows.append(self._row(item))
            except (TypeError, ValueError, OverflowError) as exc:
                rejected.append((item, f"{type(exc).__name__}: {exc}"))
        try:
            await self.write(rows)
        except StoreUnavailable:
            self.queue.extendleft(reversed(rows))  # back at the front, in order
            raise
        except Exception as exc:  # the database refused the data: find the rows it refuses
            log.warning(f"{self.kind}_batch_refused", rows=len(rows), error=f"{type(exc).__name__}: {exc}")
            await self._write_one_by_one(rows, rejected)
        except BaseException:
            self.queue.extendleft(reversed(rows))
            raise
        else:
            self.written += len(rows)
        if rejected:
            await self._reject(rejected)

    async def _write_one_by_one(self, rows: list[SpendRow], rejected: list[tuple[Any, str]]) -> None:
        """Each row alone: the ones the database refuses are set apart. When not one row of
        several lands, the database is failing, not the data (an error no store maps to
        StoreUnavailable): they all go back to the queue to be retried, none is set apart."""
        refused: list[tuple[Any, str]] = []
        landed = 0
        for i, row in enumerate(rows):
            try:
                await self.write([row])
                landed += 1
            except StoreUnavailable:
                self.queue.extendleft(reversed([r for r, _ in refused] + rows[i:]))
                if rejected:
                    await self._reject(rejected)
                raise
            except Exception as exc:
                refused.append((row, f"{type(exc).__name__}: {exc}"))
        self.written += landed
        if refused and not landed and len(rows) > 1:
            self.queue.extendleft(reversed(rows))
            if rejected:
                await self._reject(rejected)
            raise StoreUnavailable(f"every row of a batch of {len(rows)} failed: {refused[0][1]}")
        rejected.extend(refused)

    async def _reject(self, rejected: list[tuple[Any, str]]) -> None:
        """Rows no database takes go to `<spill_path>.rejected` (JSON lines with the reason),
        are counted, and logged with their request ids: kept for a person, never retried."""
        lines = [_rejected_json(item, reason) + b"\n" for item, reason in rejected]
        path = self.spill_path + ".rejected"
        await asyncio.to_thread(_append, path, lines)
        self.services.metrics.inc(self.rejected_metric, (), len(lines))
        for item, reason in rejected:
            rid = item["request_id"] if isinstance(item, dict) else item.request_id
            log.error(f"{self.kind}_row_rejected", request_id=rid, reason=reason, path=path)

    def _drain(self) -> Any:
        while self.queue:
            yield self.queue.popleft()

    # --- spilling ---------------------------------------------------------------------------

    async def _spill_overflow(self) -> None:
        """Append what overflowed the queue to the spill file, in a thread, one fsync per
        batch; logs once per SPILL_LOG_EVERY seconds with a count, not once per row."""
        while self._overflow:
            items, self._overflow = self._overflow, []
            try:
                await self._spill(items)
            except OSError as exc:  # the disk is full or gone: keep them, try again shortly
                self._overflow[:0] = items
                log.error(f"{self.kind}_spill_failed", error=f"{type(exc).__name__}: {exc}", rows=len(self._overflow),
                          path=self.spill_path)
                await asyncio.sleep(1.0)
                continue
            now = asyncio.get_running_loop().time()
            self._spilled_unlogged += len(items)
            if now - self._spill_logged_at >= SPILL_LOG_EVERY:
                log.warning(f"{self.kind}_rows_spilled", rows=self._spilled_unlogged, path=self.spill_path,
                            reason=f"more than spend.queue_size ({self.queue_size}) rows waiting")
                self._spill_logged_at, self._spilled_unlogged = now, 0

    async def _spill(self, items: list[Any]) -> None:
        rows, rejected = [], []
        for item in items:
            try:
                rows.append(self._row(item))
            except (TypeError, ValueError, OverflowError) as exc:
                rejected.append((item, f"{type(exc).__name__}: {exc}"))
        if rejected:
            await self._reject(rejected)
        if not rows:
            return
        lines = [self.encode(row) + b"\n" for row in rows]
        async with self._spill_lock:
            await asyncio.to_thread(_append, self.spill_path, lines)
        self.spilled += len(lines)
        self._spill_pending = True

    async def _replay_spill(self) -> None:
        """Write back (idempotent by request id) and remove, first what earlier runs left
        (`_leftovers`), then this run's spill file (renamed `.replaying` while it is read,
        so that new spills start a new file)."""
        if self._leftovers is None:
            self._leftovers = await asyncio.to_thread(_leftovers, self._spill_base, self.services.worker,
                                                      self._run_id)
        while self._leftovers:
            await self._replay_file(self._leftovers[0], left=True)
            self._leftovers.pop(0)
        replaying = self.spill_path + ".replaying"
        async with self._spill_lock:
            if not await asyncio.to_thread(os.path.exists, self.spill_path):
                return
            await asyncio.to_thread(os.replace, self.spill_path, replaying)
        await self._replay_file(replaying)

    async def _replay_file(self, path: str, left: bool = False) -> None:
        try:
            rows, bad = await asyncio.to_thread(_read_spill, path, self.decode)
        except FileNotFoundError:  # written back by an earlier try (its rows are in the spill file)
            return
        if bad:
            await self._reject([(_Unreadable(f"{path}:{n}"), reason) for n, reason in bad])
        try:
            for i in range(0, len(rows), self.batch_size):
                await self.write(rows[i:i + self.batch_size])
        except BaseException:
            # Not written: into this run's spill file, nothing lost, tried again later.
            async with self._spill_lock:
                await asyncio.to_thread(_append, self.spill_path, [self.encode(row) + b"\n" for row in rows])
                await asyncio.to_thread(os.remove, path)
            self._spill_pending = True
            raise
        await asyncio.to_thread(os.remove, path)
        log.info(f"{self.kind}_spill_replayed", rows=len(rows), path=path, left_by_an_earlier_run=left)

    # --- the write-ahead file (durability: wal) -------------------------------------------

    def _wal_path(self) -> str:
        return f"{self.spill_path}.wal.{self._run_id}.{self._wal_seq}"

    async def _wal_sync(self) -> None:
        """Append what was emitted since the last sync to the current segment, one fsync,
        in a thread (the periodic task calls this every `wal_sync_interval`)."""
        if not self._wal_buf:
            return
        records, self._wal_buf = self._wal_buf, []
        lines = []
        for r in records:
            try:
                lines.append(self.encode(self._row(r)) + b"\n")
            except (TypeError, ValueError, OverflowError):  # the writer sets it apart, with its reason
                pass
        async with self._wal_lock:
            await asyncio.to_thread(_append, self._wal_path(), lines)
            self._wal_dirty = True

    async def _wal_caught_up(self) -> None:
        """Every row emitted so far is in the database, set apart or spilled: the current
        segment holds nothing that is needed; start a new one and remove it."""
        self._wal_buf.clear()  # (before any await: rows emitted from here on are in the next segment)
        if not self._wal_dirty:
            return
        async with self._wal_lock:
            old = self._wal_path()
            self._wal_seq += 1
            self._wal_dirty = False
            try:
                await asyncio.to_thread(os.remove, old)
            except FileNotFoundError:
                pass

    async def _prune(self) -> None:
        from datetime import timedelta

        before = datetime.now(timezone.utc) - timedelta(days=self.retention_days)
        removed = await self.services.store.prune_spend(before)
        if removed:
            log.info("spend_pruned", rows=removed, before=before.isoformat())
