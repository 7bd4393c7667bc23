-- Subscriptions (SPEC §4): at most one per team, read by the subscription middleware's
-- `db` source. `limits` is JSONB: model name or "*" -> {rpm, tpm, max_parallel_requests}.
-- No foreign key to the team: deleting a team deletes its subscription in the admin
-- layer, as with its keys. Expand only: a new table the previous release ignores.
CREATE TABLE llmproxy_subscriptions (
    subscription_id TEXT PRIMARY KEY,
    team_id         TEXT NOT NULL,
    enabled         BOOLEAN NOT NULL DEFAULT TRUE,
    models          TEXT[] NOT NULL DEFAULT '{}',
    limits          JSONB NOT NULL DEFAULT '{}',
    max_budget      NUMERIC(24, 12),
    budget_duration TEXT,
    metadata        JSONB NOT NULL DEFAULT '{}',
    created_at      TIMESTAMPTZ NOT NULL,
    updated_at      TIMESTAMPTZ NOT NULL
);
CREATE UNIQUE INDEX llmproxy_subscriptions_team_id ON llmproxy_subscriptions (team_id);
