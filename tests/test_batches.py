"""Batches over the real Redis: OpenAI's file + batch flow, validation, results as they finish,
cancel and expiry, with the real worker and the fake upstream."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from moonq.fake_moonshot import FakeServer, expected_content
from worker.main import MoonqWorker, create_worker

pytestmark = pytest.mark.redis


def line(custom_id: str, text: str = "hello", **extra: Any) -> dict[str, Any]:
    body = {"model": "moonshot-v1-8k", "messages": [{"role": "user", "content": text}], **extra}
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body}


def jsonl(rows: list[Any]) -> bytes:
    return "".join(json.dumps(row) + "\n" for row in rows).encode()


async def upload(client: httpx.AsyncClient, data: bytes) -> str:
    response = await client.post(
        "/v1/files", files={"file": ("in.jsonl", data)}, data={"purpose": "batch"}
    )
    assert response.status_code == 200, response.text
    file_id: str = response.json()["id"]
    return file_id


async def create(client: httpx.AsyncClient, rows: list[Any], **extra: Any) -> dict[str, Any]:
    file_id = await upload(client, jsonl(rows))
    payload = {"input_file_id": file_id, "endpoint": "/v1/chat/completions", **extra}
    response = await client.post("/v1/batches", json=payload)
    assert response.status_code == 200, response.text
    batch: dict[str, Any] = response.json()
    return batch


async def content(client: httpx.AsyncClient, file_id: str) -> list[dict[str, Any]]:
    response = await client.get(f"/v1/files/{file_id}/content")
    assert response.status_code == 200, response.text
    return [json.loads(row) for row in response.text.splitlines()]


async def test_a_batch_runs_every_line_as_a_job(real_stack: Any, fake: FakeServer) -> None:
    stack, client = await real_stack()
    rows = [
        line("a", "first"),
        line("b", "second", fake_moonshot={"error": "invalid_request_error"}),
    ]
    rows.append(line("c", "third"))
    batch = await create(client, rows, metadata={"project": "x"})
    assert batch["status"] == "in_progress"
    assert batch["request_counts"] == {
        "total": 3,
        "completed": 0,
        "failed": 0,
        "cancelled": 0,
        "expired": 0,
    }
    await stack.run_worker()
    done = (await client.get(f"/v1/batches/{batch['id']}")).json()
    assert done["status"] == "completed"
    assert done["completed_at"] >= done["created_at"]
    assert done["request_counts"]["completed"] == 2
    assert done["request_counts"]["failed"] == 1
    assert done["metadata"] == {"project": "x"}
    output = await content(client, done["output_file_id"])
    assert [row["custom_id"] for row in output] == ["a", "c"]
    first = output[0]["response"]
    assert first["status_code"] == 200
    answer = first["body"]["choices"][0]["message"]["content"]
    assert answer == expected_content(rows[0]["body"])
    assert done["usage"]["total_tokens"] == sum(
        row["response"]["body"]["usage"]["total_tokens"] for row in output
    )
    errors = await content(client, done["error_file_id"])
    assert [row["custom_id"] for row in errors] == ["b"]
    assert errors[0]["error"]["code"] == "invalid_request_error"
    assert errors[0]["response"]["status_code"] == 400
    jobs = (await client.get("/v1/jobs", params={"batch_id": batch["id"]})).json()["data"]
    assert sorted(job["custom_id"] for job in jobs) == ["a", "b", "c"]


async def test_a_batch_that_ended_without_errors_has_no_error_file(real_stack: Any) -> None:
    """OpenAI's `error_file_id` is null when no line failed. While the batch runs the id is
    given, to read the file as it grows; read after the end, it is empty."""
    stack, client = await real_stack()
    batch = await create(client, [line("a"), line("b")])
    errors_id = f"file-{batch['id']}-errors"
    assert batch["error_file_id"] == errors_id
    await stack.run_worker()
    done = (await client.get(f"/v1/batches/{batch['id']}")).json()
    assert done["status"] == "completed" and done["request_counts"]["completed"] == 2
    assert done["error_file_id"] is None and done["output_file_id"]
    assert (await client.get("/v1/batches")).json()["data"][0]["error_file_id"] is None
    assert await content(client, errors_id) == []
    assert len(await content(client, done["output_file_id"])) == 2


async def test_the_openai_sdk_runs_a_batch_end_to_end(real_stack: Any) -> None:
    """The official `openai` package's whole batch flow, checked against OpenAI's formats."""
    import openai

    stack, _client = await real_stack()
    sdk = openai.AsyncOpenAI(
        api_key="unused",
        base_url="http://moonq/v1",
        http_client=httpx.AsyncClient(transport=httpx.ASGITransport(app=stack.app)),
    )
    rows = [line(f"doc-{i}", f"text {i}") for i in range(4)]
    rows.append(line("bad-upstream", "x", fake_moonshot={"error": "content_filter"}))
    uploaded = await sdk.files.create(file=("in.jsonl", jsonl(rows)), purpose="batch")
    assert uploaded.purpose == "batch" and uploaded.bytes == len(jsonl(rows))
    batch = await sdk.batches.create(
        input_file_id=uploaded.id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        metadata={"run": "sdk"},
    )
    assert batch.status == "in_progress" and batch.request_counts is not None
    assert batch.request_counts.total == 5
    await stack.run_worker()
    done = await sdk.batches.retrieve(batch.id)
    assert done.status == "completed"
    assert done.request_counts is not None
    assert (done.request_counts.completed, done.request_counts.failed) == (4, 1)
    assert [b.id for b in (await sdk.batches.list()).data] == [batch.id]
    assert done.output_file_id and done.error_file_id
    output = [
        json.loads(x) for x in (await sdk.files.content(done.output_file_id)).text.split("\n") if x
    ]
    assert [row["custom_id"] for row in output] == [f"doc-{i}" for i in range(4)]
    for row, sent in zip(output, rows, strict=False):
        assert set(row) == {"id", "custom_id", "response", "error"} and row["error"] is None
        assert row["response"]["status_code"] == 200
        body = row["response"]["body"]
        assert body["object"] == "chat.completion"
        assert body["choices"][0]["message"]["content"] == expected_content(sent["body"])
    errors = [
        json.loads(x) for x in (await sdk.files.content(done.error_file_id)).text.split("\n") if x
    ]
    assert [(row["custom_id"], row["error"]["code"]) for row in errors] == [
        ("bad-upstream", "content_filter")
    ]
    with pytest.raises(openai.ConflictError):
        await sdk.batches.cancel(batch.id)
    with pytest.raises(openai.NotFoundError):
        await sdk.batches.retrieve("batch_" + "0" * 24)
    await sdk.close()


async def test_the_sdk_reads_the_batch_usage_in_openais_names(real_stack: Any) -> None:
    """openai-python's `BatchUsage`: input/output tokens with their details (cached tokens
    Moonshot's way and OpenAI's), beside the chat completion's names moonq gave first."""
    import openai

    stack, client = await real_stack()
    sdk = openai.AsyncOpenAI(api_key="unused", base_url="http://moonq/v1", http_client=client)
    moonshot = {"prompt_tokens": 100, "completion_tokens": 7, "total_tokens": 107}
    rows = [
        line("moonshot", fake_moonshot={"usage": {**moonshot, "cached_tokens": 40}}),
        line(
            "openai",
            fake_moonshot={
                "usage": {
                    "prompt_tokens": 50,
                    "completion_tokens": 3,
                    "total_tokens": 53,
                    "prompt_tokens_details": {"cached_tokens": 10},
                }
            },
        ),
        line("fails", fake_moonshot={"error": "content_filter"}),
    ]
    created = await create(client, rows)
    await stack.run_worker()
    usage = (await sdk.batches.retrieve(created["id"])).usage
    assert usage is not None
    assert (usage.input_tokens, usage.output_tokens, usage.total_tokens) == (150, 10, 160)
    assert usage.input_tokens_details.cached_tokens == 50
    assert usage.output_tokens_details.reasoning_tokens == 0
    listed = (await sdk.batches.list()).data[0].usage
    assert listed == usage
    assert usage.model_extra == {"prompt_tokens": 150, "completion_tokens": 10}  # kept
    fresh = (await create(client, [line("x")]))["usage"]
    assert fresh["input_tokens_details"] == {"cached_tokens": 0} and fresh["input_tokens"] == 0


async def test_validation_names_every_bad_line_and_enqueues_nothing(real_stack: Any) -> None:
    stack, client = await real_stack(MOONQ_MAX_BODY_BYTES=2048, MOONQ_UPSTREAM_TPM=100_000)
    no_model = line("m")
    del no_model["body"]["model"]
    no_messages = line("n")
    del no_messages["body"]["messages"]
    raw = [
        json.dumps(line("ok")),
        "{not json",
        json.dumps({k: v for k, v in line("x").items() if k != "custom_id"}),
        json.dumps(line("ok")),
        json.dumps({**line("u"), "url": "/v1/embeddings"}),
        json.dumps({**line("g"), "method": "GET"}),
        json.dumps(no_model),
        json.dumps(no_messages),
        "",
        json.dumps(line("big", "x" * 3000)),
        json.dumps(line("huge", max_tokens=10**6)),
        json.dumps(line("fine")),
    ]
    file_id = await upload(client, ("\n".join(raw) + "\n").encode())
    response = await client.post(
        "/v1/batches", json={"input_file_id": file_id, "endpoint": "/v1/chat/completions"}
    )
    assert response.status_code == 200, response.text
    batch = response.json()
    assert batch["status"] == "failed" and batch["failed_at"]
    found = [(e["line"], e["code"]) for e in batch["errors"]["data"]]
    assert found == [
        (2, "invalid_json"),
        (3, "missing_custom_id"),
        (4, "duplicate_custom_id"),
        (5, "invalid_url"),
        (6, "invalid_method"),
        (7, "invalid_body"),
        (8, "invalid_body"),
        (10, "line_too_large"),
        (11, "request_too_large"),
    ]
    assert "model" in batch["errors"]["data"][5]["message"]
    assert "messages" in batch["errors"]["data"][6]["message"]
    assert batch["output_file_id"] is None
    jobs = (await client.get("/v1/jobs")).json()["data"]
    assert jobs == []
    assert await stack.redis.zcard(stack.settings.queue_name) == 0


@pytest.mark.parametrize(
    ("change", "param", "status"),
    [
        ({"endpoint": "/v1/embeddings"}, "endpoint", 400),
        ({"completion_window": "8d"}, "completion_window", 400),
        ({"completion_window": "soon"}, "completion_window", 400),
        ({"input_file_id": "file-unknown"}, "input_file_id", 404),
        ({"surprise": 1}, "surprise", 400),  # as OpenAI answers: the SDK's BadRequestError
        ({"input_file_id": 7}, "input_file_id", 400),
    ],
)
async def test_a_bad_batch_request_is_a_4xx(
    real_stack: Any, change: dict[str, Any], param: str, status: int
) -> None:
    _stack, client = await real_stack()
    file_id = await upload(client, jsonl([line("a")]))
    payload = {"input_file_id": file_id, "endpoint": "/v1/chat/completions", **change}
    response = await client.post("/v1/batches", json=payload)
    assert response.status_code == status, response.text
    assert param in json.dumps(response.json()["error"])
    assert (await client.get("/v1/batches")).json()["data"] == []


async def test_over_the_line_limit_is_a_400(real_stack: Any) -> None:
    _stack, client = await real_stack(MOONQ_BATCH_MAX_LINES=3)
    file_id = await upload(client, jsonl([line(str(i)) for i in range(4)]))
    response = await client.post(
        "/v1/batches", json={"input_file_id": file_id, "endpoint": "/v1/chat/completions"}
    )
    assert response.status_code == 400
    assert "MOONQ_BATCH_MAX_LINES" in response.json()["error"]["message"]


async def test_another_tenant_sees_nothing(real_stack: Any) -> None:
    stack, alice = await real_stack(MOONQ_API_KEYS="ka=alice,kb=bob")
    alice.headers["Authorization"] = "Bearer ka"
    batch = await create(alice, [line("a")])
    bob = httpx.AsyncClient(
        transport=httpx.ASGITransport(app=stack.app),
        base_url="http://moonq",
        headers={"Authorization": "Bearer kb"},
    )
    async with bob:
        for path in (
            f"/v1/batches/{batch['id']}",
            f"/v1/batches/{batch['id']}/events",
            f"/v1/files/{batch['output_file_id']}",
            f"/v1/files/{batch['output_file_id']}/content",
            f"/v1/files/{batch['input_file_id']}/content",
        ):
            assert (await bob.get(path)).status_code == 404, path
        assert (await bob.post(f"/v1/batches/{batch['id']}/cancel")).status_code == 404
        assert (await bob.get("/v1/batches")).json()["data"] == []
        payload = {"input_file_id": batch["input_file_id"], "endpoint": "/v1/chat/completions"}
        assert (await bob.post("/v1/batches", json=payload)).status_code == 404


@contextlib.asynccontextmanager
async def worker_running(stack: Any, **overrides: Any) -> AsyncIterator[MoonqWorker]:
    worker = create_worker(stack.settings, redis=stack.redis, handle_signals=False, **overrides)
    task = asyncio.create_task(worker.async_run())
    try:
        yield worker
    finally:
        await worker.close()
        await asyncio.wait_for(asyncio.gather(task, return_exceptions=True), 10)


async def batch_of(client: httpx.AsyncClient, batch_id: str) -> dict[str, Any]:
    response = await client.get(f"/v1/batches/{batch_id}")
    assert response.status_code == 200
    found: dict[str, Any] = response.json()
    return found


async def wait_for(predicate: Any, timeout: float) -> None:
    async with asyncio.timeout(timeout):
        while not await predicate():  # noqa: ASYNC110
            await asyncio.sleep(0.02)


async def progress(client: httpx.AsyncClient, batch_id: str) -> list[dict[str, Any]]:
    events = []
    async with client.stream("GET", f"/v1/batches/{batch_id}/events") as response:
        assert response.status_code == 200
        async for text in response.aiter_lines():
            if text.startswith("data:"):
                events.append(json.loads(text[5:]))
    return events


def slow(custom_id: str, seconds: float) -> dict[str, Any]:
    return line(custom_id, custom_id, fake_moonshot={"chunks": 5, "delay": seconds / 5})


async def test_results_are_readable_while_the_batch_runs(real_stack: Any, fake: FakeServer) -> None:
    stack, client = await real_stack(MOONQ_UPSTREAM_CONCURRENCY=1)
    batch = await create(client, [slow(f"l{i}", 0.3) for i in range(8)])
    reader = asyncio.create_task(progress(client, batch["id"]))
    async with worker_running(stack):

        async def two_done() -> bool:
            return (await batch_of(client, batch["id"]))["request_counts"]["completed"] >= 2

        await wait_for(two_done, 10)
        partial = await content(client, batch["output_file_id"])
        assert 2 <= len(partial) < 8
        assert [row["custom_id"] for row in partial] == [f"l{i}" for i in range(len(partial))]
        events = await asyncio.wait_for(reader, 20)
    assert [e["event"] for e in events] == ["line"] * 8 + ["done"]
    assert [e["seq"] for e in events] == list(range(1, 10))
    assert [e["data"]["custom_id"] for e in events[:8]] == [f"l{i}" for i in range(8)]
    assert events[7]["data"]["request_counts"]["completed"] == 8
    final = events[-1]["data"]
    assert final["status"] == "completed" and final["request_counts"]["completed"] == 8
    resumed = await client.get(f"/v1/batches/{batch['id']}/events", headers={"Last-Event-ID": "7"})
    assert [
        json.loads(x[5:])["seq"] for x in resumed.text.splitlines() if x.startswith("data:")
    ] == [8, 9]
    # as a job's: at the end of a batch that has ended, 204 (an EventSource stops there);
    # past its last event, 400 naming it
    url = f"/v1/batches/{batch['id']}/events"
    assert (await client.get(url, headers={"Last-Event-ID": "9"})).status_code == 204
    past = await client.get(url, headers={"Last-Event-ID": "10"})
    assert past.status_code == 400 and past.json()["error"]["last_seq"] == 9
    assert fake.stats.peak_in_flight == 1


async def test_cancel_stops_a_batch_within_a_second(real_stack: Any, fake: FakeServer) -> None:
    stack, client = await real_stack(MOONQ_UPSTREAM_CONCURRENCY=4)
    batch = await create(client, [slow(f"c{i}", 2.0) for i in range(40)])
    async with worker_running(stack):

        async def started() -> bool:
            return fake.stats.in_flight >= 3

        await wait_for(started, 10)
        began = time.monotonic()
        response = await client.post(f"/v1/batches/{batch['id']}/cancel")
        assert response.status_code == 200
        assert response.json()["status"] in ("cancelling", "cancelled")

        async def ended() -> bool:
            return (await batch_of(client, batch["id"]))["status"] == "cancelled"

        await wait_for(ended, 1.0)
        assert time.monotonic() - began < 1.0
        requests = fake.stats.requests
        await asyncio.sleep(0.5)
        assert fake.stats.requests == requests  # nothing more reaches the upstream
    final = await batch_of(client, batch["id"])
    counts = final["request_counts"]
    assert counts["total"] == 40 and counts["completed"] == 0
    assert counts["cancelled"] == 40
    assert final["cancelled_at"] >= final["cancelling_at"]
    assert requests <= 4
    jobs = (await client.get("/v1/jobs", params={"batch_id": batch["id"], "limit": 100})).json()
    assert {job["status"] for job in jobs["data"]} == {"cancelled"}
    errors = await content(client, final["error_file_id"])
    assert len(errors) == 40
    assert (await client.post(f"/v1/batches/{batch['id']}/cancel")).status_code == 409


async def test_a_batch_past_its_window_expires_what_has_not_run(
    real_stack: Any, fake: FakeServer
) -> None:
    stack, client = await real_stack(MOONQ_UPSTREAM_CONCURRENCY=1)
    batch = await create(client, [slow(f"e{i}", 0.6) for i in range(10)], completion_window="1s")
    assert batch["expires_at"] - batch["created_at"] == 1
    async with worker_running(stack):

        async def ended() -> bool:
            return (await batch_of(client, batch["id"]))["status"] == "expired"

        await wait_for(ended, 8)
    final = await batch_of(client, batch["id"])
    counts = final["request_counts"]
    assert counts["completed"] >= 1 and counts["expired"] >= 5
    assert counts["completed"] + counts["expired"] == 10
    assert final["expired_at"] >= final["expires_at"]
    assert fake.stats.requests == counts["completed"]
    output = await content(client, final["output_file_id"])
    assert len(output) == counts["completed"]
    errors = await content(client, final["error_file_id"])
    assert {row["error"]["code"] for row in errors} == {"batch_expired"}
    assert len(errors) == counts["expired"]


async def test_batches_run_on_the_embedded_redis_of_moonq_dev(stack_factory: Any) -> None:
    """`moonq dev` runs on fakeredis: its Lua (cjson, the batch scripts) must work there too."""
    stack, client = await stack_factory()
    batch = await create(client, [line("a"), line("b")])
    await stack.run_worker()
    done = await batch_of(client, batch["id"])
    assert done["status"] == "completed"
    assert [row["custom_id"] for row in await content(client, done["output_file_id"])] == ["a", "b"]
    other = await create(client, [line(f"c{i}") for i in range(5)])
    cancelled = (await client.post(f"/v1/batches/{other['id']}/cancel")).json()
    assert cancelled["status"] == "cancelled" and cancelled["request_counts"]["cancelled"] == 5


@pytest.mark.parametrize(
    ("method", "path", "headers", "status"),
    [
        ("GET", "/v1/batches/batch_nope", {}, 404),
        ("GET", "/v1/batches/" + "x" * 3000, {}, 404),
        ("POST", "/v1/batches/batch_" + "0" * 24 + "/cancel", {}, 404),
        ("GET", "/v1/batches?after=batch_unknown", {}, 400),
        ("GET", "/v1/batches?limit=0", {}, 422),
        ("GET", "/v1/files/file-batch_" + "0" * 24 + "-output/content", {}, 404),
        ("GET", "{batch}/events", {"Last-Event-ID": "soon"}, 422),
        ("GET", "{batch}/events", {"Last-Event-ID": "9" * 40}, 422),
    ],
)
async def test_bad_reads_of_batches_are_clear_4xx(
    real_stack: Any, method: str, path: str, headers: dict[str, str], status: int
) -> None:
    _stack, client = await real_stack()
    batch = await create(client, [line("a")])
    url = path.replace("{batch}", f"/v1/batches/{batch['id']}")
    response = await client.request(method, url, headers=headers)
    assert response.status_code == status, response.text
    assert response.json()["error"]["message"]


async def test_a_capped_batch_takes_its_next_line_as_soon_as_one_ends(stack_factory: Any) -> None:
    """Under MOONQ_UPSTREAM_CONCURRENCY=4 a batch runs 3 lines at a time; a line that ends
    frees its place at once, though the worker otherwise asks for lines only every 0.25 s
    after finding none and polls every 0.5 s (MOONQ_POLL_DELAY's default)."""
    stack, client = await stack_factory(MOONQ_POLL_DELAY=0.5, MOONQ_UPSTREAM_CONCURRENCY=4)
    async with worker_running(stack):
        started = time.monotonic()
        batch = await create(client, [line(f"x{i}") for i in range(30)])
        while (await batch_of(client, batch["id"]))["status"] != "completed":
            assert time.monotonic() - started < 10
            await asyncio.sleep(0.02)
        took = time.monotonic() - started
    # ten rounds of three fast lines; waiting 0.25 s per round would take 2.5 s or more
    assert took < 2.0, took
