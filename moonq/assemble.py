"""Build the final `chat.completion` from streamed chunks, as the non-streaming call returns it.

Tolerant by design: Moonshot puts `usage` in `choices[0].usage` of the last chunk, OpenAI-style
upstreams put it top-level; a captured Moonshot stream even sent `"delta": []`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

_TEXT_FIELDS = ("content", "reasoning_content", "refusal")


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


@dataclass
class _ToolCall:
    id: str | None = None
    type: str | None = None
    name: str | None = None
    arguments: str = ""

    def add(self, delta: dict[str, Any]) -> None:
        self.id = self.id or _str(delta.get("id"))
        self.type = self.type or _str(delta.get("type"))
        function = delta.get("function") or {}
        if isinstance(function, dict):
            name, arguments = function.get("name"), function.get("arguments")
            self.name = self.name or (name if isinstance(name, str) else None)
            self.arguments += arguments if isinstance(arguments, str) else ""

    def dump(self, index: int) -> dict[str, Any]:
        # Moonshot's non-streaming answer keeps each call's `index`; so do we.
        return {
            "index": index,
            "id": self.id,
            "type": self.type or "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


@dataclass
class _Choice:
    index: int
    role: str = "assistant"
    text: dict[str, str] = field(default_factory=dict)
    tool_calls: dict[int, _ToolCall] = field(default_factory=dict)
    finish_reason: str | None = None
    logprobs: list[Any] | None = None

    def add(self, choice: dict[str, Any]) -> None:
        delta = choice.get("delta")
        if isinstance(delta, dict):
            self._add_delta(delta)
        if isinstance(choice.get("finish_reason"), str):
            self.finish_reason = choice["finish_reason"]
        logprobs = choice.get("logprobs")
        if isinstance(logprobs, dict) and isinstance(logprobs.get("content"), list):
            self.logprobs = (self.logprobs or []) + logprobs["content"]

    def _add_delta(self, delta: dict[str, Any]) -> None:
        if isinstance(delta.get("role"), str):
            self.role = delta["role"]
        for name in _TEXT_FIELDS:
            if isinstance(delta.get(name), str):
                self.text[name] = self.text.get(name, "") + delta[name]
        calls = delta.get("tool_calls")
        for call in calls if isinstance(calls, list) else ():
            if isinstance(call, dict):
                index = _index(call.get("index"), default=len(self.tool_calls))
                self.tool_calls.setdefault(index, _ToolCall()).add(call)

    def dump(self) -> dict[str, Any]:
        message: dict[str, Any] = {"role": self.role, "content": self.text.get("content")}
        message.update({k: v for k, v in self.text.items() if k != "content"})
        if self.tool_calls:
            message["tool_calls"] = [self.tool_calls[i].dump(i) for i in sorted(self.tool_calls)]
        out: dict[str, Any] = {
            "index": self.index,
            "message": message,
            "finish_reason": self.finish_reason,
        }
        if self.logprobs is not None:
            out["logprobs"] = {"content": self.logprobs}
        return out


def _index(value: Any, default: int) -> int:
    """An upstream's `index`, or `default` when it sent something else (null, a string)."""
    return value if isinstance(value, int) and not isinstance(value, bool) else default


class Assembler:
    """Feed it every chunk in order; `result()` is the equivalent `chat.completion`."""

    def __init__(self) -> None:
        self._meta: dict[str, Any] = {}
        self._choices: dict[int, _Choice] = {}
        self.usage: dict[str, Any] | None = None
        self.chunks = 0

    def add(self, chunk: dict[str, Any]) -> None:
        self.chunks += 1
        for name in ("id", "created", "model", "system_fingerprint"):
            if chunk.get(name) is not None:
                self._meta.setdefault(name, chunk[name])
        if isinstance(chunk.get("usage"), dict):
            self.usage = chunk["usage"]
        choices = chunk.get("choices")
        for choice in choices if isinstance(choices, list) else ():
            if not isinstance(choice, dict):
                continue
            index = _index(choice.get("index"), default=0)
            self._choices.setdefault(index, _Choice(index)).add(choice)
            if isinstance(choice.get("usage"), dict):
                self.usage = choice["usage"]

    def result(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self._meta.get("id"),
            "object": "chat.completion",
            "created": self._meta.get("created"),
            "model": self._meta.get("model"),
            "choices": [self._choices[i].dump() for i in sorted(self._choices)],
            "usage": self.usage,
        }
        if "system_fingerprint" in self._meta:
            out["system_fingerprint"] = self._meta["system_fingerprint"]
        return out
