"""A Presidio analyzer as the source of entity spans (the masking itself stays ours).

Presidio's analyzer REST API takes one text per `POST {analyzer_url}/analyze`
(`{"text", "language", "entities", "score_threshold"}`, answered by a list of
`{"entity_type", "start", "end", "score", ...}`). A request's texts are joined into as few
calls as fit `_BATCH_CHARS` characters, separated by a blank line, and the offsets are
mapped back to each text; a result that runs across a separator (a recognizer bridging two
texts) cannot be split correctly, so the texts of that call are asked again one by one.
Calls go out concurrently (at most `_CONCURRENCY` at a time), all within one `timeout`.
Presidio may return overlapping results from different recognizers: the spans kept are
sorted and non-overlapping, the earliest start winning, then the longest.

When the analyzer fails (unreachable, timeout, a non-200 answer, a malformed one):
`on_error: fail_closed` answers 503 and nothing goes upstream; `builtin` uses the built-in
recognizers instead. The outage is logged once (and its end once); never the text.
"""

from __future__ import annotations

import asyncio
from bisect import bisect_right
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Sequence

import aiohttp
import orjson
import structlog

from llmproxy.errors import ProxyError
from .recognizers import Span

if TYPE_CHECKING:
    from .cache import SpanCache
    from .recognizers import Recognizers

log = structlog.get_logger("llmproxy.middlewares.pii")

_CONCURRENCY = 8
_BATCH_CHARS = 50_000  # characters of text per call (a longer text goes alone)
_SEPARATOR = "\n\n"
_JSON = {"Content-Type": "application/json"}


@dataclass(frozen=True)
class PresidioOptions:
    analyzer_url: str = field(metadata={"min_len": 1})  # e.g. http://presidio-analyzer:3000
    on_error: Literal["fail_closed", "builtin"] = "fail_closed"
    timeout: float = field(default=2.0, metadata={"gt": 0})  # seconds for all of a request's texts
    language: str = "en"
    score_threshold: float = field(default=0.5, metadata={"min": 0, "max": 1})

    def __post_init__(self) -> None:
        if not self.analyzer_url.startswith(("http://", "https://")):
            raise ValueError(f"analyzer_url: expected an http(s) URL, got {self.analyzer_url!r}")


class AnalyzerUnavailable(Exception):
    """The analyzer gave no usable answer (the message never holds request text)."""


def unavailable() -> ProxyError:
    return ProxyError(503, "The PII analyzer is unavailable; the request was not sent upstream.",
                      "api_error", "pii_analyzer_unavailable")


class PresidioAnalyzer:
    """Asks a Presidio analyzer for spans; `fallback` (built-in recognizers) or a 503 when
    it fails, per `on_error`."""

    def __init__(self, options: PresidioOptions, entities: Sequence[str], services: Any,
                 fallback: "Recognizers | None") -> None:
        self.url = options.analyzer_url.rstrip("/") + "/analyze"
        self.timeout = options.timeout
        self.threshold = options.score_threshold
        self.wanted = frozenset(entities)
        self.fallback = fallback if options.on_error == "builtin" else None
        self.services = services
        self._payload = {"language": options.language, "entities": list(entities),
                         "score_threshold": options.score_threshold}
        # What its answers depend on: a span cache keeps them apart from other analyzers'.
        self.key = "presidio " + orjson.dumps({"url": self.url, **self._payload}).decode()
        self._failing = False

    async def analyze(self, texts: list[str], cache: "SpanCache | None" = None) -> list[list[Span]]:
        """Spans per text, in order; with a `cache`, only texts it does not hold are sent
        (the analyzer's answers are kept, a fallback's never are)."""
        if cache is None:
            return (await self._analyze(texts))[0]
        keys = cache.keys(self.key, texts)
        found: list[list[Span] | None] = [cache.get(k) if k is not None else None for k in keys]
        missing = [i for i, spans in enumerate(found) if spans is None]
        if missing:
            spans_of, answered = await self._analyze([texts[i] for i in missing])
            for i, spans in zip(missing, spans_of):
                found[i] = spans
                key = keys[i]
                if answered and key is not None:
                    cache.put(key, spans)
        return found  # type: ignore[return-value]

    async def _analyze(self, texts: list[str]) -> tuple[list[list[Span]], bool]:
        """Spans per text, and whether the analyzer gave them (False: the fallback did)."""
        if not texts:
            return [], True
        try:
            async with asyncio.timeout(self.timeout):
                batches = _batches(texts)
                if len(batches) == 1:
                    found = await self._batch(texts, batches[0], None)
                else:
                    gate = asyncio.Semaphore(_CONCURRENCY)
                    async with asyncio.TaskGroup() as group:
                        tasks = [group.create_task(self._batch(texts, b, gate)) for b in batches]
                    found = [spans for t in tasks for spans in t.result()]
        except (TimeoutError, AnalyzerUnavailable, aiohttp.ClientError, OSError, ExceptionGroup) as exc:
            self._failed(exc)
            if self.fallback is None:
                raise unavailable() from None
            return [self.fallback.analyze(t) for t in texts], False
        if self._failing:
            self._failing = False
            log.info("pii_analyzer_recovered", url=self.url)
        return found, True

    async def _batch(self, texts: list[str], indexes: range, gate: asyncio.Semaphore | None) -> list[list[Span]]:
        """Spans for texts[i] for i in `indexes` (consecutive), from one call when it can."""
        if len(indexes) == 1:
            text = texts[indexes[0]]
            return [self._spans(await self._call(text, gate), len(text))]
        starts, pos = [], 0
        for i in indexes:
            starts.append(pos)
            pos += len(texts[i]) + len(_SEPARATOR)
        items = await self._call(_SEPARATOR.join(texts[i] for i in indexes), gate)
        if not isinstance(items, list):
            raise AnalyzerUnavailable("an answer that is not a list")
        per_text: list[list[Any]] = [[] for _ in indexes]
        for item in items:
            try:
                start, end = item["start"], item["end"]
            except (TypeError, KeyError):
                raise AnalyzerUnavailable("a result without entity_type, start, end") from None
            if not (isinstance(start, int) and isinstance(end, int) and 0 <= start < end <= pos):
                raise AnalyzerUnavailable("a result with offsets outside the text")
            k = bisect_right(starts, start) - 1  # the text it starts in (starts[0] is 0)
            base = starts[k]
            if end > base + len(texts[indexes[k]]):  # across a separator: ask for each text alone
                return [spans for i in indexes for spans in await self._batch(texts, range(i, i + 1), gate)]
            per_text[k].append({**item, "start": start - base, "end": end - base})
        return [self._spans(found, len(texts[i])) for found, i in zip(per_text, indexes)]

    async def _call(self, text: str, gate: asyncio.Semaphore | None) -> Any:
        http = self.services.http if self.services is not None else None
        if http is None:
            raise AnalyzerUnavailable("no HTTP session")
        body = orjson.dumps({"text": text, **self._payload})
        if gate is not None:
            await gate.acquire()
        try:
            async with http.post(self.url, data=body, headers=_JSON) as resp:
                if resp.status != 200:
                    raise AnalyzerUnavailable(f"HTTP {resp.status}")
                raw = await resp.read()
        finally:
            if gate is not None:
                gate.release()
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise AnalyzerUnavailable("an answer that is not JSON") from None

    def _spans(self, items: Any, size: int) -> list[Span]:
        if not isinstance(items, list):
            raise AnalyzerUnavailable("an answer that is not a list")
        spans = []
        for item in items:
            try:
                entity, start, end = item["entity_type"], item["start"], item["end"]
                score = float(item.get("score", 1.0))
            except (TypeError, KeyError, ValueError):
                raise AnalyzerUnavailable("a result without entity_type, start, end") from None
            if not (isinstance(start, int) and isinstance(end, int) and 0 <= start < end <= size):
                raise AnalyzerUnavailable("a result with offsets outside the text")
            if entity in self.wanted and score >= self.threshold:
                spans.append(Span(start, end, entity, score))
        spans.sort(key=lambda s: (s.start, s.start - s.end))
        kept: list[Span] = []
        for s in spans:
            if not kept or s.start >= kept[-1].end:
                kept.append(s)
        return kept

    def _failed(self, exc: BaseException) -> None:
        if isinstance(exc, ExceptionGroup):
            exc = exc.exceptions[0]
        if not self._failing:
            self._failing = True
            reason = str(exc) if isinstance(exc, AnalyzerUnavailable) else type(exc).__name__
            log.warning("pii_analyzer_failed", url=self.url, reason=reason,
                        fallback="builtin" if self.fallback is not None else "fail_closed")


def _batches(texts: list[str]) -> list[range]:
    """Consecutive runs of text indexes of at most _BATCH_CHARS characters each (a longer
    text alone)."""
    out: list[range] = []
    first, size = 0, 0
    for i, text in enumerate(texts):
        if i > first and size + len(_SEPARATOR) + len(text) > _BATCH_CHARS:
            out.append(range(first, i))
            first, size = i, 0
        size += len(text) + (len(_SEPARATOR) if i > first else 0)
    out.append(range(first, len(texts)))
    return out
