#!/usr/bin/env python3
"""Load generator of the llmproxy benchmark (aiohttp client, uvloop).

Sends N POST requests with a fixed body, at most C in flight, reads every response to the
end, checks it, and reports count, errors, wall time and latency percentiles as JSON.

One-shot:
    python bench/load.py --url http://127.0.0.1:4000/v1/chat/completions \
        --n 2000 --c 16 [--stream] [--key sk-... | --keys-file FILE] [--model bench-model]

Server mode (what bench/run.py uses, so the interpreter starts once): read one JSON
command per stdin line, answer one JSON result per stdout line, exit at EOF.
    {"url": ..., "n": 2000, "c": 16, "body": {...}, "headers": {...},
     "check": "openai-json" | "openai-sse" | "anthropic-json" | "anthropic-sse",
     "timeout": 60, "deadline": 600,
     "keys_file": "/path/keys.txt" | "keys": ["sk-...", ...],   # optional, see below
     "key_header": "authorization" | "x-api-key",                 # default authorization
     "ttfb": true,                                                # default: true for *-sse
     "vary": "qzqzqz"}                                            # optional, see below

Vary: each occurrence of the `vary` marker in the serialized body is replaced, per request,
by a word of as many lowercase letters that this process never sent before (the first
request gets "aaaaaa", the next "aaaaab", ..., across all commands), so no two prompts
are the same and no cache along the way can answer one from another. The body keeps its
length.

Keys: with `keys_file` (one key per line; blank lines and lines starting with # are
skipped) or `keys`, request i carries key number i % len(keys): round-robin, so a run of
N >= len(keys) requests uses every key. The key goes in `Authorization: Bearer KEY`
(`key_header: "authorization"`) or in `x-api-key: KEY`, replacing any such header in
`headers`. The result then also holds "keys": how many keys were cycled through.

Time to first byte (`ttfb`, on by default for the stream checks): the time from sending
the request to the first bytes of the response body (for a stream: its first event, not
just the headers). The result then holds "ttfb_ms" (p50, p90, p99, max over the requests),
else null.

The result also holds "open_max": the most responses open at the same time (headers
received, body not yet ended), and "open_max_at_s", when that was first reached: for
long streams at concurrency C, whether all C were really open together.

Checks: status 200 and
    openai-json     a JSON object with a non-empty "choices" list
    openai-sse      the body ends with "data: [DONE]"
    anthropic-json  a JSON object with "type": "message"
    anthropic-sse   the last event is message_stop
"""
from __future__ import annotations

import argparse
import asyncio
import sys
import time

import aiohttp
import orjson

MAX_ERROR_SAMPLES = 5


def _check(kind: str, status: int, data: bytes) -> str | None:
    """None when the response is good, else a short reason."""
    if status != 200:
        return f"HTTP {status}: {data[:200]!r}"
    if kind == "openai-sse":
        if not data.rstrip().endswith(b"data: [DONE]"):
            return f"stream does not end with data: [DONE]: ...{data[-200:]!r}"
        return None
    if kind == "anthropic-sse":
        if b"event: message_stop" not in data[-300:]:
            return f"stream does not end with message_stop: ...{data[-200:]!r}"
        return None
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError:
        return f"not JSON: {data[:200]!r}"
    if kind == "openai-json":
        if not isinstance(obj, dict) or not obj.get("choices"):
            return f"no choices: {data[:200]!r}"
    elif kind == "anthropic-json":
        if not isinstance(obj, dict) or obj.get("type") != "message":
            return f"not a message: {data[:200]!r}"
    return None


def read_keys(path: str) -> list[str]:
    with open(path) as f:
        keys = [ln.strip() for ln in f]
    keys = [k for k in keys if k and not k.startswith("#")]
    if not keys:
        raise ValueError(f"{path}: no keys")
    return keys


def headers_per_key(headers: dict, keys: list[str], key_header: str) -> list[dict]:
    """One header dict per key: `headers` with its auth header replaced by that key."""
    key_header = key_header.lower()
    if key_header not in ("authorization", "x-api-key"):
        raise ValueError(f"key_header must be 'authorization' or 'x-api-key', not {key_header!r}")
    base = {k: v for k, v in headers.items() if k.lower() not in ("authorization", "x-api-key")}
    if key_header == "authorization":
        return [{**base, "Authorization": f"Bearer {k}"} for k in keys]
    return [{**base, "x-api-key": k} for k in keys]


def _percentile(sorted_values: list[float], q: float) -> float | None:
    if not sorted_values:
        return None
    idx = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[idx]


_varied = [0]  # words handed out by this process (it serves many commands): never reused


def unique_word(i: int, width: int) -> bytes:
    """Request i's word: i in base 26, written with a-z, `width` letters."""
    out = bytearray(b"a" * width)
    for pos in range(width - 1, -1, -1):
        i, digit = divmod(i, 26)
        out[pos] += digit
    return bytes(out)


async def run_load(cmd: dict) -> dict:
    url: str = cmd["url"]
    n = int(cmd["n"])
    c = max(1, min(int(cmd.get("c", 16)), n if n > 0 else 1))
    body = orjson.dumps(cmd["body"])
    marker = str(cmd.get("vary") or "").encode()
    headers = {"Content-Type": "application/json", **cmd.get("headers", {})}
    keys = cmd.get("keys") or (read_keys(cmd["keys_file"]) if cmd.get("keys_file") else None)
    # request i sends per_key[i % len]: round-robin over the keys (one dict: no keys given)
    per_key = headers_per_key(headers, keys, cmd.get("key_header", "authorization")) if keys else [headers]
    n_heads = len(per_key)
    kind = cmd.get("check", "openai-json")
    want_ttfb = bool(cmd.get("ttfb", kind.endswith("-sse")))
    timeout = aiohttp.ClientTimeout(total=float(cmd.get("timeout", 60)))
    deadline = float(cmd.get("deadline", 600))

    next_index = 0
    ok = 0
    errors = 0
    error_samples: list[str] = []
    latencies: list[float] = []
    ttfbs: list[float] = []
    bytes_in = 0
    open_now = 0      # responses whose headers arrived and whose body has not ended yet
    open_max = 0
    open_max_at = None

    def note(reason: str) -> None:
        if len(error_samples) < MAX_ERROR_SAMPLES and reason not in error_samples:
            error_samples.append(reason)

    def record_error(reason: str) -> None:
        nonlocal errors
        errors += 1
        note(reason)

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal next_index, ok, bytes_in, open_now, open_max, open_max_at
        while next_index < n:  # bounded: every pass takes one of the n indices
            hdrs = per_key[next_index % n_heads]
            if marker:
                payload = body.replace(marker, unique_word(_varied[0], len(marker)))
                _varied[0] += 1
            else:
                payload = body
            next_index += 1
            t0 = time.perf_counter()
            try:
                async with session.post(url, data=payload, headers=hdrs) as resp:
                    status = resp.status
                    open_now += 1
                    if open_now > open_max:
                        open_max, open_max_at = open_now, time.perf_counter()
                    try:
                        if want_ttfb:
                            first = await resp.content.readany()  # b"" only at the end of the body
                            t_first = time.perf_counter()
                            data = first + await resp.content.read()
                        else:
                            data = await resp.read()
                    finally:
                        open_now -= 1
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # connection refused/reset, timeout, ...
                record_error(f"{type(exc).__name__}: {exc}"[:300])
                continue
            latencies.append(time.perf_counter() - t0)
            if want_ttfb and data:
                ttfbs.append(t_first - t0)
            bytes_in += len(data)
            reason = _check(kind, status, data)
            if reason is None:
                ok += 1
            else:
                record_error(reason)

    connector = aiohttp.TCPConnector(limit=0)
    t_start = time.perf_counter()
    async with aiohttp.ClientSession(connector=connector, timeout=timeout,
                                     auto_decompress=False) as session:
        tasks = [asyncio.ensure_future(worker(session)) for _ in range(c)]
        done, pending = await asyncio.wait(tasks, timeout=deadline)
        for t in pending:
            t.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
            note(f"deadline of {deadline:.0f}s reached")
        for t in done:
            if t.exception() is not None:
                note(f"worker crashed: {t.exception()!r}"[:300])
    wall = time.perf_counter() - t_start

    unfinished = n - ok - errors
    if unfinished > 0:  # cut off by the deadline or a crash: count as errors
        errors += unfinished
    latencies.sort()
    ttfbs.sort()
    return {
        "url": url,
        "n": n,
        "c": c,
        "keys": len(keys) if keys else None,
        "ok": ok,
        "errors": errors,
        "error_samples": error_samples,
        "wall_s": wall,
        "rps": ok / wall if wall > 0 else None,
        "bytes_in": bytes_in,
        # most responses open at once (headers in, body not ended), and when (s after start)
        "open_max": open_max,
        "open_max_at_s": round(open_max_at - t_start, 3) if open_max_at is not None else None,
        "latency_ms": {
            "p50": _ms(_percentile(latencies, 0.50)),
            "p90": _ms(_percentile(latencies, 0.90)),
            "p99": _ms(_percentile(latencies, 0.99)),
            "max": _ms(latencies[-1] if latencies else None),
        },
        "ttfb_ms": {
            "p50": _ms(_percentile(ttfbs, 0.50)),
            "p90": _ms(_percentile(ttfbs, 0.90)),
            "p99": _ms(_percentile(ttfbs, 0.99)),
            "max": _ms(ttfbs[-1] if ttfbs else None),
            "count": len(ttfbs),
        } if want_ttfb else None,
    }


def _ms(v: float | None) -> float | None:
    return None if v is None else round(v * 1000.0, 3)


def serve(loop: asyncio.AbstractEventLoop) -> None:
    for line in sys.stdin:  # bounded by the commands the harness sends; ends at EOF
        line = line.strip()
        if not line:
            continue
        try:
            result = loop.run_until_complete(run_load(orjson.loads(line)))
        except Exception as exc:
            result = {"fatal": f"{type(exc).__name__}: {exc}"}
        sys.stdout.write(orjson.dumps(result).decode() + "\n")
        sys.stdout.flush()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--serve", action="store_true", help="read JSON commands from stdin")
    ap.add_argument("--url")
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--c", type=int, default=16)
    ap.add_argument("--stream", action="store_true")
    ap.add_argument("--key", default=None, help="sent as Authorization: Bearer KEY")
    ap.add_argument("--keys-file", default=None,
                    help="one key per line, used round-robin (one per request) instead of --key")
    ap.add_argument("--model", default="bench-model")
    ap.add_argument("--timeout", type=float, default=60.0, help="per request, seconds")
    args = ap.parse_args()
    import uvloop

    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        if args.serve:
            serve(loop)
            return
        if not args.url:
            ap.error("--url is required (or --serve)")
        body: dict = {"model": args.model, "messages": [{"role": "user", "content": "hello"}]}
        if args.stream:
            body["stream"] = True
        cmd = {
            "url": args.url, "n": args.n, "c": args.c, "body": body,
            "headers": {"Authorization": f"Bearer {args.key}"} if args.key else {},
            "check": "openai-sse" if args.stream else "openai-json",
            "timeout": args.timeout,
        }
        if args.keys_file:
            cmd["keys_file"] = args.keys_file
        result = loop.run_until_complete(run_load(cmd))
        print(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode())
        sys.exit(1 if result["errors"] else 0)
    finally:
        loop.close()


if __name__ == "__main__":
    main()
