-- The request's W3C trace id on its spend row (the tracing middleware's, or the client's
-- traceparent): a billing row leads to its trace. Expand only: nullable, the previous
-- release neither reads nor writes it.
ALTER TABLE llmproxy_spend_logs ADD COLUMN trace_id TEXT;
