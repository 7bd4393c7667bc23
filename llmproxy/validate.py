"""Validation of the fields the proxy itself reads (SPEC §2); every other field is forwarded
untouched, so new API parameters work without a release."""

from __future__ import annotations

import re
from typing import Any

from .errors import invalid_request, too_large

_BODY_FIELD = {"chat": "messages", "messages": "messages", "completions": "prompt", "embeddings": "input",
               "responses": "input", "count_tokens": "messages", "input_tokens": "input"}
_OPTIONAL = frozenset({"responses", "input_tokens"})  # `input` may be absent (a stored prompt, a previous response)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def validate_body(api: str, body: Any) -> None:
    """Raise a 400 `ProxyError` naming the field for a body the proxy cannot read."""
    if not isinstance(body, dict):
        raise invalid_request("The request body must be a JSON object.")
    model = body.get("model")
    if model is None:
        raise invalid_request("Missing required parameter: 'model'.", "model")
    if not isinstance(model, str) or not model:
        raise invalid_request("'model' must be a non-empty string.", "model")
    field = _BODY_FIELD[api]
    value = body.get(field)
    if value is None and api not in _OPTIONAL:
        raise invalid_request(f"Missing required parameter: '{field}'.", field)
    if api in ("chat", "messages", "count_tokens"):
        if not isinstance(value, list):
            raise invalid_request("'messages' must be an array of message objects.", "messages")
        for i, msg in enumerate(value):
            if type(msg) is dict and type(msg.get("role")) is str and type(msg.get("content")) is str:
                continue  # the common shape, checked at once (orjson makes exact types)
            if not isinstance(msg, dict):
                raise invalid_request(f"'messages[{i}]' must be an object.", f"messages[{i}]")
            if not isinstance(msg.get("role"), str):
                raise invalid_request(f"'messages[{i}].role' must be a string.", f"messages[{i}].role")
            content = msg.get("content")
            if content is not None and not isinstance(content, (str, list)):
                raise invalid_request(f"'messages[{i}].content' must be a string or an array.",
                                      f"messages[{i}].content")
            if isinstance(content, list) and not all(isinstance(p, dict) for p in content):
                raise invalid_request(f"'messages[{i}].content' parts must be objects.", f"messages[{i}].content")
        if api in ("messages", "count_tokens"):
            system = body.get("system")
            if system is not None and not isinstance(system, (str, list)):
                raise invalid_request("'system' must be a string or an array of blocks.", "system")
    elif api == "completions":
        if not isinstance(value, (str, list)):
            raise invalid_request("'prompt' must be a string or an array.", "prompt")
    elif api in ("embeddings", "responses", "input_tokens"):
        if value is not None and not isinstance(value, (str, list)):
            raise invalid_request("'input' must be a string or an array.", "input")
        if api != "embeddings" and isinstance(value, list) and not all(isinstance(i, (dict, str)) for i in value):
            raise invalid_request("'input' items must be objects.", "input")
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise invalid_request("'stream' must be a boolean.", "stream")
    opts = body.get("stream_options")
    if opts is not None:
        if not isinstance(opts, dict):
            raise invalid_request("'stream_options' must be an object.", "stream_options")
        inc = opts.get("include_usage")
        if inc is not None and not isinstance(inc, bool):
            raise invalid_request("'stream_options.include_usage' must be a boolean.",
                                  "stream_options.include_usage")
    for name in ("max_tokens", "max_completion_tokens", "max_output_tokens"):
        v = body.get(name)
        if v is not None and (not _is_int(v) or v < 0):
            raise invalid_request(f"'{name}' must be a non-negative integer.", name)


async def read_bounded(request: Any, limit: int) -> bytes:
    """A request's whole body, at most `limit` bytes, else a 413: refused from its
    Content-Length before anything is read, and past the limit while reading (a chunked
    body says no length)."""
    from aiohttp import web

    if request.content_length is not None and request.content_length > limit:
        raise too_large(limit)
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise too_large(limit) from None
    if len(raw) > limit:
        raise too_large(limit)
    return raw


def client_key(headers: Any) -> str | None:
    """The key from `Authorization: Bearer`, `x-api-key` or `api-key`, in that order."""
    auth = headers.get("authorization")
    if auth:
        scheme, _, token = auth.partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
    return headers.get("x-api-key") or headers.get("api-key") or None


# W3C Trace Context `traceparent`: version (not ff), trace id (not zero), parent id (not zero),
# flags; version 00 is exactly this long, later versions may add fields after it.
_TRACEPARENT = re.compile(r"\s*(?!ff)([0-9a-f]{2})-(?!0{32})([0-9a-f]{32})-(?!0{16})([0-9a-f]{16})-([0-9a-f]{2})")


def parse_traceparent(value: str | None) -> tuple[int, int, int] | None:
    """(trace id, parent span id, flags) of a client's `traceparent`, or None when it is
    absent or not a W3C one (the record's trace id and the tracing middleware read it)."""
    if not value:
        return None
    m = _TRACEPARENT.match(value)
    if m is None or (m[1] == "00" and len(value.strip()) != 55):
        return None
    return int(m[2], 16), int(m[3], 16), int(m[4], 16)
