"""Client-facing errors and their two wire shapes (SPEC §2).

A `ProxyError` raised anywhere in the chain becomes one HTTP answer: the OpenAI
shape on OpenAI paths, the Anthropic shape on `/v1/messages`. Anything else that
escapes is a bug and becomes a 500 (no blanket handler turns it into a 4xx).
"""

from __future__ import annotations

import orjson

# OpenAI error `type` -> Anthropic `error.type`, for the rows of SPEC §2's table.
_ANTHROPIC_TYPE = {
    "invalid_request_error": "invalid_request_error",
    "authentication_error": "authentication_error",
    "permission_error": "permission_error",
    "rate_limit_error": "rate_limit_error",
    "insufficient_quota": "rate_limit_error",
    "api_error": "api_error",
}


class ProxyError(Exception):
    """An answer the proxy gives instead of the upstream's.

    `type`/`code` are the OpenAI fields; `anthropic_type` overrides the Anthropic
    `error.type` where it differs from the mapping (404 -> not_found_error,
    413 -> request_too_large).
    """

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        *,
        anthropic_type: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.anthropic_type = anthropic_type or _ANTHROPIC_TYPE.get(type, "api_error")
        self.headers = headers or {}

    def body(self, api: str) -> bytes:
        if api == "messages":
            return orjson.dumps(
                {"type": "error", "error": {"type": self.anthropic_type, "message": self.message}}
            )
        return orjson.dumps(
            {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        )

    def sse(self, api: str) -> bytes:
        """The SSE error event that ends a stream that already started (SPEC §2)."""
        if api == "messages":
            return b"event: error\ndata: " + self.body(api) + b"\n\n"
        if api == "responses":  # the Responses API's own error event
            return b"event: error\ndata: " + orjson.dumps(
                {"type": "error", "code": self.code or self.type, "message": self.message, "param": self.param}) + b"\n\n"
        return b"data: " + self.body(api) + b"\n\n"

    def __repr__(self) -> str:
        return f"ProxyError({self.status}, {self.type}/{self.code}: {self.message!r})"


MAX_ECHO = 128  # characters of a client-supplied name quoted back in a message or a record


def shown(text: str) -> str:
    """A client-supplied name as it may be quoted back: at most MAX_ECHO characters (an
    ellipsis says it was cut), so an answer or a log line never grows with client input."""
    return text if len(text) <= MAX_ECHO else text[:MAX_ECHO - 1] + "…"


def invalid_request(message: str, param: str | None = None) -> ProxyError:
    return ProxyError(400, message, "invalid_request_error", None, param)


def model_not_found(model: str) -> ProxyError:
    return ProxyError(
        404,
        f"The model '{shown(model)}' does not exist or you do not have access to it.",
        "invalid_request_error",
        "model_not_found",
        "model",
        anthropic_type="not_found_error",
    )


def too_large(limit: int) -> ProxyError:
    return ProxyError(
        413,
        f"Request body is larger than the limit of {limit} bytes.",
        "invalid_request_error",
        "request_too_large",
        anthropic_type="request_too_large",
    )


def unauthorized(message: str = "Invalid or missing API key.", code: str = "invalid_api_key") -> ProxyError:
    return ProxyError(401, message, "authentication_error", code)


def not_found_path(path: str) -> ProxyError:
    return ProxyError(404, f"Unknown path {shown(path)}.", "invalid_request_error", "not_found", anthropic_type="not_found_error")


_FINAL = {"x-should-retry": "false"}


def upstream_error(message: str) -> ProxyError:
    return ProxyError(502, message, "api_error", "upstream_error", headers=dict(_FINAL))


def upstream_auth_error(message: str) -> ProxyError:
    return ProxyError(502, message, "api_error", "upstream_auth_error", headers=dict(_FINAL))


def upstream_timeout(message: str) -> ProxyError:
    return ProxyError(504, message, "api_error", "upstream_timeout", headers=dict(_FINAL))


def upstream_rate_limited(message: str, retry_after: float | None = None) -> ProxyError:
    headers = {}
    if retry_after is not None:
        headers["retry-after"] = str(max(1, int(retry_after + 0.999)))
    return ProxyError(429, message, "rate_limit_error", "upstream_rate_limited", headers=headers)
