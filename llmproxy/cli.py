"""`llmproxy serve | check-config | version` (and `python -m llmproxy`)."""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from typing import Sequence

import structlog

from . import __version__
from .accesslog import configure_logging
from .config import Config, ConfigError, load_config

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
    args = parser.parse_args(argv)

    if args.command == "version":
        print(f"llmproxy {__version__}")
        return 0
    if args.command == "check-config":
        return _check(args.config)
    return _serve(args)


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
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    if not args.worker:
        _banner(config, host, port)
    return asyncio.run(_run(config, host, port, reuse_port=args.worker))


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


async def _run(config: Config, host: str, port: int, reuse_port: bool = False) -> int:
    from aiohttp import web

    from .server import Gateway

    gateway = Gateway(config)
    app = gateway.app()
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None,
                           shutdown_timeout=config.server.graceful_timeout)
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_port=reuse_port or None, backlog=2048)
    await site.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info("serving", host=host, port=port, pid=os.getpid(), models=[m.name for m in config.models],
             middlewares=[m.name for m in config.middlewares])
    await stop.wait()
    # SIGTERM: readiness answers 503 at once; stop accepting; in-flight requests get up to
    # graceful_timeout to finish (aiohttp's shutdown_timeout); then flush and exit 0.
    gateway.draining = True
    log.info("draining", graceful_timeout=config.server.graceful_timeout)
    await runner.cleanup()
    log.info("stopped")
    return 0


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
    procs = [subprocess.Popen(cmd, env=env) for _ in range(config.server.workers)]
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
