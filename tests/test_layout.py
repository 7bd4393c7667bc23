"""The layout: `llmproxy/` is the core every deployment runs; each built-in middleware's code
is a package of its own under `middlewares/`. Removing one (its folder and its entry point)
leaves a gateway that installs, starts and serves: the core never imports a middleware
package, no middleware package imports another, and the tests that need one skip without it."""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BUILTIN = ("auth", "subscription", "pii", "scheduler")  # in an order the config accepts
# What another built-in cannot run without: subscription needs an identity middleware (auth)
# before it, so a gateway without auth's package runs without subscription too.
NEEDS = {"subscription": "auth"}


def imports(path: Path, package: str) -> set[str]:
    """Absolute names of the modules `path` imports (relative ones resolved in `package`)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                found.add(f"{base}.{node.module}" if node.module else base)
            else:
                found.add(node.module or "")
    return found


def module_package(path: Path) -> str:
    """The package a source file's relative imports resolve in, as installed."""
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[0] == "middlewares":
        parts = ["llmproxy", *parts]
    return ".".join(parts[:-1])  # a module's package; an __init__.py's is the package itself


def test_the_core_never_imports_a_middleware_package() -> None:
    offenders = []
    for path in sorted((ROOT / "llmproxy").rglob("*.py")):
        for name in imports(path, module_package(path)):
            if name == "llmproxy.middlewares" or name.startswith("llmproxy.middlewares."):
                offenders.append(f"{path.relative_to(ROOT)} imports {name}")
    assert offenders == []


@pytest.mark.parametrize("name", BUILTIN)
def test_a_middleware_package_imports_only_the_core_and_itself(name: str) -> None:
    own = f"llmproxy.middlewares.{name}"
    offenders = []
    for path in sorted((ROOT / "middlewares" / name).rglob("*.py")):
        for imported in imports(path, module_package(path)):
            if imported.startswith("llmproxy.middlewares.") and not (imported == own or imported.startswith(own + ".")):
                offenders.append(f"{path.relative_to(ROOT)} imports {imported}")
    assert offenders == []


@pytest.mark.parametrize("name", BUILTIN)
def test_tests_that_import_a_middleware_say_they_need_it(name: str) -> None:
    """A test module importing a middleware's package at module level does so through
    `pytest.importorskip` first, so the rest of the suite runs without that package."""
    offenders = []
    for path in sorted((ROOT / "tests").glob("test_*.py")):
        tree = ast.parse(path.read_text())
        guarded = False
        for node in tree.body:
            text = ast.unparse(node)
            if "importorskip" in text and f"llmproxy.middlewares.{name}" in text:
                guarded = True
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(f"llmproxy.middlewares.{name}") \
                    and not guarded:
                offenders.append(path.name)
    assert offenders == []


BLOCKED_START = textwrap.dedent("""
    import asyncio, importlib.abc, sys

    class Blocked(importlib.abc.MetaPathFinder):
        def find_spec(self, fullname, path, target=None):
            if fullname == "llmproxy.middlewares.{name}" or fullname.startswith("llmproxy.middlewares.{name}."):
                raise ImportError(f"{{fullname}} is removed for this test")
            return None

    sys.meta_path.insert(0, Blocked())

    import aiohttp
    from aiohttp.test_utils import TestServer
    from llmproxy.config import parse_config
    from llmproxy.plugins import Registry
    from llmproxy.server import Gateway

    async def main():
        registry = Registry.from_entry_points()
        registry.middlewares.pop("{name}", None)  # its entry point goes with its package (if not gone already)
        others = [n for n in {builtin!r} if n != "{name}" and n in registry.middlewares
                  and {needs!r}.get(n) != "{name}"]
        config = parse_config({{"master_key": "sk-master-0123456789", "middlewares": others,
                               "models": [{{"name": "mock", "deployments": [{{"provider": "mock", "model": "m"}}]}}],
                               "database": {{"sqlite_path": sys.argv[1]}}, "server": {{"access_log": False}}}})
        server = TestServer(Gateway(config, registry).app(), host="127.0.0.1")
        await server.start_server()
        try:
            async with aiohttp.ClientSession() as s:
                async with s.post(f"http://127.0.0.1:{{server.port}}/v1/chat/completions",
                                  headers={{"Authorization": "Bearer sk-master-0123456789"}},
                                  json={{"model": "mock", "messages": [{{"role": "user", "content": "hi"}}]}}) as r:
                    assert r.status == 200, await r.text()
                    print("served", others)
        finally:
            await server.close()

    asyncio.run(main())
""")


@pytest.mark.parametrize("name", BUILTIN)
def test_the_gateway_starts_and_serves_without_a_middleware_package(name: str, tmp_path: Path) -> None:
    code = BLOCKED_START.format(name=name, builtin=BUILTIN, needs=NEEDS)
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "db.sqlite")], capture_output=True,
                          text=True, timeout=60, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "served" in done.stdout
    assert f"llmproxy.middlewares.{name}" not in done.stdout.split("served")[-1]
