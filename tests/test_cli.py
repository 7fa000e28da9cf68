"""The `moonq` command as a user runs it."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import chat
from tests.procs import clean_env, free_port, start, wait_http


@pytest.mark.e2e
def test_dev_runs_on_a_bare_machine(tmp_path: Path) -> None:
    """No Redis, no Moonshot key: embedded Redis and the fake upstream, each said loudly."""
    port = free_port()
    env = clean_env(REDIS_URL="redis://127.0.0.1:1/0")
    proc = start("dev", ["dev", "--port", str(port)], env, tmp_path)
    try:
        wait_http(f"http://127.0.0.1:{port}/readyz", proc)
        base = f"http://127.0.0.1:{port}"
        job = httpx.post(f"{base}/v1/jobs", json=chat("dev mode")).json()
        done = httpx.get(f"{base}/v1/jobs/{job['id']}", params={"wait": 10}, timeout=15).json()
        assert done["status"] == "completed"
        assert "Echo: dev mode" in done["result"]["choices"][0]["message"]["content"]
    finally:
        proc.stop()
    out = proc.output()
    assert "EMBEDDED in-process Redis" in out
    assert "FAKE Moonshot server" in out


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("MOONQ_API_KEYS", "no-tenant-here"),
        ("MOONQ_RESULT_TTL", "soon"),
        ("MOONQ_WORKER_CONCURRENCY", "0"),
    ],
)
@pytest.mark.parametrize("command", ["api", "worker"])
def test_bad_settings_are_a_message_not_a_traceback(
    tmp_path: Path, command: str, name: str, value: str
) -> None:
    proc = start(command, [command], clean_env(**{name: value}), tmp_path)
    proc.popen.wait(20)
    out = proc.output()
    assert proc.popen.returncode != 0
    assert "invalid settings" in out and name in out and "Traceback" not in out
    if name == "MOONQ_API_KEYS":
        assert value not in out  # a would-be key is never echoed


def test_fake_moonshot_command_serves(tmp_path: Path) -> None:
    port = free_port()
    proc = start(
        "fake", ["fake-moonshot", "--port", str(port), "--chunks", "3"], clean_env(), tmp_path
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/_fake/stats", proc)
        answer = httpx.post(
            f"http://127.0.0.1:{port}/v1/chat/completions",
            json=chat("x")["body"],
            headers={"authorization": "Bearer any"},
        ).json()
        assert answer["usage"]["completion_tokens"] == 3
    finally:
        proc.stop()


def test_a_blank_upstream_key_counts_as_unset() -> None:
    from moonq.settings import Settings

    assert Settings(_env_file=None, MOONSHOT_API_KEY="  ").moonshot_api_key is None  # type: ignore[call-arg]


@pytest.mark.e2e
def test_worker_check_sees_a_live_worker(tmp_path: Path, real_redis_url: str) -> None:
    env = clean_env(REDIS_URL=real_redis_url, MOONQ_QUEUE_NAME=f"check{free_port()}:queue")
    worker = start("worker", ["worker"], env, tmp_path)
    try:
        time.sleep(1.5)
        check = start("check", ["worker", "--check"], env, tmp_path)
        assert check.popen.wait(20) == 0, check.output()
    finally:
        worker.stop()
