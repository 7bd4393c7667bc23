"""`plans`: an example subscription source (the `llmproxy.subscription_sources` group).

The subscriptions are in the config itself, one plan per team, for a gateway whose
teams' plans change with its deployments:

    middlewares:
      - auth
      - subscription:
          source: plans
          plans: {org-1: {models: [gpt-4o-mini], limits: {"*": {rpm: 60}}}}
          default: {enabled: false}     # teams not listed (absent: no subscription)

A source is a class built as `cls(options, services)` with one coroutine, `fetch`; its
`Options` dataclass is built from the middleware's other keys, so check-config names a
wrong one by its path.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from llmproxy.store import SubscriptionInfo


@dataclass(frozen=True)
class Options:
    plans: dict[str, dict[str, Any]] = field(default_factory=dict)  # team id -> subscription fields
    default: dict[str, Any] | None = None  # for any other team; None: no subscription


class Plans:
    Options = Options

    def __init__(self, options: Options | None, services: Any) -> None:
        options = options or Options()
        # Built once at start: a plan that is no subscription is a config error, not a 503.
        self.plans = {team: SubscriptionInfo(subscription_id=f"plan:{team}", team_id=team, **fields)
                      for team, fields in options.plans.items()}
        self.default = options.default

    async def fetch(self, team_id: str, key_id: str | None, user_id: str | None) -> SubscriptionInfo | None:
        found = self.plans.get(team_id)
        if found is None and self.default is not None:
            found = SubscriptionInfo(subscription_id="plan:default", team_id=team_id, **self.default)
        return found
