"""Background work that runs every so often and outlives its own failures.

    task = asyncio.create_task(every(1.0, metrics.drain, "metrics_flush"))

A step that raises is logged (with its traceback the first time, then once a minute with
how many times it failed since) and the loop goes on at the next tick: one bad drain must
not stop the metrics, the access log or a heartbeat for the rest of the process's life.
Cancelling the task stops the loop.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from typing import Any, Awaitable, Callable

import structlog

log = structlog.get_logger("llmproxy.periodic")

REPORT_EVERY = 60.0  # seconds between two reports of a step that keeps failing


async def every(seconds: float, step: Callable[[], Awaitable[Any] | Any], name: str,
                clock: Callable[[], float] = time.monotonic) -> None:
    """Run `step` (a function or a coroutine function) every `seconds`, for ever."""
    failed = 0
    reported_at: float | None = None
    while True:
        await asyncio.sleep(seconds)
        try:
            result = step()
            if inspect.isawaitable(result):
                await result
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            failed += 1
            now = clock()
            if reported_at is None:
                log.exception("periodic_task_failed", task=name)
                reported_at, failed = now, 0
            elif now - reported_at >= REPORT_EVERY:
                log.error("periodic_task_failing", task=name, failures=failed,
                          error=f"{type(exc).__name__}: {exc}")
                reported_at, failed = now, 0
