"""The worker over fakeredis and the fake upstream (a real socket): results, failures, retries."""

from __future__ import annotations

import json
from typing import Any

from moonq.fake_moonshot import expected_message, expected_usage
from tests.conftest import chat

FAST_RETRY = {"MOONQ_RETRY_BASE_DELAY": 0.01, "MOONQ_RETRY_MAX_DELAY": 0.05}


async def _submit(client: Any, payload: dict[str, Any]) -> str:
    response = await client.post("/v1/jobs", json=payload)
    assert response.status_code == 202, response.text
    job_id: str = response.json()["id"]
    return job_id


async def _events(stack: Any, job_id: str) -> list[dict[str, Any]]:
    rows = await stack.redis.xrange(f"{stack.settings.key_prefix}:log:{job_id}")
    return [json.loads(fields[b"e"]) for _, fields in rows]


async def test_result_equals_the_non_streaming_answer(stack_factory: Any) -> None:
    stack, client = await stack_factory()
    payloads = {
        "text": chat("summarise this"),
        "tools": chat(
            "weather?",
            tools=[
                {"type": "function", "function": {"name": "lookup", "parameters": {}}},
                {"type": "function", "function": {"name": "other", "parameters": {}}},
            ],
            fake_moonshot={"parallel_tools": True, "chunks": 5},
        ),
    }
    ids = {name: await _submit(client, p) for name, p in payloads.items()}
    await stack.run_worker()
    for name, job_id in ids.items():
        job = (await client.get(f"/v1/jobs/{job_id}")).json()
        body = payloads[name]["body"]
        assert job["status"] == "completed", job
        assert job["result"]["object"] == "chat.completion"
        assert job["result"]["choices"][0]["message"] == expected_message(body)
        assert job["usage"] == expected_usage(body)


async def test_every_chunk_is_an_event_and_done_ends_the_log(stack_factory: Any) -> None:
    stack, client = await stack_factory()
    job_id = await _submit(client, chat("count", fake_moonshot={"chunks": 12}))
    await stack.run_worker()
    events = await _events(stack, job_id)
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    chunks = [e for e in events if e["event"] == "chunk"]
    assert len(chunks) == 12 + 2  # the role chunk, 12 pieces, the finish chunk
    assert all(c["data"]["object"] == "chat.completion.chunk" for c in chunks)
    assert events[-1]["event"] == "done"
    job = (await client.get(f"/v1/jobs/{job_id}")).json()
    assert events[-1]["data"] == job["result"]


async def test_upstream_4xx_fails_the_job_with_its_error(stack_factory: Any) -> None:
    stack, client = await stack_factory()
    cases = {
        "invalid_request_error": 400,
        "content_filter": 400,
        "invalid_authentication_error": 401,
        "exceeded_current_quota_error": 429,
    }
    ids = {kind: await _submit(client, chat(fake_moonshot={"error": kind})) for kind in cases}
    await stack.run_worker()
    for kind, job_id in ids.items():
        job = (await client.get(f"/v1/jobs/{job_id}")).json()
        assert job["status"] == "failed" and job["attempts"] == 1
        assert job["error"]["type"] == kind
        assert job["error"]["status_code"] == cases[kind]
        assert job["error"]["message"]
        assert job["result"] is None
        events = await _events(stack, job_id)
        assert [e["event"] for e in events] == ["error"]
        assert events[0]["data"] == job["error"]


async def test_a_dropped_stream_is_retried_from_scratch(stack_factory: Any) -> None:
    stack, client = await stack_factory(**FAST_RETRY)
    steer = {"error": "drop", "drop_after": 3, "fail_times": 2, "key": "drop-twice"}
    payload = chat("retry me", fake_moonshot=steer)
    job_id = await _submit(client, payload)
    await stack.run_worker()
    job = (await client.get(f"/v1/jobs/{job_id}")).json()
    assert job["status"] == "completed" and job["attempts"] == 3
    assert job["result"]["choices"][0]["message"] == expected_message(payload["body"])
    events = await _events(stack, job_id)
    retries = [e for e in events if e["event"] == "retry"]
    assert [r["data"]["attempt"] for r in retries] == [2, 3]
    assert all("stream" in r["data"]["reason"] for r in retries)
    # the successful attempt's chunks alone rebuild the stored content
    last = [e for e in events if e["event"] == "chunk" and e["attempt"] == 3]
    text = "".join(
        c["data"]["choices"][0]["delta"].get("content") or ""
        for c in last
        if isinstance(c["data"]["choices"][0]["delta"], dict)
    )
    assert text == job["result"]["choices"][0]["message"]["content"]


async def test_rate_limits_are_retried_then_give_up(stack_factory: Any) -> None:
    stack, client = await stack_factory(MOONQ_MAX_ATTEMPTS=3, **FAST_RETRY)
    flaky = await _submit(
        client,
        chat("a", fake_moonshot={"error": "rate_limit_reached_error", "fail_times": 2, "key": "f"}),
    )
    hopeless = await _submit(client, chat("b", fake_moonshot={"error": "engine_overloaded_error"}))
    await stack.run_worker()
    ok = (await client.get(f"/v1/jobs/{flaky}")).json()
    assert ok["status"] == "completed" and ok["attempts"] == 3
    assert [e["event"] for e in await _events(stack, flaky)][-1] == "done"
    bad = (await client.get(f"/v1/jobs/{hopeless}")).json()
    assert bad["status"] == "failed" and bad["attempts"] == 3
    assert bad["error"]["type"] == "engine_overloaded_error"


async def test_job_timeout_fails_the_job(stack_factory: Any) -> None:
    stack, client = await stack_factory(MOONQ_JOB_TIMEOUT=1)
    job_id = await _submit(client, chat(fake_moonshot={"chunks": 50, "delay": 0.1}))
    await stack.run_worker()
    job = (await client.get(f"/v1/jobs/{job_id}")).json()
    assert job["status"] == "failed" and job["error"]["type"] == "job_timeout"


async def test_the_upstream_key_never_reaches_redis(stack_factory: Any) -> None:
    stack, client = await stack_factory(MOONQ_API_KEYS="client-secret=acme")
    headers = {"authorization": "Bearer client-secret"}
    ok = await client.post("/v1/jobs", json=chat("s"), headers=headers)
    bad = await client.post(
        "/v1/jobs",
        json=chat(fake_moonshot={"error": "invalid_authentication_error"}),
        headers=headers,
    )
    assert ok.status_code == bad.status_code == 202
    await stack.run_worker()
    dump = b""
    for key in await stack.redis.keys("*"):
        kind = await stack.redis.type(key)
        if kind == b"hash":
            dump += b"".join(k + v for k, v in (await stack.redis.hgetall(key)).items())
        elif kind == b"stream":
            dump += b"".join(f[b"e"] for _, f in await stack.redis.xrange(key) if b"e" in f)
        elif kind == b"string":
            dump += await stack.redis.get(key) or b""
    assert dump and b"sk-test-upstream-key" not in dump and b"client-secret" not in dump
