"""An in-memory moonq server (files, batches, their events, jobs, the token estimate) behind an
`httpx.MockTransport`, for testing `moonq batch` without Redis or processes.

It follows the contract the real routes keep; lines finish when the event stream is read (all of
them), or one per `GET /v1/batches/{id}` when the event stream is turned off.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

import httpx

JSON = dict[str, Any]
TERMINAL = ("completed", "failed", "cancelled", "expired")


def multipart(request: httpx.Request) -> dict[str, tuple[str | None, bytes]]:
    """name → (filename, bytes) of a multipart/form-data body."""
    boundary = request.headers["content-type"].split("boundary=", 1)[1].encode()
    parts: dict[str, tuple[str | None, bytes]] = {}
    for chunk in request.content.split(b"--" + boundary)[1:-1]:
        head, _, data = chunk.strip(b"\r\n").partition(b"\r\n\r\n")
        name = re.search(rb'name="([^"]*)"', head)
        filename = re.search(rb'filename="([^"]*)"', head)
        assert name is not None
        parts[name[1].decode()] = (filename[1].decode() if filename else None, data)
    return parts


def answer(body: JSON) -> str:
    """The fake's answer: the prompt, and the start of the document it was asked about."""
    messages = body["messages"]
    return f"{messages[-1]['content']} <- {messages[-2]['content'][:40]}"


@dataclass
class Line:
    number: int
    custom_id: str
    body: JSON
    job_id: str
    status: str = "queued"


@dataclass
class FakeMoonq:
    key: str | None = None
    estimate: bool = True  # a tokenizer endpoint
    events: bool = True  # an event stream; without it, each GET of a batch finishes a line
    drop_after: int | None = None  # the first event stream breaks off after this many events
    fail: set[str] = field(default_factory=set)  # custom_ids whose lines fail
    files: dict[str, tuple[str, str, bytes]] = field(default_factory=dict)  # name, purpose, data
    batches: dict[str, JSON] = field(default_factory=dict)
    lines: dict[str, list[Line]] = field(default_factory=dict)
    log: list[tuple[str, str]] = field(default_factory=list)
    streams: list[str | None] = field(default_factory=list)  # Last-Event-ID of each stream
    seq: dict[str, list[JSON]] = field(default_factory=dict)  # each batch's events

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handle)

    def calls(self, method: str, path_start: str) -> int:
        return sum(1 for m, p in self.log if m == method and p.startswith(path_start))

    # Routing

    def handle(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        self.log.append((request.method, path))
        if self.key and request.headers.get("authorization") != f"Bearer {self.key}":
            return error(401, "bad key")
        for (method, pattern), handler in ROUTES.items():
            match = re.fullmatch(pattern, path)
            if match and method == request.method:
                response: httpx.Response = handler(self, request, *match.groups())
                return response
        return error(404, f"no route {path}")

    def upload(self, request: httpx.Request) -> httpx.Response:
        parts = multipart(request)
        filename, data = parts["file"]
        purpose = parts["purpose"][1].decode()
        file_id = f"file-{len(self.files) + 1}"
        self.files[file_id] = (filename or "upload", purpose, data)
        return httpx.Response(200, json={"id": file_id, "object": "file", "purpose": purpose})

    def content(self, request: httpx.Request, file_id: str) -> httpx.Response:
        output = re.fullmatch(r"file-(batch_\d+)-(output|errors)", file_id)
        if output:
            return httpx.Response(200, content=self.output(*output.groups()).encode())
        if file_id not in self.files:
            return error(404, "no such file")
        name, purpose, data = self.files[file_id]
        if purpose == "file-extract":
            text = f"extracted {name}: {data.decode(errors='replace')}"
            return httpx.Response(200, json={"content": text, "file_type": "application/pdf"})
        return httpx.Response(200, content=data)

    def delete(self, request: httpx.Request, file_id: str) -> httpx.Response:
        if self.files.pop(file_id, None) is None:
            return error(404, "no such file")
        return httpx.Response(200, json={"id": file_id, "deleted": True})

    def create(self, request: httpx.Request) -> httpx.Response:
        payload = json.loads(request.content)
        if payload["input_file_id"] not in self.files:
            return error(404, "no such file")
        data = self.files[payload["input_file_id"]][2].decode()
        batch = self.new_batch(data, payload.get("metadata") or {})
        return httpx.Response(200, json=batch)

    def new_batch(self, jsonl: str, metadata: JSON | None = None) -> JSON:
        """A batch of these lines, validated as the real server does: any bad line fails it."""
        batch_id = f"batch_{len(self.batches) + 1}"
        lines, errors = parse(jsonl, batch_id)
        batch: JSON = {
            "id": batch_id,
            "object": "batch",
            "status": "failed" if errors else "in_progress",
            "metadata": metadata,
            "created_at": 1_767_225_600,
            "output_file_id": None if errors else f"file-{batch_id}-output",
            "error_file_id": None if errors else f"file-{batch_id}-errors",
            "errors": {"object": "list", "data": errors} if errors else None,
        }
        self.batches[batch_id] = batch
        self.lines[batch_id] = [] if errors else lines
        self.seq[batch_id] = []
        return self.show(batch_id)

    def show(self, batch_id: str) -> JSON:
        lines = self.lines[batch_id]
        counts = {s: sum(line.status == s for line in lines) for s in TERMINAL}
        usage = sum(20 for line in lines if line.status == "completed")
        shown = {
            **self.batches[batch_id],
            "request_counts": {"total": len(lines), **counts},
            "usage": {"prompt_tokens": usage // 2, "completion_tokens": usage // 2},
        }
        errors = counts["failed"] + counts["cancelled"] + counts["expired"]
        if shown["status"] in TERMINAL and not errors:  # as the server: no error file then
            shown["error_file_id"] = None
        return shown

    def get(self, request: httpx.Request, batch_id: str) -> httpx.Response:
        if batch_id not in self.batches:
            return error(404, f"No batch with id {batch_id!r}.")
        if not self.events:
            self.finish(batch_id, 1)
        return httpx.Response(200, json=self.show(batch_id))

    def cancel(self, request: httpx.Request, batch_id: str) -> httpx.Response:
        if batch_id not in self.batches:
            return error(404, "no such batch")
        for line in self.lines[batch_id]:
            if line.status == "queued":
                line.status = "cancelled"
        self.batches[batch_id]["status"] = "cancelled"
        return httpx.Response(200, json=self.show(batch_id))

    def stream(self, request: httpx.Request, batch_id: str) -> httpx.Response:
        if not self.events or batch_id not in self.batches:
            return error(404, "no events")
        last = request.headers.get("last-event-id")
        self.streams.append(last)
        self.finish(batch_id, len(self.lines[batch_id]))
        events = [e for e in self.seq[batch_id] if e["seq"] > int(last or 0)]
        if self.drop_after is not None and len(self.streams) == 1:
            events = events[: self.drop_after]
        text = "".join(f"id: {e['seq']}\ndata: {json.dumps(e)}\n\n" for e in events)
        return httpx.Response(200, text=text, headers={"content-type": "text/event-stream"})

    def job(self, request: httpx.Request, job_id: str) -> httpx.Response:
        for lines in self.lines.values():
            for line in lines:
                if line.job_id == job_id:
                    return httpx.Response(200, json=job(line))
        return error(404, "no such job")

    def tokens(self, request: httpx.Request) -> httpx.Response:
        if not self.estimate:
            return error(404, "Not Found")
        messages = json.loads(request.content)["messages"]
        total = sum(len(m["content"]) for m in messages) // 4 + 1
        return httpx.Response(200, json={"data": {"total_tokens": total}, "source": "upstream"})

    # The batch running

    def finish(self, batch_id: str, count: int) -> None:
        """The next `count` lines end; the batch completes after its last."""
        batch = self.batches[batch_id]
        for line in [ln for ln in self.lines[batch_id] if ln.status == "queued"][:count]:
            line.status = "failed" if line.custom_id in self.fail else "completed"
            data = {"custom_id": line.custom_id, "job_id": line.job_id, "status": line.status}
            counts = self.show(batch_id)["request_counts"]
            self.event(batch_id, "line", {**data, "request_counts": counts})
        over = all(line.status != "queued" for line in self.lines[batch_id])
        if over and batch["status"] == "in_progress":
            batch["status"] = "completed"
            self.event(batch_id, "done", self.show(batch_id))

    def event(self, batch_id: str, kind: str, data: JSON) -> None:
        log = self.seq[batch_id]
        log.append({"seq": len(log) + 1, "event": kind, "data": data})

    def output(self, batch_id: str, kind: str) -> str:
        out = []
        for line in self.lines[batch_id]:
            if line.status == "completed" and kind == "output":
                response = {"status_code": 200, "request_id": line.job_id, "body": result(line)}
                out.append({"id": line.job_id, "custom_id": line.custom_id, "response": response})
            elif line.status in ("failed", "cancelled") and kind == "errors":
                code = "cancelled" if line.status == "cancelled" else "server_error"
                failure = {"code": code, "message": f"{line.custom_id} {line.status}"}
                out.append({"id": line.job_id, "custom_id": line.custom_id, "error": failure})
        return "".join(json.dumps({"response": None, "error": None, **o}) + "\n" for o in out)


def parse(jsonl: str, batch_id: str) -> tuple[list[Line], list[JSON]]:
    lines: list[Line] = []
    errors: list[JSON] = []
    # "\n" only, as the real server (moonq/file_lines.py): not str.splitlines()
    for number, text in enumerate(jsonl.split("\n"), 1):
        if not text.strip():
            continue  # blank lines are not requests
        try:
            entry = json.loads(text)
            body = entry["body"]
            assert isinstance(entry["custom_id"], str) and body["messages"] and body["model"]
        except (ValueError, KeyError, TypeError, AssertionError):
            errors.append({"code": "invalid_request", "line": number, "message": "bad line"})
            continue
        job_id = f"job_{batch_id}_{number}"
        lines.append(Line(number, entry["custom_id"], body, job_id))
    return lines, errors


def result(line: Line) -> JSON:
    message = {"role": "assistant", "content": answer(line.body)}
    usage = {"prompt_tokens": 10, "completion_tokens": 10, "total_tokens": 20}
    return {
        "object": "chat.completion",
        "choices": [{"index": 0, "message": message}],
        "usage": usage,
    }


def job(line: Line) -> JSON:
    done = line.status == "completed"
    failure = {"type": "server_error", "message": "upstream failed"}
    return {
        "id": line.job_id,
        "status": line.status,
        "custom_id": line.custom_id,
        "result": result(line) if done else None,
        "usage": result(line)["usage"] if done else None,
        "error": None if done else failure,
    }


def error(status: int, message: str) -> httpx.Response:
    return httpx.Response(status, json={"error": {"type": "error", "message": message}})


ROUTES: dict[tuple[str, str], Any] = {
    ("POST", "/v1/files"): FakeMoonq.upload,
    ("GET", r"/v1/files/([^/]+)/content"): FakeMoonq.content,
    ("DELETE", r"/v1/files/([^/]+)"): FakeMoonq.delete,
    ("POST", "/v1/batches"): FakeMoonq.create,
    ("GET", r"/v1/batches/([^/]+)"): FakeMoonq.get,
    ("POST", r"/v1/batches/([^/]+)/cancel"): FakeMoonq.cancel,
    ("GET", r"/v1/batches/([^/]+)/events"): FakeMoonq.stream,
    ("GET", r"/v1/jobs/([^/]+)"): FakeMoonq.job,
    ("POST", "/v1/tokenizers/estimate-token-count"): FakeMoonq.tokens,
}
