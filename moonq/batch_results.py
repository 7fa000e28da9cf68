"""The results file of `moonq batch run` (one JSONL line per finished document, appended as it
finishes) and its state file (the batch still running), which together make a re-run resume.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

JSON = dict[str, Any]
TERMINAL = frozenset({"failed", "completed", "expired", "cancelled"})


def state_path(out: Path) -> Path:
    return out.with_name(out.name + ".moonq.json")


def answer_text(completion: Any) -> str | None:
    """The answer of a chat.completion object."""
    try:
        content = completion["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        return None
    return content if isinstance(content, str) else None


def record(custom_id: str, path: str, status: str, batch_id: str | None, **values: Any) -> JSON:
    """One line of the results file; `values` may set content, usage and error."""
    return {
        "custom_id": custom_id,
        "path": path,
        "status": status,
        "content": values.get("content"),
        "usage": values.get("usage"),
        "error": values.get("error"),
        "batch_id": batch_id,
    }


def from_job(job: JSON, custom_id: str, path: str, batch_id: str) -> JSON:
    """A finished job (GET /v1/jobs/{id}) as a results line."""
    result = job.get("result")
    usage = job.get("usage") or (result or {}).get("usage")
    content = answer_text(result)
    return record(
        custom_id,
        path,
        job["status"],
        batch_id,
        content=content,
        usage=usage,
        error=job.get("error"),
    )


def from_output(line: JSON, path: str, batch_id: str) -> JSON:
    """A line of a batch's output or error file as a results line."""
    response = line.get("response") or {}
    completion = response.get("body") if isinstance(response, dict) else None
    error = line.get("error")
    ok = error is None and isinstance(completion, dict) and completion.get("choices")
    cancelled = isinstance(error, dict) and error.get("code") == "cancelled"
    return record(
        line["custom_id"],
        path,
        "completed" if ok else "cancelled" if cancelled else "failed",
        batch_id,
        content=answer_text(completion) if ok else None,
        usage=(completion or {}).get("usage") if isinstance(completion, dict) else None,
        error=None if ok else error or {"message": "no answer in the output line"},
    )


@dataclass
class Results:
    """The results file: read once at start, appended to line by line, flushed each time."""

    path: Path
    latest: dict[str, JSON] = field(default_factory=dict)  # by custom_id; the last line wins
    seen: set[tuple[str | None, str]] = field(default_factory=set)  # (batch_id, custom_id)
    torn: bool = False  # the last line has no newline: an earlier run was killed mid-write

    @classmethod
    def load(cls, path: Path) -> Results:
        results = cls(path)
        if not path.exists():
            return results
        raw = path.read_bytes()
        results.torn = bool(raw) and not raw.endswith(b"\n")
        # "\n" only, as `append` writes: str.splitlines() would also cut at U+2028, U+2029 and
        # U+0085, which json.dumps(ensure_ascii=False) leaves unescaped inside an answer.
        for line in raw.decode("utf-8", errors="replace").split("\n"):
            try:
                entry = json.loads(line)
            except ValueError:
                continue  # a torn line: its document is simply not done
            if isinstance(entry, dict) and isinstance(entry.get("custom_id"), str):
                results.remember(entry)
        return results

    def remember(self, entry: JSON) -> None:
        self.latest[entry["custom_id"]] = entry
        self.seen.add((entry.get("batch_id"), entry["custom_id"]))

    def completed(self) -> set[str]:
        return {cid for cid, entry in self.latest.items() if entry.get("status") == "completed"}

    def has(self, batch_id: str | None, custom_id: str) -> bool:
        return (batch_id, custom_id) in self.seen

    def append(self, entry: JSON) -> None:
        line = json.dumps(entry, ensure_ascii=False) + "\n"
        with self.path.open("a", encoding="utf-8", newline="\n") as handle:
            handle.write(("\n" if self.torn else "") + line)
            handle.flush()
        self.torn = False
        self.remember(entry)


@dataclass
class State:
    """The batch a run started, with the path of each of its documents, until it is over."""

    path: Path

    def load(self) -> JSON | None:
        try:
            state = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(state, dict) or not isinstance(state.get("batch_id"), str):
            return None
        return state

    def save(self, batch_id: str, documents: dict[str, str]) -> None:
        """Written whole, then moved in place, so a kill never leaves half of it."""
        temporary = self.path.with_name(self.path.name + ".tmp")
        temporary.write_text(json.dumps({"batch_id": batch_id, "documents": documents}))
        os.replace(temporary, self.path)

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)
