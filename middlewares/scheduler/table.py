"""This process's buckets and in-flight counts, by limit id: the local backend, the mirror
of the shared buckets when Redis is used, and the fallback when Redis is gone.

`share` scales every limit: 1 normally, 1/N on a replica that lost Redis and must keep
to its share of the global limits (N replicas alive at the last heartbeat).
"""

from __future__ import annotations

import math

from .bucket import TokenBucket
from .limits import Demand, Limit, Parallel

_SWEEP_AT = 4096  # buckets held before idle (full) ones are dropped


class BucketTable:
    __slots__ = ("share", "buckets", "inflight")

    def __init__(self, share: float = 1.0) -> None:
        self.share = share
        self.buckets: dict[str, TokenBucket] = {}
        self.inflight: dict[str, int] = {}

    def bucket(self, lim: Limit, now: float) -> TokenBucket:
        b = self.buckets.get(lim.id)
        cap, rate = lim.capacity * self.share, lim.rate * self.share
        if b is None:
            if len(self.buckets) >= _SWEEP_AT:
                self.sweep(now)
            b = self.buckets[lim.id] = TokenBucket(cap, rate, now)
        elif b.capacity != cap or b.rate != rate:
            b.retune(cap, rate, now)
        return b

    def slots(self, par: Parallel) -> int:
        return max(1, math.floor(par.limit * self.share))

    def blocking(self, demand: Demand, now: float) -> tuple[Limit | Parallel | None, float]:
        """The first limit that keeps `demand` from starting now and seconds until it would
        fit if nothing else were taken (inf for a parallel cap), or (None, 0)."""
        for lim, n in zip(demand.limits, demand.needs):
            b = self.bucket(lim, now)
            if not b.fits(n, now):
                return lim, b.wait(n, now)
        for par in demand.slots:
            if self.inflight.get(par.id, 0) >= self.slots(par):
                return par, math.inf
        return None, 0.0

    def take(self, demand: Demand, now: float) -> None:
        for lim, n in zip(demand.limits, demand.needs):
            self.bucket(lim, now).take(n, now)
        for par in demand.slots:
            self.inflight[par.id] = self.inflight.get(par.id, 0) + 1

    def give_back(self, demand: Demand, now: float) -> None:
        """Undo a `take` entirely (nothing was sent)."""
        for lim, n in zip(demand.limits, demand.needs):
            self.bucket(lim, now).give(n, now)
        self.free(demand)

    def adjust(self, lim: Limit, delta: float, now: float) -> None:
        """Reconcile: `delta` > 0 gives back unused units, < 0 charges an overage."""
        if delta > 0:
            self.bucket(lim, now).give(delta, now)
        elif delta < 0:
            self.bucket(lim, now).charge(-delta, now)

    def free(self, demand: Demand) -> None:
        for par in demand.slots:
            left = self.inflight.get(par.id, 0) - 1
            if left > 0:
                self.inflight[par.id] = left
            else:
                self.inflight.pop(par.id, None)

    def rescaled(self, share: float, now: float) -> "BucketTable":
        """A new table holding `share` of every limit, each bucket as full as this one is
        (in proportion): switching tables never refills a bucket. In-flight counts stay
        with this table, where the leases holding them give them back."""
        out = BucketTable(share)
        k = share / self.share
        for key, b in self.buckets.items():
            out.buckets[key] = TokenBucket(b.capacity * k, b.rate * k, now, b.refill(now) * k)
        return out

    def sweep(self, now: float) -> None:
        """Drop full buckets: one made again later starts full, which is the same."""
        for key in [k for k, b in self.buckets.items() if b.refill(now) >= b.capacity]:
            del self.buckets[key]
