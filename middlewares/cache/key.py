"""What a request asks of the cache: its key, its controls, whether it may be cached at all.

The key is a SHA-256 of a canonical JSON (orjson, keys sorted at every level) of:
- the tenant the answer belongs to (`scope`: the team, else the key; the key; or everyone),
  and the request's `cache.namespace`;
- the API and the query string (`/v1/messages?beta=true` is another request);
- the request headers that change the answer (`anthropic-version`, `anthropic-beta`,
  `openai-beta`);
- the body without the fields that say how to deliver or whom to bill, not what to answer
  (`UNKEYED`: `stream`, `stream_options`, `user`, `metadata`, ...). Every other field is
  part of the key, new API parameters included: an unknown field can only cost a miss,
  never serve an answer to another question.
A stream and a non-stream request for the same thing share a key (one answers the other).
The key is never shown to a client nor logged.

The Responses API's server-side state: `previous_response_id` is part of the key (an id
names one stored response, which never changes, so the same id and input is the same
question). `store` is keyed there, as what it means (absent is true): the id of an answer
made with `store: false` was never kept by the provider, so it must not answer a request
that will continue from its id; an answer made with `store: true` has an id the provider
keeps, and a hit hands that id on (a follow-up from it works as from the first caller's).
A request with a `conversation` (the provider appends each answer to it: a hit would
leave it behind) or `background: true` (the answer is a handle to poll) is never cached
(`keeps_state`).

Controls come from `Cache-Control` (`no-cache`, `no-store`, `max-age=N`) and LiteLLM's body
field `cache` (`no-cache`, `no-store`, `ttl`, `s-maxage`, `namespace`), which `take_controls`
removes from the body before it goes upstream.
"""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson

from llmproxy import errors

if TYPE_CHECKING:
    from llmproxy.context import Context

# Body fields that do not change the answer: how it is delivered, who asks, what to log
# (the Responses API's `store` is keyed again by `canonical`: there it decides whether the
# answer's id can be continued from).
UNKEYED = frozenset({"stream", "stream_options", "user", "metadata", "cache", "store", "safety_identifier",
                     "prompt_cache_key"})
KEYED_HEADERS = ("anthropic-version", "anthropic-beta", "openai-beta")
# A canonical form this long is hashed in a thread (hashlib lets go of the GIL while it
# hashes): about 1 ms of SHA-256 per MB here, which the loop need not wait for.
OFF_LOOP_BYTES = 256 * 1024
MAX_NAMESPACE = 256


@dataclass(frozen=True, slots=True)
class Controls:
    """What this request allows: `lookup` false is `no-cache` (answer from upstream, then
    store), `store` false is `no-store`; `max_age` accepts only younger entries; `ttl`
    replaces the configured one for the entry this request stores."""

    lookup: bool = True
    store: bool = True
    max_age: float | None = None
    ttl: float | None = None
    namespace: str = ""


DEFAULT = Controls()


def take_controls(ctx: "Context") -> Controls:
    """The request's controls; the body's `cache` field is removed (it is ours, not the
    provider's). A `cache` field of the wrong shape is a 400 naming it."""
    body = ctx.body
    field = body.pop("cache", None) if "cache" in body else None
    header = ctx.headers.get("cache-control")
    if field is None and header is None:
        return DEFAULT
    lookup = store = True
    max_age = ttl = None
    namespace = ""
    if header is not None:
        for token in header.lower().split(","):
            token = token.strip()
            if token == "no-cache":
                lookup = False
            elif token == "no-store":
                store = False
            elif token.startswith("max-age="):
                value = token[8:].strip().strip('"')
                if value.isdigit():  # anything else is ignored, as HTTP caches do
                    max_age = float(int(value))
    if field is not None:
        if not isinstance(field, dict):
            raise errors.invalid_request("'cache' must be an object such as {\"no-cache\": true}.", "cache")
        if _flag(field, "no-cache"):
            lookup = False
        if _flag(field, "no-store"):
            store = False
        value = _seconds(field, "s-maxage")
        if value is not None:
            max_age = value if max_age is None else min(max_age, value)
        ttl = _seconds(field, "ttl")
        ns = field.get("namespace")
        if ns is not None:
            if not isinstance(ns, str) or len(ns) > MAX_NAMESPACE:
                raise errors.invalid_request(f"'cache.namespace' must be a string of at most {MAX_NAMESPACE} "
                                             "characters.", "cache.namespace")
            namespace = ns
    return Controls(lookup, store, max_age, ttl, namespace)


def _flag(field: dict, name: str) -> bool:
    value = field.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise errors.invalid_request(f"'cache.{name}' must be true or false.", f"cache.{name}")
    return value


def _seconds(field: dict, name: str) -> float | None:
    value = field.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0 or value == float("inf"):
        raise errors.invalid_request(f"'cache.{name}' must be a number of seconds (0 or more).", f"cache.{name}")
    return float(value)


def nondeterministic(body: dict[str, Any], api: str) -> bool:
    """Whether the request asks for a sample (several answers would differ): `n` above 1,
    or a `temperature` that is not 0. What the request does not say is not read into it: a
    request without `temperature` is cached (Anthropic's current SDK has no such parameter,
    and an answer is what the client asked for); an operator who wants only temperature-0
    answers cached can have clients send it. Embeddings are always deterministic."""
    if api == "embeddings":
        return False
    n = body.get("n")
    if isinstance(n, (int, float)) and not isinstance(n, bool) and n > 1:
        return True
    temperature = body.get("temperature")
    return temperature is not None and temperature != 0


def keeps_state(body: dict[str, Any], api: str) -> bool:
    """Whether answering the request changes state the provider keeps, which a stored
    answer would not: a Responses `conversation`, or a `background` run."""
    return api == "responses" and (body.get("conversation") is not None or body.get("background") is True)


def tenant(ctx: "Context", scope: str) -> str:
    """Whose answers these are: `team` (a key without a team is a tenant of its own),
    `key`, or `global` (everyone). The master key and an unauthenticated gateway are one
    tenant each."""
    if scope == "global":
        return "*"
    p = ctx.principal
    if p is None:
        return "-"
    if scope == "team" and p.team_id is not None:
        return "t:" + p.team_id
    if p.key_id is not None:
        return "k:" + p.key_id
    return "master" if p.is_master else "-"


def canonical(ctx: "Context", scope: str, namespace: str) -> bytes:
    """The canonical JSON the key is the hash of (see the module docstring)."""
    body = ctx.body
    keyed = {k: v for k, v in body.items() if k not in UNKEYED}
    if ctx.api == "responses":
        keyed["store"] = body.get("store") is not False  # the provider's default is true
    headers = ctx.headers
    beta = None
    if "anthropic-version" in headers or "anthropic-beta" in headers or "openai-beta" in headers:
        beta = [headers.getall(h, ()) for h in KEYED_HEADERS]
    query = getattr(ctx.request, "query_string", "") or ""
    return orjson.dumps([tenant(ctx, scope), namespace, ctx.api, query, beta, keyed], option=orjson.OPT_SORT_KEYS)


async def request_key(ctx: "Context", scope: str, namespace: str) -> bytes:
    """The request's key: 32 bytes of SHA-256 of `canonical`; a long one hashed in a thread.
    (The middleware inlines this: one coroutine less per request.)"""
    data = canonical(ctx, scope, namespace)
    if len(data) < OFF_LOOP_BYTES:
        return hashlib.sha256(data).digest()
    return await hash_in_thread(data)


async def hash_in_thread(data: bytes) -> bytes:
    return await asyncio.to_thread(lambda: hashlib.sha256(data).digest())
