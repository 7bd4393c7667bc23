-- The model that served a request (a fallback may differ from the requested `model`),
-- and the audit log of admin writes: who did what to which record, and how it ended.
ALTER TABLE llmproxy_spend_logs ADD COLUMN served_model TEXT;

CREATE TABLE llmproxy_audit_log (
    id         BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at         TIMESTAMPTZ NOT NULL,
    actor      TEXT NOT NULL,
    action     TEXT NOT NULL,
    target_id  TEXT,
    status     INTEGER NOT NULL,
    changes    TEXT[] NOT NULL DEFAULT '{}',
    request_id TEXT
);
CREATE INDEX llmproxy_audit_log_time ON llmproxy_audit_log (at);
CREATE INDEX llmproxy_audit_log_action_time ON llmproxy_audit_log (action, at);
CREATE INDEX llmproxy_audit_log_target_time ON llmproxy_audit_log (target_id, at);
