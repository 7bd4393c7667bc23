"""Which deployment serves the next attempt: least in-flight per unit of weight, ties at
random weighted by `weight`, skipping deployments in cooldown (SPEC §3 `router`)."""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from .config import Deployment, Model
    from .context import Admission
    from .providers.base import Provider


class DeploymentState:
    """Live state of one deployment in this process."""

    __slots__ = ("deployment", "provider", "model", "inflight", "cooldown_until")

    def __init__(self, deployment: "Deployment", provider: "Provider", model: "Model") -> None:
        self.deployment = deployment
        self.provider = provider
        self.model = model
        self.inflight = 0
        self.cooldown_until = 0.0


class Router:
    def __init__(
        self,
        states: dict[str, list[DeploymentState]],
        clock: Callable[[], float],
        rng: random.Random | None = None,
    ) -> None:
        self.states = states
        self.clock = clock
        self.rng = rng or random.Random()
        self._serves = {(model, api) for model, group in states.items() for s in group for api in s.provider.apis}

    def serves(self, model: str, api: str) -> bool:
        return (model, api) in self._serves

    def pick(self, model: str, api: str, admission: "Admission | None" = None) -> DeploymentState:
        """The deployment for the next attempt. When every deployment is cooling down, the
        one whose cooldown ends first is tried rather than failing. With an admission step
        installed, deployments with free capacity are preferred."""
        candidates = [s for s in self.states[model] if api in s.provider.apis]
        now = self.clock()
        live = [s for s in candidates if s.cooldown_until <= now]
        if not live:
            return min(candidates, key=lambda s: s.cooldown_until)
        if admission is not None and len(live) > 1:
            free = [s for s in live if admission.has_capacity(s.deployment)]
            live = free or live
        if len(live) == 1:
            return live[0]
        best: list[DeploymentState] = []
        best_load = float("inf")
        for s in live:
            load = s.inflight / s.deployment.weight
            if load < best_load:
                best, best_load = [s], load
            elif load == best_load:
                best.append(s)
        if len(best) == 1:
            return best[0]
        # Ties (always the case when idle) go at random in proportion to weight, so that
        # `weight` is each deployment's share of traffic at any load.
        return self.rng.choices(best, weights=[s.deployment.weight for s in best])[0]

    def cool(self, state: DeploymentState, seconds: float) -> None:
        if seconds > 0:
            state.cooldown_until = max(state.cooldown_until, self.clock() + seconds)
