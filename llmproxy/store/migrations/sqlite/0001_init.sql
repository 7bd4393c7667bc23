-- Keys, teams and the spend log. SQLite has no decimal type: money is integer
-- nano-dollars (*_nanos, 1e-9 USD), so sums are exact. Times are integer microseconds
-- since the Unix epoch, UTC (*_at_us). JSON values (models, metadata) are TEXT.
-- STRICT tables: a value of the wrong type is an error, not a silent conversion.

CREATE TABLE llmproxy_teams (
    team_id               TEXT PRIMARY KEY NOT NULL,
    team_alias            TEXT,
    models                TEXT NOT NULL DEFAULT '[]',
    max_budget_nanos      INTEGER,
    budget_duration       TEXT,
    rpm_limit             INTEGER,
    tpm_limit             INTEGER,
    max_parallel_requests INTEGER,
    metadata              TEXT NOT NULL DEFAULT '{}',
    blocked               INTEGER NOT NULL DEFAULT 0,
    created_at_us         INTEGER NOT NULL,
    updated_at_us         INTEGER NOT NULL
) STRICT;

-- key_hash is the SHA-256 hex of the key; the key itself is never stored.
CREATE TABLE llmproxy_keys (
    id                    TEXT PRIMARY KEY NOT NULL,
    key_hash              TEXT NOT NULL,
    key_alias             TEXT,
    key_prefix            TEXT NOT NULL,
    team_id               TEXT,
    user_id               TEXT,
    models                TEXT NOT NULL DEFAULT '[]',
    max_budget_nanos      INTEGER,
    budget_duration       TEXT,
    rpm_limit             INTEGER,
    tpm_limit             INTEGER,
    max_parallel_requests INTEGER,
    metadata              TEXT NOT NULL DEFAULT '{}',
    expires_at_us         INTEGER,
    blocked               INTEGER NOT NULL DEFAULT 0,
    created_at_us         INTEGER NOT NULL,
    updated_at_us         INTEGER NOT NULL
) STRICT;
CREATE UNIQUE INDEX llmproxy_keys_key_hash ON llmproxy_keys (key_hash);
CREATE INDEX llmproxy_keys_team_id ON llmproxy_keys (team_id);
CREATE INDEX llmproxy_keys_user_id ON llmproxy_keys (user_id);

-- One row per request, keyed by the server's request id (a retried batch never doubles
-- a row). No foreign keys: the log outlives deleted keys and teams.
CREATE TABLE llmproxy_spend_logs (
    request_id        TEXT PRIMARY KEY NOT NULL,
    client_request_id TEXT,
    key_id            TEXT,
    team_id           TEXT,
    user_id           TEXT,
    model             TEXT,
    deployment        TEXT,
    prompt_tokens     INTEGER NOT NULL DEFAULT 0,
    completion_tokens INTEGER NOT NULL DEFAULT 0,
    tokens_estimated  INTEGER NOT NULL DEFAULT 0,
    spend_nanos       INTEGER NOT NULL DEFAULT 0,
    status            INTEGER NOT NULL,
    started_at_us     INTEGER NOT NULL,
    duration_ms       REAL NOT NULL,
    ttfb_ms           REAL,
    cache_hit         INTEGER NOT NULL DEFAULT 0
) STRICT;
CREATE INDEX llmproxy_spend_logs_key_time ON llmproxy_spend_logs (key_id, started_at_us);
CREATE INDEX llmproxy_spend_logs_team_time ON llmproxy_spend_logs (team_id, started_at_us);
CREATE INDEX llmproxy_spend_logs_user_time ON llmproxy_spend_logs (user_id, started_at_us);
CREATE INDEX llmproxy_spend_logs_time ON llmproxy_spend_logs (started_at_us);
