"""Cost of one request in exact decimal USD, from the model's `pricing` (per 1M tokens)."""

from __future__ import annotations

from decimal import Decimal
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .config import Pricing
    from .usage import Usage

_MILLION = Decimal(1_000_000)
ZERO = Decimal(0)


def cost(pricing: "Pricing | None", usage: "Usage") -> Decimal:
    """Prompt tokens that were cache reads or cache writes are priced at the cache prices
    where those are set, else at the input price; the rest at the input price."""
    if pricing is None:
        return ZERO
    cached = min(usage.cached_tokens, usage.prompt_tokens)
    created = min(usage.cache_creation_tokens, usage.prompt_tokens - cached)
    plain = usage.prompt_tokens - cached - created
    read_price = pricing.cache_read_per_1m if pricing.cache_read_per_1m is not None else pricing.input_per_1m
    write_price = pricing.cache_write_per_1m if pricing.cache_write_per_1m is not None else pricing.input_per_1m
    total = (
        plain * pricing.input_per_1m
        + cached * read_price
        + created * write_price
        + usage.completion_tokens * pricing.output_per_1m
    )
    return total / _MILLION
