"""The rate scheduler: LLProxy's queueing semantics with small numbers and an injected
clock, token reservations and reconciliation, fairness across tenants, tenant limits,
provider feedback, and the 429s clients see."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp.test_utils import TestServer

from llmproxy.config import Deployment, Model, parse_config
from llmproxy.errors import ProxyError
from llmproxy.metrics import Metrics
pytest.importorskip("llmproxy.middlewares.scheduler", reason="the scheduler middleware is not installed")
from llmproxy.middlewares.scheduler import Scheduler
from llmproxy.plugins import Registry
from llmproxy.middlewares.scheduler import NO_LEASE, RateScheduler
from llmproxy.server import Gateway
from llmproxy.services import Services
from llmproxy.testing import FakeUpstream, TestPrincipal, hang, make_context, reply_json
from llmproxy.usage import Usage

from .conftest import MASTER

AUTH = {"Authorization": f"Bearer {MASTER}"}


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


# ------------------------------------------------------------- the admission, directly


class Harness:
    """A RateScheduler over one deployment, with fabricated requests."""

    def __init__(self, **dep: Any) -> None:
        dep.setdefault("provider", "openai")
        self.dep = Deployment(id="openai:d", **dep)
        self.model = Model(name="m", deployments=(self.dep,))
        self.clock = Clock()
        self.metrics = Metrics()
        self.sched = RateScheduler([self.dep], clock=self.clock, wall=lambda: 0.0, metrics=self.metrics,
                                   default_max_tokens=100)
        self.lane = self.sched.lanes[self.dep.id]

    def ctx(self, tenant: str | None = None, max_tokens: int = 10, content: str = "hi", **limits: Any):
        ctx = make_context({"model": "m", "messages": [{"role": "user", "content": content}],
                            "max_tokens": max_tokens}, model=self.model)
        if tenant is not None or limits:
            team = limits.pop("team", None)
            ctx.principal = TestPrincipal(key_id=f"key-{tenant}", team_id=team and team.team_id, team=team,
                                          **limits)
        return ctx

    def start(self, ctx=None, **kw: Any) -> asyncio.Task:
        return asyncio.create_task(self.sched.acquire(ctx or self.ctx(**kw), self.dep))

    async def advance(self, seconds: float) -> None:
        self.clock.t += seconds
        self.sched.pump_all()
        await settle()

    def level(self, unit: str) -> float:
        lim = next(lim for lim in self.lane.limits if lim.unit == unit)
        return self.sched.table.bucket(lim, self.clock()).level

    def counted(self, reason: str) -> float:
        return self.metrics.values.get(("llmproxy_rate_limited_total", (reason,)), 0.0)


def outcome(task: asyncio.Task) -> str:
    if not task.done():
        return "waiting"
    return "served" if task.exception() is None else "refused"


@pytest.mark.parametrize("wait, queued, reason, retry_after", [
    (2.5, 2, "wait_too_long", "3"),  # the third in line would wait 3 s: refused at once
    (10, 3, "queue_full", "3"),  # three fit in 10 s; the queue holds three
])
async def test_burst_is_split_into_served_queued_and_refused(wait, queued, reason, retry_after):
    h = Harness(rpm=60, burst=10, max_queue_size=3, max_queue_wait=wait)
    tasks = [h.start() for _ in range(70)]
    await settle()
    assert [outcome(t) for t in tasks] == ["served"] * 10 + ["waiting"] * queued + ["refused"] * (60 - queued)
    err = tasks[-1].exception()
    assert isinstance(err, ProxyError) and (err.status, err.type, err.code) == (429, "rate_limit_error",
                                                                                "rate_limit_exceeded")
    assert err.headers == {"retry-after": retry_after, "x-ratelimit-limit-requests": "60",
                           "x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "10s"}
    assert h.counted(reason) == 60 - queued
    assert h.metrics.values[("llmproxy_scheduler_queue_depth", ("openai:d",))] == queued
    for i in range(queued):  # one more each second, in arrival order
        await h.advance(0.999)
        assert outcome(tasks[10 + i]) == "waiting"
        await h.advance(0.001)
        assert outcome(tasks[10 + i]) == "served"
    assert h.lane.size == 0
    assert h.metrics.values[("llmproxy_scheduler_queue_depth", ("openai:d",))] == 0


async def test_queued_request_is_refused_at_its_deadline_when_the_wait_was_unknowable():
    """A provider 429 pauses the deployment for longer than the wait allows: known at once."""
    h = Harness(rpm=60, max_queue_wait=2)
    lease = await h.start()
    lease.feedback(429, [("retry-after", "5")])
    lease.release(None)
    t = h.start()
    await settle()
    assert outcome(t) == "refused" and t.exception().headers["retry-after"] == "5"
    assert not h.sched.has_capacity(h.dep)
    await h.advance(5)
    assert h.sched.has_capacity(h.dep)


async def test_large_max_tokens_waits_while_small_ones_pass():
    # 600 tokens a minute = 10 a second; the bucket holds 600
    h = Harness(tpm=600, max_queue_size=50, max_queue_wait=60)
    filler = await h.start(tenant="filler", max_tokens=499)  # 500 tokens, 100 left
    assert h.level("tokens") == pytest.approx(100)
    large = h.start(tenant="big", max_tokens=300)  # needs 301: (301 - 100) / 10 = 20.1 s
    await settle()
    assert outcome(large) == "waiting"
    small = [h.start(tenant=f"small{i}", max_tokens=9) for i in range(5)]  # 10 tokens each
    await settle()
    assert [outcome(t) for t in small] == ["served"] * 5  # within the large one's slack
    same_tenant = h.start(tenant="big", max_tokens=9)  # FIFO within a tenant: behind the large one
    await settle()
    assert outcome(same_tenant) == "waiting"
    # the large one starts when 301 tokens are there: 50 more were taken, so (301 - 50) / 10 s
    await h.advance(25.0)
    assert outcome(large) == "waiting"
    await h.advance(0.2)
    assert outcome(large) == "served"
    assert outcome(same_tenant) == "waiting"
    await h.advance(1.0)
    assert outcome(same_tenant) == "served"
    filler.release(None)


async def test_small_ones_do_not_pass_beyond_the_large_ones_slack():
    h = Harness(tpm=600, max_queue_size=50, max_queue_wait=21)
    await h.start(tenant="filler", max_tokens=499)  # 100 left
    large = h.start(tenant="big", max_tokens=300)  # needs 301: starts at 20.1 s of a 21 s allowance
    await settle()
    await h.advance(5.0)  # 150 there; 9 could go elsewhere and it would still start by its deadline
    small = h.start(tenant="small", max_tokens=9)  # 10 tokens: too many to pass; it waits its turn
    await settle()
    assert (outcome(large), outcome(small)) == ("waiting", "waiting")
    await h.advance(15.1)
    assert (outcome(large), outcome(small)) == ("served", "waiting")
    await h.advance(1.0)
    assert outcome(small) == "served"


@pytest.mark.parametrize("counts, level_after", [("actual", 6000 - 20), ("reserved", 6000 - 111)])
async def test_reconciliation_returns_unused_tokens(counts, level_after):
    h = Harness(tpm=6000, tpm_counts=counts)
    lease = await h.start(max_tokens=110)  # "hi": 1 + 110 reserved
    assert h.level("tokens") == pytest.approx(6000 - 111)
    lease.release(Usage(prompt_tokens=8, completion_tokens=12))
    assert h.level("tokens") == pytest.approx(level_after)


async def test_overage_is_charged_with_bounded_debt():
    h = Harness(tpm=600, tpm_counts="actual")
    lease = await h.start(max_tokens=500)  # 501 reserved, 99 left
    lease.release(Usage(prompt_tokens=700, completion_tokens=500))  # 699 over
    assert h.level("tokens") == pytest.approx(99 - 699)
    lease2 = h.start(max_tokens=1)
    await settle()
    assert outcome(lease2) == "refused"  # 2 tokens need (600 + 2) / 10 = 60.2 s: past the 30 s default


async def test_fairness_round_robin_across_teams():
    h = Harness(rpm=60, burst=1, max_queue_size=200, max_queue_wait=1000)
    team_a = SimpleNamespace(team_id="A")
    team_b = SimpleNamespace(team_id="B")
    first = await h.start(h.ctx("a", team=team_a))
    flood = [h.start(h.ctx("a", team=team_a)) for _ in range(100)]
    await settle()
    single = h.start(h.ctx("b", team=team_b))
    await settle()
    assert outcome(single) == "waiting"
    served_a = 0
    while outcome(single) == "waiting":
        await h.advance(1.0)
        served_a = sum(outcome(t) == "served" for t in flood)
    assert served_a <= 1  # B's one request went after at most one of A's hundred
    first.release(None)
    for t in flood:
        t.cancel()
    await settle()
    assert h.lane.size == 0


async def test_fifo_within_a_tenant():
    h = Harness(rpm=60, burst=1, max_queue_size=10, max_queue_wait=100)
    await h.start(tenant="a")
    order: list[int] = []

    async def one(i):
        await h.sched.acquire(h.ctx("a"), h.dep)
        order.append(i)
    tasks = [asyncio.create_task(one(i)) for i in range(5)]
    for _ in range(5):
        await h.advance(1.0)
    assert order == [0, 1, 2, 3, 4]
    await asyncio.gather(*tasks)


async def test_round_robin_newcomer_pushes_a_flooders_last_waiter_past_its_deadline():
    """Known as soon as the newcomer arrives, not when the deadline comes."""
    h = Harness(rpm=60, burst=1, max_queue_size=10, max_queue_wait=3)
    await h.start(tenant="a")
    a = [h.start(tenant="a") for _ in range(3)]  # 1 s, 2 s, 3 s
    await settle()
    assert [outcome(t) for t in a] == ["waiting"] * 3
    b = h.start(tenant="b")  # served second: A's third would now start at 4 s
    await settle()
    assert [outcome(t) for t in a] == ["waiting", "waiting", "refused"]
    assert outcome(b) == "waiting"
    await h.advance(1.0)
    await h.advance(1.0)
    assert [outcome(t) for t in a[:2]] + [outcome(b)] == ["served", "waiting", "served"]


async def test_full_queue_refuses_the_biggest_tenants_newest_not_a_newcomer():
    h = Harness(rpm=60, burst=1, max_queue_size=3, max_queue_wait=100)
    await h.start(tenant="a")
    a = [h.start(tenant="a") for _ in range(3)]
    await settle()
    b = h.start(tenant="b")
    await settle()
    assert [outcome(t) for t in a] == ["waiting", "waiting", "refused"]
    assert outcome(b) == "waiting"
    assert h.counted("queue_full") == 1
    again = h.start(tenant="a")  # A holds 2 places, B one: A's newcomer is refused
    await settle()
    assert outcome(again) == "refused"
    for t in a[:2] + [b]:
        t.cancel()
    await settle()


async def test_disconnect_while_queued_leaves_at_once_and_takes_nothing():
    h = Harness(rpm=60, burst=1, tpm=6000, max_queue_size=2, max_queue_wait=100)
    held = await h.start(tenant="a")
    tokens_before = h.level("tokens")
    waiting = [h.start(tenant="a"), h.start(tenant="a")]
    await settle()
    assert h.lane.size == 2
    waiting[0].cancel()
    await settle()
    assert h.lane.size == 1  # gone at once, not at the deadline
    assert h.level("tokens") == tokens_before  # it had taken nothing and gives nothing back
    third = h.start(tenant="a")  # its place is free again
    await settle()
    assert outcome(third) == "waiting"
    await h.advance(1.0)
    assert outcome(waiting[1]) == "served"  # the one behind it moved up
    assert h.metrics.values[("llmproxy_scheduler_queue_depth", ("openai:d",))] == 1
    held.release(None)
    third.cancel()
    await settle()


async def test_cancelled_after_grant_gives_the_grant_back():
    h = Harness(rpm=60, burst=1, max_queue_wait=100)
    await h.start()
    t = h.start()
    await settle()
    h.clock.t += 1
    h.sched.pump_all()  # granted, but the task has not resumed yet
    t.cancel()
    await settle()
    assert t.cancelled()
    assert h.level("requests") == pytest.approx(1)


async def test_retry_elsewhere_gives_everything_back():
    h = Harness(rpm=60, tpm=6000)
    lease = await h.start(max_tokens=100)
    lease.release(None)
    lease.release(Usage(prompt_tokens=1))  # a second release changes nothing
    assert (h.level("requests"), h.level("tokens")) == (60, 6000)


async def test_no_limits_no_lease():
    h = Harness()
    assert await h.start() is NO_LEASE
    assert h.sched.has_capacity(h.dep)


# ------------------------------------------------------------------------ tenant limits


async def test_tenant_rpm_limit_refuses_when_the_wait_would_be_too_long():
    h = Harness(max_queue_wait=5)
    ok = [await h.start(tenant="k", rpm_limit=2), await h.start(tenant="k", rpm_limit=2)]
    t = h.start(tenant="k", rpm_limit=2)  # next request in 30 s
    other = h.start(tenant="j", rpm_limit=2)
    await settle()
    assert (outcome(t), outcome(other)) == ("refused", "served")
    err = t.exception()
    assert err.headers["x-ratelimit-limit-requests"] == "2"
    assert err.headers["retry-after"] == "30"
    assert "key's limit of 2 requests per minute" in err.message
    assert h.counted("tenant_rpm") == 1
    assert ok


async def test_tenant_tpm_waits_within_the_allowance():
    h = Harness(max_queue_wait=30)
    await h.start(tenant="k", tpm_limit=600, max_tokens=559)  # 560 of 600: 40 left, 10 a second
    t = h.start(tenant="k", tpm_limit=600, max_tokens=99)  # 100: (100 - 40) / 10 = 6 s
    await settle()
    assert outcome(t) == "waiting"
    await h.advance(6.0)
    assert outcome(t) == "served"


async def test_team_limit_binds_across_its_keys():
    h = Harness(max_queue_wait=1)
    team = SimpleNamespace(team_id="T", rpm_limit=1)
    await h.start(h.ctx("k1", team=team))
    t = h.start(h.ctx("k2", team=team))
    await settle()
    assert outcome(t) == "refused" and h.counted("tenant_rpm") == 1


async def test_parallel_limit_queues_until_a_slot_frees_or_the_deadline():
    h = Harness(max_queue_wait=10)
    first = await h.start(tenant="k", max_parallel_requests=1)
    second = h.start(tenant="k", max_parallel_requests=1)
    third = h.start(tenant="k", max_parallel_requests=1)
    other = h.start(tenant="j", max_parallel_requests=1)
    await settle()
    assert [outcome(t) for t in (second, third, other)] == ["waiting", "waiting", "served"]
    first.release(Usage(completion_tokens=3))
    await settle()
    assert outcome(second) == "served" and outcome(third) == "waiting"
    await h.advance(10.0)
    assert outcome(third) == "refused" and h.counted("parallel") == 1
    (await second).release(None)
    assert h.sched.table.inflight == {"key:key-j:parallel": 1}


# ---------------------------------------------------------------------- provider feedback


async def test_provider_headers_tighten_the_buckets():
    h = Harness(rpm=60, tpm=60000)
    lease = await h.start()
    lease.feedback(200, [("x-ratelimit-remaining-requests", "3"), ("x-ratelimit-reset-requests", "2s"),
                         ("x-ratelimit-remaining-tokens", "500"), ("x-ratelimit-reset-tokens", "1m0s")])
    assert h.level("requests") == 3 and h.level("tokens") == 500
    assert h.sched.has_capacity(h.dep)


async def test_provider_exhausted_pauses_until_reset():
    h = Harness(rpm=600, max_queue_wait=10)
    lease = await h.start()
    lease.feedback(200, [("x-ratelimit-remaining-requests", "0"), ("x-ratelimit-reset-requests", "2s")])
    assert not h.sched.has_capacity(h.dep)
    t = h.start()
    await settle()
    assert outcome(t) == "waiting"
    await h.advance(1.9)
    assert outcome(t) == "waiting"
    await h.advance(0.1)
    assert outcome(t) == "served"


async def test_anthropic_headers_and_429_retry_after():
    h = Harness(rpm=600, tpm=100000, max_queue_wait=1)
    lease = await h.start()
    lease.feedback(429, [("anthropic-ratelimit-input-tokens-remaining", "100"),
                         ("anthropic-ratelimit-output-tokens-remaining", "50"), ("retry-after", "3")])
    assert h.level("tokens") == 150
    lease.release(None)
    t = h.start()
    await settle()
    assert outcome(t) == "refused" and t.exception().headers["retry-after"] == "3"


# ------------------------------------------------------------ through the whole proxy


class FakePrincipal:
    """A stand-in for the auth middleware: the principal from `x-test-*` headers."""

    def __init__(self, options, services) -> None:
        pass

    async def __call__(self, ctx, call_next):
        h = ctx.headers
        if "x-test-key" in h:
            team = None
            if "x-test-team" in h:
                team = SimpleNamespace(team_id=h["x-test-team"], rpm_limit=None, tpm_limit=None,
                                       max_parallel_requests=None)
            ctx.principal = TestPrincipal(
                key_id=h["x-test-key"], team_id=team and team.team_id, team=team,
                rpm_limit=int(h.get("x-test-rpm", 0)) or None, tpm_limit=None,
                max_parallel_requests=int(h.get("x-test-parallel", 0)) or None)
        return await call_next(ctx)


@pytest.fixture
async def start_proxy(tmp_path):
    servers: list[TestServer] = []

    async def start(config: dict[str, Any], clock: Clock):
        config = dict(config, database={"sqlite_path": str(tmp_path / f"p{len(servers)}.db")},
                      spend={"enabled": False})
        cfg = parse_config(config)
        registry = Registry.from_entry_points()
        registry.middlewares.update(Registry.from_classes(middlewares={"fake_principal": FakePrincipal}).middlewares)
        gateway = Gateway(cfg, registry, services=Services(config=cfg, metrics=Metrics(), clock=clock))
        server = TestServer(gateway.app(), host="127.0.0.1")
        await server.start_server()
        servers.append(server)
        sched = next(m for m in gateway.middlewares if isinstance(m, Scheduler))
        return f"http://127.0.0.1:{server.port}", gateway, sched

    yield start
    for server in servers:
        await server.close()


def _config(upstream: FakeUpstream, **dep: Any) -> dict[str, Any]:
    return {
        "master_key": MASTER,
        "middlewares": ["fake_principal", {"scheduler": {"default_max_tokens": 100}}],
        "router": {"num_retries": 1, "retry_after": 0, "cooldown_seconds": 30},
        "models": [
            {"name": "gpt-test", "deployments": [{"provider": "openai", "model": "gpt-up",
                                                  "api_base": upstream.url + "/v1", "api_key": "k", **dep}]},
            {"name": "claude-test", "deployments": [{"provider": "anthropic", "model": "claude-up",
                                                     "api_base": upstream.url, "api_key": "k", **dep}]},
        ],
    }


CHAT = {"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
MESSAGES = {"model": "claude-test", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}


async def _post(s: aiohttp.ClientSession, url: str, path: str, body: dict, headers: dict | None = None):
    async with s.post(url + path, json=body, headers={**AUTH, **(headers or {})}) as r:
        return r.status, dict(r.headers), await r.read()


async def test_burst_through_the_proxy(upstream, start_proxy):
    clock = Clock()
    url, gateway, sched = await start_proxy(_config(upstream, rpm=60, burst=10, max_queue_size=3,
                                                    max_queue_wait=2.5), clock)
    async with aiohttp.ClientSession() as s:
        tasks = [asyncio.create_task(_post(s, url, "/v1/chat/completions", CHAT)) for _ in range(70)]
        for _ in range(200):
            await asyncio.sleep(0.01)
            if sum(t.done() for t in tasks) == 68:
                break
        done = [t.result() for t in tasks if t.done()]
        assert sorted(status for status, _, _ in done) == [200] * 10 + [429] * 58
        assert len(upstream.requests) == 10
        status, headers, body = next(r for r in done if r[0] == 429)
        assert headers["Retry-After"] == "3"
        assert headers["x-ratelimit-limit-requests"] == "60"
        assert headers["x-ratelimit-remaining-requests"] == "0"
        assert headers["x-ratelimit-reset-requests"] == "10s"
        err = orjson.loads(body)["error"]
        assert (err["type"], err["code"]) == ("rate_limit_error", "rate_limit_exceeded")
        for served in (11, 12):
            clock.t += 1
            sched.admission.pump_all()
            for _ in range(100):
                await asyncio.sleep(0.01)
                if len(upstream.requests) == served:
                    break
            assert len(upstream.requests) == served
        await asyncio.wait(tasks, timeout=5)  # the two served last may still be answering (bounded wait)
        assert all(t.result()[0] == 200 for t in tasks if t.result()[0] != 429)
        async with s.get(url + "/metrics") as r:
            text = await r.text()
    assert 'llmproxy_rate_limited_total{reason="wait_too_long"} 58.0' in text
    assert 'llmproxy_scheduler_queue_depth{deployment="openai:gpt-up"} 0.0' in text
    assert 'llmproxy_scheduler_wait_seconds_count{deployment="openai:gpt-up"} 12.0' in text


async def test_429_on_messages_has_the_anthropic_shape(upstream, start_proxy):
    url, _, _ = await start_proxy(_config(upstream, rpm=60, tpm=6000, burst=1, max_queue_size=0), Clock())
    async with aiohttp.ClientSession() as s:
        assert (await _post(s, url, "/v1/messages", MESSAGES))[0] == 200
        status, headers, body = await _post(s, url, "/v1/messages", MESSAGES)
    assert status == 429
    assert orjson.loads(body)["type"] == "error"
    assert orjson.loads(body)["error"]["type"] == "rate_limit_error"
    assert {k.lower() for k in headers} >= {
        "retry-after", "x-ratelimit-limit-requests", "x-ratelimit-remaining-requests", "x-ratelimit-reset-requests",
        "x-ratelimit-limit-tokens", "x-ratelimit-remaining-tokens", "x-ratelimit-reset-tokens"}
    assert headers["x-ratelimit-limit-tokens"] == "6000"


async def test_actual_usage_reconciles_through_the_proxy(upstream, start_proxy):
    clock = Clock()
    url, gateway, sched = await start_proxy(_config(upstream, tpm=6000, tpm_counts="actual"), clock)
    lim = next(lim for lim in sched.admission.lanes["openai:gpt-up"].limits if lim.unit == "tokens")
    async with aiohttp.ClientSession() as s:
        assert (await _post(s, url, "/v1/chat/completions", CHAT))[0] == 200
    bucket = sched.admission.table.bucket(lim, clock())
    assert bucket.level == pytest.approx(6000 - 18)  # the fake upstream's 11 + 7, not the 1 + 5 reserved


async def test_tenant_limits_through_the_proxy(upstream, start_proxy):
    clock = Clock()
    url, _, sched = await start_proxy(_config(upstream, max_queue_wait=2), clock)
    k1 = {"x-test-key": "k1", "x-test-rpm": "2"}
    async with aiohttp.ClientSession() as s:
        assert [(await _post(s, url, "/v1/chat/completions", CHAT, k1))[0] for _ in range(3)] == [200, 200, 429]
        status, headers, _ = await _post(s, url, "/v1/chat/completions", CHAT, {"x-test-key": "k2"})
        assert status == 200  # another key is not affected
        upstream.push(hang(5))
        par = {"x-test-key": "k3", "x-test-parallel": "1"}
        slow = asyncio.create_task(_post(s, url, "/v1/chat/completions", CHAT, par))
        while not upstream.requests or len(upstream.requests) < 4:
            await asyncio.sleep(0.01)
        queued = asyncio.create_task(_post(s, url, "/v1/chat/completions", CHAT, par))
        await asyncio.sleep(0.05)
        clock.t += 2
        sched.admission.pump_all()
        status, headers, body = await queued
        assert status == 429 and "1 requests in flight" in orjson.loads(body)["error"]["message"]
        slow.cancel()
        await asyncio.gather(slow, return_exceptions=True)
    await asyncio.sleep(0.05)
    assert sched.admission.table.inflight == {}  # the disconnected request's slot came back


async def test_retry_on_another_deployment_moves_the_reservation(start_proxy):
    a, b = await FakeUpstream().start(), await FakeUpstream().start()
    try:
        clock = Clock()
        config = {"master_key": MASTER, "middlewares": ["scheduler"],
                  "router": {"num_retries": 1, "retry_after": 0},
                  "models": [{"name": "m", "deployments": [
                      {"provider": "openai", "model": "a", "api_base": a.url + "/v1", "api_key": "k", "rpm": 60,
                       "weight": 1e6},
                      {"provider": "openai", "model": "b", "api_base": b.url + "/v1", "api_key": "k", "rpm": 60,
                       "weight": 1e-6}]}]}
        url, _, sched = await start_proxy(config, clock)
        a.push(reply_json(503, {}))
        async with aiohttp.ClientSession() as s:
            assert (await _post(s, url, "/v1/chat/completions", {"model": "m", "messages": [
                {"role": "user", "content": "x"}]}))[0] == 200
        adm = sched.admission
        levels = {d: adm.table.bucket(adm.lanes[d].limits[0], clock()).level for d in ("openai:a", "openai:b")}
        assert levels == {"openai:a": 60, "openai:b": 59}
    finally:
        await a.close()
        await b.close()


async def test_router_prefers_a_deployment_with_capacity(start_proxy):
    a, b = await FakeUpstream().start(), await FakeUpstream().start()
    try:
        config = {"master_key": MASTER, "middlewares": ["scheduler"],
                  "models": [{"name": "m", "deployments": [
                      {"provider": "openai", "model": "a", "api_base": a.url + "/v1", "api_key": "k", "rpm": 2,
                       "weight": 1e6},
                      {"provider": "openai", "model": "b", "api_base": b.url + "/v1", "api_key": "k", "rpm": 600,
                       "weight": 1e-6}]}]}
        url, _, _ = await start_proxy(config, Clock())
        async with aiohttp.ClientSession() as s:
            for _ in range(5):
                assert (await _post(s, url, "/v1/chat/completions", {"model": "m", "messages": [
                    {"role": "user", "content": "x"}]}))[0] == 200
        assert (len(a.requests), len(b.requests)) == (2, 3)
    finally:
        await a.close()
        await b.close()


def _forwarder_gives_feedback() -> bool:
    import inspect

    from llmproxy.forwarder import Forwarder
    return "feedback" in inspect.getsource(Forwarder)


@pytest.mark.skipif(not _forwarder_gives_feedback(), reason="the forwarder does not call Lease.feedback yet")
async def test_provider_headers_through_the_proxy(upstream, start_proxy):
    clock = Clock()
    url, _, _ = await start_proxy(_config(upstream, rpm=600, max_queue_wait=2), clock)
    upstream.push(reply_json(200, {"id": "x", "object": "chat.completion", "choices": [],
                                   "usage": {"prompt_tokens": 1, "completion_tokens": 1}},
                             headers={"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "5s"}))
    async with aiohttp.ClientSession() as s:
        status, headers, _ = await _post(s, url, "/v1/chat/completions", CHAT)
        assert status == 200 and "x-ratelimit-remaining-requests" not in headers
        status, headers, _ = await _post(s, url, "/v1/chat/completions", CHAT)
    assert status == 429 and headers["Retry-After"] == "5"
    assert len(upstream.requests) == 1
