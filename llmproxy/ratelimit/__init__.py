"""Rate limiting for the scheduler middleware: bucket arithmetic (`bucket`), which limits
a request takes from (`limits`), this process's buckets (`table`), per-deployment fair
queues (`lane`), the admission step and its leases (`admission`), provider and 429
headers (`headers`) and the shared Redis buckets with their local fallback (`redis`)."""

from .admission import NO_LEASE, Lease, RateScheduler, define_metrics
from .bucket import TokenBucket
from .headers import ProviderLimits, Window, format_duration, parse_duration, provider_limits
from .limits import Demand, Limit, Parallel, demand_of, deployment_limits, estimate_tokens, tenant_limits, tenant_of
from .table import BucketTable

__all__ = [
    "NO_LEASE", "BucketTable", "Demand", "Lease", "Limit", "Parallel", "ProviderLimits", "RateScheduler",
    "TokenBucket", "Window", "define_metrics", "demand_of", "deployment_limits", "estimate_tokens",
    "format_duration", "parse_duration", "provider_limits", "tenant_limits", "tenant_of",
]
