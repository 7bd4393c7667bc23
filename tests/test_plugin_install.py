"""An operator plugin, really installed: `plugins/llmproxy-stamp` goes into this environment
with pip, is found through its entry point, and serves requests through a real proxy.

The module installs once (a few seconds), and uninstalls in the fixture's finalizer so the
environment is left as found. Every subprocess has a timeout, so the module ends well
inside a minute even when pip hangs.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.metadata
import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, AsyncIterator, Iterator

import aiohttp
import orjson
import pytest
import yaml

from llmproxy.config import ConfigError, parse_config
from llmproxy.plugins import Registry, check_config
from llmproxy.testing import collect, make_context, ok_reply

from .conftest import MASTER, openai_config

PLUGIN_DIR = Path(__file__).resolve().parent.parent / "plugins" / "llmproxy-stamp"
DIST = "llmproxy-stamp"
STAMP = {"stamp": {"blocked_users": ["mallory"], "value": "v1"}}
PIP_TIMEOUT = 50  # seconds, for one pip command

pytestmark = [pytest.mark.timeout(60)] if importlib.util.find_spec("pytest_timeout") else []


def _installed_version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _can_build_without_isolation() -> bool:
    """`--no-build-isolation` needs setuptools here, and `wheel` too unless setuptools
    (>= 70.1) ships `bdist_wheel` itself."""
    version = _installed_version("setuptools")
    if version is None:
        return False
    try:
        major, minor = (int(part) for part in version.split(".")[:2])
    except ValueError:
        return False
    return (major, minor) >= (70, 1) or _installed_version("wheel") is not None


def _pip(*args: str) -> None:
    done = subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True,
                          timeout=PIP_TIMEOUT)
    assert done.returncode == 0, f"pip {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"


def _forget_plugin_module() -> None:
    for name in [m for m in sys.modules if m == "llmproxy_stamp" or m.startswith("llmproxy_stamp.")]:
        del sys.modules[name]
    importlib.invalidate_caches()


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """`llmproxy-stamp` installed (not editable) for this module, uninstalled afterwards.

    pip builds from a copy: setuptools writes `build/` and `*.egg-info` beside the sources
    it builds, and the plugin's source directory stays clean."""
    was_installed = _installed_version(DIST) is not None
    source = tmp_path_factory.mktemp("plugin") / "llmproxy-stamp"
    shutil.copytree(PLUGIN_DIR, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    flags = ["--no-build-isolation"] if _can_build_without_isolation() else []
    try:
        _pip("install", "--no-deps", *flags, "-q", str(source))
        _forget_plugin_module()
        yield
    finally:
        if not was_installed:
            _pip("uninstall", "-y", "-q", DIST)
        _forget_plugin_module()


def stamp_config(**deployment: Any) -> dict[str, Any]:
    """The offline mock model behind the stamp middleware."""
    return {"models": [{"name": "mock", "deployments": [{"provider": "mock", **deployment}]}],
            "middlewares": [STAMP]}


async def wait_for_records(proxy: Any, n: int = 1) -> None:
    """The record is emitted when the server's handler ends, just after the last byte."""
    async with asyncio.timeout(2):
        while len(proxy.records) < n:
            await asyncio.sleep(0.005)


CHAT = {"model": "mock", "messages": [{"role": "user", "content": "hi"}]}
MESSAGES = {"model": "mock", "max_tokens": 50, "messages": [{"role": "user", "content": "hi"}]}


# --- found through the entry point ------------------------------------------------------


def test_entry_point_resolves_to_the_installed_distribution(installed: None) -> None:
    registry = Registry.from_entry_points()
    info = registry.middlewares["stamp"]
    assert (info.dist_name, info.dist_version, info.value) == (DIST, "0.1.0", "llmproxy_stamp:Stamp")
    assert info.origin == "llmproxy.middlewares:stamp = llmproxy_stamp:Stamp from llmproxy-stamp 0.1.0"
    cls = registry.middleware("stamp", "middlewares[0].stamp")
    assert cls.__name__ == "Stamp"
    module = Path(sys.modules[cls.__module__].__file__ or "")
    assert PLUGIN_DIR not in module.parents, "imported from the source tree, not the installed package"


# --- through a real proxy ---------------------------------------------------------------


async def test_chat_answer_is_stamped_and_counted(installed: None, make_proxy) -> None:
    proxy = await make_proxy(stamp_config())
    async with aiohttp.ClientSession() as s, s.post(proxy.url + "/v1/chat/completions", json=CHAT) as r:
        body = await r.read()
        assert r.status == 200 and r.headers["x-llmproxy-stamp"] == "v1"
    assert orjson.loads(body)["object"] == "chat.completion"
    await wait_for_records(proxy)
    assert proxy.records[0].extra == {"stamp_chunks": 1, "stamp_bytes": len(body)}


async def test_streamed_answer_is_stamped_and_every_chunk_counted(installed: None, make_proxy) -> None:
    proxy = await make_proxy(stamp_config(chunks=3))
    async with aiohttp.ClientSession() as s, \
            s.post(proxy.url + "/v1/chat/completions", json={**CHAT, "stream": True}) as r:
        body = await r.read()
        assert r.status == 200 and r.headers["x-llmproxy-stamp"] == "v1"
        assert r.headers["content-type"].startswith("text/event-stream")
    events = [e for e in body.split(b"\n\n") if e]
    assert len(events) == 3 + 2 and events[-1] == b"data: [DONE]"  # 3 pieces, the final chunk, [DONE]
    await wait_for_records(proxy)
    rec = proxy.records[0]
    assert rec.extra == {"stamp_chunks": len(events), "stamp_bytes": len(body)}  # the mock: one event a chunk
    assert rec.stream and rec.status == 200 and rec.completion_tokens > 0  # accounting unharmed


async def test_models_listing_is_stamped(installed: None, make_proxy) -> None:
    proxy = await make_proxy(stamp_config())
    async with aiohttp.ClientSession() as s, s.get(proxy.url + "/v1/models") as r:
        assert r.status == 200 and r.headers["x-llmproxy-stamp"] == "v1"
        body = await r.read()
    assert [m["id"] for m in orjson.loads(body)["data"]] == ["mock"]
    await wait_for_records(proxy)
    assert proxy.records[0].extra == {"stamp_chunks": 1, "stamp_bytes": len(body)}  # a bytes body


@pytest.mark.skipif(importlib.util.find_spec("llmproxy.middlewares.subscription") is None
                    or importlib.util.find_spec("llmproxy.middlewares.auth") is None,
                    reason="needs the auth and subscription middlewares")
async def test_the_plugins_subscription_source_is_found_and_used(installed: None, make_proxy) -> None:
    info = Registry.from_entry_points().subscription_sources["plans"]
    assert (info.dist_name, info.value) == (DIST, "llmproxy_stamp.plans:Plans")
    config = {"master_key": MASTER,
              "models": [{"name": "mock", "deployments": [{"provider": "mock"}]},
                         {"name": "other", "deployments": [{"provider": "mock"}]}],
              "middlewares": ["auth", {"subscription": {"source": "plans", "default": {"enabled": False},
                                                        "plans": {"org-1": {"models": ["mock"]}}}}]}
    proxy = await make_proxy(config)
    admin = {"Authorization": f"Bearer {MASTER}"}
    async with aiohttp.ClientSession() as s:
        keys = {}
        for team in ("org-1", "org-2"):
            async with s.post(proxy.url + "/team/new", json={"team_id": team}, headers=admin) as r:
                assert r.status == 200
            async with s.post(proxy.url + "/key/generate", json={"team_id": team}, headers=admin) as r:
                keys[team] = (await r.json())["key"]

        async def status(team: str, model: str) -> tuple[int, Any]:
            async with s.post(proxy.url + "/v1/chat/completions", json={**CHAT, "model": model},
                              headers={"Authorization": f"Bearer {keys[team]}"}) as r:
                return r.status, await r.json()

        assert (await status("org-1", "mock"))[0] == 200
        code, body = await status("org-1", "other")
        assert code == 403 and "subscription" in body["error"]["message"]
        code, body = await status("org-2", "mock")  # the default plan: disabled
        assert code == 403 and body["error"]["code"] == "subscription_disabled"
    with pytest.raises(ConfigError, match="plans"):
        check_config(parse_config({**config, "middlewares": ["auth", {"subscription": {
            "source": "plans", "plans": []}}]}), Registry.from_entry_points())


@pytest.mark.parametrize("path, body, shape", [
    ("/v1/chat/completions", {**CHAT, "user": "mallory"}, "openai"),
    ("/v1/chat/completions", {**CHAT, "user": "mallory", "stream": True}, "openai"),
    ("/v1/messages", {**MESSAGES, "metadata": {"user_id": "mallory"}}, "anthropic"),
])
async def test_blocked_user_is_rejected_with_403(installed: None, make_proxy, path: str, body: dict,
                                                 shape: str) -> None:
    proxy = await make_proxy(stamp_config())
    async with aiohttp.ClientSession() as s, s.post(proxy.url + path, json=body) as r:
        assert r.status == 403
        assert "x-llmproxy-stamp" not in r.headers  # rejected before any answer existed
        err = await r.json()
    if shape == "openai":
        assert err["error"]["type"] == "permission_error" and err["error"]["code"] == "user_blocked"
        assert err["error"]["param"] == "user" and "mallory" in err["error"]["message"]
    else:
        assert err["type"] == "error" and err["error"]["type"] == "permission_error"
    await wait_for_records(proxy)
    rec = proxy.records[0]
    assert (rec.status, rec.error_type, rec.error_code) == (403, "permission_error", "user_blocked")
    assert rec.attempts == [] and rec.extra == {}  # never went upstream


async def test_request_change_is_what_goes_upstream(installed: None, upstream, make_proxy) -> None:
    proxy = await make_proxy(openai_config(upstream, middlewares=[STAMP]))
    auth = {"Authorization": f"Bearer {MASTER}"}
    chat = {"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]}
    msgs = {**MESSAGES, "model": "claude-test"}
    async with aiohttp.ClientSession(headers=auth) as s:
        for path, body in [("/v1/chat/completions", chat), ("/v1/chat/completions", {**chat, "user": "alice"}),
                           ("/v1/messages", msgs)]:
            async with s.post(proxy.url + path, json=body) as r:
                assert r.status == 200 and r.headers["x-llmproxy-stamp"] == "v1"
                await r.read()
    sent = [got.json for got in upstream.requests]
    assert sent[0]["user"] == "v1"  # named by the middleware
    assert sent[1]["user"] == "alice"  # the client's own is kept
    assert sent[2]["metadata"] == {"user_id": "v1"} and "user" not in sent[2]  # Anthropic's field


# --- its options are checked like a built-in's -------------------------------------------


@pytest.mark.parametrize("options, message", [
    ({"colour": "red"}, "middlewares[0].stamp.colour: unknown key (known: header, value, blocked_users)"),
    ({"blocked_users": "mallory"}, "middlewares[0].stamp.blocked_users: expected a list, got 'mallory'"),
    ({"value": 3}, "middlewares[0].stamp.value: expected string, got 3"),
    ({"header": "x stamp"}, "middlewares[0].stamp: header: 'x stamp' is not a valid HTTP header name"),
    ({"value": "v1\r\nx-evil: 1"}, "middlewares[0].stamp: value: must not contain CR, LF or NUL"),
])
def test_bad_options_name_their_path(installed: None, options: dict, message: str) -> None:
    config = parse_config({**stamp_config(), "middlewares": [{"stamp": options}]})
    with pytest.raises(ConfigError) as info:
        check_config(config, Registry.from_entry_points())
    assert info.value.messages == [message]


def test_options_are_built_into_the_dataclass(installed: None) -> None:
    checked = check_config(parse_config(stamp_config()), Registry.from_entry_points())
    [(spec, cls, options)] = checked.middleware_options
    assert options == cls.Options(header="x-llmproxy-stamp", value="v1", blocked_users=("mallory",))


def test_check_config_command_sees_the_plugin(installed: None, tmp_path: Path) -> None:
    good, bad = tmp_path / "good.yaml", tmp_path / "bad.yaml"
    good.write_text(yaml.safe_dump(stamp_config()))
    bad.write_text(yaml.safe_dump({**stamp_config(), "middlewares": [{"stamp": {"colour": "red"}}]}))

    def check(path: Path) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "llmproxy", "check-config", "--config", str(path)],
                              capture_output=True, text=True, timeout=30)

    ok = check(good)
    assert ok.returncode == 0, ok.stderr
    assert "1 middlewares" in ok.stdout
    failed = check(bad)
    assert failed.returncode == 2
    assert "middlewares[0].stamp.colour: unknown key" in failed.stderr


# --- the middleware called directly, as a plugin author would test it -------------------


class Tracked:
    """A body that remembers whether it was closed."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = list(chunks)
        self.closed = False

    def __aiter__(self) -> "Tracked":
        return self

    async def __anext__(self) -> bytes:
        if not self.chunks:
            raise StopAsyncIteration
        return self.chunks.pop(0)

    async def aclose(self) -> None:
        self.closed = True


def _stamp(**options: Any) -> Any:
    from llmproxy_stamp import Stamp

    return Stamp(Stamp.Options(**options), None)


async def test_unread_body_is_still_closed_and_counted_as_zero(installed: None) -> None:
    ctx = make_context(CHAT)
    inner = Tracked([b"a", b"bc"])

    async def call_next(c: Any) -> Any:
        return ok_reply().with_body(inner)

    reply = await _stamp()(ctx, call_next)
    await reply.body.aclose()  # what the writer does when the client left before the first byte
    assert inner.closed
    for cleanup in ctx.cleanups:
        cleanup()
    assert ctx.record.extra == {"stamp_chunks": 0, "stamp_bytes": 0}
    assert ctx.body["user"] == "stamped"  # the default value


async def test_partly_read_body_counts_what_passed(installed: None) -> None:
    ctx = make_context(CHAT)

    async def call_next(c: Any) -> Any:
        return ok_reply().with_body(Tracked([b"a", b"bc", b"def"]))

    reply = await _stamp(header="x-h", value="1")(ctx, call_next)
    assert ("x-h", "1") in reply.headers
    body = reply.body.__aiter__()
    assert [await body.__anext__(), await body.__anext__()] == [b"a", b"bc"]
    for cleanup in ctx.cleanups:
        cleanup()
    assert ctx.record.extra == {"stamp_chunks": 2, "stamp_bytes": 3}


async def test_whole_body_passes_unchanged(installed: None) -> None:
    ctx = make_context(CHAT)

    async def call_next(c: Any) -> Any:
        async def gen() -> AsyncIterator[bytes]:
            yield b"data: 1\n\n"
            yield b"data: 2\n\n"
        return ok_reply().with_body(gen())

    reply = await _stamp()(ctx, call_next)
    assert await collect(reply) == b"data: 1\n\ndata: 2\n\n"
