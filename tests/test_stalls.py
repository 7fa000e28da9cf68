"""Stalls with real processes: a worker SIGSTOPped past its lock, whose job another worker
takes over, then wakes up. The worst fault found so far came from such a run."""

from __future__ import annotations

import signal
from typing import Any

import pytest
import redis as sync_redis

from moonq.fake_moonshot import expected_content
from tests.conftest import chat, events_of, job_of, record_of, submit_to, until

pytestmark = pytest.mark.e2e


def _ttls(cluster: Any, job_id: str) -> tuple[int, int]:
    client = sync_redis.Redis.from_url(cluster.redis_url)
    try:
        job = int(client.ttl(f"{cluster.prefix}:job:{job_id}"))  # type: ignore[arg-type]
        log = int(client.ttl(f"{cluster.prefix}:log:{job_id}"))  # type: ignore[arg-type]
    finally:
        client.close()
    return job, log


def _assert_completed_once(cluster: Any, job_id: str, payload: dict[str, Any]) -> None:
    job = job_of(cluster, job_id, wait=30)
    assert job["status"] == "completed", job
    content = job["result"]["choices"][0]["message"]["content"]
    assert content == expected_content(payload["body"])
    events = events_of(cluster, job_id)
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert [e["event"] for e in events].count("done") == 1
    assert min(_ttls(cluster, job_id)) > 0


@pytest.mark.parametrize("handback", ["sigterm", "retryable_error"])
def test_a_stalled_run_that_lost_its_job_never_strands_it(
    cluster_factory: Any, handback: str
) -> None:
    """Worker A stalls past the lock; B takes the job over and hands it back (a shutdown, or
    a retryable upstream error). When A wakes, its run is fenced off; it must not make arq
    forget the job, which is queued and not over: the job still completes, once."""
    cluster = cluster_factory(
        workers=1,
        MOONQ_LOCK_TIMEOUT="1",
        MOONQ_SHUTDOWN_GRACE="0",
        MOONQ_RETRY_BASE_DELAY="0.2",
        MOONQ_RETRY_MAX_DELAY="0.2",
    )
    a = cluster.workers[0]
    steer: dict[str, Any] = {"chunks": 40, "delay": 0.15}  # a 6 s stream
    if handback == "retryable_error":  # the second request (B's) gets a 429 once
        key = f"stall-{cluster.prefix}"
        steer |= {"error": "rate_limit_reached_error", "fail_times": 1, "fail_after": 1}
        steer |= {"key": key, "retry_after": 3}  # B's retry waits 3 s: A wakes meanwhile
    payload = chat(f"stalled {handback}", fake_moonshot=steer)
    job_id = submit_to(cluster, payload)
    until(lambda: len(events_of(cluster, job_id)) >= 4, 15)  # A is streaming
    started = int(record_of(cluster, job_id)["attempts"])
    a.popen.send_signal(signal.SIGSTOP)
    try:
        b = cluster.add_worker()
        until(lambda: int(record_of(cluster, job_id)["attempts"]) > started, 20)
        if handback == "sigterm":
            until(lambda: events_of(cluster, job_id)[-1]["attempt"] > started, 10)
            b.stop(signal.SIGTERM)
        else:  # B's request gets the 429 and B hands the job back by itself
            until(lambda: record_of(cluster, job_id)["status"] == "queued", 10)
        assert record_of(cluster, job_id)["status"] == "queued"
    finally:
        a.popen.send_signal(signal.SIGCONT)
    _assert_completed_once(cluster, job_id, payload)


def test_a_stall_past_the_lock_loses_nothing_and_runs_once_more(cluster_factory: Any) -> None:
    """A worker stalled past its lock, with another worker live: the job moves to the live
    worker, the stalled one is fenced when it wakes, and one result is recorded."""
    cluster = cluster_factory(workers=2, MOONQ_LOCK_TIMEOUT="1")
    payload = chat("stall, two workers", fake_moonshot={"chunks": 30, "delay": 0.1})
    job_id = submit_to(cluster, payload)
    until(lambda: len(events_of(cluster, job_id)) >= 3, 15)
    holder = record_of(cluster, job_id)["worker"]
    stalled = next(w for w in cluster.workers if holder.endswith(f":{w.popen.pid}"))
    stalled.popen.send_signal(signal.SIGSTOP)
    try:
        until(lambda: int(record_of(cluster, job_id)["attempts"]) == 2, 20)
    finally:
        stalled.popen.send_signal(signal.SIGCONT)
    _assert_completed_once(cluster, job_id, payload)


def test_a_stalled_worker_whose_jobs_moved_is_fenced_on_all_of_them(
    cluster_factory: Any,
) -> None:
    """Worker A runs 4 jobs and stalls (SIGSTOP) past the 1 s lock; B takes them all over. On
    SIGCONT A's lock renewer finds every one of its jobs due in one call: none is taken back
    (B holds them), and each job completes once, its events in order (written by a review of
    the renewer that renews a worker's locks together)."""
    cluster = cluster_factory(workers=1, MOONQ_LOCK_TIMEOUT="1")
    a = cluster.workers[0]
    payloads = [chat(f"stall {i}", fake_moonshot={"chunks": 40, "delay": 0.1}) for i in range(4)]
    ids = [submit_to(cluster, p) for p in payloads]
    until(lambda: all(len(events_of(cluster, j)) >= 3 for j in ids), 15)
    a.popen.send_signal(signal.SIGSTOP)
    try:
        cluster.add_worker()
        until(lambda: all(int(record_of(cluster, j)["attempts"]) == 2 for j in ids), 20)
    finally:
        a.popen.send_signal(signal.SIGCONT)
    for job_id, payload in zip(ids, payloads, strict=True):
        _assert_completed_once(cluster, job_id, payload)
