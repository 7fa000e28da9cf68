"""A batch's counts stay true when workers are killed or frozen under it (real processes)."""

from __future__ import annotations

import json
import signal
import time
from typing import Any

import httpx
import pytest

from tests.conftest import record_of, until

pytestmark = pytest.mark.e2e

LOCK_TIMEOUT = 2  # s: a killed or frozen worker's lines run again after this


def _rows(n: int) -> bytes:
    rows = []
    for i in range(n):
        body = {
            "model": "moonshot-v1-8k",
            "messages": [{"role": "user", "content": f"document {i}"}],
            "fake_moonshot": {"chunks": 8, "delay": 0.05},
        }
        row = {"custom_id": f"d{i}", "method": "POST", "url": "/v1/chat/completions", "body": body}
        rows.append(json.dumps(row) + "\n")
    return "".join(rows).encode()


def test_counts_stay_true_when_workers_are_killed(cluster_factory: Any) -> None:
    """The official `openai` package against real processes: upload, create, workers killed
    under the batch, retrieve, list, the output file; then a second batch cancelled."""
    import openai

    cluster = cluster_factory(workers=2, limit=8, MOONQ_LOCK_TIMEOUT=str(LOCK_TIMEOUT))
    http = httpx.Client(base_url=cluster.api_url, timeout=30)
    sdk = openai.OpenAI(base_url=f"{cluster.api_url}/v1", api_key="unused", max_retries=0)
    uploaded = sdk.files.create(file=("in.jsonl", _rows(40)), purpose="batch")
    created = sdk.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    batch = {"id": created.id}

    def counts() -> dict[str, int]:
        found: dict[str, int] = http.get(f"/v1/batches/{batch['id']}").json()["request_counts"]
        return found

    def holder(done: int) -> str:
        """The worker running a line, once `done` lines are over ('' before)."""
        params = {"batch_id": batch["id"], "status": "in_progress"}
        jobs = http.get("/v1/jobs", params=params).json()["data"]
        if counts()["completed"] < done:
            return ""
        alive = {cluster.worker_id(w) for w in cluster.workers}
        owners = (record_of(cluster, job["id"]).get("worker", "") for job in jobs)
        return next((owner for owner in owners if owner in alive), "")

    found: list[str] = []
    for done_before_kill in (5, 20):
        until(lambda n=done_before_kill: found.append(holder(n)) or found[-1], 30)  # type: ignore[misc]
        victim = next(w for w in cluster.workers if cluster.worker_id(w) == found[-1])
        cluster.workers.remove(victim)
        victim.popen.send_signal(signal.SIGKILL)  # mid-stream: it holds several lines
        cluster.add_worker()
    # A stall, not a kill: a worker holding lines freezes past the lock timeout (others take
    # its lines over), then wakes up and must not count any line twice.
    until(lambda: found.append(holder(28)) or found[-1], 30)
    frozen = next(w for w in cluster.workers if cluster.worker_id(w) == found[-1])
    frozen.popen.send_signal(signal.SIGSTOP)
    time.sleep(LOCK_TIMEOUT + 2)
    frozen.popen.send_signal(signal.SIGCONT)
    until(lambda: sdk.batches.retrieve(created.id).status == "completed", 60)
    final = http.get(f"/v1/batches/{batch['id']}").json()
    assert [b.id for b in sdk.batches.list().data] == [created.id]
    assert final["request_counts"]["completed"] == 40
    assert final["request_counts"]["failed"] == 0
    output = [json.loads(x) for x in sdk.files.content(final["output_file_id"]).text.splitlines()]
    assert [row["custom_id"] for row in output] == [f"d{i}" for i in range(40)]
    assert final["usage"]["total_tokens"] == sum(
        row["response"]["body"]["usage"]["total_tokens"] for row in output
    )
    jobs = [
        job
        for row in output
        for job in [http.get(f"/v1/jobs/{row['response']['request_id']}").json()]
    ]
    retried = sum(job["attempts"] > 1 for job in jobs)
    print(f"\n{retried} of 40 lines ran again after a kill or the stall; counts exact")
    assert retried >= 1  # the kills did land mid-line
    with http.stream("GET", f"/v1/batches/{batch['id']}/events") as events:
        kinds = [json.loads(x[5:])["event"] for x in events.iter_lines() if x.startswith("data:")]
    assert kinds == ["line"] * 40 + ["done"]
    http.close()
    second = sdk.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    cancelled = sdk.batches.cancel(second.id)
    assert cancelled.status in ("cancelling", "cancelled")
    until(lambda: sdk.batches.retrieve(second.id).status == "cancelled", 5)
    counts_after = sdk.batches.retrieve(second.id).request_counts
    assert counts_after is not None and counts_after.total == 40
    sdk.close()
