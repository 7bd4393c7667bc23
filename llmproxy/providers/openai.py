"""OpenAI and any OpenAI-compatible server (`api_base` includes `/v1`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from .base import HTTPProvider, upstream_body

if TYPE_CHECKING:
    from ..context import Context


class OpenAIProvider(HTTPProvider):
    apis: ClassVar[frozenset[str]] = frozenset({"chat", "completions", "embeddings"})
    default_base = "https://api.openai.com/v1"
    paths = {"chat": "/chat/completions", "completions": "/completions", "embeddings": "/embeddings"}

    def auth_headers(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.deployment.api_key}"} if self.deployment.api_key else {}

    def request_body(self, ctx: "Context") -> bytes:
        # On a stream, ask upstream to count; the forwarder removes the usage-only chunk again.
        include_usage = ctx.stream and self.deployment.stream_usage and not ctx.client_wants_usage
        return upstream_body(ctx, self.deployment.model, include_usage=include_usage)
