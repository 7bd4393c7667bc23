"""Where subscriptions come from: the `llmproxy.subscription_sources` entry-point group.

A source is a class built as `cls(options, services)` (its `Options`, a dataclass, from
the keys of the middleware's config that are not the middleware's own) with one method:

    async def fetch(self, team_id: str, key_id: str | None, user_id: str | None) -> SubscriptionInfo | None

None means "this team has no subscription" (cached like any answer); raising
`SourceError` (or anything else) means "cannot say now": the middleware then serves the
last good answer for `stale_if_error` seconds, and never caches the failure. Two are
built in: `db` (the store's table, managed through `/subscription/*`) and `http` (an
operator's service).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import aiohttp
import orjson

from llmproxy.store import StoreError, SubscriptionInfo

if TYPE_CHECKING:
    from llmproxy.services import Services

MAX_ANSWER_BYTES = 1 << 20


class SourceError(Exception):
    """The source cannot answer now (down, timed out, answered nonsense)."""


def subscription_of(data: Any, team_id: str) -> SubscriptionInfo:
    """A subscription from a source's JSON object (SubscriptionInfo's fields; the team is
    the one asked about, `subscription_id` defaults to it); SourceError when it is not one."""
    if not isinstance(data, dict):
        raise SourceError(f"the answer is not a JSON object but {type(data).__name__}")
    known = set(SubscriptionInfo.__dataclass_fields__) - {"team_id", "created_at", "updated_at"}
    fields = {k: v for k, v in data.items() if k in known}
    fields.setdefault("subscription_id", team_id)
    if data.get("team_id") not in (None, team_id):
        raise SourceError("the answer is for another team")
    try:
        return SubscriptionInfo(team_id=team_id, **fields)
    except (TypeError, ValueError) as exc:
        raise SourceError(f"the answer is not a subscription: {exc}") from None


class DbSource:
    """`source: db` (the default): the store's subscriptions table."""

    Options = None

    def __init__(self, options: Any, services: "Services") -> None:
        self.services = services

    async def fetch(self, team_id: str, key_id: str | None, user_id: str | None) -> SubscriptionInfo | None:
        try:
            return await self.services.store.team_subscription(team_id)
        except StoreError as exc:
            raise SourceError(f"the database: {type(exc).__name__}: {exc}") from None


@dataclass(frozen=True)
class HttpOptions:
    url: str = field(metadata={"min_len": 1})  # POSTed {team_id, key_id, user_id}
    headers: dict[str, str] = field(default_factory=dict)  # sent with every call (an Authorization, say)
    timeout: float = field(default=2.0, metadata={"gt": 0})  # seconds per attempt
    retries: int = field(default=1, metadata={"min": 0})  # more attempts after a failure (not after a 4xx)


class HttpSource:
    """`source: http`: POSTs `{"team_id", "key_id", "user_id"}` as JSON to `url`. 200: the
    subscription as a JSON object (SubscriptionInfo's fields); 404: no subscription.
    Anything else, a timeout or a connection error is a failure, retried `retries` times
    (a 4xx other than 404 is not retried: asking again would get the same answer)."""

    Options = HttpOptions

    def __init__(self, options: HttpOptions, services: "Services") -> None:
        self.options = options
        if not options.url.startswith(("http://", "https://")):
            raise ValueError("url: the http subscription source needs an http:// or https:// URL")
        self.services = services
        self.headers = {"Content-Type": "application/json", "Accept": "application/json", **options.headers}

    async def fetch(self, team_id: str, key_id: str | None, user_id: str | None) -> SubscriptionInfo | None:
        body = orjson.dumps({"team_id": team_id, "key_id": key_id, "user_id": user_id})
        problem = "no attempt"
        for _ in range(1 + self.options.retries):
            try:
                return await asyncio.wait_for(self._ask(body, team_id), self.options.timeout)
            except _Final as exc:
                raise SourceError(str(exc)) from None
            except SourceError as exc:
                problem = str(exc)
            except TimeoutError:
                problem = f"no answer within {self.options.timeout:g}s"
            except (aiohttp.ClientError, OSError) as exc:
                problem = f"{type(exc).__name__}: {exc}"
        raise SourceError(problem)

    async def _ask(self, body: bytes, team_id: str) -> SubscriptionInfo | None:
        session = self.services.http
        assert session is not None, "the gateway's HTTP session starts before any request"
        async with session.post(self.options.url, data=body, headers=self.headers, allow_redirects=False) as resp:
            if resp.status == 404:
                return None
            if 400 <= resp.status < 500:
                raise _Final(f"the source answered {resp.status}")
            if resp.status != 200:
                raise SourceError(f"the source answered {resp.status}")
            raw = await resp.content.read(MAX_ANSWER_BYTES + 1)
        if len(raw) > MAX_ANSWER_BYTES:
            raise SourceError(f"the answer is over {MAX_ANSWER_BYTES} bytes")
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise SourceError(f"the answer is not JSON ({exc})") from None
        return subscription_of(data, team_id)


class _Final(Exception):
    """A failure that asking again would not change."""
