"""The entry-point registry and the registry-aware config checks."""
from __future__ import annotations

import copy
import importlib.metadata
from dataclasses import dataclass, field
from typing import Any

import pytest
from structlog.testing import capture_logs

from llmproxy.config import ConfigError, parse_config
from llmproxy.plugins import (
    EntryPointInfo, Registry, check_config, load_group,
)


@dataclass(frozen=True)
class AuthOptions:
    cache_ttl: float = field(default=30.0, metadata={"min": 0})


class Auth:
    Options = AuthOptions


class Tracing:
    """A middleware without options."""


@dataclass(frozen=True)
class FakeMockOptions:
    latency_ms: float = field(default=0.0, metadata={"min": 0})
    chunks: int = field(default=20, metadata={"min": 1})


class FakeMock:
    offline = True
    requires_api_key = False
    Options = FakeMockOptions


class FakeOpenAI:
    offline = False
    requires_api_key = True
    Options = None


class Bare:
    """A provider that declares nothing: treated as real, needs no key, takes no options."""


REGISTRY = Registry.from_classes(providers={"mock": FakeMock, "openai": FakeOpenAI, "bare": Bare},
                                 middlewares={"auth": Auth, "tracing": Tracing})


def cfg(*deployments: dict, **top: Any) -> dict[str, Any]:
    data: dict[str, Any] = {"models": [{"name": "demo", "deployments": list(deployments) or [{"provider": "mock"}]}]}
    data.update(copy.deepcopy(top))
    return data


def problems(data: dict, registry: Registry = REGISTRY, env: dict | None = None) -> list[str]:
    config = parse_config(data, env=env or {})
    with pytest.raises(ConfigError) as info:
        check_config(config, registry)
    return info.value.messages


REAL_WITHOUT_GUARD = ("master_key: a real provider (models[0] 'gpt-4o') is configured with neither master_key "
                      "nor the auth middleware; set one, or server.allow_anonymous: true to serve anonymously")

BAD = [
    (cfg(middlewares=["tracing", {"cache": {"ttl": 1}}]),
     "middlewares[1].cache: middleware 'cache' is not installed (installed: auth, tracing)"),
    (cfg(middlewares=[{"tracing": {"sample": 1}}]), "middlewares[0].tracing: takes no options (got sample)"),
    (cfg(middlewares=[{"auth": {"cache_ttl": "soon"}}]),
     "middlewares[0].auth.cache_ttl: expected number, got 'soon'"),
    (cfg(middlewares=[{"auth": {"cache_ttl": -1}}]), "middlewares[0].auth.cache_ttl: must be >= 0"),
    (cfg(middlewares=[{"auth": {"ttl": 1}}]),
     "middlewares[0].auth.ttl: unknown key (known: cache_ttl); did you mean 'cache_ttl'?"),
    (cfg({"provider": "foo"}),
     "models[0].deployments[0].provider: provider 'foo' is not installed (installed: bare, mock, openai)"),
    (cfg({"provider": "mock", "latncy_ms": 5}),
     "models[0].deployments[0].latncy_ms: unknown key (known: latency_ms, chunks, provider, model, api_base, "
     "api_key, weight, rpm, tpm, burst, tpm_counts, max_queue_size, max_queue_wait, timeout, "
     "stream_idle_timeout, stream_usage, headers); did you mean 'latency_ms'?"),
    (cfg({"provider": "mock", "chunks": 0}), "models[0].deployments[0].chunks: must be >= 1"),
    (cfg({"provider": "mock", "latency_ms": "slow"}),
     "models[0].deployments[0].latency_ms: expected number, got 'slow'"),
    (cfg({"provider": "openai", "api_key": "k", "latency_ms": 5}, master_key="sk-m"),
     "models[0].deployments[0].latency_ms: unknown key (known: provider, model, api_base"),
    (cfg({"provider": "bare", "chunks": 5}, master_key="sk-m"),
     "models[0].deployments[0].chunks: unknown key (known: provider, model"),
    (cfg({"provider": "openai"}, master_key="sk-m"), "models[0].deployments[0].api_key: required"),
    (cfg({"provider": "openai", "api_key": ""}, master_key="sk-m"),
     "models[0].deployments[0].api_key: required (it is empty)"),
    (cfg({"provider": "openai", "api_key": "os.environ/OPENAI_API_KEY"}, master_key="sk-m"),
     "models[0].deployments[0].api_key: required (environment variable OPENAI_API_KEY is not set)"),
    ({"models": [{"name": "demo", "deployments": [{"provider": "mock"}]},
                 {"name": "gpt-4o", "deployments": [{"provider": "openai", "api_key": "k"}]}]},
     "master_key: a real provider (models[1] 'gpt-4o') is configured with neither master_key nor the auth "
     "middleware; set one, or server.allow_anonymous: true to serve anonymously"),
    ({"models": [{"name": "gpt-4o", "deployments": [{"provider": "bare"}]}], "middlewares": ["tracing"]},
     REAL_WITHOUT_GUARD),
    ({"models": [{"name": "gpt-4o", "deployments": [{"provider": "bare"}]}],
      "master_key": "os.environ/LLMPROXY_MASTER_KEY"},
     REAL_WITHOUT_GUARD + " (environment variable LLMPROXY_MASTER_KEY is not set)"),
]


@pytest.mark.parametrize("data, expected", BAD)
def test_registry_checks_name_the_path(data: dict, expected: str) -> None:
    messages = problems(data)
    assert any(m.startswith(expected) for m in messages), messages


def test_nothing_installed() -> None:
    empty = Registry.from_classes(providers={"mock": FakeMock})
    assert problems(cfg(middlewares=["auth"]), empty) == [
        "middlewares[0].auth: middleware 'auth' is not installed (none installed)"]


def test_every_problem_is_reported_at_once() -> None:
    data = {"models": [{"name": "gpt-4o", "deployments": [{"provider": "openai"}, {"provider": "nope"},
                                                          {"provider": "mock", "chunks": 0}]}],
            "middlewares": ["cache", {"tracing": {"x": 1}}]}
    assert problems(data) == [
        "middlewares[0].cache: middleware 'cache' is not installed (installed: auth, tracing)",
        "middlewares[1].tracing: takes no options (got x)",
        "models[0].deployments[0].api_key: required",
        "models[0].deployments[1].provider: provider 'nope' is not installed (installed: bare, mock, openai)",
        "models[0].deployments[2].chunks: must be >= 1",
        REAL_WITHOUT_GUARD,
    ]


@pytest.mark.parametrize("guard", [
    {"master_key": "sk-master"},
    {"middlewares": [{"auth": None}]},
    {"server": {"allow_anonymous": True}},
])
def test_a_real_provider_is_accepted_with_a_guard(guard: dict) -> None:
    data = {"models": [{"name": "gpt-4o", "deployments": [{"provider": "openai", "api_key": "sk"}]}], **guard}
    check_config(parse_config(data, env={}), REGISTRY)


def test_offline_providers_need_no_guard() -> None:
    check_config(parse_config(cfg(), env={}), REGISTRY)


def test_checked_holds_the_built_options() -> None:
    data = cfg({"provider": "mock", "latency_ms": 5}, {"provider": "mock", "model": "other"},
               middlewares=["tracing", {"auth": {"cache_ttl": 10}}])
    config = parse_config(data, env={})
    checked = check_config(config, REGISTRY)
    assert [(spec.name, cls, opts) for spec, cls, opts in checked.middleware_options] == [
        ("tracing", Tracing, None), ("auth", Auth, AuthOptions(cache_ttl=10.0))]
    assert checked.deployment_options == {"mock:demo": FakeMockOptions(latency_ms=5.0),
                                          "mock:other": FakeMockOptions()}
    assert checked.providers == {"mock:demo": FakeMock, "mock:other": FakeMock}


def test_provider_options_from_the_environment_take_their_type() -> None:
    config = parse_config(cfg({"provider": "mock", "chunks": "${CHUNKS}"}), env={"CHUNKS": "7"})
    assert check_config(config, REGISTRY).deployment_options["mock:demo"] == FakeMockOptions(chunks=7)


# ------------------------------------------------------------------- shape at load time


def info(name: str, loader, group: str = "llmproxy.middlewares") -> EntryPointInfo:
    return EntryPointInfo(name, f"boom_plugin.mod:{name.title()}", "boom-plugin", "1.2.3", loader, group)


def failing_import() -> Any:
    raise ModuleNotFoundError("No module named 'boom_plugin'")


class BadOptions:
    Options = {"cache_ttl": 30}


@pytest.mark.parametrize("loader, expected", [
    (failing_import, "middlewares[0].boom: middleware 'boom' failed to load (llmproxy.middlewares:boom = "
                     "boom_plugin.mod:Boom from boom-plugin 1.2.3): ModuleNotFoundError: No module named "
                     "'boom_plugin'"),
    (lambda: 42, "middlewares[0].boom: middleware 'boom' (llmproxy.middlewares:boom = boom_plugin.mod:Boom "
                 "from boom-plugin 1.2.3) must be a class, got int"),
    (lambda: BadOptions, "middlewares[0].boom: middleware 'boom' (llmproxy.middlewares:boom = "
                         "boom_plugin.mod:Boom from boom-plugin 1.2.3): its Options must be a dataclass"),
])
def test_plugin_shape_is_checked_at_load(loader, expected: str) -> None:
    registry = Registry(providers=REGISTRY.providers, middlewares={"boom": info("boom", loader)})
    messages = problems(cfg(middlewares=["boom"]), registry)
    assert len(messages) == 1 and messages[0].startswith(expected), messages


@pytest.mark.parametrize("method, group, kind", [
    ("provider", "providers", "provider"),
    ("event_sink", "event_sinks", "event sink"),
    ("subscription_source", "subscription_sources", "subscription source"),
])
def test_every_kind_resolves(method: str, group: str, kind: str) -> None:
    registry = Registry.from_classes(**{group: {"x": Tracing}})
    assert getattr(registry, method)("x", "p") is Tracing
    with pytest.raises(ConfigError, match=rf"^q: {kind} 'y' is not installed \(installed: x\)$"):
        getattr(registry, method)("y", "q")


def test_load_imports_once_and_logs_the_distribution() -> None:
    calls = []

    def loader() -> type:
        calls.append(1)
        return Tracing

    entry = info("tracing", loader)
    with capture_logs() as logs:
        assert entry.load() is Tracing and entry.load() is Tracing
    assert calls == [1]
    assert logs == [{"event": "plugin loaded", "log_level": "info", "group": "llmproxy.middlewares",
                     "name": "tracing", "value": "boom_plugin.mod:Tracing", "dist": "boom-plugin",
                     "version": "1.2.3"}]


def test_load_group_keeps_the_first_of_two_names(monkeypatch) -> None:
    group = "llmproxy.test_group"
    eps = importlib.metadata.EntryPoints([
        importlib.metadata.EntryPoint("auth", "first.mod:Auth", group),
        importlib.metadata.EntryPoint("auth", "second.mod:Auth", group),
        importlib.metadata.EntryPoint("pii", "third.mod:Pii", group),
    ])
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group: eps)
    with capture_logs() as logs:
        found = load_group(group)
    assert sorted(found) == ["auth", "pii"] and found["auth"].value == "first.mod:Auth"
    assert [e["event"] for e in logs] == ["plugin name conflict"]


def test_installed_entry_points_are_listed_without_importing() -> None:
    found = load_group("llmproxy.providers")
    assert {"openai", "anthropic", "mock"} <= set(found)
    assert found["mock"].dist_name == "llmproxy" and found["mock"].value == "llmproxy.providers.mock:MockProvider"
    assert load_group("llmproxy.no_such_group") == {}


def test_default_config_passes_with_the_installed_plugins() -> None:
    pytest.importorskip("llmproxy.providers.mock")
    from llmproxy.config import default_config
    checked = check_config(default_config(), Registry.from_entry_points())
    assert list(checked.deployment_options) == ["mock:mock"]
