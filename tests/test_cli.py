"""The command line as an operator uses it: real processes, real sockets, real signals."""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

PY = sys.executable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(*args: str, cwd: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "llmproxy", *args], capture_output=True, text=True, timeout=60, cwd=cwd)


def wait_live(port: int, proc: subprocess.Popen, bound: float = 20.0) -> None:
    end = time.monotonic() + bound
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health/liveliness", timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise AssertionError("server did not come up")


def stop(proc: subprocess.Popen) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise


def test_version():
    out = run("version")
    assert out.returncode == 0 and out.stdout.startswith("llmproxy ")


@pytest.mark.parametrize("text, fragment", [
    ("models: []\n", "models: at least one model is required"),
    ("models:\n  - name: a\n    deployments: [{provider: mock, rpm: abc}]\n",
     "models[0].deployments[0].rpm: expected integer"),
    ("models:\n  - name: a\n    deployments: [{provider: nope}]\n",
     "models[0].deployments[0].provider: provider 'nope' is not installed (installed: anthropic, azure, mock, openai"),
    ("models:\n  - name: a\n    deployments: [{provider: mock}]\nmiddlewares: [nope]\n",
     "middlewares[0].nope: middleware 'nope' is not installed"),
    ("models:\n  - name: a\n    deployments: [{provider: openai, api_key: k}]\n",
     "server.allow_anonymous: true"),
])
def test_check_config_reports_errors(tmp_path: Path, text: str, fragment: str):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    out = run("check-config", "--config", str(path))
    assert out.returncode == 2
    assert fragment in out.stderr


def test_check_config_ok(tmp_path: Path):
    path = tmp_path / "c.yaml"
    path.write_text("models:\n  - name: a\n    deployments: [{provider: mock, chunks: 3}]\n")
    out = run("check-config", "--config", str(path))
    assert out.returncode == 0, out.stderr


def test_default_serve_prints_a_working_curl(tmp_path: Path):
    port = free_port()
    proc = subprocess.Popen([PY, "-m", "llmproxy", "serve", "--port", str(port)], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_live(port, proc)
    finally:
        code = stop(proc)
    out, err = proc.communicate(timeout=10)
    assert code == 0
    assert "127.0.0.1" in err and "mock" in err
    curl = next(line.strip() for line in err.splitlines() if line.strip().startswith("curl "))
    # run the printed line against a fresh server on the same port
    proc = subprocess.Popen([PY, "-m", "llmproxy", "serve", "--port", str(port)], cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_live(port, proc)
        answer = subprocess.run(["bash", "-c", curl], capture_output=True, text=True, timeout=30)
        body = json.loads(answer.stdout)
        assert body["object"] == "chat.completion" and body["choices"][0]["message"]["content"]
    finally:
        assert stop(proc) == 0


def test_sigterm_drains_inflight_stream_then_exits_zero(tmp_path: Path):
    port = free_port()
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"server: {{port: {port}, graceful_timeout: 20}}\n"
                   "models:\n  - name: slow\n    deployments: [{provider: mock, chunks: 20, chunk_delay_ms: 100}]\n")
    proc = subprocess.Popen([PY, "-m", "llmproxy", "serve", "--config", str(cfg)], cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_live(port, proc)
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", method="POST",
                                     data=json.dumps({"model": "slow", "stream": True,
                                                      "messages": [{"role": "user", "content": "x"}]}).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as resp:
            first = resp.readline()
            assert first.startswith(b"data: ")
            proc.send_signal(signal.SIGTERM)
            rest = resp.read()
        assert rest.rstrip().endswith(b"data: [DONE]")  # the stream was allowed to finish
        assert proc.wait(timeout=30) == 0
    finally:
        stop(proc)


def test_workers_share_the_port_and_metrics_sum(tmp_path: Path):
    port = free_port()
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"server: {{port: {port}, workers: 2}}\n"
                   "spend: {flush_interval: 30, durability: wal, wal_sync_interval: 0.05}\n"
                   "models:\n  - name: mock\n    deployments: [{provider: mock, chunks: 2}]\n")
    proc = subprocess.Popen([PY, "-m", "llmproxy", "serve", "--config", str(cfg)], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        wait_live(port, proc)
        pids: set[int] = set()
        end = time.monotonic() + 20
        while len(pids) < 2 and time.monotonic() < end:  # both workers have started serving
            line = proc.stdout.readline()
            if '"serving"' in line:
                pids.add(json.loads(line)["pid"])
        assert len(pids) == 2
        n = 30
        for _ in range(n):
            req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", method="POST",
                                         data=b'{"model":"mock","messages":[{"role":"user","content":"x"}]}')
            with urllib.request.urlopen(req, timeout=10) as resp:
                assert resp.status == 200
        # One scrape, right after: each worker writes its counts after every turn of its loop
        # that finished requests, so whichever worker answers has everyone's (issue 12).
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
            text = resp.read().decode()
        total = sum(float(m.group(1)) for m in
                    re.finditer(r'^llmproxy_requests_total\{[^}]*status="200"[^}]*\} (\S+)$', text, re.M))
        assert total == n
        assert re.search(r'^llmproxy_request_duration_seconds_count\{[^}]*\} 30\.0$', text, re.M) or \
            sum(float(v) for v in re.findall(r'^llmproxy_request_duration_seconds_count\{[^}]*\} (\S+)$', text, re.M)) == n
        # Each worker its own spend files (issue 12): WAL segments named by the worker
        end = time.monotonic() + 5
        while time.monotonic() < end and sum(
                len(p.read_bytes().splitlines()) for p in tmp_path.glob("llmproxy-spend-spill.jsonl.*.wal.*")) < n:
            time.sleep(0.05)
        wal = sorted(p.name.split(".wal.")[0] for p in tmp_path.glob("llmproxy-spend-spill.jsonl.*.wal.*"))
        assert wal == ["llmproxy-spend-spill.jsonl.0", "llmproxy-spend-spill.jsonl.1"]
    finally:
        assert stop(proc) == 0
    assert not list(tmp_path.glob("llmproxy-spend-spill.jsonl*"))  # written at shutdown, segments dropped


# --- start-up failures: one line, exit status 2, before any "listening" banner (issue 12) ----


def _closed_port() -> int:
    return free_port()  # nothing listens there once the probe socket is closed


@pytest.mark.parametrize("database_url, fragment", [
    ("mysql://u@127.0.0.1/db", "unsupported scheme 'mysql'"),
    (f"postgresql://postgres@127.0.0.1:{_closed_port()}/x", "PostgreSQL not reachable at 127.0.0.1:"),
])
def test_a_start_that_fails_is_one_line_and_exit_2(tmp_path, database_url: str, fragment: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(f"database_url: {database_url}\nmodels: [{{name: m, deployments: [{{provider: mock}}]}}]\n")
    out = run("serve", "--config", str(path), "--port", str(free_port()), cwd=str(tmp_path))
    assert out.returncode == 2
    lines = [ln for ln in out.stderr.splitlines() if "plugin loaded" not in ln and ln.strip()]
    # a config check's finding (the scheme) or a start's failure (the server): one line each
    assert lines in ([f"{path}: invalid config", lines[-1]], [lines[0]]) and len(lines) <= 2, out.stderr
    assert fragment in lines[-1] and "Traceback" not in out.stderr + out.stdout
    assert len(lines) == 2 or lines[0].startswith("llmproxy: cannot start: ")
    assert "listening" not in out.stderr and "Unclosed" not in out.stderr


def test_check_config_catches_an_unsupported_database_url(tmp_path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("database_url: mysql://u@h/db\nmodels: [{name: m, deployments: [{provider: mock}]}]\n")
    out = run("check-config", "--config", str(path))
    assert out.returncode == 2 and "database_url: unsupported scheme 'mysql'" in out.stderr + out.stdout


def test_a_port_in_use_is_one_line_and_exit_2(tmp_path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        out = run("serve", "--port", str(port), cwd=str(tmp_path))
    assert out.returncode == 2
    assert f"llmproxy: cannot start: 127.0.0.1:{port} is already in use" in out.stderr
    assert "Traceback" not in out.stderr and "listening" not in out.stderr


def test_drain_delay_keeps_serving_while_readiness_says_503_and_a_cut_stream_is_server_shutdown(tmp_path: Path):
    port = free_port()
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"server: {{port: {port}, drain_delay: 1.5, graceful_timeout: 0.5}}\n"
                   "models:\n  - name: slow\n    deployments: [{provider: mock, chunks: 100, chunk_delay_ms: 100}]\n"
                   "  - name: mock\n    deployments: [{provider: mock}]\n")
    proc = subprocess.Popen([PY, "-m", "llmproxy", "serve", "--config", str(cfg)], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        wait_live(port, proc)
        stream = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", method="POST",
                                        data=json.dumps({"model": "slow", "stream": True,
                                                         "messages": [{"role": "user", "content": "x"}]}).encode())
        with urllib.request.urlopen(stream, timeout=30) as resp:
            assert resp.readline().startswith(b"data: ")
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.3)
            try:  # readiness: 503 at once
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health/readiness", timeout=5)
                ready = 200
            except urllib.error.HTTPError as exc:
                ready = exc.code
            assert ready == 503
            chat = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", method="POST",
                                          data=b'{"model":"mock","messages":[{"role":"user","content":"x"}]}')
            with urllib.request.urlopen(chat, timeout=10) as answer:  # still served during drain_delay
                assert answer.status == 200
            try:
                resp.read()  # the 10 s stream is cut by graceful_timeout
            except Exception:
                pass
        assert proc.wait(timeout=30) == 0
        lines = [json.loads(ln) for ln in proc.stdout.read().splitlines() if ln.startswith("{")]
        cut = [ln for ln in lines if ln.get("event") == "request" and ln.get("model") == "slow"]
        assert cut and cut[0]["error"] == "server_shutdown" and not cut[0].get("client_disconnected")
    finally:
        stop(proc)
