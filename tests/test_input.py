"""Bad input at the door: every malformed or impossible request is a 4xx JSON error that names
what is wrong, never a 500, and leaves nothing behind in Redis."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from moonq.limits import estimate_tokens
from moonq.models import MAX_JSON_DEPTH
from tests.conftest import chat

MESSAGES = '"messages": [{"role": "user", "content": "x"}]'
JSON = {"content-type": "application/json"}


async def _keys(stack: Any) -> list[bytes]:
    return sorted(await stack.redis.keys("*"))


async def _post_raw(client: httpx.AsyncClient, raw: str | bytes, **headers: str) -> httpx.Response:
    content = raw.encode() if isinstance(raw, str) else raw
    return await client.post("/v1/jobs", content=content, headers=headers or JSON)


def _nested(levels: int) -> str:
    return "[" * levels + "1" + "]" * levels


def _raw(body: str = "", top: str = "") -> str:
    """A job submission's JSON text with `body` fields and top-level fields added as text."""
    return '{"body": {"model": "m", ' + MESSAGES + body + "}" + top + "}"


@pytest.mark.parametrize(
    ("raw", "param", "says"),
    [
        (  # a lone surrogate: Python's parser takes it, no encoder can write it back
            '{"body": {"model": "m", "messages": [{"role": "user", "content": "\\ud800"}]}}',
            "body.messages.0.content",
            "lone surrogate",
        ),
        (_raw(top=', "custom_id": "a\\udfffb"'), "custom_id", "lone surrogate"),
        (_raw(top=', "metadata": {"\\ud800": 1}'), "metadata", "lone surrogate"),
        (  # the same surrogate sent as raw (invalid) UTF-8 bytes, which json.loads lets pass
            b'{"body": {"model": "m", ' + MESSAGES.encode() + b'}, "custom_id": "\xed\xa0\x80"}',
            "custom_id",
            "lone surrogate",
        ),
        (_raw(', "temperature": Infinity'), "body.temperature", "finite"),
        (_raw(', "x": {"y": [-Infinity]}'), "body.x.y.0", "finite"),
        (_raw(top=', "metadata": {"score": NaN}'), "metadata.score", "finite"),
        (
            _raw(top=', "metadata": {"a": ' + _nested(255) + "}"),
            "metadata.a" + ".0" * (MAX_JSON_DEPTH - 2),  # the request, metadata: 2 levels
            f"at most {MAX_JSON_DEPTH} levels",
        ),
    ],
)
async def test_values_json_cannot_carry_are_422_naming_the_field(
    stack_factory: Any, raw: str | bytes, param: str, says: str
) -> None:
    stack, client = await stack_factory()
    before = await _keys(stack)
    response = await _post_raw(client, raw)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param and error["message"].startswith(f"{param}: ")
    assert says in error["message"]
    assert await _keys(stack) == before


async def test_nesting_up_to_the_limit_is_accepted(stack_factory: Any) -> None:
    _, client = await stack_factory()
    # the request object, `metadata` and `a`'s lists: MAX_JSON_DEPTH levels in all
    deepest = _nested(MAX_JSON_DEPTH - 2)
    ok = await _post_raw(client, _raw(top=', "metadata": {"a": ' + deepest + "}"))
    assert ok.status_code == 202, ok.text
    assert ok.json()["metadata"] == {"a": json.loads(deepest)}
    deeper = _nested(MAX_JSON_DEPTH - 1)
    too_deep = await _post_raw(client, _raw(top=', "metadata": {"a": ' + deeper + "}"))
    assert too_deep.status_code == 422


async def test_non_ascii_text_is_kept(stack_factory: Any) -> None:
    _, client = await stack_factory()
    text = "月之暗面 🌙 \u00e9"
    response = await client.post("/v1/jobs", json={**chat(text), "custom_id": text})
    assert response.status_code == 202
    job = (await client.get(f"/v1/jobs/{response.json()['id']}")).json()
    assert job["custom_id"] == text


WHOLE = "The request must be a JSON object with a `body` field"


@pytest.mark.parametrize(
    ("raw", "headers"),
    [
        (b"[1, 2]", JSON),
        (b'"hello"', JSON),
        (b"", JSON),
        (b'{"body": {"model": "m"}}', {"content-type": "text/plain"}),
        (b'{"body": {"model": "m"}}', {}),
    ],
)
async def test_a_request_that_is_not_a_json_object_says_so(
    stack_factory: Any, raw: bytes, headers: dict[str, str]
) -> None:
    _, client = await stack_factory()
    response = await client.post("/v1/jobs", content=raw, headers=headers)
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["message"].startswith(WHOLE) and "Input should be" not in error["message"]
    if raw.startswith(b"{"):  # valid JSON, wrong content type: say which one to send
        assert "Content-Type: application/json" in error["message"]


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/v1/batches", '{"input_file_id": ..., "endpoint": "/v1/chat/completions"'),
        ("/v1/tokenizers/estimate-token-count", '{"model": ..., "messages": [...]}'),
        ("/v1/chat/completions", '{"model": ..., "messages": [...]}'),
    ],
)
@pytest.mark.parametrize("raw", [b"[]", b"null"])
async def test_a_route_that_is_not_sent_a_json_object_says_what_it_takes(
    stack_factory: Any, path: str, expected: str, raw: bytes
) -> None:
    """Each route's advice is its own: none asks for a job submission's `body` field."""
    _, client = await stack_factory()
    response = await client.post(path, content=raw, headers=JSON)
    assert response.status_code in (400, 422), response.text
    message = response.json()["error"]["message"]
    assert expected in message and "`body`" not in message


async def test_an_unwrapped_chat_request_gets_a_hint(stack_factory: Any) -> None:
    stack, client = await stack_factory()
    response = await client.post("/v1/jobs", json=chat()["body"])
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["message"].startswith(WHOLE)
    assert '{"body": <your request>}' in error["message"] and error["param"] == "body"
    assert await _keys(stack) == []


@pytest.mark.parametrize(
    ("raw", "says"),
    [
        (b'{"body":\n  {"model": ', "Expecting value at line 2, column 13 (char 21)"),
        (b'{"body": {"model": "m",}}', "line 1, column 24 (char 23)"),
        (b'{"body": {"model": "\xff"}}', "not valid UTF-8"),
        (b'{"body": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nest deeper than"),
        (b'{"body": {"model": "m", "n": ' + b"9" * 5000 + b"}}", "a number has more than"),
    ],
)
async def test_malformed_json_says_where(stack_factory: Any, raw: bytes, says: str) -> None:
    stack, client = await stack_factory()
    response = await _post_raw(client, raw)
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["message"].startswith("Malformed JSON body: ") and says in error["message"]
    assert await _keys(stack) == []


async def test_a_request_over_the_whole_tpm_budget_is_refused(stack_factory: Any) -> None:
    stack, client = await stack_factory(MOONQ_UPSTREAM_TPM=1000)
    payload = chat("x" * 4000)
    estimate = estimate_tokens(payload["body"])
    assert estimate > 1000
    response = await client.post("/v1/jobs", json=payload)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == "body"
    assert "MOONQ_UPSTREAM_TPM" in error["message"]
    assert f"{estimate} tokens" in error["message"] and "(1000 tokens" in error["message"]
    assert await _keys(stack) == []


async def test_an_absurd_max_tokens_is_refused_with_a_short_message(stack_factory: Any) -> None:
    _, client = await stack_factory(MOONQ_UPSTREAM_TPM=1000)
    response = await client.post("/v1/jobs", json=chat("hi", max_tokens=10**4000))
    assert response.status_code == 400
    assert "more than 10^15 tokens" in response.json()["error"]["message"]
    assert len(response.text) < 400


async def test_a_request_of_exactly_the_tpm_budget_is_queued(stack_factory: Any) -> None:
    _, client = await stack_factory(MOONQ_UPSTREAM_TPM=1000)
    prompt = estimate_tokens(chat("hi")["body"])
    payload = chat("hi", max_tokens=1000 - prompt)
    assert estimate_tokens(payload["body"]) == 1000
    assert (await client.post("/v1/jobs", json=payload)).status_code == 202
    over = chat("hi", max_tokens=1001 - prompt)
    assert (await client.post("/v1/jobs", json=over)).status_code == 400


async def test_no_tpm_limit_means_no_refusal(stack_factory: Any) -> None:
    _, client = await stack_factory(MOONQ_UPSTREAM_TPM=0)
    response = await client.post("/v1/jobs", json=chat("x", max_tokens=10_000_000))
    assert response.status_code == 202


@pytest.mark.parametrize(
    "path",
    ["/v1/jobs/" + "j" * 10_000, "/v1/jobs/%ff%fe", "/v1/jobs/%00", "/v1/jobs/job_%ed%a0%80"],
)
async def test_odd_job_ids_are_404_with_a_short_message(stack_factory: Any, path: str) -> None:
    _, client = await stack_factory()
    for suffix, method in (("", "GET"), ("/events", "GET"), ("/cancel", "POST")):
        response = await client.request(method, path + suffix)
        assert response.status_code == 404
        assert len(response.json()["error"]["message"]) < 120


async def test_odd_idempotency_keys_work_or_are_refused(stack_factory: Any) -> None:
    _, client = await stack_factory()
    key = "résumé-✓".encode()
    first = await client.post("/v1/jobs", json=chat(), headers={"Idempotency-Key": key})
    again = await client.post("/v1/jobs", json=chat(), headers={"Idempotency-Key": key})
    assert first.status_code == 202 and again.status_code == 202
    assert again.json()["id"] == first.json()["id"]
    assert again.headers["idempotent-replayed"] == "true"
    long = await client.post("/v1/jobs", json=chat(), headers={"Idempotency-Key": "k" * 256})
    assert long.status_code == 422 and long.json()["error"]["param"] == "idempotency-key"


async def test_a_long_custom_id_is_422(stack_factory: Any) -> None:
    _, client = await stack_factory()
    response = await client.post("/v1/jobs", json={**chat(), "custom_id": "c" * 513})
    assert response.status_code == 422 and response.json()["error"]["param"] == "custom_id"
    ok = await client.post("/v1/jobs", json={**chat(), "custom_id": "c" * 512})
    assert ok.status_code == 202
