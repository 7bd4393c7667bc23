"""The access log: one structlog JSON line per request (`event: request`) or admin call
(`event: admin`: action, actor, target, status, duration), from its record.

Never a key (only its alias and id), never a provider key, never a prompt or answer.
"""

from __future__ import annotations

import asyncio
import sys
import time
from typing import TYPE_CHECKING, Any

import orjson
import structlog

from .periodic import every

if TYPE_CHECKING:
    from .context import Record
    from .services import Services


class LineWriter:
    """A structlog logger writing JSON lines to a binary stream, batched.

    A write is a system call; at thousands of requests a second one per access line costs
    more than the line itself (and stdout may be unbuffered: PYTHONUNBUFFERED is common in
    containers). Lines collect in memory and are written together when the oldest is
    `interval` seconds old, past `max_bytes`, by the access log's timer, and at shutdown. On
    a terminal every line is written at once.
    """

    __slots__ = ("file", "interval", "max_bytes", "_buf", "_size", "_last", "_tty")

    def __init__(self, file: Any, interval: float = 0.25, max_bytes: int = 1 << 16) -> None:
        self.file = file
        self.interval = interval
        self.max_bytes = max_bytes
        self._buf: list[bytes] = []
        self._size = 0
        self._last = time.monotonic()
        try:
            self._tty = file.isatty()
        except (AttributeError, ValueError):
            self._tty = False

    def msg(self, message: bytes) -> None:
        self._buf.append(message + b"\n")
        self._size += len(message) + 1
        if self._tty or self._size > self.max_bytes or time.monotonic() - self._last > self.interval:
            self.flush()

    log = debug = info = warn = warning = msg
    fatal = failure = err = error = critical = exception = msg

    def flush(self) -> None:
        self._last = time.monotonic()
        if not self._buf:
            return
        data = b"".join(self._buf)
        self._buf.clear()
        self._size = 0
        try:
            self.file.write(data)
            self.file.flush()
        except (OSError, ValueError):
            pass


class _Factory:
    def __init__(self, writer: LineWriter) -> None:
        self.writer = writer

    def __call__(self, *args: Any) -> LineWriter:
        return self.writer


def configure_logging(stream: Any = None) -> LineWriter:
    """structlog to JSON lines on stdout (bytes, orjson), set once by the CLI at start."""
    from .errorreports import report_errors

    writer = LineWriter(stream or sys.stdout.buffer)
    structlog.configure(
        processors=[
            report_errors,  # idle unless SENTRY_DSN started error reports (errorreports.install)
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(serializer=orjson.dumps),
        ],
        logger_factory=_Factory(writer),
        cache_logger_on_first_use=True,
    )
    return writer


def flush_logs() -> None:
    factory = structlog.get_config().get("logger_factory")
    if isinstance(factory, _Factory):
        factory.writer.flush()


class AccessLog:
    """Event sink: writes the access line. The request path only queues the record; the
    lines are rendered and written together every quarter second (and at shutdown), where
    a batch costs less per line than one line at a time."""

    def __init__(self, options: Any, services: "Services") -> None:
        self.log = structlog.get_logger("llmproxy.access")
        self._flusher: asyncio.Task | None = None
        factory = structlog.get_config().get("logger_factory")
        # With our own writer configured, the line is rendered here in structlog's JSON shape
        # (event, level, timestamp) without the processor chain: a third of the cost.
        self.writer: LineWriter | None = factory.writer if isinstance(factory, _Factory) else None
        self._second = -1
        self._stamp = ""
        self.pending: list["Record"] = []

    async def startup(self) -> None:
        self._flusher = asyncio.create_task(every(0.25, self.flush, "access_log_flush"))

    async def shutdown(self) -> None:
        if self._flusher is not None:
            self._flusher.cancel()
        self.flush()

    def emit(self, r: "Record") -> None:
        self.pending.append(r)

    def flush(self) -> None:
        pending, self.pending = self.pending, []
        for r in pending:
            try:
                self._write(r)
            except Exception:
                self.log.exception("access_log_failed", request_id=r.request_id)
        flush_logs()

    def _write(self, r: "Record") -> None:
        fields = self._admin_fields(r) if r.api == "admin" else self._request_fields(r)
        if self.writer is None:
            event = fields.pop("event")
            self.log.info(event, **fields)
            return
        now = r.started_at + r.duration_s  # when the request ended
        second = int(now)
        if second != self._second:
            self._second = second
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        fields["level"] = "info"
        fields["timestamp"] = f"{self._stamp}.{int((now - second) * 1e6):06d}Z"
        self.writer.msg(orjson.dumps(fields, default=str))

    @staticmethod
    def _admin_fields(r: "Record") -> dict[str, Any]:
        fields: dict[str, Any] = {
            "event": "admin",
            "request_id": r.request_id,
            "client_request_id": r.client_request_id,
            "trace_id": r.trace_id,
            "action": r.action,
            "actor": r.actor,
            "target_id": r.target_id,
            "status": r.status,
            "duration_ms": round(r.duration_s * 1000, 2),
        }
        if r.error_code or r.error_type:
            fields["error"] = r.error_code or r.error_type
        return fields

    @staticmethod
    def _request_fields(r: "Record") -> dict[str, Any]:
        fields: dict[str, Any] = {
            "event": "request",
            "request_id": r.request_id,
            "client_request_id": r.client_request_id,
            "trace_id": r.trace_id,
            "path": r.path,
            "model": r.model,
            "deployment": r.deployment,
            "status": r.status,
            "stream": r.stream,
            "prompt_tokens": r.prompt_tokens,
            "completion_tokens": r.completion_tokens,
            "tokens_estimated": r.tokens_estimated,
            "spend": str(r.spend),
            "duration_ms": round(r.duration_s * 1000, 2),
            "ttfb_ms": None if r.ttfb_s is None else round(r.ttfb_s * 1000, 2),
            "cache": r.cache,
            "key_alias": r.key_alias,
            "team_id": r.team_id,
        }
        if r.error_code or r.error_type:
            fields["error"] = r.error_code or r.error_type
        if len(r.attempts) > 1:
            fields["attempts"] = [f"{a.deployment}:{a.outcome}" for a in r.attempts]
        if r.client_disconnected:
            fields["client_disconnected"] = True
        if r.unpriced:
            fields["unpriced"] = True
        if r.requested_model is not None:  # an unknown model's name, as sent (cut short)
            fields["requested_model"] = r.requested_model
        if r.served_model is not None and r.served_model != r.model:
            fields["served_model"] = r.served_model
        if r.extra:
            fields.update(r.extra)
        return fields
