"""The HTTP API over fakeredis: validation, errors, tenants, polling."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest

from api import routes
from moonq.fake_moonshot import expected_content
from moonq.stream import EventHub
from tests.conftest import chat, submit


async def _keys(stack: Any) -> list[bytes]:
    return sorted(await stack.redis.keys("*"))


async def test_submit_answers_202_with_the_job(stack_factory: Any) -> None:
    stack, client = await stack_factory()
    response = await client.post(
        "/v1/jobs", json={**chat(), "custom_id": "doc-1", "metadata": {"batch": "a"}}
    )
    assert response.status_code == 202
    job = response.json()
    assert job["status"] == "queued"
    assert job["id"].startswith("job_") and len(job["id"]) == 36
    assert job["custom_id"] == "doc-1" and job["metadata"] == {"batch": "a"}
    assert job["model"] == "moonshot-v1-8k" and job["attempts"] == 0
    assert job["channel"] == f"{stack.settings.key_prefix}:events:{job['id']}"
    fetched = await client.get(f"/v1/jobs/{job['id']}")
    assert fetched.status_code == 200 and fetched.json() == job


async def test_job_ids_are_unguessable(stack_factory: Any) -> None:
    _, client = await stack_factory()
    ids = {(await client.post("/v1/jobs", json=chat())).json()["id"] for _ in range(20)}
    assert len(ids) == 20
    # no shared structure a client could count along: 32 random hex digits each
    assert len({i[4:12] for i in ids}) == 20


@pytest.mark.parametrize(
    ("payload", "param"),
    [
        ({"body": {"messages": [{"role": "user", "content": "x"}]}}, "body.model"),
        ({"body": {"model": "m"}}, "body.messages"),
        ({"body": {"model": "m", "messages": []}}, "body.messages"),
        ({"body": {"model": 7, "messages": [{"role": "user", "content": "x"}]}}, "body.model"),
        ({"body": {"model": "m", "messages": "hi"}}, "body.messages"),
        ({"body": {"model": "m", "messages": [{"content": "x"}]}}, "body.messages.0.role"),
        ({**chat(), "custom_id": 5}, "custom_id"),
        ({**chat(), "metadata": [1]}, "metadata"),
        ({**chat(), "bogus": 1}, "bogus"),
        ({}, "body"),
    ],
)
async def test_bad_submissions_are_422_naming_the_field(
    stack_factory: Any, payload: dict[str, Any], param: str
) -> None:
    stack, client = await stack_factory()
    before = await _keys(stack)
    response = await client.post("/v1/jobs", json=payload)
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param and param in error["message"]
    assert await _keys(stack) == before  # nothing half-written


async def test_malformed_json_is_422(stack_factory: Any) -> None:
    stack, client = await stack_factory()
    before = await _keys(stack)
    response = await client.post(
        "/v1/jobs", content=b'{"body": {"model": ', headers={"content-type": "application/json"}
    )
    assert response.status_code == 422
    assert "Malformed JSON" in response.json()["error"]["message"]
    assert await _keys(stack) == before


async def test_unknown_chat_fields_reach_the_upstream_untouched(stack_factory: Any) -> None:
    stack, client = await stack_factory()
    extra = {"temperature": 0.3, "top_p": 0.9, "vendor_thing": {"nested": [1, 2]}}
    job = (await client.post("/v1/jobs", json=chat("passthrough", **extra))).json()
    stored = await stack.redis.hget(f"{stack.settings.key_prefix}:job:{job['id']}", "request")
    import json

    request = json.loads(stored)
    assert {k: request[k] for k in extra} == extra
    assert "stream" not in request  # the worker adds it upstream, the record keeps the ask


@pytest.mark.parametrize("job_id", ["job_" + "0" * 32, "nope", "job_../../x"])
async def test_unknown_job_is_404_json(stack_factory: Any, job_id: str) -> None:
    _, client = await stack_factory()
    for path in (f"/v1/jobs/{job_id}", f"/v1/jobs/{job_id}/events"):
        response = await client.get(path)
        assert response.status_code == 404
        assert response.json()["error"]["type"] == "not_found_error"


async def test_completed_job_has_result_and_usage(stack_factory: Any) -> None:
    stack, client = await stack_factory()
    job = (await client.post("/v1/jobs", json=chat("poll me"))).json()
    await stack.run_worker()
    done = (await client.get(f"/v1/jobs/{job['id']}")).json()
    assert done["status"] == "completed" and done["attempts"] == 1
    assert done["started_at"] >= done["created_at"] and done["completed_at"] >= done["started_at"]
    message = done["result"]["choices"][0]["message"]
    assert message["content"] == expected_content(chat("poll me")["body"])
    assert done["usage"] == done["result"]["usage"] and done["usage"]["total_tokens"] > 0
    assert done["error"] is None


async def test_long_poll_returns_when_the_job_ends(
    stack_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The periodic re-read is pushed past the test's bound: only the terminal event, arriving
    # over pub/sub, can wake the poll in time.
    monkeypatch.setattr(routes, "REREAD_EVERY", 30.0)
    stack, client = await stack_factory()
    job = (await client.post("/v1/jobs", json=chat(fake_moonshot={"delay": 0.05}))).json()
    poll = asyncio.create_task(client.get(f"/v1/jobs/{job['id']}", params={"wait": 30}))
    await asyncio.sleep(0.2)
    assert not poll.done()  # still waiting: the job has not run
    loop = asyncio.get_running_loop()
    await stack.run_worker()
    finished_at = loop.time()
    response = await asyncio.wait_for(poll, 5)
    assert response.json()["status"] == "completed"
    assert loop.time() - finished_at < 2


async def test_long_poll_gives_up_after_wait_seconds(stack_factory: Any) -> None:
    _, client = await stack_factory()
    job = (await client.post("/v1/jobs", json=chat())).json()
    loop = asyncio.get_running_loop()
    started = loop.time()
    response = await client.get(f"/v1/jobs/{job['id']}", params={"wait": 0.5})
    assert response.json()["status"] == "queued"
    assert 0.4 < loop.time() - started < 3


async def test_wait_is_capped_by_max_wait(stack_factory: Any) -> None:
    _, client = await stack_factory(MOONQ_MAX_WAIT=0.3)
    job = (await client.post("/v1/jobs", json=chat())).json()
    loop = asyncio.get_running_loop()
    started = loop.time()
    response = await client.get(f"/v1/jobs/{job['id']}", params={"wait": 30})
    assert response.status_code == 200 and response.json()["status"] == "queued"
    assert 0.25 < loop.time() - started < 2


@pytest.mark.parametrize("wait", ["-1", "soon", "nan", "inf", "1e400"])
async def test_bad_wait_is_422(stack_factory: Any, wait: str) -> None:
    _, client = await stack_factory()
    job = (await client.post("/v1/jobs", json=chat())).json()
    response = await client.get(f"/v1/jobs/{job['id']}", params={"wait": wait})
    assert response.status_code == 422 and response.json()["error"]["param"] == "wait"


async def test_a_repeated_wait_is_400_naming_it(stack_factory: Any) -> None:
    """`?wait=1&wait=60` used to wait 60 s, the last value, without a word."""
    _, client = await stack_factory()
    job = (await client.post("/v1/jobs", json=chat())).json()
    response = await client.get(f"/v1/jobs/{job['id']}?wait=1&wait=60")
    assert response.status_code == 400
    error = response.json()["error"]
    assert error == {
        "message": "Query parameter 'wait' is given 2 times; give it once.",
        "type": "invalid_request_error",
        "param": "wait",
        "code": None,
    }
    assert (await client.get(f"/v1/jobs/{job['id']}?wait=0")).status_code == 200


async def test_auth_required_when_keys_are_set(stack_factory: Any) -> None:
    _, client = await stack_factory(MOONQ_API_KEYS="key-a=alpha,key-b=beta")
    for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": "key-a"}):
        response = await client.post("/v1/jobs", json=chat(), headers=headers)
        assert response.status_code == 401
        assert response.json()["error"]["type"] == "authentication_error"
        assert "key-a" not in response.text
    ok = await client.post("/v1/jobs", json=chat(), headers={"authorization": "Bearer key-a"})
    assert ok.status_code == 202


async def test_tenants_cannot_see_each_other(stack_factory: Any) -> None:
    stack, client = await stack_factory(MOONQ_API_KEYS="key-a=alpha,key-b=beta")
    a = {"authorization": "Bearer key-a"}
    b = {"authorization": "Bearer key-b"}
    job = (await client.post("/v1/jobs", json=chat(), headers=a)).json()
    await stack.run_worker()
    for path in (f"/v1/jobs/{job['id']}", f"/v1/jobs/{job['id']}/events"):
        assert (await client.get(path, headers=b)).status_code == 404
        assert (await client.get(path, headers=a)).status_code == 200
    assert (await client.get("/v1/jobs", headers=b)).json()["data"] == []
    assert [j["id"] for j in (await client.get("/v1/jobs", headers=a)).json()["data"]] == [
        job["id"]
    ]
    record = await stack.redis.hgetall(f"{stack.settings.key_prefix}:job:{job['id']}")
    assert b"key-a" not in b"".join(k + v for k, v in record.items())


async def test_list_jobs_pages_and_filters(stack_factory: Any) -> None:
    stack, client = await stack_factory()
    ids = [(await client.post("/v1/jobs", json=chat(str(i)))).json()["id"] for i in range(5)]
    page = (await client.get("/v1/jobs", params={"limit": 2})).json()
    assert [j["id"] for j in page["data"]] == ids[::-1][:2] and page["has_more"]
    rest = (await client.get("/v1/jobs", params={"limit": 10, "after": ids[3]})).json()
    assert [j["id"] for j in rest["data"]] == ids[::-1][2:] and not rest["has_more"]
    await stack.run_worker()
    done = (await client.get("/v1/jobs", params={"status": "completed"})).json()["data"]
    assert len(done) == 5
    assert (await client.get("/v1/jobs", params={"status": "queued"})).json()["data"] == []


async def test_list_jobs_filters_by_custom_id_and_batch(stack_factory: Any) -> None:
    _, client = await stack_factory()
    tagged = [
        (await client.post("/v1/jobs", json={**chat(), "custom_id": cid})).json()["id"]
        for cid in ("doc-1", "doc-2", "doc-1")
    ]
    listed = (await client.get("/v1/jobs", params={"custom_id": "doc-1"})).json()
    assert [j["id"] for j in listed["data"]] == [tagged[2], tagged[0]]
    assert (await client.get("/v1/jobs", params={"custom_id": "doc-9"})).json()["data"] == []
    by_batch = await client.get("/v1/jobs", params={"batch_id": "batch_none"})
    assert by_batch.status_code == 200 and by_batch.json()["data"] == []


@pytest.mark.parametrize(
    ("param", "value"),
    [("custom_id", "c" * 513), ("batch_id", "b" * 257), ("status", "done"), ("status", "")],
)
async def test_list_filters_refuse_bad_values(stack_factory: Any, param: str, value: str) -> None:
    _, client = await stack_factory()
    response = await client.get("/v1/jobs", params={param: value})
    assert response.status_code == 422
    assert response.json()["error"]["param"] == param


@pytest.mark.parametrize(
    ("limit", "ok"), [("1", True), ("100", True), ("0", False), ("101", False), ("x", False)]
)
async def test_list_limit_bounds(stack_factory: Any, limit: str, ok: bool) -> None:
    _, client = await stack_factory()
    for i in range(2):
        await client.post("/v1/jobs", json=chat(str(i)))
    response = await client.get("/v1/jobs", params={"limit": limit})
    if ok:
        assert response.status_code == 200
        assert len(response.json()["data"]) == min(int(limit), 2)
    else:
        assert response.status_code == 422 and response.json()["error"]["param"] == "limit"


async def test_list_after_an_unknown_or_foreign_job_is_400(stack_factory: Any) -> None:
    _, client = await stack_factory(MOONQ_API_KEYS="key-a=alpha,key-b=beta")
    a, b = {"authorization": "Bearer key-a"}, {"authorization": "Bearer key-b"}
    foreign = (await client.post("/v1/jobs", json=chat(), headers=b)).json()["id"]
    for after in (foreign, "job_" + "0" * 32, "x" * 5000):
        response = await client.get("/v1/jobs", params={"after": after}, headers=a)
        assert response.status_code == 400
        error = response.json()["error"]
        assert error["param"] == "after" and error["type"] == "invalid_request_error"
        assert len(error["message"]) < 200


async def test_list_unknown_parameters_are_400_naming_them(stack_factory: Any) -> None:
    _, client = await stack_factory()
    await client.post("/v1/jobs", json=chat())
    response = await client.get("/v1/jobs", params={"staus": "failed", "limit": 5, "zz": 1})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "staus"
    assert "'staus'" in error["message"] and "'zz'" in error["message"]
    assert "limit" not in error["message"].split(";")[0]  # a known one is not blamed


async def test_list_repeated_parameters_are_400_naming_them(stack_factory: Any) -> None:
    """`?status=queued&status=failed` would list the failed jobs alone, as if it filtered both."""
    _, client = await stack_factory()
    await client.post("/v1/jobs", json=chat())
    response = await client.get("/v1/jobs?status=queued&status=failed")
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "status" and "'status' is given 2 times" in error["message"]


async def test_redis_down_is_503_json(fake: Any, prefix: str) -> None:
    from api.app import create_app
    from moonq.redis import connect
    from tests.conftest import make_settings

    settings = make_settings("redis://127.0.0.1:1/0", prefix, fake.url)
    app = create_app(settings, redis=connect(settings.redis_url))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://moonq") as client:
            for method, path in (
                ("POST", "/v1/jobs"),
                ("GET", "/v1/jobs"),
                ("GET", "/v1/jobs/job_" + "1" * 32),
            ):
                response = await client.request(method, path, json=chat())
                assert response.status_code == 503
                assert response.json()["error"]["type"] == "service_unavailable"
            assert (await client.get("/readyz")).status_code == 503
            assert (await client.get("/healthz")).status_code == 200


@pytest.mark.parametrize("value", ["²", "1" * 5000, "-1", "-5", "1.5", "9" * 40])
async def test_bad_last_event_id_is_422(stack_factory: Any, value: str) -> None:
    _, client = await stack_factory()
    job = (await client.post("/v1/jobs", json=chat())).json()
    headers = {"Last-Event-ID": value.encode()}
    response = await client.get(f"/v1/jobs/{job['id']}/events", headers=headers)
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["param"] == "Last-Event-ID" and "whole number" in error["message"]


async def _ended_job(stack: Any, client: httpx.AsyncClient) -> tuple[str, int]:
    """A completed job and its last seq."""
    job_id: str = (await client.post("/v1/jobs", json=chat())).json()["id"]
    await stack.run_worker()
    last = (await stack.events(job_id))[-1]
    assert last["event"] == "done"
    return job_id, int(last["seq"])


async def test_resuming_at_the_end_of_an_ended_job_is_204(stack_factory: Any) -> None:
    """An EventSource reconnects after the stream closes; 204 tells it to stop."""
    stack, client = await stack_factory()
    job_id, last = await _ended_job(stack, client)
    headers = {"Last-Event-ID": str(last)}
    response = await client.get(f"/v1/jobs/{job_id}/events", headers=headers)
    assert response.status_code == 204 and response.content == b""
    before_end = await client.get(
        f"/v1/jobs/{job_id}/events", headers={"Last-Event-ID": str(last - 1)}
    )
    assert before_end.status_code == 200
    assert [line for line in before_end.text.splitlines() if line.startswith("id:")] == [
        f"id: {last}"
    ]


async def test_an_ended_jobs_stream_comes_from_its_log_without_a_subscription(
    stack_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A job already over when its stream is asked for (a result read as a stream, a
    reconnection) is served from its log alone: every event, none live listened for."""
    stack, client = await stack_factory()
    job_id, last = await _ended_job(stack, client)

    def no_listening(self: EventHub, channel: str, confirm_within: float = 5.0) -> Any:
        raise AssertionError(f"listened on {channel}")

    monkeypatch.setattr(EventHub, "listen", no_listening)
    for after in (0, last - 1):
        headers = {"Last-Event-ID": str(after)} if after else {}
        response = await client.get(f"/v1/jobs/{job_id}/events", headers=headers)
        assert response.status_code == 200
        assert [seq for seq, _ in _sse(response.text)] == list(range(after + 1, last + 1))
        assert _sse(response.text)[-1][1]["event"] == "done"


async def test_resuming_past_the_last_event_is_400_naming_it(stack_factory: Any) -> None:
    stack, client = await stack_factory()
    job_id, last = await _ended_job(stack, client)
    queued = (await client.post("/v1/jobs", json=chat())).json()["id"]  # seq 0: nothing yet
    for job, seq in ((job_id, last), (queued, 0)):
        headers = {"Last-Event-ID": str(seq + 1)}
        response = await client.get(f"/v1/jobs/{job}/events", headers=headers)
        assert response.status_code == 400
        error = response.json()["error"]
        assert error["param"] == "Last-Event-ID" and error["last_seq"] == seq
        assert f"(seq {seq})" in error["message"]


def _sse(text: str) -> list[tuple[int, dict[str, Any]]]:
    """An SSE body's events: (`id:`, the JSON of `data:`)."""
    events = []
    for block in text.split("\r\n\r\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
        if "data" in fields:
            events.append((int(fields["id"]), json.loads(fields["data"])))
    return events


async def test_events_trimmed_from_the_log_are_named_not_skipped(stack_factory: Any) -> None:
    """The log keeps the latest MOONQ_MAX_EVENTS events: a reader that joins after the oldest
    are gone is told which (a `trimmed` event whose id resumes past them), then gets the rest
    in order; one resuming past the gap is told nothing."""
    stack, client = await stack_factory(MOONQ_MAX_EVENTS=100)
    job_id = await submit(client, chat(fake_moonshot={"chunks": 300}))
    await stack.run_worker()
    logged = [event["seq"] for event in await stack.events(job_id)]
    first = logged[0]
    assert first > 2  # the log was trimmed
    for after in (0, first // 2, first - 1):
        headers = {"Last-Event-ID": str(after)} if after else {}
        response = await client.get(f"/v1/jobs/{job_id}/events", headers=headers)
        assert response.status_code == 200
        events = _sse(response.text)
        assert [seq for seq, _ in events] == [event["seq"] for _, event in events]
        if after < first - 1:
            (seq, gap), *events = events
            assert gap["event"] == "trimmed" and seq == first - 1
            assert gap["data"]["first_seq"] == after + 1 and gap["data"]["last_seq"] == first - 1
            assert f"GET /v1/jobs/{job_id}" in gap["data"]["message"]
        assert [seq for seq, _ in events] == logged
        assert events[-1][1]["event"] == "done"
