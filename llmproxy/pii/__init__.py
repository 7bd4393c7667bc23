"""PII detection and masking."""
