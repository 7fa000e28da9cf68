"""Faults with real processes: a worker killed mid-stream, a worker told to stop, and Redis
going away and coming back."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis as sync_redis
from httpx_sse import connect_sse

from moonq.fake_moonshot import expected_content, expected_usage
from tests.chaos import Cluster, Config
from tests.conftest import IN_CI, chat, cleanup_prefix
from tests.procs import free_port

pytestmark = pytest.mark.e2e


@pytest.fixture
def cluster_factory(real_redis_url: str, tmp_path: Path) -> Iterator[Any]:
    made: list[Cluster] = []

    def make(redis_url: str = real_redis_url, workers: int = 1, **env: str) -> Cluster:
        cluster = Cluster(Config(redis_url=redis_url, limit=50), tmp_path, **env)
        made.append(cluster)
        cluster.start(workers=workers)
        return cluster

    yield make
    for cluster in made:
        cluster.stop()
        if cluster.config.redis_url == real_redis_url:  # a test's own Redis dies with it
            cleanup_prefix(cluster.config.redis_url, cluster.prefix)


def _job(cluster: Cluster, job_id: str, wait: float = 0) -> dict[str, Any]:
    answer = httpx.get(
        f"{cluster.api_url}/v1/jobs/{job_id}", params={"wait": wait}, timeout=wait + 10
    )
    answer.raise_for_status()
    job: dict[str, Any] = answer.json()
    return job


def _submit(cluster: Cluster, payload: dict[str, Any]) -> str:
    answer = httpx.post(f"{cluster.api_url}/v1/jobs", json=payload, timeout=10)
    assert answer.status_code == 202, answer.text
    job_id: str = answer.json()["id"]
    return job_id


def _until(predicate: Any, timeout: float, every: float = 0.05) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if predicate():
            return time.monotonic() - started
        time.sleep(every)
    raise AssertionError(f"not within {timeout}s")


def _events(cluster: Cluster, job_id: str) -> list[dict[str, Any]]:
    client = sync_redis.Redis.from_url(cluster.config.redis_url)
    try:
        rows = client.xrange(f"{cluster.prefix}:log:{job_id}")
    finally:
        client.close()
    return [json.loads(fields[b"e"]) for _, fields in rows]


def test_a_killed_workers_job_runs_again_within_15s(cluster_factory: Any) -> None:
    cluster = cluster_factory(workers=2)  # the default lock timeout: 10 s
    payload = chat("crash me", fake_moonshot={"chunks": 40, "delay": 0.05})
    job_id = _submit(cluster, payload)
    _until(lambda: _job(cluster, job_id)["status"] == "in_progress", 10)
    _until(lambda: len(_events(cluster, job_id)) >= 3, 10)  # mid-stream
    owner = next(w for w in cluster.workers if cluster.worker_id(w) in _owner(cluster, job_id))
    owner.popen.send_signal(signal.SIGKILL)
    recovered = _until(lambda: _job(cluster, job_id)["attempts"] == 2, 15)
    assert recovered < 15
    done = _job(cluster, job_id, wait=20)
    assert done["status"] == "completed" and done["attempts"] == 2
    assert done["result"]["choices"][0]["message"]["content"] == expected_content(payload["body"])
    assert done["usage"] == expected_usage(payload["body"])
    kinds = [e["event"] for e in _events(cluster, job_id)]
    assert kinds.count("retry") == 1 and kinds.count("done") == 1 and kinds[-1] == "done"
    ledger = sync_redis.Redis.from_url(cluster.config.redis_url)
    try:
        usage = ledger.hgetall(f"{cluster.prefix}:usage:default")
    finally:
        ledger.close()
    assert int(usage[b"jobs"]) == 1  # recorded once
    assert int(usage[b"total_tokens"]) == expected_usage(payload["body"])["total_tokens"]


def _owner(cluster: Cluster, job_id: str) -> str:
    client = sync_redis.Redis.from_url(cluster.config.redis_url)
    try:
        return (client.hget(f"{cluster.prefix}:job:{job_id}", "worker") or b"").decode()
    finally:
        client.close()


def test_sigterm_finishes_short_jobs_and_hands_back_long_ones(cluster_factory: Any) -> None:
    cluster = cluster_factory(workers=1, MOONQ_SHUTDOWN_GRACE="2")
    short = _submit(cluster, chat("short", fake_moonshot={"chunks": 10, "delay": 0.1}))
    long = _submit(cluster, chat("long", fake_moonshot={"chunks": 50, "delay": 0.08}))
    _until(lambda: all(_job(cluster, j)["status"] == "in_progress" for j in (short, long)), 10)
    worker = cluster.workers[0]
    worker.popen.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    late = _submit(cluster, chat("after the signal"))
    assert worker.popen.wait(15) == 0
    assert _job(cluster, short)["status"] == "completed"  # finished within the grace
    handed_back = _job(cluster, long)
    assert handed_back["status"] == "queued" and handed_back["attempts"] == 1
    assert _job(cluster, late)["status"] == "queued"  # not taken by a stopping worker
    cluster.add_worker()
    for job_id in (long, late):
        assert _job(cluster, job_id, wait=30)["status"] == "completed"
    final = _job(cluster, long)
    assert final["attempts"] == 2
    retry = [e for e in _events(cluster, long) if e["event"] == "retry"]
    assert len(retry) == 1 and "shut down" in retry[0]["data"]["reason"]


class RedisServer:
    """A Redis of this test's own, with AOF on, that it can kill and restart."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.dir = workdir / "redis"
        self.dir.mkdir()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        args = [
            binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.dir),
            "--appendonly",
            "yes",
            "--appendfsync",
            "always",
            "--save",
            "",
        ]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = sync_redis.Redis.from_url(self.url)
        try:
            _until(lambda: _pings(client), 10)
        finally:
            client.close()

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)


def _pings(client: sync_redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except sync_redis.RedisError:
        return False


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    if not (shutil.which("redis-server") or os.path.exists("/usr/bin/redis-server")):
        if IN_CI:
            pytest.fail("CI=true but redis-server is not installed", pytrace=False)
        pytest.skip("redis-server is not installed")
    server = RedisServer(tmp_path)
    server.start()
    yield server
    if server.proc is not None and server.proc.poll() is None:
        server.kill()


def test_redis_outage_is_503_and_everything_recovers(
    cluster_factory: Any, own_redis: RedisServer
) -> None:
    cluster = cluster_factory(redis_url=own_redis.url, workers=0)
    queued = [_submit(cluster, chat(f"survivor {i}")) for i in range(5)]
    own_redis.kill()
    started = time.monotonic()
    down = httpx.post(f"{cluster.api_url}/v1/jobs", json=chat(), timeout=30)
    assert down.status_code == 503 and down.json()["error"]["type"] == "service_unavailable"
    poll = httpx.get(f"{cluster.api_url}/v1/jobs/{queued[0]}", params={"wait": 5}, timeout=30)
    assert poll.status_code == 503
    assert httpx.get(f"{cluster.api_url}/readyz", timeout=30).status_code == 503
    assert time.monotonic() - started < 10  # answered, not hung
    own_redis.start()  # same port, same AOF file
    _until(lambda: httpx.get(f"{cluster.api_url}/readyz").status_code == 200, 10)
    queued.append(_submit(cluster, chat("after the outage")))  # the API recovered by itself
    worker = cluster.add_worker()
    for job_id in queued:  # the queued jobs survived the restart
        assert _job(cluster, job_id, wait=20)["status"] == "completed"
    own_redis.kill()  # now with a worker running
    time.sleep(2)
    own_redis.start()
    _until(lambda: httpx.get(f"{cluster.api_url}/readyz").status_code == 200, 10)
    after = _submit(cluster, chat("the worker recovered"))
    assert _job(cluster, after, wait=30)["status"] == "completed"
    assert worker.popen.poll() is None  # the same worker, never restarted


def _read_sse(url: str, last_event_id: str | None = None) -> list[tuple[str, str, str]]:
    """(event name, id, data) of every SSE event until the server ends the stream."""
    headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
    with (
        httpx.Client(timeout=60) as client,
        connect_sse(client, "GET", url, headers=headers) as sse,
    ):
        return [(e.event, e.id, e.data) for e in sse.iter_sse()]


def test_a_redis_blip_mid_stream_loses_nothing(
    cluster_factory: Any, own_redis: RedisServer
) -> None:
    cluster = cluster_factory(redis_url=own_redis.url, workers=1)
    payload = chat("through the blip", fake_moonshot={"chunks": 40, "delay": 0.1})
    job_id = _submit(cluster, payload)
    url = f"{cluster.api_url}/v1/jobs/{job_id}/events"
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(_read_sse, url)
        _until(lambda: _job(cluster, job_id)["status"] == "in_progress", 10)
        time.sleep(1.0)  # mid-stream
        own_redis.kill()
        cut = first.result(timeout=30)
    assert cut[-1][0] == "stream_error"  # the open stream says so, and ends
    seen = [(i, d) for name, i, d in cut if name == "message"]
    time.sleep(1.0)
    own_redis.start()
    rest = _read_sse(url, last_event_id=seen[-1][0] if seen else None)
    events = [json.loads(d) for _, d in seen] + [
        json.loads(d) for name, _, d in rest if name == "message"
    ]
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))  # none lost or doubled
    assert events[-1]["event"] == "done"
    assert any(e["event"] == "retry" for e in events)
    final = [e for e in events if e["attempt"] == events[-1]["attempt"] and e["event"] == "chunk"]
    content = "".join(e["data"]["choices"][0]["delta"].get("content") or "" for e in final)
    assert content == expected_content(payload["body"])
    assert _job(cluster, job_id)["result"]["choices"][0]["message"]["content"] == content
