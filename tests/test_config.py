"""Config loading: the error table, environment substitution, defaults, YAML errors, build()."""
from __future__ import annotations

import copy
import dataclasses
import pickle
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Literal

import pytest
from hypothesis import given, strategies as st

from llmproxy.config import (
    Config, ConfigError, Deployment, MiddlewareSpec, build, default_config, load_config,
    parse_config, parse_yaml,
)

BASE: dict[str, Any] = {"models": [{"name": "m", "deployments": [{"provider": "mock"}]},
                                   {"name": "n", "deployments": [{"provider": "mock"}]}]}


def cfg(**sections: Any) -> dict[str, Any]:
    """BASE with top-level sections replaced."""
    data = copy.deepcopy(BASE)
    data.update(sections)
    return data


def dep(**fields: Any) -> dict[str, Any]:
    """BASE whose first deployment has `fields` added."""
    return cfg(models=[{"name": "m", "deployments": [{"provider": "mock", **fields}]}])


def model(**fields: Any) -> dict[str, Any]:
    """BASE whose first model is `fields`."""
    return cfg(models=[fields])


def errors_of(data: Any, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(data, env=env or {})
    return info.value.messages


BAD = [
    # server
    (cfg(server={"port": "abc"}), "server.port: expected integer, got 'abc'"),
    (cfg(server={"port": True}), "server.port: expected integer, got True"),
    (cfg(server={"port": 4000.0}), "server.port: expected integer, got 4000.0"),
    (cfg(server={"port": 0}), "server.port: must be >= 1"),
    (cfg(server={"port": 70000}), "server.port: must be <= 65535"),
    (cfg(server={"prot": 1}), "server.prot: unknown key (known: host, port, workers, max_body_bytes, "
                              "graceful_timeout, drain_delay, allow_anonymous, admin_port, access_log); did you mean 'port'?"),
    (cfg(server={"workers": 0}), "server.workers: must be >= 1"),
    (cfg(server={"max_body_bytes": -5}), "server.max_body_bytes: must be >= 1"),
    (cfg(server={"graceful_timeout": -1}), "server.graceful_timeout: must be >= 0"),
    (cfg(server={"graceful_timeout": "30s"}), "server.graceful_timeout: expected number, got '30s'"),
    (cfg(server={"allow_anonymous": "yes"}), "server.allow_anonymous: expected boolean, got 'yes'"),
    (cfg(server={"allow_anonymous": 1}), "server.allow_anonymous: expected boolean, got 1"),
    (cfg(server={"host": 127}), "server.host: expected string, got 127"),
    (cfg(server={"admin_port": 4000}), "server.admin_port: must differ from server.port (4000)"),
    (cfg(server=5), "server: expected a mapping, got 5"),
    (cfg(server=[1]), "server: expected a mapping, got a list"),
    # top level
    (cfg(modles=[]), "modles: unknown key (known: server, master_key, database_url, redis_url, models, "
                     "router, passthrough, middlewares, event_sinks, metrics, database, spend); did you mean 'models'?"),
    (cfg(source="x"), "source: unknown key"),
    (cfg(master_key=""), "master_key: must not be empty"),
    (cfg(master_key=123), "master_key: expected string, got 123"),
    (cfg(redis_url=["redis://"]), "redis_url: expected string, got a list"),
    ({}, "models: at least one model is required"),
    (cfg(models=[]), "models: at least one model is required"),
    (cfg(models={"m": {}}), "models: expected a list, got a mapping"),
    # models
    (model(deployments=[{"provider": "mock"}]), "models[0].name: required"),
    (model(name="m"), "models[0].deployments: required"),
    (model(name="m", deployments=[]), "models[0].deployments: must have at least 1 item"),
    (model(name="", deployments=[{"provider": "mock"}]), "models[0].name: must not be empty"),
    (model(name="m", deployments={"provider": "mock"}), "models[0].deployments: expected a list, got a mapping"),
    (model(name="m", deployments=[{"provider": "mock"}], pricng={}),
     "models[0].pricng: unknown key (known: name, deployments, pricing, prices); did you mean 'pricing'?"),
    (cfg(models=["m"]), "models[0]: expected a mapping, got 'm'"),
    (cfg(models=[{"name": "m", "deployments": [{"provider": "mock"}]}] * 2),
     "models[1].name: duplicate model name 'm' (also models[0])"),
    # pricing
    (model(name="m", deployments=[{"provider": "mock"}], pricing={"input_per_1m": -1}),
     "models[0].pricing.input_per_1m: must be >= 0"),
    (model(name="m", deployments=[{"provider": "mock"}], pricing={"output_per_1m": "abc"}),
     "models[0].pricing.output_per_1m: expected decimal number, got 'abc'"),
    (model(name="m", deployments=[{"provider": "mock"}], pricing={"cache_read_per_1m": True}),
     "models[0].pricing.cache_read_per_1m: expected decimal number, got True"),
    (model(name="m", deployments=[{"provider": "mock"}], pricing={"input_per_1m": "nan"}),
     "models[0].pricing.input_per_1m: expected decimal number, got 'nan'"),
    (model(name="m", deployments=[{"provider": "mock"}], pricing={"input": 1}),
     "models[0].pricing.input: unknown key (known: input_per_1m, output_per_1m, cache_read_per_1m, "
     "cache_write_per_1m)"),
    # deployments
    (model(name="m", deployments=[{"model": "x"}]), "models[0].deployments[0].provider: required"),
    (model(name="m", deployments=[{"provider": ""}]), "models[0].deployments[0].provider: must not be empty"),
    (model(name="m", deployments=[{"provider": None}]), "models[0].deployments[0].provider: expected string, got null"),
    (model(name="m", deployments=["mock"]), "models[0].deployments[0]: expected a mapping, got 'mock'"),
    (dep(model=""), "models[0].deployments[0].model: must not be empty"),
    (dep(rpm="abc"), "models[0].deployments[0].rpm: expected integer, got 'abc'"),
    (dep(rpm=1.5), "models[0].deployments[0].rpm: expected integer, got 1.5"),
    (dep(rpm=0), "models[0].deployments[0].rpm: must be >= 1"),
    (dep(tpm=-1), "models[0].deployments[0].tpm: must be >= 1"),
    (dep(burst=False), "models[0].deployments[0].burst: expected integer, got False"),
    (dep(weight=0), "models[0].deployments[0].weight: must be > 0"),
    (dep(weight="heavy"), "models[0].deployments[0].weight: expected number, got 'heavy'"),
    (dep(timeout=0), "models[0].deployments[0].timeout: must be > 0"),
    (dep(stream_idle_timeout=-1.5), "models[0].deployments[0].stream_idle_timeout: must be > 0"),
    (dep(max_queue_size=-1), "models[0].deployments[0].max_queue_size: must be >= 0"),
    (dep(max_queue_wait=-0.1), "models[0].deployments[0].max_queue_wait: must be >= 0"),
    (dep(tpm_counts="sometimes"),
     "models[0].deployments[0].tpm_counts: expected one of 'reserved', 'actual', got 'sometimes'"),
    (dep(stream_usage="false"), "models[0].deployments[0].stream_usage: expected boolean, got 'false'"),
    (dep(headers=["x"]), "models[0].deployments[0].headers: expected a mapping, got a list"),
    (dep(headers={"x-n": 1}), "models[0].deployments[0].headers.x-n: expected string, got 1"),
    (dep(api_key=["k"]), "models[0].deployments[0].api_key: expected string, got a list"),
    (model(name="m", deployments=[{"provider": "mock", 1: "x"}]),
     "models[0].deployments[0].1: keys must be strings, got 1"),
    # router
    (cfg(router={"retries": 3}), "router.retries: unknown key (known: num_retries, retry_after, "
                                 "cooldown_seconds, fallbacks); did you mean 'num_retries'?"),
    (cfg(router={"num_retries": -1}), "router.num_retries: must be >= 0"),
    (cfg(router={"num_retries": "2"}), "router.num_retries: expected integer, got '2'"),
    (cfg(router={"cooldown_seconds": -3}), "router.cooldown_seconds: must be >= 0"),
    (cfg(router={"fallbacks": {"nope": ["m"]}}), "router.fallbacks.nope: unknown model 'nope' (configured: m, n)"),
    (cfg(router={"fallbacks": {"m": ["zzz"]}}), "router.fallbacks.m[0]: unknown model 'zzz' (configured: m, n)"),
    (cfg(router={"fallbacks": {"m": ["n", "m"]}}), "router.fallbacks.m[1]: model 'm' cannot fall back to itself"),
    (cfg(router={"fallbacks": {"m": "n"}}), "router.fallbacks.m: expected a list, got 'n'"),
    (cfg(router={"fallbacks": {"m": [1]}}), "router.fallbacks.m[0]: expected string, got 1"),
    (cfg(router={"fallbacks": ["m"]}), "router.fallbacks: expected a mapping, got a list"),
    # middlewares
    (cfg(middlewares="auth"), "middlewares: expected a list, got 'auth'"),
    (cfg(middlewares=[{"auth": {}, "pii": {}}]),
     "middlewares[0]: expected a middleware name or a one-key mapping {name: options}, got a mapping with 2 keys"),
    (cfg(middlewares=["tracing", 5]),
     "middlewares[1]: expected a middleware name or a one-key mapping {name: options}, got 5"),
    (cfg(middlewares=[["auth"]]),
     "middlewares[0]: expected a middleware name or a one-key mapping {name: options}, got a list"),
    (cfg(middlewares=[{}]),
     "middlewares[0]: expected a middleware name or a one-key mapping {name: options}, got a mapping with 0 keys"),
    (cfg(middlewares=[{"auth": [1]}]), "middlewares[0].auth: options must be a mapping, got a list"),
    (cfg(middlewares=[{"auth": "fast"}]), "middlewares[0].auth: options must be a mapping, got 'fast'"),
    (cfg(middlewares=[""]), "middlewares[0]: middleware name must not be empty"),
    (cfg(middlewares=["auth", "tracing", {"auth": {"cache_ttl": 1}}]),
     "middlewares[2]: middleware 'auth' is listed twice (also middlewares[0])"),
    # metrics
    (cfg(metrics={"team_label": "yes"}), "metrics.team_label: expected boolean, got 'yes'"),
    (cfg(metrics={"teams": True}), "metrics.teams: unknown key (known: team_label)"),
]


@pytest.mark.parametrize("data, expected", BAD)
def test_bad_config_names_the_path(data: Any, expected: str) -> None:
    messages = errors_of(data)
    assert any(m.startswith(expected) for m in messages), messages


@pytest.mark.parametrize("data, expected", [
    ([1, 2], "config: expected a mapping at the top level, got a list"),
    ("models: []", "config: expected a mapping at the top level, got 'models: []'"),
])
def test_top_level_must_be_a_mapping(data: Any, expected: str) -> None:
    assert errors_of(data) == [expected]


def test_every_error_is_reported_at_once() -> None:
    data = cfg(server={"port": "x", "prot": 1}, router={"num_retries": -1}, middlewares=[5],
               models=[{"name": "m", "deployments": [{"provider": "mock", "rpm": "a", "weight": 0}]},
                       {"name": "m", "deployments": []}])
    messages = errors_of(data)
    for expected in ["server.port:", "server.prot:", "router.num_retries:", "middlewares[0]:",
                     "models[0].deployments[0].rpm:", "models[0].deployments[0].weight:",
                     "models[1].deployments:", "models[1].name: duplicate"]:
        assert any(m.startswith(expected) for m in messages), (expected, messages)


def test_str_lists_one_error_per_line() -> None:
    err = ConfigError(["a: one", "b: two"])
    assert str(err) == "a: one\nb: two"
    assert ConfigError("c: three").messages == ["c: three"]
    assert pickle.loads(pickle.dumps(err)).messages == err.messages


# ------------------------------------------------------------------------ valid configs

SPEC_EXAMPLE = """
server:   {host: 0.0.0.0, port: 4000, workers: 1, max_body_bytes: 10485760, graceful_timeout: 30}
master_key: os.environ/LLMPROXY_MASTER_KEY
database_url: os.environ/DATABASE_URL
redis_url: os.environ/REDIS_URL

models:
  - name: gpt-4o-mini
    pricing: {input_per_1m: 0.15, output_per_1m: 0.60, cache_read_per_1m: 0.075, cache_write_per_1m: 0.15}
    deployments:
      - provider: openai
        model: gpt-4o-mini
        api_base: https://api.openai.com/v1
        api_key: os.environ/OPENAI_API_KEY
        weight: 1
        rpm: 500
        tpm: 200000
        burst: 500
        tpm_counts: reserved
        max_queue_size: 100
        max_queue_wait: 30
        timeout: 60
        stream_idle_timeout: 120
        stream_usage: true
  - name: claude-sonnet
    deployments:
      - {provider: anthropic, model: claude-sonnet-4-5-20250929, api_key: os.environ/ANTHROPIC_API_KEY,
         api_base: https://api.anthropic.com}
  - name: demo
    deployments:
      - {provider: mock, model: demo, latency_ms: 0, chunks: 20, chunk_delay_ms: 5}
  - name: gpt-4o
    deployments: [{provider: openai, api_key: "${OPENAI_API_KEY}"}]

router: {num_retries: 2, retry_after: 1, cooldown_seconds: 30, fallbacks: {gpt-4o: [gpt-4o-mini]}}

middlewares:
  - tracing
  - auth: {cache_ttl: 30}
  - subscription
  - pii: {mode: mask, entities: [EMAIL_ADDRESS, PHONE_NUMBER],
          presidio: {analyzer_url: http://presidio:3000, on_error: fail_closed}}
  - cache: {ttl: 3600}
  - scheduler:
"""


def test_spec_example_loads(tmp_path) -> None:
    path = tmp_path / "llmproxy.yaml"
    path.write_text(SPEC_EXAMPLE)
    env = {"LLMPROXY_MASTER_KEY": "sk-master", "OPENAI_API_KEY": "sk-openai", "REDIS_URL": "redis://r:6379"}
    config = load_config(str(path), env=env)

    assert config.source == str(path)
    assert config.server.host == "0.0.0.0" and config.server.graceful_timeout == 30.0
    assert isinstance(config.server.graceful_timeout, float)
    assert config.master_key == "sk-master" and type(config.master_key) is str
    assert config.database_url is None and config.redis_url == "redis://r:6379"
    assert config.unset_env == {"database_url": "DATABASE_URL",
                                "models[1].deployments[0].api_key": "ANTHROPIC_API_KEY"}

    mini, claude, demo, gpt4o = config.models
    assert mini.pricing.input_per_1m == Decimal("0.15")
    assert mini.pricing.cache_read_per_1m == Decimal("0.075")
    assert claude.pricing is None
    d = mini.deployments[0]
    assert (d.provider, d.model, d.api_key, d.rpm, d.burst, d.weight) == (
        "openai", "gpt-4o-mini", "sk-openai", 500, 500, 1.0)
    assert d.options == {} and d.headers == {}
    assert claude.deployments[0].api_key is None
    assert demo.deployments[0].options == {"latency_ms": 0, "chunks": 20, "chunk_delay_ms": 5}
    assert gpt4o.deployments[0].model == "gpt-4o"  # defaults to the model's name
    assert gpt4o.deployments[0].api_key == "sk-openai"
    assert [m.deployments[0].id for m in config.models] == [
        "openai:gpt-4o-mini", "anthropic:claude-sonnet-4-5-20250929", "mock:demo", "openai:gpt-4o"]

    assert config.router.fallbacks == {"gpt-4o": ("gpt-4o-mini",)}
    assert config.router.retry_after == 1.0
    assert [(s.name, s.path) for s in config.middlewares] == [
        ("tracing", "middlewares[0].tracing"), ("auth", "middlewares[1].auth"),
        ("subscription", "middlewares[2].subscription"), ("pii", "middlewares[3].pii"),
        ("cache", "middlewares[4].cache"), ("scheduler", "middlewares[5].scheduler")]
    assert config.middlewares[1].options == {"cache_ttl": 30}
    assert config.middlewares[3].options["presidio"]["on_error"] == "fail_closed"
    assert config.middlewares[5].options == {}


def test_config_is_frozen_and_picklable() -> None:
    config = parse_config(BASE, env={})
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.master_key = "x"  # type: ignore[misc]
    assert pickle.loads(pickle.dumps(config)) == config


def test_empty_sections_mean_defaults() -> None:
    config = parse_config(cfg(server=None, router=None, metrics=None, middlewares=None), env={})
    assert config.server.port == 4000 and config.server.host == "127.0.0.1"
    assert config.router.num_retries == 2 and config.middlewares == ()
    d = parse_config(dep(weight=None, headers=None), env={}).models[0].deployments[0]
    assert d.weight == 1.0 and d.headers == {}


def test_defaults() -> None:
    d = parse_config(BASE, env={}).models[0].deployments[0]
    assert (d.model, d.weight, d.rpm, d.tpm_counts, d.max_queue_size, d.max_queue_wait, d.timeout,
            d.stream_idle_timeout, d.stream_usage) == ("m", 1.0, None, "reserved", 100, 30.0, 60.0, 120.0, True)


@pytest.mark.parametrize("deployments, ids", [
    ([{"provider": "openai", "model": "x"}, {"provider": "openai", "model": "y"}], ["openai:x", "openai:y"]),
    ([{"provider": "openai", "api_base": "a"}, {"provider": "azure"}, {"provider": "openai", "api_base": "b"}],
     ["openai:m#0", "azure:m", "openai:m#2"]),
])
def test_deployment_ids_unique_within_a_model(deployments: list, ids: list[str]) -> None:
    config = parse_config(cfg(models=[{"name": "m", "deployments": deployments}]), env={})
    assert [d.id for d in config.models[0].deployments] == ids


def test_deployment_ids_unique_across_models() -> None:
    config = parse_config(cfg(models=[
        {"name": "a", "deployments": [{"provider": "openai", "model": "gpt-4o"}]},
        {"name": "b", "deployments": [{"provider": "mock"}, {"provider": "openai", "model": "gpt-4o"}]}]), env={})
    ids = [d.id for m in config.models for d in m.deployments]
    assert ids == ["openai:gpt-4o#a/0", "mock:b", "openai:gpt-4o#b/1"]


def test_default_config() -> None:
    config = load_config(None)
    assert config == default_config()
    assert config.source is None and config.master_key is None
    assert config.server.host == "127.0.0.1" and config.server.port == 4000
    (only,) = config.models
    assert only.name == "mock"
    assert [(d.provider, d.model, d.id) for d in only.deployments] == [("mock", "mock", "mock:mock")]
    assert config.middlewares == () and config.database_url is None and config.redis_url is None


# ------------------------------------------------------------------------- environment

ENV = {"KEY": "sk-abc", "TOKEN": "t0k", "PORT": "8080", "HOST": "0.0.0.0", "YES": "true", "PRICE": "0.25"}


@pytest.mark.parametrize("raw, expected", [
    ("os.environ/KEY", "sk-abc"),
    ("${KEY}", "sk-abc"),
    ("Bearer ${TOKEN}", "Bearer t0k"),
    ("${KEY}:${TOKEN}", "sk-abc:t0k"),
    ("literal $${KEY}", "literal ${KEY}"),
    ("no reference $KEY os.environ/KEY", "no reference $KEY os.environ/KEY"),
    ("os.environ/KEY ", "os.environ/KEY "),
])
def test_env_substitution_forms(raw: str, expected: str) -> None:
    config = parse_config(dep(api_key=raw, headers={"authorization": raw}), env=ENV)
    d = config.models[0].deployments[0]
    assert d.api_key == expected and d.headers == {"authorization": expected}


def test_env_values_take_the_field_type() -> None:
    data = cfg(server={"port": "${PORT}", "host": "os.environ/HOST", "allow_anonymous": "${YES}"},
               models=[{"name": "m", "pricing": {"input_per_1m": "${PRICE}"},
                        "deployments": [{"provider": "mock", "weight": "${PORT}", "chunks": "${PORT}"}]}])
    config = parse_config(data, env=ENV)
    assert config.server.port == 8080 and config.server.host == "0.0.0.0"
    assert config.server.allow_anonymous is True
    assert config.models[0].pricing.input_per_1m == Decimal("0.25")
    assert config.models[0].deployments[0].weight == 8080.0
    assert config.models[0].deployments[0].options["chunks"] == "8080"  # raw; the provider builds it


def test_env_value_is_never_echoed_in_errors() -> None:
    messages = errors_of(cfg(server={"port": "${KEY}"}), env=ENV)
    assert messages == ["server.port: expected integer, got the value of environment variable KEY (not shown)"]
    assert "sk-abc" not in "\n".join(messages)


def test_unset_variable_makes_the_key_absent() -> None:
    data = cfg(master_key="os.environ/LLMPROXY_MASTER_KEY", redis_url="${REDIS_URL}",
               server={"port": "${PORT}"}, models=[{"name": "m", "deployments": [
                   {"provider": "openai", "api_key": "Bearer ${OPENAI_API_KEY}", "headers": {"x-t": "${TOKEN}"}}]}])
    config = parse_config(data, env={})
    assert config.master_key is None and config.redis_url is None and config.server.port == 4000
    d = config.models[0].deployments[0]
    assert d.api_key is None and d.headers == {}
    assert config.unset_env == {
        "master_key": "LLMPROXY_MASTER_KEY", "redis_url": "REDIS_URL", "server.port": "PORT",
        "models[0].deployments[0].api_key": "OPENAI_API_KEY", "models[0].deployments[0].headers.x-t": "TOKEN"}
    assert config.unset_hint("master_key") == " (environment variable LLMPROXY_MASTER_KEY is not set)"
    assert config.unset_hint("server.host") == ""


@pytest.mark.parametrize("data, expected", [
    (model(name="os.environ/MODEL_NAME", deployments=[{"provider": "mock"}]),
     "models[0].name: required (environment variable MODEL_NAME is not set)"),
    (dep(provider="${A}-${B}"), "models[0].deployments[0].provider: required "
                                "(environment variables A, B are not set)"),
    (cfg(middlewares=["tracing", "${EXTRA_MIDDLEWARE}"]),
     "middlewares[1]: environment variable EXTRA_MIDDLEWARE is not set"),
    (cfg(router={"fallbacks": {"m": ["${FALLBACK}"]}}),
     "router.fallbacks.m[0]: environment variable FALLBACK is not set"),
])
def test_unset_variable_on_a_required_key_names_it(data: Any, expected: str) -> None:
    assert expected in errors_of(data, env={})


def test_env_defaults_to_os_environ(monkeypatch) -> None:
    monkeypatch.setenv("LLMPROXY_TEST_MASTER", "sk-from-env")
    config = parse_config(cfg(master_key="os.environ/LLMPROXY_TEST_MASTER"))
    assert config.master_key == "sk-from-env"


@given(st.text())
def test_text_without_references_is_unchanged(text: str) -> None:
    if "${" in text or text.startswith("os.environ/"):
        return
    config = parse_config(dep(headers={"x": text}), env=ENV)
    assert config.models[0].deployments[0].headers == {"x": text}


# -------------------------------------------------------------------------------- YAML


@pytest.mark.parametrize("text, expected", [
    ("server:\n  port: 4000\n bad: x\n", "c.yaml:3:2: invalid YAML: expected <block end>, but found"),
    ("a: b: c\n", "c.yaml:1:5: invalid YAML: mapping values are not allowed here"),
    ("server:\n  host: [a\n", "c.yaml:3:1: invalid YAML: expected ',' or ']'"),
    ("server:\n  port: 1\n  port: 2\n", "c.yaml:3:3: duplicate key 'port' (first at line 2)"),
])
def test_yaml_errors_name_file_line_and_column(tmp_path, text: str, expected: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    assert info.value.messages[0].startswith(expected.replace("c.yaml", str(path)))


def test_yaml_merge_keys_are_not_duplicates() -> None:
    data = parse_yaml("base: &b {weight: 1, rpm: 5}\nd: {<<: *b, rpm: 6}\n")
    assert data["d"] == {"weight": 1, "rpm": 6}


def test_missing_file(tmp_path) -> None:
    with pytest.raises(ConfigError, match="nope.yaml: cannot read the config file"):
        load_config(tmp_path / "nope.yaml")


def test_empty_file_needs_models(tmp_path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing\n")
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    assert info.value.messages == ["models: at least one model is required"]


# ----------------------------------------------------------------------- generic build()


@dataclass(frozen=True)
class Inner:
    size: int = field(default=1, metadata={"min": 0})


@dataclass(frozen=True)
class Opts:
    name: str
    mode: Literal["mask", "redact", "block"] = "mask"
    ratio: float = 0.5
    price: Decimal = Decimal("1")
    tags: tuple[str, ...] = ()
    pair: tuple[int, str] | None = None
    limits: dict[str, int] = field(default_factory=dict)
    inner: Inner = field(default_factory=Inner)
    maybe: Inner | None = None
    either: int | str = 0
    raw: Any = None

    def __post_init__(self) -> None:
        if self.name == "forbidden":
            raise ValueError("name must not be 'forbidden'")


def test_build_converts_types() -> None:
    opts = build(Opts, {"name": "x", "mode": "block", "ratio": 2, "price": 0.1, "tags": ["a", "b"],
                        "pair": [1, "z"], "limits": {"a": 1}, "inner": {"size": 3}, "maybe": None,
                        "either": "s", "raw": {"k": [1]}}, "mw")
    assert opts == Opts(name="x", mode="block", ratio=2.0, price=Decimal("0.1"), tags=("a", "b"),
                        pair=(1, "z"), limits={"a": 1}, inner=Inner(3), maybe=None, either="s",
                        raw={"k": [1]})
    assert isinstance(opts.ratio, float) and isinstance(opts.tags, tuple)


def test_build_none_means_all_defaults() -> None:
    assert build(Inner, None, "x") == Inner()


@pytest.mark.parametrize("data, expected", [
    ({}, "mw.name: required"),
    ({"name": "x", "mood": 1}, "mw.mood: unknown key (known: name, mode, ratio, price, tags, pair, limits, "
                               "inner, maybe, either, raw); did you mean 'mode'?"),
    ({"name": "x", "mode": "hide"}, "mw.mode: expected one of 'mask', 'redact', 'block', got 'hide'"),
    ({"name": "x", "ratio": True}, "mw.ratio: expected number, got True"),
    ({"name": "x", "price": [1]}, "mw.price: expected decimal number, got a list"),
    ({"name": "x", "tags": "a,b"}, "mw.tags: expected a list, got 'a,b'"),
    ({"name": "x", "tags": ["a", 2]}, "mw.tags[1]: expected string, got 2"),
    ({"name": "x", "pair": [1]}, "mw.pair: expected a list of 2 items, got 1"),
    ({"name": "x", "limits": {"a": "b"}}, "mw.limits.a: expected integer, got 'b'"),
    ({"name": "x", "inner": {"size": -1}}, "mw.inner.size: must be >= 0"),
    ({"name": "x", "maybe": {"sise": 1}}, "mw.maybe.sise: unknown key (known: size); did you mean 'size'?"),
    ({"name": "x", "either": 1.5}, "mw.either: expected integer or string, got 1.5"),
    ({"name": "forbidden"}, "mw: name must not be 'forbidden'"),
    ({"name": "x" * 100, "ratio": "y" * 100}, "mw.ratio: expected number, got 'yyyyyyyy"),
])
def test_build_errors(data: dict, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        build(Opts, data, "mw")
    assert any(m.startswith(expected) for m in info.value.messages), info.value.messages


def test_build_collects_every_error() -> None:
    with pytest.raises(ConfigError) as info:
        build(Opts, {"mode": 1, "ratio": "x", "inner": {"size": "y"}}, "")
    assert info.value.messages == [
        "name: required", "mode: expected one of 'mask', 'redact', 'block', got 1",
        "ratio: expected number, got 'x'", "inner.size: expected integer, got 'y'"]


def test_build_required_hint_uses_unset_env() -> None:
    with pytest.raises(ConfigError) as info:
        build(Opts, {}, "mw", unset_env={"mw.name": "NAME"})
    assert info.value.messages == ["mw.name: required (environment variable NAME is not set)"]


def test_build_accepts_built_instances() -> None:
    spec = MiddlewareSpec("auth", {}, "middlewares[0].auth")
    config = build(Config, {"middlewares": [spec]}, "")
    assert config.middlewares == (spec,)


def test_deployment_id_and_options_are_not_config_keys() -> None:
    d = parse_config(dep(id="mine", options={"a": 1}), env={}).models[0].deployments[0]
    assert d.id == "mock:m" and d.options == {"id": "mine", "options": {"a": 1}}
    assert isinstance(d, Deployment)


def test_unset_variable_in_a_list_keeps_later_indices() -> None:
    assert errors_of(cfg(middlewares=["${EXTRA}", 5])) == [
        "middlewares[0]: environment variable EXTRA is not set",
        "middlewares[1]: expected a middleware name or a one-key mapping {name: options}, got 5"]


@dataclass(frozen=True)
class Unsupported:
    tags: set[str] = field(default_factory=set)


def test_build_reports_a_schema_it_cannot_read() -> None:
    with pytest.raises(ConfigError, match=r"^mw.tags: type set\[str\] is not supported by build\(\)"):
        build(Unsupported, {"tags": ["a"]}, "mw")
