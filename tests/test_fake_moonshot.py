"""The fake Moonshot upstream, exercised over a real socket with plain httpx."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest

from moonq.fake_moonshot import (
    ERRORS,
    FakeConfig,
    FakeServer,
    expected_content,
    expected_message,
    expected_usage,
    start_fake,
)

AUTH = {"Authorization": "Bearer sk-test"}
TOOLS = [
    {"type": "function", "function": {"name": "search", "parameters": {}}},
    {"type": "function", "function": {"name": "lookup", "parameters": {}}},
]


@asynccontextmanager
async def serving(config: FakeConfig | None = None) -> AsyncIterator[FakeServer]:
    server = await start_fake(config=config)
    try:
        yield server
    finally:
        await server.close()


@pytest.fixture
async def fake() -> AsyncIterator[FakeServer]:
    async with serving() as server:
        yield server


@pytest.fixture
async def client(fake: FakeServer) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=fake.url, headers=AUTH, timeout=5) as c:
        yield c


def chat(text: str = "hello moon", **extra: Any) -> dict[str, Any]:
    return {"model": "moonshot-v1-8k", "messages": [{"role": "user", "content": text}], **extra}


async def post(client: httpx.AsyncClient, body: dict[str, Any], **kw: Any) -> httpx.Response:
    return await client.post("/chat/completions", json=body, **kw)


async def stream_lines(client: httpx.AsyncClient, body: dict[str, Any]) -> list[str]:
    async with client.stream("POST", "/chat/completions", json={**body, "stream": True}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"] == "text/event-stream"
        return [line async for line in r.aiter_lines() if line]


async def stream_events(client: httpx.AsyncClient, body: dict[str, Any]) -> list[dict[str, Any]]:
    lines = await stream_lines(client, body)
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(line[6:]) for line in lines[:-1]]
    compact = [f"data: {json.dumps(e, separators=(',', ':'), ensure_ascii=False)}" for e in events]
    assert compact == lines[:-1]
    return events


def assemble(events: list[dict[str, Any]]) -> tuple[dict[str, Any], str | None]:
    """Merge deltas the way an OpenAI client does: content appended, tool calls by index."""
    message: dict[str, Any] = {"content": ""}
    calls: dict[int, dict[str, Any]] = {}
    finish = None
    for event in events:
        for choice in event["choices"]:
            delta = choice["delta"] or {}
            message["role"] = delta.get("role", message.get("role"))
            message["content"] += delta.get("content") or ""
            for part in delta.get("tool_calls", []):
                call = calls.setdefault(part["index"], {"function": {"arguments": ""}})
                call.update({k: v for k, v in part.items() if k != "function"})
                arguments = call["function"]["arguments"] + part["function"]["arguments"]
                call["function"].update({**part["function"], "arguments": arguments})
            finish = choice["finish_reason"] or finish
    if calls:
        message["tool_calls"] = [calls[i] for i in sorted(calls)]
    return message, finish


async def test_stream_moonshot_format_puts_usage_inside_the_choice(client: httpx.AsyncClient):
    body = chat()
    events = await stream_events(client, body)
    assert {e["object"] for e in events} == {"chat.completion.chunk"}
    assert len({e["id"] for e in events}) == 1 and events[0]["id"].startswith("chatcmpl-")
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    pieces = [e["choices"][0]["delta"]["content"] for e in events[1:-1]]
    assert len(pieces) == 8 and all(pieces)
    assert "".join(pieces) == expected_content(body)
    assert expected_content(body).startswith("Echo: hello moon")
    final = events[-1]["choices"][0]
    assert final["delta"] == {} and final["finish_reason"] == "stop"
    assert final["usage"] == expected_usage(body) and "usage" not in events[-1]
    assert final["usage"]["completion_tokens"] == 8


async def test_stream_openai_usage_style_adds_a_usage_only_chunk():
    asked = {**chat(), "stream_options": {"include_usage": True}}
    async with (
        serving(FakeConfig(usage_style="openai", chunks=4)) as server,
        httpx.AsyncClient(base_url=server.url, headers=AUTH) as c,
    ):
        events = await stream_events(c, asked)
        unasked = await stream_events(c, chat())
    assert all("usage" not in e and "usage" not in e["choices"][0] for e in unasked)
    assert events[-1]["choices"] == []
    assert events[-1]["usage"] == expected_usage(chat(), FakeConfig(chunks=4))
    assert events[-2]["choices"][0]["finish_reason"] == "stop"
    assert "usage" not in events[-2]["choices"][0]


async def test_chunk_override_and_list_content(client: httpx.AsyncClient):
    parts = [{"type": "text", "text": "part one "}, {"type": "text", "text": "part two"}]
    body = {"model": "kimi", "messages": [{"role": "user", "content": parts}]}
    body["fake_moonshot"] = {"chunks": 3, "empty_delta_as_list": True}
    events = await stream_events(client, body)
    assert len(events) == 5 and events[-1]["choices"][0]["delta"] == []
    assert assemble(events)[0]["content"] == expected_content(body)
    assert expected_content(body).startswith("Echo: part one part two")
    assert events[-1]["choices"][0]["usage"]["completion_tokens"] == 3


async def test_stamp_puts_each_chunks_send_time_in_it(client: httpx.AsyncClient):
    """`stamp` (the benchmark's relay latency): each chunk carries the wall clock at which it
    was written, `delay` apart; without it, chunks have no such field."""
    body = chat(fake_moonshot={"chunks": 3, "delay": 0.05})
    assert all("x_fake_sent_at" not in event for event in await stream_events(client, body))
    before = time.time()
    body["fake_moonshot"]["stamp"] = True
    events = await stream_events(client, body)
    sent = [event["x_fake_sent_at"] for event in events]
    assert len(sent) == 5 and before <= sent[0] and sent[-1] <= time.time()
    assert all(0.04 <= b - a < 1 for a, b in itertools.pairwise(sent))
    assert assemble(events)[0]["content"] == expected_content(body)


async def test_non_streaming_completion_shape(client: httpx.AsyncClient):
    body = chat("what is up", fake_moonshot={"chunks": 50})
    r = await post(client, body)
    data = r.json()
    assert r.status_code == 200 and data["object"] == "chat.completion"
    assert data["model"] == "moonshot-v1-8k" and isinstance(data["created"], int)
    message = {"role": "assistant", "content": expected_content(body)}
    assert data["choices"] == [{"index": 0, "message": message, "finish_reason": "stop"}]
    assert data["usage"] == expected_usage(body)
    assert data["usage"]["completion_tokens"] == 50 and len(expected_content(body)) >= 50
    no_tools = chat(tools=TOOLS, tool_choice="none")
    r = await post(client, no_tools)
    assert r.json()["choices"][0]["message"]["content"] == expected_content(no_tools)


@pytest.mark.parametrize("parallel", [False, True])
async def test_tool_call_stream_assembles_to_the_non_streamed_message(
    client: httpx.AsyncClient, parallel: bool
):
    body = chat("weather in Paris", tools=TOOLS, fake_moonshot={"parallel_tools": parallel})
    events = await stream_events(client, body)
    streamed, finish = assemble(events)
    r = await post(client, body)
    choice = r.json()["choices"][0]
    assert finish == choice["finish_reason"] == "tool_calls"
    assert streamed == choice["message"] == expected_message(body)
    calls = choice["message"]["tool_calls"]
    names = [c["function"]["name"] for c in calls]
    assert names == ["search", "lookup"][: 2 if parallel else 1]
    assert json.loads(calls[0]["function"]["arguments"]) == {"query": "weather in Paris"}
    assert calls[0]["id"].startswith("call_")
    assert events[-1]["choices"][0]["usage"] == r.json()["usage"] == expected_usage(body)


@pytest.mark.parametrize("name", sorted(ERRORS))
async def test_injected_errors_have_moonshot_status_and_body(
    client: httpx.AsyncClient, fake: FakeServer, name: str
):
    r = await post(client, chat(stream=True, fake_moonshot={"error": name}))
    status = ERRORS[name][0]
    assert r.status_code == status
    assert r.json()["error"]["type"] == ("server_error" if status >= 500 else name)
    assert r.json()["error"]["message"]
    assert "retry-after" not in r.headers
    assert fake.stats.errors_injected == 1 and fake.stats.completed == 0


async def test_content_filter_and_retry_after(client: httpx.AsyncClient):
    r = await post(client, chat(fake_moonshot={"error": "content_filter"}))
    assert r.status_code == 400 and "high risk" in r.json()["error"]["message"]
    ctl = {"error": "rate_limit_reached_error", "retry_after": 2}
    r = await post(client, chat(fake_moonshot=ctl))
    assert r.status_code == 429 and r.headers["retry-after"] == "2"
    ctl = {"error": "unavailable", "retry_after": 0.5}
    r = await post(client, chat(fake_moonshot=ctl))
    assert r.status_code == 503 and r.headers["retry-after"] == "0.5"


async def test_fail_times_fails_per_key_then_succeeds(client: httpx.AsyncClient, fake: FakeServer):
    ctl = {"error": "server_error", "fail_times": 2, "key": "job-1"}
    codes = [(await post(client, chat(fake_moonshot=ctl))).status_code]
    other = await post(client, chat(fake_moonshot={**ctl, "key": "job-2"}))
    for _ in range(2):
        r = await post(client, chat(fake_moonshot=ctl))
        codes.append(r.status_code)
    assert codes == [500, 500, 200] and other.status_code == 500
    assert fake.stats.errors_injected == 3 and fake.stats.completed == 1
    await client.post(f"{fake.origin}/_fake/reset")
    r = await post(client, chat(fake_moonshot=ctl))
    assert r.status_code == 500


async def test_drop_breaks_the_stream_before_done(client: httpx.AsyncClient, fake: FakeServer):
    seen: list[str] = []
    with pytest.raises(httpx.RemoteProtocolError):
        body = chat(stream=True, fake_moonshot={"error": "drop", "drop_after": 3})
        async with client.stream("POST", "/chat/completions", json=body) as r:
            async for line in r.aiter_lines():
                seen += [line] if line else []
    assert len(seen) == 3 and "data: [DONE]" not in seen
    with pytest.raises(httpx.RemoteProtocolError):
        await post(client, chat(fake_moonshot={"error": "drop"}))
    assert fake.stats.completed == 0 and fake.stats.errors_injected == 2


async def test_hang_times_out_and_disconnect_ends_the_request(
    client: httpx.AsyncClient, fake: FakeServer
):
    with pytest.raises(httpx.ReadTimeout):
        body = chat(stream=True, fake_moonshot={"error": "hang"})
        await post(client, body, timeout=0.3)
    for _ in range(50):
        if fake.stats.in_flight == 0:
            break
        await asyncio.sleep(0.02)
    assert fake.stats.in_flight == 0


async def test_without_a_key_any_request_gets_in(fake: FakeServer):
    async with httpx.AsyncClient(base_url=fake.url) as c:
        assert (await post(c, chat())).status_code == 200
        assert (await post(c, chat(), headers={"Authorization": "Bearer"})).status_code == 200
        assert (await post(c, chat(), headers=AUTH)).status_code == 200


async def test_with_a_key_only_that_key_gets_in():
    right = {"Authorization": "Bearer sk-right"}
    async with (
        serving(FakeConfig(api_key="sk-right")) as server,
        httpx.AsyncClient(base_url=server.url) as c,
    ):
        missing = await post(c, chat())
        wrong = await post(c, chat(), headers=AUTH)
        ok = await post(c, chat(), headers=right)
    assert missing.status_code == wrong.status_code == 401 and ok.status_code == 200
    assert wrong.json()["error"]["type"] == "invalid_authentication_error"


BAD_BODIES = [
    {"messages": [{"role": "user", "content": "hi"}]},
    chat(model=7),
    chat(messages=[]),
    chat(fake_moonshot=1),
    chat(fake_moonshot={"error": "no_such_error"}),
]


@pytest.mark.parametrize("body", BAD_BODIES)
async def test_invalid_requests_get_400(client: httpx.AsyncClient, body: dict[str, Any]):
    r = await post(client, body)
    assert r.status_code == 400
    assert r.json()["error"]["type"] == "invalid_request_error"


async def test_stats_track_peak_concurrency(client: httpx.AsyncClient, fake: FakeServer):
    body = chat(fake_moonshot={"delay": 0.05, "chunks": 3})
    await asyncio.gather(*(stream_events(client, body) for _ in range(4)))
    stats = (await client.get(f"{fake.origin}/_fake/stats")).json()
    assert stats == dict(requests=4, in_flight=0, peak_in_flight=4, errors_injected=0, completed=4)
    reset = (await client.post(f"{fake.origin}/_fake/reset")).json()
    assert reset["requests"] == reset["peak_in_flight"] == 0
