"""Faults with real processes: a worker killed mid-stream, a worker told to stop, and Redis
going away and coming back."""

from __future__ import annotations

import json
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from httpx_sse import connect_sse

from moonq.fake_moonshot import expected_content, expected_usage
from tests.chaos import Cluster
from tests.conftest import chat, events_of, job_of, record_of, submit_to, until
from tests.procs import RedisServer, wait_log

pytestmark = pytest.mark.e2e


def test_a_killed_workers_job_runs_again_within_the_lock_timeout(cluster_factory: Any) -> None:
    cluster = cluster_factory(workers=2)  # MOONQ_LOCK_TIMEOUT 5 s, as by default
    payload = chat("crash me", fake_moonshot={"chunks": 40, "delay": 0.05})
    job_id = submit_to(cluster, payload)
    until(lambda: job_of(cluster, job_id)["status"] == "in_progress", 10)
    until(lambda: len(events_of(cluster, job_id)) >= 3, 10)  # mid-stream
    owner = next(w for w in cluster.workers if cluster.worker_id(w) in _owner(cluster, job_id))
    owner.popen.send_signal(signal.SIGKILL)
    recovered = until(lambda: job_of(cluster, job_id)["attempts"] == 2, 60)
    # The lock lapses after the lock timeout; the other worker polls every 20 ms. A loaded
    # 2-core machine may add a few seconds, no more.
    assert recovered < cluster.config.lock_timeout + 5, f"recovered after {recovered:.1f} s"
    print(f"\nkilled mid-stream: the next attempt started after {recovered:.2f} s")
    done = job_of(cluster, job_id, wait=20)
    assert done["status"] == "completed" and done["attempts"] == 2
    assert done["result"]["choices"][0]["message"]["content"] == expected_content(payload["body"])
    assert done["usage"] == expected_usage(payload["body"])
    kinds = [e["event"] for e in events_of(cluster, job_id)]
    assert kinds.count("retry") == 1 and kinds.count("done") == 1 and kinds[-1] == "done"
    usage = httpx.get(f"{cluster.api_url}/v1/usage", timeout=10).json()["total"]
    assert usage["jobs"] == 1  # recorded once
    assert usage["total_tokens"] == expected_usage(payload["body"])["total_tokens"]


def _owner(cluster: Cluster, job_id: str) -> str:
    return record_of(cluster, job_id).get("worker", "")


def test_sigterm_finishes_short_jobs_and_hands_back_long_ones(cluster_factory: Any) -> None:
    cluster = cluster_factory(workers=1, MOONQ_SHUTDOWN_GRACE="2")
    short = submit_to(cluster, chat("short", fake_moonshot={"chunks": 10, "delay": 0.1}))
    long = submit_to(cluster, chat("long", fake_moonshot={"chunks": 50, "delay": 0.08}))
    until(lambda: all(job_of(cluster, j)["status"] == "in_progress" for j in (short, long)), 10)
    worker = cluster.workers[0]
    worker.popen.send_signal(signal.SIGTERM)
    wait_log(worker, "SIGTERM")  # arq's "shutdown on SIGTERM": it takes no job any more
    late = submit_to(cluster, chat("after the signal"))
    assert worker.popen.wait(15) == 0
    assert job_of(cluster, short)["status"] == "completed"  # finished within the grace
    handed_back = job_of(cluster, long)
    assert handed_back["status"] == "queued" and handed_back["attempts"] == 1
    assert job_of(cluster, late)["status"] == "queued"  # not taken by a stopping worker
    cluster.add_worker()
    for job_id in (long, late):
        assert job_of(cluster, job_id, wait=30)["status"] == "completed"
    final = job_of(cluster, long)
    assert final["attempts"] == 2
    retry = [e for e in events_of(cluster, long) if e["event"] == "retry"]
    assert len(retry) == 1 and "shut down" in retry[0]["data"]["reason"]


def test_redis_outage_is_503_and_everything_recovers(
    cluster_factory: Any, own_redis: RedisServer
) -> None:
    cluster = cluster_factory(redis_url=own_redis.url, workers=0)
    queued = [submit_to(cluster, chat(f"survivor {i}")) for i in range(5)]
    own_redis.kill()
    started = time.monotonic()
    down = httpx.post(f"{cluster.api_url}/v1/jobs", json=chat(), timeout=30)
    assert down.status_code == 503 and down.json()["error"]["type"] == "service_unavailable"
    poll = httpx.get(f"{cluster.api_url}/v1/jobs/{queued[0]}", params={"wait": 5}, timeout=30)
    assert poll.status_code == 503
    assert httpx.get(f"{cluster.api_url}/readyz", timeout=30).status_code == 503
    assert time.monotonic() - started < 10  # answered, not hung
    own_redis.start()  # same port, same AOF file
    until(lambda: httpx.get(f"{cluster.api_url}/readyz").status_code == 200, 10)
    queued.append(submit_to(cluster, chat("after the outage")))  # the API recovered by itself
    worker = cluster.add_worker()
    for job_id in queued:  # the queued jobs survived the restart
        assert job_of(cluster, job_id, wait=20)["status"] == "completed"
    own_redis.kill()  # now with a worker running
    wait_log(worker, "Redis unavailable")  # the worker noticed, and keeps polling
    own_redis.start()
    until(lambda: httpx.get(f"{cluster.api_url}/readyz").status_code == 200, 10)
    after = submit_to(cluster, chat("the worker recovered"))
    assert job_of(cluster, after, wait=30)["status"] == "completed"
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
    job_id = submit_to(cluster, payload)
    url = f"{cluster.api_url}/v1/jobs/{job_id}/events"
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(_read_sse, url)
        until(lambda: len(events_of(cluster, job_id)) >= 8, 10)  # mid-stream
        own_redis.kill()
        cut = first.result(timeout=30)
    assert cut[-1][0] == "stream_error"  # the open stream says so, and ends
    api = next(proc for proc in cluster.procs if proc.name.startswith("api"))
    wait_log(api, f"job {job_id}: its stream ended on a Redis error", 5)  # and the API's log
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
    assert job_of(cluster, job_id)["result"]["choices"][0]["message"]["content"] == content
