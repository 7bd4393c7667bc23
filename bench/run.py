#!/usr/bin/env python3
"""llmproxy benchmark: CPU per request of the proxy against a bare aiohttp floor.

    .venv/bin/python bench/run.py                       # --suite all: core, scheduler, pii, tracing, cache, subscription, pipeline
    .venv/bin/python bench/run.py --suite core          # floor, proxy, proxy-spend, proxy-auth
    .venv/bin/python bench/run.py --suite scheduler     # proxy, proxy-scheduler, proxy-scheduler-redis...
    .venv/bin/python bench/run.py --suite pii           # proxy, proxy-pii on 2 KB prompts; streamed TTFB
    .venv/bin/python bench/run.py --suite cache         # floor, proxy, proxy-cache: hits and misses
    .venv/bin/python bench/run.py --suite pipeline      # floor, proxy, proxy-full (whole chain); 100 KB chats
    .venv/bin/python bench/run.py --suite streams       # memory per open stream, 1000 at once (not in all)
    .venv/bin/python bench/run.py --targets floor,floor-b   # harness self-check, ratio ~1.0
    .venv/bin/python bench/run.py --target proxy-mine=my-extra.yaml
    .venv/bin/python bench/run.py --list                # targets, scenarios and suites known

It starts a mock provider (bench/upstream.py), one process per target (bench/floor.py, or
`python -m llmproxy serve` with a generated config) and a load generator (bench/load.py),
all on free 127.0.0.1 ports. For each scenario it warms every target up, then runs the
targets in turn, --rounds times (floor, proxy, floor, proxy, ...), and for each run reads
the target's CPU time (its whole process tree) before and after. The table gives the median
CPU microseconds per request of each target and its ratio to the first target (the floor),
and for rows with a `ratio_vs` (proxy-auth) a second ratio to that row. Rows with
`seed_keys` (proxy-auth) get --keys virtual keys in their own SQLite store before they
start (bench/seed_keys.py) and are driven with --keys-used of them, round-robin; their
store lookups per request come from `llmproxy_auth_lookups_total` in /metrics.
Rows with `redis` get a private redis-server each, and their Redis calls per request
(INFO commandstats, SLOWLOG); pii rows report the entities found per request
(`llmproxy_pii_redactions_total`); stream scenarios report the time to first byte.
A suite (--suite) is a group of rows and scenarios run as one section with its own table.
The `streams` suite instead starts each row fresh and alone, opens --streams-c long streams
at once and samples the row's RSS: KB per open stream (run_streams_section).
Raw numbers go to bench/results/latest.json. See bench/README.md.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import re
import select
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field, replace as dc_replace
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
MASTER_KEY = "sk-bench-master-0123456789abcdef0123456789"
UPSTREAM_KEY = "sk-upstream-dummy"
CLK_TCK = os.sysconf("SC_CLK_TCK")
T0 = time.monotonic()  # runs record their start relative to this (cache_ttl effects)
DEFAULT_PROXY_CMD = "{python} -m llmproxy serve --config {config}"


# --------------------------------------------------------------------------- scenarios

@dataclass(frozen=True)
class Scenario:
    name: str
    path: str
    body: dict
    check: str        # see bench/load.py
    api: str          # "openai" | "anthropic": which auth headers, which model
    stream: bool
    description: str
    # requests per measured run = --n (--n-stream) times this: the 100 KB scenarios cost
    # several times a small request, so a quarter of the requests is as precise
    n_factor: float = 1.0


def scenario_n(sc: Scenario, args) -> int:
    return max(1, round((args.n_stream if sc.stream else args.n) * sc.n_factor))


CHAT_MESSAGES = [{"role": "user", "content": "hello"}]

# The 2 KB prompts of the pii rows (issue 6): the same notes, once with no personal data
# (but with dates, a version, a price and an order number, so that the number recognizers
# have something to reject) and once with five entities spliced in: an e-mail address, a
# phone number, a Luhn-valid card number, an IPv4 address and an `sk-proj-` key. Both are
# exactly PROMPT_2K_SIZE ASCII characters and begin with a word that differs on every
# request (VARY). `--list` shows them; the built-in recognizers find 0 and 5 entities in
# them (the bench counts llmproxy_pii_redactions_total per run).
PROMPT_2K_SIZE = 2048
_FILLER_SENTENCES = (
    "Please summarise the notes below for the weekly review and keep the tone neutral. ",
    "The team discussed the rollout plan for the gateway, the open questions about caching, ",
    "and the timeline for release 2.4.1, which is due on 2024-03-15 if the load tests pass. ",
    "Latency at the median stayed near 38 ms while the error budget held at 99.9 percent. ",
    "Two customers asked for regional routing; one of them pays about $1,299.00 a month. ",
    "The migration of order 884213 to the new billing system is still waiting for review. ",
    "Nobody objected to moving the retrospective to Thursday afternoon after the demo. ",
    "Action items: update the runbook, add dashboards for queue depth, and rotate on-call. ",
)
PII_SNIPPETS = (
    "Send the summary to jane.doe@example.com when done. ",                       # EMAIL_ADDRESS
    "Her phone is +1 415-555-0132 if anything is unclear. ",                      # PHONE_NUMBER
    "The card on file is 4111 1111 1111 1111 for the invoice. ",                  # CREDIT_CARD (Luhn)
    "The staging host answers on 203.0.113.42 this week. ",                       # IP_ADDRESS
    "Rotate the key sk-proj-Q3vT9kLm2xR7bN4pW8zY1cD6fH0jS5aE before Friday. ",    # API_KEY
)


def _filler(size: int) -> str:
    parts: list[str] = []
    total = 0
    while total < size:  # bounded: every pass adds a non-empty sentence
        parts.append(_FILLER_SENTENCES[len(parts) % len(_FILLER_SENTENCES)])
        total += len(parts[-1])
    return "".join(parts)[:size]


# A word of the prompts that bench/load.py replaces per request by one never sent before,
# so that every request's prompt is new (no cache along the way, such as the pii
# middleware's span cache, answers it from an earlier one); it holds no digit or entity.
VARY = "qzqzqz"
_VARIED_HEAD = f"Ref {VARY}. "


def prompt_2k(with_pii: bool, size: int = PROMPT_2K_SIZE) -> str:
    """The 2 KB notes (starting with the VARY word); with_pii: the PII_SNIPPETS spread
    evenly over them, same length."""
    if not with_pii:
        return _VARIED_HEAD + _filler(size - len(_VARIED_HEAD))
    text = _VARIED_HEAD + _filler(size - len(_VARIED_HEAD) - sum(len(s) for s in PII_SNIPPETS))
    parts, pos = [], 0
    for j, snippet in enumerate(PII_SNIPPETS):  # each after the end of a sentence
        cut = text.find(". ", max(pos, len(text) * (j + 1) // (len(PII_SNIPPETS) + 1))) + 2
        parts += [text[pos:cut], snippet]
        pos = cut
    parts.append(text[pos:])
    out = "".join(parts)
    assert len(out) == size, len(out)
    return out


CHAT_2K = [{"role": "user", "content": prompt_2k(False)}]
CHAT_2K_PII = [{"role": "user", "content": prompt_2k(True)}]
# A conversation's next turn: the same 2 KB history with five entities on every request
# (what a chat client resends), then a short new question that differs per request.
CHAT_HISTORY_PII = [{"role": "user", "content": prompt_2k(True).replace(VARY, "before")},
                    {"role": "assistant", "content": "Noted."},
                    {"role": "user", "content": f"Ref {VARY}: which of these is due first?"}]

# The ~100 KB conversation of chat-100k (issue 11): CONV_TURNS alternating user/assistant
# turns of CONV_TURN_SIZE characters of plain English (no digits, no entity, so pii finds
# nothing), built deterministically from the sentences below (a fixed LCG picks them, so
# the turns differ from each other), then a short new user question that begins with the
# VARY word: the history is what a chat client resends, the question is new every request.
CONV_TURNS = 250
CONV_TURN_SIZE = 400
_USER_SENTENCES = (
    "Could you explain that part again in simpler words? ",
    "I am still not sure how the caching layer decides what to keep. ",
    "What would happen if the queue grew faster than the workers could drain it? ",
    "My team wants to move the nightly reports to the new cluster next month. ",
    "Is there a way to keep the old behaviour for the clients that depend on it? ",
    "Please compare the two approaches and tell me which one is easier to operate. ",
    "We noticed that the dashboards lag behind when the traffic peaks in the evening. ",
    "How should we phrase the announcement so that nobody panics about the change? ",
    "I would like a short checklist that a new engineer can follow on their first day. ",
    "Which of these steps can safely run in parallel, and which must wait? ",
)
_ASSISTANT_SENTENCES = (
    "Sure, here is a shorter way to look at it. ",
    "The cache keeps the entries that were used most recently and drops the oldest ones first. ",
    "When the queue grows faster than it drains, the wait time rises until requests are turned away. ",
    "Moving the reports is mostly a matter of copying the schedules and checking the permissions. ",
    "You can keep the old behaviour behind a flag and switch clients over one at a time. ",
    "The first approach is simpler to run, while the second one scales further with less tuning. ",
    "Dashboards usually lag because the collectors batch their writes when they are busy. ",
    "A calm announcement explains what changes, when it happens, and whom to ask for help. ",
    "A good checklist covers access, the local setup, the deploy process and the on-call rota. ",
    "The read-only checks can run side by side, but the migration itself must run alone. ",
)


def _turn_text(sentences: tuple[str, ...], seed: int, size: int) -> str:
    parts: list[str] = []
    total = 0
    x = seed
    while total < size:  # bounded: every pass adds a non-empty sentence
        x = (x * 1103515245 + 12345) % (1 << 31)
        parts.append(sentences[(x >> 16) % len(sentences)])
        total += len(parts[-1])
    return "".join(parts)[:size].rstrip() + "."


def conversation_100k(turns: int = CONV_TURNS, size: int = CONV_TURN_SIZE) -> list[dict]:
    """turns alternating user/assistant messages (user first) of about size characters
    each, then the new user question with the VARY word: about turns * size bytes."""
    msgs = [{"role": "user" if i % 2 == 0 else "assistant",
             "content": _turn_text(_USER_SENTENCES if i % 2 == 0 else _ASSISTANT_SENTENCES, i + 1, size)}
            for i in range(turns)]
    msgs.append({"role": "user", "content": f"Ref {VARY}. Thanks. Can you sum up what we agreed on so far?"})
    return msgs


CHAT_100K = conversation_100k()

# The 1 MB adversarial prompt of chat-1m-adversarial (issue 12): blocks of the inputs that
# once cost the pii recognizers more than linear time (a run of a million digits took 20 s
# in the C pass), each about ADVERSARIAL_BLOCK characters, one after the other.
ADVERSARIAL_SIZE = 1_000_000
ADVERSARIAL_BLOCK = 40_000
_ADVERSARIAL_UNITS = ("1", "1 ", "12-", "1.", "+1 ", "DE89 ", "1:", "a:", "ab:", "::1 ", "@", "a@", "a.",
                      "sk-", "sk-proj-", "xoxb-", "AKIA", "ghp_", "eyJ", "Bearer ", "a", "4111 ", "0 12 ")


def prompt_adversarial(size: int = ADVERSARIAL_SIZE, block: int = ADVERSARIAL_BLOCK) -> str:
    blocks, total, i = [_VARIED_HEAD], len(_VARIED_HEAD), 0
    while total < size:  # bounded: every pass adds a block
        unit = _ADVERSARIAL_UNITS[i % len(_ADVERSARIAL_UNITS)]
        blocks.append((unit * (block // len(unit) + 1))[:block] + "\n")
        total += block + 1
        i += 1
    return "".join(blocks)[:size]


CHAT_1M_ADVERSARIAL = [{"role": "user", "content": prompt_adversarial()}]

# The cache suite's misses: "hello" with the VARY word, so that every request is new.
CHAT_NEW = [{"role": "user", "content": f"Ref {VARY}. hello"}]

SCENARIOS: dict[str, Scenario] = {s.name: s for s in [
    Scenario("chat", "/v1/chat/completions",
             {"model": "bench-model", "messages": CHAT_MESSAGES},
             "openai-json", "openai", False, "OpenAI chat, non-stream"),
    Scenario("chat-stream", "/v1/chat/completions",
             {"model": "bench-model", "messages": CHAT_MESSAGES, "stream": True},
             "openai-sse", "openai", True, "OpenAI chat, stream (24 chunks + [DONE])"),
    Scenario("chat-stream-paced", "/v1/chat/completions",
             {"model": "bench-model", "messages": CHAT_MESSAGES, "stream": True,
              "bench_chunk_delay_ms": 1},
             "openai-sse", "openai", True,
             "OpenAI chat, stream, 1 ms between events (each event read on its own)"),
    Scenario("chat-2k", "/v1/chat/completions",
             {"model": "bench-model", "messages": CHAT_2K},
             "openai-json", "openai", False, "OpenAI chat, non-stream, 2 KB prompt, no PII"),
    Scenario("chat-2k-stream", "/v1/chat/completions",
             {"model": "bench-model", "messages": CHAT_2K, "stream": True},
             "openai-sse", "openai", True, "OpenAI chat, stream, 2 KB prompt, no PII"),
    Scenario("chat-2k-pii", "/v1/chat/completions",
             {"model": "bench-model", "messages": CHAT_2K_PII},
             "openai-json", "openai", False,
             "OpenAI chat, non-stream, the 2 KB prompt with 5 entities (e-mail, phone, card, IPv4, sk-proj key)"),
    Scenario("chat-2k-pii-stream", "/v1/chat/completions",
             {"model": "bench-model", "messages": CHAT_2K_PII, "stream": True},
             "openai-sse", "openai", True, "OpenAI chat, stream, the 2 KB prompt with 5 entities"),
    Scenario("chat-history-pii", "/v1/chat/completions",
             {"model": "bench-model", "messages": CHAT_HISTORY_PII},
             "openai-json", "openai", False,
             "OpenAI chat, non-stream, the next turn of a conversation: the 2 KB history with 5 entities "
             "(the same every request) and a new question"),
    Scenario("chat-100k", "/v1/chat/completions",
             {"model": "bench-model", "messages": CHAT_100K},
             "openai-json", "openai", False,
             f"OpenAI chat, non-stream, a ~100 KB conversation ({CONV_TURNS} turns of ~{CONV_TURN_SIZE} "
             "characters) and a new question every request; N/4 requests a run", n_factor=0.25),
    Scenario("chat-100k-stream", "/v1/chat/completions",
             {"model": "bench-model", "messages": CHAT_100K, "stream": True},
             "openai-sse", "openai", True, "OpenAI chat, stream, the ~100 KB conversation; N/4 requests a run",
             n_factor=0.25),
    Scenario("chat-1m-adversarial", "/v1/chat/completions",
             {"model": "bench-model", "messages": CHAT_1M_ADVERSARIAL},
             "openai-json", "openai", False,
             "OpenAI chat, non-stream, a 1 MB prompt of inputs that once made the pii recognizers "
             "superlinear (digit runs, separators, @ runs, key prefixes, hex and colons); N/100 requests a run",
             n_factor=0.01),
    # the streams suite (memory per open stream): each stream lasts about 4.6 s (23 gaps of
    # --streams-delay-ms, 200 by default, which replaces the value here); too slow for --rounds
    Scenario("chat-stream-open", "/v1/chat/completions",
             {"model": "bench-model", "messages": CHAT_MESSAGES, "stream": True,
              "bench_chunk_delay_ms": 200},
             "openai-sse", "openai", True,
             "OpenAI chat, stream, 200 ms between events (~4.6 s a stream): the streams suite only"),
    # the cache suite (issue 14): chat and chat-stream send the same request every time (a
    # cache answers all but the first); these send a new one every time (a cache misses all)
    Scenario("chat-new", "/v1/chat/completions",
             {"model": "bench-model", "messages": CHAT_NEW},
             "openai-json", "openai", False, "OpenAI chat, non-stream, a new short prompt every request"),
    Scenario("chat-new-stream", "/v1/chat/completions",
             {"model": "bench-model", "messages": CHAT_NEW, "stream": True},
             "openai-sse", "openai", True, "OpenAI chat, stream, a new short prompt every request"),
    Scenario("messages", "/v1/messages",
             {"model": "bench-claude", "max_tokens": 64, "messages": CHAT_MESSAGES},
             "anthropic-json", "anthropic", False, "Anthropic messages, non-stream"),
    Scenario("messages-stream", "/v1/messages",
             {"model": "bench-claude", "max_tokens": 64, "messages": CHAT_MESSAGES,
              "stream": True},
             "anthropic-sse", "anthropic", True, "Anthropic messages, stream"),
]}
DEFAULT_SCENARIOS = "chat,chat-stream"


def scenario_headers(sc: Scenario) -> dict:
    if sc.api == "anthropic":
        return {"x-api-key": MASTER_KEY, "anthropic-version": "2023-06-01"}
    return {"Authorization": f"Bearer {MASTER_KEY}"}


# --------------------------------------------------------------------------- targets
#
# A target is a process the load is sent to. kind "floor" runs bench/floor.py; kind
# "proxy" runs the proxy command (default `python -m llmproxy serve --config FILE`) with
# the base config below, deep-merged with `config`, with `deployment` merged into every
# deployment. Add a row here (or pass --target NAME=EXTRA.yaml) to benchmark a feature.

@dataclass
class TargetSpec:
    name: str
    kind: str                       # "floor" | "proxy"
    description: str = ""
    config: dict = field(default_factory=dict)
    deployment: dict = field(default_factory=dict)
    extra_files: list[str] = field(default_factory=list)
    # seed_keys: before the proxy starts, --keys virtual keys are created in a SQLite store
    # of its own (database.sqlite_path = <temp dir>/<row>/bench.db), and the load uses
    # --keys-used of them round-robin instead of the master key (needs the `auth` middleware).
    seed_keys: bool = False
    seed_args: tuple[str, ...] = ()  # more arguments of bench/seed_keys.py for this row
    ratio_vs: str | None = None     # a second ratio column: this row against that row
    # redis: the harness starts a private redis-server for this row (127.0.0.1, a free port,
    # no persistence), sets `redis_url` to it, and counts the Redis commands of each run
    # (INFO commandstats, SLOWLOG): "redis calls/req". Stopped by PID with the row.
    redis: bool = False


_NO_LIMIT_DEPLOYMENT = {"rpm": 100_000_000, "tpm": 100_000_000_000, "max_queue_size": 10_000}

ROWS: list[TargetSpec] = [
    TargetSpec("floor", "floor", "bare aiohttp pass-through (bench/floor.py)"),
    TargetSpec("floor-b", "floor", "a second floor instance: harness self-check, ratio ~1.0"),
    TargetSpec("proxy", "proxy", "llmproxy core, middlewares: [] (access log and metrics on, spend log off)",
               config={"spend": {"enabled": False}}),
    TargetSpec("proxy-spend", "proxy", "llmproxy core + spend log (embedded SQLite, batched)"),
    # issue 12: every record also appended to a write-ahead segment, fsync'd every 50 ms in a
    # thread; second ratio against proxy-spend: what durability: wal costs per request
    TargetSpec("proxy-spend-wal", "proxy", "proxy-spend with spend.durability: wal; second ratio "
               "against proxy-spend", config={"spend": {"durability": "wal"}}, ratio_vs="proxy-spend"),
    TargetSpec("proxy-auth", "proxy", "proxy + auth middleware, --keys virtual keys in SQLite, "
               "--keys-used of them round-robin (spend log off); second ratio against proxy",
               config={"spend": {"enabled": False}, "middlewares": ["auth"]},
               seed_keys=True, ratio_vs="proxy"),
    TargetSpec("proxy-auth-teams", "proxy", "proxy-auth with every key in one of the 10 teams (the baseline "
               "of proxy-auth-subscription)",
               config={"spend": {"enabled": False}, "middlewares": ["auth"]},
               seed_keys=True, seed_args=("--team-share", "1"), ratio_vs="proxy"),
    TargetSpec("proxy-auth-subscription", "proxy", "proxy-auth-teams + the subscription middleware (db "
               "source), a subscription per team, warm; second ratio against proxy-auth-teams",
               config={"spend": {"enabled": False}, "middlewares": ["auth", "subscription"]},
               seed_keys=True, seed_args=("--team-share", "1", "--subscriptions"), ratio_vs="proxy-auth-teams"),
    TargetSpec("proxy-scheduler", "proxy", "proxy + scheduler, local buckets, limits far above the "
               "load (spend log off); second ratio against proxy",
               config={"spend": {"enabled": False},
                       "middlewares": [{"scheduler": {"default_max_tokens": 256}}]},
               deployment=_NO_LIMIT_DEPLOYMENT, ratio_vs="proxy"),
    TargetSpec("proxy-scheduler-redis", "proxy", "proxy-scheduler with redis_url: a private "
               "redis-server the harness starts; Redis calls per request counted",
               config={"spend": {"enabled": False},
                       "middlewares": [{"scheduler": {"default_max_tokens": 256}}]},
               deployment=_NO_LIMIT_DEPLOYMENT, ratio_vs="proxy", redis=True),
    # tpm_counts: reserved (the default, OpenAI's way) keeps the reservation, so a completion
    # with no tenant limits has nothing to tell Redis; `actual` gives unused tokens back, one
    # SETTLE per completion: the worst case of "one per admission, one per completion"
    TargetSpec("proxy-scheduler-redis-actual", "proxy", "proxy-scheduler-redis with tpm_counts: "
               "actual (tokens reconciled: one SETTLE script per completion)",
               config={"spend": {"enabled": False},
                       "middlewares": [{"scheduler": {"default_max_tokens": 256}}]},
               deployment={**_NO_LIMIT_DEPLOYMENT, "tpm_counts": "actual"}, ratio_vs="proxy", redis=True),
    TargetSpec("proxy-pii", "proxy", "proxy + pii, mode mask, built-in recognizers (spend log off); "
               "second ratio against proxy",
               config={"spend": {"enabled": False}, "middlewares": [{"pii": {"mode": "mask"}}]},
               ratio_vs="proxy"),
    # issue 11: the whole chain as production runs it, on top of `proxy`: auth with the seeded
    # keys (round-robin, like proxy-auth), pii mask, the scheduler with limits that never bind
    # (like proxy-scheduler), and the spend log on, in the row's own SQLite (bench.db, where the
    # keys are). Its first ratio is against the floor; the second against proxy
    TargetSpec("proxy-full", "proxy", "proxy + auth (seeded keys) + pii mask + scheduler (limits far above "
               "the load) + spend log, all in the row's own SQLite; second ratio against proxy",
               config={"spend": {"enabled": True},
                       "middlewares": ["auth", {"pii": {"mode": "mask"}},
                                       {"scheduler": {"default_max_tokens": 256}}]},
               deployment=_NO_LIMIT_DEPLOYMENT, seed_keys=True, ratio_vs="proxy"),
    # issue 13: tracing outermost, spans exported over OTLP/HTTP to the bench's upstream
    # (which takes /v1/traces and discards it, like a collector), spend log off; second ratio
    # against proxy
    TargetSpec("proxy-tracing", "proxy", "proxy + tracing exporting OTLP/HTTP to a local receiver (spend "
               "log off); second ratio against proxy",
               config={"spend": {"enabled": False},
                       "middlewares": [{"tracing": {"endpoint": "os.environ/BENCH_UPSTREAM_URL"}}]},
               ratio_vs="proxy"),
    # issue 13: usage events appended to a file (the jsonl sink, flushed in a thread every 0.5 s)
    TargetSpec("proxy-jsonl", "proxy", "proxy + the jsonl usage-event sink writing to a file (spend log off); "
               "second ratio against proxy",
               config={"spend": {"enabled": False}, "event_sinks": [{"jsonl": {"path": "events.jsonl"}}]},
               ratio_vs="proxy"),
    # issue 14: the response cache, in-process LRU (no Redis); on chat / chat-stream every
    # measured request is a hit (the warm-up stored the answer), on chat-new(-stream) a miss
    TargetSpec("proxy-cache", "proxy", "proxy + the cache middleware, in-process LRU (spend log off); "
               "second ratio against proxy",
               config={"spend": {"enabled": False}, "middlewares": [{"cache": {}}]},
               ratio_vs="proxy"),
    TargetSpec("proxy-webhook", "proxy", "proxy + the webhook usage-event sink POSTing batches to the bench "
               "upstream (spend log off); second ratio against proxy",
               config={"spend": {"enabled": False},
                       "event_sinks": [{"webhook": {"url": "os.environ/BENCH_WEBHOOK_URL"}}]},
               ratio_vs="proxy"),
]



@dataclass(frozen=True)
class Suite:
    name: str
    targets: tuple[str, ...]      # the first is the baseline of the ratios
    scenarios: tuple[str, ...]
    description: str
    # "cpu": rounds of CPU per request (run_section); "streams": memory per open stream, each
    # row started fresh, alone, for one run of --streams-c concurrent streams (run_streams_section)
    kind: str = "cpu"


# `--suite NAME` runs these sections one after the other (each its own processes and table);
# `all` runs every one of them. --targets / --scenarios / --target make one custom section.
SUITES: dict[str, Suite] = {s.name: s for s in [
    Suite("core", ("floor", "proxy", "proxy-spend", "proxy-spend-wal", "proxy-auth"), ("chat", "chat-stream"),
          "the proxy against the floor; spend log, in memory and with its WAL (issue 12); auth (issue 4)"),
    Suite("scheduler", ("proxy", "proxy-scheduler", "proxy-scheduler-redis", "proxy-scheduler-redis-actual"),
          ("chat", "chat-stream"),
          "scheduler on, limits never binding, local and with a private Redis (issue 5)"),
    Suite("pii", ("proxy", "proxy-pii"),
          ("chat-2k", "chat-2k-stream", "chat-2k-pii", "chat-2k-pii-stream", "chat-history-pii",
           "chat-1m-adversarial"),
          "pii mask on a 2 KB prompt without and with 5 entities, every prompt new; streamed TTFB; "
          "a conversation's next turn (issue 6); a 1 MB adversarial prompt (issue 12)"),
    Suite("tracing", ("proxy", "proxy-tracing", "proxy-jsonl", "proxy-webhook"), ("chat", "chat-stream"),
          "tracing on, exporting to a local OTLP receiver, and the jsonl usage-event sink, against the "
          "same proxy without them (issue 13)"),
    Suite("cache", ("floor", "proxy", "proxy-cache"), ("chat", "chat-stream", "chat-new", "chat-new-stream"),
          "the response cache: hits (the same request every time) against the floor's pass-through, "
          "misses (a new request every time) against the proxy without it (issue 14)"),
    Suite("subscription", ("proxy", "proxy-auth-teams", "proxy-auth-subscription"), ("chat", "chat-stream"),
          "the subscription middleware's warm lookup against auth alone, every key in a team (issue 14)"),
    Suite("pipeline", ("floor", "proxy", "proxy-full"),
          ("chat", "chat-stream", "chat-100k", "chat-100k-stream"),
          "the whole chain (auth, pii, scheduler, spend log) on small and ~100 KB conversations (issue 11)"),
    # not in `all`: about 1 minute, and a memory measurement rather than CPU rounds
    Suite("streams", ("floor", "proxy", "proxy-full"), ("chat-stream-open",),
          "memory per open stream: --streams-c concurrent ~4.6 s streams per row, RSS sampled "
          "every 50 ms, and their time to first byte (issue 11)", kind="streams"),
]}
ALL_SUITES = ("core", "scheduler", "pii", "tracing", "cache", "subscription", "pipeline")
DEFAULT_SUITE = "all"   # `make bench`; see bench/README.md for its duration
DEFAULT_TARGETS = ",".join(SUITES["core"].targets)


def deep_merge(base: dict, extra: dict) -> dict:
    """Merge extra into base in place: dicts recursively, anything else (lists too) replaces."""
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            deep_merge(base[k], v)
        else:
            base[k] = copy.deepcopy(v)
    return base


def _read_yaml_map(path: str) -> dict:
    import yaml

    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise SystemExit(f"{path}: expected a YAML mapping at the top level")
    return data


def load_extra_yaml(path: str) -> tuple[dict, dict]:
    """An extra config file: YAML merged into the proxy config; its optional top-level key
    `bench_deployment` is merged into every deployment instead. The top-level keys
    `bench_seed_keys`, `bench_ratio_vs` and `bench_redis` are row settings (see
    resolve_targets), not config."""
    data = _read_yaml_map(path)
    data.pop("bench_seed_keys", None)
    data.pop("bench_ratio_vs", None)
    data.pop("bench_redis", None)
    dep = data.pop("bench_deployment", None) or {}
    if not isinstance(dep, dict):
        raise SystemExit(f"{path}: bench_deployment must be a mapping")
    return data, dep


def proxy_config(spec: TargetSpec, port: int, upstream_port: int,
                 scenarios: list[Scenario]) -> dict:
    cfg: dict = {
        "server": {"host": "127.0.0.1", "port": port},
        "master_key": MASTER_KEY,
        "models": [{
            "name": "bench-model",
            "deployments": [{
                "provider": "openai", "model": "bench-model",
                "api_base": f"http://127.0.0.1:{upstream_port}/v1", "api_key": UPSTREAM_KEY,
            }],
        }],
        "middlewares": [],
    }
    if any(sc.api == "anthropic" for sc in scenarios):
        cfg["models"].append({
            "name": "bench-claude",
            "deployments": [{
                "provider": "anthropic", "model": "bench-claude",
                "api_base": f"http://127.0.0.1:{upstream_port}", "api_key": UPSTREAM_KEY,
            }],
        })
    deep_merge(cfg, spec.config)
    dep_extra = dict(spec.deployment)
    for path in spec.extra_files:
        data, dep = load_extra_yaml(path)
        deep_merge(cfg, data)
        deep_merge(dep_extra, dep)
    if dep_extra:
        for model in cfg.get("models", []):
            for dep in model.get("deployments", []):
                deep_merge(dep, dep_extra)
    return cfg


# --------------------------------------------------------------------------- /proc

def _read_stat(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat from field 3 (state) on; None if the process is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read().decode("ascii", "replace")
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return raw[raw.rfind(")") + 2:].split()   # comm may contain spaces and parentheses


# indices into _read_stat()'s list: field number - 3
_PPID, _UTIME, _STIME, _CUTIME, _CSTIME, _STARTTIME = 1, 11, 12, 13, 14, 19


def descendants(pid: int) -> list[tuple[int, int]]:
    """(pid, starttime) of every live descendant of pid, by walking /proc/*/stat ppids."""
    children: dict[int, list[int]] = {}
    start: dict[int, int] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        st = _read_stat(int(name))
        if st is None:
            continue
        children.setdefault(int(st[_PPID]), []).append(int(name))
        start[int(name)] = int(st[_STARTTIME])
    out: list[tuple[int, int]] = []
    frontier = [pid]
    seen = {pid}
    while frontier:  # bounded: each pid is visited once
        nxt = []
        for p in frontier:
            for c in children.get(p, ()):
                if c not in seen:
                    seen.add(c)
                    out.append((c, start[c]))
                    nxt.append(c)
        frontier = nxt
    return out


def _schedstat_ns(pid: int) -> int:
    """On-CPU nanoseconds of all live threads of pid (/proc/<pid>/task/*/schedstat)."""
    total = 0
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except (FileNotFoundError, ProcessLookupError):
        return 0
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat", "rb") as f:
                total += int(f.read().split()[0])
        except (FileNotFoundError, ProcessLookupError, ValueError, IndexError):
            pass
    return total


def tree_cpu(pid: int) -> dict:
    """CPU used so far by pid and its live descendants.

    ticks: utime+stime (+cutime+cstime, the reaped children) from /proc/<pid>/stat, in
    clock ticks (1/CLK_TCK s), covers every thread, 10 ms resolution.
    ns: sum of /proc/<pid>/task/*/schedstat run time, nanosecond resolution."""
    pids = [pid] + [p for p, _ in descendants(pid)]
    ticks = 0
    ns = 0
    for p in pids:
        st = _read_stat(p)
        if st is None:
            continue
        ticks += int(st[_UTIME]) + int(st[_STIME]) + int(st[_CUTIME]) + int(st[_CSTIME])
        ns += _schedstat_ns(p)
    return {"ticks": ticks, "ns": ns, "pids": len(pids)}


def _vm_rss_kb(pid: int) -> int | None:
    """VmRSS of pid in kB (/proc/<pid>/status); None if it is gone (a zombie has none)."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmRSS:"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError, PermissionError, ValueError, IndexError):
        pass
    return None


def tree_rss_kb(pid: int, pids: list[int] | None = None) -> int:
    """VmRSS summed over pid and its live descendants (or over pids), in kB. Pages shared
    between processes (forked workers) count once per process."""
    if pids is None:
        pids = [pid] + [p for p, _ in descendants(pid)]
    return sum(v for v in map(_vm_rss_kb, pids) if v)


class RssSampler(threading.Thread):
    """Samples tree_rss_kb(pid) every `interval` seconds, from start() to stop(), in a thread
    of the harness (the main thread waits for the load generator meanwhile). The process
    tree is re-read once a second (walking /proc costs more than reading a status file)."""

    def __init__(self, pid: int, interval: float) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.interval = interval
        self.samples: list[tuple[float, int]] = []   # (seconds since start, kB)
        self._halt = threading.Event()
        self.t0 = 0.0

    def run(self) -> None:
        self.t0 = time.monotonic()
        pids: list[int] = []
        tree_at = -1.0
        k = 0
        while not self._halt.is_set():  # bounded: stop() sets the event
            now = time.monotonic()
            if now - tree_at >= 1.0:
                pids = [self.pid] + [p for p, _ in descendants(self.pid)]
                tree_at = now
            self.samples.append((round(now - self.t0, 4), tree_rss_kb(self.pid, pids)))
            k += 1
            self._halt.wait(max(0.0, self.t0 + k * self.interval - time.monotonic()))

    def stop(self) -> list[tuple[float, int]]:
        self._halt.set()
        self.join(5.0)
        return self.samples


def raise_nofile_limit() -> dict:
    """Raise this process's soft RLIMIT_NOFILE to its hard limit; the processes the harness
    starts inherit it (a stream holds two sockets in the target, one in the load generator
    and one in the upstream)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        except (ValueError, OSError):
            pass
    new_soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return {"soft_before": soft, "soft": new_soft, "hard": hard}


def schedstat_available() -> bool:
    try:
        with open(f"/proc/{os.getpid()}/task/{os.getpid()}/schedstat") as f:
            int(f.read().split()[0])
        return True
    except (OSError, ValueError, IndexError):
        return False


# --------------------------------------------------------------------------- processes

def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


class Proc:
    """A child process whose output goes to a log file; stopped by PID."""

    def __init__(self, name: str, argv: list[str], log_path: Path, cwd: Path,
                 env: dict | None = None, **popen_kw) -> None:
        self.name = name
        self.argv = argv
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.popen = subprocess.Popen(
            argv, cwd=cwd, env=env, stdin=popen_kw.pop("stdin", subprocess.DEVNULL),
            stdout=popen_kw.pop("stdout", self._log), stderr=self._log,
            start_new_session=True, **popen_kw)
        self.pid = self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 64 * 1024))
                text = f.read().decode("utf-8", "replace")
        except OSError as e:
            return f"(cannot read {self.log_path}: {e})"
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, wait, SIGKILL if needed; then SIGKILL any descendant left behind
        (checked by start time, so a recycled PID is never hit)."""
        try:
            if self.popen.poll() is None:
                kids = descendants(self.pid)
                self.popen.send_signal(signal.SIGTERM)
                try:
                    self.popen.wait(timeout)
                except subprocess.TimeoutExpired:
                    self.popen.kill()
                    self.popen.wait(5)
                for pid, start in kids:
                    st = _read_stat(pid)
                    if st is not None and int(st[_STARTTIME]) == start:
                        try:
                            os.kill(pid, signal.SIGKILL)
                        except ProcessLookupError:
                            pass
        finally:
            self._log.close()


class LoadClient:
    """bench/load.py --serve: one JSON command per line in, one JSON result per line out."""

    def __init__(self, python: str, log_path: Path) -> None:
        self.proc = Proc("load", [python, str(BENCH / "load.py"), "--serve"], log_path, REPO,
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0)
        self._buf = b""

    def run(self, cmd: dict, timeout: float) -> dict:
        p = self.proc.popen
        p.stdin.write(json.dumps(cmd).encode() + b"\n")
        p.stdin.flush()
        deadline = time.monotonic() + timeout
        fd = p.stdout.fileno()
        while b"\n" not in self._buf:  # bounded by the deadline
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"load generator gave no answer in {timeout:.0f}s")
            ready, _, _ = select.select([fd], [], [], remaining)
            if ready:
                chunk = os.read(fd, 65536)
                if not chunk:
                    raise RuntimeError("load generator exited:\n" + self.proc.log_tail())
                self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        result = json.loads(line)
        if "fatal" in result:
            raise RuntimeError(f"load generator failed: {result['fatal']}")
        return result

    def stop(self) -> None:
        try:
            if self.proc.popen.stdin:
                self.proc.popen.stdin.close()  # EOF ends its command loop
            self.proc.popen.wait(5)
        except (subprocess.TimeoutExpired, OSError):
            pass
        self.proc.stop()


def wait_ready(proc: Proc, url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:  # bounded by the deadline
        if not proc.alive():
            raise StartError(proc, f"exited with code {proc.popen.returncode} before ready")
        try:
            status, _ = http_get(url, timeout=1.0)
            if status == 200:
                return
            last = f"HTTP {status}"
        except OSError as e:
            last = str(e)
        time.sleep(0.1)
    raise StartError(proc, f"not ready after {timeout:.0f}s ({url}: {last})")


class StartError(Exception):
    def __init__(self, proc: Proc, why: str) -> None:
        super().__init__(f"{proc.name} {why}")
        self.proc = proc


# --------------------------------------------------------------------------- private Redis
#
# A `redis` row gets its own redis-server: 127.0.0.1, a free port, no RDB, no AOF, its files
# in the row's temp dir, stopped by PID with the row. The slow log records every command
# (slowlog-log-slower-than 0), so that the harness can tell the proxy's own round trips
# (top-level commands, with their client address) from the commands a Lua script runs
# inside Redis (client "?:0") and name each script (TAKE, SETTLE, HEARTBEAT) by its SHA.
# That costs the Redis process a little CPU, never the proxy's.

SLOWLOG_MAX = 1_000_000
SCRIPT_COMMANDS = ("evalsha", "eval", "evalsha_ro", "eval_ro", "fcall", "fcall_ro")


class RedisProbe:
    """A minimal RESP client (no dependency) for the harness's own INFO and SLOWLOG calls."""

    def __init__(self, port: int, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self._rf = self.sock.makefile("rb")
        self.addr = "127.0.0.1:%d" % self.sock.getsockname()[1]  # to skip our own commands

    def call(self, *args):
        out = [b"*%d\r\n" % len(args)]
        for a in args:
            b = a if isinstance(a, bytes) else str(a).encode()
            out.append(b"$%d\r\n%s\r\n" % (len(b), b))
        self.sock.sendall(b"".join(out))
        return self._read()

    def _read(self):
        line = self._rf.readline()
        if not line.endswith(b"\r\n"):
            raise ConnectionError("redis closed the connection")
        kind, rest = line[:1], line[1:-2]
        if kind == b"+":
            return rest.decode()
        if kind == b"-":
            raise RuntimeError("redis: " + rest.decode("utf-8", "replace"))
        if kind == b":":
            return int(rest)
        if kind == b"$":
            n = int(rest)
            return None if n < 0 else self._rf.read(n + 2)[:-2]
        if kind == b"*":
            n = int(rest)
            return None if n < 0 else [self._read() for _ in range(n)]  # bounded by n
        raise RuntimeError(f"redis: unexpected reply {line[:50]!r}")

    def close(self) -> None:
        try:
            self._rf.close()
            self.sock.close()
        except OSError:
            pass


@dataclass
class PrivateRedis:
    proc: Proc
    port: int
    probe: RedisProbe | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"


def start_redis(name: str, args, d: Path) -> PrivateRedis:
    exe = shutil.which(args.redis_server)
    if exe is None:
        raise SystemExit(f"{name}: needs {args.redis_server!r} (a redis-server binary, --redis-server) "
                         "for its private Redis; not found")
    d.mkdir(exist_ok=True)
    port = free_port()
    argv = [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--dir", str(d), "--daemonize", "no", "--protected-mode", "yes",
            "--slowlog-log-slower-than", "0", "--slowlog-max-len", str(SLOWLOG_MAX)]
    proc = Proc(f"{name}-redis", argv, d / "redis.log", d)
    r = PrivateRedis(proc, port)
    deadline = time.monotonic() + args.start_timeout
    last = "no answer"
    while time.monotonic() < deadline:  # bounded by the deadline
        if not proc.alive():
            raise StartError(proc, f"exited with code {proc.popen.returncode} before ready")
        try:
            probe = RedisProbe(port, timeout=2.0)
            if probe.call("PING") == "PONG":
                probe.sock.settimeout(30.0)
                r.probe = probe
                return r
            probe.close()
        except OSError as e:
            last = str(e)
        time.sleep(0.05)
    raise StartError(proc, f"not ready after {args.start_timeout:.0f}s ({last})")


def redis_commandstats(probe: RedisProbe) -> dict[str, int]:
    """calls per command since the start (cmdstat_NAME:calls=N,...): top-level commands
    and the ones scripts run inside Redis alike."""
    text = probe.call("INFO", "commandstats").decode()
    out: dict[str, int] = {}
    for line in text.splitlines():
        if line.startswith("cmdstat_"):
            name, _, fields = line[len("cmdstat_"):].partition(":")
            for f in fields.split(","):
                k, _, v = f.partition("=")
                if k == "calls":
                    out[name] = int(v)
    return out


def _ours(name: str) -> bool:
    """Commands the harness itself sends to the private Redis."""
    return name == "info" or name.startswith("slowlog")


_SCRIPT_NAMES: dict[str, str] | None = None


def script_names(python: str) -> dict[str, str]:
    """SHA1 -> name of the scheduler's Lua scripts (take, settle, heartbeat), from the
    checkout's llmproxy.middlewares.scheduler.redis; {} if it cannot be imported."""
    global _SCRIPT_NAMES
    if _SCRIPT_NAMES is None:
        code = ("import hashlib, json, llmproxy.middlewares.scheduler.redis as m; print(json.dumps({"
                "hashlib.sha1(getattr(m, n).encode()).hexdigest(): n.lower() "
                "for n in ('TAKE', 'SETTLE', 'HEARTBEAT') if hasattr(m, n)}))")
        try:
            p = subprocess.run([python, "-c", code], cwd=REPO, capture_output=True, timeout=60,
                               stdin=subprocess.DEVNULL)
            _SCRIPT_NAMES = json.loads(p.stdout.decode().strip().splitlines()[-1]) if p.returncode == 0 else {}
        except (OSError, subprocess.TimeoutExpired, ValueError, IndexError):
            _SCRIPT_NAMES = {}
    return _SCRIPT_NAMES


def _text(v) -> str:
    return v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)


def redis_window_start(r: PrivateRedis) -> dict[str, int]:
    r.probe.call("SLOWLOG", "RESET")
    return redis_commandstats(r.probe)


def redis_window_end(r: PrivateRedis, before: dict[str, int], names: dict[str, str]) -> dict:
    """What the proxy asked of Redis since redis_window_start: commandstats deltas, and from
    the slow log the top-level commands (round trips) with each script named."""
    after = redis_commandstats(r.probe)
    entries = r.probe.call("SLOWLOG", "GET", str(SLOWLOG_MAX)) or []
    r.probe.call("SLOWLOG", "RESET")
    commands = {k: after[k] - before.get(k, 0) for k in after
                if not _ours(k) and after[k] != before.get(k, 0)}
    top: dict[str, int] = {}
    scripts: dict[str, int] = {}
    for e in entries:
        # [id, time, µs, [argv...], client addr, client name]; inside a script: addr "?:0"
        argv = e[3] if len(e) > 3 else []
        addr = _text(e[4]) if len(e) > 4 else ""
        if not argv or addr in ("", "?:0") or addr == r.probe.addr:
            continue
        cmd = _text(argv[0]).lower()
        if cmd == "slowlog" or cmd == "info":
            continue
        top[cmd] = top.get(cmd, 0) + 1
        if cmd in SCRIPT_COMMANDS:
            sha = _text(argv[1]).lower() if len(argv) > 1 and cmd.startswith("evalsha") else ""
            name = names.get(sha)
            if name is None:  # EVAL, FCALL or an unknown script: by its first key
                first_key = _text(argv[3]) if len(argv) > 3 else ""
                name = "heartbeat" if first_key.endswith("replicas") else "script"
            scripts[name] = scripts.get(name, 0) + 1
    script_calls = sum(v for k, v in commands.items() if k in SCRIPT_COMMANDS)
    return {
        "commands": dict(sorted(commands.items())),   # INFO commandstats deltas, all levels
        "commands_total": sum(commands.values()),
        "scripts": script_calls,                       # EVALSHA + EVAL + FCALL (commandstats)
        "top_level": dict(sorted(top.items())),        # from the slow log: the round trips
        "top_level_total": sum(top.values()),
        "scripts_by_name": dict(sorted(scripts.items())),
        "heartbeats": scripts.get("heartbeat", 0),
        "slowlog_entries": len(entries),
        "slowlog_full": len(entries) >= SLOWLOG_MAX,
    }


# --------------------------------------------------------------------------- running

@dataclass
class Target:
    spec: TargetSpec
    port: int
    proc: Proc
    config_path: Path | None
    keys_file: Path | None = None   # seed_keys rows: the plaintext keys the load cycles through
    n_keys: int = 0                 # how many keys are in keys_file
    seed: dict | None = None        # what bench/seed_keys.py reported
    redis: PrivateRedis | None = None  # redis rows: the row's private redis-server

    @property
    def name(self) -> str:
        return self.spec.name


def start_target(spec: TargetSpec, args, tmp: Path, upstream_port: int,
                 scenarios: list[Scenario], procs: list[Proc]) -> Target:
    """Start one row (and first its private Redis, if it has one); every process started
    is appended to procs, so that the caller stops it even if this raises."""
    port = free_port()
    redis = None
    if spec.redis:
        redis = start_redis(spec.name, args, tmp / spec.name)
        procs.append(redis.proc)
        spec = copy.deepcopy(spec)
        spec.config = deep_merge({"redis_url": redis.url}, spec.config)
    upstream_root = f"http://127.0.0.1:{upstream_port}"
    log = tmp / f"{spec.name}.log"
    env = dict(os.environ)
    env["BENCH_UPSTREAM_URL"] = upstream_root
    env["BENCH_UPSTREAM_API_BASE"] = upstream_root + "/v1"
    env["BENCH_WEBHOOK_URL"] = upstream_root + "/bench/ingest"
    config_path = None
    keys_file, seed = None, None
    if spec.seed_keys:
        keys_file, seed = seed_keys(spec, args, tmp)
        # the row's own config wins over the default path (e.g. a database_url of its own)
        spec = copy.deepcopy(spec)
        spec.config = deep_merge({"database": {"sqlite_path": seed["db"]}}, spec.config)
    if spec.kind == "floor":
        argv = [args.python, str(BENCH / "floor.py"), "--port", str(port),
                "--upstream", upstream_root, "--api-key", UPSTREAM_KEY]
        cwd = REPO
    else:
        import yaml

        cfg = proxy_config(spec, port, upstream_port, scenarios)
        config_path = tmp / f"{spec.name}.yaml"
        config_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        values = {"python": args.python, "port": port, "config": str(config_path),
                  "upstream": upstream_root, "api_base": upstream_root + "/v1",
                  "bench": str(BENCH), "repo": str(REPO), "master_key": MASTER_KEY,
                  "upstream_key": UPSTREAM_KEY}
        argv = [tok.format(**values) for tok in shlex.split(args.proxy_cmd)]
        cwd = tmp  # the default SQLite file lands in the temp dir, not in the repo
    proc = Proc(spec.name, argv, log, cwd, env)
    procs.append(proc)
    target = Target(spec, port, proc, config_path, keys_file,
                    seed["keys_used"] if seed else 0, seed, redis)
    if args.pin:
        pin(proc.pid, {0})
    return target


def seed_keys(spec: TargetSpec, args, tmp: Path) -> tuple[Path, dict]:
    """Create --keys keys (and 10 teams) in <tmp>/<row>/bench.db with bench/seed_keys.py,
    run by the target's interpreter; the file of --keys-used plaintext keys and its report."""
    d = tmp / spec.name
    d.mkdir(exist_ok=True)
    db, keys_file = d / "bench.db", d / "keys.txt"
    argv = [args.python, str(BENCH / "seed_keys.py"), "--db", str(db), "--keys", str(args.keys),
            "--teams", "10", "--use", str(args.keys_used), "--out", str(keys_file), *spec.seed_args]
    try:
        p = subprocess.run(argv, cwd=REPO, capture_output=True, timeout=600, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise SystemExit(f"{spec.name}: creating {args.keys} keys took more than 600 s") from None
    if p.returncode != 0:
        err = (p.stderr or p.stdout).decode("utf-8", "replace").strip().splitlines()[-5:]
        raise SystemExit(f"{spec.name}: bench/seed_keys.py exited {p.returncode}:\n  " + "\n  ".join(err))
    seed = json.loads(p.stdout.decode().strip().splitlines()[-1])
    print(f"seeded  {spec.name:<16} {seed['keys']} keys ({seed['keys_with_team']} in "
          f"{seed['teams']} teams) in {db} in {seed['seconds']} s; the load cycles through "
          f"{seed['keys_used']} of them", flush=True)
    return keys_file, seed


_LOOKUP_LINE = re.compile(r'^llmproxy_auth_lookups_total\{[^}]*source="(\w+)"[^}]*\}\s+(\S+)', re.M)
_PII_LINE = re.compile(r'^llmproxy_pii_redactions_total\{[^}]*entity="(\w+)"[^}]*\}\s+(\S+)', re.M)
_CACHE_LINE = re.compile(r'^llmproxy_cache_requests_total\{[^}]*result="(\w+)"[^}]*\}\s+(\S+)', re.M)


def scrape_metrics(port: int) -> str | None:
    """The target's /metrics text; None when it does not answer."""
    try:
        status, body = http_get(f"http://127.0.0.1:{port}/metrics", timeout=10.0)
    except OSError:
        return None
    return body.decode("utf-8", "replace") if status == 200 else None


def _by_label(text: str | None, line: re.Pattern, metric: str) -> dict[str, float] | None:
    """A counter's value per label from /metrics text; None when the target has no such
    metric (the middleware is not on) or /metrics did not answer."""
    if text is None:
        return None
    found: dict[str, float] = {}
    for label, value in line.findall(text):
        found[label] = found.get(label, 0.0) + float(value)
    if not found and metric not in text:
        return None
    return found


def auth_lookups(port: int) -> dict[str, float] | None:
    """llmproxy_auth_lookups_total by source from the target's /metrics."""
    return _by_label(scrape_metrics(port), _LOOKUP_LINE, "llmproxy_auth_lookups_total")


def _delta(a: dict[str, float] | None, b: dict[str, float] | None) -> dict[str, float] | None:
    if a is None or b is None:
        return None
    return {k: b.get(k, 0.0) - a.get(k, 0.0) for k in sorted({*a, *b})}


def pin(pid: int, cpus: set[int]) -> None:
    try:
        os.sched_setaffinity(pid, cpus)
    except OSError as e:
        print(f"warning: cannot pin pid {pid} to {cpus}: {e}", file=sys.stderr)


def upstream_requests(upstream_port: int) -> int | None:
    try:
        status, body = http_get(f"http://127.0.0.1:{upstream_port}/bench/stats")
        return json.loads(body)["requests"] if status == 200 else None
    except (OSError, ValueError, KeyError):
        return None


def load_cmd(target: Target, sc: Scenario, n: int, c: int, args) -> dict:
    """The bench/load.py command for n requests of sc at concurrency c against target."""
    cmd = {"url": f"http://127.0.0.1:{target.port}{sc.path}", "n": n, "c": c,
           "body": sc.body, "headers": scenario_headers(sc), "check": sc.check,
           "timeout": args.request_timeout, "deadline": args.run_timeout}
    if VARY in json.dumps(sc.body):
        cmd["vary"] = VARY  # every request's prompt new (see VARY)
    if target.keys_file is not None:  # round-robin over the row's keys, not the master key
        cmd["keys_file"] = str(target.keys_file)
        cmd["key_header"] = "x-api-key" if sc.api == "anthropic" else "authorization"
    return cmd


def measure(load: LoadClient, target: Target, sc: Scenario, n: int, args,
            upstream: Proc, upstream_port: int, warmup: bool = False) -> dict:
    """One load run against one target, with CPU deltas of target, upstream and load."""
    run: dict = {"target": target.name, "scenario": sc.name, "n": n, "warmup": warmup,
                 "started_s": round(time.monotonic() - T0, 2)}
    if not target.proc.alive():
        run.update(ok=0, errors=n, error_samples=[f"{target.name} is not running"],
                   cpu_us_per_req=None)
        return run
    cmd = load_cmd(target, sc, n, args.c, args)
    # /metrics and Redis are read outside the CPU window: reading them is not the request's cost
    text0 = scrape_metrics(target.port) if target.spec.kind == "proxy" else None
    look0 = _by_label(text0, _LOOKUP_LINE, "llmproxy_auth_lookups_total")
    pii0 = _by_label(text0, _PII_LINE, "llmproxy_pii_redactions_total")
    cache0 = _by_label(text0, _CACHE_LINE, "llmproxy_cache_requests_total")
    rds = target.redis
    r0 = redis_window_start(rds) if rds is not None and rds.probe is not None else None
    up0 = upstream_requests(upstream_port)
    rcpu0 = tree_cpu(rds.proc.pid) if r0 is not None else None
    t0, u0, l0 = tree_cpu(target.proc.pid), tree_cpu(upstream.pid), tree_cpu(load.proc.pid)
    res = load.run(cmd, timeout=args.run_timeout + 30)
    time.sleep(args.settle)  # let deferred work (batched writes, log flushes) land in the window
    t1, u1, l1 = tree_cpu(target.proc.pid), tree_cpu(upstream.pid), tree_cpu(load.proc.pid)
    rcpu1 = tree_cpu(rds.proc.pid) if r0 is not None else None
    up1 = upstream_requests(upstream_port)
    text1 = scrape_metrics(target.port) if text0 is not None else None
    look = _delta(look0, _by_label(text1, _LOOKUP_LINE, "llmproxy_auth_lookups_total"))
    if look is not None:
        run["auth_lookups"] = look  # key resolutions during this run, by source
        run["store_lookups_per_req"] = look.get("store", 0.0) / n
    pii = _delta(pii0, _by_label(text1, _PII_LINE, "llmproxy_pii_redactions_total"))
    if pii is not None:
        run["pii_redactions"] = pii  # entities found during this run, by type
        run["pii_entities_per_req"] = sum(pii.values()) / n
    cached = _delta(cache0, _by_label(text1, _CACHE_LINE, "llmproxy_cache_requests_total"))
    if cached:  # requests the cache middleware saw during this run, by result (none: it is not on)
        run["cache_results"] = cached
        run["cache_hits_per_req"] = cached.get("hit", 0.0) / n
    if r0 is not None:
        rd = redis_window_end(rds, r0, script_names(args.python))
        rd["cpu_us_per_req"] = ((rcpu1["ns"] - rcpu0["ns"]) / 1000.0 / n if args.clock_has_ns
                                else (rcpu1["ticks"] - rcpu0["ticks"]) * 1e6 / CLK_TCK / n)
        run["redis"] = rd
        # the issue-5 count: scripts the scheduler runs for admissions and completions, that
        # is every EVALSHA/EVAL/FCALL of the run (commandstats) but the periodic heartbeats
        run["redis_calls_per_req"] = (rd["scripts"] - rd["heartbeats"]) / n
        run["redis_round_trips_per_req"] = (rd["top_level_total"] - rd["heartbeats"]) / n
    if res.get("keys") is not None:
        run["keys_cycled"] = res["keys"]
    if res.get("ttfb_ms") is not None:
        run["ttfb_ms"] = res["ttfb_ms"]  # at concurrency --c, the measured run itself
    if sc.stream and args.ttfb_n and not warmup and target.proc.alive():
        # the streamed time to first byte with nothing else in flight (concurrency 1): the
        # latency a request adds, not the queueing of --c requests on 2 cores
        probe = dict(cmd, n=args.ttfb_n, c=1, ttfb=True)
        pres = load.run(probe, timeout=args.run_timeout + 30)
        run["ttfb_c1_ms"] = pres.get("ttfb_ms")
        run["ttfb_c1_errors"] = pres["errors"]
        if pres["errors"]:
            res["errors"] += pres["errors"]
            res["error_samples"] = res["error_samples"] + ["(TTFB probe) " + e for e in pres["error_samples"]]

    def us_per_req(a: dict, b: dict, clock: str) -> float:
        if clock == "ns":
            return (b["ns"] - a["ns"]) / 1000.0 / n
        return (b["ticks"] - a["ticks"]) * 1e6 / CLK_TCK / n

    run.update(
        ok=res["ok"], errors=res["errors"], error_samples=res["error_samples"],
        wall_s=res["wall_s"], rps=res["rps"], latency_ms=res["latency_ms"],
        bytes_in=res["bytes_in"],
        cpu_us_per_req_stat=us_per_req(t0, t1, "ticks"),
        cpu_us_per_req_schedstat=us_per_req(t0, t1, "ns") if args.clock_has_ns else None,
        target_ticks=t1["ticks"] - t0["ticks"], target_ns=t1["ns"] - t0["ns"],
        target_pids=t1["pids"],
        upstream_cpu_us_per_req=us_per_req(u0, u1, "ns" if args.clock_has_ns else "ticks"),
        load_cpu_us_per_req=us_per_req(l0, l1, "ns" if args.clock_has_ns else "ticks"),
        upstream_calls=(up1 - up0) if up0 is not None and up1 is not None else None,
    )
    run["cpu_us_per_req"] = (run["cpu_us_per_req_schedstat"] if args.clock == "schedstat"
                             else run["cpu_us_per_req_stat"])
    if not target.proc.alive():
        run["errors"] = max(run["errors"], 1)
        run["error_samples"] = run["error_samples"] + [f"{target.name} died during the run"]
    return run


def _lookups_text(d: dict) -> str:
    return " ".join(f"{k} {v:.0f}" for k, v in sorted(d.items()))


def median(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summarize(runs: list[dict], targets: list[Target], scenarios: list[Scenario]) -> dict:
    out: dict = {}
    base = targets[0].name
    for sc in scenarios:
        rows: dict = {}
        for t in targets:
            mine = [r for r in runs if r["scenario"] == sc.name and r["target"] == t.name]
            measured = [r for r in mine if not r["warmup"]]
            errors = sum(r["errors"] for r in mine)
            # a cache hit makes no upstream call: the upstream must see the others, no more
            calls_off = [r for r in measured if r.get("upstream_calls") is not None
                         and r["upstream_calls"] != r["n"] - round(r.get("cache_results", {}).get("hit", 0.0))]
            rows[t.name] = {
                "cpu_us_per_req_median": median([r.get("cpu_us_per_req") for r in measured]),
                "cpu_us_per_req_rounds": [r.get("cpu_us_per_req") for r in measured],
                "cpu_us_per_req_stat_median": median([r.get("cpu_us_per_req_stat") for r in measured]),
                "cpu_us_per_req_schedstat_median":
                    median([r.get("cpu_us_per_req_schedstat") for r in measured]),
                "rps_median": median([r.get("rps") for r in measured]),
                "p50_ms_median": median([(r.get("latency_ms") or {}).get("p50") for r in measured]),
                "p99_ms_median": median([(r.get("latency_ms") or {}).get("p99") for r in measured]),
                "upstream_cpu_us_per_req_median":
                    median([r.get("upstream_cpu_us_per_req") for r in measured]),
                "errors": errors,
                "error_samples": sorted({s for r in mine for s in r.get("error_samples", [])})[:5],
                "upstream_calls_mismatch": [(r["n"], r["upstream_calls"]) for r in calls_off],
                "status": "FAILED" if errors or not measured else "ok",
            }
            looked = [r for r in measured if r.get("auth_lookups") is not None]
            if looked:  # llmproxy_auth_lookups_total over the measured runs, per request
                total_n = sum(r["n"] for r in looked)
                sources = sorted({k for r in looked for k in r["auth_lookups"]} | {"store"})
                rows[t.name]["auth_lookups_per_req"] = {
                    src: sum(r["auth_lookups"].get(src, 0.0) for r in looked) / total_n
                    for src in sources}
                rows[t.name]["store_lookups_per_req"] = rows[t.name]["auth_lookups_per_req"]["store"]
                rows[t.name]["store_lookups_per_req_rounds"] = [r["store_lookups_per_req"] for r in looked]
                rows[t.name]["auth_lookups_rounds"] = [r["auth_lookups"] for r in looked]
                warm = [r for r in mine if r["warmup"] and r.get("auth_lookups") is not None]
                if warm:
                    rows[t.name]["auth_lookups_warmup"] = warm[0]["auth_lookups"]
            piid = [r for r in measured if r.get("pii_redactions") is not None]
            if piid:  # llmproxy_pii_redactions_total over the measured runs, per request
                total_n = sum(r["n"] for r in piid)
                rows[t.name]["pii_entities_per_req"] = sum(r["pii_entities_per_req"] * r["n"] for r in piid) / total_n
                rows[t.name]["pii_redactions_per_req"] = {
                    e: sum(r["pii_redactions"].get(e, 0.0) for r in piid) / total_n
                    for e in sorted({k for r in piid for k in r["pii_redactions"]})}
            hits = [r for r in measured if r.get("cache_results") is not None]
            if hits:  # llmproxy_cache_requests_total{result="hit"} over the measured runs, per request
                rows[t.name]["cache_hits_per_req"] = sum(r["cache_results"].get("hit", 0.0) for r in hits) / \
                    sum(r["n"] for r in hits)
                rows[t.name]["upstream_calls_per_req"] = sum(r.get("upstream_calls") or 0 for r in hits) / \
                    sum(r["n"] for r in hits)
            red = [r for r in measured if r.get("redis") is not None]
            if red:  # Redis commands over the measured runs, per request
                total_n = sum(r["n"] for r in red)
                row = rows[t.name]
                row["redis_calls_per_req"] = sum(r["redis"]["scripts"] - r["redis"]["heartbeats"]
                                                 for r in red) / total_n
                row["redis_calls_per_req_rounds"] = [r["redis_calls_per_req"] for r in red]
                row["redis_round_trips_per_req"] = sum(r["redis"]["top_level_total"] - r["redis"]["heartbeats"]
                                                       for r in red) / total_n
                row["redis_commands_per_req"] = sum(r["redis"]["commands_total"] for r in red) / total_n
                row["redis_heartbeats"] = sum(r["redis"]["heartbeats"] for r in red)
                row["redis_scripts_by_name_per_req"] = {
                    k: sum(r["redis"]["scripts_by_name"].get(k, 0) for r in red) / total_n
                    for k in sorted({k for r in red for k in r["redis"]["scripts_by_name"]})}
                row["redis_cpu_us_per_req_median"] = median([r["redis"].get("cpu_us_per_req") for r in red])
                row["redis_rounds"] = [r["redis"] for r in red]
            for key in ("ttfb_ms", "ttfb_c1_ms"):
                vals = [(r.get(key) or {}).get("p50") for r in measured]
                if any(v is not None for v in vals):
                    rows[t.name][f"{key[:-3]}_p50_ms_median"] = median(vals)
                    rows[t.name][f"{key[:-3]}_p50_ms_rounds"] = vals
        b = rows[base]["cpu_us_per_req_median"]
        for name, row in rows.items():
            m = row["cpu_us_per_req_median"]
            row["ratio"] = (m / b) if (m is not None and b) else None
            pairs = []
            base_rounds = rows[base]["cpu_us_per_req_rounds"]
            for x, y in zip(row["cpu_us_per_req_rounds"], base_rounds):
                if x is not None and y:
                    pairs.append(x / y)
            row["ratio_per_round"] = pairs
            for key in ("ttfb", "ttfb_c1"):  # streamed TTFB against the baseline's
                m_t, b_t = row.get(f"{key}_p50_ms_median"), rows[base].get(f"{key}_p50_ms_median")
                if m_t is not None and b_t:
                    row[f"{key}_ratio"] = m_t / b_t
            vs = next((t.spec.ratio_vs for t in targets if t.name == name), None)
            if vs in rows and vs != name:  # the second ratio: against the row named by ratio_vs
                v = rows[vs]["cpu_us_per_req_median"]
                row["ratio_vs"] = vs
                row["ratio_vs_value"] = (m / v) if (m is not None and v) else None
                row["ratio_vs_per_round"] = [
                    x / y for x, y in zip(row["cpu_us_per_req_rounds"], rows[vs]["cpu_us_per_req_rounds"])
                    if x is not None and y]
        out[sc.name] = rows
    return out


def fmt(v: float | None, digits: int = 0) -> str:
    if v is None:
        return "-"
    return f"{v:.{digits}f}"


def print_table(summary: dict, targets: list[Target], args, title: str | None = None) -> bool:
    base = targets[0].name
    names = {t.name for t in targets}
    # optional columns per target: a second ratio (spec.ratio_vs), auth store lookups/req
    # (a second ratio against the baseline itself would repeat the first)
    vs_of = {t.name: t.spec.ratio_vs for t in targets
             if t.spec.ratio_vs in names and t.spec.ratio_vs not in (t.name, base)}

    def having(key: str) -> list[str]:
        return [t.name for t in targets if any(rows[t.name].get(key) is not None for rows in summary.values())]

    looked = having("store_lookups_per_req")
    piied = having("pii_entities_per_req")
    redised = having("redis_calls_per_req")
    cached = having("cache_hits_per_req")
    head = ["scenario"]
    for i, t in enumerate(targets):
        head.append(f"{t.name} µs/req")
        if i:
            head.append("ratio" if len(targets) == 2 and not vs_of else f"{t.name}/{base}")
        if t.name in vs_of:
            head.append(f"{t.name}/{vs_of[t.name]}")
        if t.name in looked:
            head.append("store lookups/req" if len(looked) == 1 else f"{t.name} store lookups/req")
        if t.name in piied:
            head.append("pii entities/req" if len(piied) == 1 else f"{t.name} pii entities/req")
        if t.name in redised:
            head.append("redis calls/req" if len(redised) == 1 else f"{t.name} redis calls/req")
        if t.name in cached:
            head.append("cache hits/req" if len(cached) == 1 else f"{t.name} cache hits/req")
    head.append("status")
    lines = []
    all_ok = True
    for sc_name, rows in summary.items():
        cells = [sc_name]
        bad = []
        for i, t in enumerate(targets):
            row = rows[t.name]
            cells.append(fmt(row["cpu_us_per_req_median"], 1))
            if i:
                cells.append(fmt(row["ratio"], 2))
            if t.name in vs_of:
                cells.append(fmt(row.get("ratio_vs_value"), 2))
            if t.name in looked:
                cells.append(fmt(row.get("store_lookups_per_req"), 3))
            if t.name in piied:
                cells.append(fmt(row.get("pii_entities_per_req"), 3))
            if t.name in redised:
                cells.append(fmt(row.get("redis_calls_per_req"), 3))
            if t.name in cached:
                cells.append(fmt(row.get("cache_hits_per_req"), 3))
            if row["status"] != "ok":
                bad.append(f"{t.name}: {row['errors']} errors" if row["errors"]
                           else f"{t.name}: no runs")
        cells.append("FAILED (" + "; ".join(bad) + ")" if bad else "ok")
        all_ok = all_ok and not bad
        lines.append(cells)
    widths = [max(len(r[i]) for r in [head] + lines) for i in range(len(head))]

    def render(cells: list[str]) -> str:
        parts = [cells[0].ljust(widths[0])]
        parts += [c.rjust(w) for c, w in zip(cells[1:-1], widths[1:-1])]
        parts.append(cells[-1])
        return "   ".join(parts)

    print()
    print(f"CPU per request, target process tree, median of {args.rounds} alternating rounds "
          f"(clock: {args.clock}; N={args.n} non-stream / {args.n_stream} stream"
          + "".join(f", {sc}: {scenario_n(SCENARIOS[sc], args)}" for sc in summary
                    if sc in SCENARIOS and SCENARIOS[sc].n_factor != 1.0)
          + f"; C={args.c})"
          + (f" [suite {title}]" if title and title != "custom" else ""))
    print(render(head))
    for cells in lines:
        print(render(cells))

    sw = max([len("scenario")] + [len(k) for k in summary])
    tw = max([len("target")] + [len(t.name) for t in targets])
    print()
    print("per round, µs/req (order of runs: " + ", ".join(t.name for t in targets) + ", ...):")
    for sc_name, rows in summary.items():
        for t in targets:
            vals = " ".join(fmt(v, 1) for v in rows[t.name]["cpu_us_per_req_rounds"])
            print(f"  {sc_name:<{sw}}  {t.name:<{tw}}  {vals}")
    for t in targets:
        if t.name in vs_of:
            print(f"per round, {t.name}/{vs_of[t.name]} (same round):")
            for sc_name, rows in summary.items():
                vals = " ".join(fmt(v, 2) for v in rows[t.name].get("ratio_vs_per_round", []))
                print(f"  {sc_name:<{sw}}  {vals}")
        elif t.spec.ratio_vs == base and t.name != base:  # its second ratio is the first one
            print(f"per round, {t.name}/{base} (same round):")
            for sc_name, rows in summary.items():
                vals = " ".join(fmt(v, 2) for v in rows[t.name].get("ratio_per_round", []))
                print(f"  {sc_name:<{sw}}  {vals}")
    for name in looked:
        print(f"{name}: key resolutions (llmproxy_auth_lookups_total) per measured run, by source"
              " (store = a database query):")
        for sc_name, rows in summary.items():
            r = rows[name]
            if r.get("auth_lookups_warmup") is not None:
                print(f"  {sc_name:<{sw}}  warm-up  {_lookups_text(r['auth_lookups_warmup'])}")
            for i, d in enumerate(r.get("auth_lookups_rounds", [])):
                print(f"  {sc_name:<{sw}}  round {i + 1}  {_lookups_text(d)}")

    for name in redised:
        print(f"{name}: Redis commands per measured run (the row's private redis-server). calls = "
              "EVALSHA/EVAL/FCALL from INFO commandstats minus the heartbeats; by script and the "
              "top-level commands from the slow log; 'all' counts the commands scripts run inside "
              "Redis too:")
        for sc_name, rows in summary.items():
            r = rows[name]
            for i, (per_req, rd) in enumerate(zip(r.get("redis_calls_per_req_rounds", []),
                                                  r.get("redis_rounds", []))):
                print(f"  {sc_name:<{sw}}  round {i + 1}  calls/req {per_req:.3f}  "
                      f"scripts {rd['scripts']} ({_lookups_text(rd['scripts_by_name']) or '-'})  "
                      f"top-level {rd['top_level_total']} ({_lookups_text(rd['top_level']) or '-'})  "
                      f"all {rd['commands_total']}  redis {fmt(rd.get('cpu_us_per_req'), 1)} µs/req")

    ttfb_rows = [sc_name for sc_name, rows in summary.items()
                 if any(rows[t.name].get("ttfb_p50_ms_median") is not None for t in targets)]
    if ttfb_rows:
        print()
        print(f"streamed time to first byte, ms: median over the rounds of each run's median; "
              f"C={args.c} is the measured run, C=1 a run of {args.ttfb_n} requests right after it "
              "(outside the CPU window) with nothing else in flight. ratio: against " + base)
        print(f"  {'scenario':<{sw}}  {'target':<{tw}}  {'C=' + str(args.c):>8} {'ratio':>6} "
              f"{'C=1':>8} {'ratio':>6}   per round C=1")
        for sc_name in ttfb_rows:
            rows = summary[sc_name]
            for t in targets:
                r = rows[t.name]
                vals = " ".join(fmt(v, 3) for v in r.get("ttfb_c1_p50_ms_rounds", []))
                print(f"  {sc_name:<{sw}}  {t.name:<{tw}}  {fmt(r.get('ttfb_p50_ms_median'), 3):>8} "
                      f"{fmt(r.get('ttfb_ratio'), 2):>6} {fmt(r.get('ttfb_c1_p50_ms_median'), 3):>8} "
                      f"{fmt(r.get('ttfb_c1_ratio'), 2):>6}   {vals}")

    print()
    print("wall clock (informational: load, target and upstream share "
          f"{os.cpu_count()} cores):")
    print(f"  {'scenario':<{sw}}  {'target':<{tw}}  {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} "
          f"{'upstream µs/req':>16}")
    for sc_name, rows in summary.items():
        for t in targets:
            r = rows[t.name]
            print(f"  {sc_name:<{sw}}  {t.name:<{tw}}  {fmt(r['rps_median']):>8} "
                  f"{fmt(r['p50_ms_median'], 2):>8} {fmt(r['p99_ms_median'], 2):>8} "
                  f"{fmt(r['upstream_cpu_us_per_req_median'], 1):>16}")

    notes = []
    for sc_name, rows in summary.items():
        for t in targets:
            r = rows[t.name]
            if r["error_samples"]:
                notes.append(f"{sc_name}/{t.name} errors, e.g.: " + " | ".join(r["error_samples"][:3]))
            if r["upstream_calls_mismatch"]:
                notes.append(f"{sc_name}/{t.name}: upstream saw a different number of calls than "
                             f"requests sent (sent, seen): {r['upstream_calls_mismatch'][:3]}")
            n_keys = t.n_keys
            for i, d in enumerate(r.get("auth_lookups_rounds", [])):
                store = d.get("store", 0.0)
                if not store:
                    continue
                if n_keys and store <= n_keys:
                    notes.append(f"{sc_name}/{t.name} round {i + 1}: {store:.0f} store lookups for "
                                 f"{n_keys} keys in use, at most one per key: consistent with the cache_ttl "
                                 "refresh (a cached key is read again once its cache_ttl, 30 s by default, "
                                 "has passed; the warm-up read all keys at once, so they expire together), "
                                 "not with a query per request")
                else:
                    notes.append(f"{sc_name}/{t.name} round {i + 1}: {store:.0f} store lookups for "
                                 f"{n_keys or 'the'} keys in use: more than one per key, so the store "
                                 "is queried on the request path")
            if r.get("redis_calls_per_req") is not None:
                rounds = r.get("redis_rounds", [])
                if not any(rd["scripts"] for rd in rounds):
                    notes.append(f"{sc_name}/{t.name}: no Redis script ran during the measured runs: "
                                 "is the scheduler on Redis (readiness, local fallback)? See its log")
                elif r["redis_calls_per_req"] > 2.0:
                    notes.append(f"{sc_name}/{t.name}: {r['redis_calls_per_req']:.3f} Redis calls per "
                                 "request, more than one per admission and one per completion")
                if any(rd["slowlog_full"] for rd in rounds):
                    notes.append(f"{sc_name}/{t.name}: the Redis slow log overflowed; the by-script "
                                 "counts (heartbeats) are incomplete")
                other: dict[str, int] = {}
                for rd in rounds:
                    for k, v in rd["top_level"].items():
                        if k not in SCRIPT_COMMANDS:
                            other[k] = other.get(k, 0) + v
                if other:
                    notes.append(f"{sc_name}/{t.name}: besides scripts the proxy sent Redis "
                                 f"{_lookups_text(other)} over the {len(rounds)} runs (hello, ping: "
                                 "redis-py setting up a new pool connection or checking an idle one; "
                                 "not scheduler state, not in calls/req)")
            hit = r.get("cache_hits_per_req")
            # the cache suite's scenarios: the same request every time, or a new one every time
            if hit is not None and sc_name in ("chat", "chat-stream", "chat-new", "chat-new-stream"):
                want_hit = 0.0 if sc_name.startswith("chat-new") else 1.0
                if abs(hit - want_hit) > 1e-9:
                    notes.append(f"{sc_name}/{t.name}: {hit:.3f} cache hits per request, expected {want_hit:.0f}")
            want = len(PII_SNIPPETS) if sc_name.startswith(("chat-2k-pii", "chat-history-pii")) else 0
            got = r.get("pii_entities_per_req")
            # every other scenario's prompt holds none (hello, the 100 KB conversation, ...)
            if got is not None and abs(got - want) > 1e-9:
                notes.append(f"{sc_name}/{t.name}: {got:.3f} PII entities found per request, "
                             f"the prompt holds {want}")
            a, b = r["cpu_us_per_req_stat_median"], r["cpu_us_per_req_schedstat_median"]
            if a and b and abs(a - b) / b > 0.15 and a * args.n / 1e6 * CLK_TCK > 20:
                notes.append(f"{sc_name}/{t.name}: /proc stat ({a:.1f}) and schedstat ({b:.1f}) "
                             "µs/req disagree by >15% (threads that exited?)")
    if notes:
        print()
        for n in notes:
            print("note: " + n)
    return all_ok


def check_llmproxy(python: str, cwd: Path) -> str | None:
    """None if `python -m llmproxy version` works, else why not."""
    try:
        p = subprocess.run([python, "-m", "llmproxy", "version"], cwd=cwd, capture_output=True,
                           timeout=60, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return "`python -m llmproxy version` did not answer in 60 s"
    if p.returncode != 0:
        err = (p.stderr or p.stdout).decode("utf-8", "replace").strip().splitlines()[-3:]
        return f"`python -m llmproxy version` exited {p.returncode}: " + " / ".join(err)
    return None


def resolve_targets(args, targets: str) -> list[TargetSpec]:
    """The rows named in `targets` (comma-separated), plus the --target rows."""
    known = {r.name: r for r in ROWS}
    for item in args.target:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"--target expects NAME=EXTRA.yaml, got {item!r}")
        if not Path(path).is_file():
            raise SystemExit(f"--target {name}: no such file {path}")
        # bench_seed_keys: true / bench_ratio_vs: ROW / bench_redis: true set the row's flags
        data = _read_yaml_map(path)
        ratio_vs = data.get("bench_ratio_vs")
        if ratio_vs is not None and not isinstance(ratio_vs, str):
            raise SystemExit(f"{path}: bench_ratio_vs must be a row name")
        known[name] = TargetSpec(name, "proxy", f"llmproxy + {path}",
                                 extra_files=[str(Path(path).resolve())],
                                 seed_keys=bool(data.get("bench_seed_keys", False)),
                                 ratio_vs=ratio_vs, redis=bool(data.get("bench_redis", False)))
    names = [n.strip() for n in targets.split(",") if n.strip()]
    for item in args.target:  # --target rows are run even if --targets does not name them
        name = item.partition("=")[0]
        if name not in names:
            names.append(name)
    if len(names) < 1 or len(set(names)) != len(names):
        raise SystemExit(f"--targets needs distinct names, got {targets!r}")
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(f"unknown target(s) {unknown}; known: {sorted(known)}")
    specs = [copy.deepcopy(known[n]) for n in names]
    if args.proxy_config_extra:
        for s in specs:
            if s.kind == "proxy":
                s.extra_files.append(str(Path(args.proxy_config_extra).resolve()))
    return specs


def resolve_scenarios(names: str) -> list[Scenario]:
    sc_names = [n.strip() for n in names.split(",") if n.strip()]
    bad = [n for n in sc_names if n not in SCENARIOS]
    if bad or not sc_names:
        raise SystemExit(f"unknown scenario(s) {bad}; known: {list(SCENARIOS)}")
    return [SCENARIOS[n] for n in sc_names]


def plan_sections(args) -> list[tuple[str, list[TargetSpec], list[Scenario]]]:
    """(title, rows, scenarios) of each section to run: one per suite, or one custom
    section when --targets, --scenarios or --target is given."""
    if args.targets is not None or args.scenarios is not None or args.target:
        if args.suite is not None:
            raise SystemExit("--suite cannot be combined with --targets, --scenarios or --target")
        return [("custom", resolve_targets(args, args.targets or DEFAULT_TARGETS),
                 resolve_scenarios(args.scenarios or DEFAULT_SCENARIOS))]
    suite = args.suite or DEFAULT_SUITE
    out = []
    for name in (ALL_SUITES if suite == "all" else (suite,)):
        s = SUITES[name]
        specs = resolve_targets(args, ",".join(s.targets))
        if shutil.which(args.redis_server) is None and any(sp.redis for sp in specs):
            skipped = [sp.name for sp in specs if sp.redis]
            print(f"warning: suite {name}: {args.redis_server!r} not found (--redis-server), "
                  f"skipping {', '.join(skipped)}", file=sys.stderr)
            specs = [sp for sp in specs if not sp.redis]
        out.append((name, specs, resolve_scenarios(",".join(s.scenarios))))
    return out


def parse_args(argv: list[str] | None = None):
    ap = argparse.ArgumentParser(
        description="CPU per request of llmproxy against a bare aiohttp floor.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--suite", choices=[*SUITES, "all"], default=None,
                    help=f"which group of rows and scenarios to run (default: {DEFAULT_SUITE}); "
                         "--list shows them")
    ap.add_argument("--targets", default=None,
                    help="comma-separated rows to run (instead of a suite; default scenarios "
                         f"{DEFAULT_SCENARIOS}); the first is the baseline of the ratios. "
                         f"Default with --scenarios/--target: {DEFAULT_TARGETS}")
    ap.add_argument("--target", action="append", default=[], metavar="NAME=EXTRA.yaml",
                    help="add a proxy row whose config is the base config merged with this "
                         "YAML (top-level key bench_deployment: merged into every deployment)")
    ap.add_argument("--proxy-config-extra", metavar="FILE",
                    help="YAML merged into the config of every proxy row")
    ap.add_argument("--proxy-cmd", default=DEFAULT_PROXY_CMD,
                    help="command of proxy rows; placeholders {python} {port} {config} "
                         "{upstream} {api_base} {bench} {repo} {master_key} {upstream_key}")
    ap.add_argument("--keys", type=int, default=3000,
                    help="virtual keys created in the store of each seed_keys row (proxy-auth); "
                         "half of them in one of 10 teams")
    ap.add_argument("--keys-used", type=int, default=200,
                    help="how many of those keys the load cycles through, one per request "
                         "(the warm-up sends each at least once)")
    ap.add_argument("--scenarios", default=None,
                    help="comma-separated, from: " + ", ".join(SCENARIOS)
                         + f" (instead of a suite; default rows {DEFAULT_TARGETS})")
    ap.add_argument("--n", type=int, default=2000, help="requests per non-stream run")
    ap.add_argument("--n-stream", type=int, default=1000, help="requests per stream run")
    ap.add_argument("--c", type=int, default=16, help="concurrency")
    ap.add_argument("--rounds", type=int, default=5, help="measured rounds per target")
    ap.add_argument("--warmup", type=int, default=200, help="warm-up requests per target and scenario")
    ap.add_argument("--ttfb-n", type=int, default=100,
                    help="after each measured stream run, this many requests at concurrency 1 "
                         "(outside the CPU window) for the unloaded time to first byte; 0: none")
    ap.add_argument("--redis-server", default="redis-server",
                    help="redis-server binary for the private Redis of redis rows")
    ap.add_argument("--streams-c", type=int, default=1000,
                    help="streams suite: concurrent streams opened at once against each row")
    ap.add_argument("--streams-delay-ms", type=int, default=200,
                    help="streams suite: ms between the upstream's 24 events (23 gaps: ~4.6 s a stream)")
    ap.add_argument("--streams-rounds", type=int, default=3,
                    help="streams suite: runs per row (each on a freshly started row); the median counts")
    ap.add_argument("--streams-sample-ms", type=int, default=50,
                    help="streams suite: RSS sampling interval")
    ap.add_argument("--clock", choices=["auto", "stat", "schedstat"], default="auto",
                    help="stat: /proc/PID/stat utime+stime (10 ms ticks); schedstat: "
                         "/proc/PID/task/*/schedstat (ns); auto: schedstat when readable")
    ap.add_argument("--settle", type=float, default=0.5,
                    help="seconds to wait after a run before reading CPU (deferred work)")
    ap.add_argument("--pin", action="store_true",
                    help="pin targets to CPU 0, upstream and load generator to CPU 1")
    ap.add_argument("--start-timeout", type=float, default=20.0, help="seconds to become ready")
    ap.add_argument("--request-timeout", type=float, default=60.0, help="per request, seconds")
    ap.add_argument("--run-timeout", type=float, default=300.0, help="per load run, seconds")
    ap.add_argument("--out", default=str(BENCH / "results" / "latest.json"), help="JSON results")
    ap.add_argument("--keep-logs", action="store_true",
                    help="keep the temp dir with logs and configs (kept anyway on failure)")
    ap.add_argument("--python", default=sys.executable, help="interpreter for child processes")
    ap.add_argument("--list", action="store_true", help="list targets, scenarios and suites, then exit")
    args = ap.parse_args(argv)
    for name in ("n", "n_stream", "c", "rounds", "keys", "keys_used", "streams_c", "streams_sample_ms",
                 "streams_rounds"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup < 0 or args.ttfb_n < 0:
        ap.error("--warmup and --ttfb-n must be >= 0")
    if not 0 < args.streams_delay_ms <= 1000:
        ap.error("--streams-delay-ms must be in 1..1000 (what bench/upstream.py accepts)")
    return args


def print_list() -> None:
    print("targets (--targets a,b,...; the first is the baseline):")
    for r in ROWS:
        print(f"  {r.name:<22} {r.kind:<6} {r.description}")
    print("scenarios (--scenarios):")
    for s in SCENARIOS.values():
        print(f"  {s.name:<22} {s.path:<22} {s.description}")
    print(f"suites (--suite; default {DEFAULT_SUITE}; all = {' + '.join(ALL_SUITES)}):")
    for s in SUITES.values():
        print(f"  {s.name:<10} rows {','.join(s.targets)}; scenarios {','.join(s.scenarios)}: {s.description}")
    print(f"the 2 KB prompt of chat-2k-pii ({PROMPT_2K_SIZE} characters; chat-2k is the same "
          "notes without the five entities):")
    print("  " + prompt_2k(True))


def run_section(title: str, specs: list[TargetSpec], scenarios: list[Scenario], args, tmp: Path,
                load: "LoadClient", upstream: Proc, upstream_port: int) -> tuple[dict, bool]:
    """Start the rows, warm them up, run the rounds, print the table, stop the rows."""
    procs: list[Proc] = []
    targets: list[Target] = []
    t_begin = time.monotonic()
    tmp.mkdir(exist_ok=True)
    if title != "custom":
        print(f"\n=== suite {title}: rows {', '.join(s.name for s in specs)}; "
              f"scenarios {', '.join(s.name for s in scenarios)}", flush=True)
    try:
        for spec in specs:
            targets.append(start_target(spec, args, tmp, upstream_port, scenarios, procs))
        readiness: dict[str, object] = {}
        for t in targets:
            wait_ready(t.proc, f"http://127.0.0.1:{t.port}/health/liveliness",
                       args.start_timeout)
            extra = ""
            if t.redis is not None:
                try:
                    _, body = http_get(f"http://127.0.0.1:{t.port}/health/readiness", timeout=5.0)
                    readiness[t.name] = json.loads(body)
                except (OSError, ValueError) as e:
                    readiness[t.name] = f"{type(e).__name__}: {e}"
                extra = f"  redis {t.redis.url} (pid {t.redis.proc.pid})  readiness {readiness[t.name]}"
            print(f"started {t.name:<22} pid {t.proc.pid:<7} port {t.port}"
                  + (f"  config {t.config_path}" if t.config_path else "") + extra, flush=True)

        # idle CPU of each target over one second: background work the table includes
        has_ns = args.clock_has_ns
        idle0 = {t.name: tree_cpu(t.proc.pid) for t in targets}
        time.sleep(1.0)
        idle = {}
        for t in targets:
            b = tree_cpu(t.proc.pid)
            key = "ns" if has_ns else "ticks"
            scale = 1e-3 if has_ns else 1e6 / CLK_TCK
            idle[t.name] = (b[key] - idle0[t.name][key]) * scale  # µs of CPU in ~1 s idle

        runs: list[dict] = []
        for sc in scenarios:
            n = scenario_n(sc, args)
            skip: set[str] = set()
            if args.warmup:
                for t in targets:
                    # a keyed row's warm-up sends each of its keys at least once, so that the
                    # measured runs see a warm cache (the first look-up of a key is a store query)
                    wn = max(args.warmup, t.n_keys)
                    r = measure(load, t, sc, wn, args, upstream, upstream_port, warmup=True)
                    runs.append(r)
                    print(f"warm-up    {sc.name:<18} {t.name:<22} ok {r['ok']}/{wn}"
                          + (f"  auth lookups {_lookups_text(r['auth_lookups'])}"
                             if r.get("auth_lookups") else "")
                          + (f"  errors {r['errors']}: {r['error_samples'][:1]}" if r["errors"] else ""),
                          flush=True)
                    if r["ok"] == 0:
                        skip.add(t.name)  # nothing works: do not spend rounds on it
            for rnd in range(args.rounds):
                for t in targets:
                    if t.name in skip:
                        continue
                    r = measure(load, t, sc, n, args, upstream, upstream_port)
                    r["round"] = rnd
                    runs.append(r)
                    extra = ""
                    if r.get("auth_lookups"):
                        extra += f"  auth lookups {_lookups_text(r['auth_lookups'])}"
                    if r.get("pii_entities_per_req") is not None:
                        extra += f"  pii {r['pii_entities_per_req']:.2f}/req"
                    if r.get("redis_calls_per_req") is not None:
                        extra += (f"  redis {r['redis_calls_per_req']:.3f} calls/req"
                                  f" (+{r['redis']['heartbeats']} heartbeats)")
                    if r.get("ttfb_ms"):
                        extra += f"  ttfb p50 {fmt(r['ttfb_ms']['p50'], 2)} ms"
                    if r.get("ttfb_c1_ms"):
                        extra += f" (C=1 {fmt(r['ttfb_c1_ms']['p50'], 3)})"
                    print(f"round {rnd + 1}/{args.rounds}  {sc.name:<18} {t.name:<22} "
                          f"{fmt(r.get('cpu_us_per_req'), 1):>8} µs/req  "
                          f"{fmt(r.get('rps')):>6} req/s  errors {r['errors']}" + extra, flush=True)

        summary = summarize(runs, targets, scenarios)
        all_ok = print_table(summary, targets, args, title)
        for t in targets:
            if not t.proc.alive():
                all_ok = False
                print(f"\n{t.name} is not running any more; log {t.proc.log_path}:\n"
                      + t.proc.log_tail())
        section = {
            "suite": title,
            "duration_s": round(time.monotonic() - t_begin, 1),
            "scenarios": [sc.name for sc in scenarios],
            "targets": [{"name": t.name, "kind": t.spec.kind, "description": t.spec.description,
                         "argv": t.proc.argv,
                         "config": t.config_path.read_text() if t.config_path else None,
                         "seeded_keys": t.seed,
                         "redis": {"url": t.redis.url, "argv": t.redis.proc.argv,
                                   "readiness": readiness.get(t.name)} if t.redis else None}
                        for t in targets],
            "idle_cpu_us_per_s": idle,
            "summary": summary,
            "runs": runs,
        }
        print(f"(suite {title}: {section['duration_s']:.0f} s)", flush=True)
        return section, all_ok
    finally:
        for t in targets:
            if t.redis is not None and t.redis.probe is not None:
                t.redis.probe.close()
        for p in reversed(procs):  # each row before its private Redis
            p.stop()


# --------------------------------------------------------------------------- open streams
#
# The `streams` suite (issue 11): the memory a target holds per open stream. Each row is
# started fresh and alone (the others are not running), warmed up (unpaced streams at --c,
# each of its keys at least once, so that one-time allocations land in the idle figure),
# left idle for a second; then --streams-c streams are opened at once, each lasting about
# 4.6 s upstream (24 events --streams-delay-ms apart), while a thread samples the target's
# RSS (VmRSS summed over its process tree) every --streams-sample-ms. KB per open stream =
# (peak - idle) / C. The load generator reports how many streams were open at the same time
# (headers received, body not finished) and their time to first byte.

def run_streams_section(title: str, specs: list[TargetSpec], scenarios: list[Scenario], args,
                        tmp: Path, load: "LoadClient", upstream: Proc,
                        upstream_port: int) -> tuple[dict, bool]:
    t_begin = time.monotonic()
    tmp.mkdir(exist_ok=True)
    c = args.streams_c
    delay = args.streams_delay_ms
    base_sc = scenarios[0]
    sc = dc_replace(base_sc, body={**base_sc.body, "bench_chunk_delay_ms": delay})
    warm_sc = dc_replace(base_sc, body={k: v for k, v in base_sc.body.items()
                                        if k != "bench_chunk_delay_ms"})
    nofile = raise_nofile_limit()
    print(f"\n=== suite {title}: rows {', '.join(s.name for s in specs)}; {c} concurrent streams of "
          f"{sc.name} (24 events {delay} ms apart, ~{23 * delay / 1000:.1f} s each); "
          f"{args.streams_rounds} rounds, each row started fresh and alone every time; RSS every "
          f"{args.streams_sample_ms} ms (RLIMIT_NOFILE soft {nofile['soft']})", flush=True)
    if nofile["soft"] != -1 and nofile["soft"] < 2 * c + 256:
        print(f"warning: RLIMIT_NOFILE soft limit {nofile['soft']} is low for {c} streams "
              f"(a target holds 2 sockets per stream)", file=sys.stderr)
    runs: list[dict] = []
    targets_info: dict[str, dict] = {}
    for rnd in range(args.streams_rounds):  # floor, proxy, proxy-full, floor, ...
        for spec in specs:
            run = streams_run(spec, sc, warm_sc, args, tmp / f"round-{rnd + 1}", load, upstream_port,
                              targets_info)
            run["round"] = rnd
            runs.append(run)
            tt = run.get("ttfb_ms") or {}
            rss = run.get("rss_kb") or {}
            mb = lambda v: fmt(v / 1024 if v is not None else None, 1)  # noqa: E731
            print(f"round {rnd + 1}/{args.streams_rounds}  {sc.name:<18} {spec.name:<12} idle "
                  f"{mb(rss.get('idle'))} MB  peak {mb(rss.get('peak'))} MB  "
                  f"{fmt(run.get('kb_per_stream'), 1)} KB/stream  open max {fmt(run.get('streams_open_max'))}  "
                  f"ttfb p50 {fmt(tt.get('p50'), 1)} p99 {fmt(tt.get('p99'), 1)} max {fmt(tt.get('max'), 1)} ms  "
                  f"errors {run['errors']}  samples {rss.get('samples', 0)}  ready in {fmt(run.get('start_s'), 1)} s",
                  flush=True)

    summary = summarize_streams(runs, sc, [s.name for s in specs])
    all_ok = print_streams_table(summary, runs, [s.name for s in specs], args, title)
    section = {
        "suite": title,
        "kind": "streams",
        "duration_s": round(time.monotonic() - t_begin, 1),
        "scenarios": [sc.name],
        "streams": {"c": c, "delay_ms": delay, "sample_ms": args.streams_sample_ms,
                    "rounds": args.streams_rounds, "body": sc.body, "rlimit_nofile": nofile},
        "targets": list(targets_info.values()),
        "idle_cpu_us_per_s": {},
        "summary": summary,
        "runs": runs,
    }
    print(f"(suite {title}: {section['duration_s']:.0f} s)", flush=True)
    return section, all_ok


def streams_run(spec: TargetSpec, sc: Scenario, warm_sc: Scenario, args, tmp: Path,
                load: "LoadClient", upstream_port: int, targets_info: dict[str, dict]) -> dict:
    """Start spec fresh, warm it up, measure its idle RSS, open --streams-c streams of sc at
    once while sampling its RSS, stop it. One run record."""
    c = args.streams_c
    interval = args.streams_sample_ms / 1000.0
    tmp.mkdir(exist_ok=True)   # a fresh directory each round: a new store, newly seeded keys
    procs: list[Proc] = []
    run: dict = {"target": spec.name, "scenario": sc.name, "n": c, "c": c,
                 "delay_ms": args.streams_delay_ms, "warmup": False,
                 "started_s": round(time.monotonic() - T0, 2)}
    try:
        t_start = time.monotonic()
        t = start_target(spec, args, tmp, upstream_port, [sc], procs)
        wait_ready(t.proc, f"http://127.0.0.1:{t.port}/health/liveliness", args.start_timeout)
        run["start_s"] = round(time.monotonic() - t_start, 2)   # seeding included
        targets_info.setdefault(t.name, {
            "name": t.name, "kind": t.spec.kind, "description": t.spec.description, "argv": t.proc.argv,
            "config": t.config_path.read_text() if t.config_path else None, "seeded_keys": t.seed})
        # warm-up: unpaced streams at --c, each key at least once, so that one-time allocations
        # (lazy imports, caches, the keys' cache entries, pools) are in the idle figure
        wn = max(args.warmup, t.n_keys)
        if wn:
            w = load.run(load_cmd(t, warm_sc, wn, args.c, args), timeout=args.run_timeout + 30)
            run["warmup_run"] = {"n": wn, "ok": w["ok"], "errors": w["errors"],
                                 "error_samples": w["error_samples"]}
        time.sleep(1.0)  # deferred work of the warm-up (spend batch, log flush) settles
        idle_sampler = RssSampler(t.proc.pid, interval)
        idle_sampler.start()
        time.sleep(0.5)
        idle_samples = idle_sampler.stop()
        idle_kb = median([kb for _, kb in idle_samples])
        up0 = upstream_requests(upstream_port)
        cpu0 = tree_cpu(t.proc.pid)
        sampler = RssSampler(t.proc.pid, interval)
        sampler.start()
        try:
            res = load.run(load_cmd(t, sc, c, c, args), timeout=args.run_timeout + 30)
            time.sleep(0.5)  # a few samples after the last stream closed
        finally:
            samples = sampler.stop()
        cpu1 = tree_cpu(t.proc.pid)
        up1 = upstream_requests(upstream_port)
        after_kb = tree_rss_kb(t.proc.pid)
        kbs = [kb for _, kb in samples]
        peak_kb = max(kbs) if kbs else None
        gaps = [b[0] - a[0] for a, b in zip(samples, samples[1:])]
        errors = res["errors"] + (run.get("warmup_run") or {}).get("errors", 0)
        run.update(
            ok=res["ok"], errors=errors,
            error_samples=res["error_samples"] + ["(warm-up) " + e for e in
                                                  (run.get("warmup_run") or {}).get("error_samples", [])],
            wall_s=res["wall_s"], latency_ms=res["latency_ms"], ttfb_ms=res.get("ttfb_ms"),
            streams_open_max=res.get("open_max"), streams_open_max_at_s=res.get("open_max_at_s"),
            bytes_in=res["bytes_in"],
            upstream_calls=(up1 - up0) if up0 is not None and up1 is not None else None,
            cpu_us_per_stream=((cpu1["ns"] - cpu0["ns"]) / 1000.0 / c if args.clock_has_ns
                               else (cpu1["ticks"] - cpu0["ticks"]) * 1e6 / CLK_TCK / c),
            target_pids=cpu1["pids"],
            rss_kb={
                "idle": idle_kb, "peak": peak_kb, "after": after_kb,
                "peak_at_s": samples[kbs.index(peak_kb)][0] if kbs else None,
                "p50_during": median(kbs),
                "samples": len(samples), "idle_samples": len(idle_samples),
                "interval_ms_median": round(median(gaps) * 1000, 1) if gaps else None,
                "interval_ms_max": round(max(gaps) * 1000, 1) if gaps else None,
            },
            # every sample, [seconds since the streams were started, kB]: the raw series
            rss_samples=[list(x) for x in samples],
            idle_rss_samples=[list(x) for x in idle_samples],
            kb_per_stream=(peak_kb - idle_kb) / c if peak_kb is not None and idle_kb is not None else None,
        )
        if not t.proc.alive():
            run["errors"] = max(run["errors"], 1)
            run["error_samples"] = run["error_samples"] + [f"{t.name} died during the run"]
            print(f"\n{t.name} is not running any more; log {t.proc.log_path}:\n" + t.proc.log_tail())
    except StartError as e:
        run.update(ok=0, errors=c, error_samples=[str(e)], kb_per_stream=None)
        print(f"error: {e}\nlog {e.proc.log_path}, last lines:\n{e.proc.log_tail()}", file=sys.stderr)
    finally:
        for p in reversed(procs):
            p.stop()
    return run


def summarize_streams(runs: list[dict], sc: Scenario, names: list[str]) -> dict:
    """Per row: medians over the rounds; kb_per_stream_minus_base against names[0], also
    per round (same round)."""
    rows: dict = {}
    base = names[0]
    for name in names:
        mine = [r for r in runs if r["target"] == name]

        def med(get) -> float | None:
            return median([get(r) for r in mine])

        errors = sum(r.get("errors", 0) for r in mine)
        kb = [r.get("kb_per_stream") for r in mine]
        rows[name] = {
            "kb_per_stream_median": median(kb),
            "kb_per_stream_rounds": kb,
            "idle_rss_kb_median": med(lambda r: (r.get("rss_kb") or {}).get("idle")),
            "peak_rss_kb_median": med(lambda r: (r.get("rss_kb") or {}).get("peak")),
            "after_rss_kb_median": med(lambda r: (r.get("rss_kb") or {}).get("after")),
            "streams_open_max_min": min((r["streams_open_max"] for r in mine
                                         if r.get("streams_open_max") is not None), default=None),
            "ttfb_p50_ms_median": med(lambda r: (r.get("ttfb_ms") or {}).get("p50")),
            "ttfb_p99_ms_median": med(lambda r: (r.get("ttfb_ms") or {}).get("p99")),
            "ttfb_max_ms_median": med(lambda r: (r.get("ttfb_ms") or {}).get("max")),
            "ttfb_max_ms_max": max(((r.get("ttfb_ms") or {}).get("max") or 0.0 for r in mine), default=None),
            "cpu_us_per_stream_median": med(lambda r: r.get("cpu_us_per_stream")),
            "start_s_max": max((r.get("start_s") or 0.0 for r in mine), default=None),
            "rss_samples_min": min(((r.get("rss_kb") or {}).get("samples", 0) for r in mine), default=0),
            "errors": errors,
            "error_samples": sorted({s for r in mine for s in r.get("error_samples", [])})[:5],
            "status": "FAILED" if errors or not mine or any(k is None for k in kb) else "ok",
        }
    b = rows[base]
    for name, row in rows.items():
        k, kb0 = row["kb_per_stream_median"], b["kb_per_stream_median"]
        row["kb_per_stream_minus_base"] = (k - kb0) if (k is not None and kb0 is not None) else None
        row["kb_per_stream_minus_base_rounds"] = [
            (x - y) if (x is not None and y is not None) else None
            for x, y in zip(row["kb_per_stream_rounds"], b["kb_per_stream_rounds"])]
    return {sc.name: rows}


def print_streams_table(summary: dict, runs: list[dict], names: list[str], args, title: str) -> bool:
    (sc_name, rows), = summary.items()
    base = names[0]
    head = ["scenario"]
    cells = [sc_name]
    bad = []
    for i, name in enumerate(names):
        row = rows[name]
        head.append(f"{name} KB/stream")
        cells.append(fmt(row["kb_per_stream_median"], 1))
        if i:
            head.append(f"{name} − {base}")
            cells.append(fmt(row["kb_per_stream_minus_base"], 1))
        if row["status"] != "ok":
            bad.append(f"{name}: {row['errors']} errors" if row["errors"] else f"{name}: no result")
    head.append("status")
    cells.append("FAILED (" + "; ".join(bad) + ")" if bad else "ok")
    widths = [max(len(a), len(b)) for a, b in zip(head, cells)]

    def render(cs: list[str]) -> str:
        return "   ".join([cs[0].ljust(widths[0])] + [x.rjust(w) for x, w in zip(cs[1:-1], widths[1:-1])]
                          + [cs[-1]])

    print()
    print(f"memory per open stream, KB = (peak RSS − idle RSS) / C; RSS = VmRSS summed over the target's "
          f"process tree, every {args.streams_sample_ms} ms; C={args.streams_c} concurrent streams of "
          f"~{23 * args.streams_delay_ms / 1000:.1f} s; median of {args.streams_rounds} rounds, each row "
          f"fresh and alone [suite {title}]")
    print(render(head))
    print(render(cells))
    tw = max(len("target"), *(len(n) for n in names))
    mb = lambda v: fmt(v / 1024 if v is not None else None, 1)  # noqa: E731
    print()
    print("medians over the rounds (ttfb: from sending the request to its first event; with many streams "
          "opened at once, mostly the time the 2 cores take to set all of them up):")
    print(f"  {'target':<{tw}}  {'idle MB':>7}  {'peak MB':>7}  {'after MB':>8}  {'KB/stream':>9}  "
          f"{'open max':>8}  {'ttfb p50':>8}  {'p99':>7}  {'max ms':>7}  {'CPU µs/stream':>13}  {'errors':>6}")
    for name in names:
        row = rows[name]
        print(f"  {name:<{tw}}  {mb(row['idle_rss_kb_median']):>7}  {mb(row['peak_rss_kb_median']):>7}  "
              f"{mb(row['after_rss_kb_median']):>8}  {fmt(row['kb_per_stream_median'], 1):>9}  "
              f"{fmt(row['streams_open_max_min']):>8}  {fmt(row['ttfb_p50_ms_median'], 1):>8}  "
              f"{fmt(row['ttfb_p99_ms_median'], 1):>7}  {fmt(row['ttfb_max_ms_median'], 1):>7}  "
              f"{fmt(row['cpu_us_per_stream_median'], 0):>13}  {row['errors']:>6}")
    print(f"per round, KB/stream (order of runs: {', '.join(names)}, ...), and − {base} (same round):")
    for name in names:
        row = rows[name]
        vals = " ".join(fmt(v, 1) for v in row["kb_per_stream_rounds"])
        diff = (" " * 4 + "− " + base + ": " + " ".join(fmt(v, 1) for v in row["kb_per_stream_minus_base_rounds"])
                if name != base else "")
        print(f"  {name:<{tw}}  {vals}{diff}")
    notes = []
    for name in names:
        row = rows[name]
        if row["error_samples"]:
            notes.append(f"{name} errors, e.g.: " + " | ".join(row["error_samples"][:3]))
    for r in runs:
        where = f"{r['target']} round {r.get('round', 0) + 1}"
        om = r.get("streams_open_max")
        if om is not None and om < args.streams_c:
            notes.append(f"{where}: only {om} of {args.streams_c} streams were open at the same time "
                         "(the first ones ended before the last ones started): its KB/stream reads low")
        uc = r.get("upstream_calls")
        if uc is not None and uc != args.streams_c:
            notes.append(f"{where}: the upstream saw {uc} calls for {args.streams_c} streams")
        gaps_max = (r.get("rss_kb") or {}).get("interval_ms_max")
        if gaps_max is not None and gaps_max > 4 * args.streams_sample_ms:
            notes.append(f"{where}: the RSS sampler was late by up to {gaps_max:.0f} ms once "
                         "(a busy machine); the peak may be missed by that much")
    if notes:
        print()
        for n in notes:
            print("note: " + n)
    return not bad


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list:
        print_list()
        return 0

    has_ns = schedstat_available()
    if args.clock == "auto":
        args.clock = "schedstat" if has_ns else "stat"
    elif args.clock == "schedstat" and not has_ns:
        raise SystemExit("--clock schedstat: /proc/<pid>/task/<tid>/schedstat is not readable here")
    args.clock_has_ns = has_ns

    plan = plan_sections(args)

    def on_term(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)

    tmp = Path(tempfile.mkdtemp(prefix="llmproxy-bench-"))
    procs: list[Proc] = []
    load: LoadClient | None = None
    failed = True
    t_begin = time.monotonic()
    try:
        if any(s.kind == "proxy" for _, specs, _ in plan for s in specs) \
                and args.proxy_cmd == DEFAULT_PROXY_CMD:
            why = check_llmproxy(args.python, tmp)
            if why:
                print(f"error: the proxy cannot run yet: {why}\n"
                      "hint: test the harness with --targets floor,floor-b, or point the "
                      "proxy rows elsewhere with --proxy-cmd", file=sys.stderr)
                return 2

        nofile = raise_nofile_limit()  # before any child starts: they inherit it
        upstream_port = free_port()
        upstream = Proc("upstream", [args.python, str(BENCH / "upstream.py"), "--port",
                                     str(upstream_port), "--api-key", UPSTREAM_KEY],
                        tmp / "upstream.log", REPO)
        procs.append(upstream)
        load = LoadClient(args.python, tmp / "load.log")
        if args.pin:
            pin(upstream.pid, {1})
            pin(load.proc.pid, {1})
        wait_ready(upstream, f"http://127.0.0.1:{upstream_port}/health/liveliness",
                   args.start_timeout)

        sections: dict[str, dict] = {}
        all_ok = True
        for title, specs, scenarios in plan:
            runner = run_streams_section if title in SUITES and SUITES[title].kind == "streams" \
                else run_section
            section, ok = runner(title, specs, scenarios, args, tmp / title, load,
                                 upstream, upstream_port)
            sections[title] = section
            all_ok = all_ok and ok

        result: dict = {
            "meta": {
                "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "duration_s": round(time.monotonic() - t_begin, 1),
                "git_rev": _git_rev(),
                "python": platform.python_version(),
                "platform": platform.platform(),
                "cpus": os.cpu_count(),
                "clk_tck": CLK_TCK,
                "clock": args.clock,
                "args": {k: v for k, v in vars(args).items() if k not in ("list",)},
                "suites": list(sections),
                "rlimit_nofile": nofile,
            },
            "sections": sections,
        }
        if len(sections) == 1:  # the layout of a single run, as before suites existed
            (only,) = sections.values()
            result["meta"]["targets"] = only["targets"]
            result["meta"]["idle_cpu_us_per_s"] = only["idle_cpu_us_per_s"]
            result["summary"] = only["summary"]
            result["runs"] = only["runs"]
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))
        print(f"\nraw numbers: {out}   ({time.monotonic() - t_begin:.0f} s"
              + (", " + ", ".join(f"{k} {v['duration_s']:.0f} s" for k, v in sections.items())
                 if len(sections) > 1 else "") + ")")
        not_run = [s for s in SUITES if s not in sections]
        if not_run:
            print("other suites (make bench BENCH_ARGS='--suite NAME'):")
            for name in not_run + (["all"] if len(sections) < len(ALL_SUITES) else []):
                what = SUITES[name].description if name in SUITES else " + ".join(ALL_SUITES)
                print(f"  .venv/bin/python bench/run.py --suite {name:<10} # {what}")
        failed = not all_ok
        return 0 if all_ok else 1
    except StartError as e:
        print(f"error: {e}\nlog {e.proc.log_path}, last lines:\n{e.proc.log_tail()}",
              file=sys.stderr)
        return 1
    finally:
        if load is not None:
            load.stop()
        for p in reversed(procs):
            p.stop()
        if failed or args.keep_logs:
            print(f"logs and configs kept in {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def _git_rev() -> str | None:
    try:
        p = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                           capture_output=True, timeout=10)
        return p.stdout.decode().strip() or None
    except (OSError, subprocess.TimeoutExpired):
        return None


if __name__ == "__main__":
    sys.exit(main())
