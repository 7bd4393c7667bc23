"""`llmproxy serve | check-config | migrate | keys create|list|revoke | version` (and
`python -m llmproxy`)."""

from __future__ import annotations

import argparse
import asyncio
import errno
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from contextlib import asynccontextmanager
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, AsyncIterator, Sequence

import structlog

from . import __version__
from .accesslog import configure_logging
from .config import Config, ConfigError, load_config

if TYPE_CHECKING:
    from .store import Store

log = structlog.get_logger("llmproxy")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llmproxy", description="A fast, self-hosted LLM gateway.")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the gateway")
    serve.add_argument("--config", "-c", help="YAML config file (default: the offline mock setup)")
    serve.add_argument("--host", help="override server.host")
    serve.add_argument("--port", type=int, help="override server.port")
    serve.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    check = sub.add_parser("check-config", help="validate a config file without serving")
    check.add_argument("--config", "-c", required=True)
    sub.add_parser("version", help="print the version")
    migrate = sub.add_parser("migrate", help="apply the database migrations the config's database lacks")
    migrate.add_argument("--config", "-c", help="YAML config file (default: SQLite ./llmproxy.db)")
    _key_parsers(sub)
    _team_parsers(sub)
    args = parser.parse_args(argv)

    if args.command == "version":
        print(f"llmproxy {__version__}")
        return 0
    if args.command == "check-config":
        return _check(args.config)
    if args.command in ("migrate", "keys", "teams"):
        return _store_command(args)
    return _serve(args)


def _key_parsers(sub: Any) -> None:
    keys = sub.add_parser("keys", help="create, list and revoke virtual keys").add_subparsers(
        dest="keys_command", required=True)
    create = keys.add_parser("create", help="create a key and print it (once)")
    listing = keys.add_parser("list", help="list keys (never the keys themselves)")
    revoke = keys.add_parser("revoke", help="delete keys, named by key or id")
    for p in (create, listing, revoke):
        p.add_argument("--config", "-c", help="YAML config file (default: SQLite ./llmproxy.db)")
    create.add_argument("--alias")
    create.add_argument("--team", help="an existing team id")
    create.add_argument("--user")
    create.add_argument("--models", help="comma-separated model names (default: every model)")
    create.add_argument("--duration", help="lifetime such as 30s, 10m, 24h, 7d (default: no expiry)")
    _limit_arguments(create, "/key/generate")
    listing.add_argument("--team")
    listing.add_argument("--user")
    revoke.add_argument("refs", nargs="+", metavar="KEY_OR_ID")


def _limit_arguments(create: Any, endpoint: str) -> None:
    """The budget and rate-limit options keys and teams share, and --json."""
    create.add_argument("--max-budget", type=float, help="USD")
    create.add_argument("--budget-duration", help="budget period such as 1d, 30d")
    create.add_argument("--rpm", type=int)
    create.add_argument("--tpm", type=int)
    create.add_argument("--max-parallel", type=int)
    create.add_argument("--json", action="store_true", help=f"print the {endpoint} answer as JSON")


def _team_parsers(sub: Any) -> None:
    teams = sub.add_parser("teams", help="create, list and delete teams").add_subparsers(
        dest="teams_command", required=True)
    create = teams.add_parser("create", help="create a team and print its id")
    listing = teams.add_parser("list", help="list teams with their limits and number of keys")
    delete = teams.add_parser("delete", help="delete teams and every key in them")
    for p in (create, listing, delete):
        p.add_argument("--config", "-c", help="YAML config file (default: SQLite ./llmproxy.db)")
    create.add_argument("--id", help="the team id (default: a new uuid)")
    create.add_argument("--alias")
    create.add_argument("--models", help="comma-separated model names (default: every model)")
    _limit_arguments(create, "/team/new")
    delete.add_argument("team_ids", nargs="+", metavar="TEAM_ID")


def _load(path: str | None) -> Config:
    from .plugins import Registry, check_config

    config = load_config(path)
    check_config(config, Registry.from_entry_points())
    return config


def _check(path: str) -> int:
    try:
        config = _load(path)
    except ConfigError as exc:
        print(f"{path}: invalid config\n{exc}", file=sys.stderr)
        return 2
    print(f"{path}: ok ({len(config.models)} models, {len(config.middlewares)} middlewares)")
    return 0


# --- migrate, keys: the store directly, through the admin API's own code paths ---------------


def _store_command(args: argparse.Namespace) -> int:
    from .errors import ProxyError
    from .store import StoreUnavailable
    from .store.base import AlreadyExists

    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"{args.config or 'default config'}: invalid config\n{exc}", file=sys.stderr)
        return 2
    command = (_migrate if args.command == "migrate" else _KEY_COMMANDS[args.keys_command]
               if args.command == "keys" else _TEAM_COMMANDS[args.teams_command])
    try:
        return asyncio.run(command(config, args))
    except StoreUnavailable as exc:
        print(f"database unavailable: {exc}", file=sys.stderr)
        return 1
    except ProxyError as exc:  # a bad option, in the admin API's words
        print(exc.message, file=sys.stderr)
        return 2
    except AlreadyExists as exc:
        print(f"{_where(config)}: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:  # e.g. an unsupported database_url scheme
        print(str(exc), file=sys.stderr)
        return 2


def _where(config: Config) -> str:
    from .store.postgres import where

    if config.database_url is None:
        return f"sqlite {config.database.sqlite_path}"
    if config.database_url.lower().startswith("sqlite"):
        return config.database_url
    return f"postgresql {where(config.database_url)}"


@asynccontextmanager
async def _opened(config: Config, migrate: bool = True) -> AsyncIterator["Store"]:
    from .store import open_store

    store = await open_store(config.database_url, sqlite_path=config.database.sqlite_path,
                             statement_cache=config.database.statement_cache)
    try:
        if migrate:  # as `serve` does at start: a fresh database works at once
            await store.migrate()
        yield store
    finally:
        await store.close()


async def _migrate(config: Config, args: argparse.Namespace) -> int:
    async with _opened(config, migrate=False) as store:
        applied = await store.migrate()
    print(f"{_where(config)}: " + (f"applied {', '.join(applied)}" if applied else "up to date"))
    return 0


async def _keys_create(config: Config, args: argparse.Namespace) -> int:
    import orjson

    from decimal import Decimal

    from .admin import KEY_FIELDS, check, create_key, key_view

    given = {"key_alias": args.alias, "team_id": args.team, "user_id": args.user, "duration": args.duration,
             "models": None if args.models is None else [m.strip() for m in args.models.split(",") if m.strip()],
             "max_budget": args.max_budget, "budget_duration": args.budget_duration, "rpm_limit": args.rpm,
             "tpm_limit": args.tpm, "max_parallel_requests": args.max_parallel}
    fields = check(KEY_FIELDS, {name: value for name, value in given.items() if value is not None})
    now = datetime.now(timezone.utc)
    async with _opened(config) as store:
        plaintext, info = await create_key(store, fields, now)
    if args.json:
        print(orjson.dumps({"key": plaintext, **key_view(info, now, Decimal(0))}).decode())
        return 0
    expires = info.expires_at.isoformat() if info.expires_at else "never"
    print(f"key:     {plaintext}\nid:      {info.id}\nexpires: {expires}")
    print("The key is shown only this once: store it now.", file=sys.stderr)
    return 0


async def _all_keys(store: "Store", team: str | None = None, user: str | None = None) -> list[Any]:
    found, page = [], 1
    while True:
        batch = await store.list_keys(team, user, page=page, page_size=1000)
        found += batch
        if len(batch) < 1000:
            return found
        page += 1


async def _keys_list(config: Config, args: argparse.Namespace) -> int:
    async with _opened(config) as store:
        found = await _all_keys(store, args.team, args.user)
    now = datetime.now(timezone.utc)
    print(f"{_where(config)}: {len(found)} key{'' if len(found) == 1 else 's'}", file=sys.stderr)
    rows = [("ID", "ALIAS", "TEAM", "USER", "MODELS", "EXPIRES", "BLOCKED")]
    for k in found:
        expires = k.expires_at.isoformat(timespec="seconds") if k.expires_at else "never"
        if k.expires_at is not None and k.expires_at <= now:
            expires += " (expired)"
        rows.append((k.id[:12], k.key_alias or "-", k.team_id or "-", k.user_id or "-",
                     ",".join(k.models) or "*", expires, "yes" if k.blocked else "no"))
    _table(rows)
    return 0


async def _keys_revoke(config: Config, args: argparse.Namespace) -> int:
    from . import keys
    from .admin import delete_keys, key_id
    from .invalidation import Invalidator
    from .services import open_redis

    redis = open_redis(config.redis_url) if config.redis_url else None
    refs: dict[str, str] = {}  # what was named -> the id it names
    problems = 0
    try:
        async with _opened(config) as store:
            every = None
            for ref in args.refs:
                if _ID_PREFIX.fullmatch(ref):  # the short id `keys list` prints: a unique prefix
                    every = every if every is not None else [k.id for k in await _all_keys(store)]
                    matches = [i for i in every if i.startswith(ref)]
                    if len(matches) == 1:
                        refs[ref] = matches[0]
                        continue
                    problems += 1
                    if matches:
                        print(f"ambiguous: {ref} is the start of {len(matches)} keys: "
                              + ", ".join(m[:16] for m in matches[:10]), file=sys.stderr)
                    else:
                        print(f"not found: {ref}", file=sys.stderr)
                    continue
                refs[ref] = key_id(ref)
            # With Redis, every replica's auth cache drops the keys at once; without, a
            # running server still stops accepting them within its auth cache_ttl.
            deleted = set(await delete_keys(store, list(refs.values()), Invalidator(redis) if redis else None))
    finally:
        if redis is not None:
            await redis.aclose()
    missing = problems
    for ref, ident in refs.items():
        shown = ident if ident == ref else (ref if _ID_PREFIX.fullmatch(ref) else keys.display(ref))
        if ident in deleted:
            print(f"deleted {ident}" + ("" if ident == ref else f" ({shown})"))
        else:
            missing += 1
            print(f"not found: {shown}", file=sys.stderr)
    if deleted:
        print(f"{_where(config)}: {len(deleted)} deleted; " + (
            "running servers were told through Redis" if redis is not None else
            "without redis_url, running servers stop accepting them within their auth cache_ttl (30 s by default)"),
            file=sys.stderr)
    return 1 if missing else 0


_ID_PREFIX = re.compile(r"[0-9a-f]{6,63}")  # shorter than a whole id (64), long enough to mean one


_KEY_COMMANDS = {"create": _keys_create, "list": _keys_list, "revoke": _keys_revoke}


def _table(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())


async def _teams_create(config: Config, args: argparse.Namespace) -> int:
    import orjson

    from .admin import TEAM_NEW, check, create_team, team_view
    from .invalidation import Invalidator

    given = {"team_id": args.id, "team_alias": args.alias,
             "models": None if args.models is None else [m.strip() for m in args.models.split(",") if m.strip()],
             "max_budget": args.max_budget, "budget_duration": args.budget_duration, "rpm_limit": args.rpm,
             "tpm_limit": args.tpm, "max_parallel_requests": args.max_parallel}
    fields = check(TEAM_NEW, {name: value for name, value in given.items() if value is not None})
    now = datetime.now(timezone.utc)
    async with _redis(config) as redis, _opened(config) as store:
        info = await create_team(store, fields, now, Invalidator(redis) if redis is not None else None)
    if args.json:
        from decimal import Decimal

        print(orjson.dumps(team_view(info, now, Decimal(0))).decode())
        return 0
    print(f"team:    {info.team_id}" + (f" ({info.team_alias})" if info.team_alias else ""))
    print(f"{_where(config)}: created; give it keys with: llmproxy keys create --team {info.team_id}",
          file=sys.stderr)
    return 0


async def _teams_list(config: Config, args: argparse.Namespace) -> int:
    found, page = [], 1
    async with _opened(config) as store:
        while True:
            batch = await store.list_teams(page=page, page_size=1000)
            found += batch
            if len(batch) < 1000:
                break
            page += 1
        counts = [await store.count_keys(team_id=t.team_id) for t in found]
    print(f"{_where(config)}: {len(found)} team{'' if len(found) == 1 else 's'}", file=sys.stderr)
    rows = [("ID", "ALIAS", "MODELS", "BUDGET", "RPM", "TPM", "PARALLEL", "KEYS", "BLOCKED")]
    for t, n in zip(found, counts):
        budget = "-" if t.max_budget is None else (
            f"${t.max_budget.normalize():f}" + (f"/{t.budget_duration}" if t.budget_duration else ""))
        rows.append((t.team_id, t.team_alias or "-", ",".join(t.models) or "*", budget,
                     str(t.rpm_limit or "-"), str(t.tpm_limit or "-"), str(t.max_parallel_requests or "-"),
                     str(n), "yes" if t.blocked else "no"))
    _table(rows)
    return 0


async def _teams_delete(config: Config, args: argparse.Namespace) -> int:
    from .admin import delete_teams
    from .invalidation import Invalidator

    team_ids = list(dict.fromkeys(args.team_ids))
    async with _redis(config) as redis, _opened(config) as store:
        deleted_keys = await delete_teams(store, team_ids, Invalidator(redis) if redis is not None else None)
    for team_id in team_ids:
        print(f"deleted team {team_id}")
    print(f"{_where(config)}: {len(team_ids)} team{'' if len(team_ids) == 1 else 's'} and "
          f"{len(deleted_keys)} key{'' if len(deleted_keys) == 1 else 's'} deleted; " + (
              "running servers were told through Redis" if redis is not None else
              "without redis_url, running servers stop accepting the keys within their auth cache_ttl "
              "(30 s by default)"), file=sys.stderr)
    return 0


@asynccontextmanager
async def _redis(config: Config) -> AsyncIterator[Any]:
    from .services import open_redis

    redis = open_redis(config.redis_url) if config.redis_url else None
    try:
        yield redis
    finally:
        if redis is not None:
            await redis.aclose()


_TEAM_COMMANDS = {"create": _teams_create, "list": _teams_list, "delete": _teams_delete}


def _serve(args: argparse.Namespace) -> int:
    configure_logging()
    try:
        config = _load(args.config)
    except ConfigError as exc:
        print(f"{args.config or 'default config'}: invalid config\n{exc}", file=sys.stderr)
        return 2
    host = args.host or config.server.host
    port = args.port or config.server.port
    workers = config.server.workers
    if workers > 1 and not args.worker:
        return _supervise(args, config, host, port)
    from .errorreports import install

    install(config)  # with SENTRY_DSN: 500s and error lines reported, scrubbed
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    return asyncio.run(_run(config, host, port, reuse_port=args.worker, banner=not args.worker))


def _banner(config: Config, host: str, port: int) -> None:
    model = config.models[0].name
    shown = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    key = ' -H "Authorization: Bearer $LLMPROXY_MASTER_KEY"' if config.master_key else ""
    print(f"llmproxy {__version__} listening on http://{host}:{port}", file=sys.stderr)
    if config.source is None:
        print("no config given: serving the offline 'mock' model on 127.0.0.1 only", file=sys.stderr)
    print(f"try:\n  curl -s http://{shown}:{port}/v1/chat/completions -H 'Content-Type: application/json'{key} "
          f"-d '{{\"model\": \"{model}\", \"messages\": [{{\"role\": \"user\", \"content\": \"Hello\"}}]}}'",
          file=sys.stderr, flush=True)


async def _run(config: Config, host: str, port: int, reuse_port: bool = False, banner: bool = True) -> int:
    from aiohttp import web

    from .server import Gateway
    from .store import StoreError

    gateway = Gateway(config)
    app = gateway.app()
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None,
                           shutdown_timeout=config.server.graceful_timeout)
    admin_runner = None
    try:  # what can fail at start (the database, a port) is one line and exit status 2
        await runner.setup()
        site = web.TCPSite(runner, host, port, reuse_port=reuse_port or None, backlog=2048)
        await site.start()
        if config.server.admin_port is not None:  # the admin API on its own port, and only there
            admin_runner = web.AppRunner(gateway.admin.app(), access_log=None)
            await admin_runner.setup()
            await web.TCPSite(admin_runner, host, config.server.admin_port, reuse_port=reuse_port or None).start()
    except (StoreError, OSError, ValueError, ConfigError) as exc:
        print(f"llmproxy: cannot start: {_start_failure(exc, host, port, config)}", file=sys.stderr, flush=True)
        for r in (admin_runner, runner):
            if r is not None:
                try:
                    await r.cleanup()
                except Exception:  # half started: release what can be released, say nothing more
                    pass
        return 2
    if banner:
        _banner(config, host, port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info("serving", host=host, port=port, pid=os.getpid(), models=[m.name for m in config.models],
             middlewares=[m.name for m in config.middlewares])
    await stop.wait()
    # SIGTERM: readiness answers 503 at once; for drain_delay the listener still accepts; then
    # it stops accepting, in-flight requests get up to graceful_timeout to finish (aiohttp's
    # shutdown_timeout; a stream cut then is recorded as server_shutdown); flush and exit 0.
    gateway.draining = True
    log.info("draining", drain_delay=config.server.drain_delay, graceful_timeout=config.server.graceful_timeout)
    if config.server.drain_delay:  # readiness says 503; new requests are still served meanwhile
        await asyncio.sleep(config.server.drain_delay)
    if admin_runner is not None:
        await admin_runner.cleanup()
    await runner.cleanup()
    log.info("stopped")
    return 0


def _start_failure(exc: BaseException, host: str, port: int, config: Config) -> str:
    """One line saying what stopped the start: never a traceback, never a password."""
    if isinstance(exc, OSError) and exc.errno == errno.EADDRINUSE:
        ports = f"{port}" if config.server.admin_port is None else f"{port} or {config.server.admin_port}"
        return f"{host}:{ports} is already in use (another llmproxy? set server.port or --port)"
    if isinstance(exc, OSError) and exc.errno == errno.EADDRNOTAVAIL:
        return f"cannot listen on {host}: no such address on this machine"
    text = str(exc) or type(exc).__name__
    return text.splitlines()[0]


def _supervise(args: argparse.Namespace, config: Config, host: str, port: int) -> int:
    """`workers` > 1: that many processes share the port (SO_REUSEPORT); metrics are kept in a
    shared directory so that `/metrics` of any worker sums all of them."""
    if not hasattr(socket, "SO_REUSEPORT"):
        print("server.workers > 1 needs SO_REUSEPORT, which this platform lacks", file=sys.stderr)
        return 2
    if not config.redis_url:
        log.warning("per_process_limits", workers=config.server.workers,
                    detail="without redis_url every limit and budget is per worker process")
    mpdir = tempfile.mkdtemp(prefix="llmproxy-metrics-")
    env = dict(os.environ, PROMETHEUS_MULTIPROC_DIR=mpdir)
    cmd = [sys.executable, "-m", "llmproxy", "serve", "--worker", "--host", host, "--port", str(port)]
    if args.config:
        cmd += ["--config", args.config]
    _banner(config, host, port)
    n = config.server.workers
    procs = [subprocess.Popen(cmd, env=dict(env, LLMPROXY_WORKER=f"{i}/{n}")) for i in range(n)]
    stopping = False

    def forward(signum, frame):
        nonlocal stopping
        stopping = True
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    code = 0
    try:
        while True:
            for p in procs:
                rc = p.poll()
                if rc is not None and not stopping:
                    log.error("worker_exited", pid=p.pid, returncode=rc)
                    forward(None, None)
                    code = rc or 1
            if all(p.poll() is not None for p in procs):
                break
            signal.sigtimedwait([], 0.2) if hasattr(signal, "sigtimedwait") else None
            import time as _t
            _t.sleep(0.2)
    finally:
        shutil.rmtree(mpdir, ignore_errors=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
