-- A request answered by a model without pricing: its spend is unknown, not 0 (a pattern
-- model serving a name nobody priced, say). Expand only: a column with a default, which
-- the previous release neither reads nor writes.
ALTER TABLE llmproxy_spend_logs ADD COLUMN unpriced BOOLEAN NOT NULL DEFAULT FALSE;
