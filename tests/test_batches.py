"""Batches over the real Redis: OpenAI's file + batch flow, validation, results as they finish,
cancel and expiry, with the real worker and the fake upstream."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest

from moonq.fake_moonshot import FakeServer, expected_content

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
