"""Bucket arithmetic, limits and rate-limit header parsing (pure functions, no I/O)."""

from __future__ import annotations

import math
import time
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime
from types import SimpleNamespace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from llmproxy.config import Deployment
pytest.importorskip("llmproxy.middlewares.scheduler", reason="the scheduler middleware is not installed")
from llmproxy.middlewares.scheduler import (
    BucketTable, Demand, TokenBucket, deployment_limits, estimate_tokens, format_duration, parse_duration,
    provider_limits, tenant_limits, tenant_of,
)
from llmproxy.middlewares.scheduler.admission import reconcile
from llmproxy.testing import make_context
from llmproxy.usage import Usage

# --------------------------------------------------------------------- the bucket

ops = st.lists(st.tuples(
    st.sampled_from(["wait", "take", "give", "charge", "tighten"]),
    st.floats(min_value=0, max_value=500, allow_nan=False, allow_infinity=False)), max_size=60)


@given(capacity=st.floats(min_value=0.5, max_value=1000), per_min=st.floats(min_value=1, max_value=100000), ops=ops)
def test_bucket_stays_between_debt_bound_and_capacity(capacity, per_min, ops):
    rate = per_min / 60
    now = 0.0
    b = TokenBucket(capacity, rate, now)
    debt_bound = 0.0  # the largest single overage so far
    for op, x in ops:
        if op == "wait":
            before = b.level
            now += x / 10
            b.refill(now)
            assert b.level == pytest.approx(min(capacity, before + x / 10 * rate), rel=1e-9, abs=1e-9)
        elif op == "take":
            if b.fits(x, now):  # admission only takes what fits (or a whole full bucket)
                b.take(x, now)
                debt_bound = max(debt_bound, x - capacity)
        elif op == "give":
            b.give(x, now)
        elif op == "charge":
            before = b.level
            b.charge(x, now)
            assert b.level <= before  # a charge never forgives
            debt_bound = max(debt_bound, x)
        else:
            b.tighten(x, now)
            assert b.level <= x
        assert b.level <= b.capacity + 1e-9
        assert b.level >= -debt_bound - 1e-9


@given(capacity=st.floats(min_value=1, max_value=1000), per_min=st.floats(min_value=1, max_value=6000),
       start=st.floats(min_value=-500, max_value=1000), steps=st.lists(
           st.floats(min_value=0, max_value=30), min_size=1, max_size=20))
def test_refill_matches_elapsed_time(capacity, per_min, start, steps):
    """However elapsed time is split into refills, the level is the same: min(cap, start + t * rate)."""
    rate = per_min / 60
    b = TokenBucket(capacity, rate, 0.0, level=start)
    t = 0.0
    for dt in steps:
        t += dt
        b.refill(t)
    assert b.level == pytest.approx(min(capacity, min(start, capacity) + t * rate), rel=1e-9, abs=1e-6)


@given(capacity=st.floats(min_value=1, max_value=1000), per_min=st.floats(min_value=1, max_value=6000),
       level=st.floats(min_value=-1000, max_value=1000), n=st.floats(min_value=0, max_value=2000))
def test_wait_is_when_it_fits(capacity, per_min, level, n):
    b = TokenBucket(capacity, per_min / 60, 0.0, level=level)
    w = b.wait(n, 0.0)
    assert w >= 0
    assert b.fits(n, w + 1e-6)
    if w > 1e-6:
        assert not TokenBucket(capacity, per_min / 60, 0.0, level=level).fits(n, w * (1 - 1e-6) - 1e-9)


def test_oversized_request_waits_for_a_full_bucket_then_owes():
    b = TokenBucket(100, 1.0, 0.0, level=50)  # 1 per second
    assert not b.fits(150, 0.0)
    assert b.wait(150, 0.0) == pytest.approx(50)
    assert b.fits(150, 50.0)
    b.take(150, 50.0)
    assert b.level == pytest.approx(-50)
    assert b.wait(1, 50.0) == pytest.approx(51)


def test_charge_debt_is_bounded_by_one_overage():
    b = TokenBucket(100, 60, 0.0, level=10)
    b.charge(30, 0.0)
    assert b.level == -20
    b.charge(30, 0.0)  # a second overage of 30: the debt stays at most 30
    assert b.level == -30
    b.charge(5, 0.0)  # a smaller one does not forgive the larger debt
    assert b.level == -30


def test_retune_caps_level_and_changes_rate():
    b = TokenBucket(100, 60, 0.0)
    b.retune(10, 6, 0.0)
    assert b.level == 10 and b.rate == 6


# -------------------------------------------------------------------- limits and demand


def dep(**kw):
    kw.setdefault("provider", "openai")
    return Deployment(id="openai:m", **kw)


@pytest.mark.parametrize("kw, expect", [
    ({}, []),
    ({"rpm": 60}, [("requests", 60, 60)]),
    ({"rpm": 60, "burst": 10}, [("requests", 60, 10)]),
    ({"tpm": 6000}, [("tokens", 6000, 6000)]),
    ({"rpm": 60, "tpm": 6000, "burst": 10}, [("requests", 60, 10), ("tokens", 6000, 1000)]),
    ({"tpm": 6000, "burst": 10}, [("tokens", 6000, 6000)]),
])
def test_deployment_limits(kw, expect):
    assert [(lim.unit, lim.per_minute, lim.capacity) for lim in deployment_limits(dep(**kw))] == expect


def test_tenant_limits_read_key_and_team_defensively():
    team = SimpleNamespace(team_id="t1", rpm_limit=10, tpm_limit=None, max_parallel_requests=2)
    p = SimpleNamespace(key_id="k1", team_id="t1", rpm_limit=None, tpm_limit=1000, max_parallel_requests=None,
                        team=team)
    limits, slots = tenant_limits(p)
    assert [lim.id for lim in limits] == ["key:k1:tokens", "team:t1:requests"]
    assert [(s.id, s.limit) for s in slots] == [("team:t1:parallel", 2)]
    assert tenant_of(p) == "team:t1"
    assert tenant_of(SimpleNamespace(key_id="k2")) == "key:k2"
    assert tenant_of(None) == "anonymous"
    assert tenant_limits(object()) == ((), ())  # no such fields: no limits
    assert tenant_limits(SimpleNamespace(key_id="k", rpm_limit=0, tpm_limit="5")) == ((), ())


@pytest.mark.parametrize("body, api, expect", [
    ({"messages": [{"role": "user", "content": "x" * 40}], "max_tokens": 5}, "chat", 10 + 5),
    ({"messages": [{"role": "user", "content": "x" * 41}], "max_completion_tokens": 7}, "chat", 11 + 7),
    ({"messages": [{"role": "user", "content": "abc"}]}, "chat", 1 + 100),
    ({"input": "x" * 8}, "embeddings", 2),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}, "messages", 1 + 3),
])
def test_estimate_tokens(body, api, expect):
    assert estimate_tokens(make_context({"model": "m", **body}, api=api), default_max_tokens=100) == expect


def _demand(limits, tokens):
    return Demand("anonymous", limits, tuple(1.0 if lim.unit == "requests" else float(tokens) for lim in limits),
                  (), tokens)


@pytest.mark.parametrize("counts, usage, expect", [
    ("actual", Usage(prompt_tokens=10, completion_tokens=20), {"requests": None, "tokens": 70}),
    ("actual", Usage(prompt_tokens=80, completion_tokens=40), {"requests": None, "tokens": -20}),
    ("reserved", Usage(prompt_tokens=10, completion_tokens=20), {"requests": None, "tokens": None}),
    ("reserved", Usage(prompt_tokens=80, completion_tokens=40), {"requests": None, "tokens": -20}),
    ("actual", None, {"requests": 1, "tokens": 100}),
    ("reserved", None, {"requests": 1, "tokens": 100}),
])
def test_reconcile(counts, usage, expect):
    d = _demand(deployment_limits(dep(rpm=60, tpm=6000)), 100)
    got = {lim.unit: delta for lim, delta in reconcile(d, usage, counts)}
    assert {u: got.get(u) for u in expect} == expect


def test_tenant_tokens_always_reconcile_to_actual():
    limits, _ = tenant_limits(SimpleNamespace(key_id="k", tpm_limit=1000))
    d = _demand(deployment_limits(dep(tpm=6000)) + limits, 100)
    got = {lim.id: delta for lim, delta in reconcile(d, Usage(prompt_tokens=10, completion_tokens=10), "reserved")}
    assert got == {"key:k:tokens": 80}


def test_table_share_scales_limits_and_slots():
    table = BucketTable(share=1 / 3)
    lim = deployment_limits(dep(rpm=60, burst=9))[0]
    b = table.bucket(lim, 0.0)
    assert (b.capacity, b.rate) == pytest.approx((3, 1 / 3))
    _, slots = tenant_limits(SimpleNamespace(key_id="k", max_parallel_requests=2))
    assert table.slots(slots[0]) == 1  # never zero


# ------------------------------------------------------------------------ durations


@pytest.mark.parametrize("seconds, text", [
    (0, "0s"), (0.02, "20ms"), (0.0004, "1ms"), (1, "1s"), (1.5, "1.5s"), (8.64, "8.64s"), (60, "1m0s"),
    (360, "6m0s"), (3725.5, "1h2m5.5s"),
])
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text


@pytest.mark.parametrize("text, seconds", [
    ("6m0s", 360), ("1s", 1), ("20ms", 0.02), ("1h2m3.5s", 3723.5), ("250us", 0.00025), ("12", 12),
    ("0.5", 0.5), ("", None), ("abc", None), ("1s2", None), ("-1s", None), ("s", None), ("nan", None),
])
def test_parse_duration(text, seconds):
    got = parse_duration(text)
    assert got == (pytest.approx(seconds) if seconds is not None else None)


@given(st.floats(min_value=0, max_value=10 ** 6))
def test_duration_round_trip(seconds):
    assert parse_duration(format_duration(seconds)) == pytest.approx(seconds, abs=1e-3)


# ------------------------------------------------------------------- provider headers

NOW = 1_700_000_000.0


def _rfc3339(seconds_from_now: float) -> str:
    return datetime.fromtimestamp(NOW + seconds_from_now, timezone.utc).isoformat().replace("+00:00", "Z")


def test_openai_headers():
    got = provider_limits([("x-ratelimit-limit-requests", "500"), ("X-RateLimit-Remaining-Requests", "499"),
                           ("x-ratelimit-reset-requests", "120ms"), ("x-ratelimit-remaining-tokens", "1000"),
                           ("x-ratelimit-reset-tokens", "6m0s"), ("content-type", "application/json")], NOW)
    assert (got.requests.remaining, got.requests.reset) == (499, pytest.approx(0.12))
    assert (got.tokens.remaining, got.tokens.reset) == (1000, 360)
    assert got.exhausted_until() is None and got.retry_after is None


def test_anthropic_headers():
    got = provider_limits({
        "anthropic-ratelimit-requests-remaining": "0", "anthropic-ratelimit-requests-reset": _rfc3339(7),
        "anthropic-ratelimit-input-tokens-remaining": "3000",
        "anthropic-ratelimit-input-tokens-reset": _rfc3339(2),
        "anthropic-ratelimit-output-tokens-remaining": "500",
        "anthropic-ratelimit-output-tokens-reset": _rfc3339(30)}, NOW)
    assert got.requests.remaining == 0 and got.requests.reset == pytest.approx(7)
    assert got.exhausted_until() == pytest.approx(7)
    bound = got.token_bound()
    assert bound.remaining == 3500 and bound.reset == pytest.approx(30)


@pytest.mark.parametrize("headers, seconds", [
    ({"retry-after": "20"}, 20),
    ({"retry-after": "1.5"}, 1.5),
    ({"retry-after-ms": "250", "retry-after": "1"}, 0.25),
    ({"retry-after": format_datetime(datetime.fromtimestamp(NOW, timezone.utc) + timedelta(seconds=30),
                                     usegmt=True)}, 30),
    ({"retry-after": "soon"}, None),
])
def test_retry_after(headers, seconds):
    got = provider_limits(headers, NOW).retry_after
    assert got == (pytest.approx(seconds) if seconds is not None else None)


@pytest.mark.parametrize("headers", [
    {"x-ratelimit-remaining-requests": "lots"}, {"anthropic-ratelimit-requests-remaining": "-3"},
    {"anthropic-ratelimit-requests-reset": "yesterday"}, {"x-ratelimit-remaining-tokens": "inf"}, {},
])
def test_junk_headers_are_ignored(headers):
    assert not provider_limits(headers, time.time())


def test_unparseable_reset_keeps_remaining():
    got = provider_limits({"anthropic-ratelimit-tokens-remaining": "10",
                           "anthropic-ratelimit-tokens-reset": "not a time"}, NOW)
    assert got.tokens.remaining == 10 and got.tokens.reset is None
    assert not math.isnan(got.tokens.remaining)
