"""Azure OpenAI: OpenAI's chat, completions and embeddings at
`{api_base}/openai/deployments/{deployment}/{chat/completions|completions|embeddings}`,
with the key in `api-key` (never `Authorization`) and `api-version` in the query.

Options: `api_version` (default `DEFAULT_API_VERSION`) and `deployment` (the Azure
deployment name; default the deployment's `model`). The client's other query parameters
pass; its own `api-version` is dropped, so the configured one is what Azure reads.

Bodies, streams and usage are OpenAI's, and so are the meters. A content-filter refusal
(400, `error.code: content_filter`) is a 4xx about the request: the forwarder passes it
to the client unchanged, without a retry; a filtered answer (200, `finish_reason:
content_filter`) is an answer like any other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar
from urllib.parse import quote, unquote

from .openai import OpenAIProvider

if TYPE_CHECKING:
    from ..config import Deployment
    from ..context import Context

DEFAULT_API_VERSION = "2024-10-21"


@dataclass(frozen=True)
class AzureOptions:
    api_version: str = field(default=DEFAULT_API_VERSION, metadata={"min_len": 1})
    deployment: str | None = field(default=None, metadata={"min_len": 1})


class AzureProvider(OpenAIProvider):
    apis: ClassVar[frozenset[str]] = frozenset({"chat", "completions", "embeddings"})
    default_base = ""
    paths = {"chat": "/chat/completions", "completions": "/completions", "embeddings": "/embeddings"}
    requires_api_key: ClassVar[bool] = True
    Options: ClassVar[type] = AzureOptions

    def __init__(self, deployment, options, services) -> None:
        super().__init__(deployment, options or AzureOptions(), services)
        name = self.options.deployment or deployment.model
        # The deployment's URL (an `api_base` given with its `/openai` too is taken as
        # meant); the name is quoted whole, so it is one path segment.
        root = self.base[:-len("/openai")] if self.base.endswith("/openai") else self.base
        self.base = f"{root}/openai/deployments/{quote(name, safe='')}"
        self.version_query = "api-version=" + quote(self.options.api_version, safe="")

    @classmethod
    def needs_api_key(cls, deployment: "Deployment") -> bool:
        return True

    @classmethod
    def check_deployment(cls, deployment: "Deployment") -> list[str]:
        problems = []
        if not deployment.api_base:
            problems.append("api_base: required for azure (https://<resource>.openai.azure.com)")
        if deployment.model == "*" and not deployment.options.get("deployment"):
            problems.append("deployment: required when model is '*' (the Azure deployment name is "
                            "part of the URL, which a client never chooses)")
        return problems

    def auth_headers(self) -> dict[str, str]:
        return {"api-key": self.deployment.api_key} if self.deployment.api_key else {}

    def request_query(self, ctx: "Context") -> str:
        """The client's query without its `api-version`, then the deployment's."""
        client = super().request_query(ctx)
        if not client:
            return self.version_query
        kept = [part for part in client.split("&")
                if part and unquote(part.partition("=")[0]).strip().lower() != "api-version"]
        return "&".join(kept + [self.version_query])
