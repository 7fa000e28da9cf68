"""The OpenAI drop-in: the official `openai` package, pointed at moonq, gets what OpenAI gives it.

In-process over ASGI (which buffers a response whole) wherever timing does not matter; a real
uvicorn in a thread where it does: the sync client, a stream read while it is produced, a
client that goes away.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import openai
import pytest
import redis.exceptions
import uvicorn
from aiohttp import web

from api import chat_relay, chat_shapes, model_list
from api.app import create_app
from moonq.fake_models import MODEL_IDS, MODELS_KEY
from moonq.fake_moonshot import FakeServer, expected_content, expected_message, expected_usage
from moonq.models import Job, Status
from moonq.settings import Settings
from tests.conftest import Stack, make_settings, until
from tests.serving import worker_running

UPSTREAM_KEY = "sk-test-upstream-key"  # what make_settings gives the workers and the API
USER = [{"role": "user", "content": "hello moon"}]
TOOLS = [
    {"type": "function", "function": {"name": "search", "parameters": {"type": "object"}}},
    {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}},
]


def body(model: str = "moonshot-v1-8k", **extra: Any) -> dict[str, Any]:
    """What the upstream is asked (the fake's answer depends on nothing else)."""
    return {"model": model, "messages": USER, **extra}


@dataclass
class DropIn:
    stack: Stack
    client: httpx.AsyncClient
    sdk: openai.AsyncOpenAI


@pytest.fixture
async def drop_in(stack_factory: Any) -> AsyncIterator[Any]:
    """Build an API (in-process) with a worker running and the async SDK pointed at it."""
    async with contextlib.AsyncExitStack() as exits:

        async def build(retries: int = 0, transport: Any = None, **settings: Any) -> DropIn:
            stack, client = await stack_factory(**settings)
            injected = {"transport": transport} if transport else {}
            await exits.enter_async_context(worker_running(stack, **injected))
            sdk = openai.AsyncOpenAI(
                api_key="unused",
                base_url="http://moonq/v1",
                http_client=client,
                max_retries=retries,
            )
            return DropIn(stack, client, sdk)

        yield build


async def sse_lines(client: httpx.AsyncClient, request: dict[str, Any]) -> list[str]:
    """The `data:` fields of a streamed answer, as they are on the wire."""
    async with client.stream("POST", "/v1/chat/completions", json=request) as answer:
        assert answer.status_code == 200, await answer.aread()
        return [line[6:] async for line in answer.aiter_lines() if line.startswith("data: ")]


def usages(chunk: dict[str, Any]) -> list[Any]:
    """Every usage object in a chunk, top-level or in a choice."""
    found = [chunk["usage"]] if "usage" in chunk else []
    return found + [c["usage"] for c in chunk.get("choices", []) if "usage" in c]


# Answers


async def test_a_completion_is_the_jobs_result_with_usage_once(drop_in: Any) -> None:
    d = await drop_in()
    raw = await d.sdk.chat.completions.with_raw_response.create(
        model="moonshot-v1-8k", messages=USER
    )
    completion = raw.parse()
    assert completion.object == "chat.completion"
    assert completion.choices[0].message.content == expected_content(body())
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None
    assert completion.usage.model_dump(exclude_none=True) == expected_usage(body())
    wire = raw.http_response.json()
    assert [usages(wire)] == [[expected_usage(body())]]  # top-level only
    job = (await d.client.get(f"/v1/jobs/{raw.headers['X-Moonq-Job-Id']}")).json()
    assert job["status"] == "completed" and job["result"]["id"] == completion.id


@pytest.mark.parametrize("style", ["moonshot", "openai"])
@pytest.mark.parametrize("include_usage", [False, True])
async def test_a_stream_carries_usage_exactly_once_when_asked(
    drop_in: Any, fake: FakeServer, style: str, include_usage: bool
) -> None:
    fake.config.usage_style = style  # Moonshot: in choices[0]; OpenAI: a last chunk of its own
    d = await drop_in(MOONQ_STREAM_USAGE=style == "openai")
    request = body(stream=True, stream_options={"include_usage": include_usage})
    request["fake_moonshot"] = {"empty_delta_as_list": True}  # Moonshot's `"delta": []` quirk
    lines = await sse_lines(d.client, request)
    assert lines[-1] == "[DONE]"
    chunks = [json.loads(line) for line in lines[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert all(isinstance(choice["delta"], dict) for c in chunks for choice in c["choices"])
    content = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert content == expected_content(body())
    counted = [u for c in chunks for u in usages(c)]
    if include_usage:
        assert counted == [expected_usage(body())]
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == expected_usage(body())
    else:
        assert counted == []


async def test_the_async_sdk_streams_with_the_job_id(drop_in: Any) -> None:
    d = await drop_in()
    raw = await d.sdk.chat.completions.with_raw_response.create(
        model="moonshot-v1-8k", messages=USER, stream=True, stream_options={"include_usage": True}
    )
    job_id = raw.headers["X-Moonq-Job-Id"]
    chunks = [chunk async for chunk in raw.parse()]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == (
        expected_content(body())
    )
    assert [c.usage.total_tokens for c in chunks if c.usage] == [
        expected_usage(body())["total_tokens"]
    ]
    job = (await d.client.get(f"/v1/jobs/{job_id}")).json()
    assert job["status"] == "completed" and job["result"]["id"] == chunks[0].id
    # How this answer was delivered is not the job's: the stored request is the chat alone.
    stored = await d.stack.redis.hget(f"{d.stack.settings.key_prefix}:job:{job_id}", "request")
    assert json.loads(stored) == body()


async def test_tool_calls_assembled_and_streamed(drop_in: Any) -> None:
    d = await drop_in()
    steer = {"fake_moonshot": {"parallel_tools": True}}
    expected = expected_message(body(tools=TOOLS, **steer))["tool_calls"]
    assert len(expected) == 2
    completion = await d.sdk.chat.completions.create(
        model="moonshot-v1-8k", messages=USER, tools=TOOLS, extra_body=steer
    )
    calls = completion.choices[0].message.tool_calls or []
    assert completion.choices[0].finish_reason == "tool_calls"
    got = [(c.id, c.function.name, c.function.arguments) for c in calls]  # type: ignore[union-attr]
    assert got == [(e["id"], e["function"]["name"], e["function"]["arguments"]) for e in expected]
    stream = await d.sdk.chat.completions.create(
        model="moonshot-v1-8k", messages=USER, tools=TOOLS, extra_body=steer, stream=True
    )
    merged: dict[int, dict[str, str]] = {}
    async for chunk in stream:
        for call in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
            into = merged.setdefault(call.index, {"id": "", "name": "", "arguments": ""})
            into["id"] += call.id or ""
            into["name"] += (call.function.name or "") if call.function else ""
            into["arguments"] += (call.function.arguments or "") if call.function else ""
    assert [merged[i] for i in sorted(merged)] == [
        {"id": e["id"], "name": e["function"]["name"], "arguments": e["function"]["arguments"]}
        for e in expected
    ]


async def test_reasoning_content_passes_through(drop_in: Any) -> None:
    d = await drop_in()
    thought = expected_message(body("kimi-k2.5"))["reasoning_content"]
    assert thought
    completion = await d.sdk.chat.completions.create(model="kimi-k2.5", messages=USER)
    message = completion.choices[0].message
    assert getattr(message, "reasoning_content", None) == thought
    assert message.content == expected_content(body("kimi-k2.5"))
    stream = await d.sdk.chat.completions.create(model="kimi-k2.5", messages=USER, stream=True)
    streamed = [getattr(c.choices[0].delta, "reasoning_content", None) async for c in stream]
    assert "".join(t for t in streamed if t) == thought
    off = await d.sdk.chat.completions.create(
        model="kimi-k2.5", messages=USER, extra_body={"thinking": {"type": "disabled"}}
    )
    assert getattr(off.choices[0].message, "reasoning_content", None) is None


async def test_an_idempotency_key_answers_from_the_first_job(
    drop_in: Any, fake: FakeServer
) -> None:
    d = await drop_in()
    key = {"Idempotency-Key": "chat-1"}
    first = await d.sdk.chat.completions.with_raw_response.create(
        model="moonshot-v1-8k", messages=USER, extra_headers=key
    )
    again = await d.sdk.chat.completions.with_raw_response.create(
        model="moonshot-v1-8k", messages=USER, extra_headers=key
    )
    assert again.headers["X-Moonq-Job-Id"] == first.headers["X-Moonq-Job-Id"]
    assert again.headers["Idempotent-Replayed"] == "true" and fake.stats.requests == 1
    assert again.parse().choices[0].message.content == first.parse().choices[0].message.content
    with pytest.raises(openai.UnprocessableEntityError) as refused:
        await d.sdk.chat.completions.create(
            model="moonshot-v1-8k",
            messages=[{"role": "user", "content": "other"}],
            extra_headers=key,
        )
    assert refused.value.param == "Idempotency-Key"  # type: ignore[attr-defined]


# Errors


UPSTREAM_FAILURES = [
    ("invalid_request_error", openai.BadRequestError, 400),
    ("content_filter", openai.BadRequestError, 400),
    ("resource_not_found_error", openai.NotFoundError, 404),
    ("permission_denied_error", openai.PermissionDeniedError, 403),
    ("rate_limit_reached_error", openai.RateLimitError, 429),
    ("exceeded_current_quota_error", openai.RateLimitError, 429),  # the balance reads positive
    ("server_error", openai.InternalServerError, 500),
    # The upstream refused moonq's key: the server's to fix, not the client's key.
    ("invalid_authentication_error", openai.InternalServerError, 502),
]


@pytest.mark.parametrize("stream", [False, True])
async def test_an_upstream_failure_is_the_sdks_error_class(drop_in: Any, stream: bool) -> None:
    d = await drop_in(MOONQ_MAX_ATTEMPTS=1)
    for name, error_class, status in UPSTREAM_FAILURES:
        with pytest.raises(error_class) as raised:
            await d.sdk.chat.completions.create(
                model="moonshot-v1-8k",
                messages=USER,
                stream=stream,
                extra_body={"fake_moonshot": {"error": name}},
            )
        error = raised.value
        assert error.status_code == status, name
        assert error.response.headers["x-should-retry"] == "false"
        shown = error.body
        assert isinstance(shown, dict)
        assert set(shown) >= {"message", "type", "param", "code"} and shown["param"] is None
        assert shown["type"] == shown["code"] == ("server_error" if status == 500 else name)
        assert shown["job_id"] == error.response.headers["X-Moonq-Job-Id"]
        assert UPSTREAM_KEY not in error.response.text
        job = (await d.client.get(f"/v1/jobs/{shown['job_id']}")).json()
        assert job["status"] == "failed" and job["error"]["type"] == shown["type"]


async def test_the_sdk_does_not_retry_a_failed_job(drop_in: Any, fake: FakeServer) -> None:
    d = await drop_in(retries=2, MOONQ_MAX_ATTEMPTS=1)
    with pytest.raises(openai.InternalServerError):
        await d.sdk.chat.completions.create(
            model="moonshot-v1-8k",
            messages=USER,
            extra_body={"fake_moonshot": {"error": "bad_gateway"}},
        )
    assert fake.stats.requests == 1
    assert len((await d.client.get("/v1/jobs")).json()["data"]) == 1


async def test_moonqs_own_refusals_are_the_sdks_error_classes(drop_in: Any) -> None:
    d = await drop_in(MOONQ_API_KEYS="key-a=alpha", MOONQ_UPSTREAM_TPM=100_000)
    sdk = d.sdk.with_options(api_key="key-a")
    with pytest.raises(openai.AuthenticationError) as no_key:
        await d.sdk.with_options(api_key="wrong").chat.completions.create(
            model="moonshot-v1-8k", messages=USER
        )
    assert no_key.value.body == {  # OpenAI's shape, with nulls where there is nothing to say
        "message": "Missing or invalid API key: send 'Authorization: Bearer <key>'.",
        "type": "authentication_error",
        "param": None,
        "code": None,
    }
    with pytest.raises(openai.BadRequestError) as empty:  # OpenAI's 400, not FastAPI's 422
        await sdk.chat.completions.create(model="moonshot-v1-8k", messages=[])
    assert empty.value.param == "messages" and empty.value.type == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as too_big:
        await sdk.chat.completions.create(model="moonshot-v1-8k", messages=USER, max_tokens=200_000)
    assert "MOONQ_UPSTREAM_TPM" in too_big.value.message
    with pytest.raises(openai.NotFoundError) as unknown:
        await sdk.models.retrieve("gpt-4o")
    assert unknown.value.code == "model_not_found"
    assert (await d.client.get("/v1/jobs", headers={"Authorization": "Bearer key-a"})).json()[
        "data"
    ] == []  # nothing refused was queued


async def test_a_request_over_the_tpm_budget_names_the_field_to_lower(drop_in: Any) -> None:
    """An OpenAI request has no `body`: the 400 names the part that passes
    MOONQ_UPSTREAM_TPM, the prompt when it alone does; `POST /v1/jobs` keeps naming `body`."""
    d = await drop_in(MOONQ_UPSTREAM_TPM=1000)
    long = [{"role": "user", "content": "x" * 4000}]  # ~1,334 tokens by the estimate
    for messages, extra, param in (
        (USER, {"max_tokens": 2000}, "max_tokens"),
        (USER, {"max_completion_tokens": 2000}, "max_completion_tokens"),
        (long, {}, "messages"),
        (long, {"max_tokens": 10}, "messages"),
    ):
        with pytest.raises(openai.BadRequestError) as refused:
            await d.sdk.chat.completions.create(model="moonshot-v1-8k", messages=messages, **extra)
        assert refused.value.param == param, extra
        assert "MOONQ_UPSTREAM_TPM" in refused.value.message
    job = {"body": body(max_tokens=2000)}
    answer = await d.client.post("/v1/jobs", json=job)
    assert answer.status_code == 400 and answer.json()["error"]["param"] == "body"
    assert (await d.client.get("/v1/jobs")).json()["data"] == []  # nothing was queued


async def test_stream_options_without_stream_is_refused_as_openai_refuses_it(
    drop_in: Any,
) -> None:
    """OpenAI's 400 for `stream_options` on an answer that is not streamed; `POST /v1/jobs`
    takes it (its upstream request is always streamed: the options go with it)."""
    d = await drop_in()
    options = {"include_usage": True}
    for stream in ({}, {"stream": False}):
        with pytest.raises(openai.BadRequestError) as refused:
            await d.sdk.chat.completions.create(
                model="moonshot-v1-8k", messages=USER, stream_options=options, **stream
            )
        assert refused.value.param == "stream_options" and refused.value.code is None
        assert refused.value.type == "invalid_request_error"
        assert isinstance(refused.value.body, dict)
        assert refused.value.body["message"] == (
            "The 'stream_options' parameter is only allowed when 'stream' is enabled."
        )
    assert (await d.client.get("/v1/jobs")).json()["data"] == []  # nothing was queued
    unset = await d.client.post("/v1/chat/completions", json=body(stream_options=None))
    assert unset.status_code == 200 and unset.json()["object"] == "chat.completion"
    queued = await d.client.post("/v1/jobs", json={"body": body(stream_options=options)})
    assert queued.status_code == 202


async def test_bad_bodies_are_400_naming_the_field(drop_in: Any) -> None:
    """OpenAI answers a request it cannot take with a 400 (the SDK's `BadRequestError`);
    `POST /v1/jobs` keeps its 422 for the same body."""
    d = await drop_in()
    headers = {"content-type": "application/json"}
    nan = b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": NaN}'
    messages = b'"messages": [{"role": "user", "content": "x"}]'
    for content, param, words in (
        (nan, "temperature", "finite number"),
        (b"[1, 2]", "body", "a chat completion request"),
        (b'{"model": "m"', None, "Malformed JSON"),
        (b"[" * 100_000, None, "Malformed JSON"),
        (b'{"model": "m", ' + messages + b', "stream": "true"}', "stream", "boolean"),
        (
            b'{"model": "m", ' + messages + b', "stream_options": {"include_usage": 1}}',
            "stream_options.include_usage",
            "boolean",
        ),
    ):
        answer = await d.client.post("/v1/chat/completions", content=content, headers=headers)
        assert answer.status_code == 400, content[:80]
        error = answer.json()["error"]
        assert error["type"] == "invalid_request_error" and words in error["message"]
        assert error["param"] == param and "code" in error
    assert (await d.client.get("/v1/jobs")).json()["data"] == []  # nothing was queued
    wrapped = {"body": {"model": "m", "messages": [], "stream": "true"}}
    assert (await d.client.post("/v1/jobs", json=wrapped)).status_code == 422


async def test_a_paused_account_is_refused_at_once(drop_in: Any) -> None:
    d = await drop_in()
    await d.stack.redis.hset(f"{d.stack.settings.key_prefix}:account", mapping={"paused": "x"})
    with pytest.raises(openai.RateLimitError) as refused:
        await d.sdk.chat.completions.create(model="moonshot-v1-8k", messages=USER)
    assert refused.value.code == "exceeded_current_quota_error"
    assert refused.value.type == "insufficient_quota"


async def test_a_failure_after_chunks_is_an_error_event(drop_in: Any) -> None:
    d = await drop_in(MOONQ_MAX_ATTEMPTS=1)
    stream = await d.sdk.chat.completions.create(
        model="moonshot-v1-8k",
        messages=USER,
        stream=True,
        extra_body={"fake_moonshot": {"error": "drop", "drop_after": 3}},
    )
    seen = []
    with pytest.raises(openai.APIError) as raised:
        async for chunk in stream:
            seen.append(chunk)
    assert len(seen) == 3  # relayed before the upstream went away
    assert isinstance(raised.value.body, dict)
    job = (await d.client.get(f"/v1/jobs/{raised.value.body['job_id']}")).json()
    assert job["status"] == "failed" and raised.value.code == job["error"]["type"]


async def test_a_retry_after_chunks_says_so_and_the_job_completes(drop_in: Any) -> None:
    d = await drop_in(MOONQ_RETRY_BASE_DELAY=0)
    drop = {"error": "drop", "drop_after": 3, "fail_times": 1}
    stream = await d.sdk.chat.completions.create(
        model="moonshot-v1-8k", messages=USER, stream=True, extra_body={"fake_moonshot": drop}
    )
    with pytest.raises(openai.APIError) as raised:
        async for _ in stream:
            pass
    assert raised.value.code == "job_restarted"
    assert isinstance(raised.value.body, dict)
    job_id = raised.value.body["job_id"]
    assert f"/v1/jobs/{job_id}" in raised.value.message
    job = (await d.client.get(f"/v1/jobs/{job_id}", params={"wait": 10})).json()
    assert job["status"] == "completed" and job["attempts"] == 2
    assert job["result"]["choices"][0]["message"]["content"] == expected_content(body())


async def test_the_same_idempotency_key_after_a_restart_gets_the_whole_answer(
    drop_in: Any,
) -> None:
    """What a client does on `job_restarted`: ask again with its key. It joins the job at
    its latest attempt: the superseded chunks and the retry stay out of its stream."""
    d = await drop_in(MOONQ_RETRY_BASE_DELAY=0)
    drop = {"error": "drop", "drop_after": 3, "fail_times": 1}
    ask = {
        "model": "moonshot-v1-8k",
        "messages": USER,
        "stream": True,
        "extra_body": {"fake_moonshot": drop},
        "extra_headers": {"Idempotency-Key": "restart-1"},
    }
    with pytest.raises(openai.APIError) as raised:
        async for _ in await d.sdk.chat.completions.create(**ask):
            pass
    assert raised.value.code == "job_restarted"
    raw = await d.sdk.chat.completions.with_raw_response.create(**ask)
    assert raw.headers["Idempotent-Replayed"] == "true"
    chunks = [chunk async for chunk in raw.parse()]
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected_content(body())
    job_id = raw.headers["X-Moonq-Job-Id"]
    assert [e["event"] for e in await d.stack.events(job_id)].count("retry") == 1


async def test_a_retry_before_any_chunk_is_invisible(drop_in: Any, fake: FakeServer) -> None:
    d = await drop_in(MOONQ_RETRY_BASE_DELAY=0)
    fail_once = {"error": "server_error", "fail_times": 1}
    stream = await d.sdk.chat.completions.create(
        model="moonshot-v1-8k", messages=USER, stream=True, extra_body={"fake_moonshot": fail_once}
    )
    chunks = [chunk async for chunk in stream]
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected_content(body())
    assert fake.stats.requests == 2


# After admission: the job exists, so no answer may invite the SDK to make another


async def jobs_made(d: DropIn) -> int:
    return len((await d.client.get("/v1/jobs")).json()["data"])


async def test_every_answer_after_admission_names_its_job_and_forbids_retries(
    drop_in: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    d = await drop_in(retries=2)  # the SDK's default: it would retry a 5xx twice
    raw = await d.sdk.chat.completions.with_raw_response.create(
        model="moonshot-v1-8k", messages=USER
    )
    streamed = await d.sdk.chat.completions.with_raw_response.create(
        model="moonshot-v1-8k", messages=USER, stream=True
    )
    assert [c async for c in streamed.parse()]
    for answer in (raw, streamed):
        assert answer.headers["x-should-retry"] == "false"
        assert answer.headers["X-Moonq-Job-Id"].startswith("job_")
    store = d.stack.app.state.services.store
    monkeypatch.setattr(chat_relay, "REDIS_PATIENCE", 0.3)
    broken = [
        (store, "get", redis.exceptions.ConnectionError("reset by peer"), 503),  # the re-read
        (chat_relay, "follow", redis.exceptions.ConnectionError("reset"), 503),  # a stream's
        (chat_relay, "completion", RuntimeError("a bug"), 500),
    ]
    for owner, name, error, status in broken:
        before = await jobs_made(d)
        with monkeypatch.context() as patch:
            patch.setattr(owner, name, raising(error))
            with pytest.raises(openai.InternalServerError) as raised:
                await d.sdk.chat.completions.create(
                    model="moonshot-v1-8k", messages=USER, stream=name == "follow"
                )
        failed = raised.value
        assert failed.status_code == status, name
        assert failed.response.headers["x-should-retry"] == "false"
        job_id = failed.response.headers["X-Moonq-Job-Id"]
        assert isinstance(failed.body, dict) and failed.body["job_id"] == job_id
        assert f"GET /v1/jobs/{job_id}" in failed.message and "reset" not in failed.message
        assert await jobs_made(d) == before + 1  # the SDK did not run it again


def raising(error: Exception) -> Any:
    """A stand-in (function or async generator alike) that fails with `error` when called."""

    def fail(*args: Any, **kwargs: Any) -> Any:
        raise error

    return fail


async def test_a_brief_redis_failure_while_waiting_is_ridden_out(
    drop_in: Any, fake: FakeServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    d = await drop_in(retries=2)
    store = d.stack.app.state.services.store
    read, failures = store.get, [redis.exceptions.ConnectionError("failover")] * 2

    async def flaky(*args: Any, **kwargs: Any) -> Any:
        if failures:
            raise failures.pop()
        return await read(*args, **kwargs)

    monkeypatch.setattr(store, "get", flaky)
    completion = await d.sdk.chat.completions.create(
        model="moonshot-v1-8k", messages=USER, extra_body={"fake_moonshot": {"delay": 0.02}}
    )
    assert completion.choices[0].message.content == expected_content(body())
    assert failures == [] and fake.stats.requests == 1 and await jobs_made(d) == 1


# A chunk as Python's parser takes it and no JSON encoder writes it back.
INFINITE_CHUNK = (
    b'data: {"id":"c","object":"chat.completion.chunk","choices":[{"index":0,'
    b'"delta":{"content":"x"},"finish_reason":"stop",'
    b'"logprobs":{"content":[{"token":"x","logprob":-Infinity}]}}]}\n\ndata: [DONE]\n\n'
)


async def test_an_upstream_chunk_that_is_not_strict_json_fails_the_job(drop_in: Any) -> None:

    def upstream(request: httpx.Request) -> httpx.Response:
        if not request.url.path.endswith("/chat/completions"):
            return httpx.Response(404)
        sse = {"content-type": "text/event-stream"}
        return httpx.Response(200, headers=sse, content=INFINITE_CHUNK)

    d = await drop_in(transport=httpx.MockTransport(upstream), MOONQ_MAX_ATTEMPTS=1)
    for stream in (False, True):
        with pytest.raises(openai.InternalServerError) as raised:
            await d.sdk.chat.completions.create(model="m", messages=USER, stream=stream)
        assert raised.value.status_code == 502 and "not JSON" in raised.value.message
        job_id = raised.value.response.headers["X-Moonq-Job-Id"]
        job = (await d.client.get(f"/v1/jobs/{job_id}")).json()
        assert job["status"] == "failed" and job["error"]["type"] == raised.value.code


@pytest.mark.parametrize("tools", [False, True])
async def test_a_stream_replayed_from_a_trimmed_log_is_the_whole_answer(
    drop_in: Any, tools: bool
) -> None:
    """The log keeps the latest MOONQ_MAX_EVENTS events: a stream that joins a job whose first
    chunks are gone is answered from the job's result."""
    d = await drop_in(MOONQ_MAX_EVENTS=100)
    steer: dict[str, Any] = {"fake_moonshot": {"chunks": 300, "parallel_tools": tools}}
    ask: dict[str, Any] = {"model": "moonshot-v1-8k", "messages": USER, "extra_body": steer}
    ask |= {"extra_headers": {"Idempotency-Key": "long"}, **({"tools": TOOLS} if tools else {})}
    done = await d.sdk.chat.completions.create(**ask)
    job_id = (await d.client.get("/v1/jobs")).json()["data"][0]["id"]
    assert (await d.stack.events(job_id))[0]["seq"] > 1  # the log was trimmed
    stream = await d.sdk.chat.completions.create(
        **ask, stream=True, stream_options={"include_usage": True}
    )
    chunks = [chunk async for chunk in stream]
    message = done.choices[0].message
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == (message.content or "")
    calls = [call for c in chunks if c.choices for call in c.choices[0].delta.tool_calls or []]
    assert [(c.index, c.id, c.function.arguments) for c in calls] == [  # type: ignore[union-attr]
        (i, c.id, c.function.arguments)  # type: ignore[union-attr]
        for i, c in enumerate(message.tool_calls or [])
    ]
    assert len(calls) == 2 * tools
    assert [c.usage for c in chunks if c.usage] == [done.usage]


# A real socket: the sync client, streams read as they come, clients that go away


class Served:
    """The API under a real uvicorn, in a thread with its own event loop and Redis client."""

    def __init__(self, settings: Settings) -> None:
        self.app = create_app(settings)
        config = uvicorn.Config(
            self.app, host="127.0.0.1", port=0, log_level="warning", lifespan="on"
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> Served:
        self.thread.start()
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            threading.Event().wait(0.01)
        return self

    @property
    def url(self) -> str:
        port = self.server.servers[0].sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture
def served(real_redis_url: str, prefix: str, fake: FakeServer) -> Iterator[Any]:
    """Start the API (on the test Redis) with these settings; stopped when the test ends."""
    with contextlib.ExitStack() as exits:

        def start(**extra: Any) -> Served:
            return exits.enter_context(
                Served(make_settings(real_redis_url, prefix, fake.url, **extra))
            )

        yield start


@pytest.fixture
async def real_worker(real_redis: Any, real_redis_url: str, prefix: str, fake: FakeServer) -> Stack:
    """The test Redis as the served API sees it; `worker_running(stack)` runs a worker on it."""
    return Stack(make_settings(real_redis_url, prefix, fake.url), real_redis)


@pytest.mark.redis
async def test_the_sync_sdk_over_a_real_socket(served: Any, real_worker: Stack) -> None:
    api = served()
    sdk = openai.OpenAI(api_key="unused", base_url=f"{api.url}/v1", max_retries=0)

    def ask() -> tuple[str, str, list[Any]]:
        raw = sdk.chat.completions.with_raw_response.create(model="moonshot-v1-8k", messages=USER)
        text = raw.parse().choices[0].message.content or ""
        stream = sdk.chat.completions.create(
            model="moonshot-v1-8k",
            messages=USER,
            stream=True,
            stream_options={"include_usage": True},
        )
        return raw.headers["X-Moonq-Job-Id"], text, list(stream)

    async with worker_running(real_worker):
        job_id, text, chunks = await asyncio.to_thread(ask)
    assert text == expected_content(body()) and job_id.startswith("job_")
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert [c.usage for c in chunks if c.usage] == [chunks[-1].usage] and not chunks[-1].choices
    sdk.close()


@pytest.mark.redis
async def test_a_client_that_goes_away_loses_nothing(served: Any, real_worker: Stack) -> None:
    api = served()
    slow = body(stream=True, fake_moonshot={"chunks": 20, "delay": 0.05})
    async with (
        httpx.AsyncClient(base_url=api.url, timeout=10) as client,
        worker_running(real_worker),
    ):
        async with client.stream("POST", "/v1/chat/completions", json=slow) as answer:
            job_id = answer.headers["X-Moonq-Job-Id"]
            async for line in answer.aiter_lines():
                if line.startswith("data: "):
                    break  # one chunk, then hang up
        hub = api.app.state.services.hub  # the relay stops reading while the job runs on
        until(lambda: not hub._listeners, timeout=5)
        job = (await client.get(f"/v1/jobs/{job_id}", params={"wait": 10})).json()
    assert job["status"] == "completed"
    assert job["result"]["choices"][0]["message"]["content"] == expected_content(slow)


@pytest.mark.redis
async def test_a_waiting_completion_stops_when_its_client_goes_away(
    served: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(chat_relay, "REREAD_EVERY", 0.1)
    api = served()  # and no worker: the job stays queued
    hub = api.app.state.services.hub
    async with httpx.AsyncClient(base_url=api.url) as client:
        asked = asyncio.create_task(client.post("/v1/chat/completions", json=body()))
        await asyncio.to_thread(until, lambda: hub._listeners, 5)  # it waits for the job
        asked.cancel()  # and hangs up, as an SDK does at its `timeout`
        await asyncio.to_thread(until, lambda: not hub._listeners, 5)  # it stopped waiting
        jobs = (await client.get("/v1/jobs")).json()["data"]
    assert [job["status"] for job in jobs] == ["queued"]  # the job itself is still there


@pytest.mark.redis
async def test_a_stream_cancelled_midway_ends_with_an_error(
    served: Any, real_worker: Stack
) -> None:
    api = served()
    sdk = openai.AsyncOpenAI(api_key="unused", base_url=f"{api.url}/v1", max_retries=0)
    slow = {"fake_moonshot": {"chunks": 40, "delay": 0.05}}
    async with worker_running(real_worker):
        raw = await sdk.chat.completions.with_raw_response.create(
            model="moonshot-v1-8k", messages=USER, stream=True, extra_body=slow
        )
        job_id = raw.headers["X-Moonq-Job-Id"]
        stream = raw.parse()
        await stream.__anext__()
        async with httpx.AsyncClient(base_url=api.url) as client:
            assert (await client.post(f"/v1/jobs/{job_id}/cancel")).status_code == 200
        with pytest.raises(openai.APIError) as raised:
            async for _ in stream:
                pass
    assert raised.value.code == "cancelled"
    await sdk.close()


@pytest.mark.redis
async def test_a_stream_starts_while_the_job_waits_past_the_patience(
    served: Any, real_worker: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(chat_relay, "HEADERS_PATIENCE", 0.2)
    api = served()
    sdk = openai.AsyncOpenAI(api_key="unused", base_url=f"{api.url}/v1", max_retries=0)
    stream = await asyncio.wait_for(  # no worker yet: only the patience lets the headers go
        sdk.chat.completions.create(model="moonshot-v1-8k", messages=USER, stream=True), 5
    )
    async with worker_running(real_worker):
        chunks = [chunk async for chunk in stream]
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected_content(body())
    await sdk.close()


# Models


async def test_models_are_the_upstreams_in_openais_shape(drop_in: Any, fake: FakeServer) -> None:
    fake.config.api_key = UPSTREAM_KEY  # the fake refuses any other key
    d = await drop_in()
    listed = await d.sdk.models.list()
    assert [m.id for m in listed.data] == list(MODEL_IDS)
    raw = await d.client.get("/v1/models")
    assert {tuple(sorted(m)) for m in raw.json()["data"]} == {
        ("created", "id", "object", "owned_by")
    }
    assert UPSTREAM_KEY not in raw.text
    model = await d.sdk.models.retrieve("kimi-k2-thinking")
    assert (model.id, model.object, model.owned_by) == ("kimi-k2-thinking", "model", "moonshot")
    with pytest.raises(openai.NotFoundError):
        await d.sdk.models.retrieve("gpt-4o")


async def test_models_are_fetched_once_for_every_api_process(
    drop_in: Any, fake: FakeServer, stack_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    models = fake.runner.app[MODELS_KEY]
    first, second = await drop_in(), await drop_in()  # two API processes, one Redis
    assert [m.id for m in (await first.sdk.models.list()).data] == list(MODEL_IDS)
    assert [m.id for m in (await second.sdk.models.list()).data] == list(MODEL_IDS)
    assert models.calls == 1
    monkeypatch.setattr(model_list, "FRESH_FOR", 0.0)  # from now on, every list is stale
    models.ids = ["kimi-k2.6"]
    assert [m.id for m in (await first.sdk.models.list()).data] == ["kimi-k2.6"]
    assert [m.id for m in (await second.sdk.models.list()).data] == ["kimi-k2.6"]
    assert models.calls == 2  # the second process served the list while the first refreshed
    _, offline = await stack_factory(MOONSHOT_BASE_URL="http://127.0.0.1:9/v1")
    await first.stack.redis.delete(f"{first.stack.settings.key_prefix}:upstream:models:refresh")
    stale = await offline.get("/v1/models")
    assert stale.status_code == 200 and [m["id"] for m in stale.json()["data"]] == ["kimi-k2.6"]
    await first.stack.redis.delete(f"{first.stack.settings.key_prefix}:upstream:models")
    never = await offline.get("/v1/models")
    assert never.status_code == 503 and never.json()["error"]["type"] == "service_unavailable"


async def test_a_bad_model_list_never_replaces_a_good_one(
    drop_in: Any, fake: FakeServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    models = fake.runner.app[MODELS_KEY]
    d = await drop_in()
    refresh = f"{d.stack.settings.key_prefix}:upstream:models:refresh"
    assert [m.id for m in (await d.sdk.models.list()).data] == list(MODEL_IDS)
    monkeypatch.setattr(model_list, "FRESH_FOR", 0.0)
    models.ids = []  # an upstream's bad minute
    await d.stack.redis.delete(refresh)
    assert [m.id for m in (await d.sdk.models.list()).data] == list(MODEL_IDS)
    models.ids = ["kimi-k2.6", "", "kimi-k2.6", "kimi-k2.5"]
    await d.stack.redis.delete(refresh)
    assert [m.id for m in (await d.sdk.models.list()).data] == ["kimi-k2.6", "kimi-k2.5"]
    assert models.calls == 3


async def test_a_refused_server_key_is_a_502_that_says_so(drop_in: Any, fake: FakeServer) -> None:
    fake.config.api_key = "sk-another-key"  # the fake refuses moonq's key with a 401
    d = await drop_in(retries=2)
    with pytest.raises(openai.InternalServerError) as raised:
        await d.sdk.models.list()
    assert raised.value.status_code == 502 and "MOONSHOT_API_KEY" in raised.value.message
    assert raised.value.code == "invalid_authentication_error"
    assert raised.value.response.headers["x-should-retry"] == "false"
    assert fake.runner.app[MODELS_KEY].calls == 1  # the SDK did not retry
    assert UPSTREAM_KEY not in raised.value.response.text


async def test_a_model_list_nested_past_the_parsers_stack_is_an_unreachable_upstream(
    stack_factory: Any,
) -> None:
    async def deep(request: web.Request) -> web.Response:
        return web.Response(text="[" * 100_000 + "]" * 100_000, content_type="application/json")

    app = web.Application()
    app.router.add_get("/v1/models", deep)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        port = runner.addresses[0][1]
        _, client = await stack_factory(MOONSHOT_BASE_URL=f"http://127.0.0.1:{port}/v1")
        answer = await client.get("/v1/models")
    finally:
        await runner.cleanup()
    assert answer.status_code == 503 and answer.json()["error"]["type"] == "service_unavailable"


# The translation itself
# The translation itself


def test_chunks_lose_usage_wherever_it_is_and_deltas_are_objects() -> None:
    usage = {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}
    last = {
        "id": "c",
        "choices": [{"index": 0, "delta": [], "finish_reason": "stop", "usage": usage}],
    }
    assert chat_shapes.openai_chunk({**last, "usage": usage}) == {
        "id": "c",
        "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
    }
    assert chat_shapes.openai_chunk({"id": "c", "choices": [], "usage": usage}) is None


def _event(kind: str, attempt: int, data: Any = None) -> dict[str, Any]:
    return {"event": kind, "attempt": attempt, "data": data}


def test_a_relay_hides_what_came_before_its_first_chunk_and_nothing_after() -> None:
    job = Job(id="job_x", status=Status.IN_PROGRESS, created_at=0, model="m", channel="c")
    relay = chat_relay.Relay(job, include_usage=False)
    chunk = {"choices": [{"index": 0, "delta": {"content": "a"}}]}
    # The stream began without a chunk (past HEADERS_PATIENCE); then an attempt is retried.
    assert relay.lines(_event("retry", 2, {"attempt": 2})) == ([], False)
    assert relay.lines(_event("chunk", 1, chunk)) == ([], False)  # a late one of attempt 1
    assert relay.lines(_event("chunk", 2, chunk)) == (
        [json.dumps(chunk, separators=(",", ":"))],
        False,
    )
    lines, end = relay.lines(_event("retry", 3, {"attempt": 3}))
    assert end and json.loads(lines[0])["error"]["code"] == "job_restarted"
    # A job back in the queue after its first attempt failed midway runs next as attempt 2.
    waiting = chat_relay.Relay(
        job.model_copy(update={"status": Status.QUEUED, "attempts": 1}), False
    )
    assert waiting.lines(_event("chunk", 1, chunk)) == ([], False)
    assert waiting.lines(_event("retry", 2, {"attempt": 2})) == ([], False)
    assert waiting.lines(_event("chunk", 2, chunk))[0] != []


class ListFeed:
    """A Feed of the given events, for the Relay alone."""

    def __init__(self, *events: dict[str, Any]) -> None:
        self.events = list(events)

    async def next(self, timeout: float | None = None) -> dict[str, Any]:
        return self.events.pop(0)

    def close(self) -> None:
        pass


async def relayed(relay: chat_relay.Relay, feed: ListFeed, ended: Any = None) -> list[Any]:
    lines = relay.events(feed, None, ended)  # type: ignore[arg-type]
    return [line if line == "[DONE]" else json.loads(line) async for line in lines]


async def test_a_gap_after_chunks_went_out_ends_the_stream_saying_where_the_result_is() -> None:
    job = Job(id="job_x", status=Status.IN_PROGRESS, created_at=0, model="m", channel="c")
    chunk = {"choices": [{"index": 0, "delta": {"content": "a"}}]}
    events = [{"seq": n, **_event("chunk", 1, chunk)} for n in (1, 2, 150, 151)]
    lines = await relayed(chat_relay.Relay(job, False), ListFeed(*events))
    assert lines[:2] == [chunk, chunk]
    assert lines[2]["error"]["code"] == "events_trimmed" and len(lines) == 3
    assert "GET /v1/jobs/job_x" in lines[2]["error"]["message"]
    # Joined at attempt 2: a gap among attempt 1's events loses nothing of this answer.
    second = chat_relay.Relay(job.model_copy(update={"attempts": 2}), False)
    earlier = [{"seq": 40, **_event("chunk", 1, chunk)}, {"seq": 41, **_event("retry", 2, {})}]
    later = [{"seq": 42, **_event("chunk", 2, chunk)}, {"seq": 43, **_event("done", 2, {})}]
    assert await relayed(second, ListFeed(*earlier, *later)) == [chunk, "[DONE]"]


async def test_a_chunk_json_cannot_carry_is_an_error_event_not_invalid_json() -> None:
    job = Job(id="job_x", status=Status.IN_PROGRESS, created_at=0, model="m", channel="c")
    bad = {"choices": [{"index": 0, "delta": {"content": "a"}, "logprobs": float("-inf")}]}
    feed = ListFeed({"seq": 1, **_event("chunk", 1, bad)})
    lines = [line async for line in chat_relay.Relay(job, False).events(feed, None, None)]  # type: ignore[arg-type]
    assert len(lines) == 1
    error = json.loads(lines[0], parse_constant=lambda c: pytest.fail(f"{c} is not JSON"))
    assert error["error"]["job_id"] == "job_x" and "GET /v1/jobs/job_x" in error["error"]["message"]


async def test_a_spent_budget_is_the_sdks_rate_limit_error(drop_in: Any) -> None:
    # a request without max_tokens is held to 1,024 answer tokens until it completes
    budgets = '{"*": {"requests_per_minute": 1000, "tokens_per_day": 1500}}'
    d = await drop_in(MOONQ_BUDGETS=budgets)
    usage = {"prompt_tokens": 500, "completion_tokens": 500, "total_tokens": 1000}
    done = await d.sdk.chat.completions.create(
        model="moonshot-v1-8k", messages=USER, extra_body={"fake_moonshot": {"usage": usage}}
    )
    assert done.usage is not None and done.usage.total_tokens == 1000  # no room for another
    with pytest.raises(openai.RateLimitError) as refused:
        await d.sdk.chat.completions.create(model="moonshot-v1-8k", messages=USER)
    assert refused.value.code == "tokens_per_day"
    assert "resets at" in refused.value.message
