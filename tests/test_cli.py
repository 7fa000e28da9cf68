"""The `moonq` command as a user runs it."""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import chat
from tests.procs import Proc, clean_env, real_env, start, wait_http, wait_log
from worker.main import heartbeat_file

UVICORN = r"Uvicorn running on http://127\.0\.0\.1:(\d+)"
FAKE = r"listening on http://127\.0\.0\.1:(\d+)/v1"


def exited(proc: Proc, timeout: float = 20) -> str:
    """The output of a process that had to stop by itself, promptly."""
    try:
        proc.popen.wait(timeout)
    finally:
        proc.stop(signal.SIGKILL)
    return proc.output()


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A port someone else is listening on, for as long as the test runs."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield holder.getsockname()[1]


@pytest.mark.e2e
def test_dev_runs_on_a_bare_machine(tmp_path: Path) -> None:
    """No Redis, no Moonshot key: embedded Redis and the fake upstream, each said loudly."""
    env = clean_env(REDIS_URL="redis://127.0.0.1:1/0")
    proc = start("dev", ["dev", "--port", "0"], env, tmp_path)
    try:
        base = f"http://127.0.0.1:{wait_log(proc, UVICORN).group(1)}"
        wait_http(f"{base}/readyz", proc)
        job = httpx.post(f"{base}/v1/jobs", json=chat("dev mode")).json()
        done = httpx.get(f"{base}/v1/jobs/{job['id']}", params={"wait": 10}, timeout=15).json()
        assert done["status"] == "completed"
        assert "Echo: dev mode" in done["result"]["choices"][0]["message"]["content"]
    finally:
        proc.stop(signal.SIGINT)
    out = proc.output()
    assert "EMBEDDED in-process Redis" in out
    assert "FAKE Moonshot server" in out
    # Ctrl+C stops it cleanly, and its worker says what stopped it (arq would say SIGUSR1)
    assert proc.popen.returncode in (0, -signal.SIGINT), out
    assert "shutdown on SIGINT" in out and "SIGUSR1" not in out and "Traceback" not in out


@pytest.mark.e2e
@pytest.mark.parametrize("command", ["api", "dev"])
def test_small_answers_do_not_wait_for_a_delayed_ack(tmp_path: Path, command: str) -> None:
    """The API's socket keeps Nagle's algorithm off: on a kept-alive connection, a small answer
    goes out at once instead of ~40 ms later, when the client's delayed ACK comes."""
    env = clean_env(REDIS_URL="redis://127.0.0.1:1/0")
    proc = start(command, [command, "--port", "0"], env, tmp_path)
    try:
        base = f"http://127.0.0.1:{wait_log(proc, UVICORN).group(1)}"
        wait_http(f"{base}/healthz", proc)
        with httpx.Client(base_url=base) as client:
            client.get("/healthz")
            times = []
            for _ in range(21):
                started = time.perf_counter()
                client.get("/healthz")
                times.append(time.perf_counter() - started)
        assert sorted(times)[10] < 0.02, times  # ~1 ms; 40 ms when Nagle is on
    finally:
        proc.stop(signal.SIGINT)


@pytest.mark.e2e
@pytest.mark.parametrize("command", ["api", "dev", "fake-moonshot"])
def test_a_taken_port_stops_the_process_with_one_line(
    tmp_path: Path, real_redis_url: str, prefix: str, taken_port: int, command: str
) -> None:
    """`moonq dev` used to go on as a worker with no API, taking jobs nobody could see."""
    env = real_env(real_redis_url, prefix)
    proc = start(command, [command, "--port", str(taken_port)], env, tmp_path)
    out = exited(proc)
    assert proc.popen.returncode == 1, out
    assert f"moonq: cannot listen on 127.0.0.1:{taken_port}: Address already in use" in out
    assert "Traceback" not in out and "Starting worker" not in out


@pytest.mark.parametrize("port", ["99999", "-1", "http"])
@pytest.mark.parametrize("command", ["api", "dev", "fake-moonshot"])
def test_a_port_out_of_range_is_a_usage_message(tmp_path: Path, command: str, port: str) -> None:
    proc = start(command, [command, "--port", port], clean_env(), tmp_path)
    out = exited(proc)
    assert proc.popen.returncode == 2, out
    assert "must be a port, 0 to 65535" in out and "Traceback" not in out


BAD_SETTINGS = [
    ("MOONQ_RESULT_TTL", "99999999999999999999"),  # past what Redis's EXPIRE takes
    ("MOONQ_API_KEYS", "no-tenant-here"),
    ("MOONQ_API_KEYS", "sk-twice=alpha,sk-twice=beta"),
    ("MOONQ_API_KEYS", "sk-ok=alpha,sk-clé=beta"),  # a header cannot carry it: never matches
    ("MOONQ_ADMIN_KEYS", "sk-admin key"),
    ("MOONQ_METRICS_KEY", "sk-métrics"),
    ("MOONQ_RESULT_TTL", "soon"),
    ("MOONQ_WORKER_CONCURRENCY", "0"),
    ("REDIS_URL", "localhost:6379"),
    ("REDIS_URL", "redis://:sk-redis-pw@localhost:6379/first"),
    ("MOONSHOT_BASE_URL", "api.moonshot.cn/v1"),
]


@pytest.mark.parametrize(("name", "value"), BAD_SETTINGS)
@pytest.mark.parametrize("command", ["api", "worker"])
def test_bad_settings_are_a_message_not_a_traceback(
    tmp_path: Path, command: str, name: str, value: str
) -> None:
    proc = start(command, [command], clean_env(**{name: value}), tmp_path)
    out = exited(proc)
    assert proc.popen.returncode == 1
    assert "invalid settings" in out and name in out and "Traceback" not in out
    assert "sk-" not in out  # a would-be key or password is never echoed


@pytest.mark.e2e
@pytest.mark.parametrize("command", ["api", "worker", "dev"])
def test_a_database_redis_does_not_have_is_named(
    tmp_path: Path, real_redis_url: str, prefix: str, command: str
) -> None:
    """Redis answers "DB index is out of range": not a Redis that is "not reachable yet"."""
    missing = real_redis_url.rsplit("/", 1)[0] + "/99999"
    env = real_env(missing, prefix, MOONSHOT_BASE_URL="http://127.0.0.1:9/v1")
    proc = start(
        command, [command, *(["--port", "0"] if command != "worker" else [])], env, tmp_path
    )
    out = exited(proc)
    assert proc.popen.returncode == 1, out
    assert "REDIS_URL: that Redis has no database 99999" in out and "Traceback" not in out


@pytest.mark.e2e
def test_a_worker_refuses_to_start_without_an_upstream_key(
    tmp_path: Path, real_redis_url: str, prefix: str
) -> None:
    proc = start("worker", ["worker"], real_env(real_redis_url, prefix), tmp_path)
    out = exited(proc)
    assert proc.popen.returncode == 1
    assert "MOONSHOT_API_KEY is not set" in out and "Starting worker" not in out


@pytest.mark.parametrize("command", ["api", "dev"])
def test_an_open_api_is_refused_on_a_public_address(tmp_path: Path, command: str) -> None:
    env = clean_env(REDIS_URL="redis://127.0.0.1:1/0")
    proc = start(command, [command, "--host", "0.0.0.0", "--port", "0"], env, tmp_path)
    out = exited(proc)
    assert proc.popen.returncode == 1
    assert "MOONQ_API_KEYS is empty" in out and "MOONQ_ALLOW_OPEN" in out
    assert "Uvicorn running" not in out


def test_an_open_api_on_a_public_address_starts_when_allowed(tmp_path: Path) -> None:
    env = clean_env(REDIS_URL="redis://127.0.0.1:1/0", MOONQ_ALLOW_OPEN="true")
    proc = start("api", ["api", "--host", "0.0.0.0", "--port", "0"], env, tmp_path)
    try:
        port = wait_log(proc, r"Uvicorn running on http://0\.0\.0\.0:(\d+)").group(1)
        wait_http(f"http://127.0.0.1:{port}/healthz", proc)
    finally:
        proc.stop()


def test_the_fake_takes_any_request_without_a_key_and_only_its_key_with_one(
    tmp_path: Path,
) -> None:
    """So the README's by-hand steps work: a keyless worker on loopback, a keyless fake."""
    keyless = start(
        "fake", ["fake-moonshot", "--port", "0", "--chunks", "3"], clean_env(), tmp_path
    )
    keyed_args = ["fake-moonshot", "--port", "0", "--api-key", "sk-fake"]
    keyed = start("keyed", keyed_args, clean_env(), tmp_path)
    try:
        body = chat("x")["body"]
        open_url = f"http://127.0.0.1:{wait_log(keyless, FAKE).group(1)}/v1/chat/completions"
        answer = httpx.post(open_url, json=body)
        assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] == 3
        keyed_url = f"http://127.0.0.1:{wait_log(keyed, FAKE).group(1)}/v1/chat/completions"
        assert httpx.post(keyed_url, json=body).status_code == 401
        wrong = httpx.post(keyed_url, json=body, headers={"authorization": "Bearer sk-other"})
        assert wrong.status_code == 401
        right = httpx.post(keyed_url, json=body, headers={"authorization": "Bearer sk-fake"})
        assert right.status_code == 200
    finally:
        keyless.stop()
        keyed.stop()


def test_a_blank_upstream_key_counts_as_unset() -> None:
    from moonq.settings import Settings

    assert Settings(_env_file=None, MOONSHOT_API_KEY="  ").moonshot_api_key is None  # type: ignore[call-arg]


def check(pid: int, tmp_path: Path) -> int:
    proc = start(f"check{pid}", ["worker", "--check", "--pid", str(pid)], clean_env(), tmp_path)
    return proc.popen.wait(20)


@pytest.mark.e2e
def test_worker_check_is_about_that_worker(
    tmp_path: Path, real_redis_url: str, prefix: str
) -> None:
    """A keyless worker may run against a loopback upstream; `--check` vouches for it alone,
    and no longer once it is dead, even though its last heartbeat is still fresh."""
    env = real_env(real_redis_url, prefix, MOONSHOT_BASE_URL="http://127.0.0.1:9/v1")
    worker = start("worker", ["worker"], env, tmp_path)
    try:
        wait_log(worker, "moonq worker: upstream")
        deadline = time.monotonic() + 20
        while check(worker.popen.pid, tmp_path) != 0:
            assert time.monotonic() < deadline, worker.output()
            time.sleep(0.2)
        # a live process, but no worker (not this one: tests run workers in-process)
        bystander = subprocess.Popen(["sleep", "30"])
        try:
            assert check(bystander.pid, tmp_path) != 0
        finally:
            bystander.kill()
            bystander.wait()
    finally:
        worker.stop(signal.SIGKILL)
    try:
        assert check(worker.popen.pid, tmp_path) != 0
    finally:
        heartbeat_file(worker.popen.pid).unlink(missing_ok=True)  # a SIGKILL leaves it behind


def test_servers_raise_their_open_files_limit_to_the_hard_one() -> None:
    """Every stream holds a socket: a soft limit of 1,024 would refuse the 1,025th client."""
    import resource

    from moonq.cli import raise_open_files_limit

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    lowered = min(256, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (lowered, hard))
    try:
        raise_open_files_limit()
        raised = resource.getrlimit(resource.RLIMIT_NOFILE)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert raised[1] == hard
    if hard != resource.RLIM_INFINITY:
        assert raised[0] == hard
    assert raised[0] > lowered or hard == lowered
