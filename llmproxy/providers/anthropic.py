"""Anthropic's native Messages API (`api_base` without `/v1`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from .base import HTTPProvider

if TYPE_CHECKING:
    from ..context import Context

DEFAULT_VERSION = "2023-06-01"


class AnthropicProvider(HTTPProvider):
    apis: ClassVar[frozenset[str]] = frozenset({"messages", "count_tokens"})
    default_base = "https://api.anthropic.com"
    paths = {"messages": "/v1/messages", "count_tokens": "/v1/messages/count_tokens"}

    def auth_headers(self) -> dict[str, str]:
        return {"x-api-key": self.deployment.api_key} if self.deployment.api_key else {}

    def request_headers(self, ctx: "Context") -> dict[str, str]:
        headers = super().request_headers(ctx)
        headers.setdefault("anthropic-version", DEFAULT_VERSION)
        return headers
