-- Subscriptions (SPEC §4): at most one per team, read by the subscription middleware's
-- `db` source. `limits` is JSON: model name or "*" -> {rpm, tpm, max_parallel_requests}.
-- No foreign key to the team: deleting a team deletes its subscription in the admin
-- layer, as with its keys. Expand only: a new table the previous release ignores.
CREATE TABLE llmproxy_subscriptions (
    subscription_id  TEXT PRIMARY KEY NOT NULL,
    team_id          TEXT NOT NULL,
    enabled          INTEGER NOT NULL DEFAULT 1,
    models           TEXT NOT NULL DEFAULT '[]',
    limits           TEXT NOT NULL DEFAULT '{}',
    max_budget_nanos INTEGER,
    budget_duration  TEXT,
    metadata         TEXT NOT NULL DEFAULT '{}',
    created_at_us    INTEGER NOT NULL,
    updated_at_us    INTEGER NOT NULL
) STRICT;
CREATE UNIQUE INDEX llmproxy_subscriptions_team_id ON llmproxy_subscriptions (team_id);
