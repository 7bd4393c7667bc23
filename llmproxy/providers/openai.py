"""OpenAI and any OpenAI-compatible server (`api_base` includes `/v1`).

An `api_key` is required for OpenAI itself (no `api_base`, or one on api.openai.com); a
compatible server elsewhere (vLLM, Ollama, LM Studio) may go without, and then no
`Authorization` header is sent.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from yarl import URL

from .base import HTTPProvider, upstream_body

if TYPE_CHECKING:
    from ..config import Deployment
    from ..context import Context

OPENAI_HOST = "api.openai.com"


class OpenAIProvider(HTTPProvider):
    apis: ClassVar[frozenset[str]] = frozenset({"chat", "completions", "embeddings", "responses", "input_tokens"})
    default_base = "https://api.openai.com/v1"
    paths = {"chat": "/chat/completions", "completions": "/completions", "embeddings": "/embeddings",
             "responses": "/responses", "input_tokens": "/responses/input_tokens"}

    @classmethod
    def needs_api_key(cls, deployment: "Deployment") -> bool:
        if not deployment.api_base:
            return True
        try:
            host = URL(deployment.api_base).host
        except ValueError:
            return True
        return host is not None and host.lower().rstrip(".") == OPENAI_HOST

    def auth_headers(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.deployment.api_key}"} if self.deployment.api_key else {}

    def request_body(self, ctx: "Context") -> bytes:
        # On a stream, ask upstream to count; the forwarder removes the usage-only chunk again.
        # (A Responses stream always ends with its usage, in `response.completed`.)
        include_usage = ctx.stream and self.deployment.stream_usage and not ctx.client_wants_usage \
            and ctx.api != "responses"
        return upstream_body(ctx, self.deployment.model, include_usage=include_usage)
