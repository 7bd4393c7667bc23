"""What one upstream attempt must take before it starts: a `Demand` over `Limit`s.

A `Limit` is one bucket: a deployment's `rpm`/`tpm`, a key's or team's `rpm_limit` /
`tpm_limit`, or the `rpm`/`tpm` of the team's subscription for the model (its own entry,
else `"*"`'s, one bucket shared by every model without an entry). A `Parallel` is a cap
on requests in flight (`max_parallel_requests`). Deployment limits are built once per
deployment; tenant limits per request from `ctx.principal`, read defensively (any object
with the auth middleware's field names). Every applicable limit is taken from, so the
effective limit is the tightest of key, team and subscription.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any


if TYPE_CHECKING:
    from llmproxy.config import Deployment
    from llmproxy.context import Context

DEPLOYMENT, KEY, TEAM, SUBSCRIPTION = "deployment", "key", "team", "subscription"
REQUESTS, TOKENS = "requests", "tokens"


@dataclass(frozen=True, slots=True)
class Limit:
    """One bucket: `per_minute` units refilled continuously, at most `capacity` held.
    `id` names it across replicas (it is its Redis key)."""

    id: str
    owner: str  # deployment | key | team | subscription
    unit: str  # requests | tokens
    per_minute: float
    capacity: float

    @property
    def rate(self) -> float:
        return self.per_minute / 60.0


@dataclass(frozen=True, slots=True)
class Parallel:
    """At most `limit` requests of one key or team in flight at once."""

    id: str
    owner: str  # key | team | subscription
    limit: int


@dataclass(slots=True)
class Demand:
    """What one attempt takes: `needs[i]` of `limits[i]`, one slot of each of `slots`.
    `tokens` is the token estimate (0 when no token limit applies)."""

    tenant: str
    limits: tuple[Limit, ...]
    needs: tuple[float, ...]
    slots: tuple[Parallel, ...]
    tokens: int

    def __bool__(self) -> bool:
        return bool(self.limits or self.slots)


def deployment_limits(dep: "Deployment") -> tuple[Limit, ...]:
    """A deployment's own buckets. Capacity: `burst` requests (default `rpm`, a minute's
    allowance); the token bucket holds the same share of a minute (`tpm * burst / rpm`),
    or `tpm` when there is no `rpm` or no `burst`."""
    out = []
    window = 1.0
    if dep.rpm is not None:
        burst = dep.burst if dep.burst is not None else dep.rpm
        window = burst / dep.rpm
        out.append(Limit(f"dep:{dep.id}:requests", DEPLOYMENT, REQUESTS, dep.rpm, burst))
    if dep.tpm is not None:
        out.append(Limit(f"dep:{dep.id}:tokens", DEPLOYMENT, TOKENS, dep.tpm, max(1.0, dep.tpm * window)))
    return tuple(out)


def tenant_of(principal: Any) -> str:
    """The fairness unit: the team, else the key, else `anonymous` (or `master`)."""
    if principal is None:
        return "anonymous"
    team_id = getattr(principal, "team_id", None)
    if team_id:
        return f"team:{team_id}"
    key_id = getattr(principal, "key_id", None)
    if key_id:
        return f"key:{key_id}"
    return "master" if getattr(principal, "is_master", False) else "anonymous"


def _positive(value: Any) -> int | None:
    return value if type(value) is int and value > 0 else None


def tenant_limits(principal: Any, model: str | None = None) -> tuple[tuple[Limit, ...], tuple[Parallel, ...]]:
    """The key's and the team's `rpm_limit`, `tpm_limit` and `max_parallel_requests`, and
    the subscription's for `model` (the configured model the attempt is for)."""
    if principal is None:
        return (), ()
    limits: list[Limit] = []
    slots: list[Parallel] = []
    owners = []
    key_id = getattr(principal, "key_id", None)
    if key_id:
        owners.append((KEY, key_id, principal))
    team = getattr(principal, "team", None)
    team_id = getattr(principal, "team_id", None) or getattr(team, "team_id", None)
    if team is not None and team_id:
        owners.append((TEAM, team_id, team))
    for owner, ident, src in owners:
        rpm = _positive(getattr(src, "rpm_limit", None))
        if rpm is not None:
            limits.append(Limit(f"{owner}:{ident}:requests", owner, REQUESTS, rpm, rpm))
        tpm = _positive(getattr(src, "tpm_limit", None))
        if tpm is not None:
            limits.append(Limit(f"{owner}:{ident}:tokens", owner, TOKENS, tpm, tpm))
        par = _positive(getattr(src, "max_parallel_requests", None))
        if par is not None:
            slots.append(Parallel(f"{owner}:{ident}:parallel", owner, par))
    sub = getattr(principal, "subscription", None)
    found = sub.limits_for(model) if sub is not None and model is not None else None
    if found:
        entry, own = found
        ident = f"{SUBSCRIPTION}:{sub.subscription_id}:{entry}"
        rpm, tpm, par = (_positive(own.get(n)) for n in ("rpm", "tpm", "max_parallel_requests"))
        if rpm is not None:
            limits.append(Limit(f"{ident}:requests", SUBSCRIPTION, REQUESTS, rpm, rpm))
        if tpm is not None:
            limits.append(Limit(f"{ident}:tokens", SUBSCRIPTION, TOKENS, tpm, tpm))
        if par is not None:
            slots.append(Parallel(f"{ident}:parallel", SUBSCRIPTION, par))
    return tuple(limits), tuple(slots)


def estimate_tokens(ctx: "Context", default_max_tokens: int) -> int:
    """Prompt characters / 4, rounded up (a fast stand-in for a tokenizer: about right for
    English with OpenAI's and Anthropic's encodings), plus `max_tokens` /
    `max_completion_tokens`, else `default_max_tokens`; embeddings produce no output."""
    body = ctx.body
    prompt = -(-len(ctx.prompt_text()) // 4)
    if ctx.api == "embeddings":
        return prompt
    out = body.get("max_tokens")
    if out is None:
        out = body.get("max_completion_tokens")
    if type(out) is not int or out < 0:
        out = default_max_tokens
    return prompt + out


def demand_of(ctx: "Context", dep_limits: tuple[Limit, ...], default_max_tokens: int,
              model: str | None = None) -> Demand:
    """What an attempt for the configured `model` takes (default: the requested model)."""
    principal = ctx.principal
    if model is None and ctx.model is not None:
        model = ctx.model.name
    t_limits, slots = tenant_limits(principal, model)
    limits = dep_limits + t_limits if t_limits else dep_limits
    tokens = 0
    if any(lim.unit == TOKENS for lim in limits):
        tokens = estimate_tokens(ctx, default_max_tokens)
    needs = tuple(1.0 if lim.unit == REQUESTS else float(tokens) for lim in limits)
    return Demand(tenant_of(principal), limits, needs, slots, tokens)
