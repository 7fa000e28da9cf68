"""Fixtures: real Redis (fails loudly in CI when missing), fakeredis, the fake upstream, and
factories for the API and worker."""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import pytest
import redis as sync_redis
from arq.connections import ArqRedis
from arq.constants import abort_jobs_ss as ABORT_SET

from api.app import create_app
from moonq.fake_moonshot import FakeServer, start_fake
from moonq.redis import connect, embedded
from moonq.settings import Settings
from tests.procs import RedisServer
from worker.main import create_worker

# Tests use their own database index and a key prefix of their own, and delete what they wrote.
TEST_DB = int(os.environ.get("MOONQ_TEST_REDIS_DB", "13"))
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _test_redis_url() -> str:
    parts = urlsplit(os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"))
    return urlunsplit(parts._replace(path=f"/{TEST_DB}"))


@pytest.fixture(scope="session")
def real_redis_url() -> str:
    url = _test_redis_url()
    client = sync_redis.Redis.from_url(url, socket_connect_timeout=2)
    try:
        client.ping()
    except sync_redis.RedisError as exc:
        if IN_CI:
            pytest.fail(f"CI=true but real Redis is not reachable at {url}: {exc}", pytrace=False)
        pytest.skip(f"real Redis not reachable at {url} (set REDIS_URL)")
    finally:
        client.close()
    return url


def cleanup_prefix(url: str, prefix: str) -> None:
    """Delete every key under the prefix, and arq's keys (and abort requests) for the
    prefix's jobs."""
    client = sync_redis.Redis.from_url(url)
    try:
        doomed = list(client.scan_iter(f"{prefix}:*", count=1000))
        job_ids = {k.decode().rsplit(":", 1)[1] for k in doomed if b":job:" in k}
        for key in doomed:  # also jobs whose record a test deleted
            if key.endswith((b":jobs", b":queue")) and client.type(key) == b"zset":
                members: list[bytes] = client.zrange(key, 0, -1)  # type: ignore[assignment]
                job_ids.update(m.decode() for m in members)
        arq = ("arq:job:", "arq:in-progress:", "arq:retry:", "arq:result:")
        doomed += [f"{kind}{job_id}".encode() for job_id in job_ids for kind in arq]
        for i in range(0, len(doomed), 500):
            client.delete(*doomed[i : i + 500])
        ids = sorted(job_ids)
        for i in range(0, len(ids), 500):  # arq's abort set is shared by every queue
            client.zrem(ABORT_SET, *ids[i : i + 500])
    finally:
        client.close()


@pytest.fixture
def prefix(request: pytest.FixtureRequest) -> Iterator[str]:
    """A key prefix of this test's own."""
    name = f"t{uuid.uuid4().hex[:10]}"
    yield name
    if "real_redis_url" in request.fixturenames:
        cleanup_prefix(request.getfixturevalue("real_redis_url"), name)


@pytest.fixture
async def fake() -> AsyncIterator[FakeServer]:
    server = await start_fake()
    yield server
    await server.close()


def make_settings(redis_url: str, prefix: str, upstream: str, **extra: Any) -> Settings:
    values: dict[str, Any] = {
        "REDIS_URL": redis_url,
        "MOONQ_KEY_PREFIX": prefix,
        "MOONQ_QUEUE_NAME": f"{prefix}:queue",
        "MOONSHOT_BASE_URL": upstream,
        "MOONSHOT_API_KEY": "sk-test-upstream-key",
        "MOONQ_POLL_DELAY": 0.01,
        "MOONQ_API_KEYS": "",
        **extra,
    }
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


@pytest.fixture
async def fake_redis() -> AsyncIterator[ArqRedis]:
    client = embedded()
    yield client
    await client.aclose()


@pytest.fixture
async def real_redis(real_redis_url: str) -> AsyncIterator[ArqRedis]:
    client = connect(real_redis_url)
    yield client
    await client.aclose()


class Stack:
    """An API (in-process, over ASGI) and burst workers sharing one Redis client."""

    def __init__(self, settings: Settings, redis: ArqRedis) -> None:
        self.settings = settings
        self.redis = redis
        self.app = create_app(settings, redis=redis)

    async def events(self, job_id: str) -> list[dict[str, Any]]:
        """The job's event log, read straight from Redis."""
        rows = await self.redis.xrange(f"{self.settings.key_prefix}:log:{job_id}")
        return [json.loads(fields[b"e"]) for _, fields in rows]

    async def run_worker(self, **overrides: Any) -> None:
        """Run a worker until the queue is empty, as `arq --burst` would."""
        worker = create_worker(
            self.settings, redis=self.redis, burst=True, handle_signals=False, **overrides
        )
        try:
            await worker.main()
        finally:
            await worker.close()


async def _stacks(
    redis: ArqRedis, redis_url: str, upstream: str, prefix: str
) -> AsyncIterator[Any]:
    """A factory of `(stack, client)` pairs on `redis`, closed when the test ends."""
    opened: list[Any] = []

    async def build(**extra: Any) -> tuple[Stack, httpx.AsyncClient]:
        stack = Stack(make_settings(redis_url, prefix, upstream, **extra), redis)
        lifespan = stack.app.router.lifespan_context(stack.app)
        await lifespan.__aenter__()
        client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=stack.app), base_url="http://moonq"
        )
        opened.append((lifespan, client))
        return stack, client

    yield build
    for lifespan, client in reversed(opened):
        await client.aclose()
        await lifespan.__aexit__(None, None, None)


@pytest.fixture
async def stack_factory(fake_redis: ArqRedis, fake: FakeServer, prefix: str) -> AsyncIterator[Any]:
    """Build `(stack, client)` pairs over fakeredis and the fake upstream."""
    async for build in _stacks(fake_redis, "redis://unused", fake.url, prefix):
        yield build


@pytest.fixture
async def real_stack(
    real_redis: ArqRedis, real_redis_url: str, fake: FakeServer, prefix: str
) -> AsyncIterator[Any]:
    """Build `(stack, client)` pairs over the real Redis and the fake upstream."""
    async for build in _stacks(real_redis, real_redis_url, fake.url, prefix):
        yield build


async def submit(client: httpx.AsyncClient, payload: dict[str, Any], **kwargs: Any) -> str:
    """POST a job; its id."""
    response = await client.post("/v1/jobs", json=payload, **kwargs)
    assert response.status_code == 202, response.text
    job_id: str = response.json()["id"]
    return job_id


def chat(text: str = "hello", **extra: Any) -> dict[str, Any]:
    """A job submission for the fake upstream."""
    body = {"model": "moonshot-v1-8k", "messages": [{"role": "user", "content": text}], **extra}
    return {"body": body}


# Real processes: the fake upstream, the API and workers (tests/chaos.py's Cluster), and a
# redis-server of a test's own for outages.


@pytest.fixture
def cluster_factory(real_redis_url: str, tmp_path: Path) -> Iterator[Any]:
    """Build started `Cluster`s (on the test Redis unless given another), stopped after."""
    from tests.chaos import Cluster, Config

    made: list[Cluster] = []

    def make(
        redis_url: str = real_redis_url, workers: int = 1, limit: int = 50, **env: str
    ) -> Cluster:
        cluster = Cluster(Config(redis_url=redis_url, limit=limit), tmp_path, **env)
        made.append(cluster)
        cluster.start(workers=workers)
        return cluster

    yield make
    for cluster in made:
        cluster.stop()
        if cluster.config.redis_url == real_redis_url:  # a test's own Redis dies with it
            cleanup_prefix(cluster.config.redis_url, cluster.prefix)


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of this test's own, AOF on (`appendfsync always`)."""
    if not (shutil.which("redis-server") or os.path.exists("/usr/bin/redis-server")):
        if IN_CI:
            pytest.fail("CI=true but redis-server is not installed", pytrace=False)
        pytest.skip("redis-server is not installed")
    server = RedisServer(tmp_path, aof=True)
    server.start()
    yield server
    server.stop()


def until(predicate: Callable[[], Any], timeout: float, every: float = 0.05) -> float:
    """Seconds until `predicate()` held; fails after `timeout`."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if predicate():
            return time.monotonic() - started
        time.sleep(every)
    raise AssertionError(f"not within {timeout}s")


def job_of(cluster: Any, job_id: str, wait: float = 0) -> dict[str, Any]:
    """The job as the cluster's API shows it."""
    answer = httpx.get(
        f"{cluster.api_url}/v1/jobs/{job_id}", params={"wait": wait}, timeout=wait + 10
    )
    answer.raise_for_status()
    job: dict[str, Any] = answer.json()
    return job


def submit_to(cluster: Any, payload: dict[str, Any]) -> str:
    """POST a job to the cluster's API; its id."""
    answer = httpx.post(f"{cluster.api_url}/v1/jobs", json=payload, timeout=10)
    assert answer.status_code == 202, answer.text
    job_id: str = answer.json()["id"]
    return job_id


def events_of(cluster: Any, job_id: str) -> list[dict[str, Any]]:
    """The job's event log, read straight from the cluster's Redis."""
    client = sync_redis.Redis.from_url(cluster.redis_url)
    try:
        rows: list[Any] = client.xrange(f"{cluster.prefix}:log:{job_id}")  # type: ignore[assignment]
    finally:
        client.close()
    return [json.loads(fields[b"e"]) for _, fields in rows]


def record_of(cluster: Any, job_id: str) -> dict[str, str]:
    """The job's raw record in Redis."""
    client = sync_redis.Redis.from_url(cluster.redis_url)
    try:
        raw: dict[bytes, bytes] = client.hgetall(f"{cluster.prefix}:job:{job_id}")  # type: ignore[assignment]
    finally:
        client.close()
    return {k.decode(): v.decode() for k, v in raw.items()}
