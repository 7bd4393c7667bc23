"""One deployment's queue: who waits, in what order, who starts next, who is refused.

Order: tenants (teams; a key without a team is its own tenant) take turns, round-robin;
within a tenant, first come first served. The service order of what is queued is rounds:
every tenant's first waiter in ring order, then every tenant's second, and so on; a tenant
that is served moves to the end of the ring.

`pump` walks that order once and, for each waiter:
- starts it when every bucket has room (taking its units) - unless taking them would push
  a waiter ahead of it, blocked on this deployment, past its deadline: a small request may
  pass a large one only within the large one's slack;
- otherwise predicts when it would start: for the deployment's buckets, from what the
  blocked waiters ahead of it (and itself) need and the refill rate; for its own key/team
  buckets, likewise over its tenant's waiters. A waiter whose predicted start is past its
  deadline is refused now, not when the deadline comes; a full-queue refusal happens at
  enqueue. A waiter held by a parallel cap has no prediction: its deadline decides.
A waiter held by its own tenant's limits never holds up other tenants.

The pump runs on every enqueue, cancellation and release, and on a timer set for the next
moment something can change (a predicted start, a deadline, the end of a provider pause).
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from typing import TYPE_CHECKING, Any

from .limits import DEPLOYMENT, REQUESTS, Demand, Limit, Parallel

if TYPE_CHECKING:
    from .admission import RateScheduler

_EPS = 1e-9
PAUSED = "paused"  # blocked: the provider said to hold off
SLACK = "slack"  # blocked: would push an earlier waiter past its deadline


class Waiter:
    """One request waiting in a lane; `future` gets the lease or the refusal."""

    __slots__ = ("demand", "model", "future", "enqueued", "deadline", "block", "eta", "not_before", "held")

    def __init__(self, demand: Demand, model: str, now: float, deadline: float) -> None:
        self.demand = demand
        self.model = model
        self.future: asyncio.Future = asyncio.get_running_loop().create_future()
        self.enqueued = now
        self.deadline = deadline
        self.block: Any = None  # what held it at the last pump
        self.eta = 0.0  # predicted seconds to start, at the last pump
        self.not_before = -math.inf  # shared buckets only: a parallel cap full on other replicas
        self.held: Any = None  # ... that cap


class Refusal(Exception):
    """A waiter turned away: why, by which limit, and when to come back."""

    def __init__(self, reason: str, block: Any, retry_after: float) -> None:
        super().__init__(reason)
        self.reason, self.block, self.retry_after = reason, block, retry_after


def reason_of(block: Any) -> str:
    if isinstance(block, Parallel):
        return "parallel"
    if isinstance(block, Limit) and block.owner != DEPLOYMENT:
        return "tenant_rpm" if block.unit == REQUESTS else "tenant_tpm"
    return "wait_too_long"


def _deployment_level(block: Any) -> bool:
    return block is PAUSED or block is SLACK or (isinstance(block, Limit) and block.owner == DEPLOYMENT)


class Lane:
    def __init__(self, dep: Any, limits: tuple[Limit, ...], sched: "RateScheduler") -> None:
        self.dep = dep
        self.limits = limits
        self.sched = sched
        self.label = (dep.id,)
        self.tenants: dict[str, deque[Waiter]] = {}
        self.size = 0
        self.paused_until = -math.inf
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf

    # -- membership

    def enqueue(self, w: Waiter, front: bool = False) -> None:
        """Add a waiter (`front`: a waiter the shared buckets turned back keeps its place).
        A full queue refuses the newcomer - unless another tenant holds more places than
        the newcomer's would after joining: then that tenant's newest waiter is refused
        instead, so a flood from one tenant cannot keep the others out of the queue."""
        cap = self.dep.max_queue_size
        if not front and self.size >= cap:
            mine = len(self.tenants.get(w.demand.tenant, ()))
            fattest = max(self.tenants.values(), key=len, default=None)
            if cap == 0 or fattest is None or len(fattest) <= mine + 1:
                raise Refusal("queue_full", None, self._queue_eta())
            self._drop(fattest[-1], Refusal("queue_full", None, self._queue_eta()))
        q = self.tenants.get(w.demand.tenant)
        if q is None:
            q = self.tenants[w.demand.tenant] = deque()
        if front:
            q.appendleft(w)
        else:
            q.append(w)
        self.size += 1
        self.sched.queue_depth(self, 1)

    def cancel(self, w: Waiter) -> None:
        """The waiting client went away: leave at once; others may now start sooner."""
        if self._remove(w):
            self.pump()

    def _remove(self, w: Waiter) -> bool:
        q = self.tenants.get(w.demand.tenant)
        if q is None:
            return False
        try:
            q.remove(w)
        except ValueError:
            return False
        if not q:
            del self.tenants[w.demand.tenant]
        self.size -= 1
        self.sched.queue_depth(self, -1)
        return True

    def _drop(self, w: Waiter, refusal: Refusal) -> None:
        if self._remove(w) and not w.future.done():
            w.future.set_exception(refusal)

    def _queue_eta(self) -> float:
        return max((w.eta for q in self.tenants.values() for w in q), default=0.0)

    def order(self) -> list[Waiter]:
        queues = list(self.tenants.values())
        out: list[Waiter] = []
        depth = max((len(q) for q in queues), default=0)
        for r in range(depth):
            out.extend(q[r] for q in queues if r < len(q))
        return out

    # -- dispatch

    def pump(self) -> None:
        if not self.size:
            self._cancel_timer()
            return
        sched = self.sched
        table = sched.table
        now = sched.clock()
        paused = self.paused_until > now
        cum: dict[str, float] = {}  # deployment limit id -> units the blocked waiters so far need
        slack: dict[str, float] = {}  # deployment limit id -> units others may still take now
        tcum: dict[str, float] = {}  # tenant limit id -> units its blocked waiters so far need
        stuck: dict[str, Any] = {}  # tenant -> the block of its first waiter that did not start
        started: list[Waiter] = []
        refused: list[tuple[Waiter, Refusal]] = []
        wake = math.inf
        for w in self.order():
            d = w.demand
            block = stuck.get(d.tenant)
            if block is None:
                if paused:
                    block = PAUSED
                elif w.not_before > now:
                    block = w.held
                else:
                    block, _ = table.blocking(d, now)
                    if block is None:
                        if self._within(d, slack):
                            table.take(d, now)
                            for lim, n in zip(d.limits, d.needs):
                                if lim.id in slack:
                                    slack[lim.id] -= n
                            started.append(w)
                            continue
                        block = SLACK
            if _deployment_level(block):
                eta = self._deployment_eta(d, cum, now)
                if paused:
                    eta = max(eta, self.paused_until - now)
                if now + eta > w.deadline + _EPS:
                    for lim, n in zip(d.limits, d.needs):
                        if lim.id in cum:
                            cum[lim.id] -= n
                    refused.append((w, Refusal("wait_too_long", block, eta)))
                    continue
                for lim in d.limits:
                    if lim.owner == DEPLOYMENT:
                        b = table.bucket(lim, now)
                        room = b.level + (w.deadline - now) * b.rate - cum[lim.id]
                        if room < slack.get(lim.id, math.inf):
                            slack[lim.id] = room
            else:
                eta = self._tenant_eta(d, tcum, now)
                if w.not_before > now:
                    eta = max(eta, w.not_before - now)
                if now + eta > w.deadline + _EPS or (now >= w.deadline and isinstance(block, Parallel)):
                    refused.append((w, Refusal(reason_of(block), block, max(eta, 1.0))))
                    continue
            stuck.setdefault(d.tenant, block)
            w.block, w.eta = block, eta
            wake = min(wake, w.deadline, now + eta if eta > 0 else math.inf)
        for w in started:
            self._remove(w)
            q = self.tenants.pop(w.demand.tenant, None)
            if q is not None:  # its turn is over: to the end of the ring
                self.tenants[w.demand.tenant] = q
            sched.granted(self, w, now)
        for w, refusal in refused:
            self._drop(w, refusal)
        if self.size:
            self._schedule(min(wake, now + sched.poll), now)
        else:
            self._cancel_timer()

    @staticmethod
    def _within(d: Demand, slack: dict[str, float]) -> bool:
        if not slack:
            return True
        for lim, n in zip(d.limits, d.needs):
            if n > slack.get(lim.id, math.inf):
                return False
        return True

    def _deployment_eta(self, d: Demand, cum: dict[str, float], now: float) -> float:
        table = self.sched.table
        eta = 0.0
        for lim, n in zip(d.limits, d.needs):
            if lim.owner == DEPLOYMENT:
                b = table.bucket(lim, now)
                before = cum.get(lim.id, 0.0)
                short = before + min(n, b.capacity) - b.level
                if short > 0:
                    eta = max(eta, short / b.rate)
                cum[lim.id] = before + n
        return eta

    def _tenant_eta(self, d: Demand, tcum: dict[str, float], now: float) -> float:
        table = self.sched.table
        eta = 0.0
        for lim, n in zip(d.limits, d.needs):
            if lim.owner != DEPLOYMENT:
                b = table.bucket(lim, now)
                before = tcum.get(lim.id, 0.0)
                short = before + min(n, b.capacity) - b.level
                if short > 0:
                    eta = max(eta, short / b.rate)
                tcum[lim.id] = before + n
        return eta

    # -- provider feedback

    def pause(self, seconds: float, now: float) -> None:
        if now + seconds > self.paused_until:
            self.paused_until = now + seconds
            if self.size:
                self._schedule(self.paused_until, now)

    # -- the timer

    def _schedule(self, at: float, now: float) -> None:
        if self._timer is not None:
            if abs(at - self._timer_at) < 1e-4:
                return
            self._timer.cancel()
        self._timer_at = at
        delay = max(at - now, 0.0) + 1e-3
        self._timer = asyncio.get_running_loop().call_later(delay, self._fire)

    def _fire(self) -> None:
        self._timer = None
        self._timer_at = math.inf
        self.pump()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
            self._timer_at = math.inf
