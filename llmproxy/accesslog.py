"""The access log: one structlog JSON line per request, from its record.

Never a key (only its alias and id), never a provider key, never a prompt or answer.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

import orjson
import structlog

if TYPE_CHECKING:
    from .context import Record
    from .services import Services


def configure_logging(stream: Any = None) -> None:
    """structlog to JSON lines on stdout (bytes, orjson), set once by the CLI at start."""
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(serializer=orjson.dumps),
        ],
        logger_factory=structlog.BytesLoggerFactory(stream or sys.stdout.buffer),
        cache_logger_on_first_use=True,
    )


class AccessLog:
    """Event sink: writes the access line."""

    def __init__(self, options: Any, services: "Services") -> None:
        self.log = structlog.get_logger("llmproxy.access")

    def emit(self, r: "Record") -> None:
        fields: dict[str, Any] = {
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
        if r.extra:
            fields.update(r.extra)
        self.log.info("request", **fields)
