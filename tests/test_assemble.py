"""The Assembler turns streamed chunks into the `chat.completion` the non-streaming call returns."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any

import httpx
import pytest

from moonq.assemble import Assembler
from moonq.fake_moonshot import FakeConfig, FakeServer, start_fake
from worker.upstream import MoonshotClient

CAPTURED = Path(__file__).parent / "data" / "moonshot_captured_stream.jsonl"
TOOLS = [
    {"type": "function", "function": {"name": "search", "parameters": {}}},
    {"type": "function", "function": {"name": "lookup", "parameters": {}}},
]


def assemble(chunks: Iterable[dict[str, Any]]) -> dict[str, Any]:
    assembler = Assembler()
    for chunk in chunks:
        assembler.add(chunk)
    return assembler.result()


def chunk(*choices: Any, **extra: Any) -> dict[str, Any]:
    """An OpenAI-style chunk; `choices` are passed through as given (junk included)."""
    base = {"id": "chatcmpl-x", "object": "chat.completion.chunk", "created": 1, "model": "m"}
    return {**base, "choices": list(choices), **extra}


def delta(index: int = 0, finish: str | None = None, **fields: Any) -> dict[str, Any]:
    return {"index": index, "delta": fields, "finish_reason": finish}


def call(index: int, arguments: str, **head: Any) -> dict[str, Any]:
    """A tool-call delta; `head` is `id`, `type` and `name` on the first delta of a call."""
    function = {"arguments": arguments} | ({"name": head.pop("name")} if "name" in head else {})
    return {"index": index, **head, "function": function}


# --- the captured Moonshot stream -------------------------------------------------------------


def load_captured() -> list[dict[str, Any]]:
    lines = CAPTURED.read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def test_captured_moonshot_stream_assembles_to_a_completion() -> None:
    chunks = load_captured()
    last = chunks[-1]["choices"][0]
    assert last["delta"] == []  # the PHP re-encoded `{}` the assembler must tolerate
    result = assemble(chunks)

    pieces = [c["choices"][0]["delta"].get("content") for c in chunks[:-1]]
    assert all(isinstance(p, str) for p in pieces) and "".join(pieces)
    choice = result["choices"][0]
    assert result["choices"] == [choice] and choice["index"] == 0
    assert choice["message"] == {"role": "assistant", "content": "".join(pieces)}
    assert choice["finish_reason"] == "stop"
    usage = {"prompt_tokens": 8, "completion_tokens": 12, "total_tokens": 20}
    assert result["usage"] == last["usage"] == usage
    first = chunks[0]
    assert result["object"] == "chat.completion"
    assert (result["id"], result["model"], result["created"]) == (
        first["id"],
        first["model"],
        first["created"],
    )
    assert set(result) == {"id", "object", "created", "model", "choices", "usage"}


# --- OpenAI-style streams ---------------------------------------------------------------------


def test_top_level_usage_in_a_final_chunk_without_choices() -> None:
    usage = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    chunks = [
        chunk(delta(role="assistant", content=""), usage=None),
        chunk(delta(content="Hi"), usage=None),
        chunk(delta(content=" there"), usage=None),
        chunk(delta(finish="stop"), usage=None),
        chunk(usage=usage),
    ]
    result = assemble(chunks)
    assert result["usage"] == usage
    assert result["choices"] == [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "Hi there"},
            "finish_reason": "stop",
        }
    ]


def test_interleaved_tool_calls_merge_by_index_and_sort() -> None:
    fragments = {0: ['{"q": ', '"moon"', "}"], 1: ['{"id"', ": 7}", ""]}
    heads = {0: {"id": "call_a", "type": "function", "name": "search"}}
    heads[1] = {"id": "call_b", "type": "function", "name": "lookup"}
    chunks = [chunk(delta(role="assistant", content=None))]
    for step in range(3):
        for index in (1, 0):  # the second call's deltas arrive first
            head = heads[index] if step == 0 else {}
            chunks.append(chunk(delta(tool_calls=[call(index, fragments[index][step], **head)])))
    chunks.append(chunk(delta(finish="tool_calls")))
    choice = assemble(chunks)["choices"][0]
    message = choice["message"]
    assert message["tool_calls"] == [
        {
            "index": i,
            "id": heads[i]["id"],
            "type": "function",
            "function": {"name": heads[i]["name"], "arguments": "".join(fragments[i])},
        }
        for i in (0, 1)
    ]
    assert json.loads(message["tool_calls"][0]["function"]["arguments"]) == {"q": "moon"}
    assert choice["finish_reason"] == "tool_calls"


def test_two_choices_are_kept_apart_by_index() -> None:
    texts = {0: ["Red", " sky"], 1: ["Blue", " sea", "!"]}
    chunks = [chunk(delta(0, role="assistant"), delta(1, role="assistant"))]
    for step in range(3):
        present = [i for i in (1, 0) if step < len(texts[i])]
        chunks.append(chunk(*(delta(i, content=texts[i][step]) for i in present)))
    chunks.append(chunk(delta(1, finish="length"), delta(0, finish="stop")))
    choices = assemble(chunks)["choices"]
    assert [c["index"] for c in choices] == [0, 1]
    assert [c["message"]["content"] for c in choices] == ["".join(texts[0]), "".join(texts[1])]
    assert [c["finish_reason"] for c in choices] == ["stop", "length"]


def test_reasoning_content_and_logprobs_are_concatenated() -> None:
    thoughts = ["The user ", "greets me."]
    tokens = [[{"token": "He", "logprob": -0.1}], [{"token": "llo", "logprob": -0.2}]]
    chunks = [chunk(delta(role="assistant", reasoning_content=t)) for t in thoughts]
    texts = [t[0]["token"] for t in tokens]
    for text, logprobs in zip(texts, tokens, strict=True):
        chunks.append(chunk(delta(content=text) | {"logprobs": {"content": logprobs}}))
    chunks.append(chunk(delta(finish="stop")))
    choice = assemble(chunks)["choices"][0]
    assert choice["message"]["reasoning_content"] == "".join(thoughts)
    assert choice["message"]["content"] == "".join(texts)
    assert choice["logprobs"] == {"content": tokens[0] + tokens[1]}


def test_tolerates_null_deltas_missing_choices_and_junk() -> None:
    chunks = [
        {"id": "chatcmpl-j", "object": "chat.completion.chunk", "created": 9, "model": "m"},
        chunk({"index": 0, "delta": None, "finish_reason": None}),
        chunk(None, "junk", 42, ["x"], delta(content="ok")),
        {**chunk(), "choices": None},
        chunk(delta(finish="stop")),
    ]
    result = assemble(chunks)
    assert result["id"] == "chatcmpl-j" and result["created"] == 9
    assert result["choices"] == [
        {"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}
    ]
    assert result["usage"] is None


# --- against the fake over a real socket ------------------------------------------------------


@pytest.fixture(params=["moonshot", "openai"])
async def styled_fake(request: pytest.FixtureRequest) -> AsyncIterator[FakeServer]:
    server = await start_fake(config=FakeConfig(usage_style=request.param))
    try:
        yield server
    finally:
        await server.close()


def body(**extra: Any) -> dict[str, Any]:
    messages = [{"role": "user", "content": "Where is the moon tonight?"}]
    return {"model": "moonshot-v1-8k", "messages": messages, **extra}


BODIES = [
    pytest.param(body(), id="plain"),
    pytest.param(body(tools=TOOLS), id="tool-call"),
    pytest.param(body(tools=TOOLS, fake_moonshot={"parallel_tools": True}), id="parallel-tools"),
    pytest.param(body(fake_moonshot={"empty_delta_as_list": True}), id="delta-list"),
    pytest.param(body(fake_moonshot={"chunks": 1}), id="1-chunk"),
    pytest.param(body(fake_moonshot={"chunks": 30}), id="30-chunks"),
]


@pytest.mark.parametrize("request_body", BODIES)
async def test_streamed_and_assembled_equals_the_non_streaming_answer(
    styled_fake: FakeServer, request_body: dict[str, Any]
) -> None:
    fake = styled_fake
    # OpenAI-style upstreams report usage in a stream only when asked (MOONQ_STREAM_USAGE)
    client = MoonshotClient(fake.url, "sk-any", include_usage=fake.config.usage_style == "openai")
    assembler = Assembler()
    try:
        async with contextlib.aclosing(client.stream(request_body)) as chunks:
            async for item in chunks:
                assembler.add(item)
    finally:
        await client.aclose()
    headers = {"Authorization": "Bearer sk-any"}
    async with httpx.AsyncClient(base_url=fake.url, headers=headers) as http:
        response = await http.post("/chat/completions", json=request_body)
    assert response.status_code == 200
    expected, result = response.json(), assembler.result()
    assert result["object"] == expected["object"] == "chat.completion"
    assert result["model"] == expected["model"]
    assert result["usage"] == expected["usage"]
    assert result["choices"] == expected["choices"]


def test_junk_where_numbers_and_strings_belong_is_tolerated() -> None:
    assembler = Assembler()
    junk: list[dict[str, Any]] = [
        {"id": "x", "choices": [{"index": None, "delta": {"role": "assistant", "content": "a"}}]},
        {"choices": [{"index": "0", "delta": {"content": "b", "tool_calls": "nope"}}]},
        {"choices": [{"delta": {"tool_calls": [{"index": None, "function": {"arguments": 5}}]}}]},
        {"choices": [{"index": 0, "delta": {}, "finish_reason": 1}], "usage": "many"},
        {"choices": "none"},
    ]
    for chunk in junk:
        assembler.add(chunk)
    choice = assembler.result()["choices"][0]
    assert choice["message"]["content"] == "ab"
    assert choice["message"]["tool_calls"][0]["function"]["arguments"] == ""
    assert choice["finish_reason"] is None and assembler.result()["usage"] is None
