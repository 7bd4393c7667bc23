"""One chain per API, composed at start: the configured middlewares with the built-in stages
among them, so that every request passes the same steps and an outer middleware wraps
every outcome, rejections included.

For an API with a body (`BODY_APIS`), in this order:

1. the middlewares listed before the first identity middleware (each `stage = "outer"`,
   such as tracing): they see every request of the APIs they act on; `ctx.body` is None;
2. `UnknownPath` (only in the chain of paths the gateway does not serve): 404 for
   everyone, key or not;
3. the identity middlewares (`stage = "identity"`: auth) and whatever is listed among
   them; with none, `MasterGate` when `master_key` is set. A request without a valid key
   stops here with 401, whatever its body says;
4. `ReadBody`: size (413), JSON (400), nesting depth, the fields the proxy reads (400);
   sets `ctx.body`, `ctx.stream`;
5. `Route`: the model (404, the name quoted cut short; 400 when it is not served through
   this API), the caller's allow-check (403), then each identity middleware's `routed`
   hook (budgets, 429); sets `ctx.model` and `record.model` (configured names only);
6. the other middlewares, in config order;
7. the terminal: the forwarder.

`GET /v1/models` (and `/v1/models/{id}`) takes steps 1, 3 and 6 (the middlewares acting on "models") and the
model list as its terminal; `GET /v1/limits` likewise, with the limits report (each
middleware that has something to say fills its part: `describe_limits`); an unknown path takes steps 1 and 2; the admin API takes
step 1 and the admin terminal (which checks the master key itself). A pass-through route
(`{prefix}/...`, `llmproxy.passthrough`) takes steps 1, 3 and 6 like `/v1/models`, where
step 3 is every identity middleware whatever its `apis` (the route spends the provider
account: it must never be open because a middleware did not list it), with the
pass-through terminal. Which APIs a
middleware acts on is its `apis` attribute (default `BODY_APIS`), read once here; a
middleware is never called for another API, so none tests `ctx.api` to opt out.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Awaitable, Callable, Sequence

import orjson

from . import errors
from .context import BODY_APIS, COUNT_APIS, Context, Next, Reply
from .keys import same_secret
from .patterns import NameTable
from .validate import read_bounded, validate_body

if TYPE_CHECKING:
    from .config import Config, Model
    from .router import Router

STAGES = ("outer", "identity", "request")
MAX_DEPTH = 254  # orjson writes at most 254 levels; deeper bodies could not be forwarded
_JSON = "application/json"
_API_NAMES = {"chat": "OpenAI Chat Completions", "completions": "OpenAI Completions",
              "embeddings": "OpenAI Embeddings", "messages": "Anthropic Messages", "responses": "OpenAI Responses",
              "count_tokens": "Anthropic token counting", "input_tokens": "OpenAI input token counting"}
_ENDPOINT = {"chat": "/v1/chat/completions", "completions": "/v1/completions",
             "embeddings": "/v1/embeddings", "messages": "/v1/messages", "responses": "/v1/responses"}


def stage_of(mw: Any) -> str:
    return getattr(mw, "stage", "request")


def apis_of(mw: Any) -> frozenset[str]:
    return frozenset(getattr(mw, "apis", BODY_APIS))


def check_order(named: Sequence[tuple[str, Any]]) -> list[str]:
    """Problems with the middlewares' `stage` and order, as config messages: an unknown
    stage, or a middleware that needs the parsed request listed before an identity one
    (it would run before the body is read and before anyone is authenticated)."""
    problems = []
    last_identity = max((i for i, (_, cls) in enumerate(named) if stage_of(cls) == "identity"), default=-1)
    for i, (path, cls) in enumerate(named):
        stage = stage_of(cls)
        if stage not in STAGES:
            problems.append(f"{path}: its class declares stage {stage!r}; expected one of {', '.join(STAGES)}")
        elif stage == "request" and i < last_identity:
            problems.append(f"{path}: acts on the parsed request, so it must be listed after "
                            f"{named[last_identity][0]} (an identity middleware)")
    return problems


# ------------------------------------------------------------------------ the stages


class UnknownPath:
    """The terminal of paths the gateway does not serve."""

    async def __call__(self, ctx: Context) -> Reply:
        raise errors.not_found_path(ctx.path)


class MasterGate:
    """Without an identity middleware, `master_key` alone guards the data plane."""

    def __init__(self, master_key: str) -> None:
        self.master = master_key

    async def __call__(self, ctx: Context, call_next: Next) -> Reply:
        key = ctx.api_key
        if key is None or not same_secret(key, self.master):
            raise errors.unauthorized()
        return await call_next(ctx)


class ReadBody:
    """Reads and checks the body of a model API request; sets `ctx.body` and `ctx.stream`."""

    def __init__(self, max_body: int) -> None:
        self.max_body = max_body

    async def __call__(self, ctx: Context, call_next: Next) -> Reply:
        request = ctx.request
        assert request is not None, "ReadBody needs the aiohttp request on the context"
        raw = await read_bounded(request, self.max_body)
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise errors.invalid_request(f"The request body is not valid JSON ({exc}).") from None
        # Deeper than MAX_DEPTH takes more than 2 * MAX_DEPTH bytes of brackets. orjson's own
        # writer is the check (linear, in C, and exactly the limit of what can be forwarded).
        if len(raw) > 2 * MAX_DEPTH and not _writable(body):
            raise errors.invalid_request(f"The request body is nested more than {MAX_DEPTH} levels deep.")
        api = ctx.api
        validate_body(api, body)
        ctx.body = body
        stream = body.get("stream") is True and api != "embeddings"
        ctx.stream = ctx.record.stream = stream
        return await call_next(ctx)


class Route:
    """Resolves the model, asks the caller's allow-check, then the identity middlewares'
    `routed` hooks; sets `ctx.model` and `record.model`."""

    def __init__(self, models: dict[str, "Model"], router: "Router",
                 hooks: Sequence[Callable[[Context], Awaitable[None]]]) -> None:
        self.models = NameTable(models)  # exact names, then the longest pattern
        self.router = router
        self.hooks = tuple(hooks)

    async def __call__(self, ctx: Context, call_next: Next) -> Reply:
        name = ctx.body["model"]
        record = ctx.record
        model = self.models.get(name)
        if model is None:
            record.requested_model = errors.shown(name)
            raise errors.model_not_found(name)
        record.model = model.name  # a pattern's name (`claude-*`) for one it serves: a bounded label
        if model.name != name:
            record.requested_model = errors.shown(name)
        api = ctx.api
        if api not in COUNT_APIS and not self.router.serves(model.name, api):  # counting: here, if not there
            raise errors.invalid_request(
                f"The model '{errors.shown(name)}' is not served through the {_API_NAMES[api]} API; its "
                f"deployments speak another API (use {self._endpoint_for(model.name)}).", "model")
        if not ctx.permits(name):  # the name asked for: a key's list may hold patterns too
            denial = getattr(ctx.principal, "denial", None)
            message = denial(errors.shown(name)) if denial is not None else \
                f"This key is not allowed to use the model '{errors.shown(name)}'."
            raise errors.ProxyError(403, message, "permission_error", None, "model")
        ctx.model = model
        for hook in self.hooks:
            await hook(ctx)
        return await call_next(ctx)

    def _endpoint_for(self, model: str) -> str:
        for api, path in _ENDPOINT.items():
            if self.router.serves(model, api):
                return path
        return "another endpoint"


class TokenCount:
    """The terminal of the token-counting APIs (`COUNT_APIS`): the forwarder when one of the
    model's deployments speaks the API (Anthropic's `count_tokens`, OpenAI's
    `input_tokens`), else an answer here from the tokenizer (o200k_base: exact for OpenAI's
    current models, an estimate for others), marked `x-llmproxy-tokens-estimated: true`."""

    def __init__(self, forwarder: Callable[[Context], Awaitable[Reply]], router: "Router") -> None:
        self.forwarder = forwarder
        self.router = router

    async def __call__(self, ctx: Context) -> Reply:
        assert ctx.model is not None
        if self.router.serves(ctx.model.name, ctx.api):
            return await self.forwarder(ctx)
        from .tokenizer import count_tokens

        tokens = count_tokens(ctx.prompt_text())
        body = {"input_tokens": tokens} if ctx.api == "count_tokens" else \
            {"object": "response.input_tokens", "input_tokens": tokens}
        return Reply(200, [("Content-Type", _JSON), ("x-llmproxy-tokens-estimated", "true")], orjson.dumps(body))


class ModelList:
    """The terminal of `GET /v1/models` and `GET /v1/models/{id}`: the configured models
    this caller may use, in the OpenAI shape, or Anthropic's when the request carries
    `anthropic-version` (then only the models whose deployments speak the Messages API).
    A model the caller may not use is a 404 like one that does not exist. Patterns
    (`claude-*`) are not listed (the names they serve are the upstream's to say), but a
    name one serves is found by `/v1/models/{id}`."""

    def __init__(self, config: "Config", router: "Router | None" = None) -> None:
        self.names = [m.name for m in config.models if not m.name.endswith("*")]  # patterns are not listed
        self.table = NameTable({m.name: m.name for m in config.models})
        self.router = router

    def _shown(self, ctx: Context, name: str, anthropic: bool) -> bool:
        configured = self.table.get(name)
        return configured is not None and ctx.permits(name) and (
            not anthropic or self.router is None or self.router.serves(configured, "messages"))

    async def __call__(self, ctx: Context) -> Reply:
        anthropic = "anthropic-version" in ctx.headers
        request = ctx.request
        wanted = request.match_info.get("model_id") if request is not None else None
        if wanted is not None:  # one model: an exact name, or one a pattern serves
            if not self._shown(ctx, wanted, anthropic):
                raise errors.model_not_found(wanted)
            body: Any = _anthropic_model(wanted) if anthropic else _openai_model(wanted)
            return Reply(200, [("Content-Type", _JSON)], orjson.dumps(body))
        names = [n for n in self.names if self._shown(ctx, n, anthropic)]
        if anthropic:
            body = {"data": [_anthropic_model(n) for n in names], "has_more": False,
                    "first_id": names[0] if names else None, "last_id": names[-1] if names else None}
        else:
            body = {"object": "list", "data": [_openai_model(n) for n in names]}
        return Reply(200, [("Content-Type", _JSON)], orjson.dumps(body))


def _openai_model(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": 1700000000, "owned_by": "llmproxy"}


def _anthropic_model(name: str) -> dict[str, Any]:
    return {"type": "model", "id": name, "display_name": name, "created_at": "2023-11-14T22:13:20Z"}


class LimitsReport:
    """The terminal of `GET /v1/limits`: what this caller may use and how much of it is
    left. The report starts with who is asking and an empty entry per model the caller
    may use; each middleware with `async describe_limits(ctx, report)` then fills in
    its part (the scheduler the rate limits, auth the budgets, subscription the
    subscription), in config order. The shape is in the README."""

    def __init__(self, config: "Config", describers: Sequence[Any]) -> None:
        self.names = [m.name for m in config.models]
        self.describers = tuple(describers)

    async def __call__(self, ctx: Context) -> Reply:
        principal = ctx.principal
        report: dict[str, Any] = {
            "object": "limits",
            "key": None if principal is None else {
                "key_alias": principal.key_alias, "team_id": principal.team_id, "user_id": principal.user_id,
                "is_master": principal.is_master},
            "models": {n: {} for n in self.names if ctx.permits(n)},
            "budgets": [],
            "subscription": None,
        }
        for describer in self.describers:
            await describer.describe_limits(ctx, report)
        return Reply(200, [("Content-Type", _JSON)], orjson.dumps(report))


def _writable(body: Any) -> bool:
    """Can orjson write `body` (what it read)? Only nesting deeper than MAX_DEPTH stops it."""
    try:
        orjson.dumps(body)
    except TypeError:  # orjson.JSONEncodeError: "Recursion limit reached"
        return False
    return True


# ----------------------------------------------------------------------- composition

Step = Callable[[Context, Next], Awaitable[Reply]]


def chain_for(api: str, middlewares: Sequence[Any], *, terminal: Callable[[Context], Awaitable[Reply]],
              gate: Step | None = None, read: Step | None = None, route: Step | None = None) -> Next:
    """The chain of one API (see the module docstring): the steps in order, composed into
    one callable once, at start."""
    identity = [i for i, mw in enumerate(middlewares) if stage_of(mw) == "identity"]
    if identity:
        first, last = identity[0], identity[-1] + 1
    else:  # no identity middleware: the built-in stages go before the first request middleware
        first = last = next((i for i, mw in enumerate(middlewares) if stage_of(mw) == "request"),
                            len(middlewares))
    acts = [mw for mw in middlewares if api in apis_of(mw)
            or (api == "passthrough" and stage_of(mw) == "identity")]  # a route to a provider is never open
    outer = [mw for mw in middlewares[:first] if mw in acts]
    if api == "unknown":
        return _compose(outer, UnknownPath())
    if api == "admin":
        return _compose(outer, terminal)
    steps: list[Any] = outer + [mw for mw in middlewares[first:last] if mw in acts]
    if gate is not None and not identity:
        steps.append(gate)
    if api in BODY_APIS:
        steps += [s for s in (read, route) if s is not None]
    steps += [mw for mw in middlewares[last:] if mw in acts]
    return _compose(steps, terminal)


def _compose(steps: Sequence[Any], terminal: Callable[[Context], Awaitable[Reply]]) -> Next:
    handler: Next = terminal
    for step in reversed(steps):
        handler = _bind(step, handler)
    return handler


def _bind(step: Any, nxt: Next) -> Next:
    def call(ctx: Context) -> Awaitable[Reply]:  # not a coroutine of its own: one frame less per step
        return step(ctx, nxt)
    return call
