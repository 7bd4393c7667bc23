"""What a kill -9 loses from the spend log (issue 12), measured rather than assumed.

For each durability (`memory`, the default, and `wal`) and each of --trials runs: start
`llmproxy serve` (the mock model, the embedded SQLite store, the default flush_interval),
keep --c requests in flight for a random time between 1 and 3 s, kill -9 the server in the
middle of that load, start it again on the same files, and count the answered requests
(status 200) that have no spend row once the restarted server has written back what it
found. Prints one line per trial and the median per durability.

    .venv/bin/python bench/kill9.py [--trials 5] [--c 8]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

MASTER = "sk-kill9-master"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(folder: Path, port: int, durability: str) -> subprocess.Popen:
    cfg = folder / "c.yaml"
    cfg.write_text(f"server: {{port: {port}}}\nmaster_key: {MASTER}\nspend: {{durability: {durability}}}\n"
                   "models:\n  - name: mock\n    deployments: [{provider: mock, chunks: 2}]\n")
    proc = subprocess.Popen([sys.executable, "-m", "llmproxy", "serve", "--config", str(cfg)], cwd=folder,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    end = time.monotonic() + 20
    while time.monotonic() < end:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health/liveliness", timeout=1):
                return proc
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise SystemExit("the server did not start")


def rows(port: int) -> set[str]:
    out: set[str] = set()
    page = 1
    while True:
        req = urllib.request.Request(f"http://127.0.0.1:{port}/spend/logs?page_size=1000&page={page}",
                                     headers={"Authorization": f"Bearer {MASTER}"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            body = json.loads(resp.read())
        data = body["data"] if isinstance(body, dict) else body
        out.update(r["request_id"] for r in data)
        if len(data) < 1000:
            return out
        page += 1


async def load(port: int, c: int, seconds: float, proc: subprocess.Popen) -> tuple[set[str], float]:
    """Requests in flight until `seconds`, then the kill; the ids of those answered 200."""
    import aiohttp

    answered: set[str] = set()
    body = {"model": "mock", "messages": [{"role": "user", "content": "x"}]}
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds

    async def one(s: aiohttp.ClientSession) -> None:
        while loop.time() < end:
            try:
                async with s.post(url, json=body, headers={"Authorization": f"Bearer {MASTER}"}) as r:
                    await r.read()
                    if r.status == 200:
                        answered.add(r.headers["x-request-id"])
            except aiohttp.ClientError:
                return

    async with aiohttp.ClientSession() as s:
        tasks = [asyncio.create_task(one(s)) for _ in range(c)]
        await asyncio.sleep(seconds)
        killed = time.monotonic()
        os.kill(proc.pid, signal.SIGKILL)
        await asyncio.gather(*tasks, return_exceptions=True)
    return answered, killed


def trial(durability: str, c: int, rng: random.Random) -> tuple[int, int, float]:
    with tempfile.TemporaryDirectory(prefix="llmproxy-kill9-") as tmp:
        folder = Path(tmp)
        port = free_port()
        proc = serve(folder, port, durability)
        seconds = rng.uniform(1.0, 3.0)
        answered, _ = asyncio.run(load(port, c, seconds, proc))
        proc.wait(timeout=10)
        rate = len(answered) / seconds
        proc = serve(folder, port, durability)
        try:
            end = time.monotonic() + 10  # bounded wait for the write-back of what was left
            kept = rows(port)
            while len(answered - kept) and time.monotonic() < end and durability == "wal":
                time.sleep(0.2)
                kept = rows(port)
            time.sleep(0.5 if durability == "memory" else 0)
            kept = rows(port)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)
        return len(answered), len(answered - kept), rate


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--c", type=int, default=8, help="requests in flight")
    ap.add_argument("--seed", type=int, default=12)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    for durability in ("memory", "wal"):
        lost_s = []
        for i in range(args.trials):
            answered, lost, rate = trial(durability, args.c, rng)
            lost_s.append(lost / rate)
            print(f"{durability:6}  trial {i + 1}: {answered:5} answered ({rate:6.0f}/s), {lost:4} without a row "
                  f"= {lost / rate * 1000:6.0f} ms of requests", flush=True)
        print(f"{durability:6}  median: {statistics.median(lost_s) * 1000:.0f} ms of answered requests lost, "
              f"max {max(lost_s) * 1000:.0f} ms", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
