"""Token-bucket arithmetic: pure, no I/O, time passed in by the caller.

A bucket holds up to `capacity` units and refills continuously at `rate` units per second.
Admission needs `level >= min(n, capacity)`: a request larger than the whole bucket waits
until the bucket is full rather than forever, and then drives it negative. Reconciling a
request that used more than it reserved (`charge`) may push the level further below zero,
but never deeper than that one overage: the debt after a charge is at most
max(debt before, this charge). So the level stays within [-largest single overage, capacity].
"""

from __future__ import annotations


class TokenBucket:
    """One bucket's state: `level` as of time `stamp` (seconds, the caller's clock)."""

    __slots__ = ("capacity", "rate", "level", "stamp")

    def __init__(self, capacity: float, rate: float, now: float, level: float | None = None) -> None:
        if capacity <= 0 or rate <= 0:
            raise ValueError("a bucket needs a positive capacity and rate")
        self.capacity = float(capacity)
        self.rate = float(rate)
        self.level = self.capacity if level is None else min(float(level), self.capacity)
        self.stamp = now

    def refill(self, now: float) -> float:
        """Bring the level up to `now` (a clock that went backwards changes nothing)."""
        if now > self.stamp:
            level = self.level + (now - self.stamp) * self.rate
            self.level = level if level < self.capacity else self.capacity
            self.stamp = now
        return self.level

    def fits(self, n: float, now: float) -> bool:
        return self.refill(now) >= (n if n < self.capacity else self.capacity)

    def wait(self, n: float, now: float) -> float:
        """Seconds until `n` fits (0 when it does now), if nothing else is taken."""
        short = (n if n < self.capacity else self.capacity) - self.refill(now)
        return short / self.rate if short > 0 else 0.0

    def take(self, n: float, now: float) -> None:
        """Take `n` (the caller checked `fits`)."""
        self.refill(now)
        self.level -= n

    def give(self, n: float, now: float) -> None:
        """Give back `n` of what was taken; never above capacity."""
        level = self.refill(now) + n
        self.level = level if level < self.capacity else self.capacity

    def charge(self, n: float, now: float) -> None:
        """Charge `n` more than was reserved: the debt may reach this charge but no further
        (an earlier, larger debt is kept as it is)."""
        level = self.refill(now)
        floor = level if level < -n else -n
        self.level = max(level - n, floor)

    def tighten(self, bound: float, now: float) -> None:
        """The provider says at most `bound` is left: never more than that now."""
        if self.refill(now) > bound:
            self.level = bound

    def retune(self, capacity: float, rate: float, now: float) -> None:
        """New limits (a key's rpm was changed): refill at the old rate up to now, then
        cap the level at the new capacity."""
        self.refill(now)
        self.capacity, self.rate = float(capacity), float(rate)
        if self.level > self.capacity:
            self.level = self.capacity

    def time_to_full(self, now: float) -> float:
        return (self.capacity - self.refill(now)) / self.rate

    def __repr__(self) -> str:
        return f"TokenBucket(level={self.level:g}/{self.capacity:g}, rate={self.rate:g}/s)"
