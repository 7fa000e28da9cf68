"""A batch's output and error files, produced from its jobs as they are read: every line over
so far, in the input file's order, in OpenAI's format, a chunk of jobs at a time."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from redis.asyncio import Redis

from moonq.keys import Keys
from moonq.models import Status
from moonq.serde import dumps

CHUNK = 500
_CANCELLED = "the request was cancelled before it ended"


async def line_ids(redis: Redis, keys: Keys, batch_id: str, start: int) -> list[str]:
    """The ids of the batch's jobs from line `start` (0-based), CHUNK of them at most."""
    rows = await redis.lrange(keys.batch_lines(batch_id), start, start + CHUNK - 1)  # type: ignore[misc]
    return [row.decode() for row in rows]


async def results(redis: Redis, keys: Keys, batch_id: str, kind: str) -> AsyncIterator[bytes]:
    """The output (`output`) or error (`errors`) file's bytes, a chunk of lines at a time."""
    start = 0
    while True:
        ids = await line_ids(redis, keys, batch_id, start)
        if not ids:
            return
        start += len(ids)
        async with redis.pipeline(transaction=False) as pipe:
            for job_id in ids:
                pipe.hmget(keys.job(job_id), ["status", "custom_id", "result", "error"])
            rows = await pipe.execute()
        out = [result_line(job_id, row, kind) for job_id, row in zip(ids, rows, strict=True)]
        text = "".join(line for line in out if line)
        if text:
            yield text.encode()


def result_line(job_id: str, row: list[bytes | None], kind: str) -> str:
    """One line of the output or error file ('' when it belongs to the other file, or the
    job is not over)."""
    status, custom_id, result, error = (v.decode() if v is not None else None for v in row)
    response: dict[str, Any] | None = None
    failure: dict[str, Any] | None = None
    if status == Status.COMPLETED.value and kind == "output":
        response = {"status_code": 200, "request_id": job_id, "body": json.loads(result or "{}")}
    elif status in ("failed", "cancelled") and kind == "errors":
        info = json.loads(error) if error else {"type": "cancelled", "message": _CANCELLED}
        if info.get("status_code"):
            body = {"error": {"message": info.get("message"), "type": info.get("type")}}
            response = {"status_code": info["status_code"], "request_id": job_id, "body": body}
        failure = {"code": info.get("type"), "message": info.get("message")}
    else:
        return ""
    line = {"id": f"batch_req_{job_id[4:]}", "custom_id": custom_id}
    return dumps({**line, "response": response, "error": failure}) + "\n"
