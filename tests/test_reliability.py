"""Through the API (in-process, over ASGI: no socket) and a real arq worker: cancel,
idempotency, body limits, the upstream limiter. What needs a real socket or real processes
(a 413 instead of a reset, SIGTERM, Redis hanging) is in test_outages.py and test_faults.py."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from moonq.fake_moonshot import expected_content
from tests.conftest import chat, submit

TENANTS = {"MOONQ_API_KEYS": "ka=alpha,kb=beta"}
A = {"authorization": "Bearer ka"}
B = {"authorization": "Bearer kb"}


async def _has_events(stack: Any, job_id: str, n: int) -> bool:
    return len(await stack.events(job_id)) >= n


async def _no_upstream(fake: Any) -> bool:
    return bool(fake.stats.in_flight == 0)


async def _until(check: Callable[[], Awaitable[bool]], timeout: float) -> None:
    """Return once `check()` holds; fail after `timeout` seconds."""
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        if await check():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"not within {timeout} s")


def _kinds(events: list[dict[str, Any]]) -> list[str]:
    return [e["event"] for e in events]


async def test_cancel_a_queued_job(stack_factory: Any, fake: Any) -> None:
    stack, client = await stack_factory(**TENANTS)
    job_id = await submit(client, chat("never run"), headers=A)
    response = await client.post(f"/v1/jobs/{job_id}/cancel", headers=B)
    assert response.status_code == 404 and response.json()["error"]["type"] == "not_found_error"
    assert (await client.get(f"/v1/jobs/{job_id}", headers=A)).json()["status"] == "queued"

    response = await client.post(f"/v1/jobs/{job_id}/cancel", headers=A)
    assert response.status_code == 200, response.text
    assert response.json()["id"] == job_id and response.json()["status"] == "cancelled"
    await stack.run_worker()
    assert fake.stats.requests == 0
    assert (await client.get(f"/v1/jobs/{job_id}", headers=A)).json()["status"] == "cancelled"
    assert _kinds(await stack.events(job_id)) == ["cancelled"]

    again = await client.post(f"/v1/jobs/{job_id}/cancel", headers=A)
    assert again.status_code == 409 and again.json()["error"]["type"] == "conflict_error"
    unknown = await client.post(f"/v1/jobs/job_{'0' * 32}/cancel", headers=A)
    assert unknown.status_code == 404 and unknown.json()["error"]["message"]


async def test_cancelling_a_completed_job_is_409(stack_factory: Any, fake: Any) -> None:
    stack, client = await stack_factory()
    job_id = await submit(client, chat("finish first"))
    await stack.run_worker()
    before = await client.get(f"/v1/jobs/{job_id}")
    response = await client.post(f"/v1/jobs/{job_id}/cancel")
    assert response.status_code == 409 and response.json()["error"]["type"] == "conflict_error"
    after = await client.get(f"/v1/jobs/{job_id}")
    assert after.json() == before.json() and after.json()["status"] == "completed"
    assert _kinds(await stack.events(job_id))[-1] == "done"


async def test_cancel_in_flight_stops_the_upstream(stack_factory: Any, fake: Any) -> None:
    stack, client = await stack_factory()
    payload = chat("a long answer", fake_moonshot={"chunks": 200, "delay": 0.02})
    job_id = await submit(client, payload)
    worker = asyncio.create_task(stack.run_worker())
    try:
        await _until(lambda: _has_events(stack, job_id, 4), timeout=2)
        assert fake.stats.in_flight == 1
        asked = asyncio.get_running_loop().time()
        response = await client.post(f"/v1/jobs/{job_id}/cancel")
        assert response.status_code == 200 and response.json()["status"] == "cancelled"
        await _until(lambda: _no_upstream(fake), timeout=1)
        stopped = asyncio.get_running_loop().time() - asked
        assert stopped <= 1.0, "the upstream stream was not closed within 1 s"
        job = (await client.get(f"/v1/jobs/{job_id}")).json()
        assert job["status"] == "cancelled"
        await asyncio.wait_for(worker, 2)
    finally:
        worker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await worker
    content = job["result"]["choices"][0]["message"]["content"]
    full = expected_content(payload["body"])
    assert content and full.startswith(content) and len(content) < len(full)
    kinds = _kinds(await stack.events(job_id))
    assert kinds[-1] == "cancelled" and kinds.count("cancelled") == 1 and "done" not in kinds
    assert fake.stats.completed == 0


async def test_idempotency_key_runs_one_job(stack_factory: Any, fake: Any) -> None:
    stack, client = await stack_factory(**TENANTS)
    payload = chat("exactly once")
    key = {"idempotency-key": "batch-7-doc-42"}
    first = await client.post("/v1/jobs", json=payload, headers=A | key)
    second = await client.post("/v1/jobs", json=payload, headers=A | key)
    assert first.status_code == second.status_code == 202
    assert "idempotent-replayed" not in first.headers
    assert second.headers["idempotent-replayed"] == "true"
    assert second.json()["id"] == first.json()["id"]

    await stack.run_worker()
    assert fake.stats.requests == 1
    listed = (await client.get("/v1/jobs", headers=A)).json()["data"]
    assert [j["id"] for j in listed] == [first.json()["id"]]
    replay = await client.post("/v1/jobs", json=payload, headers=A | key)
    assert replay.json()["id"] == first.json()["id"] and replay.json()["status"] == "completed"

    other = await client.post("/v1/jobs", json=payload, headers=B | key)
    assert other.status_code == 202 and other.json()["id"] != first.json()["id"]
    assert "idempotent-replayed" not in other.headers

    changed = await client.post("/v1/jobs", json=chat("something else"), headers=A | key)
    assert changed.status_code == 422
    assert changed.json()["error"]["type"] == "idempotency_error"
    assert len((await client.get("/v1/jobs", headers=A)).json()["data"]) == 1


async def test_concurrent_retries_with_one_key_make_one_job(stack_factory: Any, fake: Any) -> None:
    stack, client = await stack_factory()
    headers = {"idempotency-key": "retry-storm"}
    responses = await asyncio.gather(
        *(client.post("/v1/jobs", json=chat("once"), headers=headers) for _ in range(8))
    )
    assert {r.status_code for r in responses} == {202}
    assert len({r.json()["id"] for r in responses}) == 1
    assert sum("idempotent-replayed" in r.headers for r in responses) == 7
    await stack.run_worker()
    assert fake.stats.requests == 1


def _payload_of_size(size: int) -> bytes:
    """A valid submission of exactly `size` bytes."""
    base = json.dumps(chat("")).encode()
    body = json.dumps(chat("x" * (size - len(base)))).encode()
    assert len(body) == size
    return body


async def _chunked(body: bytes, sent: list[int], piece: int = 512) -> AsyncIterator[bytes]:
    for i in range(0, len(body), piece):
        sent.append(i)
        yield body[i : i + piece]


async def test_body_limit_413_and_nothing_stored(
    stack_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    limit, drain = 2048, 4096
    # Past the limit the API reads on only to throw away (so the client sees the 413 rather
    # than a reset), and only up to a bound.
    monkeypatch.setattr("api.limits.DRAIN_LIMIT", drain)
    stack, client = await stack_factory(MOONQ_MAX_BODY_BYTES=limit)
    json_type = {"content-type": "application/json"}
    before = set(await stack.redis.keys("*"))
    huge = _payload_of_size(100 * limit)
    for body in (_payload_of_size(limit + 1), huge):
        sized = await client.post("/v1/jobs", content=body, headers=json_type)
        sent: list[int] = []
        streamed = await client.post("/v1/jobs", content=_chunked(body, sent), headers=json_type)
        assert streamed.request.headers.get("transfer-encoding") == "chunked"
        assert "content-length" not in streamed.request.headers
        for response in (sized, streamed):
            assert response.status_code == 413, response.text
            assert response.json()["error"]["type"] == "request_too_large"
        assert len(sent) * 512 < limit + drain + 1024  # the API stopped reading at the bound
    assert set(await stack.redis.keys("*")) == before

    at_limit = _payload_of_size(limit)
    assert (await client.post("/v1/jobs", content=at_limit, headers=json_type)).status_code == 202
    sent = []
    streamed = await client.post("/v1/jobs", content=_chunked(at_limit, sent), headers=json_type)
    assert streamed.status_code == 202, streamed.text
    assert len((await client.get("/v1/jobs")).json()["data"]) == 2


async def test_worker_keeps_to_the_account_concurrency(stack_factory: Any, fake: Any) -> None:
    stack, client = await stack_factory(MOONQ_UPSTREAM_CONCURRENCY=2, MOONQ_WORKER_CONCURRENCY=10)
    slow = {"chunks": 10, "delay": 0.02}
    ids = [await submit(client, chat(f"doc {i}", fake_moonshot=slow)) for i in range(10)]
    await asyncio.wait_for(stack.run_worker(), 10)
    for job_id in ids:
        assert (await client.get(f"/v1/jobs/{job_id}")).json()["status"] == "completed"
    assert fake.stats.requests == 10
    assert fake.stats.peak_in_flight == 2  # never above the limit, and not serialised either
