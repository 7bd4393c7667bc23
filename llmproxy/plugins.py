"""The entry-point registry (SPEC §7) and the config checks that need it.

A plugin's name is its entry-point name. Built-ins are registered through the same
groups as operator plugins. Entry points are imported lazily, on first use, and each
is checked for shape when it loads: it must be callable (a class, normally), and its
`Options` attribute, if set, must be a dataclass. A plugin that fails to import, or has
the wrong shape, becomes a ConfigError naming the entry point and its distribution.
"""
from __future__ import annotations

import dataclasses
import importlib.metadata
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Sequence

import structlog

from .config import Config, ConfigError, Deployment, MiddlewareSpec, build, known_keys, unknown_key, unset_text
from .pipeline import check_order
from .store import parse_database_url

log = structlog.get_logger("llmproxy.plugins")

PROVIDERS = "llmproxy.providers"
MIDDLEWARES = "llmproxy.middlewares"
EVENT_SINKS = "llmproxy.event_sinks"
SUBSCRIPTION_SOURCES = "llmproxy.subscription_sources"


@dataclass(frozen=True, eq=False)
class EntryPointInfo:
    """One entry point: where it points, which distribution declared it, how to load it."""

    name: str
    value: str
    dist_name: str | None
    dist_version: str | None
    loader: Callable[[], Any] = field(repr=False)
    group: str = ""
    _loaded: list[Any] = field(default_factory=list, repr=False)

    @property
    def origin(self) -> str:
        """`group:name = module:attr from dist version`, for messages and logs."""
        dist = f" from {self.dist_name} {self.dist_version or ''}".rstrip() if self.dist_name else ""
        return f"{self.group}:{self.name} = {self.value}{dist}"

    def load(self) -> Any:
        """Import the object (once; later calls return the cached one) and log its origin."""
        if not self._loaded:
            obj = self.loader()
            self._loaded.append(obj)
            log.info("plugin loaded", group=self.group, name=self.name, value=self.value,
                     dist=self.dist_name, version=self.dist_version)
        return self._loaded[0]


def load_group(group: str) -> dict[str, EntryPointInfo]:
    """The installed entry points of `group` by name, not yet imported.

    Two distributions declaring the same name: the first found wins, with a warning.
    """
    found: dict[str, EntryPointInfo] = {}
    for ep in importlib.metadata.entry_points(group=group):
        dist = getattr(ep, "dist", None)
        info = EntryPointInfo(ep.name, ep.value, dist.name if dist else None,
                              dist.version if dist else None, ep.load, group)
        if ep.name in found:
            log.warning("plugin name conflict", group=group, name=ep.name,
                        kept=found[ep.name].origin, ignored=info.origin)
            continue
        found[ep.name] = info
    return found


class Registry:
    """The installed providers, middlewares, event sinks and subscription sources."""

    def __init__(self, providers: Mapping[str, EntryPointInfo] | None = None,
                 middlewares: Mapping[str, EntryPointInfo] | None = None,
                 event_sinks: Mapping[str, EntryPointInfo] | None = None,
                 subscription_sources: Mapping[str, EntryPointInfo] | None = None) -> None:
        self.providers = dict(providers or {})
        self.middlewares = dict(middlewares or {})
        self.event_sinks = dict(event_sinks or {})
        self.subscription_sources = dict(subscription_sources or {})

    @classmethod
    def from_entry_points(cls) -> Registry:
        """The registry of everything installed in this environment."""
        return cls(load_group(PROVIDERS), load_group(MIDDLEWARES), load_group(EVENT_SINKS),
                   load_group(SUBSCRIPTION_SOURCES))

    @classmethod
    def from_classes(cls, *, providers: Mapping[str, Any] | None = None,
                     middlewares: Mapping[str, Any] | None = None,
                     event_sinks: Mapping[str, Any] | None = None,
                     subscription_sources: Mapping[str, Any] | None = None) -> Registry:
        """A registry of given objects, as if installed (for tests and embedding)."""
        def wrap(group: str, objs: Mapping[str, Any] | None) -> dict[str, EntryPointInfo]:
            return {name: EntryPointInfo(name, f"{getattr(obj, '__module__', '?')}:"
                                               f"{getattr(obj, '__qualname__', repr(obj))}",
                                         None, None, (lambda o=obj: o), group)
                    for name, obj in (objs or {}).items()}
        return cls(wrap(PROVIDERS, providers), wrap(MIDDLEWARES, middlewares),
                   wrap(EVENT_SINKS, event_sinks), wrap(SUBSCRIPTION_SOURCES, subscription_sources))

    def provider(self, name: str, path: str) -> type:
        """The provider class named `name`; ConfigError at `path` if unusable."""
        return _resolve("provider", self.providers, name, path)

    def middleware(self, name: str, path: str) -> type:
        """The middleware class named `name`; ConfigError at `path` if unusable."""
        return _resolve("middleware", self.middlewares, name, path)

    def event_sink(self, name: str, path: str) -> type:
        """The event sink class named `name`; ConfigError at `path` if unusable."""
        return _resolve("event sink", self.event_sinks, name, path)

    def subscription_source(self, name: str, path: str) -> type:
        """The subscription source class named `name`; ConfigError at `path` if unusable."""
        return _resolve("subscription source", self.subscription_sources, name, path)


def _resolve(kind: str, table: Mapping[str, EntryPointInfo], name: str, path: str) -> Any:
    """Load entry point `name` and check its shape, or raise a ConfigError naming it."""
    info = table.get(name)
    if info is None:
        installed = f"installed: {', '.join(sorted(table))}" if table else "none installed"
        raise ConfigError(f"{path}: {kind} '{name}' is not installed ({installed})")
    try:
        obj = info.load()
    except Exception as exc:  # any failure inside the plugin's import
        raise ConfigError(f"{path}: {kind} '{name}' failed to load ({info.origin}): "
                          f"{type(exc).__name__}: {exc}") from exc
    if not callable(obj):
        raise ConfigError(f"{path}: {kind} '{name}' ({info.origin}) must be a class, "
                          f"got {type(obj).__name__}")
    options = getattr(obj, "Options", None)
    if options is not None and not (isinstance(options, type) and dataclasses.is_dataclass(options)):
        raise ConfigError(f"{path}: {kind} '{name}' ({info.origin}): its Options must be a dataclass, "
                          f"got {options!r}")
    return obj


@dataclass(frozen=True)
class Checked:
    """What `check_config` built, so the server does not build it twice.

    `middleware_options`: (spec, class, options or None) in config order;
    `deployment_options` and `providers`: by `Deployment.id`.
    """

    middleware_options: list[tuple[MiddlewareSpec, type, object | None]]
    deployment_options: dict[str, object | None]
    providers: dict[str, type]
    sink_options: list[tuple[MiddlewareSpec, type, object | None]] = dataclasses.field(default_factory=list)


def _middleware_options(spec: MiddlewareSpec, cls: type, config: Config, errors: list[str],
                        registry: "Registry | None" = None) -> Any:
    opts_cls = getattr(cls, "Options", None)
    if opts_cls is None:
        if spec.options:
            errors.append(f"{spec.path}: takes no options (got {', '.join(map(str, spec.options))})")
        return None
    try:
        options = build(opts_cls, spec.options, spec.path, unset_env=config.unset_env)
    except ConfigError as exc:
        errors.extend(exc.messages)
        return None
    check = getattr(cls, "check_config", None)  # what depends on the rest of the config
    if check is not None:
        # `check_config(options, config)`; one that declares `registry` also gets the
        # registry (the subscription middleware checks its source plugin's options).
        wants = "registry" in inspect.signature(check).parameters
        problems = check(options, config, registry=registry) if wants else check(options, config)
        errors.extend(f"{spec.path}.{problem}" for problem in problems)
    return options


_DEPLOYMENT_KEYS = known_keys(Deployment)


def _deployment_options(dep: Deployment, cls: type, path: str, config: Config, errors: list[str]) -> Any:
    """Build the provider's Options from the deployment's extra keys."""
    opts_cls = getattr(cls, "Options", None)
    opt_keys = known_keys(opts_cls) if opts_cls is not None else []
    collects = opts_cls is not None and any(f.metadata.get("extra") for f in dataclasses.fields(opts_cls))
    unknown = [k for k in dep.options if k not in opt_keys and not collects]
    errors.extend(unknown_key(path, k, opt_keys + _DEPLOYMENT_KEYS) for k in unknown)
    if opts_cls is None:
        return None
    given = {k: v for k, v in dep.options.items() if k not in unknown}
    try:
        return build(opts_cls, given, path, unset_env=config.unset_env)
    except ConfigError as exc:
        errors.extend(exc.messages)
        return None


def check_config(config: Config, registry: Registry) -> Checked:
    """The registry-aware checks; raise ConfigError listing every problem.

    Every middleware and provider must be installed and its options valid, and no
    middleware that acts on the parsed request listed before an identity one; a provider
    whose `needs_api_key(deployment)` (else `requires_api_key`) is true needs `api_key`,
    and its `check_deployment(deployment)` problems are listed; and (SPEC §5) a real provider (`offline`
    false or absent) needs `master_key`, the `auth` middleware or
    `server.allow_anonymous: true`.
    """
    errors: list[str] = []

    def resolved(specs: Sequence[MiddlewareSpec], lookup: Any) -> list[tuple[MiddlewareSpec, type, object | None]]:
        out = []
        for spec in specs:
            try:
                cls = lookup(spec.name, spec.path)
            except ConfigError as exc:
                errors.extend(exc.messages)
                continue
            out.append((spec, cls, _middleware_options(spec, cls, config, errors, registry)))
        return out

    try:
        parse_database_url(config.database_url)
    except ValueError as exc:
        errors.append(str(exc))
    if "master_key" in config.unset_env:  # written in the config, empty at run time: a mistake
        uses = ["the admin API"] + [f"{spec.path} ({spec.name})" for spec in config.middlewares
                                     if spec.name == "auth"]
        errors.append(f"master_key: {unset_text(config.unset_env['master_key'])}, so {' and '.join(uses)} would "
                      "have no master key; set it, or remove master_key from the config")
    middlewares = resolved(config.middlewares, registry.middleware)
    errors.extend(check_order([(spec.path, cls) for spec, cls, _ in middlewares]))
    sinks = resolved(config.event_sinks, registry.event_sink)

    deployment_options: dict[str, object | None] = {}
    providers: dict[str, type] = {}
    real: tuple[int, str] | None = None
    for i, model in enumerate(config.models):
        for j, dep in enumerate(model.deployments):
            path = f"models[{i}].deployments[{j}]"
            try:
                cls = registry.provider(dep.provider, f"{path}.provider")
            except ConfigError as exc:
                errors.extend(exc.messages)
                continue
            providers[dep.id] = cls
            deployment_options[dep.id] = _deployment_options(dep, cls, path, config, errors)
            needs_key = getattr(cls, "needs_api_key", None)  # per deployment, else the class's flag
            if (needs_key(dep) if needs_key is not None else getattr(cls, "requires_api_key", False)) \
                    and not dep.api_key:
                empty = " (it is empty)" if dep.api_key == "" else ""
                errors.append(f"{path}.api_key: required{empty}{config.unset_hint(f'{path}.api_key')}")
            check = getattr(cls, "check_deployment", None)
            if check is not None:
                errors.extend(f"{path}.{problem}" for problem in check(dep))
            if not getattr(cls, "offline", False) and real is None:
                real = (i, model.name)

    guarded = (config.master_key or config.server.allow_anonymous
               or any(spec.name == "auth" for spec in config.middlewares))
    if real is not None and not guarded:
        errors.append(f"master_key: a real provider (models[{real[0]}] '{real[1]}') is configured with "
                      "neither master_key nor the auth middleware; set one, or "
                      "server.allow_anonymous: true to serve anonymously" + config.unset_hint("master_key"))
    if errors:
        raise ConfigError(errors)
    return Checked(middlewares, deployment_options, providers, sinks)
