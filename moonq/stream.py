"""Reading a job's events: replay the log, then follow the live channel, each event exactly once.

Pub/sub alone is at-most-once (a late or reconnecting subscriber misses what was sent), so every
event is also in the job's log. A reader subscribes first, replays the log, then takes live
events, dropping duplicates by `seq` and filling any gap from the log.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
from collections.abc import AsyncGenerator, AsyncIterator, Coroutine
from dataclasses import dataclass

from redis._parsers.hiredis import NOT_ENOUGH_DATA as _NOT_ENOUGH_DATA
from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import RedisError
from sse_starlette import ServerSentEvent

from moonq.keys import Keys
from moonq.models import TERMINAL, TERMINAL_EVENTS

log = logging.getLogger("moonq.stream")

_HEAD = re.compile(rb'^\{"seq":(\d+),"event":"(\w+)"')
_REPLAY_BATCH = 500
# A batch's statuses after its last event (`expired` is a batch's own); `failed` before any.
TERMINAL_STATUSES = frozenset(status.value for status in TERMINAL) | {"expired"}


@dataclass(frozen=True)
class RawEvent:
    """An event as published: its JSON text is passed on unchanged to SSE clients."""

    seq: int
    event: str
    raw: bytes

    @property
    def terminal(self) -> bool:
        return self.event in TERMINAL_EVENTS

    def sse(self) -> bytes:
        """The event as one Server-Sent Event (`id:` its seq, `data:` its text), encoded as
        sse-starlette encodes one; its text is passed through as is unless it has a line
        break, which must be split over `data:` lines (moonq's own encoder never writes one)."""
        if b"\n" in self.raw or b"\r" in self.raw:
            return ServerSentEvent(data=self.raw.decode(), id=str(self.seq)).encode()
        return b"id: %d\r\ndata: %s\r\n\r\n" % (self.seq, self.raw)

    @classmethod
    def parse(cls, raw: bytes) -> RawEvent:
        match = _HEAD.match(raw)
        if match:
            return cls(int(match[1]), match[2].decode(), raw)
        data = json.loads(raw)  # not written by moonq's own encoder; still an event
        return cls(int(data["seq"]), str(data["event"]), raw)


async def _catch_up(
    redis: Redis, record: str, log_key: str, after: int
) -> tuple[list[RawEvent], bool, bool]:
    """One round trip: up to a page of logged events with seq > after, then the record's state.
    Returns the events, whether the page was full (more may follow), and whether nothing can
    come after them (the record is gone, or over with no event past the page)."""
    async with redis.pipeline(transaction=False) as pipe:
        pipe.xrange(log_key, f"0-{after + 1}", "+", count=_REPLAY_BATCH)
        pipe.hmget(record, ["status", "seq"])
        rows, (status, seq) = await pipe.execute()
    events = [RawEvent.parse(fields[b"e"]) for _, fields in rows]
    last = events[-1].seq if events else after
    over = status is None or (status.decode() in TERMINAL_STATUSES and int(seq or 0) <= last)
    return events, len(rows) == _REPLAY_BATCH, over


async def _buffered(pubsub: PubSub) -> dict[str, object] | None:
    """The next reply already read off the pub/sub connection's socket, if any, as
    `get_message` gives it. `get_message` costs ~16 µs a message (a health check, a retry
    wrapper and a timeout every call, whether or not the reply is at hand), half of it beside
    a relayed chunk's other work in the API; a burst of events read in one socket read is
    taken from redis-py's hiredis reader directly. Without hiredis: None, and `get_message`
    reads each."""
    connection = pubsub.connection
    reader = getattr(getattr(connection, "_parser", None), "_reader", None)
    while reader is not None and connection is not None:
        reply = reader.gets()
        if reply is _NOT_ENOUGH_DATA or reply is False:
            return None
        if isinstance(reply, Exception):  # as redis-py's parser raises it
            raise reply
        if isinstance(reply, list) and len(reply) == 3 and reply[0] == b"message":
            return {"type": "message", "pattern": None, "channel": reply[1], "data": reply[2]}
        if connection.health_check_interval and reply in pubsub.health_check_response:
            continue  # dropped, as get_message drops it
        # (un)subscribe replies: redis-py keeps its count of channels by them
        found: dict[str, object] | None = await pubsub.handle_message(reply)
        if found is not None:
            return found
    return None


async def _next_read(pubsub: PubSub, wait: float) -> dict[str, object] | None:
    """The next reply, read off the socket as soon as it comes within `wait` seconds (None
    after), by the parser itself: `get_message` wraps each wait in a health check, a retry
    wrapper and a reply's parse into a dict, which cost a lone event (one to a socket read, as
    each chunk of a paced stream comes) a quarter of the hub's CPU. Without hiredis, or on a
    connection that hands replies over itself (fakeredis's): None, and `get_message` reads it."""
    connection = pubsub.connection
    parser = getattr(connection, "_parser", None)
    if (
        connection is None
        or getattr(parser, "_reader", None) is None
        or type(connection).read_response is not AbstractConnection.read_response
    ):
        return None
    try:
        async with asyncio.timeout(wait):
            await parser.read_from_socket()
    except TimeoutError:
        return None
    if connection.health_check_interval:  # as `read_response` does: the connection is alive
        loop = asyncio.get_running_loop()
        connection.next_health_check = loop.time() + connection.health_check_interval
    return await _buffered(pubsub)


class EventHub:
    """One pub/sub connection per process, fanned out in-process to every listener.

    Each listener gets a bounded queue; a listener too slow to keep up loses live messages,
    which its reader then takes from the log, so memory stays bounded and nothing is lost.
    """

    def __init__(self, redis: Redis, *, queue_size: int = 1024, retry_delay: float = 0.5):
        self._redis = redis
        self._queue_size = queue_size
        self._retry_delay = retry_delay
        self._pubsub: PubSub | None = None
        self._reader: asyncio.Task[None] | None = None
        self._listeners: dict[bytes, set[asyncio.Queue[bytes]]] = {}
        self._ready: dict[bytes, asyncio.Event] = {}
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()

    @contextlib.asynccontextmanager
    async def listen(
        self, channel: str, confirm_within: float = 5.0
    ) -> AsyncIterator[asyncio.Queue[bytes]]:
        """A queue of the channel's messages from the moment Redis confirms the subscription."""
        name = channel.encode()
        queue: asyncio.Queue[bytes] = asyncio.Queue(self._queue_size)
        listeners, ready = await self._join(name, queue)
        try:
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for swallows a cancel that
            # lands as the wait completes, and a client that went away would listen on.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(confirm_within):
                    await ready.wait()
            yield queue
        finally:
            # Forget the queue at once: a cancelled listener (a client that went away) may be
            # cancelled again at any await below, and must not stay registered.
            listeners.discard(queue)
            if not listeners:
                await asyncio.shield(self._spawn(self._leave(name, listeners)))

    async def _join(
        self, name: bytes, queue: asyncio.Queue[bytes]
    ) -> tuple[set[asyncio.Queue[bytes]], asyncio.Event]:
        """Register the queue, subscribing to the channel if it is new; all or nothing."""
        # Subscribes and unsubscribes go one at a time: redis-py's PubSub would otherwise open
        # a second connection for a concurrent first subscribe, and an unsubscribe could
        # overtake the subscribe of a listener that just arrived.
        async with self._lock:
            listeners = self._listeners.setdefault(name, set())
            if name not in self._ready:
                self._ready[name] = asyncio.Event()
                try:
                    await self._subscribe(name)
                except BaseException:
                    # Cancelled mid-subscribe: undo, so the next listener subscribes afresh
                    # instead of waiting on a subscription that never comes.
                    self._ready.pop(name, None)
                    if not listeners and self._listeners.get(name) is listeners:
                        del self._listeners[name]
                    raise
            listeners.add(queue)
            return listeners, self._ready[name]

    async def _leave(self, name: bytes, listeners: set[asyncio.Queue[bytes]]) -> None:
        async with self._lock:
            if not listeners and self._listeners.get(name) is listeners:
                await self._drop(name)

    def _spawn(self, coro: Coroutine[None, None, None]) -> asyncio.Task[None]:
        """A task that runs to its end even if the caller awaiting it is cancelled."""
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _subscribe(self, name: bytes) -> None:
        if self._pubsub is None:
            self._pubsub = self._redis.pubsub()
        connection = self._pubsub.connection
        if self._reader is not None and not self._reader.done() and connection is not None:
            # The reader task reads this connection, and is its health check: a SUBSCRIBE's
            # own (sent when subscribed to nothing) would read the PING's reply beside it.
            connection.next_health_check = asyncio.get_running_loop().time() + max(
                connection.health_check_interval, 1.0
            )
        try:
            await self._pubsub.subscribe(name)
        except (RedisError, OSError):
            # Readers poll the log meanwhile; the reader task keeps trying to resubscribe.
            log.warning("pub/sub subscribe failed; readers fall back to the log")
            self._reset_pubsub()
            self._ready[name].set()
        if self._reader is None or self._reader.done():
            self._reader = asyncio.create_task(self._read(), name="moonq-event-hub")

    async def _drop(self, name: bytes) -> None:
        del self._listeners[name]
        self._ready.pop(name, None)
        if self._pubsub is not None:
            try:
                await self._pubsub.unsubscribe(name)
            except (RedisError, OSError):
                self._reset_pubsub()

    async def _read(self) -> None:
        while self._listeners:
            pubsub = self._pubsub
            try:
                if pubsub is None or not pubsub.subscribed:
                    async with self._lock:
                        await self._resubscribe()
                    continue
                message = await pubsub.get_message(timeout=1.0)
                while message is not None:
                    self._dispatch(message)
                    message = await _buffered(pubsub)
                    if message is None:
                        message = await _next_read(pubsub, 1.0)
            except (RedisError, OSError):
                log.warning("pub/sub connection lost; resubscribing")
                self._reset_pubsub()
                await asyncio.sleep(self._retry_delay)
                continue

    def _dispatch(self, message: dict[str, object]) -> None:
        channel = message.get("channel")
        if not isinstance(channel, bytes):
            return
        if message.get("type") == "subscribe":
            if channel in self._ready:
                self._ready[channel].set()
            return
        data = message.get("data")
        if message.get("type") != "message" or not isinstance(data, bytes):
            return
        for queue in self._listeners.get(channel, ()):
            with contextlib.suppress(asyncio.QueueFull):
                queue.put_nowait(data)

    async def _resubscribe(self) -> None:
        names = list(self._listeners)
        if not names:
            return
        self._reset_pubsub()
        self._pubsub = self._redis.pubsub()
        for name in names:
            self._ready.setdefault(name, asyncio.Event())
        await self._pubsub.subscribe(*names)

    def _reset_pubsub(self) -> None:
        pubsub, self._pubsub = self._pubsub, None
        if pubsub is not None:
            task = asyncio.ensure_future(pubsub.aclose())  # type: ignore[no-untyped-call]
            task.add_done_callback(lambda t: t.cancelled() or t.exception())

    async def close(self) -> None:
        self._listeners.clear()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, RedisError, OSError):
                await self._reader
        if self._pubsub is not None:
            with contextlib.suppress(RedisError, OSError):
                await self._pubsub.aclose()  # type: ignore[no-untyped-call]
            self._pubsub = None


async def follow(
    redis: Redis, hub: EventHub, keys: Keys, job_id: str, *, after: int = 0, poll: float = 2.0
) -> AsyncIterator[RawEvent]:
    """Every event of the job with seq > after, exactly once and in order, until the terminal one.

    Ends at once when the job is over and `after` is at or past its terminal event (a client
    reconnecting after the end), and early if the job expires.
    """
    async for events in follow_batches(redis, hub, keys, job_id, after=after, poll=poll):
        for event in events:
            yield event


def follow_batches(
    redis: Redis,
    hub: EventHub,
    keys: Keys,
    job_id: str,
    *,
    after: int = 0,
    poll: float = 2.0,
    live: bool = True,
) -> AsyncIterator[list[RawEvent]]:
    """`follow`, a list of consecutive events at a time: those already at hand go together
    (an SSE reader sends them in one write). `live=False` for a job already over: its log
    holds every event, and nothing is listened for."""
    log_key = keys.log(job_id)
    if not live:
        return _logged(redis, keys.job(job_id), log_key, after)
    return follow_record(redis, hub, keys.job(job_id), log_key, keys.channel(job_id), after, poll)


@dataclass
class _LogRead:
    """How a read of the log (`_logged`) ended: at the terminal event, or with nothing more
    to come (the record gone, or over with no event past the last page)."""

    terminal: bool = False
    over: bool = False


async def _logged(
    redis: Redis, record: str, log_key: str, after: int, read: _LogRead | None = None
) -> AsyncGenerator[list[RawEvent], None]:
    """The logged events after `after`, page by page, through the terminal one. Alone, the
    events of a record known to be over (`follow_batches(live=False)`): an ended job's
    terminal event is its log's last, and no event comes after it, so a reconnection or a
    result read as a stream costs no subscription (two pub/sub commands and the hub's lock)."""
    read = read or _LogRead()
    more = True
    while more:
        events, more, read.over = await _catch_up(redis, record, log_key, after)
        events = _through_terminal(events)
        if events:
            after = events[-1].seq
            yield events
            if events[-1].terminal:
                read.terminal = True
                return


async def follow_record(
    redis: Redis,
    hub: EventHub,
    record: str,
    log_key: str,
    channel: str,
    after: int = 0,
    poll: float = 2.0,
) -> AsyncIterator[list[RawEvent]]:
    """`follow_batches` for any record with `status` and `seq` fields, an event log and a
    channel written the same way (a job's, a batch's)."""
    async with hub.listen(channel) as queue:
        idle = _IdleTimer(queue, poll)
        try:
            last = after
            while True:
                read = _LogRead()
                async with contextlib.aclosing(_logged(redis, record, log_key, last, read)) as log:
                    async for events in log:
                        last = events[-1].seq
                        yield events
                if read.terminal or read.over:
                    return
                async for events in _live(queue, last, idle):
                    last = events[-1].seq
                    yield events
                    if events[-1].terminal:
                        return
                # idle for `poll` seconds, or a gap in the live feed: back to the log
        finally:
            idle.cancel()


def trimmed(job_id: str, first: int, last: int) -> RawEvent:
    """What an SSE reader is sent in place of events `first`..`last`, gone from the job's log
    (`MOONQ_MAX_EVENTS` keeps the latest) before it read them. It is neither published nor
    logged; its seq is the last missing event's, so that a reconnection with Last-Event-ID
    resumes after the gap."""
    message = (
        f"Events {first} to {last} of this job are no longer in its event log "
        f"(MOONQ_MAX_EVENTS keeps the latest); its result is whole at GET /v1/jobs/{job_id}."
    )
    data = {"first_seq": first, "last_seq": last, "message": message}
    raw = json.dumps({"seq": last, "event": "trimmed", "data": data}, separators=(",", ":"))
    return RawEvent(last, "trimmed", raw.encode())


def gap_before(job_id: str, events: list[RawEvent], last: int) -> RawEvent | None:
    """The `trimmed` notice for the events between `last` and these, if any are missing: the
    log gives every event after `last` in order unless it was trimmed past them."""
    if events and events[0].seq > last + 1:
        return trimmed(job_id, last + 1, events[0].seq - 1)
    return None


def _through_terminal(events: list[RawEvent]) -> list[RawEvent]:
    for i, event in enumerate(events):
        if event.terminal:
            return events[: i + 1]
    return events


# What `_IdleTimer` puts in a reader's queue; never a message (every event is a JSON object).
_IDLE = b""


class _IdleTimer:
    """Wakes a reader that waits on its queue once it has had nothing for `poll` seconds, by
    putting `_IDLE` in the queue. One timer per reader, re-armed once per `poll` at most, not
    one per event (a timer per wait was a tenth of the API's CPU under streaming load)."""

    def __init__(self, queue: asyncio.Queue[bytes], poll: float) -> None:
        self.queue, self.poll = queue, poll
        self.loop = asyncio.get_running_loop()
        self.active = self.loop.time()
        self.handle = self.loop.call_at(self.active + poll, self._fire)

    def touch(self) -> None:
        """The reader had events (or went back to the log): idle from now on."""
        self.active = self.loop.time()

    def idle(self) -> bool:
        return self.loop.time() - self.active >= self.poll

    def _fire(self) -> None:
        if self.idle():
            # Only into an empty queue: a reader with messages waiting has work (it may be
            # paused on a slow client), and must not be sent back to a log that may have
            # been trimmed past them.
            if self.queue.empty():
                self.queue.put_nowait(_IDLE)
            self.active = self.loop.time()  # one wake-up per idle `poll`
        self.handle = self.loop.call_at(self.active + self.poll, self._fire)

    def cancel(self) -> None:
        self.handle.cancel()


async def _live(
    queue: asyncio.Queue[bytes], last: int, idle: _IdleTimer
) -> AsyncIterator[list[RawEvent]]:
    """Consecutive live events after `last`, as many at a time as have arrived; ends on an
    idle `poll`, on a gap, or after the terminal event."""
    idle.touch()
    while True:
        raws = await _arrived(queue, idle)
        if raws is None:
            return
        events, go_on = _consecutive(raws, last)
        if events:
            last = events[-1].seq
            yield events
        if not go_on:
            return


async def _arrived(queue: asyncio.Queue[bytes], idle: _IdleTimer) -> list[bytes] | None:
    """Every message in the queue, once there is one; None once the reader has been idle
    for its `poll` (the timer's word)."""
    raws: list[bytes] = []
    while not raws:
        raw = await queue.get()
        if raw == _IDLE:
            if queue.empty():  # idle for `poll`: back to the log
                return None
            continue  # a stale wake-up: events came after all
        raws.append(raw)
        while not queue.empty():
            raw = queue.get_nowait()
            if raw != _IDLE:
                raws.append(raw)
    idle.touch()
    return raws


def _consecutive(raws: list[bytes], last: int) -> tuple[list[RawEvent], bool]:
    """The events that follow `last` without a gap (older ones dropped), and whether to go on
    listening: not after a gap (the log fills it) nor after the terminal event."""
    events: list[RawEvent] = []
    for raw in raws:
        event = RawEvent.parse(raw)
        if event.seq <= last:
            continue
        if event.seq != last + 1:
            return events, False
        last = event.seq
        events.append(event)
        if event.terminal:
            return events, False
    return events, True
