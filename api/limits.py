"""Request bodies over `MOONQ_MAX_BODY_BYTES` (file uploads: over `MOONQ_MAX_FILE_BYTES`) get a
413 and are never held in memory."""

from __future__ import annotations

from collections.abc import Mapping

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
    at the limit (the 413 then comes from the app's error handler). `paths` gives some paths a
    limit of their own: `{path: (max bytes, the 413's message)}`."""

    def __init__(
        self, app: ASGIApp, max_bytes: int, paths: Mapping[str, tuple[int, str]] | None = None
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.paths = dict(paths or {})

    def _limit(self, scope: Scope) -> tuple[int, str]:
        default = f"The request body is larger than {self.max_bytes} bytes (MOONQ_MAX_BODY_BYTES)."
        return self.paths.get(scope["path"], (self.max_bytes, default))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        max_bytes, limit_message = self._limit(scope)
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > max_bytes:
            await _drain(receive, DRAIN_LIMIT)
            await error_response(413, limit_message)(scope, receive, send)
            return
        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > max_bytes:
                    if message.get("more_body", False):
                        await _drain(receive, DRAIN_LIMIT)
                    raise APIError(413, limit_message)
            return message

        await self.app(scope, counting_receive, send)
