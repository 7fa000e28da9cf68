"""What OpenAI's answers look like, made from a job's: its chunks without usage (counted once,
at the end), its result as a `chat.completion`, and its error as an OpenAI error object with the
status that makes the OpenAI SDK raise the matching exception class."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fastapi.responses import JSONResponse

from api.errors import error_body, error_response

# Job errors without an upstream status: the status the OpenAI SDK should see.
_STATUS_BY_TYPE = {
    "request_too_large": 400,
    "timeout": 504,
    "job_timeout": 504,
    "cancelled": 409,
    "job_expired": 404,
}


def http_status(error: Mapping[str, Any]) -> int:
    """The status for a job's error: the upstream's where it has one, except a 401, which is
    the server's key refused (a 502: the client's own key is fine, and must not look bad)."""
    status = error.get("status_code")
    if isinstance(status, int) and 400 <= status < 600:
        return 502 if status == 401 else status
    return _STATUS_BY_TYPE.get(str(error.get("type")), 502)


def _message(error: Mapping[str, Any]) -> str:
    message = str(error.get("message") or "The job failed.")
    if error.get("status_code") == 401:
        return f"The upstream refused moonq's own key (MOONSHOT_API_KEY): {message}"
    return message


def _kind(error: Mapping[str, Any]) -> str:
    return str(error.get("type") or "api_error")


def job_error(error: Mapping[str, Any], job_id: str) -> dict[str, Any]:
    """A job's error (`{"type", "message", "status_code"?}`) as an OpenAI error object; `code`
    is the job's error type too, as in a batch's error file."""
    return error_body(_message(error), _kind(error), code=_kind(error), job_id=job_id)


def error_answer(error: Mapping[str, Any], job_id: str, headers: Mapping[str, str]) -> JSONResponse:
    """A job that failed, as an HTTP error. `x-should-retry: false`: moonq has already retried
    what could be retried, and an SDK retry would only run the request again as a new job."""
    return error_response(
        http_status(error),
        _message(error),
        _kind(error),
        {**headers, "x-should-retry": "false"},
        code=_kind(error),
        job_id=job_id,
    )


CANCELLED = {"type": "cancelled", "message": "The job was cancelled before it ended."}


def restarted(job_id: str) -> dict[str, Any]:
    return {
        "type": "job_restarted",
        "message": (
            "The upstream failed after this stream had begun, and moonq runs the job again "
            "from scratch: what this stream sent is superseded. The job's result will be at "
            f"GET /v1/jobs/{job_id} (?wait= long-polls)."
        ),
    }


# Chunks as OpenAI sends them


def openai_chunk(chunk: Any) -> dict[str, Any] | None:
    """The upstream chunk without usage (sent once, at the end) and with Moonshot's
    `"delta": []` as `{}`; None for a chunk that carried nothing but usage."""
    if not isinstance(chunk, dict):
        return None
    choices = chunk.get("choices")
    if not choices and "usage" in chunk:
        return None
    out = {k: v for k, v in chunk.items() if k != "usage"}
    if isinstance(choices, list):
        out["choices"] = [_choice(c) for c in choices]
    return out


def _choice(choice: Any) -> Any:
    if not isinstance(choice, dict):
        return choice
    out = {k: v for k, v in choice.items() if k != "usage"}
    if "delta" in out and not isinstance(out["delta"], dict):
        out["delta"] = {}
    return out


def completion(result: dict[str, Any]) -> dict[str, Any]:
    """The job's result as the `chat.completion`: usage top-level only."""
    choices = result.get("choices")
    out = {**result, "object": "chat.completion"}
    if isinstance(choices, list):
        out["choices"] = [_choice(c) for c in choices]
    return out


def _chunk_head(result: dict[str, Any]) -> dict[str, Any]:
    chunk = {"id": result.get("id"), "object": "chat.completion.chunk"}
    chunk |= {"created": result.get("created"), "model": result.get("model")}
    if "system_fingerprint" in result:
        chunk["system_fingerprint"] = result["system_fingerprint"]
    return chunk


def usage_chunk(result: dict[str, Any]) -> dict[str, Any]:
    """OpenAI's last chunk for `stream_options.include_usage`: no choices, the usage."""
    return {**_chunk_head(result), "choices": [], "usage": result.get("usage")}


def result_chunks(result: dict[str, Any]) -> list[dict[str, Any]]:
    """A completed job's result as stream chunks, one per choice carrying its whole message:
    what a stream sends when the events that made the result are no longer kept."""
    choices = result.get("choices")
    if not isinstance(choices, list):
        return []
    head = _chunk_head(result)
    return [{**head, "choices": [_as_delta(c)]} for c in choices if isinstance(c, dict)]


def _as_delta(choice: dict[str, Any]) -> dict[str, Any]:
    message = choice.get("message")
    delta = dict(message) if isinstance(message, dict) else {}
    calls = delta.get("tool_calls")
    if isinstance(calls, list):  # a streamed tool call names its place in the list
        delta["tool_calls"] = [
            {"index": i, **call} if isinstance(call, dict) else call for i, call in enumerate(calls)
        ]
    out = {"index": choice.get("index", 0), "delta": delta}
    if "logprobs" in choice:
        out["logprobs"] = choice["logprobs"]
    return {**out, "finish_reason": choice.get("finish_reason")}


def trimmed(job_id: str) -> dict[str, Any]:
    return {
        "type": "events_trimmed",
        "message": (
            "Part of this job's answer is no longer in its event log (MOONQ_MAX_EVENTS keeps "
            f"the latest events only): fetch the whole result at GET /v1/jobs/{job_id} "
            "(?wait= long-polls)."
        ),
    }
