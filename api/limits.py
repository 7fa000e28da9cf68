"""Request bodies over `MOONQ_MAX_BODY_BYTES` get a 413 and are never held in memory."""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import APIError, error_response

# How much of a too-large body is read (and thrown away) before answering: a client that is
# still sending when the server answers and closes sees a reset, not the 413.
DRAIN_LIMIT = 64 * 1024 * 1024


async def _drain(receive: Receive, budget: int) -> None:
    while budget > 0:
        message = await receive()
        if message["type"] != "http.request":
            return
        budget -= len(message.get("body", b""))
        if not message.get("more_body", False):
            return


class BodyLimit:
    """Pure ASGI: a too-large Content-Length is refused up front, a chunked body is stopped
    at the limit (the 413 then comes from the app's error handler)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _error(self) -> APIError:
        message = f"The request body is larger than {self.max_bytes} bytes (MOONQ_MAX_BODY_BYTES)."
        return APIError(413, message)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await _drain(receive, DRAIN_LIMIT)
            error = self._error()
            response = error_response(413, str(error.detail), error.type)
            await response(scope, receive, send)
            return
        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    if message.get("more_body", False):
                        await _drain(receive, DRAIN_LIMIT)
                    raise self._error()
            return message

        await self.app(scope, counting_receive, send)
