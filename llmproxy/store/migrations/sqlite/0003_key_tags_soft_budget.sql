-- LiteLLM's key fields that scripts send: tags (a JSON list, kept and shown) and a soft
-- budget (nano-USD, reported when spend reaches it, never enforced). Expand only: the
-- previous release neither reads nor writes them.
ALTER TABLE llmproxy_keys ADD COLUMN tags TEXT NOT NULL DEFAULT '[]';
ALTER TABLE llmproxy_keys ADD COLUMN soft_budget_nanos INTEGER;
