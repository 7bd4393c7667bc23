-- Keys, teams and the spend log. Money is NUMERIC(24,12) USD (the code keeps 9 decimals);
-- times are TIMESTAMPTZ. Tables carry an llmproxy_ prefix: the database may be shared.

CREATE TABLE llmproxy_teams (
    team_id               TEXT PRIMARY KEY,
    team_alias            TEXT,
    models                TEXT[] NOT NULL DEFAULT '{}',
    max_budget            NUMERIC(24, 12),
    budget_duration       TEXT,
    rpm_limit             BIGINT,
    tpm_limit             BIGINT,
    max_parallel_requests INTEGER,
    metadata              JSONB NOT NULL DEFAULT '{}',
    blocked               BOOLEAN NOT NULL DEFAULT FALSE,
    created_at            TIMESTAMPTZ NOT NULL,
    updated_at            TIMESTAMPTZ NOT NULL
);

-- key_hash is the SHA-256 hex of the key; the key itself is never stored.
CREATE TABLE llmproxy_keys (
    id                    TEXT PRIMARY KEY,
    key_hash              TEXT NOT NULL,
    key_alias             TEXT,
    key_prefix            TEXT NOT NULL,
    team_id               TEXT,
    user_id               TEXT,
    models                TEXT[] NOT NULL DEFAULT '{}',
    max_budget            NUMERIC(24, 12),
    budget_duration       TEXT,
    rpm_limit             BIGINT,
    tpm_limit             BIGINT,
    max_parallel_requests INTEGER,
    metadata              JSONB NOT NULL DEFAULT '{}',
    expires_at            TIMESTAMPTZ,
    blocked               BOOLEAN NOT NULL DEFAULT FALSE,
    created_at            TIMESTAMPTZ NOT NULL,
    updated_at            TIMESTAMPTZ NOT NULL
);
CREATE UNIQUE INDEX llmproxy_keys_key_hash ON llmproxy_keys (key_hash);
CREATE INDEX llmproxy_keys_team_id ON llmproxy_keys (team_id);
CREATE INDEX llmproxy_keys_user_id ON llmproxy_keys (user_id);

-- One row per request, keyed by the server's request id (a retried batch never doubles
-- a row). No foreign keys: the log outlives deleted keys and teams.
CREATE TABLE llmproxy_spend_logs (
    request_id        TEXT PRIMARY KEY,
    client_request_id TEXT,
    key_id            TEXT,
    team_id           TEXT,
    user_id           TEXT,
    model             TEXT,
    deployment        TEXT,
    prompt_tokens     BIGINT NOT NULL DEFAULT 0,
    completion_tokens BIGINT NOT NULL DEFAULT 0,
    tokens_estimated  BOOLEAN NOT NULL DEFAULT FALSE,
    spend             NUMERIC(24, 12) NOT NULL DEFAULT 0,
    status            INTEGER NOT NULL,
    started_at        TIMESTAMPTZ NOT NULL,
    duration_ms       DOUBLE PRECISION NOT NULL,
    ttfb_ms           DOUBLE PRECISION,
    cache_hit         BOOLEAN NOT NULL DEFAULT FALSE
);
CREATE INDEX llmproxy_spend_logs_key_time ON llmproxy_spend_logs (key_id, started_at);
CREATE INDEX llmproxy_spend_logs_team_time ON llmproxy_spend_logs (team_id, started_at);
CREATE INDEX llmproxy_spend_logs_user_time ON llmproxy_spend_logs (user_id, started_at);
CREATE INDEX llmproxy_spend_logs_time ON llmproxy_spend_logs (started_at);
