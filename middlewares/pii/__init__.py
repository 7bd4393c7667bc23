"""The `pii` middleware: personal data never reaches the provider (SPEC §6).

Per request of the model APIs (`apis` is the default, so the chain never calls it for
`GET /v1/models`), in this order:
1. The policy: the configured options, or the team's `metadata.pii` laid over them (its
   keys override the configured ones; `presidio` is replaced whole). A team's policy is
   built once per distinct metadata value and cached; an invalid one is logged and the
   configured policy applies. `entities: []` turns the middleware off for that team.
2. The texts a provider would read (`llmproxy.middlewares.pii.texts.request_texts`): chat messages
   (strings, text parts, tool-call arguments as JSON, tool results), Anthropic `system`
   and content blocks (text, tool_use input, tool_result content, text documents),
   the legacy `prompt`, embeddings `input`, the Responses API's `instructions` and `input`
   (a string or items: messages and their text parts, function call arguments as JSON,
   tool outputs) and a prompt template's `variables`; token counting's bodies as those of
   the API they count for. Only strings are scanned.
3. The spans: built-in recognizers, or a Presidio analyzer (`llmproxy.middlewares.pii.presidio`).
   The spans of long texts are remembered (`llmproxy.middlewares.pii.cache`, `cache_size`), so the
   history a chat sends with every turn is analysed (or sent to Presidio) once.
   Every entity found counts once in `llmproxy_pii_redactions_total{entity}`.
4. The mode: `block` answers 400 `pii_blocked` naming the entity types (never a value)
   and nothing goes upstream; `redact` writes `<ENTITY>` in place of each; `mask` writes
   placeholders (`<EMAIL_ADDRESS_1>`, see `llmproxy.middlewares.pii.masking`) and puts the originals
   back into a successful answer: a stream is wrapped and restored as it passes; a JSON
   answer is read whole here (it cannot be restored before its end anyway) and sent as
   bytes, so the writer frames it with Content-Length in one write. A Responses request
   that continues a conversation the provider keeps (`previous_response_id`,
   `conversation`, `item_reference` items) and holds personal data is refused in `mask`
   mode (400 `pii_stored_conversation`): the stored turns hold placeholders numbered by
   earlier requests, which this request's numbering would reuse for other values (the
   model would take one person's placeholder for another's, and the answer would be
   restored with the wrong values). Such a request without personal data goes on as
   usual; placeholders from the stored turns come back as they are.
A request with no entity found goes on untouched, and so does its answer.

Nothing here logs or puts into an error any text of a request or an answer.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import aiohttp
import orjson
import structlog

from llmproxy import errors
from llmproxy.config import ConfigError, build
from llmproxy.context import BodyCut, Reply
from llmproxy.errors import ProxyError
from llmproxy.middlewares.pii.cache import SpanCache
from llmproxy.middlewares.pii.masking import Vault, redact, restore_answer
from llmproxy.middlewares.pii.streams import RestoredStream
from llmproxy.middlewares.pii.texts import request_texts
from llmproxy.middlewares.pii.presidio import PresidioAnalyzer, PresidioOptions
from llmproxy.middlewares.pii.recognizers import ENTITIES, Recognizers

if TYPE_CHECKING:
    from llmproxy.context import Context, Next
    from llmproxy.services import Services

log = structlog.get_logger("llmproxy.middlewares.pii")

METRIC = "llmproxy_pii_redactions_total"
CACHE_METRIC = "llmproxy_pii_cache_lookups_total"
_ENTITY_NAME = re.compile(r"[A-Z][A-Z0-9_]*")
_TEAM_CACHE = 1024  # distinct team policies kept
# A request whose texts hold this many characters or more is analysed in a thread: the
# built-in pass costs about 70 µs per KB on this machine, so 64 KB is ~5 ms on the loop,
# and a 1 MB prompt would hold it ~70 ms (in a thread, other requests go on meanwhile).
OFF_LOOP_CHARS = 64 * 1024


@dataclass(frozen=True)
class Options:
    mode: Literal["mask", "redact", "block"] = "mask"
    entities: tuple[str, ...] = tuple(sorted(ENTITIES))
    presidio: PresidioOptions | None = None
    # Texts of 256+ characters whose spans are remembered (a chat's history comes back
    # with every turn); 0: analyse every text every time. Read from the configured options
    # only (one table for every team, keyed by the recognizers' or analyzer's settings).
    cache_size: int = field(default=4096, metadata={"min": 0})

    def __post_init__(self) -> None:
        for name in self.entities:
            if self.presidio is None and name not in ENTITIES:
                raise ValueError(f"entities: unknown entity {name!r} (built in: {', '.join(sorted(ENTITIES))}; "
                                 "others need presidio)")
            if not _ENTITY_NAME.fullmatch(name):
                raise ValueError(f"entities: {name!r} is not an entity name (A-Z, 0-9, _)")


@dataclass(frozen=True, slots=True)
class Policy:
    """One set of options, ready to use: the recognizers built, the analyzer connected."""

    mode: str
    entities: tuple[str, ...]
    recognizers: Recognizers | None  # None when `presidio` is set
    presidio: PresidioAnalyzer | None = field(default=None)

    def builtin(self, texts: list[str], cache: SpanCache | None) -> list[list[Any]]:
        """The built-in recognizers' spans (synchronous: no coroutine on the hot path)."""
        if cache is not None:
            return cache.analyze(texts, self.recognizers)
        analyze = self.recognizers.analyze
        return [analyze(t) for t in texts]


class PII:
    """Built once at start as `PII(options, services)`; called once per request."""

    Options = Options

    def __init__(self, options: Options | None, services: "Services | None") -> None:
        opts = options or Options()
        self.services = services
        self.metrics = services.metrics if services is not None else None
        self._found: dict[str, int] = {}  # entities found since the metrics last read them
        self.cache = SpanCache(opts.cache_size) if opts.cache_size > 0 else None
        if self.metrics is not None:
            self.metrics.define(METRIC, "counter", "Personal data entities found in requests.", ("entity",))
            self.metrics.define(CACHE_METRIC, "counter",
                                "Texts looked up in the PII span cache.", ("result",))
            self.metrics.drains.append(self._drain_counts)  # counted in batches, before each read
        self.options = opts
        self.default = self._policy(opts)
        self._defaults = asdict(opts)  # what a team's metadata.pii is laid over
        self._by_identity: dict[int, tuple[Any, Policy]] = {}  # id(metadata.pii) -> (it, policy)
        self._by_value: dict[bytes, Policy] = {}

    def _policy(self, opts: Options) -> Policy:
        if opts.presidio is None:
            return Policy(opts.mode, opts.entities, Recognizers(opts.entities))
        fallback = None
        if opts.presidio.on_error == "builtin":
            fallback = Recognizers([e for e in opts.entities if e in ENTITIES])
        return Policy(opts.mode, opts.entities, None,
                      PresidioAnalyzer(opts.presidio, opts.entities, self.services, fallback))

    async def __call__(self, ctx: "Context", call_next: "Next") -> Reply:
        """Runs before the middlewares listed after it (cache, scheduler) and the upstream;
        a `block` match or an analyzer outage (fail_closed) answers at once."""
        policy = self.policy_for(ctx)
        if not policy.entities:
            return await call_next(ctx)
        texts = request_texts(ctx.body, ctx.api)
        if not texts.slots:
            return await call_next(ctx)
        values = texts.values()
        if ctx.tracer is None:
            found = await self._analyze(policy, values)
        else:
            with ctx.trace("llmproxy.pii", {"llmproxy.pii.texts": len(values)}) as span:
                found = await self._analyze(policy, values)
                span.set_attribute("llmproxy.pii.found", sum(map(len, found)))
        hits = {i: spans for i, spans in enumerate(found) if spans}
        if not hits:
            return await call_next(ctx)
        self._count(hits)
        if policy.mode == "block":
            kinds = sorted({s.entity for spans in hits.values() for s in spans})
            raise ProxyError(400, f"The request contains personal data ({', '.join(kinds)}), which this "
                                  "policy does not allow to be sent.", "invalid_request_error", "pii_blocked")
        if policy.mode == "mask" and ctx.api == "responses" and _continues_stored_conversation(ctx.body):
            raise ProxyError(400, "The request continues a conversation the provider stores (previous_response_id, "
                                  "conversation or item_reference) and contains personal data: the stored turns' "
                                  "placeholders cannot be told apart from this request's. Send the whole conversation "
                                  "in 'input' (with store: false) instead, or use the redact mode.",
                             "invalid_request_error", "pii_stored_conversation")
        if policy.mode == "redact":
            texts.write({i: redact(values[i], spans) for i, spans in hits.items()})
            ctx.body_changed()
            return await call_next(ctx)
        vault = Vault.for_request(ctx.body)  # before any placeholder is written
        texts.write({i: vault.mask(values[i], spans) for i, spans in hits.items()})
        ctx.body_changed()
        reply = await call_next(ctx)
        if not 200 <= reply.status < 300 or ctx.api == "embeddings":
            return reply
        body = reply.body
        if ctx.stream:
            if isinstance(body, (bytes, bytearray)):  # a whole answer (a cache hit, a plugin's own)
                return Reply(reply.status, reply.headers, RestoredStream.whole(bytes(body), vault, ctx.api))
            return Reply(reply.status, reply.headers, RestoredStream(body, vault, ctx.api))
        # A JSON answer is restored whole: read it here, so that it goes out as bytes framed
        # by Content-Length in one write (an upstream cut before its end is a clean 502).
        if not isinstance(body, (bytes, bytearray)):
            body = await _read_whole(body)
        return Reply(reply.status, reply.headers, restore_answer(bytes(body), vault, ctx.api))

    def _count(self, hits: dict[int, list[Any]]) -> None:
        found = self._found
        for spans in hits.values():
            for s in spans:
                found[s.entity] = found.get(s.entity, 0) + 1

    def _drain_counts(self) -> None:
        found, self._found = self._found, {}
        inc = self.metrics.inc
        for entity, n in found.items():
            inc(METRIC, (entity,), n)
        if self.cache is not None:
            hits, misses = self.cache.take_counts()
            if hits:
                inc(CACHE_METRIC, ("hit",), hits)
            if misses:
                inc(CACHE_METRIC, ("miss",), misses)

    async def _analyze(self, policy: Policy, values: list[str]) -> list[list[Any]]:
        if policy.presidio is not None:
            return await policy.presidio.analyze(values, self.cache)
        if sum(map(len, values)) < OFF_LOOP_CHARS:
            return policy.builtin(values, self.cache)
        return await self._builtin_in_thread(policy, values)

    async def _builtin_in_thread(self, policy: Policy, values: list[str]) -> list[list[Any]]:
        """A large request's texts (OFF_LOOP_CHARS or more) analysed in a thread, so that the
        event loop keeps serving other requests meanwhile: the cache is read and written
        here on the loop (it is not thread-safe), only the analysis of its misses moves."""
        cache = self.cache
        keys: list[Any] = [None] * len(values)
        if cache is not None and len(values) > 1:
            keys = cache.keys(policy.recognizers.key, values)
        found: list[Any] = [cache.get(k) if k is not None else None for k in keys] if cache is not None else keys[:]
        todo = [i for i, spans in enumerate(found) if spans is None]
        analyze = policy.recognizers.analyze
        results = await asyncio.to_thread(lambda: [analyze(values[i]) for i in todo])
        for i, spans in zip(todo, results):
            found[i] = spans
            if keys[i] is not None:
                cache.put(keys[i], spans)
        return found

    # --- per-team policies ----------------------------------------------------------------

    def check_team_metadata(self, metadata: dict[str, Any]) -> None:
        """Called by `/team/new` and `/team/update` for the metadata they would store: a
        `pii` policy this middleware could not use is refused then (400 naming the field),
        rather than logged and ignored at every request of the team."""
        if "pii" not in metadata:
            return
        override = metadata["pii"]
        try:
            if not isinstance(override, dict):
                raise ConfigError("expected a mapping of pii options, such as {\"mode\": \"block\"}")
            build(Options, {**self._defaults, **override}, "metadata.pii")
        except (ConfigError, ValueError) as exc:
            text = str(exc)
            raise errors.invalid_request(text if text.startswith("metadata.pii") else f"metadata.pii: {text}",
                                         "metadata.pii") from None

    def policy_for(self, ctx: "Context") -> Policy:
        """The team's policy when its metadata has `pii`, else the configured one."""
        team = getattr(ctx.principal, "team", None)
        meta = getattr(team, "metadata", None)
        override = meta.get("pii") if isinstance(meta, dict) else None
        if override is None:
            return self.default
        hit = self._by_identity.get(id(override))
        if hit is not None and hit[0] is override:
            return hit[1]
        policy = self._team_policy(override, getattr(team, "team_id", None))
        _bounded_put(self._by_identity, id(override), (override, policy))
        return policy

    def _team_policy(self, override: Any, team_id: Any) -> Policy:
        try:
            key = orjson.dumps(override, option=orjson.OPT_SORT_KEYS)
        except TypeError:
            key = repr(override).encode()
        policy = self._by_value.get(key)
        if policy is not None:
            return policy
        try:
            if not isinstance(override, dict):
                raise ConfigError("expected a mapping")
            opts = build(Options, {**self._defaults, **override}, "team.metadata.pii")
            policy = self._policy(opts)
        except (ConfigError, ValueError) as exc:
            log.warning("pii_team_policy_invalid", team_id=team_id, error=str(exc), using="configured policy")
            policy = self.default
        _bounded_put(self._by_value, key, policy)
        return policy


async def _read_whole(body: Any) -> bytes:
    parts = []
    try:
        async for chunk in body:
            parts.append(chunk)
    except (BodyCut, aiohttp.ClientError, ConnectionError, TimeoutError):  # nothing was sent yet: a clean 502
        raise errors.upstream_error("The upstream answer ended before it was complete.") from None
    finally:
        aclose = getattr(body, "aclose", None)
        if aclose is not None:
            await aclose()
    return b"".join(parts)


def _continues_stored_conversation(body: dict) -> bool:
    """Whether a Responses request builds on turns the provider keeps."""
    if body.get("previous_response_id") or body.get("conversation"):
        return True
    given = body.get("input")
    return isinstance(given, list) and any(isinstance(i, dict) and i.get("type") == "item_reference" for i in given)


def _bounded_put(table: dict, key: Any, value: Any) -> None:
    if len(table) >= _TEAM_CACHE:
        del table[next(iter(table))]  # the oldest entry
    table[key] = value

