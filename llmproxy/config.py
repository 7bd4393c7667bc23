"""Load and validate the YAML config (SPEC §3) into frozen dataclasses.

Three steps, in this order:

1. environment substitution: a string value that is exactly `os.environ/NAME`, or
   contains `${NAME}`, is read from the environment (`$${NAME}` is a literal
   `${NAME}`); an unset variable makes the key absent, and the loader remembers the
   key's path and the variable so that a required key fails naming both;
2. `build`: a generic, type-hint driven builder turns mappings into frozen dataclasses,
   rejecting unknown keys and wrong types with the offending path named. Middlewares
   and providers use it for their own `Options` dataclasses;
3. cross checks that span sections (unique model names, fallbacks naming models).

Checks that need the installed plugins live in `llmproxy.plugins.check_config`.
Every error is collected; `ConfigError` carries them all, one path-prefixed line each.

Field metadata understood by `build`: `min`, `max` (inclusive bounds), `gt` (strict
lower bound), `min_len` (strings and lists), `config: False` (not read from the config;
filled by the loader) and `extra: True` (a mapping field that collects the keys the
dataclass does not declare, instead of rejecting them).
"""
from __future__ import annotations

import collections.abc
import dataclasses
import difflib
import functools
import os
import re
import types
import typing
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any, Literal, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(Exception):
    """An invalid config; `messages` holds one `path: problem` line per problem."""

    def __init__(self, messages: str | Sequence[str]) -> None:
        msgs = [messages] if isinstance(messages, str) else list(messages)
        super().__init__(msgs)
        self.messages: list[str] = msgs

    def __str__(self) -> str:
        return "\n".join(self.messages)


# ---------------------------------------------------------------------------- schema


@dataclass(frozen=True)
class ServerConfig:
    """`server:` listening socket and request limits."""

    host: str = "127.0.0.1"
    port: int = field(default=4000, metadata={"min": 1, "max": 65535})
    workers: int = field(default=1, metadata={"min": 1})
    max_body_bytes: int = field(default=10 * 1024 * 1024, metadata={"min": 1})
    graceful_timeout: float = field(default=30.0, metadata={"min": 0})
    # seconds, on SIGTERM, during which readiness answers 503 while the listener still
    # accepts (a load balancer's time to notice); then it closes and graceful_timeout runs
    drain_delay: float = field(default=0.0, metadata={"min": 0})
    allow_anonymous: bool = False
    admin_port: int | None = field(default=None, metadata={"min": 1, "max": 65535})
    access_log: bool = True


@dataclass(frozen=True)
class Pricing:
    """A model's prices in USD per million tokens; cache prices default to input's."""

    input_per_1m: Decimal = field(default=Decimal(0), metadata={"min": 0})
    output_per_1m: Decimal = field(default=Decimal(0), metadata={"min": 0})
    cache_read_per_1m: Decimal | None = field(default=None, metadata={"min": 0})
    cache_write_per_1m: Decimal | None = field(default=None, metadata={"min": 0})


@dataclass(frozen=True)
class Deployment:
    """One upstream endpoint serving a model.

    `model` is the upstream model id; the loader fills it with the model's name when
    omitted. `options` holds every key of the deployment that is not declared here;
    `plugins.check_config` validates them against the provider's `Options`.

    `id` is filled by the loader and is unique across the config: `provider:model`
    (e.g. `openai:gpt-4o`). When several deployments share that, each gets the suffix
    `#<index in its model's deployments>` (`openai:gpt-4o#1`), or
    `#<model name>/<index>` when the sharing deployments belong to different models.
    """

    provider: str = field(metadata={"min_len": 1})
    model: str | None = field(default=None, metadata={"min_len": 1})
    api_base: str | None = None
    api_key: str | None = None
    weight: float = field(default=1.0, metadata={"gt": 0})
    rpm: int | None = field(default=None, metadata={"min": 1})
    tpm: int | None = field(default=None, metadata={"min": 1})
    burst: int | None = field(default=None, metadata={"min": 1})
    tpm_counts: Literal["reserved", "actual"] = "reserved"
    max_queue_size: int = field(default=100, metadata={"min": 0})
    max_queue_wait: float = field(default=30.0, metadata={"min": 0})
    timeout: float = field(default=60.0, metadata={"gt": 0})
    stream_idle_timeout: float = field(default=120.0, metadata={"gt": 0})
    stream_usage: bool = True
    headers: dict[str, str] = field(default_factory=dict)
    options: Mapping[str, Any] = field(default_factory=dict, metadata={"extra": True})
    id: str = field(default="", metadata={"config": False})


@dataclass(frozen=True)
class Model:
    """A model name clients send, its prices and the deployments that serve it.

    A `name` ending in `*` is a pattern (`claude-*`, `*`): it serves every name that starts
    with what comes before the `*` and that no exact name or longer pattern serves. Its
    deployments' `model` defaults to `*`, which sends upstream the name the client asked
    for. `prices` overrides `pricing` for some of the names a pattern serves."""

    name: str = field(metadata={"min_len": 1})
    deployments: tuple[Deployment, ...] = field(metadata={"min_len": 1})
    pricing: Pricing | None = None
    prices: dict[str, Pricing] = field(default_factory=dict)

    def pricing_for(self, name: str) -> Pricing | None:
        """The prices of `name` (the name the client asked for) served by this model."""
        return self.prices.get(name, self.pricing) if self.prices else self.pricing


@dataclass(frozen=True)
class Router:
    """`router:` retries, cooldown and fallbacks (model name -> fallback model names)."""

    num_retries: int = field(default=2, metadata={"min": 0})
    retry_after: float = field(default=1.0, metadata={"min": 0})
    cooldown_seconds: float = field(default=30.0, metadata={"min": 0})
    fallbacks: dict[str, tuple[str, ...]] = field(default_factory=dict)


@dataclass(frozen=True)
class Passthrough:
    """One `passthrough:` route (`llmproxy.passthrough`): any method on `{prefix}/{rest}?{query}`
    is forwarded to `{api_base}/{rest}?{query}` with the route's key, for the endpoints the
    gateway does not model (files, batches, audio, images...). `provider` says how the key is
    sent; `max_body_bytes` bounds an upload (default `server.max_body_bytes`)."""

    prefix: str
    provider: Literal["openai", "anthropic"]
    api_base: str
    api_key: str | None = None
    max_body_bytes: int | None = field(default=None, metadata={"min": 1})
    timeout: float = field(default=60.0, metadata={"gt": 0})  # seconds to connect
    read_timeout: float = field(default=600.0, metadata={"gt": 0})  # seconds without a byte of the answer
    headers: dict[str, str] = field(default_factory=dict)  # added to every request of the route


@dataclass(frozen=True)
class MiddlewareSpec:
    """One `middlewares:` item: the entry-point name, its raw options, its config path."""

    name: str
    options: Mapping[str, Any]
    path: str


@dataclass(frozen=True)
class MetricsConfig:
    """`metrics:` label policy."""

    team_label: bool = False


@dataclass(frozen=True)
class DatabaseConfig:
    """`database:` how the store is reached (`database_url` says where)."""

    sqlite_path: str = "./llmproxy.db"  # used when database_url is absent
    statement_cache: bool = True  # false for PgBouncer in transaction mode


@dataclass(frozen=True)
class SpendConfig:
    """`spend:` the spend log writer. Rows are written in batches off the request path;
    when the database fails they wait (with backoff) and, past `queue_size`, spill to
    `spill_path`, replayed when the database is back. `retention_days` prunes old rows.
    `enabled: false` turns the spend log off (budgets then rebuild from nothing). With
    `server.workers: N` each worker has its own files (`<spill_path>.<i>`...)."""

    enabled: bool = True
    batch_size: int = field(default=500, metadata={"min": 1})
    flush_interval: float = field(default=1.0, metadata={"gt": 0})
    queue_size: int = field(default=20000, metadata={"min": 1})
    spill_path: str = "./llmproxy-spend-spill.jsonl"
    retention_days: int | None = field(default=None, metadata={"min": 1})
    # "wal": every record is also appended to a local write-ahead file (fsync'd every
    # `wal_sync_interval` seconds, in a thread) and replayed at the next start, so that a
    # kill -9 loses at most that interval's rows instead of every row still in memory.
    durability: Literal["memory", "wal"] = "memory"
    wal_sync_interval: float = field(default=0.05, metadata={"gt": 0})


@dataclass(frozen=True)
class Config:
    """The whole config. `source` is the file it came from (None: the default config);
    `unset_env` maps the path of each key dropped by substitution to its variable."""

    server: ServerConfig = field(default_factory=ServerConfig)
    master_key: str | None = field(default=None, metadata={"min_len": 1})
    database_url: str | None = None
    redis_url: str | None = None
    models: tuple[Model, ...] = ()
    router: Router = field(default_factory=Router)
    passthrough: tuple[Passthrough, ...] = ()  # forwarded as they are (llmproxy.passthrough)
    middlewares: tuple[MiddlewareSpec, ...] = ()
    # Event sinks besides the built-in metrics and access log (server.access_log), by
    # entry-point name in group llmproxy.event_sinks, with options like middlewares.
    event_sinks: tuple[MiddlewareSpec, ...] = ()
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    database: DatabaseConfig = field(default_factory=DatabaseConfig)
    spend: SpendConfig = field(default_factory=SpendConfig)
    source: str | None = field(default=None, metadata={"config": False})
    unset_env: dict[str, str] = field(default_factory=dict, metadata={"config": False})

    def unset_hint(self, path: str) -> str:
        """` (environment variable X is not set)` if `path` was dropped, else ``."""
        return env_hint(self.unset_env, path)


# ----------------------------------------------------------------------- environment


class EnvStr(str):
    """A string substituted from the environment. `var` names the variable(s).

    `build` converts it to int, float, bool or Decimal where a field asks for one
    (`port: ${PORT}`), and never echoes its value in an error (it may be a secret)."""

    var: str

    @classmethod
    def of(cls, value: str, var: str) -> EnvStr:
        s = cls(value)
        s.var = var
        return s


_ENV_WHOLE = re.compile(r"os\.environ/([A-Za-z_][A-Za-z0-9_]*)")
_ENV_REF = re.compile(r"\$(\$?)\{([A-Za-z_][A-Za-z0-9_]*)\}")


def env_hint(unset_env: Mapping[str, str], path: str) -> str:
    """The suffix explaining that `path` is missing because of an unset variable."""
    var = unset_env.get(path)
    return f" ({unset_text(var)})" if var is not None else ""


def unset_text(var: str) -> str:
    return f"environment variables {var} are not set" if "," in var else f"environment variable {var} is not set"


def _substitute(text: str, env: Mapping[str, str]) -> str | list[str]:
    """The substituted string, or the list of unset variable names."""
    whole = _ENV_WHOLE.fullmatch(text)
    if whole:
        name = whole[1]
        return EnvStr.of(env[name], name) if name in env else [name]
    refs = [m for m in _ENV_REF.finditer(text) if not m[1]]
    if not refs and "$${" not in text:
        return text
    missing = [m[2] for m in refs if m[2] not in env]
    if missing:
        return list(dict.fromkeys(missing))
    out = _ENV_REF.sub(lambda m: "${" + m[2] + "}" if m[1] else env[m[2]], text)
    if not refs:
        return out
    return EnvStr.of(out, ", ".join(dict.fromkeys(m[2] for m in refs)))


def _resolve_env(data: Any, env: Mapping[str, str], path: str,
                 unset: dict[str, str], errors: list[str]) -> Any:
    """A copy of `data` with variables substituted and unset-variable keys dropped."""
    if isinstance(data, Mapping):
        out = {}
        for key, value in data.items():
            sub = _join(path, key)
            if isinstance(value, str):
                value = _substitute(value, env)
                if isinstance(value, list):
                    unset[sub] = ", ".join(value)
                    continue
                out[key] = value
            else:
                out[key] = _resolve_env(value, env, sub, unset, errors)
        return out
    if isinstance(data, list):
        items = []
        for i, value in enumerate(data):
            sub = f"{path}[{i}]"
            if isinstance(value, str):
                value = _substitute(value, env)
                if isinstance(value, list):  # no key to drop: an error, index kept
                    errors.append(f"{sub}: {unset_text(', '.join(value))}")
                    value = data[i]
                items.append(value)
            else:
                items.append(_resolve_env(value, env, sub, unset, errors))
        return items
    return data


# --------------------------------------------------------------------------- builder


class _Invalid:
    """Marks a value that failed to build (its errors are already recorded)."""


_INVALID: Any = _Invalid()
_NONE_TYPE = type(None)


def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


def _describe(value: Any) -> str:
    """A short, secret-safe rendering of a config value for error messages."""
    if value is None:
        return "null"
    if isinstance(value, EnvStr):
        return f"the value of environment variable {value.var} (not shown)"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, (list, tuple)):
        return "a list"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _type_name(tp: Any) -> str:
    names = {int: "integer", float: "number", bool: "boolean", str: "string",
             Decimal: "decimal number"}
    if tp in names:
        return names[tp]
    origin = typing.get_origin(tp)
    if origin in (list, tuple, collections.abc.Sequence):
        return "list"
    if origin in (dict, collections.abc.Mapping) or tp is dict:
        return "mapping"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    return getattr(tp, "__name__", str(tp))


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _config_fields(cls: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if f.init and f.metadata.get("config", True)]


def known_keys(cls: type) -> list[str]:
    """The keys a config mapping for dataclass `cls` may hold, in declaration order."""
    return [f.name for f in _config_fields(cls) if not f.metadata.get("extra")]


def unknown_key(path: str, key: Any, known: Sequence[str], what: str = "known") -> str:
    """The error line for an unknown `key` at `path`, with a close match suggested."""
    listed = ", ".join(known) if known else "none"
    msg = f"{_join(path, key)}: unknown key ({what}: {listed})"
    word = str(key)
    close = difflib.get_close_matches(word, list(known), n=1) or [
        k for k in known if len(word) >= 3 and (word in k or k in word)][:1]
    return msg + (f"; did you mean '{close[0]}'?" if close else "")


def _nullable(tp: Any) -> bool:
    if tp is Any or dataclasses.is_dataclass(tp):
        return True
    return typing.get_origin(tp) in (typing.Union, types.UnionType) and _NONE_TYPE in typing.get_args(tp)


class _Builder:
    """Builds values of annotated types, recording every error instead of raising."""

    def __init__(self, unset_env: Mapping[str, str], errors: list[str] | None = None) -> None:
        self.unset_env = unset_env
        self.errors: list[str] = [] if errors is None else errors

    def fail(self, path: str, problem: str) -> Any:
        self.errors.append(f"{path}: {problem}" if path else problem)
        return _INVALID

    def dataclass(self, cls: type, data: Any, path: str) -> Any:
        if isinstance(data, cls):
            return data
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            return self.fail(path, f"expected a mapping, got {_describe(data)}")
        try:
            hints = _hints(cls)
        except (NameError, TypeError) as exc:
            return self.fail(path, f"cannot resolve the fields of {cls.__qualname__}: {exc}")
        start = len(self.errors)
        fields = _config_fields(cls)
        extra = next((f for f in fields if f.metadata.get("extra")), None)
        known = known_keys(cls)
        extras: dict[Any, Any] = {}
        for key in data:
            if key in known:
                continue
            if extra is not None:
                extras[key] = data[key]
            else:
                self.errors.append(unknown_key(path, key, known))
        kwargs: dict[str, Any] = {}
        for f in fields:
            tp = hints[f.name]
            if f is extra:
                value = self.value(tp, extras, path)
            else:
                sub = _join(path, f.name)
                present = f.name in data
                has_default = (f.default is not dataclasses.MISSING
                               or f.default_factory is not dataclasses.MISSING)
                if present and data[f.name] is None and has_default and not _nullable(tp):
                    present = False  # `key:` left empty means the default
                if not present:
                    if not has_default:
                        self.fail(sub, "required" + env_hint(self.unset_env, sub))
                    continue
                value = self.value(tp, data[f.name], sub)
                if value is not _INVALID:
                    self.check(f.metadata, value, sub)
            if value is not _INVALID:
                kwargs[f.name] = value
        if len(self.errors) > start:
            return _INVALID
        try:
            return cls(**kwargs)
        except ValueError as exc:  # a __post_init__ check
            return self.fail(path, str(exc))

    def value(self, tp: Any, v: Any, path: str) -> Any:
        if tp is Any or tp is object:
            return v
        origin, args = typing.get_origin(tp), typing.get_args(tp)
        if origin in (typing.Union, types.UnionType):
            if v is None and _NONE_TYPE in args:
                return None
            arms = [a for a in args if a is not _NONE_TYPE]
            if len(arms) == 1:
                return self.value(arms[0], v, path)
            for arm in arms:
                trial = _Builder(self.unset_env)
                result = trial.value(arm, v, path)
                if not trial.errors:
                    return result
            expected = " or ".join(_type_name(a) for a in arms)
            return self.fail(path, f"expected {expected}, got {_describe(v)}")
        if origin is Literal:
            for choice in args:
                if (isinstance(v, type(choice)) and isinstance(v, bool) == isinstance(choice, bool)
                        and v == choice):
                    return choice
            choices = ", ".join(repr(c) for c in args)
            return self.fail(path, f"expected one of {choices}, got {_describe(v)}")
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            return self.dataclass(tp, v, path)
        if tp in (bool, int, float, str, Decimal):
            return self.scalar(tp, v, path)
        if origin in (list, tuple, collections.abc.Sequence) or tp in (list, tuple):
            return self.sequence(tp, origin or tp, args, v, path)
        if origin in (dict, collections.abc.Mapping) or tp in (dict, collections.abc.Mapping):
            return self.mapping(args[1] if args else Any, v, path)
        return self.fail(path, f"type {tp!r} is not supported by build() (a bug in the dataclass)")

    def scalar(self, tp: type, v: Any, path: str) -> Any:
        env = isinstance(v, EnvStr)
        if tp is bool:
            if isinstance(v, bool):
                return v
            if env and v.strip().lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
                return v.strip().lower() in ("true", "1", "yes", "on")
        elif tp is int:
            if isinstance(v, int) and not isinstance(v, bool):
                return v
            if env and re.fullmatch(r"\s*[+-]?\d+\s*", v):
                return int(v)
        elif tp is float:
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                return float(v)
            if env:
                try:
                    return float(v)
                except ValueError:
                    pass
        elif tp is str:
            if isinstance(v, str):
                return str(v)
        elif tp is Decimal:
            if isinstance(v, (int, float, str)) and not isinstance(v, bool):
                try:
                    d = Decimal(str(v).strip())
                except InvalidOperation:
                    d = None
                if d is not None and d.is_finite():
                    return d
        return self.fail(path, f"expected {_type_name(tp)}, got {_describe(v)}")

    def sequence(self, tp: Any, origin: Any, args: tuple, v: Any, path: str) -> Any:
        if not isinstance(v, (list, tuple)):
            return self.fail(path, f"expected a list, got {_describe(v)}")
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            if len(v) != len(args):
                return self.fail(path, f"expected a list of {len(args)} items, got {len(v)}")
            item_types = list(args)
        else:
            item_types = [args[0] if args else Any] * len(v)
        items = [self.value(t, item, f"{path}[{i}]") for i, (t, item) in enumerate(zip(item_types, v))]
        return _INVALID if any(i is _INVALID for i in items) else tuple(items)

    def mapping(self, value_type: Any, v: Any, path: str) -> Any:
        if not isinstance(v, Mapping):
            return self.fail(path, f"expected a mapping, got {_describe(v)}")
        out, ok = {}, True
        for key, item in v.items():
            if not isinstance(key, str):
                self.fail(_join(path, key), f"keys must be strings, got {_describe(key)}")
                ok = False
                continue
            out[key] = self.value(value_type, item, _join(path, key))
            ok = ok and out[key] is not _INVALID
        return out if ok else _INVALID

    def check(self, meta: Mapping[str, Any], v: Any, path: str) -> None:
        if v is None:
            return
        if "min" in meta and v < meta["min"]:
            self.fail(path, f"must be >= {meta['min']}")
        elif "gt" in meta and v <= meta["gt"]:
            self.fail(path, f"must be > {meta['gt']}")
        elif "max" in meta and v > meta["max"]:
            self.fail(path, f"must be <= {meta['max']}")
        n = meta.get("min_len")
        if n is not None and len(v) < n:
            if isinstance(v, str):
                self.fail(path, "must not be empty")
            else:
                self.fail(path, f"must have at least {n} item{'s' if n != 1 else ''}")


def build(cls: type[T], data: Any, path: str, *, unset_env: Mapping[str, str] | None = None) -> T:
    """Build frozen dataclass `cls` from mapping `data` found at config `path`.

    Types come from the class's hints: int, float (int accepted), bool, str, Decimal,
    `X | None`, Literal, list/tuple (stored as tuples), dict/Mapping (stored as dicts),
    nested dataclasses and Any. A `None` mapping, or a key left empty, means defaults.
    `unset_env` (path -> variable) explains required keys dropped by substitution.
    Raises ConfigError listing every problem found.
    """
    builder = _Builder(unset_env or {})
    result = builder.dataclass(cls, data, path)
    if builder.errors:
        raise ConfigError(builder.errors)
    return result


# ---------------------------------------------------------------------------- loader


def _middleware_specs(raw: Any, errors: list[str], key: str = "middlewares", kind: str = "middleware") -> Any:
    """MiddlewareSpecs from `- name` or `- name: {options}` items; errors recorded.
    Also used for `event_sinks`, which take the same shape."""
    if raw is None:
        return ()
    if not isinstance(raw, list):
        errors.append(f"{key}: expected a list, got {_describe(raw)}")
        return _INVALID
    specs: list[MiddlewareSpec] = []
    seen: dict[str, int] = {}
    for i, item in enumerate(raw):
        path = f"{key}[{i}]"
        if isinstance(item, str):
            name, options = str(item), {}
        elif isinstance(item, Mapping) and len(item) == 1 and isinstance(next(iter(item)), str):
            name, options = next(iter(item.items()))
            if options is None:
                options = {}
            if not isinstance(options, Mapping):
                errors.append(f"{path}.{name}: options must be a mapping, got {_describe(options)}")
                continue
        else:
            shape = f"a mapping with {len(item)} keys" if isinstance(item, Mapping) else _describe(item)
            errors.append(f"{path}: expected a {kind} name or a one-key mapping "
                          f"{{name: options}}, got {shape}")
            continue
        if not name.strip():
            errors.append(f"{path}: {kind} name must not be empty")
            continue
        if name in seen:
            errors.append(f"{path}: {kind} '{name}' is listed twice (also {key}[{seen[name]}])")
            continue
        seen[name] = i
        specs.append(MiddlewareSpec(name=name, options=dict(options), path=f"{path}.{name}"))
    return tuple(specs)


def _deployment_ids(models: Sequence[Model]) -> dict[tuple[int, int], str]:
    """Unique deployment ids, keyed by (model index, deployment index); see Deployment."""
    users: dict[str, list[tuple[int, int]]] = {}
    for i, m in enumerate(models):
        for j, d in enumerate(m.deployments):
            users.setdefault(f"{d.provider}:{d.model or m.name}", []).append((i, j))
    ids = {}
    for base, where in users.items():
        one_model = len({i for i, _ in where}) == 1
        for i, j in where:
            if len(where) == 1:
                ids[i, j] = base
            elif one_model:
                ids[i, j] = f"{base}#{j}"
            else:
                ids[i, j] = f"{base}#{models[i].name}/{j}"
    return ids


def _model_names(raw: Any, errors: list[str]) -> list[str] | None:
    """The model names in raw `models` (duplicates reported); None if any is unusable."""
    if not isinstance(raw, list):
        return None
    first: dict[str, int] = {}
    for i, m in enumerate(raw):
        name = m.get("name") if isinstance(m, Mapping) else None
        if not isinstance(name, str):
            return None
        if name in first:
            errors.append(f"models[{i}].name: duplicate model name '{name}' (also models[{first[name]}])")
        first.setdefault(name, i)
    return list(first)


def _finish_models(models: tuple[Model, ...]) -> tuple[Model, ...]:
    """Fill each deployment's upstream model (default: the model's name; a pattern's:
    `*`, the name the client asked for) and id."""
    ids = _deployment_ids(models)
    out = []
    for i, m in enumerate(models):
        default = "*" if m.name.endswith("*") else m.name
        deps = tuple(dataclasses.replace(d, model=d.model or default, id=ids[i, j])
                     for j, d in enumerate(m.deployments))
        out.append(dataclasses.replace(m, deployments=deps))
    return tuple(out)


def _check_patterns(models: Sequence[Model], errors: list[str]) -> None:
    """A `*` only at the end of a model name; `prices` only on a pattern, for names it serves."""
    for i, m in enumerate(models):
        if "*" in m.name[:-1]:
            errors.append(f"models[{i}].name: '{m.name}': a '*' may only end a name (a pattern such as 'claude-*')")
        if m.prices and not m.name.endswith("*"):
            errors.append(f"models[{i}].prices: only a pattern (a name ending in '*') has prices per name; "
                          "use pricing")
        for name in m.prices:
            if m.name.endswith("*") and not name.startswith(m.name[:-1]):
                errors.append(f"models[{i}].prices.{name}: not a name '{m.name}' serves")
        for j, d in enumerate(m.deployments):
            if d.model is not None and d.model != "*" and "*" in d.model:
                errors.append(f"models[{i}].deployments[{j}].model: '*' alone sends the client's name; "
                              f"'{d.model}' is not a name")


def _check_fallbacks(router: Router, names: Sequence[str], errors: list[str]) -> None:
    configured = ", ".join(names)
    for source, targets in router.fallbacks.items():
        path = f"router.fallbacks.{source}"
        if source not in names:
            errors.append(f"{path}: unknown model '{source}' (configured: {configured})")
        for k, target in enumerate(targets):
            if target == source:
                errors.append(f"{path}[{k}]: model '{source}' cannot fall back to itself")
            elif target not in names:
                errors.append(f"{path}[{k}]: unknown model '{target}' (configured: {configured})")


# The first path segments the gateway serves itself (its own routes and the admin API's; a
# test compares this with the app's routes): a pass-through prefix may not start with one.
RESERVED_SEGMENTS = frozenset({"", "v1", "chat", "completions", "embeddings", "messages", "models", "limits",
                               "responses", "health", "metrics", "key", "team", "user", "spend", "audit",
                               "subscription"})
_PREFIX = re.compile(r"(/[A-Za-z0-9._~-]+)+")
_FRAMING = frozenset({"host", "content-length", "transfer-encoding", "connection", "keep-alive", "te", "trailer",
                      "upgrade", "content-encoding", "expect"})


def _check_passthrough(routes: Sequence[Passthrough], unset: Mapping[str, str], errors: list[str]) -> None:
    """Each route's prefix is a path of its own (`/openai`, no trailing `/`, no `.` or `..`)
    that is none of the gateway's and neither holds nor is held by another route's; its
    `api_base` is an http(s) URL; a key whose variable is unset is an error (an omitted key
    sends none: a local OpenAI-compatible server); `headers` leave the framing alone."""
    seen: dict[str, int] = {}
    for i, route in enumerate(routes):
        path = f"passthrough[{i}]"
        prefix = route.prefix
        segments = prefix.split("/")[1:]
        if not _PREFIX.fullmatch(prefix) or any(seg in (".", "..") for seg in segments):
            errors.append(f"{path}.prefix: {_describe(prefix)} must be a path such as '/openai': it starts with '/', "
                          "has no empty, '.' or '..' segment and no trailing '/'")
        elif segments[0] in RESERVED_SEGMENTS:
            errors.append(f"{path}.prefix: '{prefix}' collides with the gateway's own paths "
                          f"(/{segments[0]}/...); choose another first segment")
        else:
            for other, j in seen.items():
                if (prefix + "/").startswith(other + "/") or (other + "/").startswith(prefix + "/"):
                    errors.append(f"{path}.prefix: '{prefix}' overlaps passthrough[{j}].prefix '{other}'")
            seen.setdefault(prefix, i)
        base = urllib.parse.urlsplit(route.api_base)
        if base.scheme not in ("http", "https") or not base.hostname or base.query or base.fragment:
            errors.append(f"{path}.api_base: {_describe(route.api_base)} must be an http(s) URL without a query, "
                          "such as https://api.openai.com")
        if route.api_key is None and f"{path}.api_key" in unset or route.api_key == "":
            why = env_hint(unset, f"{path}.api_key") or " (it is empty)"
            errors.append(f"{path}.api_key: required{why}")
        for name in route.headers:
            if name.lower() in _FRAMING:
                errors.append(f"{path}.headers.{name}: the proxy sets this header itself")


def parse_config(data: Any, env: Mapping[str, str] | None = None, source: str | None = None) -> Config:
    """Validate already-parsed config `data` (a mapping); raise ConfigError with all problems."""
    env = os.environ if env is None else env
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source or 'config'}: expected a mapping at the top level, got {_describe(data)}")
    errors: list[str] = []
    unset: dict[str, str] = {}
    data = _resolve_env(data, env, "", unset, errors)
    builder = _Builder(unset, errors)

    models_ok = True
    names = _model_names(data.get("models"), errors)
    if data.get("models") is not None:
        models = builder.value(tuple[Model, ...], data["models"], "models")
        models_ok = models is not _INVALID
        if models_ok:
            _check_patterns(models, errors)
        data["models"] = _finish_models(models) if models_ok else ()
    if "middlewares" in data:
        specs = _middleware_specs(data["middlewares"], errors)
        data["middlewares"] = () if specs is _INVALID else specs
    if "event_sinks" in data:
        specs = _middleware_specs(data["event_sinks"], errors, "event_sinks", "event sink")
        data["event_sinks"] = () if specs is _INVALID else specs

    config = builder.dataclass(Config, data, "")
    if config is not _INVALID:
        if models_ok and not config.models:
            errors.append("models: at least one model is required")
        if names is not None:
            _check_fallbacks(config.router, names, errors)
        if config.server.admin_port is not None and config.server.admin_port == config.server.port:
            errors.append(f"server.admin_port: must differ from server.port ({config.server.port})")
        _check_passthrough(config.passthrough, unset, errors)
    if errors:
        raise ConfigError(errors)
    return dataclasses.replace(config, source=source, unset_env=unset)


class _Loader(yaml.SafeLoader):
    """SafeLoader that records duplicate mapping keys instead of silently keeping the last."""

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self.duplicates: list[tuple[Any, yaml.Mark, yaml.Mark]] = []

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, yaml.Mark] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node)
            if key in seen:
                self.duplicates.append((key, key_node.start_mark, seen[key]))
            else:
                seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


def parse_yaml(text: str, source: str = "<config>") -> Any:
    """Parse YAML text; syntax errors and duplicate keys become ConfigError with line:column."""
    loader = _Loader(text)
    try:
        data = loader.get_single_data()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
        problem = exc.problem or exc.context or "invalid YAML"
        raise ConfigError(f"{where}: invalid YAML: {problem}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: invalid YAML: {exc}") from None
    finally:
        loader.dispose()
    if loader.duplicates:
        raise ConfigError([f"{source}:{m.line + 1}:{m.column + 1}: duplicate key '{key}' "
                           f"(first at line {first.line + 1})" for key, m, first in loader.duplicates])
    return data


def default_config() -> Config:
    """The config `serve` uses without a file: one offline `mock` model on 127.0.0.1."""
    return parse_config({"models": [{"name": "mock", "deployments": [{"provider": "mock", "model": "mock"}]}]},
                        env={})


def load_config(path: str | os.PathLike[str] | None, env: Mapping[str, str] | None = None) -> Config:
    """Read and validate the YAML file at `path`; None gives `default_config()`."""
    if path is None:
        return default_config()
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError(f"{path}: cannot read the config file: {reason}") from None
    return parse_config(parse_yaml(text, path), env=env, source=path)
