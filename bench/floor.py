#!/usr/bin/env python3
"""The FLOOR of the llmproxy benchmark: the cheapest honest aiohttp pass-through.

It does what any Python HTTP proxy must do and nothing more: read the request body, POST
it to the upstream (same path, one shared ClientSession, unlimited keep-alive pool), and
copy the response back chunk by chunk with StreamResponse + iter_any(). No JSON parsing,
no auth, no logging, no metrics. The proxy's CPU per request divided by this one's says
what all of llmproxy's features cost on top of the unavoidable HTTP work.

Usage: python bench/floor.py --port 9002 --upstream http://127.0.0.1:9001 [--api-key KEY]

Every POST path is forwarded to <upstream><path> (so /v1/chat/completions and
/v1/messages both work); GET /health/liveliness answers locally.
"""
from __future__ import annotations

import argparse

import aiohttp
from aiohttp import web


def make_app(upstream: str, api_key: str | None) -> web.Application:
    upstream = upstream.rstrip("/")
    session_box: list[aiohttp.ClientSession] = []
    key_headers = {"Authorization": f"Bearer {api_key}", "x-api-key": api_key} if api_key else {}

    async def forward(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        headers = {"Content-Type": request.headers.get("Content-Type", "application/json"),
                   **key_headers}
        async with session_box[0].post(upstream + request.path, data=body,
                                       headers=headers) as up:
            resp = web.StreamResponse(status=up.status)
            resp.content_type = up.content_type
            if up.content_length is not None:
                resp.content_length = up.content_length
            await resp.prepare(request)
            async for chunk in up.content.iter_any():
                await resp.write(chunk)
            await resp.write_eof()
            return resp

    async def liveliness(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def session_ctx(app: web.Application):
        session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=120),
            auto_decompress=False,
        )
        session_box.append(session)
        yield
        await session.close()

    app = web.Application(client_max_size=16 * 1024 * 1024)
    app.cleanup_ctx.append(session_ctx)
    app.router.add_get("/health/liveliness", liveliness)
    app.router.add_post("/{tail:.*}", forward)
    return app


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--upstream", required=True, help="upstream root URL, e.g. http://127.0.0.1:9001")
    ap.add_argument("--api-key", default=None, help="key sent upstream (like a deployment's key)")
    args = ap.parse_args()
    import uvloop

    # backlog as the proxy's (2048): the streams suite opens 1000 connections at once
    web.run_app(make_app(args.upstream, args.api_key), host=args.host, port=args.port,
                access_log=None, print=None, shutdown_timeout=2.0, backlog=2048, loop=uvloop.new_event_loop())


if __name__ == "__main__":
    main()
