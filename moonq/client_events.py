"""Following an event stream (a job's or a batch's SSE) through dropped connections.

`Resume` is the whole policy, without I/O, so the synchronous and asynchronous clients follow
streams alike: reconnect after the last event seen with `Last-Event-ID` (the server replays
from there), skip anything at or before it, back off between tries, give up after a bounded
number of failed tries in a row, and stop at the terminal event or a 204 (the server's word that
nothing follows).
"""

from __future__ import annotations

from typing import Any

import httpx
from httpx_sse import ServerSentEvent
from pydantic import BaseModel, ConfigDict, ValidationError

from moonq.client_errors import InvalidResponse, StreamDropped, api_error, reason, redirected
from moonq.models import TERMINAL_EVENTS

# Answers to a reconnection worth another try: the server is restarting or its store is down.
RETRY_STATUSES = frozenset({502, 503, 504})
MAX_BACKOFF = 8.0
MAX_DOUBLINGS = 16  # past this the backoff is long since MAX_BACKOFF (2**1024 is no float)


class Event(BaseModel):
    """One event: `seq` (its SSE `id:`), `event` (`chunk`, `retry`, `done`, `error`,
    `cancelled`, and `trimmed` in place of events the job's log no longer has; a batch's are
    `line` and `done`) and its `data`."""

    model_config = ConfigDict(extra="allow")
    seq: int
    event: str
    data: Any = None
    attempt: int | None = None

    @property
    def terminal(self) -> bool:
        """Nothing follows this event."""
        return self.event in TERMINAL_EVENTS

    @property
    def delta(self) -> dict[str, Any]:
        """A `chunk`'s first choice's delta (`content`, `reasoning_content`, `tool_calls`...);
        {} for other events, and for Moonshot's `"delta": []`."""
        choices = self.data.get("choices") if isinstance(self.data, dict) else None
        first = choices[0] if isinstance(choices, list) and choices else None
        delta = first.get("delta") if isinstance(first, dict) else None
        return delta if self.event == "chunk" and isinstance(delta, dict) else {}


class Dropped(Exception):
    """The stream broke off before its terminal event (internal: it is retried)."""


class Resume:
    """Where a followed stream is, and whether and when to reconnect."""

    def __init__(self, url: str, what: str, after: int, tries: int, backoff: float) -> None:
        self.url = url
        self.what = what  # for messages: "job job_…", "batch batch_…"
        self.last: int | None = after if after > 0 else None
        self.tries = tries
        self.backoff = backoff
        self.failures = 0
        self.connected = False
        self.ended = False

    def headers(self) -> dict[str, str]:
        return {"Last-Event-ID": str(self.last)} if self.last else {}

    def opened(self, response: httpx.Response) -> None:
        """Check the answer to a (re)connection; an error's body must have been read."""
        status = response.status_code
        if status == 204:  # at the end of a job that has ended: nothing more
            self.ended = True
        elif status in RETRY_STATUSES and self.connected:
            raise Dropped(str(api_error(response)))
        elif status >= 400:
            raise api_error(response)
        elif status >= 300:  # followed, it would send the key on to wherever it points
            raise redirected(response, self.url)
        elif "text/event-stream" not in response.headers.get("content-type", ""):
            raise InvalidResponse(f"the events of {self.what} did not come as an event stream")
        self.connected = True

    def take(self, sse: ServerSentEvent) -> Event | None:
        """The event to hand on; None for one already handed on, or a comment."""
        if sse.event == "stream_error":  # the server lost its store mid-stream
            raise Dropped(sse.data)
        if not sse.data:
            return None
        try:
            event = Event.model_validate_json(sse.data)
        except ValidationError as exc:
            raise InvalidResponse(f"an event of {self.what} is not an event: {exc}") from exc
        if self.last is not None and event.seq <= self.last:
            return None
        self.last, self.failures, self.ended = event.seq, 0, event.terminal
        return event

    def closed(self) -> None:
        """The server closed the stream; only the terminal event may end it."""
        if not self.ended:
            raise Dropped("the stream closed before the last event")

    def retry_in(self, cause: Exception) -> float | None:
        """Seconds before reconnecting after `cause`. None when the stream never opened: the
        server is not there, and the caller raises `cause`'s own error. `StreamDropped` when
        the tries are spent."""
        if not self.connected:
            return None
        self.failures += 1
        if self.failures > self.tries:
            where = f" after event {self.last}" if self.last else ""
            raise StreamDropped(
                self.url,
                f"the event stream of {self.what} broke off{where}, and "
                f"{self.tries} reconnections failed: {reason(cause)}",
            ) from cause
        doublings = min(self.failures - 1, MAX_DOUBLINGS)
        return float(min(self.backoff * 2**doublings, MAX_BACKOFF))
