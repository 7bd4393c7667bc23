#!/usr/bin/env python3
"""Fill a SQLite store with virtual keys for the benchmark's `auth` rows.

    python bench/seed_keys.py --db /tmp/x/bench.db --keys 3000 --use 200 --out /tmp/x/keys.txt

Creates (through the store API, after `store.migrate()`) `--teams` teams `bench-team-0..`
and `--keys` keys, all with `models: ()` (every model) and no budget; the first half of
them (`--team-share`) belong to a team (round-robin over the teams), the rest to none.
`--subscriptions` gives each team a subscription (every model, no limits, no budget). Writes the
plaintext of `--use` of them, one per line, to `--out` (mode 0600), spread over the whole
set (both halves, every team), and prints one JSON line with what it did. The plaintext
keys exist only in that file and in the load generator's memory.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # `llmproxy` from this checkout even if it is not installed

from llmproxy.keys import generate, key_hash  # noqa: E402
from llmproxy.store import KeyInfo, SubscriptionInfo, TeamInfo, mask_key, open_store  # noqa: E402


def pick(n_keys: int, n_use: int) -> list[int]:
    """`n_use` distinct indices spread evenly over range(n_keys)."""
    n_use = min(n_use, n_keys)
    return sorted({(i * n_keys) // n_use for i in range(n_use)})


async def seed(db: str, n_keys: int, n_teams: int, n_use: int, team_share: float = 0.5,
               subscriptions: bool = False) -> tuple[list[str], dict]:
    t0 = time.perf_counter()
    store = await open_store(None, sqlite_path=db)
    try:
        await store.migrate()
        teams = [f"bench-team-{i}" for i in range(n_teams)]
        for team_id in teams:
            await store.create_team(TeamInfo(team_id=team_id, team_alias=team_id))
            if subscriptions:
                await store.create_subscription(SubscriptionInfo(subscription_id=f"sub-{team_id}", team_id=team_id))
        keys: list[str] = []
        with_team = int(n_keys * team_share) if teams else 0
        for i in range(n_keys):  # bounded by --keys
            key = generate()
            digest = key_hash(key)
            team = teams[i % len(teams)] if i < with_team else None
            await store.create_key(digest, KeyInfo(id=digest, key_prefix=mask_key(key),
                                                   key_alias=f"bench-{i}", team_id=team,
                                                   user_id=f"bench-user-{i % 100}", models=()))
            keys.append(key)
    finally:
        await store.close()
    used = [keys[i] for i in pick(n_keys, n_use)]
    info = {"db": db, "keys": n_keys, "teams": n_teams, "keys_with_team": with_team,
            "subscriptions": n_teams if subscriptions else 0,
            "keys_used": len(used), "seconds": round(time.perf_counter() - t0, 2)}
    return used, info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--db", required=True, help="SQLite file (created and migrated)")
    ap.add_argument("--keys", type=int, default=3000, help="keys to create")
    ap.add_argument("--teams", type=int, default=10, help="teams; half the keys are in one")
    ap.add_argument("--use", type=int, default=200, help="plaintext keys written to --out")
    ap.add_argument("--team-share", type=float, default=0.5, help="the share of the keys that are in a team")
    ap.add_argument("--subscriptions", action="store_true", help="a subscription for every team")
    ap.add_argument("--out", required=True, help="file for the plaintext keys, one per line")
    args = ap.parse_args()
    if args.keys < 1 or args.use < 1 or args.teams < 0 or not 0 <= args.team_share <= 1:
        ap.error("--keys and --use must be >= 1, --teams >= 0, --team-share within 0..1")
    used, info = asyncio.run(seed(args.db, args.keys, args.teams, args.use, args.team_share, args.subscriptions))
    fd = os.open(args.out, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("".join(k + "\n" for k in used))
    info["out"] = args.out
    print(json.dumps(info))


if __name__ == "__main__":
    main()
