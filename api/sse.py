"""sse-starlette's response, without its per-event cost where it buys nothing."""

from __future__ import annotations

from sse_starlette import EventSourceResponse
from starlette.types import Message, Send


class EventStream(EventSourceResponse):
    """An `EventSourceResponse` that, without a `send_timeout`, sends each event as is:
    sse-starlette wraps every send in an anyio cancel scope, a timeout of none included,
    which cost ~5% of the API's CPU in a streaming profile. With a timeout it is unchanged."""

    async def _send_with_timeout(self, send: Send, message: Message) -> None:
        if self.send_timeout is None:
            await send(message)
        else:
            await super()._send_with_timeout(send, message)
