"""Error reports to Sentry: with `SENTRY_DSN` set (and `sentry-sdk` installed: the
`sentry` extra), every 500 and every error-level log line is reported, with its request id
and trace id as tags.

The gateway's log lines are structlog's, not the standard library's, so a processor at
the front of structlog's chain (`report_errors`, idle until `install`) hands error-level
events to Sentry (the exception's traceback when there is one). The SDK's aiohttp integration adds what it sees
of the request.

Nothing secret leaves (`scrub`, Sentry's `before_send`): no local variables of frames, no
request body, only a few harmless request headers (never `Authorization` or `x-api-key`),
and every string of the event searched for the master key, each deployment's provider
key and anything shaped like an `sk-` key, which become `[Filtered]`. Prompts never reach
an event: log lines hold none, and bodies and frame variables are not sent.
"""

from __future__ import annotations

import os
import re
from typing import TYPE_CHECKING, Any, Mapping

import structlog

if TYPE_CHECKING:
    from .config import Config

log = structlog.get_logger("llmproxy.errorreports")
FILTERED = "[Filtered]"
KEEP_HEADERS = frozenset({"content-type", "content-length", "user-agent", "x-request-id", "traceparent",
                          "anthropic-version"})
_KEY_SHAPE = re.compile(r"sk-[A-Za-z0-9_\-]{16,}")
_ERROR_LEVELS = frozenset({"error", "exception", "critical", "fatal"})


def secrets_of(config: "Config") -> list[str]:
    """What must never be in a report: the master key and every provider key."""
    found = {config.master_key} | {d.api_key for m in config.models for d in m.deployments}
    return sorted((s for s in found if s and len(s) >= 4), key=len, reverse=True)


def scrub(event: Any, secrets: list[str]) -> Any:
    """`event` with no secret in it (see the module docstring); changed in place."""
    request = event.get("request") if isinstance(event, dict) else None
    if isinstance(request, dict):
        request.pop("data", None)
        request.pop("cookies", None)
        headers = request.get("headers")
        if isinstance(headers, dict):
            request["headers"] = {k: v for k, v in headers.items() if k.lower() in KEEP_HEADERS}
        if isinstance(request.get("query_string"), str):
            request["query_string"] = _clean(request["query_string"], secrets)
    return _walk(event, secrets)


def _clean(text: str, secrets: list[str]) -> str:
    for secret in secrets:
        if secret in text:
            text = text.replace(secret, FILTERED)
    return _KEY_SHAPE.sub(FILTERED, text)


def _walk(value: Any, secrets: list[str]) -> Any:
    if isinstance(value, str):
        return _clean(value, secrets)
    if isinstance(value, dict):
        for k in list(value):
            value[k] = _walk(value[k], secrets)
        return value
    if isinstance(value, list):
        for i, item in enumerate(value):
            value[i] = _walk(item, secrets)
        return value
    if isinstance(value, tuple):
        return tuple(_walk(v, secrets) for v in value)
    return value


_enabled = False  # set by install(); the processor is in the chain from the start (cached loggers)


def report_errors(logger: Any, method: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    """A structlog processor: an error-level line goes to Sentry too (unchanged for the log)."""
    if _enabled and (method in _ERROR_LEVELS or str(event_dict.get("level", "")).lower() in _ERROR_LEVELS):
        import sentry_sdk

        with sentry_sdk.new_scope() as scope:
            for tag in ("request_id", "trace_id", "deployment", "action"):
                value = event_dict.get(tag)
                if isinstance(value, str):
                    scope.set_tag(tag, value[:200])
            scope.set_extra("log", {k: v for k, v in event_dict.items() if k not in ("exc_info", "_record")
                                    and isinstance(v, (str, int, float, bool, type(None)))})
            exc = event_dict.get("exc_info")
            if exc is True:
                sentry_sdk.capture_exception()
            elif isinstance(exc, BaseException):
                sentry_sdk.capture_exception(exc)
            elif isinstance(exc, tuple) and len(exc) == 3 and exc[1] is not None:
                sentry_sdk.capture_exception(exc[1])
            else:
                sentry_sdk.capture_message(str(event_dict.get("event", "error")), level="error")
    return event_dict


def install(config: "Config", env: Mapping[str, str] = os.environ) -> bool:
    """Start reporting when `SENTRY_DSN` is set; True when it did."""
    dsn = env.get("SENTRY_DSN")
    if not dsn:
        return False
    try:
        import sentry_sdk
        from sentry_sdk.integrations.aiohttp import AioHttpIntegration
    except ImportError:
        log.warning("sentry_unavailable", detail="SENTRY_DSN is set but sentry-sdk is not installed "
                    "(pip install 'llmproxy[sentry]'): errors are not reported")
        return False
    from . import __version__

    secrets = secrets_of(config)
    sentry_sdk.init(
        dsn=dsn, integrations=[AioHttpIntegration()], include_local_variables=False,
        max_request_body_size="never", traces_sample_rate=None, release=f"llmproxy@{__version__}",
        trace_propagation_targets=[],  # no sentry-trace / baggage on upstream requests: they carry the DSN's key
        environment=env.get("SENTRY_ENVIRONMENT"),
        before_send=lambda event, hint: scrub(event, secrets),
        before_breadcrumb=lambda crumb, hint: _walk(crumb, secrets))
    global _enabled
    _enabled = True
    processors = list(structlog.get_config().get("processors", []))
    if report_errors not in processors:  # (an embedding that configured structlog itself)
        structlog.configure(processors=[report_errors, *processors])
    log.info("sentry_reporting", environment=env.get("SENTRY_ENVIRONMENT"))
    return True


def uninstall() -> None:
    """Stop reporting (tests; an embedding that re-configures)."""
    global _enabled
    _enabled = False
    import sentry_sdk

    client = sentry_sdk.get_client()
    if client.is_active():
        client.close(timeout=2.0)
